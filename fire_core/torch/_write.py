"""Projecting the selected weights and writing them back into their own storage.

Plain weights are written in place (also DTensor shards); a parametrized
weight's stored tensors get what its ``right_inverse`` gives, checked to
reproduce the projection; DTensor weights go to their owner ranks
(:mod:`._distributed`) or through DTensor's sharded ops.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from ..core._array import sum_over_mesh, to_floats
from ..core.plan import reinit_many
from . import _deepspeed
from ._select import _Target


def _written(targets) -> list[torch.Tensor]:
    """The tensors FIRE writes: each plain weight (and the Parameters tied to it by memory), or a
    parametrized weight's stored tensors, once."""
    written = {}
    for t in targets:
        for p in t.originals if t.plist is not None else (t.param, *t.tied):
            written[id(p)] = p
    return list(written.values())


def _project(targets, steps, method, scale, dry_run, report, distributed="owner", masters=None):
    """Project everything; write the plain weights, return the values parametrizations must store.

    Parametrized weights are projected first, into buffers: what their
    parametrizations must store is worked out (and checked) before anything
    is written, so a parametrization that cannot hold the result fails cleanly.
    DTensor weights for owner ranks, and weights a DeepSpeed engine keeps
    (``masters``: :class:`._deepspeed.Masters`), are projected (and checked on
    every rank) before the plain weights and written after them.
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

    deepspeed_run = None
    if masters is not None:
        managed = [t for t in plain if masters.owns(t.param)]
        if managed:
            plain = [t for t in plain if not masters.owns(t.param)]
            deepspeed_run = _deepspeed.project(
                managed, masters, steps=steps, method=method, scale=scale, dry_run=dry_run, report=report
            )
            rows += deepspeed_run.rows

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
    if deepspeed_run is not None:
        deepspeed_run.commit()
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


# --- parametrized weights: what their originals must store ---------------------------


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
