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
    "sfe", "dfi", "drift", "gram_dfi", "small_gram",
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


def gram_dfi(g, xp, *, overwrite: bool = False):
    """``||g - I||_F^2`` over the last two axes of a batch of Gram matrices.

    With ``overwrite`` the caller hands ``g`` over: a PyTorch tensor then
    has the identity subtracted from its diagonal in place, with no ``n x n``
    temporary (those temporaries were a third of the report's time on a CPU).
    """
    if overwrite and is_plain_tensor(g) and not g.requires_grad:
        g.diagonal(dim1=-2, dim2=-1).sub_(1)
        d = g
    else:
        d = g - xp.eye(g.shape[-1], dtype=g.dtype, device=device_of(g))
    return xp.linalg.vector_norm(d, axis=(-2, -1)) ** 2  # one pass, no squared temporary


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
