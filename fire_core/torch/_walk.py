"""Walking a model: every weight once, under all its names, with what the table says of it.

Tied weights (one Parameter under two names, or two Parameters viewing the
same memory the same way) are one :class:`_Weight`; weights computed by
forward pre-hooks (pruning, hook-based spectral and weight norm) and
parametrized weights are found with the tensors that hold them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune

from ._table import Slot, _kind_of, _Where


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
        # a DeepSpeed ZeRO-3 parameter holds an empty placeholder between uses; ds_shape is the weight's shape
        return tuple(int(d) for d in getattr(t, "ds_shape", t.shape))

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


def _stored_tensors(plist) -> tuple:
    """The tensors a ParametrizationList stores: ``original``, or ``original0``, ``original1``..."""
    if plist.is_tensor:
        return (plist.original,)
    count = 0
    while hasattr(plist, f"original{count}"):
        count += 1
    return tuple(getattr(plist, f"original{k}") for k in range(count))
