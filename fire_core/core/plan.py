"""The shared machinery: many named layer weights -> validated, grouped, batched FIRE.

Adapters map their framework's structures (modules, pytrees, dicts of arrays)
to ``(name, array, layout)`` triples and hand them to :func:`reinit_many`,
which

1. validates every weight (dtype, layout, finite values, and that its new
   values and report numbers can be represented) before any work, so a
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
   matrices the iteration already formed; the numbers describe the weight
   as written (SFE of the stored weight; DfI after of a float16/bfloat16
   weight from its stored matrices over the factor, so its rounding counts).

Extreme but finite values. The projection itself is right for every finite
input (:mod:`fire_core.polar` scales each matrix by its largest magnitude
first). What may not fit is the result: a new entry can be as large as the
layer's scale factor times the projection's largest singular value (1, or 2
for ``"fast"``), and under ``scale="norm"`` as large as the layer's old
Frobenius norm; and the report's numbers grow as the fourth power of the
weight (DfI before of a float64 weight near 1e160 is about 1e640). The
report is computed in pieces that fit the dtype (``metrics.dfi_split``, a
sum of squares over its largest term) and combined in float64 on the host.
Validation bounds every weight's new entries and report numbers from its
largest magnitude and scale; a weight that must fail is refused there, and
one that might is projected first, its new values checked and held until
every such weight has passed, before anything is written. Under tracing
(``jax.jit``) values are unknown and only the checks that need none run.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Iterable

from ._array import (
    array_namespace,
    dense,
    device_of,
    on_accelerator,
    to_floats,
    whole,
    work_dtype,
)
from .checks import _check_report, _check_risky, _Entry, _Huge, _total, _validate
from .layout import check_scale, from_matrices, parse_layout, scale_factor, to_matrices
from .metrics import dfi_split, gram_dfi, largest_magnitude, small_gram, unit_scale
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
    entries = _validate(weights, context, method=method, steps=steps, scale=scale, report=report)
    rep = Report(method=method, steps=int(steps), scale=scale) if report else None
    pending = {"pieces": {}, "sums": {}}  # layers whose taps span chunks, until their last tap is done
    # Weights whose new values or report numbers might not be representable go first; their new
    # values are checked and held until every one of them has passed, then written.
    held = []
    for risky in (True, False):
        run = [e for e in entries if e.risky == risky]
        for chunk in _chunks(run, chunk_bytes, split_layers=scale != "norm"):
            with context(chunk[0][0].array):
                rows = _run_chunk(
                    chunk, steps, method, scale, (lambda n, a: held.append((n, a))) if risky else write, report, pending
                )
            if report:
                rep.rows.extend(rows)
        for name, new in held:
            write(name, new)
        held.clear()
    if report:
        order = {e.name: k for k, e in enumerate(entries)}
        rep.rows.sort(key=lambda row: order[row["name"]])
    return rep


def host_checked(weights: Iterable[tuple[str, object, str]], *, steps: int = 5, method: str = "fire", scale="fire") -> bool:
    """Check ``weights`` as :func:`reinit_many` does; True if any result must be checked on the host.

    Every problem :func:`reinit_many` would raise before any work (a bad
    dtype, layout or scale, a NaN or Inf value, each naming the weight) is
    raised here, from concrete arrays. The answer says whether some weight's
    new value might not be representable (see :func:`.checks._assess`): such a
    weight's result is checked on the host before it is written, so a call
    holding one cannot run as one compiled program (``jax.jit``), which would
    skip that check. Otherwise ``reinit_many(..., report=False)`` may be
    traced with no check lost: its value checks have all been made here.
    """
    check_method(method, steps)
    check_scale(scale)
    return any(e.risky for e in _validate(list(weights), _no_context, method=method, steps=steps, scale=scale))


def _no_context(array):
    return contextlib.nullcontext()


def _in_context(write, context, arrays):
    """``write`` wrapped to run inside ``context`` of the array it writes."""

    def write_in_context(name, new):
        with context(arrays[name]):
            write(name, new)

    return write_in_context


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
    """Project one chunk of pieces; write (and measure) every layer whose last piece it holds.

    Risky weights (see :func:`.checks._assess`) have their new values checked here
    (on the host) before they are formed, and every chunk's report numbers
    are checked to be finite.
    """
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
    norm_parts = None
    if any(f is None for f in factors):  # "norm": keep each layer's Frobenius norm (whole weights here)
        norm_parts = _norm_factors(xp, res, chunk)
        column = norm_parts[0] * norm_parts[1]
    else:
        column = _per_matrix(xp, factors, chunk, work, dev)
    if any(e.risky for e, _, _ in chunk):
        _check_risky(xp, res, factors, norm_parts, chunk, dtype, scale)
    scaled = res.p * column
    # Measures first: ``batch`` may be a view of a weight that ``write`` overwrites in place.
    if report:
        values, gram = _measures(xp, res, batch, scaled, column, norm_parts, chunk, dtype, work)
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
    total = int(batch.shape[0])
    per_matrix = _report_values(xp, to_floats(values), gram, total, chunk, norm_parts is not None, work, dev)
    rows = []
    for (e, complete, start, stop), factor in zip(done, factors):
        sums = pending["sums"].setdefault(e.name, ([], [], []))
        for k in range(3):  # SFE, DfI before, DfI after of each matrix of the piece
            sums[k].extend(per_matrix[k][start:stop])
        if not complete:
            continue
        del pending["sums"][e.name]
        lay = e.layout
        if factor is None:  # "norm": the factor of the weight's first layer (each layer has its own)
            factor = per_matrix[3][start]
        sfe, before, after = (_total(v) for v in sums)
        _check_report(e.name, dict(zip(("SFE", "DfI before", "DfI after"), sums)))
        rows.append(
            dict(
                name=e.name, shape=lay.shape, layout=lay.text, taps=lay.matrices, n=min(lay.d_out, lay.d_in),
                stack=lay.stack, scale=float(factor), sfe=sfe, dfi_before=before, dfi_after=after,
            )
        )
    return rows


def _norm_factors(xp, res, chunk):
    """``scale="norm"``: each layer's factor ``||W_l||_F / ||P_l||_F`` as two ``(matrices, 1, 1)`` columns.

    Matrix ``t`` has ``||W_t||_F = nu_t / s_t`` (the projection's ``nu`` and
    power-of-two ``scale``), so with ``S = min_t s_t`` (the layer's largest
    matrix) ``||W_l||_F = ||(nu_t S / s_t)_t|| / S``: no square of an entry is
    taken and the ratios of powers of two are exact. The factor is
    ``ratio / S``, ``ratio = ||W_l||_F S / ||P_l||_F`` moderate; the
    validation made sure the product is representable.
    """
    ratios, units, start = [], [], 0
    for e, lo, hi in chunk:
        stop = start + hi - lo
        layers, taps = e.layout.stack, e.layout.taps  # a stacked weight: each of its layers keeps its own
        pn = xp.linalg.vector_norm(xp.reshape(res.p[start:stop, ...], (layers, -1)), axis=1)
        s = xp.reshape(res.scale[start:stop, ...], (layers, taps))
        nu = xp.reshape(res.nu[start:stop, ...], (layers, taps))
        least = xp.min(s, axis=1, keepdims=True)
        on = xp.linalg.vector_norm(nu * (least / s), axis=1)
        ok = pn > 0
        ratio = xp.where(ok, on / xp.where(ok, pn, xp.ones_like(pn)), xp.zeros_like(pn))

        def spread(v):  # one value per layer -> one per matrix
            return xp.reshape(xp.broadcast_to(xp.reshape(v, (layers, 1)), (layers, taps)), (layers * taps, 1, 1))

        ratios.append(spread(ratio))
        units.append(spread(1 / least))
        start = stop
    return xp.concat(ratios, axis=0), xp.concat(units, axis=0)


def _product(factors: list[float], logs: list[float]) -> float:
    """``prod(factors)``, or a :class:`_Huge` with ``sum(logs)`` where the product overflows float64."""
    value = math.prod(factors)
    return value if math.isfinite(value) else _Huge(math.fsum(logs))


def _measures(xp, res, batch, scaled, column, norm_parts, chunk, dtype, work):
    """The device part of SFE, DfI before and DfI after of every matrix of the chunk (see :func:`_report_values`).

    SFE compares the weight as written (rounded to its dtype) with the old
    one; DfI before is taken of the old matrices over the reference scale, from
    the Gram matrix the iteration formed; DfI after of the bare projection as
    written: for a weight stored in its compute dtype (float32, float64) the
    projection itself (its DfI the iteration measured), for a narrower one
    (float16, bfloat16) the stored matrices divided by the factor applied,
    so that the rounding to the stored dtype counts (an exact ``svd`` factor
    in bfloat16 has DfI about 1e-4, not 1e-11).
    Returns the per-matrix numbers, flat, and the Gram matrices of ``old *
    scale`` (the projection's power-of-two ``scale``) for DfI before, whose
    weights :func:`metrics.dfi_split` works out on the host. SFE is summed
    over ``sigma^2``, ``sigma`` a power of two near ``max(amax, |factor|)``
    (a bound on both terms' entries), where the plain sum of squares might
    overflow or underflow (see :func:`.checks._assess`).
    """
    written = scaled if dtype == work else xp.astype(xp.astype(scaled, dtype), work)
    if all(e.plain for e, _, _ in chunk):
        diff = written - batch
        sigma = xp.ones_like(res.amax)
    else:
        sigma = unit_scale(xp.maximum(res.amax, xp.abs(column)), xp)
        diff = written * sigma - batch * sigma
    # the iteration formed the Gram matrix of old * scale; else it is formed here, before any write
    gram = res.gram0 if res.gram0 is not None else small_gram(batch * res.scale, xp)
    dfi_after = res.dfi
    if dtype != work:  # the projection as stored: the written matrices over the factor applied
        nonzero = column != 0  # a zero factor ("norm" on a zero layer) wrote zeros: DfI of zeros
        bare = written / xp.where(nonzero, column, xp.ones_like(column))
        dfi_after = gram_dfi(small_gram(bare, xp), xp, overwrite=True)
    per_matrix = [
        xp.linalg.vector_norm(diff, axis=(-2, -1)) ** 2,  # SFE (times sigma^2) in one pass
        dfi_after,
        *(xp.reshape(v, (-1,)) for v in (res.amax, res.scale, res.nu, sigma)),
    ]
    if norm_parts is not None:
        per_matrix += [xp.reshape(v, (-1,)) for v in norm_parts]
    # DTensor pieces (distributed="replicate") can be left sharded along the matrix axis: gathered whole first
    return xp.reshape(xp.stack([whole(v) for v in per_matrix]), (-1,)), gram


def _report_values(xp, values, gram, total, chunk, norm: bool, work, dev) -> list[list[float]]:
    """SFE, DfI before and DfI after (and the "norm" factor) of each matrix, combined in float64.

    SFE is ``v / sigma^2``. DfI before is ``factor ||weight A - shift I||^2``
    of the Gram matrices ``A`` with :func:`metrics.dfi_split`'s weights,
    formed on the host and applied in one more pass on the device. A number
    beyond float64 is a :class:`_Huge`.
    """
    refs = [scale_factor("fire", e.layout) for e, lo, hi in chunk for _ in range(hi - lo)]
    sfe_v, after, amax, scale, nu, sigma = (values[k * total : (k + 1) * total] for k in range(6))
    splits = [dfi_split(s, v, r) for s, v, r in zip(scale, nu, refs)]
    weight, shift = (xp.reshape(xp.asarray([t[k] for t in splits], dtype=work, device=dev), (-1, 1, 1)) for k in (0, 1))
    d = to_floats(gram_dfi(gram, xp, weight=weight, shift=shift))
    out = [
        [_scaled(v, 1 / s, -math.log10(s)) for s, v in zip(sigma, sfe_v)],
        [_scaled(x, t[2], t[3]) for x, t in zip(d, splits)],
        after,
    ]
    if norm:
        out.append([f * u for f, u in zip(values[6 * total : 7 * total], values[7 * total : 8 * total])])
    return out


def _scaled(v: float, root: float, log10_root: float) -> float:
    """``v root^2`` in float64, or a :class:`_Huge`."""
    if v == 0:
        return 0.0
    return _product([v, root, root], [math.log10(v), 2 * log10_root])


def _per_matrix(xp, factors, chunk, work, dev):
    """Per-layer numbers -> a ``(matrices in chunk, 1, 1)`` column, each repeated over its piece's taps."""
    values = [float(f) for f, (_, lo, hi) in zip(factors, chunk) for _ in range(hi - lo)]
    return xp.reshape(xp.asarray(values, dtype=work, device=dev), (-1, 1, 1))


def measure(
    pairs: Iterable[tuple[str, object, object, str]], *, scale="fire", method=None, steps=None, stages=None
) -> Report:
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
    concrete arrays (two host transfers per weight), not tracers. They are
    computed in pieces that fit the dtype and combined in float64 (as
    :func:`reinit_many` does); a number beyond float64 is a ValueError
    naming the weight.

    ``stages``: the two device computations, :func:`_measure_arrays` and
    :func:`_measure_dfi`, as callables with their signatures; by default
    those functions themselves. The JAX adapter passes them compiled
    (``jax.jit``), one program each per shape instead of one per operation.
    """
    check_scale(scale)
    arrays_stage, dfi_stage = stages or (_measure_arrays, _measure_dfi)
    rep = Report(method=method, steps=steps, scale=scale)
    for name, before, after, layout in pairs:
        xp = array_namespace(before, after)
        work = work_dtype(before, xp, name)
        work_dtype(after, xp, name)
        if tuple(before.shape) != tuple(after.shape):
            raise ValueError(f"{name}: before and after differ in shape, {tuple(before.shape)} vs {tuple(after.shape)}")
        lay = parse_layout(layout, before.shape, name)
        n = min(lay.d_out, lay.d_in)
        # 1. Per matrix: scales, norms, Gram matrices and the squared difference (_measure_arrays).
        values, *grams = arrays_stage(before, after, lay.text, work)
        total = lay.matrices
        values = to_floats(values)
        scale_o, nu_o, scale_n, nu_n, sig, sq = (values[k * total : (k + 1) * total] for k in range(6))
        # 2. The factor the rule applied, per matrix, in float64.
        factor = applied = scale_factor(scale, lay)
        if factor is None:  # "norm": the RMS singular value of `after`, of each stacked layer
            per_layer = []
            for k in range(lay.stack):
                taps = slice(k * lay.taps, (k + 1) * lay.taps)
                least = min(scale_n[taps])
                norm = math.sqrt(math.fsum((v * least / u) ** 2 for u, v in zip(scale_n[taps], nu_n[taps]))) / least
                per_layer.append(norm / math.sqrt(lay.taps * n) or 1.0)
            factors = [f for f in per_layer for _ in range(lay.taps)]
            applied = per_layer[0]
        else:
            factors = [abs(factor) or 1.0] * total
        # 3. DfI of old / ref and of new / factor from the scaled Gram matrices (metrics.dfi_split).
        ref = scale_factor("fire", lay)
        splits = [
            [dfi_split(u, v, b) for u, v, b in zip(s, nu, by)]
            for s, nu, by in ((scale_o, nu_o, [ref] * total), (scale_n, nu_n, factors))
        ]
        cols = [
            xp.reshape(xp.asarray([t[k] for t in split], dtype=work, device=device_of(gram)), (-1, 1, 1))
            for gram, split in zip(grams, splits) for k in (0, 1)
        ]
        d = to_floats(dfi_stage(*grams, *cols))
        terms = {"SFE": [_scaled(v, 1 / u, -math.log10(u)) for u, v in zip(sig, sq)]}
        for k, label in enumerate(("DfI before", "DfI after")):
            terms[label] = [_scaled(x, t[2], t[3]) for x, t in zip(d[k * total : (k + 1) * total], splits[k])]
        _check_report(name, terms)
        sfe, before, after = (_total(v) for v in terms.values())
        rep.rows.append(
            dict(
                name=name, shape=lay.shape, layout=lay.text, taps=lay.matrices, n=n, stack=lay.stack,
                scale=float(applied), sfe=sfe, dfi_before=before, dfi_after=after,
            )
        )
    return rep


def _measure_arrays(before, after, layout: str, work):
    """:func:`measure`'s first device step: ``(values, old Gram, new Gram)`` of one weight's matrices.

    Each matrix is multiplied by a power of two near 1 / its largest
    magnitude (metrics.unit_scale), so its norm and Gram matrix cannot
    overflow. ``values`` holds, per matrix, the old matrix's scale and scaled
    Frobenius norm, the new one's, the common scale ``sigma`` of the
    difference and ``||new sigma - old sigma||_F^2``, in that order.
    """
    xp = array_namespace(before, after)
    old = xp.astype(to_matrices(before, layout), work)
    new = xp.astype(to_matrices(after, layout), work)
    amaxes, scales, nus, grams = [], [], [], []
    for m in (old, new):
        amax = largest_magnitude(m, xp)
        s = unit_scale(amax, xp)
        grams.append(small_gram(m * s, xp))
        nus.append(xp.sqrt(xp.sum(xp.linalg.diagonal(grams[-1]), axis=-1)))  # ||m s||_F
        amaxes.append(amax)
        scales.append(xp.reshape(s, (-1,)))
    sigma = unit_scale(xp.maximum(amaxes[0], amaxes[1]), xp)  # bounds both terms of the difference
    sq = xp.linalg.vector_norm(new * sigma - old * sigma, axis=(-2, -1)) ** 2
    values = xp.concat([scales[0], nus[0], scales[1], nus[1], xp.reshape(sigma, (-1,)), sq])
    return values, grams[0], grams[1]


def _measure_dfi(gram_old, gram_new, weight_old, shift_old, weight_new, shift_new):
    """:func:`measure`'s second device step: per matrix ``||weight A - shift I||_F^2`` of both Gram batches."""
    xp = array_namespace(gram_old, gram_new)
    return xp.concat([gram_dfi(gram_old, xp, weight=weight_old, shift=shift_old),
                      gram_dfi(gram_new, xp, weight=weight_new, shift=shift_new)])
