"""fire_core.cupy: named arrays updated in place on their own device.

The mapping logic (``fire_core.conventions.apply_inplace``, which
``fire_core.cupy.apply`` is a thin binding of) is tested on NumPy arrays
standing in for CuPy ones, so it runs everywhere. The GPU tests need CuPy and
a CUDA device and skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import subprocess
import sys
import types

import numpy as np
import pytest

import fire_core
from fire_core.conventions import apply_inplace


def state(seed=0, dtype=np.float64):
    """A small torch-convention state dict: Linear, Conv2d, MultiheadAttention, norm, embedding, counter."""
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.normal(size=(20, 8)).astype(dtype),
        "attn.in_proj_weight": rng.normal(size=(24, 8)).astype(dtype),
        "attn.in_proj_bias": rng.normal(size=24).astype(dtype),
        "attn.out_proj.weight": rng.normal(size=(8, 8)).astype(dtype),
        "conv.weight": rng.normal(size=(6, 8, 3, 3)).astype(dtype),
        "conv.bias": rng.normal(size=6).astype(dtype),
        "norm.weight": rng.normal(size=6).astype(dtype),
        "fc.weight": rng.normal(size=(5, 6)).astype(dtype),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def expected_state(arrays, **kw):
    """What FIRE should give, built weight by weight with fire_core.reinit (no conventions code)."""
    out = {k: v.copy() for k, v in arrays.items()}
    out["attn.in_proj_weight"] = np.concatenate(
        [fire_core.reinit(b, "oi", **kw) for b in np.split(arrays["attn.in_proj_weight"], 3, axis=0)]
    )
    for name, layout in (("attn.out_proj.weight", "oi"), ("conv.weight", "oihw"), ("fc.weight", "oi")):
        out[name] = fire_core.reinit(arrays[name], layout, **kw)
    return out


PROJECTED = ("attn.in_proj_weight", "attn.out_proj.weight", "conv.weight", "fc.weight")


def test_cupy_module_without_cupy_names_the_extra():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed here")
    code = "import fire_core.cupy"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0
    assert "ImportError: fire_core.cupy needs CuPy: pip install 'fire-core[cupy]'" in res.stderr


def test_apply_inplace_equals_reinit_per_weight():
    arrays = state()
    expected = expected_state(arrays, steps=5)
    apply_inplace(arrays, 5)
    for name in arrays:
        np.testing.assert_allclose(arrays[name], expected[name], rtol=0, atol=1e-12, err_msg=name)


def test_apply_inplace_writes_into_the_same_arrays():
    arrays = state()
    before = dict(arrays)
    apply_inplace(arrays, 5)
    assert all(arrays[k] is before[k] for k in arrays)
    assert not np.array_equal(before["fc.weight"], state()["fc.weight"])


def test_apply_inplace_leaves_non_targets_bit_exact():
    arrays, original = state(), state()
    apply_inplace(arrays, 5)
    for name in set(arrays) - set(PROJECTED):
        assert arrays[name].dtype == original[name].dtype
        assert arrays[name].tobytes() == original[name].tobytes(), name


def test_apply_inplace_report_rows_name_the_q_k_v_blocks():
    report = apply_inplace(state(), 5)
    assert report.names == [
        "attn.in_proj_weight[q]", "attn.in_proj_weight[k]", "attn.in_proj_weight[v]",
        "attn.out_proj.weight", "conv.weight", "fc.weight",
    ]
    assert report.applied


def test_apply_inplace_passes_method_and_scale_through():
    arrays = state()
    expected = expected_state(arrays, steps=8, method="fast", scale="variance")
    apply_inplace(arrays, 8, method="fast", scale="variance")
    for name in PROJECTED:
        np.testing.assert_allclose(arrays[name], expected[name], rtol=0, atol=1e-12, err_msg=name)


def test_apply_inplace_float32_stays_float32():
    arrays = state(dtype=np.float32)
    expected = expected_state(arrays, steps=5)
    apply_inplace(arrays, 5)
    for name in PROJECTED:
        assert arrays[name].dtype == np.float32
        np.testing.assert_allclose(arrays[name], expected[name], rtol=0, atol=1e-5, err_msg=name)


def test_dry_run_changes_nothing_and_reports_the_same_rows():
    arrays, original = state(), state()
    dry = apply_inplace(arrays, 5, dry_run=True)
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], original[name])
    assert not dry.applied
    real = apply_inplace(arrays, 5)
    assert [r["dfi_before"] for r in dry] == pytest.approx([r["dfi_before"] for r in real], rel=1e-12)


def test_nan_weight_is_named_and_nothing_is_written():
    arrays = state()
    arrays["fc.weight"][1, 2] = np.nan
    snapshot = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(ValueError, match=r"fc\.weight: contains NaN"):
        apply_inplace(arrays, 5)
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], snapshot[name])


def test_a_value_that_is_not_the_adapters_array_is_a_type_error():
    arrays = state()
    arrays["fc.weight"] = arrays["fc.weight"].tolist()
    snapshot = {k: np.array(v, copy=True) for k, v in arrays.items()}
    with pytest.raises(TypeError, match=r"fc\.weight: expected a CuPy array, got builtins\.list"):
        apply_inplace(arrays, 5, is_array=lambda x: isinstance(x, np.ndarray), array_kind="a CuPy array")
    for name in arrays:
        np.testing.assert_array_equal(np.asarray(arrays[name]), snapshot[name])


class OnDevice(np.ndarray):
    """A NumPy array that says which (pretend) device it lives on, and records its writes."""

    writes: list = []
    current: list = []

    def __array_finalize__(self, obj):
        self.dev = getattr(obj, "dev", None)

    def __setitem__(self, index, value):
        OnDevice.writes.append((self.dev, OnDevice.current[-1] if OnDevice.current else None))
        super().__setitem__(index, value)


def on_devices(arrays):
    """Put the projected arrays on pretend devices 0 and 1, alternating."""
    OnDevice.writes, OnDevice.current = [], []
    for k, name in enumerate(PROJECTED):
        arrays[name] = arrays[name].view(OnDevice)
        arrays[name].dev = k % 2
    return arrays


@contextlib.contextmanager
def make_current(array):
    OnDevice.current.append(array.dev)
    try:
        yield
    finally:
        OnDevice.current.pop()


def test_each_device_is_current_for_its_own_arrays():
    arrays = on_devices(state())
    expected = expected_state(state(), steps=5)
    apply_inplace(arrays, 5, context=make_current)
    assert len(OnDevice.writes) == 6  # q, k, v blocks and three whole weights
    assert all(dev == current for dev, current in OnDevice.writes)
    for name in PROJECTED:
        np.testing.assert_allclose(arrays[name], expected[name], rtol=0, atol=1e-12, err_msg=name)


def test_bad_weight_on_one_device_stops_every_device():
    arrays = on_devices(state())
    arrays["fc.weight"][0, 0] = np.inf  # fc.weight is on device 1; device 0 comes first
    OnDevice.writes.clear()
    snapshot = {k: np.array(v, copy=True) for k, v in arrays.items()}
    with pytest.raises(ValueError, match=r"fc\.weight: contains NaN or Inf"):
        apply_inplace(arrays, 5, context=make_current)
    assert OnDevice.writes == []
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], snapshot[name])


def test_report_rows_keep_the_names_order_across_devices():
    plain = apply_inplace(state(), 5)
    split = apply_inplace(on_devices(state()), 5, context=make_current)
    assert split.names == plain.names
    assert [r["sfe"] for r in split] == pytest.approx([r["sfe"] for r in plain], rel=1e-12)


def test_the_same_array_under_two_names_is_projected_once():
    arrays = state()
    arrays["head.weight"] = arrays["fc.weight"]  # tied
    expected = fire_core.reinit(arrays["fc.weight"], "oi", steps=5)
    report = apply_inplace(arrays, 5)
    assert "head.weight" not in report.names
    np.testing.assert_allclose(arrays["head.weight"], expected, rtol=0, atol=1e-12)


def test_flax_convention_on_a_flat_dict():
    rng = np.random.default_rng(1)
    arrays = {
        "params/Dense_0/kernel": rng.normal(size=(6, 4)),
        "params/attn/query/kernel": rng.normal(size=(8, 2, 4)),
        "params/attn/key/kernel": rng.normal(size=(8, 2, 4)),
        "params/attn/value/kernel": rng.normal(size=(8, 2, 4)),
        "params/attn/out/kernel": rng.normal(size=(2, 4, 8)),
        "params/Conv_0/kernel": rng.normal(size=(3, 3, 2, 4)),
        "params/Embed_0/embedding": rng.normal(size=(10, 8)),
    }
    layouts = {"params/Dense_0/kernel": "io", "params/attn/query/kernel": "ioo", "params/attn/key/kernel": "ioo",
               "params/attn/value/kernel": "ioo", "params/attn/out/kernel": "iio", "params/Conv_0/kernel": "hwio"}
    expected = {k: fire_core.reinit(arrays[k], lay, steps=5) for k, lay in layouts.items()}
    embedding = arrays["params/Embed_0/embedding"].copy()
    apply_inplace(arrays, 5, convention="flax")
    for name in layouts:
        np.testing.assert_allclose(arrays[name], expected[name], rtol=0, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(arrays["params/Embed_0/embedding"], embedding)


def test_a_non_mapping_is_a_type_error():
    with pytest.raises(TypeError, match="mapping of names to arrays"):
        apply_inplace([np.zeros((2, 2))], 5)


def test_a_tied_array_is_one_row_naming_all_its_names():
    arrays = state()
    arrays["head.weight"] = arrays["fc.weight"]  # tied
    row = apply_inplace(arrays, 5)["fc.weight"]
    assert row["aliases"] == ["head.weight"]


def test_a_tied_array_excluded_by_its_second_name_is_left_alone():
    arrays = state()
    arrays["head.weight"] = arrays["fc.weight"]
    before = arrays["fc.weight"].copy()
    report = apply_inplace(arrays, 5, exclude="head")
    assert "fc.weight" not in report.names
    np.testing.assert_array_equal(arrays["fc.weight"], before)
    assert {"name": "fc.weight", "shape": (5, 6), "aliases": ["head.weight"],
            "reason": "excluded by exclude pattern 'head'"} in report.skipped
    assert "left alone (excluded by exclude pattern 'head'): fc.weight (= head.weight) (5x6)" in str(report)


def test_report_lists_every_array_left_alone_with_the_reason():
    arrays = state()
    arrays["quant.weight"] = np.ones((5, 6), np.int8)
    arrays["empty.weight"] = np.zeros((0, 6))
    report = apply_inplace(arrays, 5, exclude="conv")
    assert {s["name"]: s["reason"] for s in report.skipped} == {
        "embed.weight": "an embedding, by its name",
        "conv.weight": "excluded by exclude pattern 'conv'",
        "quant.weight": "not floating point (int8)",
        "empty.weight": "empty (an axis of length 0)",
    }
    assert "left alone (an embedding, by its name): embed.weight (20x8)" in str(report)


def test_an_empty_weight_does_not_fail_the_call():
    arrays = {"fc.weight": np.random.default_rng(0).normal(size=(4, 6)), "out.weight": np.zeros((0, 6))}
    report = apply_inplace(arrays, 5)
    assert report.names == ["fc.weight"] and arrays["out.weight"].shape == (0, 6)


def test_a_call_that_selects_nothing_is_an_error_naming_what_was_left_alone():
    arrays = {"embed.weight": np.ones((4, 4)), "fc.bias": np.ones(4)}
    with pytest.raises(ValueError, match=r"none of the 2 arrays is a FIRE target.*embed\.weight: an embedding"):
        apply_inplace(arrays, 5)


def test_fused_c_attn_is_split_and_the_report_says_so():
    w = np.random.default_rng(2).normal(size=(24, 8))
    arrays = {"h.0.attn.c_attn.weight": w.copy()}
    report = apply_inplace(arrays, 5)
    want = np.concatenate([fire_core.reinit(b, "oi") for b in np.split(w, 3, axis=0)])
    np.testing.assert_allclose(arrays["h.0.attn.c_attn.weight"], want, rtol=0, atol=1e-12)
    assert report.names == [f"h.0.attn.c_attn.weight[{b}]" for b in "qkv"]
    assert any("split into their blocks by default" in n for n in report.notes)


WRONG_TYPES = [
    {"include": 3}, {"exclude": 2.5}, {"include": [["fc"]]}, {"layouts": ["fc=oi"]}, {"split": "c_attn=3"},
    {"split": {"fc": 1.5}}, {"convention": 3}, {"steps": "5"}, {"steps": 2.0}, {"method": 1}, {"scale": [1]},
    {"dry_run": "no"},
]


@pytest.mark.parametrize("kw", WRONG_TYPES, ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()))
def test_apply_inplace_arguments_of_a_wrong_type_are_type_errors(kw):
    arrays, original = state(), state()
    with pytest.raises(TypeError):
        apply_inplace(arrays, **kw)
    for name in arrays:
        np.testing.assert_array_equal(arrays[name], original[name])


# --------------------------------------------------------------------------- fire_core.cupy on a stand-in


class FakeCupyArray(np.ndarray):
    """A NumPy array that passes for a CuPy one in fire_core.cupy: ``.device.id`` names its (pretend) GPU."""

    @property
    def device(self):
        return types.SimpleNamespace(id=0)


class _PassesForCupy(type):
    """``isinstance(x, cupy.ndarray)`` holds for the stand-ins, but no class is a subclass, so the core
    (array_api_compat tells CuPy arrays by ``issubclass``) computes on them as the NumPy arrays they are."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, FakeCupyArray)

    def __subclasscheck__(cls, sub):
        return False


class FakeNdarray(metaclass=_PassesForCupy):
    pass


@pytest.fixture
def fc_cupy(monkeypatch):
    """fire_core.cupy imported against a stand-in ``cupy`` module (ndarray, cuda.Device), without a GPU."""
    fake = types.ModuleType("cupy")
    fake.ndarray = FakeNdarray
    fake.cuda = types.SimpleNamespace(Device=lambda index: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delitem(sys.modules, "fire_core.cupy", raising=False)
    module = importlib.import_module("fire_core.cupy")
    yield module
    sys.modules.pop("fire_core.cupy", None)


def test_cupy_apply_projects_in_place_on_stand_in_arrays(fc_cupy):
    host = state()
    expected = expected_state(host, steps=5)
    arrays = {k: v.copy().view(FakeCupyArray) for k, v in host.items()}
    report = fc_cupy.apply(arrays, 5)
    for name in arrays:
        np.testing.assert_allclose(arrays[name], expected[name], rtol=0, atol=1e-12, err_msg=name)
    assert {s["name"] for s in report.skipped} == {"embed.weight"}


@pytest.mark.parametrize("kw", WRONG_TYPES, ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()))
def test_cupy_apply_arguments_of_a_wrong_type_are_type_errors(fc_cupy, kw):
    arrays = {k: v.copy().view(FakeCupyArray) for k, v in state().items()}
    with pytest.raises(TypeError):
        fc_cupy.apply(arrays, **kw)
    for name, value in state().items():
        np.testing.assert_array_equal(arrays[name], value)


@pytest.mark.parametrize("what", ["include", "exclude"])
def test_cupy_apply_pattern_that_matches_nothing_names_the_closest(fc_cupy, what):
    arrays = {k: v.copy().view(FakeCupyArray) for k, v in state().items()}
    with pytest.raises(ValueError, match=rf"{what} pattern 'attn.out_prj' matches no weight.*closest: attn.out_proj"):
        fc_cupy.apply(arrays, **{what: "attn.out_prj"})


# --------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def cupy():
    cp = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'fire-core[cupy]')")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver
        pytest.skip(f"CuPy is installed but no CUDA device is usable: {e}")
    if count < 1:
        pytest.skip("CuPy is installed but there is no CUDA device")
    return cp


@pytest.mark.gpu
def test_gpu_apply_equals_numpy(cupy):
    import fire_core.cupy as fc_cupy

    host = state()
    expected = expected_state(host, steps=5)
    arrays = {k: cupy.asarray(v) for k, v in host.items()}
    ids = {k: id(v) for k, v in arrays.items()}
    fc_cupy.apply(arrays, 5)
    for name in arrays:
        assert id(arrays[name]) == ids[name] and isinstance(arrays[name], cupy.ndarray)
        np.testing.assert_allclose(arrays[name].get(), expected[name], rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.gpu
def test_gpu_float32_with_tf32_off_matches_numpy(cupy):
    import os

    import fire_core.cupy as fc_cupy

    if os.environ.get("CUPY_TF32", "0") != "0":
        pytest.skip("CUPY_TF32 is on: float32 matmuls round inputs to 10-bit mantissas")
    host = state(dtype=np.float32)
    expected = expected_state(host, steps=5)
    arrays = {k: cupy.asarray(v) for k, v in host.items()}
    fc_cupy.apply(arrays, 5)
    for name in PROJECTED:
        np.testing.assert_allclose(arrays[name].get(), expected[name], rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.gpu
def test_gpu_rejects_host_arrays(cupy):
    import fire_core.cupy as fc_cupy

    with pytest.raises(TypeError, match=r"fc\.weight: expected a CuPy array, got numpy\.ndarray"):
        fc_cupy.apply({"fc.weight": np.zeros((4, 4))})


@pytest.mark.gpu
def test_gpu_each_array_stays_on_its_own_device(cupy):
    import fire_core.cupy as fc_cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 CUDA devices")
    host = state()
    expected = expected_state(host, steps=5)
    arrays = {}
    for k, (name, v) in enumerate(host.items()):
        with cupy.cuda.Device(k % 2):
            arrays[name] = cupy.asarray(v)
    devices = {k: v.device.id for k, v in arrays.items()}
    fc_cupy.apply(arrays, 5)
    for name in arrays:
        assert arrays[name].device.id == devices[name]
        np.testing.assert_allclose(arrays[name].get(), expected[name], rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.gpu
def test_gpu_dlpack_round_trip_torch_cuda(cupy):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    w = np.random.default_rng(3).normal(size=(64, 32, 3, 3))
    via_cupy = fire_core.reinit(cupy.asarray(w), "oihw", steps=5)
    via_torch = fire_core.reinit(torch.from_dlpack(cupy.asarray(w)), "oihw", steps=5)
    back = cupy.from_dlpack(via_torch.contiguous())
    np.testing.assert_allclose(back.get(), via_cupy.get(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(via_cupy.get(), fire_core.reinit(w, "oihw", steps=5), rtol=0, atol=1e-12)


@pytest.mark.gpu
def test_gpu_dlpack_round_trip_jax(cupy):
    jax = pytest.importorskip("jax")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("jax has no GPU backend")
    jax.config.update("jax_enable_x64", True)
    w = np.random.default_rng(4).normal(size=(48, 96))
    via_cupy = fire_core.reinit(cupy.asarray(w), "oi", steps=5)
    via_jax = fire_core.reinit(jax.device_put(w, gpu), "oi", steps=5)
    back = cupy.from_dlpack(via_jax)
    np.testing.assert_allclose(back.get(), via_cupy.get(), rtol=0, atol=1e-12)
    to_jax = jax.numpy.from_dlpack(cupy.ascontiguousarray(via_cupy))
    np.testing.assert_allclose(np.asarray(to_jax), np.asarray(via_jax), rtol=0, atol=1e-12)
