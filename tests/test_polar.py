"""fire_core.project: the three methods, on every backend, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import matrix_with_condition, polar_svd, reference_newton_schulz
from hypothesis import given, settings
from hypothesis import strategies as st

import fire_core
from fire_core.polar import fast_schedule

SHAPES = [(7, 7), (12, 5), (5, 12), (3, 2, 9, 6), (2, 4, 11), (17, 5), (4, 13), (2, 24, 6)]  # the last three are >= 3:1


def _loop(w: np.ndarray, steps: int) -> np.ndarray:
    """Reference iteration applied matrix by matrix over any batch."""
    out = np.empty_like(w)
    for idx in np.ndindex(*w.shape[:-2]):
        out[idx] = reference_newton_schulz(w[idx], steps)
    return out


# --- "fire": the paper's iteration ---------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps", [0, 1, 5, 10, 12])
def test_fire_matches_reference_loop_float64(backend, rng, shape, steps):
    w = rng.normal(size=shape)
    got = backend.to_numpy(fire_core.project(backend.asarray(w), steps))
    np.testing.assert_allclose(got, _loop(w, steps), rtol=0, atol=1e-12)


def test_fire_default_is_five_steps(backend, rng):
    w = rng.normal(size=(10, 6))
    got = backend.to_numpy(fire_core.project(backend.asarray(w)))
    np.testing.assert_allclose(got, reference_newton_schulz(w, 5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(768, 192), (300, 100), (100, 400)])
@pytest.mark.parametrize("steps", [5, 10])
def test_fire_on_tall_matrices_stays_at_float32_precision(rng, shape, steps):
    """3:1 and taller matrices run on the Gram side, which does not correct its own rounding.

    Measured: 1-12x the float32 error of the plain loop, always within 1e-5 of
    the largest entry (the plain loop: within about 1e-6).
    """
    torch = pytest.importorskip("torch")
    w = rng.normal(size=shape)
    exact = reference_newton_schulz(w, steps)
    x = torch.asarray(w, dtype=torch.float32)
    loop = torch.asarray(reference_newton_schulz(w.astype(np.float32), steps))  # the reference's own float32 run
    err_loop = np.abs(loop.double().numpy() - exact).max()
    err = np.abs(fire_core.project(x, steps).double().numpy() - exact).max()
    assert err <= 1e-5 * np.abs(exact).max()
    assert err <= 16 * err_loop


def test_fire_float32_agrees_with_float64_reference(backend, rng):
    w = rng.normal(size=(40, 24))
    got = backend.to_numpy(fire_core.project(backend.asarray(w.astype(np.float32)), 10))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_newton_schulz(w, 10), rtol=0, atol=2e-6)


def test_fire_five_steps_is_far_from_isometry_on_gaussian_768():
    """The measured fact the README quotes: 5 cubic steps leave a Gaussian 768x768 far from isometry."""
    w = np.random.default_rng(0).normal(size=(768, 768))
    s = np.linalg.svd(fire_core.project(w, 5), compute_uv=False)
    assert 0.15 < np.median(s) < 0.3
    assert float(fire_core.dfi(fire_core.project(w, 5))) / 768 > 0.5


# --- "svd" and "fast": the polar factor ------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_method_is_u_vt(backend, rng, shape):
    w = rng.normal(size=shape)
    got = backend.to_numpy(fire_core.project(backend.asarray(w), method="svd"))
    want = np.stack([polar_svd(m) for m in w.reshape(-1, *shape[-2:])]).reshape(shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_converges_to_u_vt_float64(backend, rng, shape):
    w = rng.normal(size=shape)
    got = backend.to_numpy(fire_core.project(backend.asarray(w), 14, method="fast"))
    want = np.stack([polar_svd(m) for m in w.reshape(-1, *shape[-2:])]).reshape(shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("steps", [8, 10])
def test_fast_reaches_float32_floor_for_condition_1e3_within_10_steps(steps):
    """The issue's target: 512x512 float32, cond 1e3: DfI/n < 1e-9 and within 1e-2 of U V^T."""
    w = matrix_with_condition(np.random.default_rng(1), 512, 512, 1e3, np.float32)
    q = fire_core.project(w, steps, method="fast")
    assert q.dtype == np.float32
    assert float(fire_core.dfi(q.astype(np.float64))) / 512 < 1e-9
    want = polar_svd(w.astype(np.float64))
    assert np.linalg.norm(q - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.parametrize(("cond", "steps"), [(1e4, 11), (1e5, 14)])
def test_fast_step_counts_for_harder_conditioning_float64(cond, steps):
    """The documented step counts for condition numbers 1e4 and 1e5 (float64, 256x256)."""
    w = matrix_with_condition(np.random.default_rng(2), 256, 256, cond)
    q = fire_core.project(w, steps, method="fast")
    assert float(fire_core.dfi(q)) / 256 < 1e-9
    np.testing.assert_allclose(q, polar_svd(w), rtol=0, atol=1e-3)


def test_fast_schedule_is_monotone_toward_newton_schulz_quintic():
    sched = fast_schedule(20)
    assert len(sched) == 20
    first, last = sched[0], sched[-1]
    assert first[0] > 7  # a large slope at zero lifts small singular values fast
    np.testing.assert_allclose(last, (15 / 8, -10 / 8, 3 / 8), rtol=1e-6)


def test_fast_schedule_polynomials_map_design_interval_into_positive_band():
    """Each step maps its whole design interval into (0, 1 + err]: no sign flips."""
    lo, hi = 1e-4, 1.0
    for a, b, c in fast_schedule(12):
        x = np.geomspace(lo, hi * 1.01, 2001)
        y = a * x + b * x**3 + c * x**5
        assert np.all(y > 0)
        lo, hi = y.min(), y.max()


# --- cross-backend agreement ------------------------------------------------------------


@pytest.mark.parametrize("method", ["fire", "fast", "svd"])
def test_backends_agree_with_numpy_float64(backend, rng, method):
    w = rng.normal(size=(3, 48, 32))
    want = fire_core.project(w, 10, method=method)
    got = backend.to_numpy(fire_core.project(backend.asarray(w), 10, method=method))
    assert np.max(np.abs(got - want)) <= 1e-13


@pytest.mark.parametrize("method", ["fire", "fast", "svd"])
def test_backends_agree_with_numpy_float32(backend, rng, method):
    w = rng.normal(size=(3, 48, 32)).astype(np.float32)
    want = fire_core.project(w, 10, method=method)
    got = backend.to_numpy(fire_core.project(backend.asarray(w), 10, method=method))
    assert got.dtype == np.float32
    # Measured: every backend's float32 result lies within 1.5e-5 of the float64 one ("fast"'s
    # first step has slope 8.4 at 0 and lifts the rounding of small directions with them),
    # so two of them agree within twice that; "fire" and "svd" agree within 2e-7.
    assert np.max(np.abs(got - want)) <= 3e-5


# --- properties (hypothesis) ------------------------------------------------------------

dims = st.integers(min_value=1, max_value=9)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


@settings(max_examples=40, deadline=None)
@given(m=dims, n=dims, seed=seeds, c=st.floats(min_value=1e-3, max_value=1e3), method=st.sampled_from(["fire", "fast"]))
def test_projection_is_scale_invariant(m, n, seed, c, method):
    w = np.random.default_rng(seed).normal(size=(m, n))
    np.testing.assert_allclose(fire_core.project(c * w, 6, method=method), fire_core.project(w, 6, method=method), atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(m=dims, n=dims, seed=seeds, method=st.sampled_from(["fire", "fast", "svd"]))
def test_projection_commutes_with_transpose(m, n, seed, method):
    w = np.random.default_rng(seed).normal(size=(m, n))
    if method == "svd" and m == n:
        w = w + 0.0  # square: U V^T is unique for full rank, fine
    np.testing.assert_allclose(fire_core.project(w.T, 6, method=method), fire_core.project(w, 6, method=method).T, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(m=dims, n=dims, seed=seeds, method=st.sampled_from(["fire", "fast"]))
def test_projection_is_orthogonally_equivariant(m, n, seed, method):
    r = np.random.default_rng(seed)
    w = r.normal(size=(m, n))
    q, _ = np.linalg.qr(r.normal(size=(m, m)))
    p, _ = np.linalg.qr(r.normal(size=(n, n)))
    np.testing.assert_allclose(fire_core.project(q @ w @ p, 6, method=method), q @ fire_core.project(w, 6, method=method) @ p, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 4), m=dims, n=dims, seed=seeds, method=st.sampled_from(["fire", "fast", "svd"]))
def test_batch_equals_loop_with_per_matrix_norms(b, m, n, seed, method):
    r = np.random.default_rng(seed)
    w = r.normal(size=(b, m, n)) * r.uniform(0.01, 100.0, size=(b, 1, 1))  # very different norms
    batched = fire_core.project(w, 7, method=method)
    for k in range(b):
        np.testing.assert_allclose(batched[k], fire_core.project(w[k], 7, method=method), atol=1e-12)


@pytest.mark.parametrize("shape", [(9, 9), (12, 5), (5, 12), (24, 6)])
@pytest.mark.parametrize("method, steps", [("fire", 5), ("fire", 0), ("fast", 8), ("svd", 1)])
def test_a_batch_of_one_gives_what_the_same_matrix_gives_in_a_larger_batch(backend, rng, shape, method, steps):
    """polar projects a (1, m, n) batch as its matrix (faster under XLA); every field of the result
    must still be the first member's of a batch of two, which takes the batched path."""
    from fire_core.polar import polar

    w = rng.normal(size=(2, *shape))
    one = polar(backend.asarray(w[:1]), steps, method, backend.xp, with_dfi=True)
    two = polar(backend.asarray(w), steps, method, backend.xp, with_dfi=True)
    for field, a, b in zip(one._fields, one, two):
        if b is None:
            assert a is None, field
            continue
        a, b = backend.to_numpy(a), backend.to_numpy(b)
        assert a.shape == (1, *b.shape[1:]), field
        np.testing.assert_allclose(a, b[:1], rtol=1e-12, atol=1e-12, err_msg=field)


# --- dtypes, purity and bad input -------------------------------------------------------


def test_zero_matrix_projects_to_zero_not_nan(backend):
    for method in ("fire", "fast", "svd"):
        got = backend.to_numpy(fire_core.project(backend.xp.zeros((6, 4), dtype=backend.xp.float64), method=method))
        assert np.all(got == 0), method


def test_zero_matrix_in_a_batch_leaves_others_untouched(backend, rng):
    w = rng.normal(size=(3, 5, 4))
    w[1] = 0
    got = backend.to_numpy(fire_core.project(backend.asarray(w), 5))
    assert np.all(got[1] == 0)
    np.testing.assert_allclose(got[0], reference_newton_schulz(w[0], 5), atol=1e-12)


def test_input_is_never_modified(backend, rng):
    w = rng.normal(size=(9, 6))
    x = backend.asarray(w.copy())
    for method in ("fire", "fast", "svd"):
        fire_core.project(x, 3, method=method)
        np.testing.assert_array_equal(backend.to_numpy(x), w)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype(backend, rng, name):
    xp = backend.xp
    if not hasattr(xp, name) and backend.name != "torch":
        pytest.skip(f"{backend.name} has no {name}")
    if backend.name == "torch":
        import torch

        dtype = getattr(torch, name)
    else:
        dtype = getattr(xp, name)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    x = xp.astype(backend.asarray(w), dtype)
    got = fire_core.project(x, 5)
    assert got.dtype == dtype
    exact = fire_core.project(xp.astype(x, xp.float32), 5)  # same rounded input, float32 math
    want = xp.astype(exact, dtype)
    # Two float32 computations on different buffers may round apart in the last float32 bit,
    # which can move a value across a rounding boundary of the narrow dtype: one ulp of it at most.
    eps = float(np.finfo(np.float16).eps) if name == "float16" else 2.0**-7
    np.testing.assert_allclose(
        backend.to_numpy(xp.astype(got, xp.float32)), backend.to_numpy(xp.astype(want, xp.float32)), rtol=eps, atol=0
    )


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_integer_and_bool_input_are_type_errors(backend, dtype):
    xp = backend.xp
    x = xp.zeros((3, 3), dtype=getattr(xp, dtype))
    with pytest.raises(TypeError, match=r"real floating.*\(3, 3\)"):
        fire_core.project(x)


def test_complex_input_is_a_type_error(backend):
    xp = backend.xp
    with pytest.raises(TypeError, match="complex"):
        fire_core.project(xp.zeros((3, 3), dtype=xp.complex128))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_a_value_error(backend, rng, bad):
    w = rng.normal(size=(4, 3))
    w[2, 1] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf.*\(4, 3\)"):
        fire_core.project(backend.asarray(w))


@pytest.mark.parametrize("shape", [(), (5,)])
def test_fewer_than_two_dimensions_is_a_value_error(backend, shape):
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        fire_core.project(backend.xp.ones(shape, dtype=backend.xp.float64))


@pytest.mark.parametrize("steps", [-1, 2.5, "5", True, None])
def test_bad_steps_is_a_value_error(steps):
    with pytest.raises(ValueError, match="steps"):
        fire_core.project(np.ones((3, 3)), steps)


def test_unknown_method_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown method 'newton'"):
        fire_core.project(np.ones((3, 3)), method="newton")


# --- tracing ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 20, 12), (2, 36, 12)])
@pytest.mark.parametrize("method", ["fire", "fast", "svd"])
def test_jax_jit_equals_eager(rng, method, shape):
    jax = pytest.importorskip("jax")
    get_jax = __import__("conftest").get_backend("jax")
    jnp = get_jax.xp
    w = jnp.asarray(rng.normal(size=shape))
    jitted = jax.jit(lambda x: fire_core.project(x, 6, method=method))
    np.testing.assert_allclose(np.asarray(jitted(w)), np.asarray(fire_core.project(w, 6, method=method)), atol=1e-12)


def test_jax_jit_skips_the_value_check_under_tracing():
    jax = pytest.importorskip("jax")
    jnp = __import__("conftest").get_backend("jax").xp
    w = jnp.full((4, 3), jnp.nan)
    out = jax.jit(fire_core.project)(w)  # no concrete values under jit: no ValueError
    assert np.all(np.isnan(np.asarray(out)))
    with pytest.raises(ValueError, match="NaN"):
        fire_core.project(w)


# Dynamo warns that it traces through lru_cache wrappers (array-api-compat's namespace
# lookup and the fast schedule); both are pure functions of their arguments.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("shape", [(2, 20, 12), (2, 36, 12)])
@pytest.mark.parametrize("method", ["fire", "fast"])
def test_torch_compile_equals_eager(rng, method, shape):
    torch = pytest.importorskip("torch")
    w = torch.asarray(rng.normal(size=shape))
    compiled = torch.compile(lambda x: fire_core.project(x, 6, method=method), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(w), fire_core.project(w, 6, method=method), rtol=0, atol=1e-12)


# --- PyTorch CPU Gram matrices from column halves -------------------------------------


@pytest.mark.parametrize("shape", [(9, 9), (3, 20, 17), (2, 40, 16)])
def test_gram_from_halves_equals_the_plain_product(rng, monkeypatch, shape):
    """Thresholds lowered so small matrices take the halves path; odd widths split unevenly.

    The halves path is proved taken (three ``out=`` products), and its result
    is compared to the plain product to a tolerance: no BLAS promises that
    ``x^T x`` (or a diagonal block ``x1^T x1``) is bitwise symmetric, or
    that a block product rounds like the whole one. What is ours to promise
    exactly is the copy: the lower off-diagonal block is the upper one transposed.
    """
    torch = pytest.importorskip("torch")
    import fire_core.polar as polar_mod
    from fire_core._array import array_namespace

    monkeypatch.setattr(polar_mod, "GRAM_HALVES_MIN", 2)
    calls = []
    matmul = torch.matmul

    def counting(*args, **kwargs):
        calls.append("out" in kwargs)
        return matmul(*args, **kwargs)

    monkeypatch.setattr(torch, "matmul", counting)
    x = torch.asarray(rng.normal(size=shape))
    g = polar_mod._gram(x, array_namespace(x))
    assert calls == [True, True, True]
    want = np.swapaxes(x.numpy(), -1, -2) @ x.numpy()
    # float64 products of n = shape[-2] terms: within n eps of the sum of absolute products.
    bound = shape[-2] * np.finfo(np.float64).eps * (np.swapaxes(np.abs(x.numpy()), -1, -2) @ np.abs(x.numpy()))
    assert np.all(np.abs(g.numpy() - want) <= 2 * bound)
    h = shape[-1] // 2
    assert torch.equal(g[..., h:, :h], g[..., :h, h:].mT)


@pytest.mark.parametrize("shape", [(9, 9), (3, 20, 17), (2, 40, 16), (2, 600, 513)])
def test_dfi_from_unassembled_halves_equals_the_gram_formula(rng, monkeypatch, shape):
    torch = pytest.importorskip("torch")
    import fire_core.polar as polar_mod
    from fire_core._array import array_namespace

    if shape[-1] < 512:
        monkeypatch.setattr(polar_mod, "DFI_HALVES_MIN", 2)
    p = rng.normal(size=shape)
    p /= np.linalg.norm(p, axis=(-2, -1), keepdims=True) / np.sqrt(shape[-1])  # near DfI's natural scale
    x = torch.asarray(p)
    got = polar_mod._dfi(x, array_namespace(x)).numpy()
    gram = np.swapaxes(p, -1, -2) @ p
    want = np.sum((gram - np.eye(shape[-1])) ** 2, axis=(-2, -1))
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("method", ["fire", "fast"])
def test_large_torch_cpu_projection_through_halves_matches_numpy(rng, method):
    """768 wide: every Gram matrix (and fast's A^2, and the report's DfI) goes through the halves."""
    torch = pytest.importorskip("torch")
    from fire_core.polar import GRAM_HALVES_MIN, polar
    from fire_core._array import array_namespace

    w = rng.normal(size=(GRAM_HALVES_MIN + 1, GRAM_HALVES_MIN))
    x = torch.asarray(w)
    got = polar(x, 5, method, array_namespace(x), with_dfi=True)
    want = polar(w, 5, method, array_namespace(w), with_dfi=True)
    np.testing.assert_allclose(got.p.numpy(), want.p, rtol=0, atol=1e-13)
    np.testing.assert_allclose(float(got.dfi), float(want.dfi), rtol=1e-12)


def test_projection_through_the_halves_is_differentiable(rng):
    """The halves write into one output tensor (out=), which autograd refuses: tensors that need grad go the plain way."""
    torch = pytest.importorskip("torch")
    from fire_core.polar import GRAM_HALVES_MIN

    w = torch.asarray(rng.normal(size=(GRAM_HALVES_MIN, GRAM_HALVES_MIN)), requires_grad=True)
    q = fire_core.project(w, 2)
    q.sum().backward()
    assert torch.isfinite(w.grad).all()
    np.testing.assert_allclose(q.detach().numpy(), reference_newton_schulz(w.detach().numpy(), 2), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_of_a_wide_matrix_takes_the_plain_gram(rng):
    """out= into views of one tensor breaks a full graph: traced tensors go the plain way."""
    torch = pytest.importorskip("torch")
    from fire_core.polar import GRAM_HALVES_MIN

    w = torch.asarray(rng.normal(size=(GRAM_HALVES_MIN, GRAM_HALVES_MIN)))
    compiled = torch.compile(lambda x: fire_core.project(x, 2), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(w), fire_core.project(w, 2), rtol=0, atol=1e-12)
