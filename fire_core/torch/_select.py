"""Selection: the weights to project (:class:`_Target`, a whole weight or one block), and those left alone, with why.

Reads the walk (:mod:`._walk`) and the table's slots, applies ``include``,
``exclude``, ``split``, ``layouts`` and ``frozen``, cuts fused weights into
their blocks, and records every weight left alone in a :class:`Report`'s
``skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.patterns import Patterns, glob_match, matches
from ..core.report import Report
from ._checks import _Options, _parametrization_problem, _problem, _refuse_wrappers
from ._table import _EMBEDDING, _EMPTY, _FROZEN, _LAYOUT_NONE, _NO_RULE, _NOT_INCLUDED, _TIED_HEAD, Slot
from ._walk import _walk, _Weight

_WRAPPERS = ("_orig_mod", "module")  # torch.compile; (Distributed)DataParallel


# --- selection ------------------------------------------------------------------------


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
                        block, primary, tensor, slot.layout, index, w.tensor if w.plist is None else None, w.plist,
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
        if hasattr(w.tensor, "ds_shape") and tuple(w.tensor.shape) != tuple(w.tensor.ds_shape):
            # DeepSpeed ZeRO-3: the Parameter is an empty placeholder; its values are fetched when projected
            # (fire_core.torch._deepspeed), so selection sees a stand-in of the weight's shape, without values
            return torch.empty(w.tensor.ds_shape, dtype=w.tensor.dtype, device="meta")
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
