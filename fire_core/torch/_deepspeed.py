"""FIRE on DeepSpeed engines: each matrix projected once, whole, and written everywhere DeepSpeed keeps it.

A DeepSpeed engine keeps a weight in up to three places: the model's
parameter (``bfloat16``/``float16`` under mixed precision; under ZeRO-3 only
this rank's partition, ``ds_tensor``, with an empty placeholder in between),
an fp32 *master* copy inside its optimizer (partitioned across ranks under
ZeRO 1-3), and the optimizer's state of that master. The optimizer writes
the master back into the model after every step, so a FIRE that wrote only
the model's parameters would be undone by the next step. Here:

1. every rank reads each selected weight whole, as fp32, from its master
   (``deepspeed.utils.safe_get_full_fp32_param``, a collective that
   all-gathers the partitions) and keeps the weights it *owns* (owners
   balanced by cost, as for FSDP2 in :mod:`._distributed`);
2. each owner projects its weights in one batched call of the core, and the
   rows and any error are exchanged: on an error every rank raises the same
   one, with nothing written;
3. each new weight is broadcast from its owner and written: the master gets
   the fp32 projection (``safe_set_full_fp32_param``; under ZeRO-3 this
   rank's slice, ``safe_set_local_fp32_param``), the model's parameter its
   rounding to the parameter's dtype (under ZeRO-3 this rank's partition,
   and the whole parameter where it is held whole);
4. the optimizer state: DeepSpeed's inner optimizer steps one flat fp32
   tensor per parameter group (per sub-group under ZeRO-3), whose ``step``
   count is shared by every weight in it. A group whose weights were all
   projected has its state dropped (the next step starts it afresh, as
   ``torch.optim`` does for a dropped parameter); a group that mixes
   projected and other weights cannot restart the projected ones alone, and
   is refused before anything changes (put the weights FIRE projects in a
   parameter group of their own).

Handled: ZeRO stages 1 and 2 (``DeepSpeedZeroOptimizer``), stage 3
(``DeepSpeedZeroOptimizer_Stage3``), DeepSpeed's ``BF16_Optimizer``, and
stage 0 with mixed precision (``FP16_UnfusedOptimizer``: a master per
parameter). Stage 0 in fp32 has no masters: its optimizer is the client
``torch.optim`` optimizer and its weights are plain replicated tensors,
which the torch adapter projects as for DDP. Refused with the reason:
offloaded optimizer state or parameters, ZeRO++ secondary partitions, the
fused ``FP16_Optimizer`` (one flat master per group, no per-weight access),
and engines whose data-parallel group is not the whole world (pipeline or
tensor model parallelism).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..core.plan import reinit_many

__all__ = [
    "loaded", "is_engine", "is_wrapper", "engine_parts", "Masters", "masters_of", "guard", "project", "reset_state",
    "DeepSpeedRun",
]

_ZERO12, _ZERO3, _BF16, _UNFUSED, _FUSED = (
    "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer", "FP16_UnfusedOptimizer",
    "FP16_Optimizer",
)
_KINDS = (_ZERO12, _ZERO3, _BF16, _UNFUSED, _FUSED)


def loaded() -> bool:
    return "deepspeed" in sys.modules


def is_engine(obj) -> bool:
    """A ``deepspeed.DeepSpeedEngine`` (tested by class name, so DeepSpeed is imported only when used)."""
    return loaded() and any(c.__name__ == "DeepSpeedEngine" for c in type(obj).__mro__)


def _kind(optimizer) -> str | None:
    if not loaded():
        return None
    names = {c.__name__ for c in type(optimizer).__mro__}
    return next((k for k in _KINDS if k in names), None)


def is_wrapper(optimizer) -> bool:
    """One of DeepSpeed's optimizer wrappers (ZeRO 1-3, BF16, FP16), whose inner optimizer steps fp32 masters."""
    return _kind(optimizer) is not None


def _managed(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


@dataclass(eq=False)
class _Group:
    """One flat fp32 tensor the inner optimizer steps, and the model parameters it is the master of."""

    members: list
    key: torch.Tensor  # the inner optimizer's parameter (its state's key)
    inner: object  # the torch.optim optimizer inside the wrapper


@dataclass(eq=False)
class Masters:
    """What the DeepSpeed optimizers of a call hold: their kinds, groups, and per-parameter masters (stage 0)."""

    wrappers: list = field(default_factory=list)  # (kind, optimizer)
    groups: list = field(default_factory=list)  # _Group
    unfused: dict = field(default_factory=dict)  # id(model param) -> its fp32 master (FP16_UnfusedOptimizer)
    fused: set = field(default_factory=set)  # id(model param) held by a fused FP16_Optimizer

    def owns(self, param) -> bool:
        return _managed(param) or id(param) in self.unfused or id(param) in self.fused


def masters_of(optimizers, targets=()) -> Masters:
    """The DeepSpeed wrappers among ``optimizers`` (and the ZeRO-3 ones the targets' parameters name) and the
    groups of masters they step."""
    m = Masters()
    seen = set()
    found = list(optimizers) + [getattr(t.param, "_z3_optimizer", None) for t in targets if t.param is not None]
    for opt in found:
        kind = _kind(opt) if opt is not None else None
        if kind is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        m.wrappers.append((kind, opt))
        inner = getattr(opt, "optimizer", None)
        if kind == _ZERO12:
            pairs = zip(opt.bit16_groups, opt.single_partition_of_fp32_groups)
        elif kind == _ZERO3:
            pairs = zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat)
        elif kind == _BF16:
            pairs = zip(opt.bf16_groups, opt.fp32_groups_flat_partition)
        elif kind == _UNFUSED:
            pairs = [([p], master) for g, mg in zip(opt.fp16_groups, opt.fp32_groups) for p, master in zip(g, mg)]
            m.unfused.update({id(p): master for (p,), master in pairs})
        else:  # _FUSED
            m.fused.update(id(p) for g in opt.fp16_groups for p in g)
            pairs = []
        m.groups += [_Group(list(members), key, inner) for members, key in pairs]
    return m


def engine_parts(model, optimizer):
    """``(model, optimizer)`` as ``apply`` takes them: a DeepSpeed engine's module, and its optimizer unless one
    is given; anything else as it is."""
    if is_engine(model):
        return model.module, model.optimizer if optimizer is None else optimizer
    return model, optimizer


def guard(model, targets, written: list, optimizers, reset: bool, stepped: bool = False) -> Masters | None:
    """What DeepSpeed keeps of the call's weights, after refusing (before anything changes) what cannot be
    written exactly; None when DeepSpeed holds none of them.

    ``written``: the parameters the call writes; ``reset``: whether it drops their optimizer state;
    ``stepped``: judge the parameter groups as if the optimizer had stepped (a group with no state yet has
    nothing to restart, so ``apply`` lets it pass). The same verdict on every rank.
    """
    if not loaded():
        return None
    masters = masters_of(optimizers, targets)
    managed = [t for t in targets if t.param is not None and masters.owns(t.param)]
    if not managed and not masters.wrappers:
        return None
    _check(managed, masters)
    if reset:
        _check_groups(masters, written, model, stepped)
    return masters if managed else None


def _check(managed, masters: Masters) -> None:
    """Refuse what DeepSpeed keeps where FIRE cannot write it: offloading, fused fp16, hpZ, model parallelism."""
    name = managed[0].name if managed else "the model"
    for kind, opt in masters.wrappers:
        if getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False) or getattr(
            opt, "offload_param", False
        ):
            raise ValueError(
                f"{name}: DeepSpeed {kind} offloads its optimizer state or parameters (offload_optimizer / "
                "offload_param), where FIRE cannot write the fp32 masters and their state consistently; nothing was "
                "changed. Turn offloading off for the run, or exclude these weights"
            )
    fused = [t.name for t in managed if id(t.param) in masters.fused]
    if fused:
        raise ValueError(
            f"{fused[0]}: DeepSpeed's fused FP16_Optimizer keeps one flat fp32 master per parameter group, which "
            "gives no access to one weight's master, so a projected weight would be overwritten by the old master "
            "at the next step; nothing was changed. Use ZeRO stage 1, 2 or 3 (or bf16), or exclude these weights"
        )
    for t in managed:
        if getattr(t.param, "ds_secondary_tensor", None) is not None:
            raise ValueError(
                f"{t.name}: has a ZeRO++ secondary partition (zero_hpz_partition_size > 1), which FIRE does not "
                "write; nothing was changed. Turn hpZ off for the run, or exclude this weight"
            )
    if managed and dist.is_initialized():
        for kind, opt in masters.wrappers:
            group = getattr(opt, "dp_process_group", None)
            if group is not None and dist.get_world_size(group) != dist.get_world_size():
                raise ValueError(
                    f"{name}: the DeepSpeed engine's data-parallel group has {dist.get_world_size(group)} of the "
                    f"{dist.get_world_size()} ranks (pipeline or tensor model parallelism), which FIRE does not "
                    "support on DeepSpeed; nothing was changed"
                )


def _check_groups(masters: Masters, written: list, model, stepped: bool) -> None:
    """A group whose state is shared by projected and other weights is refused (its step count is one)."""
    ids = {id(p) for p in written}
    for g in masters.groups:
        hit = [p for p in g.members if id(p) in ids]
        if not hit or len(hit) == len(g.members) or not (stepped or g.inner.state.get(g.key)):
            continue
        names = {id(p): n for n, p in model.named_parameters()}
        kept = [names.get(id(p), "?") for p in g.members if id(p) not in ids]
        projected = [names.get(id(p), "?") for p in hit]
        raise ValueError(
            f"{projected[0]}: DeepSpeed's optimizer steps it in one flat fp32 tensor with "
            f"{', '.join(kept[:3])}{' and more' if len(kept) > 3 else ''}, which FIRE does not project, and keeps "
            "one optimizer state (one Adam step count) for all of them, so the state of the projected weights "
            "cannot be restarted alone; nothing was changed. Put the weights FIRE projects in a parameter group of "
            "their own (fire_core.torch.param_groups(model)), or keep their state: apply(engine.module) without "
            "optimizer= still writes the weights and the fp32 masters"
        )


def reset_state(masters: Masters, params) -> int:
    """Drop the inner optimizer's state of every group all of whose weights are in ``params``; the count."""
    ids = {id(p) for p in params}
    dropped = 0
    for g in masters.groups:
        if g.members and all(id(p) in ids for p in g.members) and g.inner.state.pop(g.key, None) is not None:
            dropped += 1
    return dropped


# --- the projection -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Param:
    param: torch.Tensor
    blocks: list  # the _Targets of this parameter: the whole weight, or its blocks
    master: torch.Tensor | None = None  # a stage-0 FP16_UnfusedOptimizer master
    owner: int = 0
    new: torch.Tensor | None = None  # the projected whole weight in fp32, on its owner (then everywhere)

    @property
    def shape(self) -> tuple:
        return tuple(getattr(self.param, "ds_shape", self.param.shape))


@dataclass(eq=False)
class DeepSpeedRun:
    """Projected and checked on every rank; :meth:`commit` writes the weights, masters and partitions."""

    params: list
    rows: list = field(default_factory=list)
    dry_run: bool = False

    def commit(self) -> None:
        if self.dry_run:
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        world = dist.get_world_size() if dist.is_initialized() else 1
        with torch.no_grad():
            for p in self.params:
                if world > 1:
                    if p.new is None:
                        p.new = torch.empty(p.shape, dtype=torch.float32, device=_device(p.param))
                    dist.broadcast(p.new, src=p.owner)
                param = p.param
                if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition, and the whole where it is held
                    part = param.ds_tensor
                    rank = dist.get_rank(group=param.ds_process_group)
                    local = _slice(p.new, rank, part.numel())
                    part.copy_(local.to(part.dtype))
                    if param.numel() == math.prod(p.shape):
                        param.data.copy_(p.new.to(param.dtype))
                    if param.requires_grad:
                        safe_set_local_fp32_param(param, local)
                else:
                    param.data.copy_(p.new.to(param.dtype))
                    if p.master is not None:
                        p.master.copy_(p.new.reshape(p.master.shape))
                    elif hasattr(param, "_hp_mapping"):
                        safe_set_full_fp32_param(param, p.new)
                p.new = None


def _device(param) -> torch.device:
    part = getattr(param, "ds_tensor", None)
    return part.device if part is not None else param.device


def _slice(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 partition of ``full``: its ``size`` elements of the flat weight, zero-padded."""
    flat = full.reshape(-1)
    out = torch.zeros(size, dtype=flat.dtype, device=flat.device)
    piece = flat[rank * size : (rank + 1) * size]
    out[: piece.numel()] = piece
    return out


def _read(p: _Param) -> torch.Tensor:
    """The whole weight in fp32: its master where one exists (collective under ZeRO), else the gathered weight."""
    from deepspeed.utils import safe_get_full_fp32_param

    if p.master is not None:
        return p.master.detach().reshape(p.shape).float().clone()
    full = safe_get_full_fp32_param(p.param) if p.param.requires_grad else None
    if full is not None:
        return full.detach().reshape(p.shape).float().clone()
    if hasattr(p.param, "ds_id"):  # a frozen ZeRO-3 weight: no master; gather its partitions
        import deepspeed

        with deepspeed.zero.GatheredParameters([p.param], modifier_rank=None):
            return p.param.detach().reshape(p.shape).float().clone()
    return p.param.detach().float().clone()


def project(targets, masters: Masters, *, steps, method, scale, dry_run, report) -> DeepSpeedRun:
    """Read, assign, project and check ``targets`` (DeepSpeed-managed weights); nothing is written.

    Collective: every rank calls it with the same targets in the same order.
    """
    from ._distributed import assign_owners, matrix_cost, raise_agreed

    params: dict[int, _Param] = {}
    for t in targets:
        if id(t.param) not in params:
            params[id(t.param)] = _Param(t.param, [], masters.unfused.get(id(t.param)))
        params[id(t.param)].blocks.append(t)
    params = list(params.values())
    world = dist.get_world_size() if dist.is_initialized() else 1
    me = dist.get_rank() if dist.is_initialized() else 0
    costs = [
        sum(matrix_cost(tuple(t.given(torch.empty(p.shape, device="meta")).shape), t.layout) for t in p.blocks)
        for p in params
    ]
    for p, owner in zip(params, assign_owners(costs, world)):
        p.owner = owner

    rows, error, failure = [], None, None
    try:
        items, by_name = [], {}
        for p in params:  # every rank reads every weight (a collective); each keeps the ones it owns
            full = _read(p)
            if p.owner != me:
                continue
            p.new = full.clone()
            for t in p.blocks:
                items.append((t.name, t.given(full), t.layout))
                by_name[t.name] = (p, t.index)

        def write(name, value):
            p, index = by_name[name]
            p.new[index].copy_(value.reshape(p.new[index].shape))

        with torch.no_grad():
            rep = reinit_many(items, steps=steps, method=method, scale=scale, write=write, report=report)
        rows = rep.rows if report else []
    except Exception as err:  # raised on every rank below, so that no rank waits in a collective
        error, failure = (type(err).__name__, str(err)), err
    if world > 1:
        everything = [None] * world
        dist.all_gather_object(everything, (error, rows))
    else:
        everything = [(error, rows)]
    raise_agreed(next((err for err, _ in everything if err is not None), None), error, failure)
    return DeepSpeedRun(params, [row for _, part in everything for row in part], dry_run)
