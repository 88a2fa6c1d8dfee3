"""Kernel-wise reshaping: a layer weight in any layout <-> a batch of matrices.

A layout names each axis of a weight with one letter: ``o`` output features,
``i`` input features, any other lowercase letter a spatial tap axis, and an
uppercase letter a *stack* axis: a weight that holds several independent
layers (``nn.scan`` over layers, an ``nn.vmap`` ensemble), each projected and
scaled as its own layer. Repeated ``o`` (or ``i``) axes are merged into one
feature axis, as a Flax attention kernel ``(embed, heads, head_dim)`` =
``"ioo"`` needs. ``to_matrices`` moves the stack axes first, then the tap
axes, and the feature axes last, giving ``(stack * taps, d_out, d_in)``: one
``d_out x d_in`` matrix per spatial tap of each stacked layer, as FIRE
projects conv kernels, with each layer's taps contiguous.

=========================  ============  ==========================
weight                     layout        matrices
=========================  ============  ==========================
torch Linear               ``"oi"``      ``(1, out, in)``
torch Conv2d               ``"oihw"``    ``(kh*kw, out, in/groups)``
torch ConvTranspose2d      ``"iohw"``    ``(kh*kw, out/groups, in)``
Flax Dense                 ``"io"``      ``(1, out, in)``
Flax Conv                  ``"hwio"``    ``(kh*kw, out, in)``
Flax attention q/k/v       ``"ioo"``     ``(1, heads*head_dim, embed)``
Flax attention out         ``"iio"``     ``(1, embed, heads*head_dim)``
scanned Dense (L, in, out) ``"Lio"``     ``(L, out, in)``, L layers
ensemble Conv (E, ...)     ``"Ehwio"``   ``(E*kh*kw, out, in)``
=========================  ============  ==========================

The same module holds the layer scale rules, so adapters ask here for a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

from ._array import array_namespace

__all__ = ["Layout", "parse_layout", "to_matrices", "from_matrices", "SCALES", "scale_factor"]

SCALES = ("fire", "variance", "norm", None)


@dataclass(frozen=True)
class Layout:
    """A layout applied to a concrete shape."""

    text: str
    shape: tuple[int, ...]
    perm: tuple[int, ...]  # stack axes, tap axes, then output axes, then input axes
    taps: int  # spatial taps of one layer
    d_out: int
    d_in: int
    stack: int = 1  # independent layers held in the weight (the product of the stack axes)

    @property
    def matrices(self) -> int:
        """Matrices in the whole weight: ``stack * taps``."""
        return self.stack * self.taps

    @property
    def matrix_shape(self) -> tuple[int, int, int]:
        return (self.matrices, self.d_out, self.d_in)


def parse_layout(layout: str, shape, what: str = "weight") -> Layout:
    """Check ``layout`` against ``shape`` and work out the permutation and sizes."""
    shape = tuple(int(s) for s in shape)
    if not isinstance(layout, str) or not layout.isascii() or not layout.isalpha():
        raise ValueError(
            f"{what}: layout must be a string of letters (lowercase: features and taps, uppercase: stacked layers), "
            f"got {layout!r}"
        )
    if len(layout) != len(shape):
        raise ValueError(
            f"{what}: layout {layout!r} names {len(layout)} axes but the weight has shape {shape} ({len(shape)} axes)"
        )
    if "o" not in layout or "i" not in layout:
        hint = " ('O' and 'I' are stack axes; features are lowercase)" if "O" in layout or "I" in layout else ""
        raise ValueError(f"{what}: layout {layout!r} needs at least one 'o' and one 'i' axis (shape {shape}){hint}")
    others = [c for c in layout if c not in "oi"]
    if len(set(others)) != len(others):
        raise ValueError(f"{what}: layout {layout!r} repeats a tap or stack axis letter (shape {shape})")
    stack_axes = [k for k, c in enumerate(layout) if c.isupper()]
    taps_axes = [k for k, c in enumerate(layout) if c.islower() and c not in "oi"]
    out_axes = [k for k, c in enumerate(layout) if c == "o"]
    in_axes = [k for k, c in enumerate(layout) if c == "i"]
    sizes = [math.prod(shape[k] for k in axes) for axes in (stack_axes, taps_axes, out_axes, in_axes)]
    if 0 in sizes:
        raise ValueError(f"{what}: weight of shape {shape} is empty")
    perm = tuple(stack_axes + taps_axes + out_axes + in_axes)
    return Layout(layout, shape, perm, taps=sizes[1], d_out=sizes[2], d_in=sizes[3], stack=sizes[0])


def to_matrices(w, layout: str):
    """``w`` in ``layout`` -> ``(stack * taps, d_out, d_in)``, one matrix per spatial tap of each layer.

    Taps are ordered as the spatial axes appear in ``layout`` (row-major), so
    for ``"oihw"`` matrix ``h * kw + w`` is ``w[:, :, h, w]``; stacked layers
    come first, so for ``"Lhwio"`` matrix ``l * taps + t`` is tap ``t`` of
    layer ``l``.
    """
    xp = array_namespace(w)
    lay = parse_layout(layout, w.shape)
    return xp.reshape(xp.permute_dims(w, lay.perm), lay.matrix_shape)


def from_matrices(m, layout: str, shape):
    """Inverse of :func:`to_matrices`: ``(stack * taps, d_out, d_in)`` -> ``shape`` in ``layout``."""
    xp = array_namespace(m)
    lay = parse_layout(layout, shape)
    if tuple(m.shape) != lay.matrix_shape:
        raise ValueError(
            f"matrices of shape {tuple(m.shape)} do not fit layout {layout!r} with shape {lay.shape}: "
            f"expected {lay.matrix_shape}"
        )
    permuted = xp.reshape(m, tuple(lay.shape[k] for k in lay.perm))
    inverse = sorted(range(len(lay.perm)), key=lay.perm.__getitem__)
    return xp.permute_dims(permuted, tuple(inverse))


def check_scale(scale) -> None:
    if scale in SCALES and not isinstance(scale, Real):
        return
    if isinstance(scale, Real) and not isinstance(scale, bool) and math.isfinite(scale):
        return
    raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES} or a finite number")


def scale_factor(scale, lay: Layout) -> float | None:
    """The factor applied to a layer's projected matrices, or None for ``"norm"``.

    For a stacked weight, the factor of each of its layers (``taps`` are one
    layer's; the stack does not enter).

    ``"fire"``: ``sqrt(d_out / d_in) / taps``, the reference rule.
    ``"variance"``: ``sqrt(d_out / d_in) / sqrt(taps)``, which keeps the
    variance of a conv layer's output. ``None``: 1 (the bare polar factor).
    A number: that number. ``"norm"`` keeps each layer's Frobenius norm and so
    depends on the data; the caller computes it.

    When to use which. For weights with one matrix (Linear, attention:
    ``taps = 1``) ``"fire"`` and ``"variance"`` coincide. They differ for conv
    kernels: dividing each of ``k x k`` taps by ``k^2`` shrinks a conv
    layer's output by about ``k`` against a variance-preserving orthogonal
    conv, once per layer, so a CNN without normalization comes out of
    ``"fire"`` with a much smaller output scale. ``"norm"`` changes only each
    layer's direction, so the network's function moves least (highest
    old-task accuracy right after FIRE); it also keeps weight norms that
    training grew. ``None`` gives every singular value 1 (once converged).
    BatchNorm after a layer cancels its scale in train mode, but its running
    statistics go stale whatever the rule (refresh them). Measured effects
    per architecture: ``docs/stability.md`` and
    ``benchmarks/results/stability.md``.
    """
    check_scale(scale)
    if scale == "fire":
        return math.sqrt(lay.d_out / lay.d_in) / lay.taps
    if scale == "variance":
        return math.sqrt(lay.d_out / lay.d_in) / math.sqrt(lay.taps)
    if scale == "norm":
        return None
    if scale is None:
        return 1.0
    return float(scale)
