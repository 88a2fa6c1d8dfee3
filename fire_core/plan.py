"""The shared machinery: many named layer weights -> validated, grouped, batched FIRE.

Adapters map their framework's structures (modules, pytrees, dicts of arrays)
to ``(name, array, layout)`` triples and hand them to :func:`reinit_many`,
which

1. validates every weight (dtype, layout, finite values) before any work, so a
   failure names the layer and nothing has been written;
2. groups the matrices by (namespace, matrix shape, dtype, device), so conv
   taps and same-shaped layers share one batched projection;
3. projects each group in chunks of whole layers of at most ``chunk_bytes``
   (peak extra memory is bounded by a chunk, not by the model);
4. hands each new weight, in its own layout and dtype, to ``write`` as soon
   as its chunk is done, and measures SFE and DfI from the Gram matrices the
   iteration already formed.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from ._array import array_namespace, check_finite, device_of, to_floats, work_dtype
from .layout import check_scale, from_matrices, parse_layout, scale_factor, to_matrices
from .metrics import gram_dfi, small_gram
from .polar import check_method, polar
from .report import Report

__all__ = ["reinit", "reinit_many", "CHUNK_BYTES"]

CHUNK_BYTES = 64 * 2**20  # matrices projected in one batched call, in the compute dtype


def reinit(w, /, layout: str = "oi", *, steps: int = 5, method: str = "fire", scale="fire"):
    """FIRE for one layer weight: project each tap's ``d_out x d_in`` matrix and scale.

    ``layout`` names the axes (``"oi"`` torch Linear, ``"oihw"`` Conv2d,
    ``"iohw"`` ConvTranspose2d, ``"io"`` Flax Dense, ``"hwio"`` Flax Conv,
    ``"ioo"``/``"iio"`` Flax attention; see :mod:`fire_core.layout`). Conv
    kernels are projected kernel-wise, all taps in one batched call. With the
    default ``scale="fire"`` the result is ``sqrt(d_out/d_in) / taps`` times the
    projection, as in the reference. Returns a new array like ``w``.
    """
    out = {}
    reinit_many([("weight", w, layout)], steps=steps, method=method, scale=scale, write=out.__setitem__, report=False)
    return out["weight"]


def reinit_many(
    weights: Iterable[tuple[str, object, str]],
    *,
    steps: int = 5,
    method: str = "fire",
    scale="fire",
    write: Callable[[str, object], None],
    report: bool = True,
    chunk_bytes: int = CHUNK_BYTES,
) -> Report | None:
    """FIRE on many named weights at once; ``write(name, new)`` receives each result.

    ``weights`` are ``(name, array, layout)``. Every weight is checked before
    any is projected or written: a bad dtype is a TypeError, a layout that does
    not fit or a NaN/Inf value a ValueError, each naming the weight. With
    ``report`` (the default) a :class:`Report` is returned, which costs one
    host transfer per chunk; without it nothing leaves the device and the call
    traces under ``jax.jit``.
    """
    check_method(method, steps)
    check_scale(scale)
    entries = _validate(weights)
    rep = Report(method=method, steps=int(steps), scale=scale) if report else None
    for chunk in _chunks(entries, chunk_bytes):
        rows = _run_chunk(chunk, steps, method, scale, write, report)
        if report:
            rep.rows.extend(rows)
    if report:
        order = {e.name: k for k, e in enumerate(entries)}
        rep.rows.sort(key=lambda row: order[row["name"]])
    return rep


class _Entry:
    __slots__ = ("name", "array", "layout", "xp", "work", "key", "nbytes")

    def __init__(self, name, array, layout, xp, work, key, nbytes):
        self.name, self.array, self.layout, self.xp = name, array, layout, xp
        self.work, self.key, self.nbytes = work, key, nbytes


def _validate(weights) -> list[_Entry]:
    entries, seen = [], set()
    for name, w, layout in weights:
        if name in seen:
            raise ValueError(f"{name}: the same name appears twice")
        seen.add(name)
        xp = array_namespace(w)
        work = work_dtype(w, xp, name)
        lay = parse_layout(layout, w.shape, name)
        check_finite(w, xp, name)
        itemsize = 8 if work == xp.float64 else 4
        key = (id(xp), lay.d_out, lay.d_in, str(w.dtype), str(device_of(w)))
        entries.append(_Entry(name, w, lay, xp, work, key, math.prod(lay.matrix_shape) * itemsize))
    return entries


def _chunks(entries: list[_Entry], chunk_bytes: int):
    """Whole layers of one group, up to ``chunk_bytes`` each (a bigger layer is its own chunk)."""
    groups: dict[tuple, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(e.key, []).append(e)
    for group in groups.values():
        chunk, size = [], 0
        for e in group:
            if chunk and size + e.nbytes > chunk_bytes:
                yield chunk
                chunk, size = [], 0
            chunk.append(e)
            size += e.nbytes
        if chunk:
            yield chunk


def _run_chunk(chunk: list[_Entry], steps, method, scale, write, report) -> list[dict]:
    xp, work = chunk[0].xp, chunk[0].work
    mats = [xp.astype(to_matrices(e.array, e.layout.text), work, copy=False) for e in chunk]
    batch = mats[0] if len(mats) == 1 else xp.concat(mats, axis=0)
    res = polar(batch, steps, method, xp, with_gram=report)
    stats, start = [], 0
    for e, old in zip(chunk, mats):
        lay, stop = e.layout, start + e.layout.taps
        p = res.p[start:stop, ...]
        factor = scale_factor(scale, lay)
        if factor is None:  # "norm": keep the layer's Frobenius norm
            pn = xp.linalg.vector_norm(p)
            ok = pn > 0
            factor = xp.where(ok, xp.linalg.vector_norm(old) / xp.where(ok, pn, xp.ones_like(pn)), xp.zeros_like(pn))
        new = xp.astype(from_matrices(p * factor, lay.text, lay.shape), e.array.dtype, copy=False)
        if report:
            stats.append(_layer_stats(xp, res, start, stop, old, new, e, factor))
        write(e.name, new)
        start = stop
    if not report:
        return []
    values = to_floats(xp.reshape(xp.stack(stats), (-1,)))
    rows = []
    for k, e in enumerate(chunk):
        scale_used, sfe, before, after = values[4 * k : 4 * k + 4]
        lay = e.layout
        rows.append(
            dict(
                name=e.name, shape=lay.shape, layout=lay.text, taps=lay.taps, n=min(lay.d_out, lay.d_in),
                scale=scale_used, sfe=sfe, dfi_before=before, dfi_after=after,
            )
        )
    return rows


def _layer_stats(xp, res, start, stop, old, new, e, factor):
    """(scale, SFE, DfI before, DfI after) of one layer as a float array of length 4."""
    lay, work = e.layout, old.dtype
    ref = scale_factor("fire", lay)
    if res.gram0 is not None:  # the iteration formed the Gram of old / ||old|| already
        nrm = res.norm[start:stop, ...]
        gram_old = res.gram0[start:stop, ...] * (nrm * nrm)
    else:
        gram_old = small_gram(old, xp)
    diff = xp.astype(to_matrices(new, lay.text), work) - old
    return xp.stack(
        [
            xp.asarray(factor, dtype=work, device=device_of(old)),
            xp.sum(diff * diff),
            xp.sum(gram_dfi(gram_old / (ref * ref), xp)),
            xp.sum(gram_dfi(res.gram[start:stop, ...], xp)),
        ]
    )
