"""FIRE on DTensor (FSDP2) weights by owner ranks: each whole matrix is projected once, on one rank.

The torch adapter hands this module its selected weights whose parameters are
DTensors. Each parameter is given to one *owner* rank of its device mesh, the
owners balanced by projection cost (greedy, largest first, as distributed
Muon implementations assign their matrices). Then, per owner, one
``torch.distributed.gather`` brings the owner the local shards of its
parameters (padded to the size of ``torch.chunk``'s first chunk, so uneven
shards travel in one buffer); the owner puts its weights together and
projects them whole, batched, through :func:`fire_core.plan.reinit_many`;
and, once every rank knows that every owner succeeded, one
``torch.distributed.scatter`` per owner sends each rank its shard of the
result, which is copied into the parameter's local storage. A rank thus holds
about ``1/world`` of the model whole at a time, never all of it, and never
runs Newton–Schulz on a shard. The report rows are exchanged with
``all_gather_object``, so every rank returns the complete report.

Handled here: DTensors split along at most one mesh dimension, as
``Shard(dim)`` with ``torch.chunk``'s split (what ``fully_shard`` makes),
and ``Replicate()`` on every other mesh dimension. On a 1-D mesh that is
FSDP2; on a 2-D mesh it is HSDP (``Replicate(), Shard(0)``), where the
owners are the ranks of each shard group and every replica group does the
same work on its own copy. A weight replicated on every mesh dimension is
projected by every rank itself, with no communication. Anything else
(FSDP + tensor parallel: two ``Shard`` placements; strided or partial
placements) is left to the caller, which projects it through DTensor ops
(``distributed="replicate"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..core._array import sum_over_mesh
from ..core.layout import parse_layout
from ..core.plan import reinit_many

__all__ = ["split_owned", "project_owned", "assign_owners", "matrix_cost", "placement_axis", "Axis", "OwnerRun", "last_stats"]

#: Communication and work of the last owner-strategy call on this rank (for benchmarks and tests):
#: ``sent``/``received`` bytes, ``weights`` projected here, ``cost`` of them, ``owners`` per parameter.
last_stats: dict = {}


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Owner rank of each item: largest cost first, each to the least loaded rank (lowest rank on ties).

    Greedy longest-processing-time scheduling: the most loaded rank ends at most
    4/3 of the optimum; with many matrices the ranks end nearly equal.
    """
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    load = [0.0] * world
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[k] = r
        load[r] += costs[k]
    return owners


def matrix_cost(shape, layout: str) -> int:
    """Work of projecting one weight: ``taps * d_out * d_in * min(d_out, d_in)`` (its matmuls' flops / steps)."""
    lay = parse_layout(layout, shape)
    return lay.taps * lay.d_out * lay.d_in * min(lay.d_out, lay.d_in)


@dataclass(frozen=True)
class Axis:
    """The mesh dimension a weight is split along: its owners are the ranks of that dimension's group."""

    mesh: object  # a DeviceMesh
    dim: int  # which of its dimensions

    @property
    def size(self) -> int:
        return self.mesh.size(self.dim)

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank(self.dim)

    @property
    def group(self):
        return self.mesh.get_group(self.dim)


def placement_axis(tensor) -> tuple[Axis, object] | None:
    """``(axis, placement)`` of a DTensor this module can project by owner ranks, else None.

    The axis is the mesh dimension of its one ``Shard`` placement (dimension
    0 if it is replicated everywhere), the placement that one. Decided from
    the placements alone, which every rank holds alike; that each rank's
    shard is ``torch.chunk``'s piece is checked by :func:`split_owned`, over
    the whole mesh.
    """
    if not isinstance(tensor, DTensor):
        return None
    split = [(k, pl) for k, pl in enumerate(tensor.placements) if type(pl) is not Replicate]
    if len(split) > 1 or any(type(pl) is not Shard for _, pl in split):  # _StridedShard and Partial: not chunk-split
        return None
    k, placement = split[0] if split else (0, Replicate())
    return Axis(tensor.device_mesh, k), placement


def split_owned(targets) -> tuple[list, dict]:
    """``targets`` -> (those left to the caller, {mesh axis: targets projected here by owner ranks}).

    Collective over the meshes of the owned targets (every rank calls it
    with the same targets): a weight whose shards are not ``torch.chunk``'s
    pieces is a ValueError on every rank, before anything is written.
    """
    rest, axes = [], {}
    for t in targets:
        found = placement_axis(t.param)
        if found is not None:
            axes.setdefault(found[0], []).append(t)
        else:
            rest.append(t)
    _check_chunk_pieces(axes)
    return rest, axes


def _check_chunk_pieces(axes: dict) -> None:
    """ValueError on every rank if some rank's shard of an owned weight is not its ``torch.chunk`` piece.

    The gather and scatter of the owner path, and DTensor's own
    redistribution, assume that split (``distribute_tensor`` and
    ``fully_shard`` make it; ``DTensor.from_local`` with ``shape=`` takes any
    local shapes). A rank sees only its own shard, so a verdict from it alone
    would send the ranks down different paths, into collectives that never
    match; the mismatch flags are summed over each mesh, so all decide alike.
    """
    by_mesh: dict = {}  # mesh -> {id(param): (target, axis, Shard placement)}, in target order
    for axis, on_axis in axes.items():
        for t in on_axis:
            placement = placement_axis(t.param)[1]
            if type(placement) is Shard:
                by_mesh.setdefault(axis.mesh, {}).setdefault(id(t.param), (t, axis, placement))
    for mesh, params in by_mesh.items():
        if mesh.get_coordinate() is None:  # not a rank of this mesh: it joins none of its collectives
            continue
        params = list(params.values())
        local = [tuple(t.param.to_local().shape) for t, _, _ in params]
        expected = [_piece_shape(t.param.shape, pl.dim, axis.size, axis.rank) for t, axis, pl in params]
        device = params[0][0].param.to_local().device
        wrong = torch.tensor([int(a != b) for a, b in zip(local, expected)], dtype=torch.int32, device=device)
        sum_over_mesh(wrong, mesh)
        if not wrong.any():
            continue
        t, axis, pl = params[int(torch.nonzero(wrong)[0])]
        # Each rank's size along the split dimension, in its own slot of the mesh, for the message.
        me = int(np.ravel_multi_index(tuple(mesh.get_coordinate()), tuple(mesh.shape)))
        sizes = torch.zeros(mesh.size(), dtype=torch.int64, device=device)
        sizes[me] = t.param.to_local().shape[pl.dim]
        sum_over_mesh(sizes, mesh)
        ranks, sizes = mesh.mesh.flatten().tolist(), sizes.tolist()
        size, world = t.param.shape[pl.dim], axis.size
        chunk = -(-size // world)
        want = [max(0, min(chunk, size - r * chunk)) for r in range(world)]
        coords = [tuple(c) for c in np.ndindex(*tuple(mesh.shape))]
        held = [f"rank {ranks[k]}: {sizes[k]}" for k, c in enumerate(coords) if sizes[k] != want[c[axis.dim]]]
        name = getattr(t, "param_name", t.name)
        raise ValueError(
            f"{name}: its shards are not torch.chunk's split of dimension {pl.dim} (size {size}) over the {world} "
            f"ranks of mesh dimension {axis.dim}, which gives {want} ({'; '.join(held[:4])}); FIRE's gather and "
            "DTensor's own ops assume that split. Shard it with distribute_tensor or fully_shard, or exclude it"
        )


def _piece_shape(shape, dim: int, world: int, r: int) -> tuple:
    size = shape[dim]
    chunk = -(-size // world)
    out = list(shape)
    out[dim] = max(0, min(chunk, size - r * chunk))
    return tuple(out)


@dataclass(eq=False)
class _Param:
    """One DTensor parameter and the blocks of it to project."""

    param: DTensor
    blocks: list  # (report name, index into the weight, layout)
    placement: object = None  # Shard(dim) along the owners' axis, or Replicate()
    world: int = 1  # ranks along that axis
    owner: int = 0
    full: torch.Tensor | None = None  # the whole weight, on its owner
    new: torch.Tensor | None = None  # the projected whole weight, on its owner

    @property
    def dim(self) -> int:
        return self.placement.dim

    @property
    def replicated(self) -> bool:
        return isinstance(self.placement, Replicate)


@dataclass(eq=False)
class OwnerRun:
    """The projection done and checked on every rank; :meth:`commit` sends the results to the shards."""

    params: list
    axis: Axis
    rows: list = field(default_factory=list)
    dry_run: bool = False

    def commit(self) -> None:
        if self.dry_run:
            return
        world, me, group = self.axis.size, self.axis.rank, self.axis.group
        with torch.no_grad():
            for p in self.params:
                if p.replicated:
                    p.param.to_local().copy_(p.new)
            sharded = [p for p in self.params if not p.replicated]
            for owner in range(world):
                mine = [p for p in sharded if p.owner == owner]
                if not mine:
                    continue
                recv = torch.empty(sum(_padded_numel(p) for p in mine), **_like(mine[0]))
                pieces = None
                if me == owner:
                    pieces = [torch.cat([_padded_piece(p.new, p, r) for p in mine]) for r in range(world)]
                    last_stats["sent"] += sum(x.numel() * x.element_size() for r, x in enumerate(pieces) if r != me)
                else:
                    last_stats["received"] += recv.numel() * recv.element_size()
                dist.scatter(recv, pieces, src=dist.get_global_rank(group, owner), group=group)
                start = 0
                for p in mine:
                    n = _padded_numel(p)
                    _unpad_into(p.param.to_local(), recv[start : start + n], p)
                    start += n


def project_owned(targets, axis: Axis, *, steps, method, scale, dry_run, report) -> OwnerRun:
    """Gather, project and check the weights of ``targets`` (``_Target``s split along ``axis``); nothing is written.

    Collective: every rank of the axis's mesh must call it with the same
    targets in the same order (as ``apply`` does on an FSDP2 model). An error
    on any owner (a NaN weight, a bad option) is raised on every rank of the
    mesh, the same error everywhere (on a 2-D mesh in the other replica
    groups too), before any write.
    """
    world, me, group = axis.size, axis.rank, axis.group
    params: dict[int, _Param] = {}
    for t in targets:
        if id(t.param) not in params:
            params[id(t.param)] = _Param(t.param, [], placement_axis(t.param)[1], world)
        params[id(t.param)].blocks.append((t.name, t.index, t.layout))
    params = list(params.values())
    costs = [
        sum(matrix_cost(torch.empty(p.param.shape, device="meta")[index].shape, lay) for _, index, lay in p.blocks)
        for p in params
    ]
    for p, owner in zip(params, assign_owners(costs, world)):
        p.owner = owner
    last_stats.clear()
    last_stats.update(sent=0, received=0, weights=0, cost=0, world=world, owners=[p.owner for p in params])

    # 1. Each owner gathers the shards of its weights (replicated weights are whole everywhere).
    sharded = [p for p in params if not p.replicated]
    with torch.no_grad():
        for p in params:
            if p.replicated:
                p.full = p.param.to_local().detach()
        for owner in range(world):
            mine = [p for p in sharded if p.owner == owner]
            if not mine:
                continue
            send = torch.cat([_padded_piece(p.param.to_local(), p, me, local=True) for p in mine])
            bufs = [torch.empty_like(send) for _ in range(world)] if me == owner else None
            if me == owner:
                last_stats["received"] += (world - 1) * send.numel() * send.element_size()
            else:
                last_stats["sent"] += send.numel() * send.element_size()
            dist.gather(send, bufs, dst=dist.get_global_rank(group, owner), group=group)
            if me == owner:
                start = 0
                for p in mine:
                    n = _padded_numel(p)
                    p.full = _assemble([b[start : start + n] for b in bufs], p, world)
                    start += n

    # 2. Each owner projects its weights (replicated ones: every rank), batched; errors are collected.
    here = [p for p in params if p.full is not None]
    rows, error = [], None
    try:
        by_name, items = {}, []
        for p in here:
            for name, index, lay in p.blocks:
                by_name[name] = (p, index)
                items.append((name, p.full[index], lay))

        def write(name, value):
            p, index = by_name[name]
            p.new[index].copy_(value)

        with torch.no_grad():
            for p in here:
                p.new = p.full.detach().clone()
            rep = reinit_many(items, steps=steps, method=method, scale=scale, write=write, report=report)
        if report:
            # replicated weights are projected on every rank; their rows are reported by their owner
            keep = {name for p in here if p.owner == me for name, _, _ in p.blocks}
            rows = [row for row in rep.rows if row["name"] in keep]
        last_stats["weights"] = sum(len(p.blocks) for p in here if p.owner == me)
        last_stats["cost"] = sum(c for p, c in zip(params, costs) if p.owner == me)
    except Exception as err:  # raised on every rank below, so that no rank waits in a collective
        error = (type(err).__name__, str(err))
        failure = err

    # 3. Every rank learns every owner's rows and errors; then nothing or everything is written.
    everything = [None] * world
    dist.all_gather_object(everything, (error, rows), group=group)
    first = next((err for err, _ in everything if err is not None), None)
    # On a 2-D mesh (HSDP) the other groups of the mesh did the same work on their own copies: a failure
    # in one (a NaN in one replica only) must stop them all, or the replicas would part ways.
    for dim in range(axis.mesh.ndim):
        if dim != axis.dim:
            seen = [None] * axis.mesh.size(dim)
            dist.all_gather_object(seen, first, group=axis.mesh.get_group(dim))
            first = next((err for err in seen if err is not None), None)
    if first is not None:  # the same error on every rank of the mesh: the first in mesh order
        if error == first:
            raise failure
        kind, message = first
        raise {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)(message)
    all_rows = [row for _, part in everything for row in part]
    return OwnerRun(params, axis, all_rows, dry_run)


# --- padding: each rank's piece of a weight travels as its mesh coordinate's torch.chunk, padded -------


def _like(p: _Param) -> dict:
    local = p.param.to_local()
    return dict(dtype=local.dtype, device=local.device)


def _padded_numel(p: _Param) -> int:
    shape = list(p.param.shape)
    shape[p.dim] = -(-shape[p.dim] // p.world)
    return math.prod(shape)


def _padded_piece(x: torch.Tensor, p: _Param, r: int, local: bool = False) -> torch.Tensor:
    """Rank ``r``'s chunk of the whole weight ``x`` (or ``x`` itself if ``local``), padded and flat."""
    size = p.param.shape[p.dim]
    chunk = -(-size // p.world)
    front = x.movedim(p.dim, 0)
    if not local:
        front = front[r * chunk : min((r + 1) * chunk, size)]
    out = torch.zeros((chunk,) + tuple(front.shape[1:]), dtype=x.dtype, device=x.device)
    out[: front.shape[0]] = front
    return out.reshape(-1)


def _assemble(flat_pieces, p: _Param, world: int) -> torch.Tensor:
    """The whole weight from every rank's padded flat piece."""
    shape = list(p.param.shape)
    size = shape[p.dim]
    chunk = -(-size // world)
    rest = shape[: p.dim] + shape[p.dim + 1 :]
    parts = []
    for r, flat in enumerate(flat_pieces):
        keep = max(0, min(chunk, size - r * chunk))
        parts.append(flat.reshape([chunk] + rest)[:keep])
    return torch.cat(parts).movedim(0, p.dim)


def _unpad_into(local: torch.Tensor, flat: torch.Tensor, p: _Param) -> None:
    front = local.movedim(p.dim, 0)
    chunk = -(-p.param.shape[p.dim] // p.world)
    front.copy_(flat.reshape((chunk,) + tuple(front.shape[1:]))[: front.shape[0]])
