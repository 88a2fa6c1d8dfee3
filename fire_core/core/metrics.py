"""Stability and plasticity measures, array API only.

* ``sfe(a, b) = ||a - b||_F^2``: how far a weight moved (stability).
* ``dfi(x) = ||G - I||_F^2`` with ``G`` the Gram matrix of the smaller side
  (``x^T x`` when ``m >= n``, ``x x^T`` otherwise): how far from an isometry
  (plasticity). Zero exactly for (semi-)orthogonal matrices.
* ``drift(before, after) = ||after - before||_F / ||before||_F``: how much a
  model's outputs on a probe batch changed (stability of the function).
"""

from __future__ import annotations

import math

from ._array import array_namespace, device_of, is_plain_tensor, to_floats, work_dtype

# The plasticity diagnostics of activations (feature effective rank, dormant
# units) live in fire_core.diagnostics and belong to the metrics API too.
from .diagnostics import DORMANT_TAU, SRANK_DELTA, dormant_ratio, dormant_scores, srank

__all__ = [
    "sfe", "dfi", "drift", "gram_dfi", "small_gram", "largest_magnitude", "unit_scale", "dfi_split",
    "srank", "dormant_ratio", "dormant_scores", "SRANK_DELTA", "DORMANT_TAU",
]


def sfe(a, b, /):
    """Squared Frobenius error ``||a - b||_F^2`` over all elements: a 0-d array.

    Computed in float32 for float16/bfloat16 inputs.
    """
    xp = array_namespace(a, b)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"sfe: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = work_dtype(a, xp, "sfe")
    d = xp.astype(a, dtype, copy=False) - xp.astype(b, dtype, copy=False)
    return xp.sum(d * d)


def small_gram(x, xp):
    """Gram matrix of the smaller side of each matrix in ``x``."""
    xt = xp.matrix_transpose(x)
    return xt @ x if x.shape[-2] >= x.shape[-1] else x @ xt


def gram_dfi(g, xp, *, overwrite: bool = False, weight=None, shift=None):
    """``||weight g - shift I||_F^2`` over the last two axes of a batch of Gram matrices.

    ``weight`` and ``shift`` (default 1): one factor per matrix, shape
    ``(..., 1, 1)``; with them a DfI too large (or too small) for the
    dtype is measured in pieces, see :func:`dfi_split`. With ``overwrite``
    the caller hands ``g`` over: a PyTorch tensor then has the identity
    subtracted from its diagonal in place, with no ``n x n`` temporary
    (those temporaries were a third of the report's time on a CPU).
    """
    if weight is not None:
        g = g * weight
        overwrite = True  # the product is ours
    if overwrite and is_plain_tensor(g) and not g.requires_grad:
        g.diagonal(dim1=-2, dim2=-1).sub_(1 if shift is None else shift[..., 0])
        d = g
    else:
        eye = xp.eye(g.shape[-1], dtype=g.dtype, device=device_of(g))
        d = g - (eye if shift is None else shift * eye)
    return xp.linalg.vector_norm(d, axis=(-2, -1)) ** 2  # one pass, no squared temporary


def largest_magnitude(x, xp, axis=(-2, -1), keepdims: bool = True):
    """``max |x|`` over ``axis`` (each matrix by default), as the larger of ``max x`` and ``-min x``.

    Two reductions and no ``|x|`` temporary: in NumPy half the time of
    ``max(abs(x))``, in PyTorch on a CPU 1/25 to 1/70 of
    ``linalg.vector_norm(x, ord=inf)`` (1.9 ms at 256 x 256, more than the
    rest of ``project``'s normalization; measured on two cores).
    """
    return xp.maximum(xp.max(x, axis=axis, keepdims=keepdims), -xp.min(x, axis=axis, keepdims=keepdims))


def unit_scale(amax, xp):
    """A power of two ``s`` per matrix with ``amax * s`` near 1, from the largest magnitudes ``amax``.

    ``x * s`` then has its largest entry in ``[1/2, 2]``, so none of its
    squares overflows and its largest ones do not underflow; multiplying by
    a power of two rounds nothing. ``s`` and ``1 / s`` are kept normal
    numbers (``s`` in ``[2^-126, 2^126]`` for float32), as a division by a
    huge ``amax`` is not: XLA on a CPU multiplies by the reciprocal and
    flushes it to zero when it is subnormal. So the largest entry of ``x * s``
    lies in ``[2^-23, 4]`` at the ends of the range. Five elementwise
    operations on one number per matrix (PyTorch spends about 2 us on each).
    """
    info = xp.finfo(amax.dtype)
    tiny = float(info.smallest_normal)
    limit = -math.log2(tiny)  # 126 for float32, 1022 for float64
    # amax raised to the smallest normal: a zero matrix's log2 stays finite, and any amax below it gives the
    # exponent the clip below gives anyway. No subnormal is formed, so a process that flushes them to zero
    # (torch.set_flush_denormal(True), XLA's FTZ/DAZ) computes the same s without a log2(0).
    exponent = xp.round(xp.log2(xp.clip(amax, min=tiny)))
    return 0.5 ** xp.clip(exponent, min=-limit, max=limit)


def dfi_split(scale, nu, divisor):
    """``(weight, shift, t, log10_t)`` with ``DfI(x / divisor) = t^2 ||weight A - shift I||_F^2``, in float64.

    For a matrix ``x`` known by the Gram matrix ``A`` of ``x * scale`` and
    ``nu = ||x * scale||_F``: ``q = nu / (scale divisor)`` is ``||x||_F /
    divisor``, which may be far from 1 (a weight of 1e18 over its reference
    scale), and ``DfI = ||q^2 A / nu^2 - I||^2``. With ``weight = min(q, 1)^2
    / nu^2`` and ``shift = 1 / max(q, 1)^2`` both terms of the norm are at
    most about 1, so nothing overflows in the compute dtype, and an
    underflow of either is below the other term's rounding; ``t = max(q,
    1)^2`` (``inf`` beyond float64, when ``log10_t`` still says how far).
    Python floats in and out, one matrix each; a zero matrix (``nu = 0``)
    gives ``(0, 1, 1, 0)``.
    """
    if nu == 0:
        return 0.0, 1.0, 1.0, 0.0
    q = nu / scale / divisor  # Python floats: inf where it overflows, no exception
    if q <= 1:
        return (q / nu) ** 2, 1.0, 1.0, 0.0
    return 1 / nu**2, 1 / q / q, q * q, 2 * (math.log10(nu) - math.log10(scale) - math.log10(divisor))


def dfi(x, /):
    """Deviation from isometry of each matrix of ``x`` (``(..., m, n)`` -> ``(...)``)."""
    xp = array_namespace(x)
    if x.ndim < 2:
        raise ValueError(f"dfi: expected an array of matrices (..., m, n), got shape {tuple(x.shape)}")
    dtype = work_dtype(x, xp, "dfi")
    return gram_dfi(small_gram(xp.astype(x, dtype, copy=False), xp), xp)



def drift(before, after, /) -> float:
    """Relative change ``||after - before||_F / ||before||_F`` of a function's outputs, as a Python float.

    ``before`` and ``after`` are the outputs of a model on the same probe
    inputs, before and after an intervention: two arrays of one shape, or two
    equal-length sequences of arrays (a model with several outputs), whose
    norms are then taken over all elements together. 0 means the function is
    unchanged on the probe, 1 that the change is as large as the output.
    Computed in the outputs' precision (float16/bfloat16 in float32). A zero
    ``before`` gives 0 if ``after`` is zero too, else ``inf``.
    """
    single = hasattr(before, "shape")
    pairs = [(before, after)] if single else list(zip(before, after, strict=True))
    num = den = 0.0
    for b, a in pairs:
        xp = array_namespace(b, a)
        if tuple(b.shape) != tuple(a.shape):
            raise ValueError(f"drift: output shapes differ, {tuple(b.shape)} vs {tuple(a.shape)}")
        dtype = work_dtype(b, xp, "drift")
        b, a = xp.astype(b, dtype), xp.astype(a, dtype)
        d = a - b
        values = to_floats(xp.stack([xp.sum(d * d), xp.sum(b * b)]))
        num, den = num + values[0], den + values[1]
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)
