"""Polar projection: the nearest (semi-)orthogonal matrix, by Newton–Schulz or by SVD.

For ``W = U S V^T`` the polar factor ``U V^T`` is the solution of FIRE's problem
``min ||W - Q||_F  s.t.  Q^T Q = I``. Every method here works on the tall side
of each matrix (``m >= n``, transposing wide ones and back), so the Gram
matrix ``A = X^T X`` is the small ``n x n`` one, and normalizes each matrix of
a batch by its own Frobenius norm.

Methods
-------
``"fire"``
    The paper's cubic Newton–Schulz step ``X <- 1.5 X - 0.5 X (X^T X)`` from
    ``X0 = W / ||W||_F``, exactly as the public reference code runs it
    (Han et al., ICLR 2026, github.com/isaac7778/FIRE). Two matmuls a step.
    It converges slowly: Frobenius normalization puts the singular values
    near ``1/sqrt(n)`` and the cubic lifts small ones by only 1.5x a step, so
    5 steps leave a Gaussian 768x768 matrix far from isometry (median
    singular value about 0.22). That is the reference behaviour, kept as the
    default so results match the paper.
``"fast"``
    A schedule that really reaches ``U V^T``: step ``t`` applies the odd
    quintic ``p_t(x) = a x + b x^3 + c x^5`` that is minimax-optimal for
    mapping ``[l_t, u_t]`` onto 1 (Chebyshev alternation, found by a Remez
    exchange; see Grishina, Smirnov, Rakhuba, "CANS", arXiv:2506.10935), and
    the next interval is the image of the last, which makes the composition
    optimal too (Amsel, Persson, Musco, Gower, "Polar Express",
    arXiv:2505.16932, whose 1% safety factor against round-off we also use).
    The schedule is designed for ``l_0 = 3e-4``: it reaches the float32 floor
    in 8 steps up to condition number 1e3, and needs 11 for 1e4, 14 for 1e5
    and 18 for 1e6 (float64, DfI/n < 1e-9). The first Gram matrix gives
    a tighter free bound on the top singular value, ``||X^T X||_F^(1/2)``,
    which the first step uses. Three matmuls a step (``X^T X``, ``A A``,
    ``X B``). A quintic rather than an optimal cubic: the cubic can at most
    triple-and-a-bit the ratio of smallest to largest singular value per
    step (slope ``3 sqrt(3)/2``), the quintic about quadruples it for 1.5x the
    matmuls; on square matrices the two cost the same to converge, on tall
    ones the quintic is cheaper, and it needs fewer steps (8 instead of 12
    for condition number 1e3), see ``benchmarks/``.
``"svd"``
    The exact ``U V^T`` from ``linalg.svd``; ``steps`` is ignored. Ground
    truth, and the right call for small or very ill-conditioned matrices.

A zero matrix projects to zero under every method (the reference divides by
a zero norm and returns NaN). Directions of a rank-deficient matrix with a
zero singular value stay zero under the iterations; the SVD fills them with
an arbitrary orthonormal completion.

Every finite input gets its projection, whatever its magnitude: each matrix
is first multiplied by a power of two near ``1 / amax``, ``amax = max
|x_ij|`` (exact, see :func:`fire_core.metrics.unit_scale`), so that its
largest entry is near 1 and its Frobenius norm within ``[1/2, 2 sqrt(mn)]``;
the reference's ``x / ||x||_F`` then overflows or underflows nowhere
(``sqrt(sum x^2)`` does, from about 1e19 or below 1e-19 in float32 and
bfloat16, 1e154 in float64). The norm of the rescaled matrix is read off
the first Gram matrix (its trace) and folded into the first step, so the
extra work is finding ``amax`` (a max and a min reduction, see
:func:`polar`). Subnormal
inputs are projected where the backend computes with subnormals (NumPy,
PyTorch); XLA on a CPU treats them as zero.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from ._array import array_namespace, check_finite, device_of, is_plain_tensor, is_torch_namespace, work_dtype
from .metrics import gram_dfi, largest_magnitude, unit_scale

__all__ = ["project", "METHODS", "fast_schedule"]

METHODS = ("fire", "fast", "svd")

# The reference's cubic step X <- a X + b X (X^T X).
FIRE_STEP = (1.5, -0.5)

# Design parameters of the "fast" schedule (see the module docstring).
FAST_LOWER = 3e-4  # smallest singular value (relative to the largest) the schedule is built for
FAST_SAFETY = 1.01  # Polar Express's margin: design on [l, 1.01 u] while l is small

# The cubic runs on the small Gram side for matrices at least this many times
# taller than wide (break-even is about 1.9), restarting every block of steps.
GRAM_SIDE_RATIO = 3
GRAM_SIDE_BLOCK = 5

# PyTorch on a CPU forms X^T X of matrices at least this wide from column halves (see _gram),
# and measures the DfI of results at least this wide from unassembled halves (see _dfi).
GRAM_HALVES_MIN = 768
DFI_HALVES_MIN = 512


def entry_bounds(method: str, steps: int) -> tuple[float, float]:
    """``(top, floor)`` for a projection by ``method`` in ``steps``: no singular value above ``top``, norm at least ``floor``.

    So every entry is at most ``top``, and a nonzero ``m x n`` matrix's
    projection has Frobenius norm at least ``floor`` and so an entry of at
    least ``floor / sqrt(mn)``. ``"fire"``: 1 and 1, since the cubic maps
    ``[0, 1]`` into itself and lifts every singular value, from
    ``||X0||_F = 1``. ``"svd"``: every nonzero singular value is 1. ``"fast"``:
    the largest singular value of the rebounded start lies in the first design
    interval ``[FAST_LOWER, 1]`` (for fewer than 1e14 singular values), and
    each step maps its interval into the next, ``[l_t, u_t]``: from ``[0.0025,
    1.997]`` after one step to ``[0.99969, 1.0003]`` after seven. The checks
    before writing (:mod:`fire_core.plan`) turn a layer's scale into bounds on
    its new entries with these; ``floor`` has a 1% margin for rounding (the
    checks give ``top`` theirs).
    """
    if method != "fast" or steps == 0:
        return 1.0, 0.99
    lo, hi = _FAST_INTERVALS[min(steps, len(_FAST_INTERVALS)) - 1]
    return max(hi, 1.0), 0.99 * min(lo, 1.0)


def check_method(method, steps) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")


def check_matrix(x, what: str = "input") -> None:
    if x.ndim < 2:
        raise ValueError(f"{what}: expected an array of matrices (..., m, n), got shape {tuple(x.shape)}")


def project(x, /, steps: int = 5, *, method: str = "fire"):
    """Project every matrix of ``x`` (shape ``(..., m, n)``) onto its polar factor.

    Returns an array of the same namespace, device, shape and dtype.
    float16/bfloat16 are computed in float32 and cast back; the input is never
    modified. ``method`` is ``"fire"`` (the paper's cubic iteration, default),
    ``"fast"`` (an optimized quintic schedule that converges) or ``"svd"``
    (exact); see the module docstring for what each reaches in ``steps``.

    >>> import numpy as np, fire_core
    >>> q = fire_core.project(np.random.default_rng(0).normal(size=(64, 32)), 20)
    >>> bool(np.allclose(q.T @ q, np.eye(32), atol=1e-6))
    True
    """
    xp = array_namespace(x)
    check_method(method, steps)
    check_matrix(x)
    dtype = work_dtype(x, xp)
    check_finite(x, xp)
    p = polar(xp.astype(x, dtype, copy=False), steps, method, xp).p
    return xp.astype(p, x.dtype, copy=False)


class Polar(NamedTuple):
    p: object  # the projection, same orientation as the input
    amax: object  # (..., 1, 1) largest magnitude of each input matrix (0 for a zero matrix)
    scale: object  # (..., 1, 1) a power of two near 1 / amax (metrics.unit_scale)
    nu: object  # (..., 1, 1) Frobenius norm of input * scale (0 for a zero matrix)
    gram0: object  # (..., k, k) Gram of the small side of input * scale, or None if not formed
    dfi: object  # (...) DfI of each matrix of p, or None unless asked for


def polar(x, steps: int, method: str, xp, *, with_dfi: bool = False) -> Polar:
    """The projection of a float32/float64 batch, with the first Gram matrix it formed.

    No checks, no Python branch on array values: it traces under ``jax.jit``
    and ``torch.compile``. With ``with_dfi`` the DfI of each result matrix
    is measured too, from the Gram matrix the Gram-side iteration ends with
    or else from one more (about 3/4 of a) matmul, see :func:`_dfi`.

    The reference's ``X0 = x / ||x||_F`` is formed as ``y / nu`` with
    ``y = x s``, ``s`` a power of two near ``1 / amax`` (exact, see
    :func:`metrics.unit_scale`) and ``nu = ||y||_F``: the same matrix, but
    no square of an unscaled entry is ever taken, so none overflows or
    underflows (see the module docstring). ``||x||_F = nu / s`` itself may
    not be representable; the factors are returned instead.
    """
    if x.ndim == 3 and x.shape[0] == 1:
        # A batch of one is projected as the matrix it holds, then given its batch axis back: the
        # same products, but XLA on a CPU compiles a (1, n, n) iteration with transposed copies
        # between them, 1.3-1.4x slower than the 2-D program at 1024-2048 wide (docs/flax.md, Speed).
        one = polar(x[0, ...], steps, method, xp, with_dfi=with_dfi)
        return Polar(*(None if v is None else xp.expand_dims(v, axis=0) for v in one))
    m, n = x.shape[-2], x.shape[-1]
    wide = n > m
    if wide:
        x = xp.matrix_transpose(x)
    amax = largest_magnitude(x, xp)
    scale = unit_scale(amax, xp)
    y = x * scale  # a zero matrix stays zero: nothing else is guarded
    gram0 = gram = dfi = None
    if method == "svd":
        nu = xp.linalg.vector_norm(y, axis=(-2, -1), keepdims=True)
        u, _, vh = xp.linalg.svd(y, full_matrices=False)
        p = xp.where(amax > 0, u @ vh, xp.zeros_like(y))
    elif steps == 0:
        nu = xp.linalg.vector_norm(y, axis=(-2, -1), keepdims=True)
        p = y / _unless_zero(nu, xp)
    elif method == "fire" and max(m, n) >= GRAM_SIDE_RATIO * min(m, n):
        p, gram0, gram, nu = _newton_schulz_gram_side(y, _schedule(method, steps), xp)
    else:
        p, gram0, nu = _newton_schulz(y, _schedule(method, steps), xp, rebound=method == "fast")
    if with_dfi:
        dfi = _dfi(p, xp) if gram is None else gram_dfi(gram, xp, overwrite=True)
    if wide:
        p = xp.matrix_transpose(p)
    return Polar(p, amax, scale, nu, gram0, dfi)


def _unless_zero(v, xp):
    """``v`` with zeros replaced by 1 (the exact guard of a zero matrix)."""
    return xp.where(v > 0, v, xp.ones_like(v))


def _first_gram(y, xp):
    """``A = y^T y`` and ``nu = ||y||_F = sqrt(trace A)``: the norm from the Gram matrix, no extra pass."""
    a = _gram(y, xp)
    nu = xp.sqrt(xp.sum(xp.linalg.diagonal(a), axis=-1))[..., None, None]
    return a, nu


def _newton_schulz(y, schedule, xp, rebound: bool):
    """Iterate ``X <- X q(X^T X)`` with ``q(A) = a I + b A (+ c A^2)`` from the schedule.

    ``y`` is tall with its largest entry near 1; the iteration starts from
    ``X0 = y / ||y||_F``, whose scale is folded into the first step: with
    ``A = y^T y`` and ``k = 1 / ||y||_F``, ``X0 q(X0^T X0) = y (k q(k^2 A))``,
    an ``n x n`` factor, so ``X0`` is never formed. With ``rebound`` the
    first step starts from ``X0 / ||X0^T X0||_F^(1/2)`` instead, an upper
    bound on the largest singular value that is tighter than the Frobenius
    norm and free once the Gram matrix is formed; that is ``k = ||A||_F^(-1/2)``.
    Returns the result, the first Gram matrix ``y^T y`` and ``||y||_F``
    (``(..., 1, 1)``).
    """
    a, nu = _first_gram(y, xp)
    gram0 = a
    if rebound:
        k = 1 / xp.sqrt(_unless_zero(xp.linalg.matrix_norm(a, ord="fro", keepdims=True), xp))
    else:
        k = 1 / _unless_zero(nu, xp)
    x = y
    for step, coef in enumerate(schedule):
        if step == 0:
            x = y @ _first_step_factor(a, k, coef, xp)
            continue
        a = _gram(x, xp)
        if len(coef) == 2:  # cubic: a X + b X A, with the reference's two matmuls
            x = _scaled_matmul_add(x, x, a, coef[0], coef[1], xp)
        elif _halves(a):  # quintic, A^2 = A^T A (A is symmetric) from halves too
            x = _scaled_matmul_add(x, x, coef[1] * a + coef[2] * _gram(a, xp), coef[0], 1.0, xp)
        else:  # quintic: a X + X (b A + c A^2), three matmuls
            x = _scaled_matmul_add(x, x, _scaled_matmul_add(a, a, a, coef[1], coef[2], xp), coef[0], 1.0, xp)
    return x, gram0, nu


def _first_step_factor(a, k, coef, xp):
    """``k q(k^2 A)`` for ``q(B) = c0 I + c1 B (+ c2 B^2)``: the first step's ``n x n`` factor of ``y``.

    ``k`` is ``(..., 1, 1)``, one per matrix; ``a`` (the first Gram matrix) is not modified.
    """
    if len(coef) == 2:  # (c1 k^3) A + (c0 k) I: one pass over A
        q = a * (coef[1] * (k * k * k))
    else:
        b = a * (k * k)
        if _halves(b):  # B^2 = B^T B (B is symmetric) from halves
            q = (coef[1] * b + coef[2] * _gram(b, xp)) * k
        else:
            q = _scaled_matmul_add(b, b, b, coef[1], coef[2], xp) * k
    return _add_to_diagonal(q, coef[0] * k, xp)


def _add_to_diagonal(q, c, xp):
    """``q + c I`` with ``c`` of shape ``(..., 1, 1)``; in place on a NumPy or PyTorch temporary outside autograd.

    (At 256 x 256 the identity and the two passes of ``q + c I`` cost NumPy as much as a tenth of a matmul.)
    """
    if is_plain_tensor(q) and not q.requires_grad:
        q.diagonal(dim1=-2, dim2=-1).add_(c[..., 0])
        return q
    if isinstance(q, np.ndarray) and q.flags.writeable:
        np.einsum("...ii->...i", q)[...] += c[..., 0]  # a view of the diagonal
        return q
    return q + c * xp.eye(q.shape[-1], dtype=q.dtype, device=device_of(q))


def _newton_schulz_gram_side(y, schedule, xp):
    """The cubic iteration of a tall ``m x n`` matrix run on its ``n x n`` side.

    With ``B_k = a_k I + b_k A_k``, the step ``X_{k+1} = X_k B_k`` gives
    ``X_k = X_0 Q_k`` with ``Q_k = B_0 ... B_{k-1}`` and, since ``B_k``
    commutes with ``A_k``, ``A_{k+1} = X_{k+1}^T X_{k+1} = A_k B_k^2``. So a
    step costs three ``n x n`` products instead of two ``m x n x n`` ones, plus
    ``X_0^T X_0`` and ``X_0 Q`` once per block: 1.7x fewer flops at ``m = 4n``
    over 5 steps. Unlike the direct iteration this recursion does not correct
    its own rounding, so every ``GRAM_SIDE_BLOCK`` steps it restarts from the
    actual ``X`` (which re-forms ``A`` from it); with that, float32 results are
    as close to the float64 reference as the direct iteration's at 5 and 10
    steps (about 3x its error at 20 steps with condition number 1e4), and
    float64 results agree to 1e-15. ``X_0 = y / ||y||_F`` is folded in as in
    :func:`_newton_schulz`: ``A_0 = y^T y / ||y||_F^2`` and the first block
    ends with ``y (Q / ||y||_F)``. Returns the result, the first Gram matrix
    ``y^T y``, the Gram matrix of the result (from the recursion, free) and
    ``||y||_F``.
    """
    n = y.shape[-1]
    eye = xp.eye(n, dtype=y.dtype, device=device_of(y))
    gram0, nu = _first_gram(y, xp)
    k = 1 / _unless_zero(nu, xp)
    x = y
    for start in range(0, len(schedule), GRAM_SIDE_BLOCK):
        a = gram0 * (k * k) if start == 0 else _gram(x, xp)
        q = None
        for beta, alpha in schedule[start : start + GRAM_SIDE_BLOCK]:
            b = alpha * a + beta * eye
            q = b if q is None else q @ b
            a = (a @ b) @ b
        x = y @ (q * k) if start == 0 else x @ q
    return x, gram0, a, nu


def _gram(x, xp):
    """``x^T x`` of a batch of matrices.

    PyTorch on a CPU, for matrices at least ``GRAM_HALVES_MIN`` wide: from
    the column halves ``x = [x1 x2]``, as ``x1^T x1``, ``x1^T x2`` and
    ``x2^T x2`` with the fourth block the transpose of the second: 3/4 of
    the flops (BLAS's symmetric ``syrk`` is not reachable from PyTorch).
    Half-width products run below full-width speed, so this pays from 768
    wide on (5 steps on two cores: 1-7% faster at 768 x 768, 3-5% at 1024,
    5-6% at 2048); at 512 it is 1-2% slower than the plain product.
    """
    n = x.shape[-1]
    if _halves(x):
        torch = sys.modules["torch"]
        h = n // 2
        x1, x2 = x[..., :h], x[..., h:]
        out = torch.empty(x.shape[:-2] + (n, n), dtype=x.dtype, device=x.device)
        torch.matmul(x1.mT, x1, out=out[..., :h, :h])
        torch.matmul(x1.mT, x2, out=out[..., :h, h:])
        torch.matmul(x2.mT, x2, out=out[..., h:, h:])
        out[..., h:, :h].copy_(out[..., :h, h:].mT)
        return out
    return xp.matrix_transpose(x) @ x


def _halves(x, width: int | None = None) -> bool:
    """Whether products of ``x``'s column halves replace ``x^T x``: a concrete CPU tensor outside autograd.

    ``width``: the least width that takes them, ``GRAM_HALVES_MIN`` unless
    given; read when called, so the threshold can be changed at run time.
    """
    if width is None:
        width = GRAM_HALVES_MIN
    return x.shape[-1] >= width and is_plain_tensor(x) and x.device.type == "cpu" and not x.requires_grad


def _dfi(p, xp):
    """``||p^T p - I||_F^2`` of each tall matrix of ``p``.

    On PyTorch on a CPU, from 512 wide (see :func:`_halves`), the Gram matrix is never assembled:
    with ``p = [p1 p2]`` split into column halves it is ``||p1^T p1 - I||^2
    + 2 ||p1^T p2||^2 + ||p2^T p2 - I||^2``, three half-width products (3/4
    of the flops, 0.85-0.92 of the time of the plain product at 512 wide on
    two cores, where assembling the blocks would eat the gain, see
    :func:`_gram`).
    """
    if _halves(p, width=DFI_HALVES_MIN):
        h = p.shape[-1] // 2
        p1, p2 = p[..., :h], p[..., h:]
        off = xp.linalg.vector_norm(p1.mT @ p2, axis=(-2, -1))
        return gram_dfi(p1.mT @ p1, xp, overwrite=True) + gram_dfi(p2.mT @ p2, xp, overwrite=True) + 2 * off * off
    return gram_dfi(_gram(p, xp), xp, overwrite=True)


def _scaled_matmul_add(c, x, y, beta: float, alpha: float, xp):
    """``beta * c + alpha * (x @ y)``.

    On PyTorch this is one GEMM with a ``beta`` term (``addmm``/``baddbmm``),
    which saves three elementwise passes over the matrices per step (about 10%
    of ``project``'s time on a CPU). Elsewhere it is the array-API expression,
    written as ``x @ (alpha * y)`` so that for the reference's ``alpha = -0.5``
    (a power of two) it rounds exactly like ``alpha * (x @ y)``.
    """
    if is_torch_namespace(xp) and x.ndim in (2, 3):
        torch = sys.modules["torch"]
        fused = torch.addmm if x.ndim == 2 else torch.baddbmm
        return fused(c, x, y, beta=beta, alpha=alpha)
    return beta * c + (x @ y if alpha == 1.0 else x @ (alpha * y))


def _schedule(method: str, steps: int):
    if method == "fire":
        return (FIRE_STEP,) * steps
    return fast_schedule(steps)


def fast_schedule(steps: int) -> tuple[tuple[float, float, float], ...]:
    """Coefficients ``(a, b, c)`` of the first ``steps`` quintics of the ``"fast"`` schedule.

    A slice of a table computed once at import (plain floats, so tracers see
    constants); past the table the last step, the Newton–Schulz quintic
    ``(15/8, -10/8, 3/8)`` to working precision, repeats.
    """
    table = _FAST_TABLE
    if steps <= len(table):
        return table[:steps]
    return table + (table[-1],) * (steps - len(table))


def _design_fast_schedule(steps: int, lower: float):
    """Step ``t`` is the odd quintic closest to 1 in the max norm on ``[l_t, u_t]``.

    ``l_0 = lower``, ``u_0 = 1``, and the next interval is the image of the
    last. While ``l_t / u_t`` is small the design interval is widened by 1% at
    the top, so round-off cannot push a singular value past the polynomial's
    hump. Returns the coefficients ``(a, b, c)`` of each step and the
    interval ``(l_t, u_t)`` each step maps its design interval into.
    """
    out, intervals = [], []
    lo, hi = lower, 1.0
    for _ in range(steps):
        top = hi * FAST_SAFETY if lo < 0.5 * hi else hi
        a, b, c, err = _minimax_quintic(lo, top)
        out.append((a, b, c))
        lo, hi = a * lo + b * lo**3 + c * lo**5, 1.0 + err
        intervals.append((lo, hi))
    return tuple(out), tuple(intervals)


def _minimax_quintic(lo: float, hi: float) -> tuple[float, float, float, float]:
    """Odd quintic minimizing ``max |1 - p(x)|`` on ``[lo, hi]``, by Remez exchange.

    The optimum equioscillates at ``lo < x1 < x2 < hi`` with ``p - 1`` taking
    the signs ``-, +, -, +`` and magnitude ``err``.
    """
    if hi - lo <= 1e-3 * hi:  # narrow interval: the Newton–Schulz quintic centred on it is within O(width^3)
        t = 0.5 * (lo + hi)
        return 15 / 8 / t, -10 / 8 / t**3, 3 / 8 / t**5, 0.0
    pts = np.linspace(lo, hi, 4)
    signs = np.array([1.0, -1.0, 1.0, -1.0])
    for _ in range(100):
        # p(x_k) + s_k err = 1 at the four reference points.
        system = np.stack([pts, pts**3, pts**5, signs], axis=1)
        a, b, c, err = np.linalg.solve(system, np.ones(4))
        # The interior extrema are the positive roots of p'(x) = a + 3b x^2 + 5c x^4.
        disc = 9 * b * b - 20 * a * c
        roots2 = (-3 * b + np.array([-1.0, 1.0]) * np.sqrt(max(disc, 0.0))) / (10 * c)
        inner = np.sort(np.sqrt(np.clip(roots2, 0.0, None)))
        new = np.array([lo, inner[0], inner[1], hi])
        if not (lo < new[1] < new[2] < hi) or np.allclose(new, pts, rtol=1e-14, atol=0.0):
            break
        pts = new
    return float(a), float(b), float(c), float(abs(err))


_FAST_TABLE, _FAST_INTERVALS = _design_fast_schedule(24, FAST_LOWER)
