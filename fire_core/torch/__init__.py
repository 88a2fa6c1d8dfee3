"""FIRE on PyTorch models, in place: ``fire_core.torch.apply(model, optimizer=opt)``.

This module only maps an ``nn.Module`` tree onto the core: it finds the layer
weights, names them, picks their layout (see :mod:`fire_core.layout`), hands
``(name, tensor, layout)`` triples to :func:`fire_core.plan.reinit_many`
(which validates, batches and projects them) and copies each result back into
the parameter's own storage. The parameters stay the same objects (same
``id``, storage, ``requires_grad``, device and dtype), so an optimizer or a
compiled graph holding them keeps working.

What each module type holds is one table, :data:`MODULE_TABLE`: the module
type, its weights, their layout, how they split into blocks, and why a weight
is left alone. Selection reads it, and the report's ``skipped`` reasons are
written from it:

* ``nn.Linear`` ``weight`` (``"oi"``), also when tied to an embedding (as the
  reference code does; exclude either name to keep it). A Linear named
  ``c_attn``, ``qkv`` or ``qkv_proj`` is a fused q/k/v projection and is
  projected as its blocks ``[q]``, ``[k]``, ``[v]`` (sizes read from the
  attention module or its config: grouped-query attention has smaller k and
  v); ``gate_up_proj`` as ``[gate]``, ``[up]``;
* Hugging Face ``Conv1D`` (GPT-2; weight stored ``(in, out)``): ``"io"``,
  fused the same way;
* ``nn.Conv1d/2d/3d`` weight (``"oiw"``, ``"oihw"``, ``"oidhw"``), each tap on
  its own; a grouped conv's tap is the ``out x in/groups`` matrix stored (the
  reference's treatment), or each group's own with ``conv_groups="each"``;
* ``nn.ConvTranspose1d/2d/3d`` weight (``"iow"``, ``"iohw"``, ``"iodhw"``);
* ``nn.MultiheadAttention``: ``in_proj_weight`` as three ``E x E`` blocks
  ``[q]``, ``[k]``, ``[v]``, or ``q/k/v_proj_weight`` when kdim/vdim differ;
  ``out_proj`` is a Linear;
* ``nn.RNN/LSTM/GRU`` (every layer and direction) and their cells:
  ``weight_ih*`` and ``weight_hh*`` per gate block (LSTM ``[i]``, ``[f]``,
  ``[g]``, ``[o]``; GRU ``[r]``, ``[z]``, ``[n]``; RNN one block),
  ``weight_hr*`` (``proj_size``) whole.

PEFT tuner layers (``peft``'s ``BaseTunerLayer``: LoRA and the others) are
one row: the base layer inside is read as the layer it wraps (a LoRA'd
``c_attn`` base still splits into q, k, v; frozen, so only ``frozen=True``
projects it), and the adapter weights (LoRA's ``lora_A``, ``lora_B``,
``lora_embedding_A/B``) are left alone unless ``adapters="project"``.

Left alone, each listed in ``Report.skipped`` with its reason: embeddings,
``nn.Bilinear``, quantized modules, PEFT adapter weights, parameters of other module types (unless a
``layouts`` pattern names them), frozen weights (``requires_grad=False``;
``frozen=True`` projects them), empty weights, and what ``include`` /
``exclude`` leave out. FSDP2 (DTensor) weights are projected whole through
DTensor's sharded ops and written back into their own shards.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune

from .._array import sum_over_mesh, to_floats
from ..conventions import Patterns, glob_match, matches
from ..metrics import drift
from ..plan import reinit, reinit_many
from ..report import Report

__all__ = [
    "apply", "select", "check_options", "SELECTION_OPTIONS", "activations", "activation_modules", "reset_optimizer_state",
    "MODULE_TABLE",
]

_SPATIAL = {1: "w", 2: "hw", 3: "dhw"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_GROUPS = ("stored", "each")
_ADAPTERS = ("skip", "project")
_WRAPPERS = ("_orig_mod", "module")  # torch.compile; (Distributed)DataParallel


def apply(
    model: nn.Module,
    steps: int = 5,
    *,
    include=None,
    exclude=None,
    optimizer=None,
    method: str = "fire",
    scale="fire",
    split: Mapping[str, int | Iterable[int]] | None = None,
    layouts: Mapping[str, str | None] | None = None,
    frozen: bool = False,
    conv_groups: str = "stored",
    adapters: str = "skip",
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

    ``include`` / ``exclude``: glob patterns (a string or a list; ``*`` and
    ``?`` are wildcards, brackets are literal) matched against each weight's
    dotted name and every module prefix of it, so ``"fc"`` or ``"layer2.*"``
    select everything under that module, and a name copied from the report
    (``"attn.in_proj_weight[k]"``) selects exactly that block. Every name of
    a weight counts: the names of a tied weight, and the ``state_dict()``
    names of the wrapped model (``module.fc`` under DDP/DataParallel,
    ``_orig_mod.fc`` under ``torch.compile``). Or a callable
    ``(name, tensor) -> bool``. ``include`` narrows the default selection
    (see the module docstring), ``exclude`` removes from it. A pattern that
    matches no weight of two or more dimensions is a ValueError naming the
    closest names; so is a call that selects no weight at all.

    ``split``: ``{pattern: k}`` cuts the matched weights into ``k`` equal
    blocks along their output axis (or ``{pattern: (n1, n2, ...)}`` into
    blocks of those sizes), projected as separate matrices named
    ``name[0]``, ``name[1]``...; ``{pattern: 1}`` projects a weight whole
    that would be split by default (a fused ``c_attn``, an RNN's gates).

    ``layouts``: ``{pattern: layout}`` for parameters matched by their full
    dotted name: adds them to the candidates (an embedding, a custom
    module's weight), overrides the default layout, or with ``None`` leaves
    them alone.

    ``frozen``: weights with ``requires_grad=False`` (a LoRA base, a frozen
    backbone) cannot re-learn, so by default they are left alone (listed in
    ``Report.skipped``); ``frozen=True`` projects them too.

    ``conv_groups``: ``"stored"`` (default, the reference's treatment)
    projects each tap's stored ``out x in/groups`` matrix of a grouped or
    depthwise conv, all groups in one matrix; ``"each"`` projects each
    group's ``(out/groups) x (in/groups)`` matrices on their own (layout
    ``"Goihw"``: a stack of groups), scaled per group. The report row's
    ``note`` says which was done.

    ``adapters``: what to do with the adapter weights of PEFT tuner layers
    (``peft.get_peft_model``). ``"skip"`` (default) leaves them alone, each
    named in ``Report.skipped`` with why: projected on its own, LoRA's
    ``lora_B`` (zero at initialization by design) would get singular values
    ``sqrt(out/r)`` and the adapter's ``s*B*A`` would jump to spectral norm
    ``(alpha/r) sqrt(out/in)``, larger than most frozen weights it adds to.
    Merge first (``model.merge_and_unload()``, then FIRE the merged model,
    whose weights peft leaves frozen: ``frozen=True``), or reset the adapter
    (``layer.reset_lora_parameters(name, True)``). ``"project"`` projects
    LoRA's factors anyway, each as the Linear (or conv) matrix it is
    (``lora_A`` ``r x in``, ``lora_B`` ``out x r``, layout ``"oi"``;
    ``lora_B`` of a fused ``c_attn`` cut into its q, k, v blocks), with a
    report note on what that does to ``s*B*A``; other tuners' weights (LoHa,
    IA3, ...) stay left alone (``layouts=`` projects any of them). The base
    weight inside a LoRA layer is frozen, so ``frozen=True`` projects it,
    read as the layer it wraps, the adapter's change still added on top.

    ``optimizer``: a ``torch.optim.Optimizer`` or a list of them. The state
    (moments, step count) of every written parameter is dropped, so the
    optimizer restarts it; other parameters keep theirs. ``LBFGS`` keeps one
    history for all its parameters, which is dropped whole. Written
    parameters' ``.grad`` are set to None (a stale gradient of the old weight
    would otherwise be applied to the new one).

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
    ``docs/distributed.md`` (and :mod:`fire_core.torch._distributed` for the
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
    (NaN/Inf weight, bad option, unsupported parametrization, pruned or
    uninitialized lazy module, a meta, sparse or inference-mode tensor) the
    model and the optimizer are left exactly as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply expects a torch.nn.Module, got {type(model).__name__}")
    optimizers = _optimizers(optimizer)
    if dry_run and not report:
        raise ValueError("dry_run=True computes the report only; it cannot be combined with report=False")
    _check_distributed(distributed)
    model, options = _options(model, include, exclude, split, layouts, frozen, conv_groups, adapters)
    targets, skipped, notes = _select(model, options)
    stats = _stats_note(model)
    if stats:
        notes.append(stats)
    if probe is not None:  # first, so that a probe that does not fit fails before anything is written
        owners = _owners(model, targets)
        probed = _run_probe(model, probe, owners)
        saved = [(p, p.detach().clone()) for p in _written(targets)] if dry_run else []
    write = not dry_run or probe is not None  # a dry run with a probe writes, measures and restores
    _agree_on_plain_weights(targets)

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
        drift = _drifts(probed, after, rows, targets)

    by_name = {t.name: t for t in targets}
    order = {t.name: k for k, t in enumerate(targets)}
    rows.sort(key=lambda row: order[row["name"]])
    for row in rows:
        t = by_name[row["name"]]
        if t.aliases:
            row["aliases"] = list(t.aliases)
        if t.note:
            row["note"] = t.note
    if not report:
        notes.append(f"report=False: {len(targets)} weights projected, nothing measured")
    result = Report(
        method=method, steps=int(steps), scale=scale, rows=rows, notes=notes, applied=not dry_run, drift=drift,
        skipped=skipped, measured=bool(report), projected=len(targets),
    )
    if not dry_run:
        written = _written(targets)
        for p in written:
            p.grad = None  # a gradient of the old weight, which the next step would apply to the new one
        for opt in optimizers:
            reset_optimizer_state(opt, written)
    return result


def select(
    model: nn.Module,
    *,
    include=None,
    exclude=None,
    split: Mapping[str, int | Iterable[int]] | None = None,
    layouts: Mapping[str, str | None] | None = None,
    frozen: bool = False,
    conv_groups: str = "stored",
    adapters: str = "skip",
) -> list[tuple[str, torch.Tensor, str]]:
    """The weights :func:`apply` would project, as ``(report name, tensor, layout)``, changing nothing.

    Takes :func:`apply`'s selection arguments and raises its selection
    errors. Each tensor is the block the core would get (detached: a view
    of the weight, or of its computed value if parametrized), so
    ``fire_core.schedule.target_dfi(tensor, layout)`` measures what FIRE
    would act on; the schedule's data-free trigger reads the weights this way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"select expects a torch.nn.Module, got {type(model).__name__}")
    model, options = _options(model, include, exclude, split, layouts, frozen, conv_groups, adapters)
    targets, _, _ = _select(model, options)
    return [(t.name, t.given(t.tensor.detach()), t.layout) for t in targets]


SELECTION_OPTIONS = ("include", "exclude", "split", "layouts", "frozen", "conv_groups", "adapters")  # select()'s, and apply's


def check_options(options: Mapping, *, taken: Mapping[str, str], who: str) -> dict:
    """:func:`apply`'s keyword ``options`` as a training integration takes them, checked without a model.

    ``taken``: the arguments of :func:`apply` the integration fills in
    itself, each with why (``{"optimizer": "the callback resets every
    optimizer the trainer holds"}``); ``model`` always is. A name that is
    taken or unknown is a TypeError naming it; a bad value of ``steps``,
    ``method``, ``scale`` (tried on a 2 x 2 weight), ``distributed``,
    ``frozen``, ``conv_groups``, ``adapters`` or of the patterns' types is :func:`apply`'s
    own error, raised at construction instead of at the first firing.
    Returns the selection options (for :func:`select`). ``who`` starts each
    message (``"FIRE"``).
    """
    allowed = [k for k in inspect.signature(apply).parameters if k != "model" and k not in taken]
    for name in options:
        if name in taken:
            raise TypeError(f"{who}: {name}= is not an option here: {taken[name]}")
        if name not in allowed:
            raise TypeError(f"{who}: unknown option {name}=; fire_core.torch.apply takes {', '.join(allowed)}")
    core = {k: options[k] for k in ("steps", "method", "scale") if k in options}
    if core:
        reinit(torch.eye(2, dtype=torch.float64), "oi", **core)
    distributed = options.get("distributed", "owner")
    _check_distributed(distributed)
    selection = {k: options[k] for k in SELECTION_OPTIONS if k in options}
    _options(nn.Module(), *(selection.get(k) for k in ("include", "exclude", "split", "layouts")),
             selection.get("frozen", False), selection.get("conv_groups", "stored"), selection.get("adapters", "skip"))
    return selection


def _check_distributed(distributed) -> None:
    if distributed not in ("owner", "replicate"):
        raise ValueError(f"distributed must be 'owner' or 'replicate', got {distributed!r}")


def _options(model, include, exclude, split, layouts, frozen, conv_groups, adapters="skip") -> tuple[nn.Module, "_Options"]:
    """The unwrapped model and the checked selection options of :func:`apply` and :func:`select`."""
    if conv_groups not in _CONV_GROUPS:
        raise ValueError(f"conv_groups must be one of {_CONV_GROUPS}, got {conv_groups!r}")
    if adapters not in _ADAPTERS:
        raise ValueError(f"adapters must be one of {_ADAPTERS}, got {adapters!r}")
    if not isinstance(frozen, bool):
        raise TypeError(f"frozen must be True or False, got {frozen!r}")
    model, wrappers = _unwrap(model)
    return model, _Options(
        include=Patterns(include, "include"),
        exclude=Patterns(exclude, "exclude"),
        split=_check_splits(split),
        layouts=_check_layouts(layouts),
        frozen=frozen,
        conv_groups=conv_groups,
        adapters=adapters,
        wrappers=wrappers,
    )


def _written(targets) -> list[torch.Tensor]:
    """The tensors FIRE writes: each plain weight (and the Parameters tied to it by memory), or a
    parametrized weight's stored tensors, once."""
    written = {}
    for t in targets:
        for p in t.originals if t.plist is not None else (t.param, *t.tied):
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
            block = buffers[id(t.plist)][t.index]
            block.copy_(new.reshape(block.shape))

        with torch.no_grad():
            rep = reinit_many(
                ((t.name, t.given(t.tensor.detach()), t.layout) for t in staged),
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
        from . import _distributed as owners

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
            _write_block(t.param.detach(), t.index, new if t.view is None else new.reshape(t.block_shape))
            written.append(name)

    try:
        with torch.no_grad():
            rep = reinit_many(
                ((t.name, t.given(t.param.detach()), t.layout) for t in plain),
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


def _agree_on_plain_weights(targets) -> None:
    """With DTensor weights in the call, all ranks agree on the plain weights' values before any work.

    Each rank validates its own copy of a plain weight (one a TP plan left
    out, say). A NaN in one rank's copy alone would make that rank raise and
    the others wait in the next collective; so each rank tests its copies,
    the verdicts are summed over the first DTensor's mesh, and every rank
    raises the same error naming the first bad weight. One small all-reduce
    per mesh dimension, and only when DTensors are present.
    """
    if "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import DTensor

    mesh = next((t.tensor.device_mesh for t in targets if isinstance(t.tensor, DTensor)), None)
    plain = [t for t in targets if not isinstance(t.tensor, DTensor)]
    if mesh is None or not plain:
        return
    device = next(t.tensor.to_local().device for t in targets if isinstance(t.tensor, DTensor))
    bad = torch.zeros(len(plain), dtype=torch.int64, device=device)
    for k, t in enumerate(plain):
        w = t.tensor.detach()[t.index]
        if w.is_floating_point() and w.numel() and not bool(torch.isfinite(w).all()):
            bad[k] = 1
    sum_over_mesh(bad, mesh)
    found = bad.nonzero().flatten().tolist()
    if found:
        t = plain[found[0]]
        raise ValueError(
            f"{t.name}: contains NaN or Inf in the copy held by {int(bad[found[0]])} of the {mesh.size()} ranks "
            "(a plain, unsharded weight in a call with DTensor weights); nothing was changed on any rank"
        )


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


# --- optimizers ----------------------------------------------------------------------


def reset_optimizer_state(optimizer, params: Iterable[torch.Tensor]) -> int:
    """Drop the optimizer state (moments, step count...) of exactly ``params``; returns how many states were dropped.

    ``optimizer`` is a ``torch.optim.Optimizer`` or a list of them. Works for
    any optimizer whose ``state`` is keyed by parameter: the next ``step``
    starts those parameters' state afresh, as for new parameters, and every
    other parameter keeps its state. ``torch.optim.LBFGS`` keeps one joint
    history (directions, step sizes, the previous gradient) for all its
    parameters, held in the state of its first: when any of ``params`` is
    one of its parameters that whole history is dropped (counted once),
    since a history built on the old weights does not describe the new ones.
    """
    optimizers = _optimizers(optimizer)
    params = list(params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"reset_optimizer_state expects tensors, got {type(p).__name__}")
    ids = {id(p) for p in params}
    dropped = 0
    for opt in optimizers:
        if isinstance(opt, torch.optim.LBFGS):
            mine = [p for group in opt.param_groups for p in group["params"]]
            if any(id(p) in ids for p in mine) and opt.state.pop(mine[0], None) is not None:
                dropped += 1
            continue
        for p in params:
            if opt.state.pop(p, None) is not None:
                dropped += 1
    return dropped


def _optimizers(optimizer) -> list:
    """``optimizer=`` as a list: None, one optimizer, or a list/tuple of them (TypeError otherwise)."""
    if optimizer is None:
        return []
    many = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for opt in many:
        _check_optimizer(opt)
    return many


def _check_optimizer(optimizer) -> None:
    state = getattr(optimizer, "state", None)
    if not hasattr(state, "pop") or not hasattr(optimizer, "param_groups"):
        raise TypeError(
            f"expected a torch.optim.Optimizer (with .state keyed by parameter) or a list of them, got "
            f"{type(optimizer).__name__}"
        )


# --- what each module type holds: the table --------------------------------------------


@dataclass(frozen=True)
class Slot:
    """What FIRE does with one weight a module type holds.

    ``layout`` None: the weight is left alone, for ``reason``. Otherwise it is
    projected in ``layout``, as the blocks ``blocks`` (labels) cut along its
    output axis, of ``sizes`` (None: equal blocks), after reading it as the
    shape ``view`` (a grouped conv's groups as a stack axis). ``note`` is
    said in the report row; ``problem`` is raised when the weight is selected
    and no ``split=`` says how to cut it. ``shape``: the shape of a weight
    that is no tensor FIRE can see (a quantized module's packed weight).
    """

    layout: str | None = None
    reason: str | None = None
    blocks: tuple[str, ...] | None = None
    sizes: tuple[int, ...] | None = None
    view: tuple[int, ...] | None = None
    note: str | None = None
    problem: str | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _Where:
    """Where a module sits: its dotted name, its last name component, its parent, and the options that shape it."""

    name: str
    leaf: str
    parent: nn.Module | None
    conv_groups: str
    adapters: str = "skip"


@dataclass(frozen=True)
class Kind:
    """One row of :data:`MODULE_TABLE`: a module type and the weights it holds.

    ``weights`` maps attribute names to slots; a dotted name
    (``"lora_A.default.weight"``) is a weight of one of the module's
    submodules, which the row decides for (a wrapper knows what its parts
    are; the outermost wrapper's word wins).
    """

    name: str  # as the docs say it
    match: object  # a type, a tuple of types, or a predicate on the module
    weights: Callable[[nn.Module, _Where], dict[str, Slot]]  # attribute name (or dotted path) -> Slot

    def matches(self, mod: nn.Module) -> bool:
        if isinstance(self.match, (type, tuple)):
            return isinstance(mod, self.match)
        return bool(self.match(mod))


_EMBEDDING = "embedding (a lookup table, not a map between layers; layouts= projects it)"
_BILINEAR = "nn.Bilinear (its out x in1 x in2 weight is a bilinear form, not one matrix; layouts= projects it)"
_QUANTIZED = (
    "quantized module (its weight is packed integers, which FIRE cannot write; apply FIRE to the float model "
    "before quantizing)"
)
_NO_RULE = "no FIRE rule for a parameter of {kind} (layouts= projects it)"
_FROZEN = "frozen (requires_grad=False, so it cannot re-learn; frozen=True projects it)"
_EMPTY = "empty (a dimension of size 0)"
_NOT_INCLUDED = "not selected by include"
_LAYOUT_NONE = "layouts= maps it to None"
_TIED_HEAD = "an LM head tied to an embedding is projected, as the reference does (exclude either name to keep it)"
_LORA_FACTOR = (
    "a LoRA adapter factor (PEFT): projected on its own it becomes a scaled semi-orthogonal matrix, so the "
    "adapter's s*B*A would jump to spectral norm (alpha/r)*sqrt(out/in) (lora_B starts at zero by design); merge "
    "first (model.merge_and_unload(), then FIRE the merged weight) or reset the adapter "
    "(layer.reset_lora_parameters(adapter_name, True)); adapters='project' projects it"
)
_PEFT_ADAPTER = (
    "a PEFT {tuner} adapter weight: not a layer's weight matrix but a part of the change the adapter adds to one; "
    "merge first (model.merge_and_unload(), then FIRE the merged weight), or layouts= projects it"
)
_PEFT_NO_RULE = (
    "a PEFT {tuner} adapter weight, which adapters='project' does not cover (it projects LoRA's lora_A, lora_B "
    "and lora_embedding_A/B); merge first (model.merge_and_unload(), then FIRE the merged weight), or layouts= "
    "projects it"
)
_LORA_PROJECTED = (
    "LoRA factors projected on their own (adapters='project'): lora_A (r x in) and lora_B (out x r) each become "
    "a scaled near-semi-orthogonal matrix, so the adapter's s*B*A becomes (alpha/r)*sqrt(out/in) times a product "
    "of two partial isometries (spectral norm up to (alpha/r)*sqrt(out/in) for a Linear, 2.0 at r=4, alpha=8 on a "
    "square layer), whatever it was before (0 for a fresh adapter)"
)
_PEFT_BASE = (
    "the base weight inside a PEFT {tuner} layer, projected alone: the adapter's change is still "
    "added to the new weight as it was (merge first, model.merge_and_unload(), to FIRE the merged weight)"
)

_GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n"), "RNN_TANH": None, "RNN_RELU": None}
_CELL_GATES = ((nn.LSTMCell, ("i", "f", "g", "o")), (nn.GRUCell, ("r", "z", "n")), (nn.RNNCell, None))
_FUSED_QKV = ("c_attn", "qkv", "qkv_proj")
_FUSED_GATE_UP = ("gate_up_proj",)
_FUSED_NOTE = (
    "recognised fused projections, split into their blocks as the reference splits c_attn "
    "(split={pattern: 1} projects one whole)"
)


def _attention_weights(mod: nn.MultiheadAttention, where: _Where) -> dict[str, Slot]:
    if mod.in_proj_weight is not None or parametrize.is_parametrized(mod, "in_proj_weight"):
        return {"in_proj_weight": Slot("oi", blocks=("q", "k", "v"))}
    return {a: Slot("oi") for a in ("q_proj_weight", "k_proj_weight", "v_proj_weight")}


def _rnn_weights(mod: nn.RNNBase, where: _Where) -> dict[str, Slot]:
    """Every layer and direction: input and hidden weights per gate block, the projection (proj_size) whole."""
    if mod.mode not in _GATES:
        return {}
    gates = _GATES[mod.mode]
    out = {}
    for attr in mod._flat_weights_names:
        if attr.startswith(("weight_ih", "weight_hh")):
            out[attr] = Slot("oi", blocks=gates)
        elif attr.startswith("weight_hr"):
            out[attr] = Slot("oi")
    return out


def _cell_weights(mod: nn.RNNCellBase, where: _Where) -> dict[str, Slot]:
    gates = next((g for kind, g in _CELL_GATES if isinstance(mod, kind)), None)
    return {"weight_ih": Slot("oi", blocks=gates), "weight_hh": Slot("oi", blocks=gates)}


def _linear_weights(mod: nn.Linear, where: _Where) -> dict[str, Slot]:
    return {"weight": Slot("oi", **_fused(where, mod.out_features, mod.in_features))}


def _is_hf_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2), recognised without importing transformers."""
    kind = type(mod)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers") and isinstance(
        getattr(mod, "nf", None), int
    )


def _hf_conv1d_weights(mod: nn.Module, where: _Where) -> dict[str, Slot]:
    """A Linear that stores its weight as (in, out) = (nx, nf): layout ``"io"``."""
    weight = mod._parameters.get("weight")
    d_in = getattr(mod, "nx", None) if weight is None else int(weight.shape[0])
    if not isinstance(d_in, int) or weight is not None and tuple(weight.shape) != (d_in, mod.nf):
        return {}  # not stored as Conv1D stores it: left to layouts=
    return {"weight": Slot("io", **_fused(where, mod.nf, d_in))}


def _conv_weights(mod: nn.Module, where: _Where) -> dict[str, Slot]:
    """Conv and ConvTranspose: one matrix per tap; a grouped conv's stored matrices, or each group's own."""
    transposed = isinstance(mod, _CONV_T)
    features = ("io" if transposed else "oi") + _SPATIAL[len(mod.kernel_size)]
    groups = mod.groups
    if groups == 1:
        return {"weight": Slot(features)}
    # The stored tap is out x in/groups (conv) or out/groups x in (transposed): every group in one matrix.
    stored = (mod.out_channels // groups, mod.in_channels) if transposed else (mod.out_channels, mod.in_channels // groups)
    depthwise = min(stored) == 1
    if where.conv_groups == "stored":
        note = (
            "depthwise convs: each tap is a single column (or row), which FIRE only normalizes, so DfI after is "
            "0 whatever the steps, not a sign of convergence (conv_groups='each' projects each channel's own)"
            if depthwise
            else "grouped convs: each tap's stored matrix, every group in one, as the reference does "
            "(conv_groups='each' projects each group's own)"
        )
        return {"weight": Slot(features, note=note)}
    weight = mod._parameters.get("weight")
    problem = None
    if weight is not None and hasattr(weight, "placements"):
        problem = (
            f"{where.name}.weight: conv_groups='each' is not supported for a DTensor (sharded) weight; use "
            "conv_groups='stored' or exclude it"
        )
    # (groups, per-group rows, ...): the groups become a stack axis, each projected and scaled on its own.
    first = (mod.in_channels if transposed else mod.out_channels) // groups
    second = (mod.out_channels if transposed else mod.in_channels) // groups
    view = (groups, first, second, *mod.kernel_size)
    if first * second == 1:
        note = (
            "depthwise convs, conv_groups='each': each channel's taps are 1 x 1 matrices, which FIRE sets to "
            "their sign times the scale"
        )
    elif min(first, second) == 1:
        note = (
            "depthwise convs, conv_groups='each': each group's taps are single columns (or rows), which FIRE only "
            "normalizes, so DfI after is 0 whatever the steps"
        )
    else:
        note = (
            "grouped convs, conv_groups='each': each group's (out/groups) x (in/groups) matrices projected and "
            "scaled on their own (stack axis G)"
        )
    return {"weight": Slot("G" + features, view=view, note=note, problem=problem)}


def _is_quantized(mod: nn.Module) -> bool:
    """A torch.ao quantized (static or dynamic) module: its weight is a method returning packed integers."""
    quantized = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    return type(mod).__module__.startswith(quantized) and callable(getattr(mod, "weight", None))


def _quantized_weights(mod: nn.Module, where: _Where) -> dict[str, Slot]:
    try:
        shape = tuple(int(d) for d in mod.weight().shape)
    except Exception:  # a module whose packed weight cannot be read back
        shape = ()
    return {"weight": Slot(reason=_QUANTIZED, shape=shape)}


def _left_alone(reason: str):
    return lambda mod, where: {"weight": Slot(reason=reason)}


# --- PEFT tuner layers (LoRA and the others), recognised without importing peft -------------------


def _peft_class(mod: nn.Module, name: str) -> bool:
    """Whether ``mod`` is an instance of peft's class ``name`` (looked up in its type's MRO by name and module)."""
    return any(c.__name__ == name and c.__module__.startswith("peft.") for c in type(mod).__mro__)


def _is_peft_tuner(mod: nn.Module) -> bool:
    """A PEFT tuner layer (``peft.tuners.tuners_utils.BaseTunerLayer``: LoRA, AdaLoRA, LoHa, IA3, ...)."""
    return _peft_class(mod, "BaseTunerLayer")


def _tuner_name(mod: nn.Module) -> str:
    module = type(mod).__module__.split(".")
    return module[2] if len(module) > 2 and module[1] == "tuners" else type(mod).__name__


_LORA_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _peft_weights(mod: nn.Module, where: _Where) -> dict[str, Slot]:
    """A PEFT tuner layer: its base layer as the layer it wraps, its adapter weights as ``adapters=`` says.

    The base layer's weights get the slots its own row gives, read as if it
    sat where the wrapper sits (so GPT-2's ``c_attn`` base is still cut into
    q, k, v); it is frozen, so only ``frozen=True`` projects it. Every adapter
    weight of two or more dimensions (under the layer's
    ``adapter_layer_names``) is left alone by default. With
    ``adapters="project"`` LoRA's factors are projected as the Linear (or
    conv) matrices they are, ``lora_B`` cut into the blocks of a fused base;
    other tuners' weights stay left alone (no rule for them).
    """
    lora = _peft_class(mod, "LoraLayer")
    tuner = "LoRA" if lora else _tuner_name(mod)
    out: dict[str, Slot] = {}
    base = mod._modules.get("base_layer")
    fused = None  # the base's slot with blocks (or an unreadable fused size), which lora_B follows
    base_kind = _kind_of(base) if isinstance(base, nn.Module) else None
    if base_kind is not None:
        for attr, slot in base_kind.weights(base, where).items():
            if slot.layout is not None:
                note = _PEFT_BASE.format(tuner=tuner)
                slot = replace(slot, note=f"{slot.note}; {note}" if slot.note else note)
                if fused is None and (slot.blocks or slot.problem):
                    fused = slot
            out[f"base_layer.{attr}"] = slot
    for attr in getattr(mod, "adapter_layer_names", ()):
        holder = mod._modules.get(attr)
        if holder is None:
            continue
        for pname, p in holder.named_parameters(remove_duplicate=False):
            if isinstance(p, nn.parameter.UninitializedParameter) or not p.is_floating_point() or p.ndim < 2:
                continue  # biases, DoRA's magnitude vectors: not weights FIRE considers
            key = f"{attr}.{pname}"
            if where.adapters == "skip":
                out[key] = Slot(reason=_LORA_FACTOR if lora and attr in _LORA_FACTORS else _PEFT_ADAPTER.format(tuner=tuner))
                continue
            if not (lora and attr in _LORA_FACTORS):
                out[key] = Slot(reason=_PEFT_NO_RULE.format(tuner=tuner))
                continue
            owner_name, _, leaf = pname.rpartition(".")
            owner = holder.get_submodule(owner_name) if owner_name else holder
            slot = Slot("oi")  # a factor held as a bare Parameter (lora_embedding_A/B, AdaLoRA's lora_A/B)
            kind = _kind_of(owner) if owner is not holder else None
            if kind is not None:
                inner = _Where(f"{where.name}.{attr}.{owner_name}", attr, holder, where.conv_groups, where.adapters)
                slot = kind.weights(owner, inner).get(leaf) or Slot(reason=_PEFT_NO_RULE.format(tuner=tuner))
            if slot.layout is None:
                out[key] = slot
                continue
            note = _LORA_PROJECTED
            if attr == "lora_B" and fused is not None and slot.layout == "oi":  # its rows are the base's outputs
                note = f"{note}; lora_B of a fused base cut into the base's blocks"
                slot = Slot("oi", blocks=fused.blocks, sizes=fused.sizes, problem=fused.problem)
            out[key] = replace(slot, note=note)
    return out


#: What each module type holds, first match wins: its weights (attribute names), their layout, how
#: they split into blocks, and why a weight is left alone. Selection reads only this table.
MODULE_TABLE: tuple[Kind, ...] = (
    Kind("PEFT tuner layer (LoRA, AdaLoRA, LoHa, ...)", _is_peft_tuner, _peft_weights),
    Kind("quantized module (torch.ao)", _is_quantized, _quantized_weights),
    Kind("nn.MultiheadAttention", nn.MultiheadAttention, _attention_weights),
    Kind("nn.RNN / nn.LSTM / nn.GRU", nn.RNNBase, _rnn_weights),
    Kind("nn.RNNCell / nn.LSTMCell / nn.GRUCell", nn.RNNCellBase, _cell_weights),
    Kind("nn.Linear", nn.Linear, _linear_weights),
    Kind("transformers Conv1D", _is_hf_conv1d, _hf_conv1d_weights),
    Kind("nn.Conv1d/2d/3d", _CONV, _conv_weights),
    Kind("nn.ConvTranspose1d/2d/3d", _CONV_T, _conv_weights),
    Kind("nn.Embedding / nn.EmbeddingBag", (nn.Embedding, nn.EmbeddingBag), _left_alone(_EMBEDDING)),
    Kind("nn.Bilinear", nn.Bilinear, _left_alone(_BILINEAR)),
)


def _kind_of(mod: nn.Module) -> Kind | None:
    return next((k for k in MODULE_TABLE if k.matches(mod)), None)


# --- fused projections: recognised by name, cut by sizes the module states --------------


def _read(mod: nn.Module | None, *names: str) -> int | None:
    """The first positive int among the module's attributes ``names``, then its ``config``'s."""
    for source in (mod, getattr(mod, "config", None)):
        for n in names:
            value = getattr(source, n, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _fused(where: _Where, d_out: int, d_in: int) -> dict:
    """Slot fields for a fused projection recognised by its name (blocks, sizes, note or problem); {} otherwise."""
    if where.leaf in _FUSED_QKV:
        return _qkv_blocks(where, d_out, d_in)
    if where.leaf in _FUSED_GATE_UP:
        inter = _read(where.parent, "intermediate_size")
        if d_out % 2 == 0 and inter in (None, d_out // 2):
            return dict(blocks=("gate", "up"), note=_FUSED_NOTE)
        return dict(problem=_fused_problem(where, d_out, d_in, "gate/up", f"intermediate_size {inter}"))
    return {}


def _qkv_blocks(where: _Where, d_out: int, d_in: int) -> dict:
    """q, k, v block sizes from the attention module (or its config); equal thirds when nothing says otherwise.

    Grouped-query attention gives k and v ``num_key_value_heads * head_dim``
    rows each, q ``num_heads * head_dim``. A GPT-2 cross-attention
    ``c_attn`` holds only k and v.
    """
    parent = where.parent
    if where.leaf == "c_attn" and getattr(parent, "is_cross_attention", False) is True:
        if d_out % 2 == 0:
            return dict(blocks=("k", "v"), note=_FUSED_NOTE)
        return dict(problem=_fused_problem(where, d_out, d_in, "k/v", "an odd output size"))
    heads = _read(parent, "num_heads", "n_head", "n_heads", "num_attention_heads")
    kv_heads = _read(parent, "num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "n_head_kv")
    head_dim = _read(parent, "head_dim", "head_size")
    if heads and not head_dim:
        embed = _read(parent, "embed_dim", "hidden_size", "n_embd", "dim", "d_model")
        if embed and embed % heads == 0:
            head_dim = embed // heads
    if heads and head_dim:
        q, kv = heads * head_dim, (kv_heads or heads) * head_dim
        if q + 2 * kv == d_out:
            return dict(blocks=("q", "k", "v"), sizes=None if q == kv else (q, kv, kv), note=_FUSED_NOTE)
        why = f"{heads} heads, {kv_heads or heads} key/value heads of {head_dim} give {q} + 2 x {kv} rows, not {d_out}"
        return dict(problem=_fused_problem(where, d_out, d_in, "q/k/v", why))
    if d_out == 3 * d_in:
        return dict(blocks=("q", "k", "v"), note=_FUSED_NOTE)
    why = "no num_heads / num_key_value_heads / head_dim on the module or its config"
    return dict(problem=_fused_problem(where, d_out, d_in, "q/k/v", why))


def _fused_problem(where: _Where, d_out: int, d_in: int, blocks: str, why: str) -> str:
    return (
        f"{where.name}.weight: a fused {blocks} projection ({where.leaf}: {d_out} outputs for {d_in} inputs) whose "
        f"block sizes cannot be read ({why}); pass split={{{where.name!r}: (n1, n2, ...)}} with the sizes of its "
        f"blocks, or split={{{where.name!r}: 1}} to project it whole"
    )


# --- weights with hooks that compute them ------------------------------------------------


def _hook_weights(mod: nn.Module) -> dict[str, tuple[str, tuple[str, ...]]]:
    """attr -> (why FIRE cannot write it, the parameters a forward pre-hook computes it from)."""
    out = {}
    for hook in mod._forward_pre_hooks.values():
        kind = type(hook).__name__
        if isinstance(hook, prune.BasePruningMethod):
            attr = hook._tensor_name
            out[attr] = (
                "{name}: is pruned (torch.nn.utils.prune): the layer uses weight_orig * weight_mask, so a FIRE "
                "result written to weight_orig would be masked again and the layer's weight would not be the "
                "projection; make the pruning permanent (prune.remove(module, 'weight'), then FIRE projects the "
                "pruned weight as a dense matrix) or exclude the layer",
                (f"{attr}_orig",),
            )
        elif kind == "SpectralNorm":
            out[hook.name] = (
                "{name}: the module uses spectral_norm, which divides the weight by its top singular value and so "
                "would undo FIRE's scale; remove it (torch.nn.utils.remove_spectral_norm) or exclude the layer",
                (f"{hook.name}_orig",),
            )
        elif kind == "WeightNorm":
            out[hook.name] = (
                "{name}: the module uses the hook-based torch.nn.utils.weight_norm, which FIRE cannot write "
                "through; use torch.nn.utils.parametrizations.weight_norm (supported) or exclude the layer",
                (f"{hook.name}_g", f"{hook.name}_v"),
            )
    return out


# --- the model's weights, each once under all its names -----------------------------------


@dataclass
class _Entry:
    """One name of a weight: the module holding it and what the table says about it there."""

    pos: int  # model order
    name: str
    mod: nn.Module
    attr: str
    slot: Slot | None
    kind: str


@dataclass(eq=False)
class _Weight:
    """A tensor of the model under all its names (tied weights are one), with what the table says of it."""

    entries: list
    tensor: torch.Tensor | None  # the Parameter; for a hook-computed weight the one standing for it
    plist: object = None  # the ParametrizationList, if parametrized
    hook: str | None = None  # why a hook-computed weight cannot be written
    tied: list = field(default_factory=list)  # other Parameters viewing the same memory the same way
    overlaps: list = field(default_factory=list)  # names of other tensors whose memory it overlaps
    primary: _Entry | None = None

    @property
    def names(self) -> list[str]:
        """Every name, the one FIRE projects it under first."""
        return [self.primary.name] + [e.name for e in self.entries if e is not self.primary]

    @property
    def stored(self) -> tuple:
        """What holds its values: the Parameters (a parametrization's originals)."""
        if self.plist is not None:
            return _stored_tensors(self.plist)
        return tuple(t for t in (self.tensor, *self.tied) if t is not None)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.tensor is None and self.plist is None:
            return self.primary.slot.shape or ()
        t = self.stored[-1]
        if isinstance(t, nn.parameter.UninitializedParameter):
            return ()
        return tuple(int(d) for d in t.shape)

    @property
    def floating(self) -> bool:
        t = self.stored[-1] if self.stored else None
        return t is not None and not isinstance(t, nn.parameter.UninitializedParameter) and t.is_floating_point()


def _walk(model: nn.Module, conv_groups: str, adapters: str = "skip") -> list[_Weight]:
    """Every parameter of the model once, with all its names, ordered by the name FIRE projects it under.

    The same Parameter under two names (tied, or a module reused), and two
    Parameters viewing the same memory the same way, are one weight; its
    primary name is the first whose module type projects it (an LM head
    tied to an embedding: the head). A row that decides for its submodules'
    weights (a PEFT LoRA layer for its base layer and factors) overrides
    what their own rows say.
    """
    modules: dict[str, nn.Module] = {}
    found: dict[object, _Weight] = {}
    claims: dict[str, tuple[Slot, str]] = {}  # full name -> (slot, kind) an enclosing module's row gave it
    pos = 0
    for prefix, mod in model.named_modules(remove_duplicate=False):
        modules.setdefault(prefix, mod)
        if isinstance(mod, parametrize.ParametrizationList):
            continue  # its tensors are reached through the parametrized module
        kind = _kind_of(mod)
        parent = modules.get(prefix.rpartition(".")[0]) if prefix else None
        where = _Where(prefix, prefix.rpartition(".")[2], parent, conv_groups, adapters)
        slots = kind.weights(mod, where) if kind is not None else {}
        kind_name = kind.name if kind is not None else type(mod).__name__
        for attr in [a for a in slots if "." in a]:  # a submodule's weight: the outermost row decides
            claims.setdefault(f"{prefix}.{attr}" if prefix else attr, (slots.pop(attr), kind_name))
        hooks = _hook_weights(mod)
        behind_hooks = {a for _, names in hooks.values() for a in names}
        plists = getattr(mod, "parametrizations", None) if parametrize.is_parametrized(mod) else None
        attrs = [a for a in mod._parameters if a not in behind_hooks] + list(plists or {}) + list(slots) + list(hooks)
        for attr in dict.fromkeys(attrs):
            name = f"{prefix}.{attr}" if prefix else attr
            plist = plists[attr] if plists is not None and attr in plists else None
            hook, tensor = None, None
            if plist is not None:
                key = id(plist)
            elif attr in hooks:
                hook, behind = hooks[attr]
                tensor = mod._parameters.get(behind[-1])
                key = id(tensor) if tensor is not None else ("hook", id(mod), attr)
            else:
                tensor = mod._parameters.get(attr)
                if tensor is None:
                    slot = slots.get(attr)
                    if slot is None or slot.shape is None:
                        continue  # an optional weight that is None
                    key = ("packed", id(mod), attr)
                else:
                    key = id(tensor)
            w = found.get(key)
            if w is None:
                w = found[key] = _Weight([], tensor, plist, hook.format(name=name) if hook else None)
            slot, by = claims.get(name, (slots.get(attr), kind_name))
            w.entries.append(_Entry(pos, name, mod, attr, slot, by))
            pos += 1
    weights = _merge_by_memory(list(found.values()))
    for w in weights:
        w.primary = next((e for e in w.entries if e.slot is not None and e.slot.layout is not None), w.entries[0])
    return sorted(weights, key=lambda w: w.primary.pos)


def _merge_by_memory(weights: list[_Weight]) -> list[_Weight]:
    """Parameters viewing the same memory the same way become one weight; overlapping views are recorded.

    One sort of each storage's views by first byte finds every overlap, so
    a model whose parameters all live in one flat buffer costs no more than
    any other.
    """
    by_storage: dict[int, list] = {}
    for w in weights:
        if w.plist is None and w.tensor is not None and not isinstance(w.tensor, nn.parameter.UninitializedParameter):
            span = _span(w.tensor)
            if span is not None:
                by_storage.setdefault(span[0], []).append((span, w))
    gone = set()
    for views in by_storage.values():
        views.sort(key=lambda v: (v[0][1], -v[0][2]))
        reach, reacher = -1, None  # the furthest end byte so far, and whose
        first_of: dict[tuple, _Weight] = {}
        for (address, start, end, view), w in views:
            same = first_of.get((start, view))
            if same is not None:  # the same view of the same memory: tied
                same.entries += w.entries
                same.tied.append(w.tensor)
                gone.add(id(w))
                continue
            first_of[(start, view)] = w
            if start < reach:
                w.overlaps.append(reacher.entries[0].name)
                reacher.overlaps.append(w.entries[0].name)
            if end > reach:
                reach, reacher = end, w
    return [w for w in weights if id(w) not in gone]


def _span(t: torch.Tensor):
    """``(storage address, first byte, end byte, view)`` of a tensor's memory; None where there is none to see.

    The bytes are the extent of the strided view, from its first element to
    one past its last. Meta tensors, sparse tensors and tensor subclasses
    without a storage of their own (DTensor) report none.
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


# --- selection ------------------------------------------------------------------------


@dataclass
class _Options:
    include: Patterns
    exclude: Patterns
    split: dict
    layouts: dict
    frozen: bool
    conv_groups: str
    adapters: str
    wrappers: tuple[str, ...]


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
    view: tuple | None = None  # the shape the block is read as (a grouped conv's groups as a stack axis)
    note: str | None = None
    aliases: tuple = ()  # the weight's other names
    tied: tuple = ()  # other Parameters viewing its memory

    def given(self, weight: torch.Tensor) -> torch.Tensor:
        """The block of ``weight`` as the core gets it."""
        block = weight[self.index]
        return block if self.view is None else block.reshape(self.view)

    @property
    def block_shape(self) -> tuple:
        return tuple(self.tensor[self.index].shape)


def _unwrap(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """Strip torch.compile (``_orig_mod``) and (Distributed)DataParallel (``.module``); the attributes stripped."""
    chain = []
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            chain.append("_orig_mod")
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            chain.append("module")
        else:
            return model, tuple(chain)


def _wrapped(names: list[str], wrappers: tuple[str, ...]) -> list[str]:
    """The names the wrapped model's ``state_dict()`` shows: ``module.fc.weight``, ``_orig_mod.module.fc.weight``."""
    prefixes = [".".join(wrappers[k:]) + "." for k in range(len(wrappers))]
    return [p + n for p in prefixes for n in names]


def _check_layouts(layouts) -> dict:
    if layouts is None:
        return {}
    if not isinstance(layouts, Mapping):
        raise TypeError(f"layouts must be a mapping of glob patterns to layout strings, got {type(layouts).__name__}")
    for pat, lay in layouts.items():
        if not isinstance(pat, str) or not (lay is None or isinstance(lay, str)):
            raise TypeError(f"layouts must map glob strings to layout strings (or None), got {pat!r}: {lay!r}")
    return dict(layouts)


def _check_splits(split) -> dict:
    if split is None:
        return {}
    if not isinstance(split, Mapping):
        raise TypeError(f"split must be a mapping of glob patterns to block counts or sizes, got {type(split).__name__}")
    for pat, spec in split.items():
        if not isinstance(pat, str):
            raise TypeError(f"split keys must be glob strings, got {pat!r}")
        _check_split(spec, pat)
    return dict(split)


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


def _user_split(slot: Slot, spec, name: str) -> Slot:
    """``slot`` cut as a ``split=`` value says: k equal blocks, or blocks of the given sizes (1: whole)."""
    if slot.view is not None:
        return Slot(slot.layout, view=slot.view, problem=f"{name}: split= and conv_groups='each' both say how to cut it; use one")
    if isinstance(spec, int):
        blocks, sizes = (None if spec == 1 else tuple(str(j) for j in range(spec))), None
    else:
        blocks, sizes = tuple(str(j) for j in range(len(spec))), tuple(spec)
        if len(spec) == 1:
            blocks = None  # one block of the whole size: checked against the weight below
    return Slot(slot.layout, blocks=blocks, sizes=sizes)


def _override(slot: Slot | None, layout: str) -> Slot:
    """A ``layouts=`` value for a weight: its blocks kept only when it names the layout the table gives."""
    if slot is not None and slot.layout == layout:
        return slot
    return Slot(layout)


def _select(model: nn.Module, o: _Options):
    """The weights to project, in model order; the weights left alone with their reasons; notes for the report.

    Every weight is decided before anything is refused, and refusals come
    after the pattern checks, so a typo in ``exclude`` is reported as such,
    not as the refusal of the weight it was meant to leave out.
    """
    _refuse_wrappers(model)
    targets, refusals, known = [], [], []
    skipped = Report(method="", steps=0, scale=None)  # collects the weights left alone
    used_layouts, used_splits = set(), set()
    for w in _walk(model, o.conv_groups, o.adapters):
        names = w.names
        every = names + _wrapped(names, o.wrappers)
        slot, kind = w.primary.slot, w.primary.kind
        laid = [p for p in o.layouts if any(glob_match(n, p) for n in every)]
        if laid:
            lay = o.layouts[laid[0]]
            if lay is None:
                used_layouts.update(laid)
                slot = Slot(reason=_LAYOUT_NONE)
            elif w.stored and (slot is not None and slot.layout is not None or len(lay) == len(w.shape)):
                # a pattern adds a tensor the table leaves alone only where its layout fits (`*.weight` is not a bias)
                used_layouts.update(laid)
                slot = _override(slot, lay)
        if slot is None:
            if not (w.floating and len(w.shape) >= 2):
                continue  # biases, norms, integer buffers: not weights FIRE considers
            slot = Slot(reason=_NO_RULE.format(kind=kind))
        if slot.layout is not None:
            cut = [p for p in o.split if matches([p], every)]
            if cut:
                used_splits.update(cut)
                slot = _user_split(slot, o.split[cut[0]], names[0])
        primary = names[0]
        blocks = [primary] if not slot.blocks else [f"{primary}[{label}]" for label in slot.blocks]
        known += names + (blocks if slot.blocks else [])
        aliases = tuple(names[1:])
        tensor = _as_seen(w) if slot.layout is not None and (o.include.func or o.exclude.func) else None
        chosen, left = [], []
        for block in blocks:
            seen = every + ([block] if block != primary else [])
            if slot.reason is not None:  # a pattern naming it is used: the reason says why it stays
                o.include.hit(seen)
                o.exclude.hit(seen)
                left.append((block, slot.reason))
                continue
            keep = o.include.func(block, tensor) if o.include.func else (
                o.include.hit(seen) if o.include.patterns else True
            )
            drop = bool(o.exclude.func(block, tensor)) if o.exclude.func else o.exclude.hit(seen)
            if drop:
                left.append((block, _excluded_by(o.exclude, seen)))
            elif not keep:
                left.append((block, _NOT_INCLUDED))
            else:
                chosen.append(block)
        if chosen:
            reason = _weight_reason(w, o.frozen)
            if reason is not None:
                left += [(block, reason) for block in chosen]
                chosen = []
        _record_skips(skipped, w, blocks, left, aliases)
        if not chosen:
            continue
        problem = _problem(w, slot, o)
        if problem is not None:
            refusals.append(problem)
            continue
        tensor = tensor if tensor is not None else _as_seen(w)
        if slot.view is None and len(slot.layout) != tensor.ndim:
            refusals.append((ValueError, (
                f"{primary}: layout {slot.layout!r} names {len(slot.layout)} axes but the weight has shape "
                f"{tuple(tensor.shape)}; give a layout with one letter per axis, or exclude it"
            )))
            continue
        try:
            cuts = _blocks(primary, tuple(tensor.shape), slot)
        except ValueError as err:
            refusals.append((ValueError, str(err)))
            continue
        note = slot.note
        if note is None and any(e.slot is not None and e.slot.reason == _EMBEDDING for e in w.entries):
            note = _TIED_HEAD
        for block, index in cuts:
            if block in chosen:
                targets.append(
                    _Target(
                        block, primary, tensor, slot.layout, index, tensor if w.plist is None else None, w.plist,
                        w.stored if w.plist is not None else (), view=slot.view, note=note,
                        aliases=aliases, tied=tuple(w.tied),
                    )
                )

    for pat in o.layouts:
        if pat not in used_layouts:
            raise ValueError(f"layouts pattern {pat!r} matches no parameter of the model that its layout fits")
    for pat in o.split:
        if pat not in used_splits:
            raise ValueError(f"split pattern {pat!r} matches no weight FIRE would project")
    o.include.check_used(known, "weight of two or more dimensions")
    o.exclude.check_used(known, "weight of two or more dimensions")
    if refusals:
        kind, message = refusals[0]
        more = f" (and {len(refusals) - 1} more weights refused)" if len(refusals) > 1 else ""
        raise kind(message + more)
    if not targets:
        lines = skipped.skipped_lines()
        raise ValueError(
            "fire_core.torch.apply selected no weight, nothing was written"
            + (": " + "; ".join(lines) if lines else ": the model has no weights of two or more dimensions")
        )
    return targets, skipped.skipped, _row_notes(targets)


def _as_seen(w: _Weight) -> torch.Tensor:
    """The weight as its module sees it: the Parameter, or what a parametrization computes.

    A parametrization FIRE refuses is not run (computing a spectral-normed
    weight updates its buffers): its stored tensor stands in for it.
    """
    if w.plist is None:
        return w.tensor
    if _parametrization_problem(w.plist, w.names[0]) is not None:
        return w.stored[-1]
    with torch.no_grad():
        return getattr(w.primary.mod, w.primary.attr)


def _excluded_by(exclude: Patterns, names: list[str]) -> str:
    if exclude.func is not None:
        return "excluded by the exclude callable"
    hits = [p for p in exclude.patterns if matches([p], names)]
    return f"excluded by {', '.join(repr(p) for p in hits)}"


def _weight_reason(w: _Weight, frozen: bool) -> str | None:
    """Why a weight chosen by name is still left alone (frozen, empty), or None."""
    stored = w.stored
    if not frozen and stored and not any(t.requires_grad for t in stored):
        return _FROZEN
    if 0 in w.shape:
        return _EMPTY
    return None


def _record_skips(skipped: Report, w: _Weight, blocks: list[str], left: list, aliases: tuple) -> None:
    """One skipped entry per weight when all its blocks are left alone for one reason, else one per block.

    A tied weight's entry names all its names (``aliases``), whichever of them excluded it.
    """
    if len(left) == len(blocks) and len({r for _, r in left}) == 1:
        left = [(w.names[0], left[0][1])]
    for name, reason in left:
        skipped.skip(name, w.shape, reason, aliases)


def _problem(w: _Weight, slot: Slot, o: _Options):
    """``(exception type, message)`` for a selected weight FIRE must refuse, or None; checked before anything is written."""
    name = w.names[0]
    if slot.problem is not None:
        return ValueError, slot.problem
    if w.hook is not None:
        return ValueError, w.hook
    if w.overlaps:
        return ValueError, (
            f"{name} and {w.overlaps[0]}: share memory without being the same weight (overlapping views); FIRE "
            "cannot project one without changing the other; exclude both"
        )
    if w.plist is not None:
        problem = _parametrization_problem(w.plist, name)
        if problem is not None:
            return ValueError, problem
    for t in w.stored:
        if isinstance(t, nn.parameter.UninitializedParameter):
            return ValueError, (
                f"{name}: is an uninitialized lazy parameter; run one forward pass to materialize the model before FIRE"
            )
        if t.is_meta:
            return ValueError, (
                f"{name}: is on the meta device, so it has no values to project; materialize the model first "
                "(model.to_empty(device=...) and load its weights) or exclude it"
            )
        if t.layout != torch.strided:
            return ValueError, (
                f"{name}: is stored {t.layout} (not a dense strided tensor); FIRE's result is dense and cannot be "
                "written into it; make it dense (module.weight = nn.Parameter(module.weight.to_dense())) or exclude it"
            )
        if t.is_inference() and not torch.is_inference_mode_enabled():
            return ValueError, (
                f"{name}: is an inference tensor (made under torch.inference_mode()), which cannot be written outside "
                "inference mode; call apply inside `with torch.inference_mode():`, or clone the parameters outside it"
            )
        if not t.is_leaf:
            return ValueError, (
                f"{name}: is not a leaf tensor (it was computed from other tensors), so writing it in place would "
                "not change what it is computed from; make it an nn.Parameter or exclude it"
            )
        if any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride())):
            return ValueError, (
                f"{name}: its elements share memory (an expanded view, stride 0), so it cannot hold a projection; "
                "make it a tensor of its own (.clone()) or exclude it"
            )
        if not t.is_floating_point() or t.is_complex():
            return TypeError, (
                f"{name}: FIRE projects real floating-point weights, got {t.dtype} with shape {tuple(t.shape)}; "
                "exclude it"
            )
    if len({t.requires_grad for t in w.stored}) > 1 and w.plist is None and not o.frozen:
        return ValueError, (
            f"{' and '.join(w.names)}: Parameters viewing the same memory, some frozen (requires_grad=False) and some "
            "not: projecting it would change the frozen one too; pass frozen=True to project it under all its "
            "names, or exclude it"
        )
    return None


def _blocks(name: str, shape: tuple, slot: Slot) -> list[tuple[str, tuple]]:
    """(name, index) of the blocks a weight is projected as, cut along its (first) output axis."""
    if not slot.blocks and slot.sizes is None:
        return [(name, ())]
    if slot.layout.count("o") != 1:
        raise ValueError(f"{name}: cannot cut layout {slot.layout!r} (shape {shape}) into blocks: it needs one 'o' axis")
    axis = slot.layout.index("o")
    size = shape[axis]
    labels = slot.blocks or ("0",)
    if slot.sizes is None:
        if size % len(labels):
            raise ValueError(f"{name}: cannot split {size} output features into {len(labels)} equal blocks (shape {shape})")
        sizes = (size // len(labels),) * len(labels)
    else:
        sizes = slot.sizes
        if sum(sizes) != size:
            raise ValueError(
                f"{name}: split sizes {sizes} sum to {sum(sizes)}, but the weight has {size} output features "
                f"(shape {shape})"
            )
    if not slot.blocks:  # split=(n,): one block that is the whole weight
        return [(name, ())]
    out, start = [], 0
    for label, s in zip(labels, sizes):
        out.append((f"{name}[{label}]", (slice(None),) * axis + (slice(start, start + s),)))
        start += s
    return out


def _row_notes(targets) -> list[str]:
    """The report's notes on what was done to some weights (fused splits, grouped convs, a tied head)."""
    by_note: dict[str, list[str]] = {}
    for t in targets:
        if t.note:
            names = by_note.setdefault(t.note, [])
            if t.param_name not in names:
                names.append(t.param_name)
    lines = []
    for note, names in by_note.items():
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        lines.append(f"note: {note}: {shown}")
    return lines


# --- refusals ------------------------------------------------------------------------


def _refuse_wrappers(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        if type(mod).__name__ == "FullyShardedDataParallel":
            raise TypeError(
                f"{name or 'model'}: FSDP (FullyShardedDataParallel) flattens parameters into shards; "
                "use FSDP2 (torch.distributed.fsdp.fully_shard) or apply FIRE to the unwrapped model"
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
        # Read through to_floats: on a DTensor the maxima are Partial, and every rank must see the
        # whole weight's values to reach the same verdict (a local read would let one rank raise alone).
        if back.shape == new.shape:
            biggest, error = to_floats(torch.stack([new.abs().max(), (back - new).abs().max()]))
        else:
            biggest, error = 0.0, float("nan")
        tol = 8 * torch.finfo(new.dtype).eps * biggest + torch.finfo(new.dtype).tiny
        if not error <= tol:  # NaN fails too
            raise ValueError(
                f"{t.param_name}: its parametrization ({', '.join(type(p).__name__ for p in t.plist)}) does not "
                "reproduce the FIRE weight from its right_inverse, so the result cannot be written through it; "
                "remove the parametrization or exclude the layer"
            )
    return values


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


def activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s activation modules by name: types from ``torch.nn``'s activations or ``transformers.activations``.

    ``nn.MultiheadAttention`` is defined among torch's activations but is an
    attention layer (its output is no unit's activation): it is not one.
    """
    kinds = ("torch.nn.modules.activation", "transformers.activations")
    return {
        name or type(m).__name__: m
        for name, m in model.named_modules()
        if type(m).__module__.startswith(kinds) and not isinstance(m, nn.MultiheadAttention)
    }


def activations(model: nn.Module, probe, *, modules: Mapping[str, nn.Module] | None = None, forward=None):
    """``{module name: (samples, units)}`` outputs of ``model``'s activation modules on ``probe``, leaving no trace.

    What the activation triggers of :mod:`fire_core.schedule`
    (``DormantAbove``, ``SrankBelow``) measure. ``modules``: the modules
    whose outputs are read (default: every module whose type comes from
    ``torch.nn``'s activations or ``transformers.activations``: ReLU, GELU,
    SiLU, Tanh...; a model with none is a ValueError). An output of 2 axes
    is ``(batch, units)``; of 3, ``(batch, tokens, units)``; of 4 or more,
    ``(batch, channels, *spatial)`` with each channel a unit; every other
    axis becomes samples. ``probe`` is what :func:`apply` takes (a tensor, a
    tuple of positional inputs, a dict of keyword inputs), or anything
    ``forward(model, probe)`` knows how to run. As for :func:`apply`'s
    probe: ``no_grad``, the model's current mode, buffers restored, random
    numbers not advanced.
    """
    if modules is None:
        modules = activation_modules(model)
    if not modules:
        raise ValueError(
            f"the activation triggers read the outputs of activation modules, and {type(model).__name__} has none "
            "(torch.nn activations such as nn.ReLU(), or transformers.activations; a functional F.relu is not "
            "a module): add them as modules, pass modules=, or use the data-free trigger DfIAbove"
        )
    _, captured = _run_probe(model, probe, dict(modules), forward=forward)
    features = {}
    for name, outputs in captured.items():
        for k, a in enumerate(outputs):
            if a.ndim >= 4:  # (batch, channels, *spatial): each channel is a unit
                a = a.movedim(1, -1)
            features[name if len(outputs) == 1 else f"{name}[{k}]"] = a.reshape(-1, a.shape[-1]).float()
    return features


def _run_probe(model: nn.Module, probe, owners: dict[str, nn.Module], forward=None):
    """The model's outputs on the probe and each owner module's outputs, leaving no trace.

    Runs under ``no_grad`` in the model's current mode. Buffers (BatchNorm
    running statistics in train mode) are restored afterwards and the random
    number generators are forked, so two calls see the same dropout masks
    and the caller's RNG state is not advanced. ``forward(model, probe)``
    replaces the plain call ``model(probe)``.
    """
    args, kwargs = ((), {}) if forward is not None else _probe_args(probe)
    modules = {id(m): m for m in owners.values()}
    captured: dict[int, list] = {k: [] for k in modules}

    def hook(mod, inputs, output):  # cloned: a later in-place op (ReLU(inplace=True)) must not change it
        captured[id(mod)].extend(t.detach().clone() for t in _float_tensors(output))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            result = forward(model, probe) if forward is not None else model(*args, **kwargs)
            out = [t.detach().clone() for t in _float_tensors(result)]
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


def _drifts(before, after, rows, targets) -> float:
    """The model's output drift; each row gets the drift of its owning module's output (None if it never ran).

    A sharded (DTensor) weight's module may give each rank only its shard of
    the output (ColwiseParallel): its sums of squares are added over the
    weight's mesh, in the targets' order on every rank, so that every rank
    reports the drift of the whole output. Outputs that are replicated
    scale both sums alike, which leaves the ratio as it is.
    """
    (out_before, layers_before), (out_after, layers_after) = before, after
    by_name = {row["name"]: row for row in rows}
    for t in targets:
        row = by_name.get(t.name)
        if row is None:
            continue
        b, a = layers_before.get(t.name), layers_after.get(t.name)
        ok = bool(b) and len(a) == len(b)
        mesh = getattr(t.tensor, "device_mesh", None)
        if mesh is None:
            row["drift"] = drift(b, a) if ok else None
            continue
        sums = torch.zeros(2, dtype=torch.float64, device=t.tensor.to_local().device)
        for x, y in zip(b, a) if ok else ():
            x, y = (v.to_local() if hasattr(v, "to_local") else v for v in (x, y))
            x, y = x.to(sums.device, torch.float64), y.to(sums.device, torch.float64)
            sums[0] += ((y - x) ** 2).sum()
            sums[1] += (x * x).sum()
        sum_over_mesh(sums, mesh)  # every rank takes part, whatever it captured
        num, den = sums.tolist()
        row["drift"] = None if not ok else (math.sqrt(num / den) if den else (0.0 if num == 0 else math.inf))
    return drift(out_before, out_after)