"""Stability and plasticity measures, array API only.

* ``sfe(a, b) = ||a - b||_F^2``: how far a weight moved (stability).
* ``dfi(x) = ||G - I||_F^2`` with ``G`` the Gram matrix of the smaller side
  (``x^T x`` when ``m >= n``, ``x x^T`` otherwise): how far from an isometry
  (plasticity). Zero exactly for (semi-)orthogonal matrices.
"""

from __future__ import annotations

from ._array import array_namespace, device_of, work_dtype

__all__ = ["sfe", "dfi", "gram_dfi", "small_gram"]


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


def gram_dfi(g, xp):
    """``||g - I||_F^2`` over the last two axes of a batch of Gram matrices."""
    d = g - xp.eye(g.shape[-1], dtype=g.dtype, device=device_of(g))
    return xp.sum(d * d, axis=(-2, -1))


def dfi(x, /):
    """Deviation from isometry of each matrix of ``x`` (``(..., m, n)`` -> ``(...)``)."""
    xp = array_namespace(x)
    if x.ndim < 2:
        raise ValueError(f"dfi: expected an array of matrices (..., m, n), got shape {tuple(x.shape)}")
    dtype = work_dtype(x, xp, "dfi")
    return gram_dfi(small_gram(xp.astype(x, dtype, copy=False), xp), xp)

