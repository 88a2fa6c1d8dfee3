"""The checks before any work: every weight validated, every new value and report number bounded.

:func:`fire_core.plan.reinit_many` runs :func:`_validate` on all the weights
before it projects one (dtype, layout, finite values, and whether the new
values and report numbers can be represented, from each weight's largest
magnitude and scale), :func:`_check_risky` on a risky weight's projection
before it is scaled and written, and :func:`_check_report` on each layer's
report numbers. A failure names the weight; nothing has been written.
"""

from __future__ import annotations

import math

from ._array import (
    _is_dtensor,
    array_namespace,
    check_finite,
    device_of,
    is_tracing,
    largest_magnitude_on_mesh,
    to_floats,
    work_dtype,
)
from .layout import parse_layout, scale_factor, to_matrices
from .metrics import largest_magnitude, unit_scale
from .polar import entry_bounds

FLOAT64_MAX = 1.7976931348623157e308
# Bounds within this relative margin of a dtype's largest value count as possibly beyond it (rounding).
MARGIN = 2.0**-10


class _Entry:
    __slots__ = ("name", "array", "layout", "xp", "work", "key", "nbytes", "amax", "risky", "plain")

    def __init__(self, name, array, layout, xp, work, key, nbytes, amax=None, risky=False, plain=True):
        self.name, self.array, self.layout, self.xp = name, array, layout, xp
        self.work, self.key, self.nbytes = work, key, nbytes
        self.amax = amax  # largest magnitude of each stacked layer (host floats), if it was needed
        self.risky = risky  # new values or report numbers might not be representable: checked before any write
        self.plain = plain  # SFE can be summed in the compute dtype as it stands (no overflow, no underflow)


def _validate(weights, context, method: str = "fire", steps: int = 5, scale="fire", report: bool = False) -> list[_Entry]:
    entries, seen = [], set()
    for name, w, layout in weights:
        if name in seen:
            raise ValueError(f"{name}: the same name appears twice")
        seen.add(name)
        xp = array_namespace(w)
        work = work_dtype(w, xp, name)
        lay = parse_layout(layout, w.shape, name)
        factor = scale_factor(scale, lay)
        _check_factor(name, lay, w.dtype, work, xp, factor, scale, method, steps)
        concrete = not is_tracing(w)
        amax = None
        with context(w):
            check_finite(w, xp, name)
            if concrete and (report or factor is None):
                amax = _layer_amax(w, lay, xp)
                if factor is None:
                    _check_norm_rule(name, w, lay, work, xp, amax, method, steps)
        risky, plain = _assess(lay, w.dtype, work, xp, factor, method, steps, amax, report)
        itemsize = 8 if work == xp.float64 else 4
        key = (id(xp), lay.d_out, lay.d_in, str(w.dtype), str(device_of(w)))
        nbytes = math.prod(lay.matrix_shape) * itemsize
        entries.append(_Entry(name, w, lay, xp, work, key, nbytes, amax, concrete and risky, plain))
    return entries


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _range(dtype, xp) -> tuple[float, float]:
    """``(largest, smallest positive)`` value of a floating dtype, subnormals included."""
    info = xp.finfo(dtype)
    return float(info.max), float(info.smallest_normal) * float(info.eps)


def _check_factor(name, lay, dtype, work, xp, factor, scale, method, steps) -> None:
    """Refuse a scale whose new weight cannot be represented, for any nonzero weight of this shape.

    A projection's entries are at most ``top`` (its largest singular value)
    and each nonzero matrix's largest entry is at least ``floor / sqrt(mn)``
    (its Frobenius norm over the entries' count), see :func:`polar.entry_bounds`.
    """
    if factor is None:  # "norm": depends on the weight, see _check_norm_rule
        return
    if factor == 0:
        raise ValueError(
            f"{name}: scale=0 writes a zero weight; FIRE keeps each weight's direction "
            "(use scale='fire' or a nonzero number, or leave the layer out)"
        )
    largest, smallest = _range(dtype, xp)
    top, floor = entry_bounds(method, steps)
    if abs(factor) > _range(work, xp)[0]:
        raise ValueError(
            f"{name}: scale={scale!r} is beyond {_dtype_name(work)}, the dtype the projection is computed and "
            "scaled in; use a smaller scale, or cast the weight to float64"
        )
    if abs(factor) * floor / math.sqrt(lay.d_out * lay.d_in) > largest:
        raise ValueError(
            f"{name}: scale={scale!r} multiplies the projection by {factor:.3g}, which puts entries of any nonzero "
            f"new weight of shape {lay.shape} beyond the largest {_dtype_name(dtype)} value {largest:.5g}; "
            "use a smaller scale, or cast the weight to a wider dtype"
        )
    if abs(factor) * top < smallest / 2:
        raise ValueError(
            f"{name}: scale={scale!r} multiplies the projection by {factor:.3g}, so every entry of the new weight "
            f"rounds to zero in {_dtype_name(dtype)} (its smallest value is {smallest:.3g}); "
            "use a larger scale, or cast the weight to a wider dtype"
        )


def _layer_amax(w, lay, xp) -> list[float]:
    """The largest magnitude of each stacked layer of ``w`` (one reduction, one host transfer).

    A DTensor's is reduced shard by shard and over its mesh (an empty local
    shard has no ``max``); a stacked one's layers are read from the whole tensor.
    """
    if _is_dtensor(w):
        if lay.stack == 1:
            return [largest_magnitude_on_mesh(w)]
        w = w.full_tensor()
    if lay.stack == 1:
        return to_floats(xp.reshape(largest_magnitude(w, xp, axis=None, keepdims=False), (1,)))
    layers = xp.reshape(to_matrices(w, lay.text), (lay.stack, -1))
    return to_floats(largest_magnitude(layers, xp, axis=1, keepdims=False))


def _check_norm_rule(name, w, lay, work, xp, amax, method, steps) -> None:
    """``scale="norm"`` divides each layer's Frobenius norm by its projection's: that must fit the compute dtype.

    The projection's norm is at least ``floor`` (:func:`polar.entry_bounds`),
    so the factor is at most ``||W_l||_F / floor``. Bounded first by
    ``amax * sqrt(size)``; only if that is not enough are the norms taken.
    """
    largest, _ = _range(work, xp)
    _, floor = entry_bounds(method, steps)
    size = lay.taps * lay.d_out * lay.d_in
    if max(amax) * math.sqrt(size) / floor * (1 + MARGIN) <= largest:
        return
    layers = xp.astype(xp.reshape(to_matrices(w, lay.text), (lay.stack, -1)), work)
    s = unit_scale(largest_magnitude(layers, xp, axis=1), xp)
    nu = xp.linalg.vector_norm(layers * s, axis=1)
    for k, (u, v) in enumerate(zip(to_floats(xp.reshape(s, (-1,))), to_floats(nu))):
        if v / u / floor * (1 + MARGIN) > largest:
            where = f"layer {k} of the stack" if lay.stack > 1 else "the weight"
            raise ValueError(
                f"{name}: scale='norm' keeps each layer's Frobenius norm; {where} has norm {v / u:.4g}, too large to "
                f"compute the factor in {_dtype_name(work)} (largest {largest:.4g}); "
                "use scale='fire', or cast the weight to float64"
            )


def _assess(lay, dtype, work, xp, factor, method, steps, amax, report) -> tuple[bool, bool]:
    """``(risky, plain)`` of a weight from bounds on its new entries and report numbers.

    risky: the new weight might overflow its dtype or round to zero, or a
    report number might exceed float64 (checked on the result, before any
    write). plain: SFE's squares neither overflow nor underflow in the
    compute dtype, so it is summed there directly (else over its largest term).
    """
    largest, smallest = _range(dtype, xp)
    top, floor = entry_bounds(method, steps)
    size = lay.taps * lay.d_out * lay.d_in  # entries of one stacked layer
    if factor is not None:  # entries of the new weight lie in [lo, hi] (the largest of each nonzero matrix)
        hi, lo = abs(factor) * top, abs(factor) * floor / math.sqrt(lay.d_out * lay.d_in)
        risky = hi * (1 + MARGIN) > largest or lo <= 2 * smallest
    elif amax is not None:  # "norm": the new layer has the old one's norm, in [amax, amax sqrt(size)]
        hi = max(amax) * math.sqrt(size)
        risky = hi * (1 + MARGIN) > largest or any(0 < a <= 2 * smallest * math.sqrt(size) for a in amax)
    else:  # traced: nothing can be checked
        return False, True
    if not report or amax is None:
        return risky, True
    a = max(amax)
    count = lay.matrices * lay.d_out * lay.d_in
    new_norm = hi * math.sqrt(lay.matrices * min(lay.d_out, lay.d_in)) if factor is not None else a * math.sqrt(count)
    sfe = (a * math.sqrt(count) + new_norm) ** 2 if a * math.sqrt(count) + new_norm < 1e150 else math.inf
    q = a * math.sqrt(lay.d_out * lay.d_in) / scale_factor("fire", lay)  # ||W_t||_F over the reference scale
    dfi = lay.matrices * (q * q + math.sqrt(min(lay.d_out, lay.d_in))) ** 2 if q < 1e75 else math.inf
    risky = risky or max(sfe, dfi) > FLOAT64_MAX / 16
    wide, _ = _range(work, xp)
    eps = float(xp.finfo(work).eps)
    reach = a + (hi if factor is not None else a * math.sqrt(size))  # bounds every entry of new - old
    plain = reach * reach * count * 4 <= wide and a >= math.sqrt(float(xp.finfo(work).smallest_normal)) / eps
    return risky, plain


def _total(values) -> float:
    """The float64 sum of non-negative numbers; ``inf`` where it does not fit."""
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


class _Huge(float):
    """A report number beyond float64: ``inf``, carrying its decimal logarithm for the error message."""

    def __new__(cls, log10: float):
        self = super().__new__(cls, math.inf)
        self.log10 = log10
        return self


def _check_risky(xp, res, factors, norm_parts, chunk, dtype, scale) -> None:
    """Before scaling: no entry of a risky weight's new matrices overflows its dtype, none that was nonzero becomes zero.

    Each new matrix is its projection times the layer's factor, so its
    largest entry is ``max |p| * |factor|``, taken here in float64 (a
    product that rounds to the dtype's largest value counts as beyond it).
    """
    peaks = to_floats(xp.reshape(largest_magnitude(res.p, xp), (-1,)))
    nonzero = to_floats(xp.reshape(res.nu, (-1,)))  # as the backend computes (XLA on a CPU flushes subnormals)
    if norm_parts is not None:
        ratio, top = (to_floats(xp.reshape(v, (-1,))) for v in norm_parts)
    largest, smallest = _range(dtype, xp)
    rule = f"scale={scale!r}" + (" (each layer keeps its Frobenius norm)" if scale == "norm" else "")
    start = 0
    for (e, lo, hi), factor in zip(chunk, factors):
        stop = start + hi - lo
        for t in range(start, stop) if e.risky else ():
            biggest = peaks[t] * (abs(factor) if factor is not None else ratio[t] * top[t])
            layer = (lo + t - start) // e.layout.taps
            where = f" (layer {layer} of the stack)" if e.layout.stack > 1 else ""
            if biggest > largest:
                raise ValueError(
                    f"{e.name}: the new weight{where} is not representable in {_dtype_name(dtype)}: with {rule} "
                    f"an entry would be {biggest:.4g}, beyond its largest value {largest:.5g}; use a smaller scale "
                    "(scale='fire' is the reference's), or cast the weight to a wider dtype. Nothing was written"
                )
            if nonzero[t] > 0 and biggest <= smallest / 2:
                raise ValueError(
                    f"{e.name}: a nonzero matrix of the weight{where} would be written as zero: with {rule} every "
                    f"entry rounds to zero in {_dtype_name(dtype)} (largest {biggest:.3g}, smallest value "
                    f"{smallest:.3g}); use a larger scale, or cast the weight to a wider dtype. Nothing was written"
                )
        start = stop


def _check_report(name, terms: dict) -> None:
    """Every report number (the sum of its per-matrix ``terms``) is finite, or the error names those that are not."""
    beyond = []
    for label, values in terms.items():
        if math.isfinite(_total(values)):
            continue
        logs = [v.log10 if isinstance(v, _Huge) else math.log10(v) for v in values if v > 0]
        top = max(logs)
        beyond.append(f"{label} is about 1e{top + math.log10(math.fsum(10 ** (x - top) for x in logs)):.0f}")
    if beyond:
        raise ValueError(
            f"{name}: the report's {' and '.join(beyond)} for this weight, beyond the largest float64 (1.8e308), "
            "so it cannot be measured; report=False projects it without measuring. Nothing was written"
        )
