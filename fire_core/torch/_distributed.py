"""FIRE on DTensor weights (FSDP2, HSDP, TP + FSDP2) by owner ranks: each whole matrix projected once, on one rank.

The torch adapter hands this module its selected weights whose parameters are
DTensors. A weight's *group* is the ranks that hold different pieces of it:
the ranks of its mesh that differ from this rank only in the mesh dimensions
its placements shard (``Shard``, or ``_StridedShard``, which ``fully_shard``
makes over a tensor-parallel shard); along the other mesh dimensions
(``Replicate()``) the weight is copied. Each parameter is given to one *owner*
rank of its group, the owners balanced by projection cost (greedy, largest
first, as distributed Muon implementations assign their matrices). Then, per
owner, one ``torch.distributed.gather`` brings the owner the local shards of
its parameters (each padded to the largest shard's size, so uneven shards
travel in one buffer); the owner puts its weights together and projects them
whole, batched, through :func:`fire_core.plan.reinit_many`; and, once every
rank knows that every owner succeeded, one ``torch.distributed.scatter`` per
owner sends each rank its shard of the result, which is copied into the
parameter's local storage (same DTensor, same placements). A rank thus holds
about ``1/group`` of the model whole at a time, never all of it, and never
runs Newton–Schulz on a shard. The report rows are exchanged with
``all_gather_object``, so every rank returns the complete report.

Which elements a rank holds is read from DTensor's own rule,
``torch.distributed.tensor._utils._compute_local_shape_and_global_offset``
(a block: its shape and offset, for any mesh coordinate; distributed
checkpoints place shards by it). A weight is taken only if those blocks tile
it exactly (:func:`_tiles`), and every rank's local shard is checked, over
the whole mesh, to have its block's shape. What that covers:

* FSDP2, ``(Shard(0),)`` on a 1-D mesh: the group is every rank;
* HSDP, ``(Replicate(), Shard(0))``: the group is a shard group, and every
  replica group does the same work on its own copy;
* tensor parallel + FSDP2 on a 2-D ``("dp", "tp")`` mesh:
  ``(_StridedShard(0), Shard(0))`` (colwise) or ``(Shard(0), Shard(1))``
  (rowwise): the group is every rank of the mesh, a process group made once
  per set of ranks (``new_group`` with local synchronization); and N-D
  meshes alike;
* a weight replicated on every mesh dimension: a group of one, every rank
  projects it itself, with no communication.

Anything else (``Partial`` placements, strided shards whose pieces are not
blocks) is left to the caller, which projects it through DTensor ops
(``distributed="replicate"``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor import placement_types
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from ..core._array import sum_over_mesh
from ..core.layout import parse_layout
from ..core.plan import reinit_many

__all__ = [
    "split_owned", "project_owned", "assign_owners", "matrix_cost", "raise_agreed", "placement_axis", "Axis", "OwnerRun",
    "last_stats",
]

#: Communication and work of the last owner-strategy call on this rank (for benchmarks and tests), summed over
#: its groups: ``sent``/``received`` bytes, ``weights`` projected here, their ``cost``; ``owners``: the owner
#: (rank in its group) of each parameter; ``world``: the largest group; ``groups``: per group, its ``ranks``
#: (global), ``owners``, and the ``weights`` and ``cost`` projected here.
last_stats: dict = {}

_StridedShard = getattr(placement_types, "_StridedShard", Shard)  # not a Shard subclass in torch 2.13


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


# --- which ranks hold which block of a weight ---------------------------------------------------------------


def _sharding(placement) -> bool:
    return isinstance(placement, (Shard, _StridedShard))


@functools.lru_cache(maxsize=4096)
def _blocks(shape: tuple, mesh_shape: tuple, placements: tuple) -> dict:
    """``{mesh coordinate: (local shape, global offset)}`` of a weight, by DTensor's own rule.

    Coordinates along replicated mesh dimensions are 0 (the block does not
    depend on them): look them up with :func:`_key`.
    """
    sharded = [k for k, pl in enumerate(placements) if _sharding(pl)]
    out = {}
    for sub in np.ndindex(*(mesh_shape[k] for k in sharded)):
        coord = [0] * len(mesh_shape)
        for k, c in zip(sharded, sub):
            coord[k] = int(c)
        local, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, coord, placements)
        out[tuple(coord)] = (tuple(int(s) for s in local), tuple(int(o) for o in offset))
    return out


def _key(coord, placements) -> tuple:
    return tuple(int(c) if _sharding(pl) else 0 for c, pl in zip(coord, placements))


def _tiles(shape: tuple, mesh_shape: tuple, placements: tuple) -> bool:
    """Whether each rank's block is exactly the elements DTensor gives it.

    DTensor's rule gives a block's shape and its *first* offset per tensor
    dimension; a strided shard can hold elements that are not consecutive.
    Along each tensor dimension, the ranks that differ in the mesh
    dimensions sharding it hold disjoint sets that cover it; if their spans
    ``[offset, offset + size)`` follow each other from 0 to the dimension's
    size, each set is its span (the set holding 0 has ``size`` elements in
    ``[0, size)``, and so on).
    """
    blocks = _blocks(shape, mesh_shape, placements)
    for d, n in enumerate(shape):
        on_d = [k for k, pl in enumerate(placements) if _sharding(pl) and pl.dim == d]
        spans = {}
        for coord, (local, offset) in blocks.items():
            span = (offset[d], local[d]) if local[d] else None
            if spans.setdefault(tuple(coord[k] for k in on_d), span) != span:
                return False
        end = 0
        for start, size in sorted(s for s in spans.values() if s is not None):
            if start != end:
                return False
            end += size
        if end != n:
            return False
    return True


@dataclass(frozen=True)
class Axis:
    """The mesh dimensions a weight is sharded along; its group is this rank's ranks of the mesh along them."""

    mesh: object  # a DeviceMesh
    dims: tuple  # which of its dimensions, ascending; () for a weight replicated everywhere


def placement_axis(tensor) -> Axis | None:
    """The :class:`Axis` of a DTensor this module can project by owner ranks, else None.

    Decided from the weight's shape, the mesh's shape and the placements
    alone, which every rank holds alike: ``Replicate``, ``Shard`` and
    ``_StridedShard`` placements whose blocks tile the weight
    (:func:`_tiles`). That each rank's own shard has its block's shape is
    checked by :func:`split_owned`, over the whole mesh.
    """
    if not isinstance(tensor, DTensor):
        return None
    placements = tuple(tensor.placements)
    if not all(type(pl) is Replicate or _sharding(pl) for pl in placements):  # Partial
        return None
    mesh = tensor.device_mesh
    if not _tiles(tuple(tensor.shape), tuple(mesh.shape), placements):
        return None
    return Axis(mesh, tuple(k for k, pl in enumerate(placements) if _sharding(pl)))


def _group(axis: Axis):
    """(process group, its global ranks in group order) of this rank along ``axis``; (None, [rank]) for no dims."""
    if not axis.dims:
        return None, [dist.get_rank()]
    if len(axis.dims) == 1:
        group = axis.mesh.get_group(axis.dims[0])
    else:
        coord = axis.mesh.get_coordinate()
        index = tuple(slice(None) if d in axis.dims else c for d, c in enumerate(coord))
        group = _subgroup(tuple(sorted(axis.mesh.mesh[index].flatten().tolist())))
    return group, dist.get_process_group_ranks(group)


_subgroups: dict = {}  # {"world": the default group they belong to, ranks: group}


def _subgroup(ranks: tuple):
    """A process group of ``ranks``, made once (only its members take part: local synchronization)."""
    if _subgroups.get("world") is not dist.group.WORLD:  # a new default group: the old subgroups are gone
        _subgroups.clear()
        _subgroups["world"] = dist.group.WORLD
    if ranks not in _subgroups:
        _subgroups[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _subgroups[ranks]


def split_owned(targets) -> tuple[list, dict]:
    """``targets`` -> (those left to the caller, {axis: targets projected here by owner ranks}).

    Starts :data:`last_stats` afresh. Collective over the meshes of the
    owned targets (every rank calls it with the same targets): a weight
    whose shards do not have the shapes of its blocks is a ValueError on
    every rank, before anything is written.
    """
    last_stats.clear()
    last_stats.update(sent=0, received=0, weights=0, cost=0, world=0, owners=[], groups=[])
    rest, axes = [], {}
    for t in targets:
        axis = placement_axis(t.param)
        if axis is not None:
            axes.setdefault(axis, []).append(t)
        else:
            rest.append(t)
    _check_pieces(axes)
    return rest, axes


def _check_pieces(axes: dict) -> None:
    """ValueError on every rank if some rank's shard of an owned weight is not the piece its placements give.

    The gather and scatter of the owner path, and DTensor's own
    redistribution, assume that split (``torch.chunk``'s along each sharded
    mesh dimension; ``distribute_tensor``, ``parallelize_module`` and
    ``fully_shard`` make it; ``DTensor.from_local`` with ``shape=`` takes
    any local shapes). A rank sees only its own shard, so a verdict from it
    alone would send the ranks down different paths, into collectives that
    never match; the mismatch flags are summed over each mesh, so all
    decide alike.
    """
    by_mesh: dict = {}  # mesh -> {id(param): target}, in target order
    for axis, on_axis in axes.items():
        for t in on_axis if axis.dims else ():
            by_mesh.setdefault(axis.mesh, {}).setdefault(id(t.param), t)
    for mesh, params in by_mesh.items():
        coord = mesh.get_coordinate()
        if coord is None:  # not a rank of this mesh: it joins none of its collectives
            continue
        params = list(params.values())
        local = [tuple(t.param.to_local().shape) for t in params]
        expected = [_block(t.param, coord)[0] for t in params]
        device = params[0].param.to_local().device
        wrong = torch.tensor([int(a != b) for a, b in zip(local, expected)], dtype=torch.int32, device=device)
        sum_over_mesh(wrong, mesh)
        if not wrong.any():
            continue
        t = params[int(torch.nonzero(wrong)[0])]
        p = t.param
        # Each rank's local shape, in its own slot of the mesh, for the message.
        me = int(np.ravel_multi_index(tuple(coord), tuple(mesh.shape)))
        held = torch.zeros(mesh.size(), p.ndim, dtype=torch.int64, device=device)
        held[me] = torch.tensor(p.to_local().shape, dtype=torch.int64, device=device)
        sum_over_mesh(held, mesh)
        dims = sorted({pl.dim for pl in p.placements if _sharding(pl)})

        def sizes(shape):
            return int(shape[dims[0]]) if len(dims) == 1 else tuple(int(shape[d]) for d in dims)

        ranks, coords = mesh.mesh.flatten().tolist(), list(np.ndindex(*tuple(mesh.shape)))
        want = [sizes(_block(p, c)[0]) for c in coords]
        off = [f"rank {ranks[k]}: {sizes(h)}" for k, h in enumerate(held.tolist()) if sizes(h) != want[k]]
        name = getattr(t, "param_name", t.name)
        if len(dims) == 1:
            what = f"dimension {dims[0]} (size {p.shape[dims[0]]})"
        else:
            what = f"dimensions {dims} (shape {tuple(p.shape)})"
        raise ValueError(
            f"{name}: its shards are not torch.chunk's split of {what} that its placements {tuple(p.placements)} "
            f"give over the mesh of shape {tuple(mesh.shape)}, rank by rank {want} ({'; '.join(off[:4])}); FIRE's "
            "gather and DTensor's own ops assume that split. Shard it with distribute_tensor or fully_shard, or "
            "exclude it"
        )


def _block(param: DTensor, coord) -> tuple:
    """(local shape, global offset) of the block of ``param`` at mesh coordinate ``coord``."""
    placements = tuple(param.placements)
    return _blocks(tuple(param.shape), tuple(param.device_mesh.shape), placements)[_key(coord, placements)]


# --- the owner path ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Param:
    """One DTensor parameter and the blocks of it to project."""

    param: DTensor
    blocks: list  # (report name, index into the weight, layout)
    pieces: list  # (local shape, global offset) of each rank of the group, in group order
    owner: int = 0  # its rank in the group
    full: torch.Tensor | None = None  # the whole weight, on its owner
    new: torch.Tensor | None = None  # the projected whole weight, on its owner

    @property
    def padded(self) -> int:
        """Elements each rank's piece travels in: the largest piece's."""
        return max(math.prod(shape) for shape, _ in self.pieces)

    def box(self, k: int) -> tuple:
        """Index of group rank ``k``'s block in the whole weight."""
        shape, offset = self.pieces[k]
        return tuple(slice(o, o + s) for o, s in zip(offset, shape))


@dataclass(eq=False)
class OwnerRun:
    """The projection done and checked on every rank; :meth:`commit` sends the results to the shards."""

    params: list
    group: object
    ranks: list  # global ranks of the group, in group order
    rows: list = field(default_factory=list)
    dry_run: bool = False

    def commit(self) -> None:
        if self.dry_run:
            return
        world, me = len(self.ranks), self.ranks.index(dist.get_rank())
        with torch.no_grad():
            for owner in range(world):
                mine = [p for p in self.params if p.owner == owner]
                if not mine:
                    continue
                if world == 1:  # the whole weight is here
                    for p in mine:
                        p.param.to_local().copy_(p.new)
                    continue
                recv = torch.empty(sum(p.padded for p in mine), **_like(mine[0]))
                pieces = None
                if me == owner:
                    pieces = [torch.cat([_padded(p.new[p.box(r)], p.padded) for p in mine]) for r in range(world)]
                    last_stats["sent"] += sum(x.numel() * x.element_size() for r, x in enumerate(pieces) if r != me)
                else:
                    last_stats["received"] += recv.numel() * recv.element_size()
                dist.scatter(recv, pieces, src=self.ranks[owner], group=self.group)
                start = 0
                for p in mine:
                    local = p.param.to_local()
                    local.copy_(recv[start : start + local.numel()].view(local.shape))
                    start += p.padded


def project_owned(targets, axis: Axis, *, steps, method, scale, dry_run, report) -> OwnerRun:
    """Gather, project and check the weights of ``targets`` (``_Target``s sharded along ``axis``); nothing is written.

    Collective: every rank of the axis's mesh must call it with the same
    targets in the same order (as ``apply`` does on a sharded model). An
    error on any owner (a NaN weight, a bad option) is raised on every rank
    of the mesh, the same error everywhere (on an HSDP mesh in the other
    replica groups too), before any write.
    """
    group, ranks = _group(axis)
    world, me = len(ranks), ranks.index(dist.get_rank())
    coords = {int(r): c for c, r in np.ndenumerate(axis.mesh.mesh.cpu().numpy())}
    params: dict[int, _Param] = {}
    for t in targets:
        if id(t.param) not in params:
            params[id(t.param)] = _Param(t.param, [], [_block(t.param, coords[r]) for r in ranks])
        params[id(t.param)].blocks.append((t.name, t.index, t.layout))
    params = list(params.values())
    costs = [
        sum(matrix_cost(torch.empty(p.param.shape, device="meta")[index].shape, lay) for _, index, lay in p.blocks)
        for p in params
    ]
    for p, owner in zip(params, assign_owners(costs, world)):
        p.owner = owner
    stats = dict(ranks=ranks, owners=[p.owner for p in params], weights=0, cost=0)
    last_stats["groups"].append(stats)
    last_stats["owners"] += stats["owners"]
    last_stats["world"] = max(last_stats["world"], world)

    # 1. Each owner gathers the shards of its weights (in a group of one, the local tensor is the whole weight).
    with torch.no_grad():
        for owner in range(world):
            mine = [p for p in params if p.owner == owner]
            if not mine:
                continue
            if world == 1:
                for p in mine:
                    p.full = p.param.to_local().detach()
                continue
            send = torch.cat([_padded(p.param.to_local(), p.padded) for p in mine])
            bufs = [torch.empty_like(send) for _ in range(world)] if me == owner else None
            if me == owner:
                last_stats["received"] += (world - 1) * send.numel() * send.element_size()
            else:
                last_stats["sent"] += send.numel() * send.element_size()
            dist.gather(send, bufs, dst=ranks[owner], group=group)
            if me == owner:
                start = 0
                for p in mine:
                    p.full = _assemble(p, [b[start : start + p.padded] for b in bufs])
                    start += p.padded

    # 2. Each owner projects its weights, batched; errors are collected.
    here = [p for p in params if p.full is not None]
    rows, error, failure = [], None, None
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
        rows = rep.rows if report else []
        stats["weights"] = sum(len(p.blocks) for p in here)
        stats["cost"] = sum(c for p, c in zip(params, costs) if p.owner == me)
        last_stats["weights"] += stats["weights"]
        last_stats["cost"] += stats["cost"]
    except Exception as err:  # raised on every rank below, so that no rank waits in a collective
        error = (type(err).__name__, str(err))
        failure = err

    # 3. Every rank learns every owner's rows and errors; then nothing or everything is written.
    everything = [(error, rows)]
    if world > 1:
        everything = [None] * world
        dist.all_gather_object(everything, (error, rows), group=group)
    first = next((err for err, _ in everything if err is not None), None)
    # Along the mesh dimensions the weight is copied on (HSDP's replicas), the other groups did the same work on
    # their own copies: a failure in one (a NaN in one replica only) must stop them all, or the copies would part.
    for dim in range(axis.mesh.ndim):
        if dim not in axis.dims:
            seen = [None] * axis.mesh.size(dim)
            dist.all_gather_object(seen, first, group=axis.mesh.get_group(dim))
            first = next((err for err in seen if err is not None), None)
    raise_agreed(first, error, failure)  # the same error on every rank of the mesh: the first in mesh order
    all_rows = [row for _, part in everything for row in part]
    return OwnerRun(params, group, ranks, all_rows, dry_run)


def raise_agreed(first, error, failure) -> None:
    """Raise ``first``, the error the ranks agreed on (``(type name, message)``, or None: nothing to raise).

    This rank's own exception ``failure`` if ``error`` (its ``(type name,
    message)``) is the one, so its traceback is kept; else a new exception of
    that type (TypeError, ValueError; RuntimeError for any other) with the
    same message.
    """
    if first is None:
        return
    if error == first:
        raise failure
    kind, message = first
    raise {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)(message)


# --- padding: each rank's block travels flat, padded to the largest block's size ---------------------------


def _like(p: _Param) -> dict:
    local = p.param.to_local()
    return dict(dtype=local.dtype, device=local.device)


def _padded(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` flat, zero-padded to ``n`` elements."""
    out = torch.zeros(n, dtype=x.dtype, device=x.device)
    out[: x.numel()] = x.reshape(-1)
    return out


def _assemble(p: _Param, flat_pieces) -> torch.Tensor:
    """The whole weight from every group rank's padded flat block (the blocks tile it)."""
    local = p.param.to_local()
    full = torch.empty(p.param.shape, dtype=local.dtype, device=local.device)
    for k, flat in enumerate(flat_pieces):
        shape = p.pieces[k][0]
        full[p.box(k)] = flat[: math.prod(shape)].view(shape)
    return full
