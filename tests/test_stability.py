"""Stability controls (issue 9): every scale rule through every adapter, against a per-tap SVD loop.

The reference here is written independently of fire_core: each tap's
``d_out x d_in`` matrix is cut out by hand for the adapter's layout, its
exact polar factor ``U V^T`` taken with ``numpy.linalg.svd``, and the factor
of the rule applied:

* ``"fire"``: ``sqrt(d_out / d_in) / taps``;
* ``"variance"``: ``sqrt(d_out / d_in) / sqrt(taps)``;
* ``"norm"``: ``||W||_F / ||P||_F`` over the whole layer (all taps);
* ``None``: 1; a number: that number.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
from conftest import flax_params

import fire_core
from fire_core.conventions import apply_inplace

SCALES = ["fire", "variance", "norm", None, 0.5]


def polar(m: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(m, full_matrices=False)
    return u @ vh


def expected_taps(mats: list[np.ndarray], scale) -> list[np.ndarray]:
    """One layer's tap matrices (each d_out x d_in) -> its FIRE matrices under ``scale``."""
    projected = [polar(m) for m in mats]
    taps = len(mats)
    d_out, d_in = mats[0].shape
    if scale == "fire":
        factor = math.sqrt(d_out / d_in) / taps
    elif scale == "variance":
        factor = math.sqrt(d_out / d_in) / math.sqrt(taps)
    elif scale == "norm":
        factor = math.sqrt(sum(np.sum(m * m) for m in mats)) / math.sqrt(sum(np.sum(p * p) for p in projected))
    elif scale is None:
        factor = 1.0
    else:
        factor = float(scale)
    return [factor * p for p in projected]


def expected_torch_weight(w: np.ndarray, scale, transposed: bool = False) -> np.ndarray:
    """A torch weight (out, in, *taps) -- or (in, out, *taps) if ``transposed`` -- tap by tap."""
    idx = [(slice(None), slice(None)) + t for t in np.ndindex(*w.shape[2:])]
    mats = [w[i].T if transposed else w[i] for i in idx]
    out = np.empty_like(w)
    for i, m in zip(idx, expected_taps(mats, scale)):
        out[i] = m.T if transposed else m
    return out


def expected_flax_kernel(w: np.ndarray, kind: str, scale) -> np.ndarray:
    """A Flax kernel: ``dense`` (in, out), ``conv`` (*taps, in, out), ``qkv`` (in, H, D), ``out`` (H, D, out)."""
    if kind == "conv":
        taps = list(np.ndindex(*w.shape[:-2]))
        out = np.empty_like(w)
        for t, m in zip(taps, expected_taps([w[t].T for t in taps], scale)):
            out[t] = m.T
        return out
    flat = w.reshape(w.shape[0], -1) if kind in ("dense", "qkv") else w.reshape(-1, w.shape[-1])
    return expected_taps([flat.T], scale)[0].T.reshape(w.shape)


def assert_close(got, want, tol=1e-10, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())), err_msg=what)


def torch_state(seed=0) -> dict[str, np.ndarray]:
    """Torch-convention weights: Linear, Conv2d, ConvTranspose2d (in, out, kh, kw), fused attention."""
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(6, 3, 3, 3)),
        "up.weight": rng.normal(size=(6, 4, 2, 2)),
        "attn.in_proj_weight": rng.normal(size=(24, 8)),
        "attn.out_proj.weight": rng.normal(size=(8, 8)),
        "fc.weight": rng.normal(size=(5, 12)),
        "fc.bias": rng.normal(size=5),
    }


def expected_torch_state(sd: dict, scale) -> dict:
    out = dict(sd)
    out["conv.weight"] = expected_torch_weight(sd["conv.weight"], scale)
    out["up.weight"] = expected_torch_weight(sd["up.weight"], scale, transposed=True)
    out["attn.in_proj_weight"] = np.concatenate(
        [expected_torch_weight(b, scale) for b in np.split(sd["attn.in_proj_weight"], 3)]
    )
    for name in ("attn.out_proj.weight", "fc.weight"):
        out[name] = expected_torch_weight(sd[name], scale)
    return out


# --- the reference itself ----------------------------------------------------------------------------


def test_reference_norm_rule_keeps_the_frobenius_norm():
    w = np.random.default_rng(3).normal(size=(6, 3, 3, 3))
    new = expected_torch_weight(w, "norm")
    assert np.linalg.norm(new) == pytest.approx(np.linalg.norm(w), rel=1e-12)


@pytest.mark.parametrize("scale", SCALES)
def test_core_reinit_matches_the_reference(scale):
    w = np.random.default_rng(4).normal(size=(6, 3, 3, 3))
    assert_close(fire_core.reinit(w, "oihw", method="svd", scale=scale), expected_torch_weight(w, scale))


# --- torch ---------------------------------------------------------------------------------------------


def torch_model(torch, sd):
    nn = torch.nn
    model = nn.Module()
    model.conv = nn.Conv2d(3, 6, 3, bias=False)
    model.up = nn.ConvTranspose2d(6, 4, 2, bias=False)
    model.attn = nn.MultiheadAttention(8, 2, bias=False)
    model.fc = nn.Linear(12, 5)
    model.double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(sd[name]))
    return model


@pytest.mark.parametrize("scale", SCALES)
def test_torch_apply_scale_rules_match_the_reference(scale):
    torch = pytest.importorskip("torch")
    import fire_core.torch as ft

    sd = torch_state()
    model = torch_model(torch, sd)
    report = ft.apply(model, method="svd", scale=scale)
    want = expected_torch_state(sd, scale)
    for name, p in model.named_parameters():
        assert_close(p.detach().numpy(), want[name], what=name)
    assert report.scale == scale


def test_torch_norm_rule_keeps_each_layers_norm_and_the_projections_direction():
    torch = pytest.importorskip("torch")
    import fire_core.torch as ft

    sd = torch_state(1)
    model = torch_model(torch, sd)
    ft.apply(model, steps=10, scale="norm")  # the default iteration, not an exact polar factor
    for name in ("conv.weight", "fc.weight"):
        new = dict(model.named_parameters())[name].detach().numpy()
        old = sd[name]
        assert np.linalg.norm(new) == pytest.approx(np.linalg.norm(old), rel=1e-12), name
        # direction: the "fire"-scaled iterate of the same layer, normalized
        bare = fire_core.reinit(old, "oihw" if old.ndim == 4 else "oi", steps=10, scale=None)
        assert_close(new / np.linalg.norm(new), bare / np.linalg.norm(bare), what=name)


# --- flax ------------------------------------------------------------------------------------------------


FLAX_KINDS = {"Dense_0": "dense", "Conv_0": "conv", "attn/query": "qkv", "attn/key": "qkv",
              "attn/value": "qkv", "attn/out": "out"}


def _at(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


@pytest.mark.parametrize("scale", SCALES)
def test_flax_apply_scale_rules_match_the_reference(x64, scale):
    import fire_core.flax as ff

    params = flax_params()
    new = ff.apply(params, method="svd", scale=scale)
    for module, kind in FLAX_KINDS.items():
        w = _at(params, module)["kernel"]
        assert_close(_at(new, module)["kernel"], expected_flax_kernel(w, kind, scale), what=module)
    assert np.array_equal(new["Dense_0"]["bias"], params["Dense_0"]["bias"])


@pytest.mark.parametrize("scale", SCALES)
def test_flax_apply_under_jit_honours_the_scale_rule(x64, scale):
    import fire_core.flax as ff

    params = flax_params()
    new = x64.jit(lambda p: ff.apply(p, method="svd", scale=scale))(params)
    w = params["Conv_0"]["kernel"]
    assert_close(new["Conv_0"]["kernel"], expected_flax_kernel(w, "conv", scale))


# --- the CuPy adapter's path (fire_core.conventions.apply_inplace with a device context) -------------------


@pytest.mark.parametrize("scale", SCALES)
def test_apply_inplace_with_device_context_matches_the_reference(scale):
    arrays = torch_state()
    want = expected_torch_state(torch_state(), scale)
    entered = []

    @contextlib.contextmanager
    def context(array):  # what fire_core.cupy passes: make the array's device current
        entered.append(array.shape)
        yield

    apply_inplace(arrays, method="svd", scale=scale, layouts={"up.weight": "iohw"}, context=context)
    assert entered
    for name in arrays:
        assert_close(arrays[name], want[name], what=name)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", SCALES)
def test_cupy_apply_scale_rules_match_the_reference(scale):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as e:
        pytest.skip(f"no usable CUDA device: {e}")
    import fire_core.cupy as fc

    host = torch_state()
    arrays = {k: cupy.asarray(v) for k, v in host.items()}
    fc.apply(arrays, method="svd", scale=scale, layouts={"up.weight": "iohw"})
    want = expected_torch_state(host, scale)
    for name in arrays:
        assert_close(arrays[name].get(), want[name], what=name)


# --- the command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "scale"), [("fire", "fire"), ("variance", "variance"), ("norm", "norm"),
                                              ("none", None), ("0.5", 0.5)])
def test_cli_scale_flag_matches_the_reference(tmp_path, capsys, flag, scale):
    from fire_core import cli

    sd = torch_state()
    src, out = tmp_path / "m.npz", tmp_path / "o.npz"
    np.savez(src, **sd)
    code = cli.main(["project", str(src), "-o", str(out), "--method", "svd", "--scale", flag,
                     "--layout", "up.weight=iohw"])
    assert code == 0, capsys.readouterr().err
    want = expected_torch_state(sd, scale)
    with np.load(out) as got:
        for name in sd:
            assert_close(got[name], want[name], what=name)
    assert f"scale={scale!r}" in capsys.readouterr().out


# --- function drift: the core measure and the report ---------------------------------------------------


def test_drift_is_the_relative_frobenius_change():
    from fire_core.metrics import drift

    rng = np.random.default_rng(5)
    b, a = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    assert drift(b, a) == pytest.approx(math.sqrt(np.sum((a - b) ** 2) / np.sum(b**2)), rel=1e-12)
    assert drift(b, b) == 0.0


def test_drift_of_several_outputs_takes_all_elements_together():
    from fire_core.metrics import drift

    rng = np.random.default_rng(6)
    b = [rng.normal(size=(4, 2)), rng.normal(size=5)]
    a = [rng.normal(size=(4, 2)), rng.normal(size=5)]
    num = sum(np.sum((y - x) ** 2) for x, y in zip(b, a))
    den = sum(np.sum(x**2) for x in b)
    assert drift(b, a) == pytest.approx(math.sqrt(num / den), rel=1e-12)


def test_drift_of_a_zero_output():
    from fire_core.metrics import drift

    assert drift(np.zeros(3), np.zeros(3)) == 0.0
    assert drift(np.zeros(3), np.ones(3)) == math.inf


def test_drift_of_different_shapes_is_an_error():
    from fire_core.metrics import drift

    with pytest.raises(ValueError, match="shapes differ"):
        drift(np.zeros(3), np.zeros(4))


def test_report_prints_the_drift_and_a_per_layer_column_only_when_given():
    rep = fire_core.Report(method="fire", steps=5, scale="fire")
    rep.rows.append(dict(name="fc.weight", shape=(3, 4), layout="oi", taps=1, n=3, scale=1.0, sfe=2.0,
                         dfi_before=1.0, dfi_after=0.5))
    assert "drift" not in str(rep)
    rep.drift = 0.25
    assert "function drift on the probe: 0.25" in str(rep).splitlines()[-1]
    assert "drift" not in str(rep).splitlines()[0]
    rep.rows[0]["drift"] = 0.125
    header, _, row = str(rep).splitlines()[:3]
    assert header.split()[-1] == "drift" and row.split()[-1] == "0.125"
    assert rep.to_dict()["drift"] == 0.25


# --- flax: probe, batch statistics -----------------------------------------------------------------------


def _linen_bn_model():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dense(6)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(3)(nn.relu(x))

    return Net()


def test_flax_report_drift_equals_the_direct_computation(x64):
    import fire_core.flax as ff

    model = _linen_bn_model()
    x = x64.random.normal(x64.random.PRNGKey(1), (9, 4))
    variables = model.init(x64.random.PRNGKey(0), x)
    new = ff.apply(variables)
    rep = ff.report(variables, new, probe=(model.apply, x))
    f0, f1 = np.asarray(model.apply(variables, x)), np.asarray(model.apply(new, x))
    assert rep.drift == pytest.approx(np.linalg.norm(f1 - f0) / np.linalg.norm(f0), rel=1e-10)
    assert "function drift on the probe" in str(rep)


def test_flax_report_per_layer_drift_from_captured_module_outputs(x64):
    """linen's capture_intermediates: each row's drift is that of its own module's output."""
    import functools

    import flax.linen as nn

    import fire_core.flax as ff

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(6, name="first")(x))
            h = nn.Conv(4, (3,), name="conv")(h[..., None]).reshape(x.shape[0], -1)
            return nn.Dense(3, name="head")(h)

    model = Net()
    x = x64.random.normal(x64.random.PRNGKey(1), (5, 4))
    variables = model.init(x64.random.PRNGKey(0), x)
    new = ff.apply(variables, model=(model, x))  # a user-named conv: its module type says what it is
    fn = functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"])
    rep = ff.report(variables, new, probe=(fn, x), model=(model, x))
    _, s0 = fn(variables, x)
    _, s1 = fn(new, x)
    for module in ("first", "conv", "head"):
        b = np.asarray(s0["intermediates"][module]["__call__"][0])
        a = np.asarray(s1["intermediates"][module]["__call__"][0])
        assert rep[f"{module}/kernel"]["drift"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-10)
    f0, f1 = np.asarray(model.apply(variables, x)), np.asarray(model.apply(new, x))
    assert rep.drift == pytest.approx(np.linalg.norm(f1 - f0) / np.linalg.norm(f0), rel=1e-10)
    assert "drift" in str(rep).splitlines()[0]  # the per-layer column is shown

    # Only some modules captured: the others' rows read None.
    only_head = functools.partial(
        model.apply, capture_intermediates=lambda mdl, _: mdl.name == "head", mutable=["intermediates"]
    )
    rows = ff.report(variables, new, probe=(only_head, x), model=(model, x)).rows
    assert [r["drift"] is None for r in rows] == [r["name"] != "head/kernel" for r in rows]


def test_flax_report_drift_over_an_output_tree(x64):
    import fire_core.flax as ff

    params = flax_params()
    new = ff.apply(params)
    x = np.random.default_rng(7).normal(size=(5, 6))

    def fn(p, x):  # two outputs: the first layer's activations and a second product
        h = x @ p["Dense_0"]["kernel"]
        return {"h": h, "y": h[:, :2] @ p["Conv_0"]["kernel"][0, 0]}

    b, a = fn(params, x), fn(new, x)
    num = sum(np.sum((np.asarray(a[k]) - np.asarray(b[k])) ** 2) for k in b)
    den = sum(np.sum(np.asarray(b[k]) ** 2) for k in b)
    assert ff.report(params, new, probe=(fn, x)).drift == pytest.approx(math.sqrt(num / den), rel=1e-10)


def test_flax_report_without_a_probe_has_no_drift(x64):
    import fire_core.flax as ff

    params = flax_params()
    assert ff.report(params, ff.apply(params)).drift is None


def test_flax_probe_must_be_a_function_and_its_inputs(x64):
    import fire_core.flax as ff

    params = flax_params()
    with pytest.raises(TypeError, match="probe"):
        ff.report(params, ff.apply(params), probe=np.ones((2, 6)))


def test_flax_report_notes_batch_stats_of_a_variables_dict(x64):
    import fire_core.flax as ff

    model = _linen_bn_model()
    variables = model.init(x64.random.PRNGKey(0), np.ones((2, 4)))
    rep = ff.report(variables, ff.apply(variables))
    assert any("BatchNorm running statistics (BatchNorm_0)" in n for n in rep.notes)
    params_only = ff.report(variables["params"], ff.apply(variables["params"]))
    assert not any("BatchNorm" in n for n in params_only.notes)


def test_flax_refresh_batch_stats_is_the_mean_of_each_batchs_statistics(x64):
    import fire_core.flax as ff

    model = _linen_bn_model()
    rng = np.random.default_rng(8)
    batches = [rng.normal(size=(16, 4)) + k for k in range(3)]
    variables = model.init(x64.random.PRNGKey(0), batches[0])
    new = ff.apply(variables)
    refreshed = ff.refresh_batch_stats(model, new, batches, train=True)
    dense = new["params"]["Dense_0"]
    h = [b @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]) for b in batches]  # the BatchNorm's inputs
    stats = refreshed["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], np.mean([x.mean(0) for x in h], axis=0), rtol=1e-10)
    np.testing.assert_allclose(stats["var"], np.mean([x.var(0) for x in h], axis=0), rtol=1e-8)
    assert refreshed["params"] is new["params"]


def test_flax_refresh_batch_stats_needs_batch_stats(x64):
    import fire_core.flax as ff

    with pytest.raises(ValueError, match="batch_stats"):
        ff.refresh_batch_stats(None, {"params": flax_params()}, [np.ones((2, 6))])


def _nnx_model(nnx):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 6, rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(self.bn(self.lin(x))))

    return Net(nnx.Rngs(0))


def _plain(tree, jax):
    """Leaves as numpy (random keys as their data), for exact comparisons."""
    leaves = jax.tree_util.tree_leaves(tree)
    return [np.asarray(jax.random.key_data(x)) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else np.asarray(x) for x in leaves]


def test_nnx_update_probe_drift_in_train_mode_leaves_the_rest_of_the_model_alone(x64):
    from flax import nnx

    import fire_core.flax as ff

    model, twin = _nnx_model(nnx), _nnx_model(nnx)
    x = np.random.default_rng(9).normal(size=(5, 4)).astype(np.float32)  # nnx layers are float32
    rest = _plain(nnx.state(model, nnx.Not(nnx.Param)), x64)
    f0 = np.asarray(nnx.clone(model)(x))  # train mode: batch statistics, a dropout mask
    rep = ff.update(model, probe=x)
    f1 = np.asarray(nnx.clone(model)(x))  # the same dropout mask: the RNG stream was not advanced
    assert rep.drift == pytest.approx(np.linalg.norm(f1 - f0) / np.linalg.norm(f0), rel=1e-5)
    for a, b in zip(rest, _plain(nnx.state(model, nnx.Not(nnx.Param)), x64)):
        assert np.array_equal(a, b)
    ff.update(twin)  # no probe: the same parameters (float32 math on other buffers: to rounding)
    for a, b in zip(_plain(nnx.state(model, nnx.Param), x64), _plain(nnx.state(twin, nnx.Param), x64)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_nnx_update_notes_batch_stat_variables(x64):
    from flax import nnx

    import fire_core.flax as ff

    rep = ff.update(_nnx_model(nnx))
    assert any("BatchNorm running statistics (bn)" in n for n in rep.notes)


# --- torch: probe, per-layer drift, running statistics ------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


def _mlp_with_dropout(torch, p=0.0):
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Dropout(p), nn.Linear(7, 3)).double()


def _cnn_with_bn(torch):
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).double()
    model.train()
    for _ in range(3):  # running statistics that have seen some data
        model(torch.randn(8, 2, 4, 4, dtype=torch.float64))
    return model


def _relative(before, after):
    return float(np.linalg.norm(after - before) / np.linalg.norm(before))


def test_torch_probe_drift_equals_the_direct_computation():
    torch = _torch()
    import fire_core.torch as ft

    model = _cnn_with_bn(torch).eval()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        f0 = model(x).numpy()
    rep = ft.apply(model, probe=x)
    with torch.no_grad():
        f1 = model(x).numpy()
    assert rep.drift == pytest.approx(_relative(f0, f1), rel=1e-12)
    assert "function drift on the probe" in str(rep)


def test_torch_probe_per_layer_drift_is_each_owning_modules_output_change():
    torch = _torch()
    import fire_core.torch as ft

    model = _mlp_with_dropout(torch)
    x = torch.randn(9, 5, dtype=torch.float64)
    with torch.no_grad():
        h0 = model[0](x)
        outs0 = (h0.numpy().copy(), model[3](torch.relu(h0)).numpy())
    rep = ft.apply(model, probe=x)
    with torch.no_grad():
        h1 = model[0](x)
        outs1 = (h1.numpy().copy(), model[3](torch.relu(h1)).numpy())
    assert rep["0.weight"]["drift"] == pytest.approx(_relative(outs0[0], outs1[0]), rel=1e-12)
    assert rep["3.weight"]["drift"] == pytest.approx(_relative(outs0[1], outs1[1]), rel=1e-12)
    assert rep.drift == pytest.approx(rep["3.weight"]["drift"], rel=1e-12)  # the last layer is the output
    assert str(rep).splitlines()[0].split()[-1] == "drift"


def test_torch_probe_in_train_mode_keeps_buffers_and_rng_and_sees_one_dropout_mask():
    torch = _torch()
    import fire_core.torch as ft

    model = _mlp_with_dropout(torch, p=0.5).train()
    x = torch.randn(9, 5, dtype=torch.float64)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with torch.no_grad():
        f0 = model(x).numpy()
    torch.set_rng_state(state)
    rep = ft.apply(model, probe=x)
    assert torch.equal(torch.get_rng_state(), state)  # the probe did not advance the caller's RNG
    with torch.no_grad():
        f1 = model(x).numpy()  # the same mask as f0: drawn from the same RNG state
    assert rep.drift == pytest.approx(_relative(f0, f1), rel=1e-12)


def test_torch_probe_in_train_mode_leaves_batchnorm_statistics_alone():
    torch = _torch()
    import fire_core.torch as ft

    model = _cnn_with_bn(torch)  # train mode: a forward pass would update the running statistics
    twin = _cnn_with_bn(torch)
    ft.apply(model, probe=torch.randn(5, 2, 4, 4, dtype=torch.float64))
    ft.apply(twin)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        if a.is_floating_point():  # the same float64 math on other buffers: equal to rounding, not bitwise
            torch.testing.assert_close(a, b, rtol=0, atol=1e-14, msg=name)
        else:
            assert torch.equal(a, b), name


def test_torch_dry_run_with_probe_restores_every_weight_bit_for_bit():
    torch = _torch()
    import fire_core.torch as ft

    model = _cnn_with_bn(torch).eval()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dry = ft.apply(model, probe=x, dry_run=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    real = ft.apply(model, probe=x)
    assert not dry.applied and dry.drift == pytest.approx(real.drift, rel=1e-12)
    assert [r["drift"] for r in dry] == pytest.approx([r["drift"] for r in real], rel=1e-12)


def test_torch_probe_takes_a_tuple_of_inputs_and_attention_outputs():
    torch = _torch()
    import fire_core.torch as ft

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    q, kv = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        o0, w0 = (t.numpy().copy() for t in attn(q, kv, kv))
    rep = ft.apply(attn, probe=(q, kv, kv))
    with torch.no_grad():
        o1, w1 = (t.numpy() for t in attn(q, kv, kv))
    both = math.sqrt((np.sum((o1 - o0) ** 2) + np.sum((w1 - w0) ** 2)) / (np.sum(o0**2) + np.sum(w0**2)))
    assert rep.drift == pytest.approx(both, rel=1e-12)
    assert rep["in_proj_weight[q]"]["drift"] == pytest.approx(both, rel=1e-12)  # the owner is the model itself


def test_torch_bad_probe_is_a_type_error_and_changes_nothing():
    torch = _torch()
    import fire_core.torch as ft

    model = _mlp_with_dropout(torch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="probe"):
        ft.apply(model, probe=[1, 2])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_torch_report_notes_stale_batchnorm_statistics():
    torch = _torch()
    import fire_core.torch as ft

    rep = ft.apply(_cnn_with_bn(torch))
    assert any("running statistics of 1" in n and "update_bn" in n for n in rep.notes)  # module "1": the BatchNorm
    assert not any("running statistics" in n for n in ft.apply(_mlp_with_dropout(torch)).notes)


def test_torch_update_bn_after_fire_refreshes_the_statistics_to_the_new_weights():
    torch = _torch()
    import fire_core.torch as ft
    from torch.optim.swa_utils import update_bn

    model = _cnn_with_bn(torch)
    ft.apply(model)
    batches = [torch.randn(8, 2, 4, 4, dtype=torch.float64) for _ in range(3)]
    update_bn(batches, model)
    with torch.no_grad():
        h = torch.cat([model[0](b) for b in batches])  # the BatchNorm's inputs, with the new conv weight
    bn = model[1]
    np.testing.assert_allclose(bn.running_mean.numpy(), h.mean(dim=(0, 2, 3)).numpy(), rtol=1e-10)


def test_flax_report_notes_batch_stat_variables_of_a_whole_nnx_state(x64):
    from flax import nnx

    import fire_core.flax as ff

    state = nnx.state(_nnx_model(nnx))
    rep = ff.report(state, ff.apply(state))
    assert any("BatchNorm running statistics (bn)" in n for n in rep.notes)
    params = nnx.state(_nnx_model(nnx), nnx.Param)
    assert not any("BatchNorm" in n for n in ff.report(params, ff.apply(params)).notes)
