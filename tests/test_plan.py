"""reinit_many: validation before work, grouping, chunking, and the Report's numbers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import reference_fire_conv

import fire_core
from fire_core.plan import reinit_many


def _model(rng, dtype=np.float64):
    """A small mixed 'model': same-shaped linears, convs of two tap counts, a wide layer."""
    return [
        ("fc1", rng.normal(size=(16, 8)).astype(dtype), "oi"),
        ("fc2", rng.normal(size=(16, 8)).astype(dtype), "oi"),
        ("conv3", rng.normal(size=(16, 8, 3, 3)).astype(dtype), "oihw"),
        ("conv1", rng.normal(size=(16, 8, 1, 1)).astype(dtype), "oihw"),
        ("head", rng.normal(size=(4, 16)).astype(dtype), "oi"),
    ]


def _run(weights, **kw):
    out = {}
    rep = reinit_many(weights, write=out.__setitem__, **kw)
    return out, rep


def test_every_weight_matches_the_per_layer_per_tap_reference(backend, rng):
    weights = [(n, backend.asarray(w), lay) for n, w, lay in _model(rng)]
    out, _ = _run(weights, steps=5)
    for name, w, _ in _model(np.random.default_rng(12345)):
        np.testing.assert_allclose(backend.to_numpy(out[name]), reference_fire_conv(w, 5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes", [1, 2000, 10**9])
def test_chunking_does_not_change_results(rng, chunk_bytes):
    weights = _model(rng)
    ref, _ = _run(weights, steps=6, method="fast")
    got, rep = _run(weights, steps=6, method="fast", chunk_bytes=chunk_bytes)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-13)  # batched BLAS rounds differently
    assert rep.names == [n for n, _, _ in weights]


def test_same_shaped_matrices_share_one_batched_call(rng, monkeypatch):
    import fire_core.plan as plan

    calls = []
    real = plan.polar

    def spy(x, *args, **kw):
        calls.append(tuple(x.shape))
        return real(x, *args, **kw)

    monkeypatch.setattr(plan, "polar", spy)
    _run(_model(rng), steps=2)
    # fc1, fc2, conv3 (9 taps) and conv1 (1 tap) are all 16x8 matrices: one call of 1+1+9+1.
    assert sorted(calls) == sorted([(12, 16, 8), (1, 4, 16)])


def test_report_numbers_match_direct_computations(rng):
    weights = _model(rng)
    out, rep = _run(weights, steps=5)
    for name, w, layout in weights:
        row = rep[name]
        mats = fire_core.to_matrices(w, layout)
        taps, d_out, d_in = mats.shape
        ref = np.sqrt(d_out / d_in) / taps
        assert row["shape"] == w.shape and row["layout"] == layout
        assert row["taps"] == taps and row["n"] == min(d_out, d_in)
        np.testing.assert_allclose(row["scale"], ref, rtol=1e-15)
        np.testing.assert_allclose(row["sfe"], np.sum((out[name] - w) ** 2), rtol=1e-12)
        np.testing.assert_allclose(row["dfi_before"], float(np.sum(fire_core.dfi(mats / ref))), rtol=1e-10)
        after = fire_core.project(mats, 5)
        np.testing.assert_allclose(row["dfi_after"], float(np.sum(fire_core.dfi(after))), rtol=1e-10)


def test_dfi_before_reads_zero_for_a_weight_already_at_the_fire_target(rng):
    q, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    taps = np.stack([q] * 4, axis=-1).reshape(9, 9, 2, 2) / 4  # every tap orthogonal / taps
    _, rep = _run([("conv", taps, "oihw")], steps=0)
    assert rep["conv"]["dfi_before"] < 1e-24


@pytest.mark.parametrize("method", ["fire", "fast", "svd"])
def test_report_for_every_method_and_zero_steps(rng, method):
    _, rep = _run(_model(rng), steps=0 if method != "svd" else 3, method=method)
    for row in rep:
        assert np.isfinite(row["dfi_before"]) and np.isfinite(row["dfi_after"])
        if method == "svd":
            assert row["dfi_after"] < 1e-20


def test_validation_happens_before_any_write(rng):
    weights = _model(rng)
    bad = weights[3][1].copy()
    bad[0, 0, 0, 0] = np.nan
    weights[3] = ("conv1", bad, "oihw")
    writes = []
    with pytest.raises(ValueError, match=r"conv1: contains NaN or Inf \(shape \(16, 8, 1, 1\)\)"):
        reinit_many(weights, write=lambda n, a: writes.append(n))
    assert writes == []


@pytest.mark.parametrize(
    ("entry", "error", "message"),
    [
        (("layer", np.ones((3, 3), dtype=np.int64), "oi"), TypeError, r"layer: expected a real floating"),
        (("layer", np.ones((3, 3, 3)), "oi"), ValueError, r"layer: layout 'oi' names 2 axes but the weight has shape \(3, 3, 3\)"),
        (("layer", np.ones(3), "oi"), ValueError, r"layer: layout 'oi' names 2 axes"),
        (("layer", np.ones((3, 3), dtype=np.complex128), "oi"), TypeError, r"layer: complex"),
    ],
)
def test_bad_weights_name_the_layer(rng, entry, error, message):
    writes = []
    with pytest.raises(error, match=message):
        reinit_many(_model(rng) + [entry], write=lambda n, a: writes.append(n))
    assert writes == []


def test_duplicate_names_are_refused(rng):
    w = rng.normal(size=(3, 3))
    with pytest.raises(ValueError, match="fc: the same name appears twice"):
        reinit_many([("fc", w, "oi"), ("fc", w, "oi")], write=lambda n, a: None)


def test_bad_method_steps_and_scale_are_refused_before_validation():
    for kw, msg in [({"method": "qr"}, "unknown method"), ({"steps": -2}, "steps"), ({"scale": "x"}, "unknown scale")]:
        with pytest.raises(ValueError, match=msg):
            reinit_many([("fc", np.ones((2, 2)), "oi")], write=lambda n, a: None, **kw)


def test_mixed_dtypes_are_grouped_separately_and_keep_their_dtype(rng):
    weights = [("a", rng.normal(size=(6, 4)).astype(np.float32), "oi"), ("b", rng.normal(size=(6, 4)), "oi")]
    out, rep = _run(weights, steps=5)
    assert out["a"].dtype == np.float32 and out["b"].dtype == np.float64
    np.testing.assert_allclose(out["a"], reference_fire_conv(weights[0][1].astype(np.float64), 5), atol=1e-6)


def test_bfloat16_torch_weights_are_computed_in_float32(rng):
    torch = pytest.importorskip("torch")
    w = torch.asarray(rng.normal(size=(8, 6)), dtype=torch.bfloat16)
    out, rep = _run([("fc", w, "oi")], steps=5)
    assert out["fc"].dtype == torch.bfloat16
    want = torch.asarray(reference_fire_conv(w.to(torch.float64).numpy(), 5), dtype=torch.float32).to(torch.bfloat16)
    # float32 math against float64 math rounded to float32: they may sit a float32 ulp apart and
    # so round to neighbouring bfloat16 values; one bfloat16 ulp (2^-7 relative) is the bound.
    torch.testing.assert_close(out["fc"].float(), want.float(), rtol=2.0**-7, atol=0)
    np.testing.assert_allclose(rep["fc"]["sfe"], float(((out["fc"].double() - w.double()) ** 2).sum()), rtol=1e-6)


def test_report_is_none_without_stats_and_jit_traces(rng):
    jax = pytest.importorskip("jax")
    jnp = __import__("conftest").get_backend("jax").xp
    weights = {n: jnp.asarray(w) for n, w, _ in _model(rng)}
    layouts = {n: lay for n, _, lay in _model(np.random.default_rng(0))}

    def apply(ws):
        out = {}
        assert reinit_many([(n, ws[n], layouts[n]) for n in ws], write=out.__setitem__, report=False) is None
        return out

    jitted, eager = jax.jit(apply)(weights), apply(weights)
    for name in weights:
        np.testing.assert_allclose(np.asarray(jitted[name]), np.asarray(eager[name]), atol=1e-12)


def test_report_renders_a_table_and_a_dict(rng):
    _, rep = _run(_model(rng), steps=5)
    text = str(rep)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["name", "shape", "layout", "scale"]
    assert "conv3" in text and "16x8x3x3" in text
    assert "FIRE method=fire, steps=5, scale='fire': projected 5 weights" in lines[-1]
    d = rep.to_dict()
    assert d["method"] == "fire" and len(d["rows"]) == 5 and d["rows"][2]["shape"] == [16, 8, 3, 3]
    with pytest.raises(KeyError):
        rep["missing"]


def test_import_fire_core_imports_no_framework():
    code = "import sys, fire_core; print(sorted(m for m in ('torch', 'jax', 'cupy', 'flax', 'jaxlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_weights_may_be_a_generator(rng):
    weights = _model(rng)
    out, rep = _run((w for w in weights), steps=3)
    assert sorted(out) == sorted(n for n, _, _ in weights) and len(rep) == len(weights)


def test_context_is_entered_around_each_arrays_checks_math_and_write(rng):
    import contextlib

    weights = _model(rng)
    current, seen = [], []

    @contextlib.contextmanager
    def context(array):
        current.append(id(array))
        try:
            yield
        finally:
            current.pop()

    def write(name, new):
        seen.append((name, current[-1] if current else None))

    reinit_many(weights, steps=2, write=write, context=context)
    ids = {n: id(w) for n, w, _ in weights}
    assert sorted(n for n, _ in seen) == sorted(n for n, _, _ in weights)  # each weight written once
    assert all(cur == ids[name] for name, cur in seen)


@pytest.mark.parametrize("total", [1, 2, 3, 7, 9, 27, 49, 100])
@pytest.mark.parametrize("cap", [1, 2, 3, 4, 16, 1000])
def test_chunk_sizes_share_out_evenly_over_two_threads(total, cap):
    from fire_core.plan import _chunk_sizes

    sizes = _chunk_sizes(total, cap, 2)
    assert sum(sizes) == total and all(s > 0 for s in sizes)
    aligned = max(cap - cap % 2, 2) if cap > 1 else 1
    assert all(s <= aligned for s in sizes)
    assert sizes[: total // aligned] == [aligned] * (total // aligned)  # full chunks first, then the rest
    rest = sizes[total // aligned :]
    if cap <= 64 and 2 < total % aligned < 8 and total % aligned % 2:
        assert rest[-1] == 1 and rest[0] % 2 == 0  # 3 big matrices: a pair, then one alone
    else:
        assert len(rest) <= 1  # small matrices: the rest in one chunk, odd or not


def test_a_layer_spanning_uneven_chunks_is_written_whole(rng):
    """27 taps in chunks of 4 (and a pair and a single at the end): one write of the whole layer."""
    w = rng.normal(size=(8, 8, 3, 3))
    weights = [("a", w, "oihw"), ("b", rng.normal(size=(8, 8, 3, 3)), "oihw"), ("c", rng.normal(size=(8, 8, 3, 3)), "oihw")]
    out, rep = _run(weights, steps=5, chunk_bytes=4 * 8 * 8 * 8)
    for name, x, _ in weights:
        np.testing.assert_allclose(out[name], reference_fire_conv(x, 5), rtol=0, atol=1e-12)
    assert rep.names == ["a", "b", "c"]


def test_strided_taps_reach_the_projection_as_one_row_major_batch(rng, monkeypatch):
    """A conv kernel's taps are strided views; the chunk is made row-major once (3-4x faster elementwise work)."""
    torch = pytest.importorskip("torch")
    import fire_core.plan as plan

    seen = []
    real = plan.polar

    def spy(x, *args, **kw):
        seen.append(x.is_contiguous())
        return real(x, *args, **kw)

    monkeypatch.setattr(plan, "polar", spy)
    w = torch.asarray(rng.normal(size=(16, 8, 3, 3)))
    before = w.clone()
    out, rep = _run([("conv", w, "oihw")], steps=5, chunk_bytes=4 * 16 * 8 * 8)  # 4 taps a chunk: strided slices
    assert seen and all(seen)
    assert torch.equal(w, before)  # the copy is ours: the input is untouched
    np.testing.assert_allclose(out["conv"].numpy(), reference_fire_conv(w.numpy(), 5), rtol=0, atol=1e-12)


def test_report_of_tensors_that_require_grad_leaves_their_graph_usable(rng):
    """Outside no_grad the report's in-place shortcuts step aside: the results can still be differentiated."""
    torch = pytest.importorskip("torch")
    w = torch.asarray(rng.normal(size=(6, 4, 3, 3)), requires_grad=True)
    out, rep = _run([("conv", w, "oihw")], steps=3)
    out["conv"].sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    np.testing.assert_allclose(out["conv"].detach().numpy(), reference_fire_conv(w.detach().numpy(), 3), rtol=0, atol=1e-12)
    assert rep["conv"]["dfi_after"] >= 0


def test_default_chunk_size_follows_the_device(rng, monkeypatch):
    """CHUNK_BYTES for arrays in host memory, GPU_CHUNK_BYTES for arrays on an accelerator."""
    import fire_core.plan as plan

    calls = []
    real = plan.polar

    def spy(x, *args, **kw):
        calls.append(int(x.shape[0]))
        return real(x, *args, **kw)

    monkeypatch.setattr(plan, "polar", spy)
    weights = [("conv", rng.normal(size=(16, 8, 3, 3)), "oihw")]  # 9 taps of 16 x 8 float64: 1 KiB each
    monkeypatch.setattr(plan, "CHUNK_BYTES", 4 * 1024)
    monkeypatch.setattr(plan, "GPU_CHUNK_BYTES", 2 * 1024)
    _run(weights, steps=1)
    assert calls == [4, 4, 1]
    calls.clear()
    monkeypatch.setattr(plan, "on_accelerator", lambda x: True)
    _run(weights, steps=1)
    assert calls == [2, 2, 2, 2, 1]


def test_on_accelerator_is_false_in_host_memory(backend):
    from fire_core._array import on_accelerator

    assert on_accelerator(backend.asarray(np.ones((2, 2)))) == (backend.name == "cupy")
