"""The shared machinery: many named layer weights -> validated, grouped, batched FIRE.

Adapters map their framework's structures (modules, pytrees, dicts of arrays)
to ``(name, array, layout)`` triples and hand them to :func:`reinit_many`,
which

1. validates every weight (dtype, layout, finite values) before any work, so a
   failure names the layer and nothing has been written;
2. groups the matrices by (namespace, matrix shape, dtype, device), so conv
   taps and same-shaped layers share one batched projection;
3. projects each group in chunks of at most ``chunk_bytes`` of matrices
   (4 MiB in host memory, 64 MiB on a GPU; an even count of matrices, so
   two threads share a batch evenly; made row-major once, since a conv
   layer's taps are strided views), where a conv layer's taps may span
   chunks: peak extra memory is bounded by a chunk and the largest layer,
   not by the model;
4. hands each new weight, in its own layout and dtype, to ``write`` as soon
   as its last matrix is done, and measures SFE and DfI from the Gram
   matrices the iteration already formed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterable

from ._array import array_namespace, check_finite, dense, device_of, on_accelerator, to_floats, work_dtype
from .layout import check_scale, from_matrices, parse_layout, scale_factor, to_matrices
from .metrics import gram_dfi, small_gram
from .polar import check_method, polar
from .report import Report

__all__ = ["reinit", "reinit_many", "CHUNK_BYTES", "GPU_CHUNK_BYTES"]

CHUNK_BYTES = 4 * 2**20  # matrices projected in one batched call, in the compute dtype (see _chunks)
# On a GPU small batches are all launch overhead: chunks there are bigger. Not measured here (no GPU
# was lent to this project's sessions yet); 64 MiB keeps a chunk's temporaries well under 1 GB.
GPU_CHUNK_BYTES = 64 * 2**20
CHUNK_ALIGN = 2  # matrices a chunk holds a multiple of (see _chunks)


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
    chunk_bytes: int | None = None,
    context: Callable[[object], ContextManager] | None = None,
) -> Report | None:
    """FIRE on many named weights at once; ``write(name, new)`` receives each result.

    ``weights`` are ``(name, array, layout)``. Every weight is checked before
    any is projected or written: a bad dtype is a TypeError, a layout that does
    not fit or a NaN/Inf value a ValueError, each naming the weight. With
    ``report`` (the default) a :class:`Report` is returned, which costs one
    host transfer per chunk; without it nothing leaves the device and the call
    traces under ``jax.jit``.

    ``chunk_bytes``: the most matrices (in bytes of the compute dtype) one
    batched projection takes; by default ``CHUNK_BYTES`` (4 MiB, measured
    on a CPU) or, for arrays on a GPU, ``GPU_CHUNK_BYTES`` (64 MiB).

    ``context(array)``, if given, is entered around all work on that array:
    its validation, the batched projection of every chunk that holds it
    (chunks never mix devices) and its write. CuPy makes the array's device
    current this way.
    """
    check_method(method, steps)
    check_scale(scale)
    weights = list(weights)
    if context is None:
        context = _no_context
    else:
        write = _in_context(write, context, {name: w for name, w, _ in weights})
    entries = _validate(weights, context)
    rep = Report(method=method, steps=int(steps), scale=scale) if report else None
    pending = {"pieces": {}, "sums": {}}  # layers whose taps span chunks, until their last tap is done
    for chunk in _chunks(entries, chunk_bytes, split_layers=scale != "norm"):
        with context(chunk[0][0].array):
            rows = _run_chunk(chunk, steps, method, scale, write, report, pending)
        if report:
            rep.rows.extend(rows)
    if report:
        order = {e.name: k for k, e in enumerate(entries)}
        rep.rows.sort(key=lambda row: order[row["name"]])
    return rep


def _no_context(array):
    return contextlib.nullcontext()


def _in_context(write, context, arrays):
    """``write`` wrapped to run inside ``context`` of the array it writes."""

    def write_in_context(name, new):
        with context(arrays[name]):
            write(name, new)

    return write_in_context


class _Entry:
    __slots__ = ("name", "array", "layout", "xp", "work", "key", "nbytes")

    def __init__(self, name, array, layout, xp, work, key, nbytes):
        self.name, self.array, self.layout, self.xp = name, array, layout, xp
        self.work, self.key, self.nbytes = work, key, nbytes


def _validate(weights, context) -> list[_Entry]:
    entries, seen = [], set()
    for name, w, layout in weights:
        if name in seen:
            raise ValueError(f"{name}: the same name appears twice")
        seen.add(name)
        xp = array_namespace(w)
        work = work_dtype(w, xp, name)
        lay = parse_layout(layout, w.shape, name)
        with context(w):
            check_finite(w, xp, name)
        itemsize = 8 if work == xp.float64 else 4
        key = (id(xp), lay.d_out, lay.d_in, str(w.dtype), str(device_of(w)))
        entries.append(_Entry(name, w, lay, xp, work, key, math.prod(lay.matrix_shape) * itemsize))
    return entries


def _chunks(entries: list[_Entry], chunk_bytes: int | None, split_layers: bool = True, align: int = CHUNK_ALIGN):
    """Pieces ``(entry, first tap, last tap + 1)`` of one group, up to ``chunk_bytes`` a chunk.

    Small matrices (conv taps, small layers) batch by the hundred; big ones
    go a few at a time, which on a CPU keeps each batch in cache (one huge
    batched matmul is slower there than several cache-sized ones). With
    ``split_layers`` a layer's taps may span chunks and every chunk holds a
    multiple of ``align`` matrices (at least ``align``, even past
    ``chunk_bytes``), except a group's last, which holds the remainder: a
    batched matmul shares its batch among the threads, and an uneven share
    (three matrices on two threads) idles one. Without ``split_layers``
    (``scale="norm"`` needs whole layers) a bigger layer is its own chunk.
    ``chunk_bytes=None`` takes the default for the group's device.
    """
    groups: dict[tuple, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(e.key, []).append(e)
    for group in groups.values():
        if chunk_bytes is None:
            limit = GPU_CHUNK_BYTES if on_accelerator(group[0].array) else CHUNK_BYTES
        else:
            limit = chunk_bytes
        if not split_layers:
            yield from _whole_layer_chunks(group, limit)
            continue
        each = group[0].nbytes // group[0].layout.matrices
        sizes = _chunk_sizes(sum(e.layout.matrices for e in group), max(limit // each, 1), align)
        chunk, room = [], sizes.pop(0)
        for e in group:
            taps, start = e.layout.matrices, 0
            while start < taps:
                stop = min(taps, start + room)
                chunk.append((e, start, stop))
                room -= stop - start
                start = stop
                if room == 0:
                    yield chunk
                    chunk, room = [], (sizes.pop(0) if sizes else 0)


def _chunk_sizes(total: int, cap: int, align: int) -> list[int]:
    """Matrices per chunk: ``cap`` rounded down to a multiple of ``align`` (at least ``align``), then the rest.

    A small odd rest of big matrices (three on two threads, where one thread
    would idle through the third) is cut into an aligned part and a last
    chunk of its own, which the BLAS then spreads over all threads. For small
    matrices (more than 64 to a chunk) another call costs more than it saves.
    """
    if cap > 1:
        cap = max(cap - cap % align, align)
    sizes = [cap] * (total // cap)
    rest = total % cap
    if rest % align and align < rest < 4 * align and cap <= 64:
        sizes.append(rest - rest % align)
        rest %= align
    return sizes + ([rest] if rest else [])


def _whole_layer_chunks(group: list[_Entry], chunk_bytes: int):
    """Whole layers up to ``chunk_bytes`` a chunk; a bigger layer is its own chunk."""
    chunk, size = [], 0
    for e in group:
        if chunk and size + e.nbytes > chunk_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((e, 0, e.layout.matrices))
        size += e.nbytes
    if chunk:
        yield chunk


def _run_chunk(chunk, steps, method, scale, write, report, pending) -> list[dict]:
    """Project one chunk of pieces; write (and measure) every layer whose last piece it holds."""
    xp, work = chunk[0][0].xp, chunk[0][0].work
    dtype, dev = chunk[0][0].array.dtype, device_of(chunk[0][0].array)
    mats = []
    for e, lo, hi in chunk:
        m = xp.astype(to_matrices(e.array, e.layout.text), work, copy=False)
        mats.append(m if hi - lo == e.layout.matrices else m[lo:hi, ...])
    batch = dense(mats[0], xp) if len(mats) == 1 else xp.concat(mats, axis=0)
    res = polar(batch, steps, method, xp, with_dfi=report)
    # One factor per layer, spread over its taps: the whole chunk is scaled in one pass.
    factors = [scale_factor(scale, e.layout) for e, _, _ in chunk]
    if any(f is None for f in factors):  # "norm": keep each layer's Frobenius norm (whole weights here)
        cols, start = [], 0
        for (e, lo, hi), old in zip(chunk, mats):
            stop = start + hi - lo
            layers, taps = e.layout.stack, e.layout.taps  # a stacked weight: each of its layers keeps its own
            new = xp.reshape(res.p[start:stop, ...], (layers, -1))
            pn = xp.linalg.vector_norm(new, axis=1)
            on = xp.linalg.vector_norm(xp.reshape(old, (layers, -1)), axis=1)
            ok = pn > 0
            f = xp.where(ok, on / xp.where(ok, pn, xp.ones_like(pn)), xp.zeros_like(pn))
            cols.append(xp.reshape(xp.broadcast_to(xp.reshape(f, (layers, 1)), (layers, taps)), (layers * taps, 1, 1)))
            start = stop
        column = xp.concat(cols, axis=0)
    else:
        column = _per_matrix(xp, factors, chunk, work, dev)
    scaled = res.p * column
    # Measures first: ``batch`` may be a view of a weight that ``write`` overwrites in place.
    values = _measures(xp, res, batch, scaled, column, factors, chunk, dtype, work, dev) if report else None
    done, start = [], 0
    for e, lo, hi in chunk:
        stop = start + hi - lo
        piece, complete = scaled[start:stop, ...], True
        if hi - lo < e.layout.matrices:  # part of a layer: kept until the layer is complete
            pieces = pending["pieces"].setdefault(e.name, [])
            pieces.append(piece)
            complete = hi == e.layout.matrices
            if complete:
                piece = xp.concat(pending["pieces"].pop(e.name), axis=0)
        if complete:
            lay = e.layout
            write(e.name, xp.astype(from_matrices(piece, lay.text, lay.shape), dtype, copy=False))
        done.append((e, complete, start, stop))
        start = stop
    if not report:
        return []
    values = to_floats(values)
    total = int(batch.shape[0])
    rows = []
    for (e, complete, start, stop), factor in zip(done, factors):
        sums = pending["sums"].setdefault(e.name, ([], [], []))
        for k in range(3):  # SFE, DfI before, DfI after of each matrix of the piece
            sums[k].extend(values[k * total + start : k * total + stop])
        if not complete:
            continue
        del pending["sums"][e.name]
        lay = e.layout
        if factor is None:  # "norm": the factor of the weight's first layer (each layer has its own)
            factor = values[3 * total + start]
        sfe, before, after = (math.fsum(v) for v in sums)
        rows.append(
            dict(
                name=e.name, shape=lay.shape, layout=lay.text, taps=lay.matrices, n=min(lay.d_out, lay.d_in),
                stack=lay.stack, scale=float(factor), sfe=sfe, dfi_before=before, dfi_after=after,
            )
        )
    return rows


def _measures(xp, res, batch, scaled, column, factors, chunk, dtype, work, dev):
    """SFE, DfI before and DfI after of every matrix of the chunk (and the "norm" factors), flat.

    SFE compares the weight as written (rounded to its dtype) with the old
    one; DfI before is taken of the old matrices over the reference scale, from
    the Gram matrix the iteration formed; DfI after of the bare projection.
    """
    written = scaled if dtype == work else xp.astype(xp.astype(scaled, dtype), work)
    diff = written - batch
    ref = _per_matrix(xp, [scale_factor("fire", e.layout) for e, _, _ in chunk], chunk, work, dev)
    if res.gram0 is not None:  # the iteration formed the Gram of batch / ||batch|| already
        gram_old = res.gram0 * ((res.norm / ref) ** 2)
    else:
        gram_old = small_gram(batch / ref, xp)
    per_matrix = [
        xp.linalg.vector_norm(diff, axis=(-2, -1)) ** 2,  # SFE in one pass
        gram_dfi(gram_old, xp, overwrite=True),
        res.dfi,
    ]
    if factors[0] is None:
        per_matrix.append(xp.reshape(column, (-1,)))
    return xp.reshape(xp.stack(per_matrix), (-1,))


def _per_matrix(xp, factors, chunk, work, dev):
    """Per-layer numbers -> a ``(matrices in chunk, 1, 1)`` column, each repeated over its piece's taps."""
    values = [float(f) for f, (_, lo, hi) in zip(factors, chunk) for _ in range(hi - lo)]
    return xp.reshape(xp.asarray(values, dtype=work, device=dev), (-1, 1, 1))


def measure(pairs: Iterable[tuple[str, object, object, str]], *, scale="fire", method=None, steps=None) -> Report:
    """The rows of a FIRE :class:`Report` from ``(name, before, after, layout)`` pairs.

    For a caller that holds the old and the new weights but not the projection
    itself (a pure transform under ``jax.jit``, a checkpoint diff). ``scale``
    must be the rule the new weights were made with; ``method`` and ``steps``
    only label the report. The rows match those :func:`reinit_many` returns:

    * ``sfe``: ``||after - before||_F^2``;
    * ``dfi_before``: DfI of the old matrices divided by the reference scale
      ``sqrt(d_out / d_in) / taps``;
    * ``scale`` and ``dfi_after``: ``after`` is divided by the factor the
      rule applied, and DfI is taken of what is left, i.e. of the bare
      projection. For ``scale="norm"`` the factor depends on the projection,
      which is not known here; the factor is then taken as the root mean
      square singular value of ``after``, ``||after||_F / sqrt(taps * n)``,
      so that ``dfi_after`` is the DfI of ``after`` rescaled to mean squared
      singular value 1. That equals the row of :func:`reinit_many` whenever
      the projection is an isometry (``method="svd"``, or ``"fast"`` once
      converged) and reads 0 exactly then. A zero factor (a zero weight, or
      ``scale=0``) is replaced by 1.

    DfI is summed over a weight's taps (and stacked layers). Values are Python floats: this needs
    concrete arrays (one host transfer per weight), not tracers.
    """
    check_scale(scale)
    rep = Report(method=method, steps=steps, scale=scale)
    for name, before, after, layout in pairs:
        xp = array_namespace(before, after)
        work = work_dtype(before, xp, name)
        work_dtype(after, xp, name)
        if tuple(before.shape) != tuple(after.shape):
            raise ValueError(f"{name}: before and after differ in shape, {tuple(before.shape)} vs {tuple(after.shape)}")
        lay = parse_layout(layout, before.shape, name)
        old = xp.astype(to_matrices(before, layout), work)
        new = xp.astype(to_matrices(after, layout), work)
        n = min(lay.d_out, lay.d_in)
        factor = applied = scale_factor(scale, lay)
        if factor is None:  # "norm": the RMS singular value of `after`, of each stacked layer
            per_layer = xp.reshape(new, (lay.stack, -1))
            rms = xp.linalg.vector_norm(per_layer, axis=1) / math.sqrt(lay.taps * n)
            rms = xp.where(rms != 0, rms, xp.ones_like(rms))
            factor = xp.reshape(xp.broadcast_to(xp.reshape(rms, (-1, 1)), (lay.stack, lay.taps)), (-1, 1, 1))
            applied = rms[0]
        elif factor == 0:
            factor = 1.0
        ref = scale_factor("fire", lay)
        diff = new - old
        stats = [
            xp.sum(diff * diff),
            xp.sum(gram_dfi(small_gram(old / ref, xp), xp)),
            xp.sum(gram_dfi(small_gram(new / factor, xp), xp)),
        ]
        if not isinstance(applied, float):  # "norm": the measured factor (of the first stacked layer)
            stats.append(applied)
        values = to_floats(xp.stack(stats))
        values = [values[3] if len(values) > 3 else applied] + values[:3]
        rep.rows.append(
            dict(
                name=name, shape=lay.shape, layout=lay.text, taps=lay.matrices, n=n, stack=lay.stack,
                scale=values[0], sfe=values[1], dfi_before=values[2], dfi_after=values[3],
            )
        )
    return rep
