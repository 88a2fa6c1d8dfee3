"""Extreme but finite values: every finite input gets its projection, nothing unrepresentable is written,
and no report number is inf or NaN.

The oracle everywhere is scale invariance, computed independently in float64: FIRE's projection of
``c W`` is the projection of ``W`` for every ``c > 0``, so the projection of a weight at any magnitude
is the reference iteration (or the SVD) of the same rounded matrix divided by its largest entry, and
its report numbers are float64 computations on that unit-size matrix with the scale put back
analytically (in ``decimal``, which holds 1e640).
"""

from __future__ import annotations

import math
import os
from decimal import Decimal, getcontext

import numpy as np
import pytest
from conftest import matrix_with_condition, polar_svd, reference_newton_schulz
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import fire_core
from fire_core.plan import measure, reinit_many

getcontext().prec = 40
FLOAT64_MAX = Decimal(np.finfo(np.float64).max.item())

# log10 of (smallest subnormal, largest value) of each dtype: the magnitudes the tests draw from.
RANGES = {"float16": (-7.2, 4.8), "bfloat16": (-40.0, 38.5), "float32": (-44.8, 38.5), "float64": (-323.0, 308.2)}
# Agreement of a float32 computation with float64 on well-conditioned matrices (measured: fire 4e-7,
# svd 1e-7, fast 8e-5 at 5 steps, whose first steps have slopes up to 8 and lift rounding with them).
F32_ATOL = {"fire": 4e-6, "svd": 2e-6, "fast": 4e-4}
F32_DFI_RTOL = {"fire": 5e-4, "svd": 1e-6, "fast": 5e-3}
LIMITS = {  # largest and smallest positive value
    "float16": (65504.0, 2.0**-24), "bfloat16": (3.3895313892515355e38, 2.0**-133),
    "float32": (3.4028234663852886e38, 2.0**-149), "float64": (1.7976931348623157e308, 5e-324),
}


# FIRE_EXTREME_EXAMPLES=400 for a deeper search (the default keeps the suite quick).
EXAMPLES = settings(
    max_examples=int(os.environ.get("FIRE_EXTREME_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],  # too_slow: timing
)


def _dtype(backend, name):
    """The backend's dtype called ``name``, or None where it has none (NumPy and array-api-strict: bfloat16)."""
    if backend.name == "torch":
        import torch

        return getattr(torch, name)
    return getattr(backend.xp, name, None)


def _weight(backend, name, unit: np.ndarray, magnitude: float):
    """``unit * magnitude`` rounded to the dtype on the backend, and the values it computes with, in float64.

    XLA on a CPU flushes subnormal numbers to zero (the FTZ and DAZ modes), so for JAX a value
    below the compute dtype's smallest normal number is zero.
    """
    xp = backend.xp
    largest = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38}.get(name)
    scale = min(magnitude, largest) if largest else magnitude
    x = xp.astype(backend.asarray(unit * scale), _dtype(backend, name))
    wide = xp.float64 if name == "float64" else xp.float32  # both hold every value of x exactly
    w = np.asarray(backend.to_numpy(xp.astype(x, wide)), dtype=np.float64)
    if backend.name == "jax":
        w = np.where(np.abs(w) < np.finfo(np.float64 if name == "float64" else np.float32).smallest_normal, 0.0, w)
    return x, w


def _unit(seed: int, shape) -> np.ndarray:
    """A well-conditioned matrix (condition number 4) per trailing pair of axes, largest entry 1."""
    rng = np.random.default_rng(seed)
    mats = [matrix_with_condition(rng, shape[-2], shape[-1], 4.0) for _ in range(math.prod(shape[:-2]))]
    w = np.stack(mats).reshape(shape)
    return w / np.abs(w).max()


def _assume_well_conditioned(w: np.ndarray) -> None:
    """Discard inputs that rounding (to a few subnormal bits) left nearly singular: their polar factor is
    not unique (the SVD completes it arbitrarily) and float32 and float64 may land apart."""
    mats = w.reshape(-1, *w.shape[-2:])
    assume(all(np.any(m) and np.linalg.cond(m) < 50 for m in mats))


def _projection(w: np.ndarray, steps: int, method: str) -> np.ndarray:
    """The oracle: each float64 matrix over its largest entry, projected by the reference (or the SVD)."""
    out = np.zeros_like(w)
    for idx in np.ndindex(*w.shape[:-2]):
        a = np.abs(w[idx]).max()
        if a == 0:
            continue
        unit = w[idx] / a
        if method == "fire":
            out[idx] = reference_newton_schulz(unit, steps)
        elif method == "svd":
            out[idx] = polar_svd(unit)
        else:  # no second implementation of the schedule exists: its own float64 run at unit size
            out[idx] = fire_core.project(unit, steps, method="fast")
    return out


def _close_in_dtype(got: np.ndarray, want: np.ndarray, name: str, method: str, flushes: bool = False) -> None:
    """``got`` (computed in float32 or float64, rounded to ``name``) against the float64 ``want``.

    ``flushes``: the backend flushes results below the compute dtype's smallest normal number to zero (XLA).
    """
    scale = np.abs(want).max()
    tiny = LIMITS[name][1]  # values near the subnormal range round to its spacing
    if flushes:
        tiny = max(tiny, float(np.finfo(np.float64 if name == "float64" else np.float32).smallest_normal))
    if name == "float64":
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * scale + tiny)
        return
    # float32 math, then rounding to the dtype: one unit in its last place, plus float32's error.
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 0.0}[name]
    np.testing.assert_allclose(got, want, rtol=eps, atol=F32_ATOL[method] * scale + tiny)


# --- the projection -----------------------------------------------------------------------------


@EXAMPLES
@given(
    name=st.sampled_from(sorted(RANGES)),
    where=st.floats(0, 1),
    method=st.sampled_from(["fire", "fast", "svd"]),
    steps=st.sampled_from([0, 1, 5, 8]),
    shape=st.sampled_from([(5, 3), (3, 5), (2, 6, 6), (12, 3)]),  # (12, 3): the Gram-side iteration
    seed=st.integers(0, 2**16),
)
def test_projection_at_any_magnitude_is_the_projection_at_unit_size(backend, name, where, method, steps, shape, seed):
    assume(_dtype(backend, name) is not None)
    lo, hi = RANGES[name]
    x, w = _weight(backend, name, _unit(seed, shape), 10 ** (lo + where * (hi - lo)))
    _assume_well_conditioned(w)
    got = fire_core.project(x, steps, method=method)
    assert got.dtype == x.dtype
    got = backend.to_numpy(backend.xp.astype(got, backend.xp.float64 if name == "float64" else backend.xp.float32))
    assert np.all(np.isfinite(got))
    want = _projection(w, steps, method)
    for idx in np.ndindex(*shape[:-2]):
        assert np.any(got[idx] != 0) == np.any(w[idx] != 0)  # zero only from a zero matrix
    _close_in_dtype(got, want, name, method, flushes=backend.name == "jax")


@pytest.mark.parametrize(
    ("name", "magnitude"),
    [("float32", 1e18), ("float32", 1e30), ("bfloat16", 1e19), ("float64", 1e160), ("float64", 1e300),
     ("float32", 1e-25), ("float32", 1e-42), ("float64", 1e-200), ("float64", 1e-315), ("float16", 6e4),
     ("float16", 1e-6)],
)
@pytest.mark.parametrize("method", ["fire", "fast", "svd"])
def test_the_issues_magnitudes_are_projected_not_zeroed(backend, name, magnitude, method):
    """The issue's cases (1e18 float32, 1e160 float64, 1e19 bfloat16 came back as zeros; 1e-25 wrong under svd)."""
    if _dtype(backend, name) is None:
        pytest.skip(f"{backend.name} has no {name}")
    x, w = _weight(backend, name, _unit(7, (64, 48)), magnitude)
    got = fire_core.project(x, 5, method=method)
    got = backend.to_numpy(backend.xp.astype(got, backend.xp.float64 if name == "float64" else backend.xp.float32))
    _close_in_dtype(got, _projection(w, 5, method), name, method, flushes=backend.name == "jax")


def test_projection_of_extreme_values_traces_under_jax_jit(x64):
    jnp = x64.numpy
    w = _unit(3, (2, 36, 12)).astype(np.float32) * np.float32(1e30)  # 36 x 12: the Gram side too
    for method in ("fire", "fast", "svd"):
        jitted = x64.jit(lambda a: fire_core.project(a, 5, method=method))(jnp.asarray(w))
        np.testing.assert_allclose(np.asarray(jitted), _projection(w.astype(np.float64), 5, method), atol=F32_ATOL[method])


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_projection_of_extreme_values_compiles_under_torch_compile():
    torch = pytest.importorskip("torch")
    w = _unit(4, (2, 20, 12)) * 1e-300
    compiled = torch.compile(lambda a: fire_core.project(a, 5, method="fast"), backend="aot_eager", fullgraph=True)
    np.testing.assert_allclose(compiled(torch.asarray(w)).numpy(), _projection(w, 5, "fast"), rtol=0, atol=1e-12)


# --- reinit_many: new weights and report numbers at any magnitude, or an error before any write --------


def _factor(scale, shape_taps, d_out, d_in):
    if scale == "fire":
        return math.sqrt(d_out / d_in) / shape_taps
    if scale == "variance":
        return math.sqrt(d_out / d_in) / math.sqrt(shape_taps)
    return 1.0 if scale is None else scale


def _decimal_dfi(unit_mat: np.ndarray, q2: Decimal) -> Decimal:
    """``||q2 G0 - I||_F^2`` with ``G0`` the small-side Gram of ``unit_mat / ||unit_mat||_F``, in decimal."""
    g = unit_mat.T @ unit_mat if unit_mat.shape[0] >= unit_mat.shape[1] else unit_mat @ unit_mat.T
    g = g / np.trace(g)
    n = g.shape[0]
    return sum((q2 * Decimal(g[i, j].item()) - (1 if i == j else 0)) ** 2 for i in range(n) for j in range(n))


def _expected(w: np.ndarray, layout: str, steps: int, method: str, scale):
    """New weight (float64, may hold inf) and report numbers (decimal) of FIRE on ``w``, from unit-size matrices."""
    mats = fire_core.to_matrices(w, layout)
    lay = fire_core.layout.parse_layout(layout, w.shape)
    ref = math.sqrt(lay.d_out / lay.d_in) / lay.taps
    proj = _projection(mats, steps, method)
    amax = np.abs(mats).max(axis=(-2, -1))
    nu = np.array([np.linalg.norm(m / a) if a > 0 else 0.0 for m, a in zip(mats, amax)])
    new = np.empty_like(mats)
    factors = []
    for k in range(lay.stack):
        taps = slice(k * lay.taps, (k + 1) * lay.taps)
        if scale == "norm":  # ||W_l|| / ||P_l||, applied as amax * (ratio p) so that no product overflows
            top = amax[taps].max()
            norm_hat = np.sqrt(np.sum((amax[taps] / top * nu[taps]) ** 2)) if top > 0 else 0.0
            pn = np.linalg.norm(proj[taps])
            ratio = norm_hat / pn if pn > 0 else 0.0
            with np.errstate(over="ignore"):
                new[taps] = top * (ratio * proj[taps])
            factors.append(Decimal(top.item()) * Decimal(ratio.item()))
        else:
            f = _factor(scale, lay.taps, lay.d_out, lay.d_in)
            new[taps] = f * proj[taps]
            factors.append(Decimal(f))
    before = sum(
        _decimal_dfi(m / a, (Decimal(a.item()) * Decimal(v.item()) / Decimal(ref)) ** 2) if a > 0 else Decimal(min(m.shape))
        for m, a, v in zip(mats, amax, nu)
    )
    after = sum(Decimal(float(fire_core.dfi(p)) if np.any(p) else min(p.shape)) for p in proj)
    return fire_core.from_matrices(new, layout, w.shape), before, after, factors


def _decimal_sfe(a: np.ndarray, b: np.ndarray) -> tuple[Decimal, Decimal]:
    """``||a - b||_F^2`` and ``(||a|| + ||b||)^2`` in decimal, summed over the largest entry."""
    s = max(np.abs(a).max(), np.abs(b).max())
    if s == 0:
        return Decimal(0), Decimal(0)
    d = np.sum((a / s - b / s) ** 2)
    total = (np.linalg.norm(a / s) + np.linalg.norm(b / s)) ** 2
    return Decimal(s.item()) ** 2 * Decimal(d.item()), Decimal(s.item()) ** 2 * Decimal(total.item())


def _unrepresentable(new: np.ndarray, w: np.ndarray, layout: str, name: str) -> tuple[bool, bool]:
    """Whether some entry of ``new`` overflows the dtype, and whether a nonzero matrix of ``w`` becomes zero."""
    largest, smallest = LIMITS[name]
    new_mats, old_mats = fire_core.to_matrices(new, layout), fire_core.to_matrices(w, layout)
    zero = any(np.abs(n).max() <= smallest / 2 and np.any(o) for n, o in zip(new_mats, old_mats))
    return bool(np.abs(new).max() > largest), zero


def _near_a_limit(new, w, name, sfe, before, scale, method, steps, layout) -> bool:
    """Within rounding of a limit, or the documented refusal: ``scale="norm"`` on a layer whose norm over the
    projection's least norm does not fit the compute dtype."""
    largest, smallest = LIMITS[name]
    top = np.abs(new).max()
    if 0.999 * largest <= top <= 1.001 * largest or max(sfe, before) > FLOAT64_MAX / 10**3:
        return True
    peaks = [np.abs(n).max() for n, o in zip(fire_core.to_matrices(new, layout), fire_core.to_matrices(w, layout)) if np.any(o)]
    if peaks and smallest / 4 <= min(peaks) <= smallest:
        return True
    if isinstance(scale, float) and scale > LIMITS["float64" if name == "float64" else "float32"][0]:
        return True  # a number beyond the compute dtype itself
    if scale == "norm":
        from fire_core.polar import entry_bounds

        work_max = LIMITS["float64" if name == "float64" else "float32"][0]
        _, floor = entry_bounds(method, steps)
        mats = fire_core.to_matrices(w, layout)
        a = np.abs(mats).max()
        return bool(a * np.linalg.norm(mats / a) / floor > work_max / 1.01)
    return False


def _unit_weight(seed: int, layout: str, shape) -> np.ndarray:
    """A weight of ``shape`` whose matrices in ``layout`` are well conditioned, largest entry 1."""
    lay = fire_core.layout.parse_layout(layout, shape)
    return fire_core.from_matrices(_unit(seed, lay.matrix_shape), layout, shape)


@EXAMPLES
@given(
    name=st.sampled_from(sorted(RANGES)),
    where=st.floats(0, 1),
    method=st.sampled_from(["fire", "fast", "svd"]),
    steps=st.sampled_from([0, 1, 5]),
    rule=st.sampled_from(["fire", "variance", "norm", None, "number"]),
    number=st.floats(0, 1),  # a numeric scale anywhere in the dtype's range and a decade past either end
    layout=st.sampled_from([("oi", (5, 3)), ("oihw", (3, 4, 2, 1)), ("Loi", (2, 4, 4))]),
    seed=st.integers(0, 2**16),
)
def test_reinit_writes_the_scaled_projection_and_reports_it_or_raises_before_writing(
    backend, name, where, method, steps, rule, number, layout, seed
):
    assume(_dtype(backend, name) is not None)
    layout, shape = layout
    lo, hi = RANGES[name]
    x, w = _weight(backend, name, _unit_weight(seed, layout, shape), 10 ** (lo + where * (hi - lo)))
    _assume_well_conditioned(fire_core.to_matrices(w, layout))
    scale = 10 ** min(lo - 1 + number * (hi - lo + 2), 308.25) if rule == "number" else rule
    new, before, after, factors = _expected(w, layout, steps, method, scale)
    overflow, zero = _unrepresentable(new, w, layout, name)
    sfe, _ = _decimal_sfe(new, w)
    huge = max(sfe, before) > FLOAT64_MAX
    out = {}
    try:
        rep = reinit_many([("layer", x, layout)], steps=steps, method=method, scale=scale, write=out.__setitem__)
    except ValueError as err:
        assert out == {}  # nothing was written
        near = _near_a_limit(new, w, name, sfe, before, scale, method, steps, layout)
        assert overflow or zero or huge or near, f"refused a representable result: {err}"
        assert "layer" in str(err)
        event("refused: " + ("overflow" if overflow else "zero" if zero else "report" if huge else "near a limit"))
        return
    event("written")
    assert not (overflow or zero or huge), "an unrepresentable result was written"
    got = backend.to_numpy(backend.xp.astype(out["layer"], backend.xp.float64 if name == "float64" else backend.xp.float32))
    _close_in_dtype(got, new, name, method, flushes=backend.name == "jax")
    row = rep["layer"]
    assert all(math.isfinite(row[k]) for k in ("sfe", "dfi_before", "dfi_after", "scale"))
    eps = Decimal(1e-10 if name == "float64" else 1e-4)
    got_sfe, terms = _decimal_sfe(got, w)
    # SFE of the weight as written: each difference rounds relative to its terms, not to itself.
    assert abs(Decimal(row["sfe"]) - got_sfe) <= eps * (got_sfe + terms) + Decimal(5e-324)  # float64 holds no less
    assert abs(Decimal(row["dfi_before"]) - before) <= eps * (before + 1)
    rtol = Decimal(1e-9 if name == "float64" else F32_DFI_RTOL[method])
    slack = Decimal(0)
    if name in ("float16", "bfloat16"):  # DfI after of the projection as written: the stored matrices over the factor
        mats = fire_core.to_matrices(got.astype(np.float64), layout)
        taps = mats.shape[0] // len(factors)
        after = sum(Decimal(float(fire_core.dfi(m / (float(factors[t // taps]) or 1.0)))) for t, m in enumerate(mats))
        # the core divides by its float32 factor: a tiny one is a float32 subnormal, good to a relative delta of
        # spacing / factor (1.4e-5 at 1e-40), and DfI = ||G - I||^2 moves by at most 4 delta ||G - I|| ||G||
        delta = max((float(2 * np.spacing(np.float32(abs(float(f))))) / abs(float(f)) for f in factors if f), default=0.0)
        n = Decimal(sum(min(m.shape) for m in mats))
        slack = Decimal(4 * delta) * (after + (after * n).sqrt())
    assert abs(Decimal(row["dfi_after"]) - after) <= rtol * after + slack + Decimal(1e-12 if name == "float64" else 1e-6)
    rtol = Decimal(1e-9 if name == "float64" else (1e-3 if method == "fast" else 1e-5))
    spacing = Decimal(LIMITS["float64" if name == "float64" else "float32"][1])  # a "norm" factor may be subnormal
    assert abs(Decimal(row["scale"]) - factors[0]) <= rtol * abs(factors[0]) + spacing


def test_a_risky_weight_is_checked_before_any_other_weight_is_written():
    """torch: an ordinary layer and a float16 layer whose scale overflows it; the model is left bit for bit."""
    torch = pytest.importorskip("torch")
    import fire_core.torch as ft

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).half()
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(8))  # its projection is the identity: entries of 1, times the scale
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"1\.weight: the new weight is not representable in float16.*Nothing was written"):
        ft.apply(model, steps=5, scale=7e4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_scale_that_must_overflow_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"fc: scale=1000000\.0 multiplies the projection by 1e\+06.*float16"):
        reinit_many([("fc", np.eye(4, dtype=np.float16), "oi")], scale=1e6, write=lambda n, a: pytest.fail("written"))


def test_a_scale_of_zero_is_refused():
    with pytest.raises(ValueError, match="weight: scale=0 writes a zero weight"):
        fire_core.reinit(np.eye(3), "oi", scale=0)


def test_a_report_beyond_float64_is_refused_before_writing_and_report_false_projects(backend):
    w = _unit(5, (6, 4)) * 1e160
    writes = []
    with pytest.raises(ValueError, match=r"w: the report's SFE is about 1e32\d and DfI before is about 1e64\d for this weight.*report=False projects it"):
        reinit_many([("w", backend.asarray(w), "oi")], write=lambda n, a: writes.append(n))
    assert writes == []
    out = {}
    reinit_many([("w", backend.asarray(w), "oi")], write=out.__setitem__, report=False)
    np.testing.assert_allclose(backend.to_numpy(out["w"]), np.sqrt(6 / 4) * _projection(w, 5, "fire"), atol=1e-12)


def test_torch_apply_on_a_float64_weight_near_1e160_raises_naming_report_false_and_changes_nothing():
    torch = pytest.importorskip("torch")
    import fire_core.torch as ft

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)).double()
    with torch.no_grad():
        model[0].weight.mul_(1e160)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"0\.weight: the report's SFE is about 1e3\d\d and DfI before is about 1e6\d\d.*report=False"):
        ft.apply(model, steps=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ft.apply(model, steps=5, report=False)
    w = before["0.weight"].numpy()
    np.testing.assert_allclose(model[0].weight.detach().numpy(), np.sqrt(8 / 6) * _projection(w, 5, "fire"), atol=1e-12)


def test_reinit_without_a_report_traces_under_jax_jit_at_extreme_values(x64):
    jnp = x64.numpy
    w = {"a": jnp.asarray(_unit(1, (8, 6)) * 1e30, dtype=jnp.float32), "b": jnp.asarray(_unit(2, (3, 3, 2, 4)) * 1e-30)}
    layouts = {"a": "oi", "b": "hwio"}

    def run(ws):
        out = {}
        reinit_many([(k, ws[k], layouts[k]) for k in ws], write=out.__setitem__, report=False, scale="norm")
        return out

    jitted, eager = x64.jit(run)(w), run(w)
    for k in w:
        np.testing.assert_allclose(np.asarray(jitted[k]), np.asarray(eager[k]), rtol=1e-5)
        assert float(jnp.max(jnp.abs(jitted[k]))) > 0


@pytest.mark.parametrize("magnitude", [1e18, 1e-25])
def test_measure_of_extreme_float32_weights_matches_the_rows_of_reinit(magnitude):
    """plan.measure (the Flax report) on a before/after pair gives reinit_many's rows (svd: the norm rule agrees)."""
    w = (_unit(9, (3, 16, 8)) * magnitude).astype(np.float32)
    for scale in ("fire", "norm"):
        out = {}
        rep = reinit_many([("w", w, "Loi")], method="svd", scale=scale, write=out.__setitem__)
        got = measure([("w", w, out["w"], "Loi")], scale=scale)
        for key in ("sfe", "dfi_before", "scale"):
            np.testing.assert_allclose(got["w"][key], rep["w"][key], rtol=1e-5)
        assert got["w"]["dfi_after"] < 1e-9 and rep["w"]["dfi_after"] < 1e-9
        assert math.isfinite(got["w"]["dfi_before"]) and got["w"]["dfi_before"] > 1e70 * (magnitude > 1)


def test_measure_refuses_a_report_number_beyond_float64():
    w = _unit(9, (6, 4)) * 1e160
    with pytest.raises(ValueError, match=r"w: the report.s SFE is about 1e32\d and DfI before is about 1e64\d.* for this weight.*cannot be measured"):
        measure([("w", w, -w, "oi")])


def test_dfi_in_pieces_equals_the_direct_formula(rng):
    from fire_core.metrics import dfi_split, gram_dfi, unit_scale

    for c in (1e-3, 0.7, 1.0, 3.0, 1e3):
        x = rng.normal(size=(7, 5)) * c
        ref = 0.8
        direct = float(fire_core.dfi(x / ref))
        s = unit_scale(np.abs(x).max().reshape(1, 1), np)
        gram = (x * s).T @ (x * s)
        weight, shift, t, _ = dfi_split(float(s[0, 0]), float(np.sqrt(np.trace(gram))), ref)
        pieces = float(gram_dfi(gram, np, weight=np.asarray(weight), shift=np.asarray(shift)))
        np.testing.assert_allclose(t * t * pieces, direct, rtol=1e-12)


@pytest.mark.parametrize("name", ["float32", "float64"])
def test_unit_scale_is_a_power_of_two_near_the_reciprocal_within_normal_numbers(backend, name):
    from fire_core.metrics import unit_scale

    xp = backend.xp
    info = np.finfo(name)
    amax = np.array([info.max, info.smallest_normal * info.eps, 1.0, 0.75, 3e5, 0.0], dtype=name)
    s = backend.to_numpy(unit_scale(backend.asarray(amax), xp))
    assert np.all(s >= info.smallest_normal) and np.all(1 / s >= info.smallest_normal)
    np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))  # exact powers of two
    ordinary = amax[2:5] * s[2:5]
    assert np.all((ordinary >= 0.5) & (ordinary <= 2))


def test_a_process_that_flushes_subnormals_projects_a_zero_and_a_tiny_matrix_without_a_warning():
    """``torch.set_flush_denormal(True)`` turns on FTZ/DAZ for the whole thread, numpy included (a training
    script may set it; benchmarks/rl.py does). ``unit_scale`` then must not form a subnormal: before, a zero
    matrix took ``log2(0 + smallest subnormal)``, which DAZ makes ``log2(0)`` (a RuntimeWarning, an error here)."""
    import warnings

    torch = pytest.importorskip("torch")
    from fire_core.metrics import unit_scale

    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(fire_core.project(np.zeros((4, 3)), steps=10), np.zeros((4, 3)))
            for name in ("float32", "float64"):
                info = np.finfo(name)
                amax = np.array([0.0, info.smallest_normal, 1.0], dtype=name)
                # the exponent a zero gets is the clip's end: s = 2^(126) (float32), 2^(1022) (float64)
                np.testing.assert_array_equal(unit_scale(amax, np), np.array([1 / info.smallest_normal] * 2 + [1.0], dtype=name))
            tiny = np.array([[3e-30, 0.0], [0.0, 3e-30]])  # a normal-number matrix: its polar factor is I
            np.testing.assert_allclose(fire_core.project(tiny, steps=30, method="fast"), np.eye(2), atol=1e-12)
    finally:
        torch.set_flush_denormal(False)


def test_the_suite_hypothesis_profile_has_no_deadline():
    """tests/conftest.py's profile: no example fails for being slow on a loaded machine (default: 200 ms)."""
    assert settings.default.deadline is None and EXAMPLES.deadline is None
    assert HealthCheck.too_slow in settings.default.suppress_health_check
    assert HealthCheck.too_slow in EXAMPLES.suppress_health_check
