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

import inspect
from typing import Iterable, Mapping

import torch
from torch import nn

from ..core.patterns import Patterns, check_layouts
from ..core.plan import reinit
from ..core.report import Report

# What apply and select use, and the names kept importable as fire_core.torch.X though they live in the
# private files: the public ones (MODULE_TABLE, Kind, Slot, activations, activation_modules,
# reset_optimizer_state) and _run_probe, which the Lightning and transformers callbacks call.
from . import _deepspeed
from ._checks import _check_splits, _Options
from ._optim import _optimizers, reset_optimizer_state
from ._probe import _drifts, _owners, _run_probe, _stats_note, activation_modules, activations
from ._select import _select, _unwrap
from ._table import MODULE_TABLE, Kind, Slot
from ._trial import trial
from ._write import _agree_on_plain_weights, _project, _sharded, _written

__all__ = [
    "apply", "select", "check", "param_groups", "trial", "check_options", "SELECTION_OPTIONS", "activations", "activation_modules", "reset_optimizer_state",
    "MODULE_TABLE",
]

_CONV_GROUPS = ("stored", "each")
_ADAPTERS = ("skip", "project")


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

    ``model`` may be a DeepSpeed engine (ZeRO stages 0-3): ``apply(engine)``
    takes its module and its optimizer (``apply(engine.module)`` its module
    only). Each weight is read whole from DeepSpeed's fp32 master, projected
    once on an owner rank, and written to the model's weight, the master and
    (with the optimizer) the optimizer state; what cannot be written exactly
    (offloading, a parameter group shared with weights FIRE leaves alone:
    see :func:`param_groups`) is refused first. Every rank must call it;
    see ``docs/distributed.md``.

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
    model, optimizer = _deepspeed.engine_parts(model, optimizer)
    optimizers = _optimizers(optimizer)
    if dry_run and not report:
        raise ValueError("dry_run=True computes the report only; it cannot be combined with report=False")
    _check_distributed(distributed)
    model, options = _options(model, include, exclude, split, layouts, frozen, conv_groups, adapters)
    targets, skipped, notes = _select(model, options)
    # before anything changes: what DeepSpeed keeps must be writable exactly
    masters = _deepspeed.guard(model, targets, _written(targets), optimizers, bool(optimizers) and not dry_run)
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
        rows, pending = _project(targets, steps, method, scale, not write, report, distributed, masters)
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
    held = next((t for t in targets if t.param is not None and t.tensor is not t.param), None)
    if held is not None and hasattr(held.param, "ds_id"):
        raise ValueError(
            f"{held.name}: a DeepSpeed ZeRO-3 parameter, held in pieces across the ranks, so select() has no tensor "
            "to return; apply(engine) gathers each weight itself. Triggers that measure the weights (DfIAbove) cannot "
            "read them under ZeRO-3: use step or epoch triggers there"
        )
    return [(t.name, t.given(t.tensor.detach()), t.layout) for t in targets]


def check(
    model: nn.Module,
    *,
    optimizer=None,
    include=None,
    exclude=None,
    split: Mapping[str, int | Iterable[int]] | None = None,
    layouts: Mapping[str, str | None] | None = None,
    frozen: bool = False,
    conv_groups: str = "stored",
    adapters: str = "skip",
) -> None:
    """Raise now what :func:`apply` with these options would refuse for the model's structure; reads no values.

    For a training integration (or a script) to fail when training starts,
    not at the first firing: the selection's errors (:func:`select`'s), and
    what a DeepSpeed engine keeps where FIRE cannot write it exactly
    (offloading; with ``optimizer=``, a parameter group that holds projected
    weights and others, checked as if the optimizer had already stepped).
    What only the values can tell (a NaN weight) is checked by ``apply``.
    Takes a DeepSpeed engine as :func:`apply` does. Runs no collective.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"check expects a torch.nn.Module, got {type(model).__name__}")
    model, optimizer = _deepspeed.engine_parts(model, optimizer)
    optimizers = _optimizers(optimizer)
    model, options = _options(model, include, exclude, split, layouts, frozen, conv_groups, adapters)
    targets, _, _ = _select(model, options)
    _deepspeed.guard(model, targets, _written(targets), optimizers, bool(optimizers), stepped=True)


def param_groups(
    model: nn.Module,
    *,
    include=None,
    exclude=None,
    split: Mapping[str, int | Iterable[int]] | None = None,
    layouts: Mapping[str, str | None] | None = None,
    frozen: bool = False,
    conv_groups: str = "stored",
    adapters: str = "skip",
) -> list[dict]:
    """The model's trainable parameters as optimizer groups: ``[{"params": written}, {"params": the rest}]``.

    ``written``: the Parameters :func:`apply` with the same selection
    options (:func:`select`'s) would write; the second group holds every other parameter with
    ``requires_grad`` (left out when empty). Give each group its own options
    as usual (``groups[1]["weight_decay"] = 0.0``). An optimizer that keeps
    one state for a whole group needs this: DeepSpeed's ZeRO steps each
    parameter group as one flat fp32 tensor with one Adam step count, so FIRE
    can restart the state of projected weights only when they have a group
    of their own (see docs/distributed.md)::

        opt = torch.optim.AdamW(fire_core.torch.param_groups(model), lr=3e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects a torch.nn.Module, got {type(model).__name__}")
    model, options = _options(model, include, exclude, split, layouts, frozen, conv_groups, adapters)
    targets, _, _ = _select(model, options)
    written = [p for p in _written(targets) if p.requires_grad]
    ids = {id(p) for p in written}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": written}] + ([{"params": rest}] if rest else [])


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
        layouts=check_layouts(layouts),
        frozen=frozen,
        conv_groups=conv_groups,
        adapters=adapters,
        wrappers=wrappers,
    )
