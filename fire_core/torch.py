"""FIRE on PyTorch models, in place: ``fire_core.torch.apply(model, optimizer=opt)``.

This module only maps an ``nn.Module`` tree onto the core: it finds the layer
weights, names them, picks their layout (see :mod:`fire_core.layout`), hands
``(name, tensor, layout)`` triples to :func:`fire_core.plan.reinit_many`
(which validates, batches and projects them) and copies each result back into
the parameter's own storage. The parameters stay the same objects (same
``id``, storage, ``requires_grad``, device and dtype), so an optimizer or a
compiled graph holding them keeps working.

Default selection (what ``apply`` projects without ``include``):

* ``nn.Linear`` weight (``"oi"``), also when tied to an embedding (as the
  reference code does; exclude the head to keep it);
* ``nn.Conv1d/2d/3d`` weight (``"oiw"``, ``"oihw"``, ``"oidhw"``), each tap on
  its own; a grouped conv's tap is the ``out x in/groups`` matrix stored;
* ``nn.ConvTranspose1d/2d/3d`` weight (``"iow"``, ``"iohw"``, ``"iodhw"``);
* ``nn.MultiheadAttention``: ``in_proj_weight`` as three ``E x E`` blocks
  ``[q]``, ``[k]``, ``[v]``, or ``q/k/v_proj_weight`` when kdim/vdim differ;
  ``out_proj`` is a Linear.

Embeddings, norms, biases and every other parameter are left alone unless a
``layouts`` pattern names them. FSDP2 (DTensor) weights are projected whole
through DTensor's sharded ops and written back into their own shards.
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .conventions import check_patterns, matches
from .metrics import drift
from .plan import reinit_many
from .report import Report

__all__ = ["apply", "reset_optimizer_state"]

_SPATIAL = {1: "w", 2: "hw", 3: "dhw"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_MHA_BLOCKS = ("q", "k", "v")


def apply(
    model: nn.Module,
    steps: int = 5,
    *,
    include=None,
    exclude=None,
    optimizer: torch.optim.Optimizer | None = None,
    method: str = "fire",
    scale="fire",
    split: Mapping[str, int | Iterable[int]] | None = None,
    layouts: Mapping[str, str] | None = None,
    dry_run: bool = False,
    report: bool = True,
    probe=None,
    distributed: str = "owner",
) -> Report:
    """Re-initialize ``model``'s layer weights with FIRE, in place; returns the :class:`Report`.

    Call it at a task boundary, then keep training with the same optimizer::

        report = fire_core.torch.apply(model, optimizer=opt)
        print(report)

    ``steps``, ``method`` (``"fire"``, ``"fast"``, ``"svd"``) and ``scale``
    (``"fire"``, ``"variance"``, ``"norm"``, None, a number) are the core's.

    ``include`` / ``exclude``: glob patterns (a string or a list) matched
    against each weight's dotted name and every module prefix of it, so
    ``"fc"`` or ``"layer2.*"`` select everything under that module; a block's
    full name (``"attn.in_proj_weight[k]"``) also matches literally. Or a
    callable ``(name, tensor) -> bool``. ``include`` narrows the default
    selection (see the module docstring), ``exclude`` removes from it.

    ``split``: ``{pattern: k}`` cuts the matched weights into ``k`` equal
    blocks along their output axis (or ``{pattern: (n1, n2, ...)}`` into
    blocks of those sizes), projected as separate matrices named
    ``name[0]``, ``name[1]``...: the reference projects GPT's fused
    ``c_attn`` as q, k, v this way (``split={"*.c_attn": 3}``).

    ``layouts``: ``{pattern: layout}`` for parameters matched by their full
    dotted name: adds them to the candidates or overrides the default layout
    (a GPT-2 ``Conv1D`` stores ``(in, out)``: ``{"*.c_attn.weight": "io"}``).

    ``optimizer``: the state (moments, step count) of every written parameter
    is dropped, so the optimizer restarts it; other parameters keep theirs.

    ``dry_run``: compute the report (SFE, DfI before/after per weight) and
    change nothing. ``report=False`` measures nothing (no extra Gram matrix,
    no host sync): the returned Report then has no rows.

    ``distributed``: how DTensor (FSDP2) weights are projected; every rank
    must call ``apply`` with the same arguments. ``"owner"`` (the default):
    each weight is gathered whole to one owner rank (owners balanced by
    cost), projected there, and its shards are sent back, so each rank
    projects about ``1/world`` of the model; ``"replicate"``: every rank runs
    the core on the DTensors themselves, through DTensor's sharded ops. Both
    give the unsharded result and the complete report on every rank; see
    ``docs/distributed.md`` (and :mod:`fire_core._distributed_torch` for the
    placements the owner path takes; others go the ``"replicate"`` way).

    ``probe``: inputs to run the model on before and after (a tensor, a tuple
    of positional inputs, or a dict of keyword inputs), under ``no_grad`` in
    the model's current mode. ``Report.drift`` is the relative change of its
    outputs, ``||f_after(x) - f_before(x)||_F / ||f_before(x)||_F``, and each
    row's ``drift`` the same for the output of the module owning the weight
    (the stability of the function, next to SFE, the stability of the
    weights). Buffers (train-mode BatchNorm statistics) are restored after
    each run and both runs draw the same random numbers (dropout masks)
    without advancing the caller's generator. The first run comes before
    anything is written, so a probe that does not fit the model fails with
    nothing changed. With ``dry_run`` the new weights are written for the
    second run and the old ones copied back bit for bit.

    A model with running statistics (BatchNorm) gets a note in
    ``Report.notes``: they describe the old weights; refresh them with
    ``torch.optim.swa_utils.update_bn(loader, model)`` (docs/stability.md).

    Every selected weight is checked before any is written; on an error
    (NaN/Inf weight, bad option, unsupported parametrization, uninitialized
    lazy module) the model and the optimizer are left exactly as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply expects a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None:
        _check_optimizer(optimizer)
    if dry_run and not report:
        raise ValueError("dry_run=True computes the report only; it cannot be combined with report=False")
    if distributed not in ("owner", "replicate"):
        raise ValueError(f"distributed must be 'owner' or 'replicate', got {distributed!r}")
    model = _unwrap(model)
    targets, notes = _select(model, include, exclude, split or {}, layouts or {})
    stats = _stats_note(model) if targets else None
    if stats:
        notes.append(stats)
    if probe is not None:  # first, so that a probe that does not fit fails before anything is written
        owners = _owners(model, targets)
        probed = _run_probe(model, probe, owners)
        saved = [(p, p.detach().clone()) for p in _written(targets)] if dry_run else []
    write = not dry_run or probe is not None  # a dry run with a probe writes, measures and restores

    with _sharded(targets):
        rows, pending = _project(targets, steps, method, scale, not write, report, distributed)
    if write:
        with torch.no_grad():
            for t, values in pending:
                for original, value in zip(t.originals, values):
                    original.detach().copy_(value)
    drift = None
    if probe is not None:
        try:
            after = _run_probe(model, probe, owners)
        finally:
            with torch.no_grad():
                for p, old in saved:
                    p.detach().copy_(old)
        drift = _drifts(probed, after, rows)

    order = {t.name: k for k, t in enumerate(targets)}
    rows.sort(key=lambda row: order[row["name"]])
    if not report:
        notes.append(f"report=False: {len(targets)} weights projected, nothing measured")
    result = Report(
        method=method, steps=int(steps), scale=scale, rows=rows, notes=notes, applied=not dry_run, drift=drift
    )
    if optimizer is not None and not dry_run:
        reset_optimizer_state(optimizer, _written(targets))
    return result


def _written(targets) -> list[torch.Tensor]:
    """The tensors FIRE writes: each plain weight, or a parametrized weight's stored tensors, once."""
    written = {}
    for t in targets:
        for p in t.originals if t.plist is not None else (t.param,):
            written[id(p)] = p
    return list(written.values())


def _project(targets, steps, method, scale, dry_run, report, distributed="owner"):
    """Project everything; write the plain weights, return the values parametrizations must store.

    Parametrized weights are projected first, into buffers: what their
    parametrizations must store is worked out (and checked) before anything
    is written, so a parametrization that cannot hold the result fails cleanly.
    DTensor weights for owner ranks are projected (and checked on every rank)
    before the plain weights and written after them.
    """
    staged = [t for t in targets if t.plist is not None]
    plain = [t for t in targets if t.plist is None]
    rows, pending = [], []
    if staged:
        buffers = {id(t.plist): t.tensor.detach().clone() for t in staged}

        staged_by_name = {t.name: t for t in staged}

        def stage(name, new):
            t = staged_by_name[name]
            buffers[id(t.plist)][t.index].copy_(new)

        with torch.no_grad():
            rep = reinit_many(
                ((t.name, t.tensor.detach()[t.index], t.layout) for t in staged),
                steps=steps, method=method, scale=scale, write=stage, report=report,
            )
        rows += rep.rows if report else []
        done = set()
        for t in staged:
            if id(t.plist) not in done:
                done.add(id(t.plist))
                pending.append((t, _originals_for(t, buffers[id(t.plist)])))

    owner_runs = []
    if distributed == "owner" and "torch.distributed.tensor" in sys.modules:
        from . import _distributed_torch as owners

        plain, axes = owners.split_owned(plain)
        for axis, on_axis in axes.items():
            run = owners.project_owned(
                on_axis, axis, steps=steps, method=method, scale=scale, dry_run=dry_run, report=report
            )
            owner_runs.append(run)
            rows += run.rows

    plain_by_name = {t.name: t for t in plain}
    written = []

    def write(name, new):
        if not dry_run:
            t = plain_by_name[name]
            _write_block(t.param.detach(), t.index, new)
            written.append(name)

    try:
        with torch.no_grad():
            rep = reinit_many(
                ((t.name, t.param.detach()[t.index], t.layout) for t in plain),
                steps=steps, method=method, scale=scale, write=write, report=report,
            )
    except BaseException as e:  # out of memory, an interrupt: say what has already changed
        if written:
            shown = ", ".join(written[:3]) + (", ..." if len(written) > 3 else "")
            e.add_note(
                f"fire_core.torch.apply stopped after writing {len(written)} of {len(plain)} weights ({shown}): "
                "those hold their new values; the other weights and the optimizer state are unchanged"
            )
        raise
    rows += rep.rows if report else []
    for run in owner_runs:
        run.commit()
    return rows, pending


def _write_block(weight, index, new) -> None:
    """``weight[index] = new`` in place, also for a DTensor weight (``distributed="replicate"``).

    A slice of a DTensor along a sharded axis is a new, redistributed
    tensor, not a view, so a block (a q/k/v part) of a sharded weight is
    written into a replicated copy of the whole weight, which is then copied
    back in the weight's own placements; and DTensors copy in place only
    between equal placements.
    """
    placements = getattr(weight, "placements", None)
    if placements is None:
        weight[index].copy_(new)
        return
    from torch.distributed.tensor import Replicate

    mesh = weight.device_mesh
    if index:
        whole = weight.redistribute(mesh, [Replicate()] * mesh.ndim)
        whole[index].copy_(new.redistribute(mesh, whole.placements) if new.placements != whole.placements else new)
        new, index = whole, ()
    weight.copy_(new.redistribute(mesh, placements) if new.placements != placements else new)


def _sharded(targets):
    """DTensor (FSDP2) weights: let the core's plain constants act as replicated DTensors.

    The core's matmuls then run on whole matrices through DTensor's sharded
    ops (never shard by shard), and every rank gets the same result.
    """
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.experimental import implicit_replication

        if any(isinstance(t.tensor, DTensor) for t in targets):
            return implicit_replication()
    return contextlib.nullcontext()


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Drop the optimizer state (moments, step count...) of exactly ``params``; returns how many had state.

    Works for any ``torch.optim.Optimizer`` (its ``state`` is keyed by
    parameter): the next ``step`` starts those parameters' state afresh, as
    for new parameters, and every other parameter keeps its state.
    """
    _check_optimizer(optimizer)
    params = list(params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"reset_optimizer_state expects tensors, got {type(p).__name__}")
    dropped = 0
    for p in params:
        if optimizer.state.pop(p, None) is not None:
            dropped += 1
    return dropped


# --- finding the weights -------------------------------------------------------------


@dataclass
class _Target:
    """One matrix stack to project: a whole weight or one block of a fused one."""

    name: str  # report name: "fc.weight", "attn.in_proj_weight[q]"
    param_name: str  # dotted name of the weight as the module exposes it
    tensor: torch.Tensor  # the weight as the module sees it (computed, if parametrized)
    layout: str
    index: tuple  # where the block sits in the weight (all of it: ())
    param: torch.Tensor | None  # the parameter written (None if parametrized)
    plist: object = None  # the ParametrizationList, if parametrized
    originals: tuple = ()  # its stored tensors, if parametrized


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile (``_orig_mod``) and (Distributed)DataParallel (``.module``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _default_weights(mod: nn.Module) -> dict[str, tuple[str, tuple | None]]:
    """attr -> (layout, default block labels) for the module types FIRE covers."""
    if isinstance(mod, nn.MultiheadAttention):
        if mod.in_proj_weight is not None or parametrize.is_parametrized(mod, "in_proj_weight"):
            return {"in_proj_weight": ("oi", _MHA_BLOCKS)}
        return {a: ("oi", None) for a in ("q_proj_weight", "k_proj_weight", "v_proj_weight")}
    if isinstance(mod, nn.Linear):
        return {"weight": ("oi", None)}
    for kinds, features in ((_CONV, "oi"), (_CONV_T, "io")):
        if isinstance(mod, kinds):
            dims = len(mod.kernel_size)
            return {"weight": (features + _SPATIAL[dims], None)}
    return {}


def _selector(spec, what: str):
    """include/exclude spec -> (callable(name, param_name, tensor) -> bool, patterns or None)."""
    spec = check_patterns(spec, what)
    if spec is None:
        return None, None
    if callable(spec):
        return (lambda name, param_name, tensor: bool(spec(name, tensor))), None
    return (lambda name, param_name, tensor: matches(spec, param_name, target_name=name)), spec


def _select(model, include, exclude, split, layouts):
    """The weights to project, in model order, and notes for the report."""
    inc, inc_patterns = _selector(include, "include")
    exc, _ = _selector(exclude, "exclude")
    for pat, lay in layouts.items():
        if not isinstance(pat, str) or not isinstance(lay, str):
            raise TypeError(f"layouts must map glob strings to layout strings, got {pat!r}: {lay!r}")
    for pat, spec in split.items():
        if not isinstance(pat, str):
            raise TypeError(f"split keys must be glob strings, got {pat!r}")
        _check_split(spec, pat)
    _refuse_wrappers(model)

    targets, notes, seen, spans = [], [], set(), []
    used_layouts, used_splits, used_include = set(), set(), set()
    for param_name, mod, attr, layout, blocks in _candidates(model, layouts, used_layouts):
        for pat, spec in split.items():
            if matches([pat], param_name):
                blocks = spec
                used_splits.add(pat)
        plist = mod.parametrizations[attr] if parametrize.is_parametrized(mod, attr) else None
        tensor = mod._parameters.get(attr) if plist is None else None
        if plist is None and tensor is None:  # an optional weight that is None, or one a hook computes
            if _selected(inc, exc, param_name, param_name, tensor):
                _refuse_hooks(mod, param_name)
            continue
        if isinstance(tensor, nn.parameter.UninitializedParameter):
            if _selected(inc, exc, param_name, param_name, tensor):
                raise ValueError(
                    f"{param_name}: is an uninitialized lazy parameter; run one forward pass to materialize "
                    "the model before FIRE"
                )
            continue
        key = id(plist if plist is not None else tensor)
        if key in seen:
            continue  # tied: projected once, under its first name
        span = _span(tensor) if plist is None else None
        if span is not None and _tied_by_memory(span, spans, param_name):
            continue  # another Parameter viewing the same memory the same way: tied too
        originals = ()
        if plist is not None:
            # Refusals first (computing a spectral-normed weight updates its buffers),
            # and only for a selected weight; the stored tensor stands in for it here.
            stored = _stored_tensors(plist)
            problem = _parametrization_problem(plist, param_name)
            if problem:
                if _selected(inc, exc, param_name, param_name, stored[-1]):
                    raise ValueError(problem)
                continue
            originals = stored
            with torch.no_grad():
                tensor = getattr(mod, attr)  # the weight the module computes
        chosen = []
        for name, index in _blocks(param_name, tensor, layout, blocks):
            if _selected(inc, exc, name, param_name, tensor):
                chosen.append((name, index))
                used_include.update(p for p in inc_patterns or () if matches([p], param_name, target_name=name))
        if not chosen:
            continue
        seen.add(key)
        if span is not None:
            spans.append((*span, param_name))
        _refuse_hooks(mod, param_name)
        for name, index in chosen:
            param = tensor if plist is None else None
            targets.append(_Target(name, param_name, tensor, layout, index, param, plist, originals))

    for pat in layouts:
        if pat not in used_layouts:
            raise ValueError(f"layouts pattern {pat!r} matches no parameter of the model")
    for pat in split:
        if pat not in used_splits:
            raise ValueError(f"split pattern {pat!r} matches no weight FIRE would project")
    for pat in inc_patterns or ():
        if pat not in used_include:
            notes.append(f"note: include pattern {pat!r} matched no weight")
    return targets, notes


def _span(t: torch.Tensor):
    """``(storage address, first byte, end byte, view)`` of a tensor's memory; None where there is none to see.

    The bytes are the extent of the strided view, from its first element to
    one past its last. Meta tensors and tensor subclasses without a storage
    of their own (DTensor) report none.
    """
    try:
        address = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if address == 0 or t.numel() == 0:
        return None
    size = t.element_size()
    start = t.storage_offset() * size
    end = start + (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))) * size
    return address, start, end, (tuple(t.shape), t.stride(), t.dtype)


def _tied_by_memory(span, spans, param_name: str) -> bool:
    """True if an already chosen weight is the same view of the same memory; an error if it overlaps otherwise."""
    address, start, end, view = span
    for other_address, other_start, other_end, other_view, other_name in spans:
        if other_address != address or end <= other_start or other_end <= start:
            continue
        if (start, view) == (other_start, other_view):
            return True
        raise ValueError(
            f"{param_name}: shares memory with {other_name} without being the same weight "
            "(an overlapping view); FIRE cannot project one without changing the other"
        )
    return False


def _candidates(model, layouts, used_layouts):
    """(param_name, module, attr, layout, blocks) for every weight FIRE could project, in model order."""
    for prefix, mod in model.named_modules():
        if isinstance(mod, parametrize.ParametrizationList):
            continue  # its tensors are reached through the parametrized module
        defaults = _default_weights(mod)
        attrs = dict.fromkeys(list(mod._parameters) + list(getattr(mod, "parametrizations", {}) or {}) + list(defaults))
        for attr in attrs:
            param_name = f"{prefix}.{attr}" if prefix else attr
            layout, blocks = defaults.get(attr, (None, None))
            for pat, lay in layouts.items():
                if fnmatch.fnmatchcase(param_name, pat):
                    layout, blocks = lay, None
                    used_layouts.add(pat)
            if layout is not None:
                yield param_name, mod, attr, layout, blocks


def _selected(inc, exc, name, param_name, tensor) -> bool:
    if inc is not None and not inc(name, param_name, tensor):
        return False
    return not (exc is not None and exc(name, param_name, tensor))


def _check_split(spec, what) -> None:
    """A split value: a block count, or a sequence of block sizes."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"split[{what!r}] must be at least 1, got {spec}")
        return
    if isinstance(spec, (tuple, list)) and spec and all(isinstance(s, int) and not isinstance(s, bool) for s in spec):
        if any(s < 1 for s in spec):
            raise ValueError(f"split[{what!r}] block sizes must be positive, got {spec!r}")
        return
    raise TypeError(f"split[{what!r}] must be a block count or a sequence of block sizes, got {spec!r}")


def _blocks(param_name, tensor, layout, blocks) -> list[tuple[str, tuple]]:
    """(name, index) of the blocks a weight is projected as, cut along its first output axis.

    ``blocks`` is None or 1 (the whole weight), a count of equal blocks, a
    tuple of block sizes, or a tuple of labels of equal blocks (q, k, v).
    """
    if blocks is None or blocks == 1:
        return [(param_name, ())]
    shape = tuple(tensor.shape)
    if len(layout) != len(shape):
        raise ValueError(f"{param_name}: layout {layout!r} does not fit the weight of shape {shape}")
    axis = layout.index("o")
    size = shape[axis]
    if isinstance(blocks, int) or all(isinstance(b, str) for b in blocks):
        count = blocks if isinstance(blocks, int) else len(blocks)
        if size % count:
            raise ValueError(f"{param_name}: cannot split {size} output features into {count} equal blocks (shape {shape})")
        sizes = (size // count,) * count
        labels = [str(j) for j in range(count)] if isinstance(blocks, int) else list(blocks)
    else:
        sizes, labels = tuple(blocks), [str(j) for j in range(len(blocks))]
        if sum(sizes) != size:
            raise ValueError(
                f"{param_name}: split sizes {sizes} sum to {sum(sizes)}, but the weight has {size} output features "
                f"(shape {shape})"
            )
    out, start = [], 0
    for label, s in zip(labels, sizes):
        out.append((f"{param_name}[{label}]", (slice(None),) * axis + (slice(start, start + s),)))
        start += s
    return out


# --- refusals ------------------------------------------------------------------------


def _refuse_wrappers(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        if type(mod).__name__ == "FullyShardedDataParallel":
            raise TypeError(
                f"{name or 'model'}: FSDP (FullyShardedDataParallel) flattens parameters into shards; "
                "use FSDP2 (torch.distributed.fsdp.fully_shard) or apply FIRE to the unwrapped model"
            )


def _refuse_hooks(mod: nn.Module, param_name: str) -> None:
    """Hook-based spectral_norm / weight_norm recompute ``weight`` from other tensors each forward."""
    for hook in mod._forward_pre_hooks.values():
        kind = type(hook).__name__
        if kind == "SpectralNorm":
            raise ValueError(
                f"{param_name}: the module uses spectral_norm, which divides the weight by its top singular "
                "value and so would undo FIRE's scale; remove it (torch.nn.utils.remove_spectral_norm) or exclude "
                "the layer"
            )
        if kind == "WeightNorm":
            raise ValueError(
                f"{param_name}: the module uses the hook-based torch.nn.utils.weight_norm, which FIRE cannot write "
                "through; use torch.nn.utils.parametrizations.weight_norm (supported) or exclude the layer"
            )


def _parametrization_problem(plist, param_name: str) -> str | None:
    """Why FIRE cannot write through this parametrization, or None."""
    for p in plist:
        kind = type(p).__name__
        if kind == "_SpectralNorm":
            return (
                f"{param_name}: is parametrized with spectral_norm, which divides the weight by its top singular "
                "value and so would undo FIRE's scale; remove the parametrization "
                "(torch.nn.utils.parametrize.remove_parametrizations) or exclude the layer"
            )
        if not hasattr(p, "right_inverse"):
            return (
                f"{param_name}: parametrization {kind} has no right_inverse, so FIRE cannot write the new weight "
                "through it; add right_inverse, remove the parametrization, or exclude the layer"
            )
    return None


def _stored_tensors(plist) -> tuple:
    """The tensors a ParametrizationList stores: ``original``, or ``original0``, ``original1``..."""
    if plist.is_tensor:
        return (plist.original,)
    count = 0
    while hasattr(plist, f"original{count}"):
        count += 1
    return tuple(getattr(plist, f"original{k}") for k in range(count))


def _originals_for(t: _Target, new: torch.Tensor) -> tuple:
    """What the parametrization must store so that it yields ``new``; checked, nothing written."""
    with torch.no_grad():
        value = new
        try:
            for p in reversed(t.plist):
                value = p.right_inverse(value)
        except Exception as err:
            raise ValueError(f"{t.param_name}: the parametrization's right_inverse failed on the FIRE weight: {err}") from err
        values = (value,) if isinstance(value, torch.Tensor) else tuple(value)
        if len(values) != len(t.originals) or any(
            v.shape != o.shape or v.dtype != o.dtype for v, o in zip(values, t.originals)
        ):
            raise ValueError(f"{t.param_name}: the parametrization's right_inverse does not match its stored tensors")
        first, *rest = list(t.plist)
        back = first(*values) if len(values) > 1 else first(values[0])
        for p in rest:
            back = p(back)
        tol = 8 * torch.finfo(new.dtype).eps * float(new.abs().max()) + torch.finfo(new.dtype).tiny
        if back.shape != new.shape or not float((back - new).abs().max()) <= tol:  # NaN fails too
            raise ValueError(
                f"{t.param_name}: its parametrization ({', '.join(type(p).__name__ for p in t.plist)}) does not "
                "reproduce the FIRE weight from its right_inverse, so the result cannot be written through it; "
                "remove the parametrization or exclude the layer"
            )
    return values


def _check_optimizer(optimizer) -> None:
    state = getattr(optimizer, "state", None)
    if not hasattr(state, "pop") or not hasattr(optimizer, "param_groups"):
        raise TypeError(f"expected a torch.optim.Optimizer (with .state keyed by parameter), got {type(optimizer).__name__}")


# --- probe (function drift) and normalization statistics -------------------------------


def _probe_args(probe) -> tuple[tuple, dict]:
    """``probe`` -> (args, kwargs) for ``model(*args, **kwargs)``: a tensor, a tuple of inputs, or a dict of keyword inputs."""
    if isinstance(probe, torch.Tensor):
        return (probe,), {}
    if isinstance(probe, tuple):
        return probe, {}
    if isinstance(probe, Mapping):
        return (), dict(probe)
    raise TypeError(f"probe must be a tensor, a tuple of inputs or a dict of keyword inputs, got {type(probe).__name__}")


def _float_tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors in a module's output (a tensor, or nested tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _float_tensors(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _float_tensors(o)]
    return []


def _owners(model: nn.Module, targets) -> dict[str, nn.Module]:
    """Report name -> the module that owns the weight (whose output the per-layer drift compares)."""
    out = {}
    for t in targets:
        prefix = t.param_name.rpartition(".")[0]
        out[t.name] = model.get_submodule(prefix) if prefix else model
    return out


def _run_probe(model: nn.Module, probe, owners: dict[str, nn.Module]):
    """The model's outputs on the probe and each owner module's outputs, leaving no trace.

    Runs under ``no_grad`` in the model's current mode. Buffers (BatchNorm
    running statistics in train mode) are restored afterwards and the random
    number generators are forked, so two calls see the same dropout masks
    and the caller's RNG state is not advanced.
    """
    args, kwargs = _probe_args(probe)
    modules = {id(m): m for m in owners.values()}
    captured: dict[int, list] = {k: [] for k in modules}

    def hook(mod, inputs, output):  # cloned: a later in-place op (ReLU(inplace=True)) must not change it
        captured[id(mod)].extend(t.detach().clone() for t in _float_tensors(output))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            out = [t.detach().clone() for t in _float_tensors(model(*args, **kwargs))]
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return out, {name: captured[id(m)] for name, m in owners.items()}


def _stats_note(model: nn.Module) -> str | None:
    """A note naming the modules with running statistics (BatchNorm), which FIRE leaves stale."""
    names = [
        name or type(mod).__name__
        for name, mod in model.named_modules()
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats and mod.running_mean is not None
    ]
    if not names:
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"note: running statistics of {shown} were measured with the old weights and no longer match; refresh them "
        "with torch.optim.swa_utils.update_bn(loader, model) before evaluating in eval mode (docs/stability.md)"
    )


def _drifts(before, after, rows) -> float:
    """The model's output drift; each row gets the drift of its owning module's output (None if it never ran)."""
    (out_before, layers_before), (out_after, layers_after) = before, after
    for row in rows:
        b, a = layers_before.get(row["name"]), layers_after.get(row["name"])
        row["drift"] = drift(b, a) if b and len(a) == len(b) else None
    return drift(out_before, out_after)
