"""What is checked before anything is written: the selection options, and each selected weight.

The options of :func:`fire_core.torch.apply` and :func:`fire_core.torch.select`
as one checked record (:class:`_Options`); the wrappers and parametrizations
FIRE refuses; and :func:`_problem`, why a selected weight cannot be projected
(hooks, overlapping memory, lazy, meta, sparse, inference or non-leaf
tensors, non-float dtypes, partly frozen ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..core.patterns import Patterns
from ._table import Slot
from ._walk import _Weight


# --- options ------------------------------------------------------------------------


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


# --- refusals ------------------------------------------------------------------------


def _refuse_wrappers(model: nn.Module) -> None:
    """Refuse FSDP1 (``FullyShardedDataParallel``) before anything is read or written: :func:`_fsdp1_problem`."""
    problem = _fsdp1_problem(model)
    if problem is not None:
        raise ValueError(problem)


def _fsdp1_problem(model: nn.Module) -> str | None:
    """Why ``model`` is (part of) an FSDP1 model FIRE must refuse, or None.

    FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) flattens the
    parameters of each wrapped module into one ``FlatParameter`` and keeps
    only this rank's slice of it. Three things show it, whatever was
    unwrapped (accelerate's ``unwrap_model`` takes off the outer wrapper
    only): a ``FullyShardedDataParallel`` module; a ``FlatParameter``
    (``use_orig_params=False``); a parameter FSDP1 marked as flattened into
    one (``_fsdp_flattened``: with ``use_orig_params=True`` the original
    parameters stay, as 1-D views of this rank's slice, often empty). Every
    rank sees the same marks, so every rank refuses alike. FSDP2
    (``fully_shard``, DTensor parameters) marks nothing of these.
    """
    for name, mod in model.named_modules():
        if type(mod).__name__ == "FullyShardedDataParallel":
            return _FSDP1.format(what=f"{name or 'the model'} is a FullyShardedDataParallel (FSDP1) module")
    for name, p in model.named_parameters():
        flat = getattr(p, "_is_flat_param", False)  # what isinstance(p, FlatParameter) reads: it is an nn.Parameter
        if flat or getattr(p, "_fsdp_flattened", False):
            kind = "an FSDP1 FlatParameter" if flat else (
                "a parameter FSDP1 flattened into a FlatParameter (use_orig_params=True: a 1-D view of this "
                f"rank's slice, shape {tuple(p.shape)})")
            return _FSDP1.format(what=f"{name} is {kind}")
    return None


_FSDP1 = (
    "FIRE cannot act on an FSDP1 model (torch.distributed.fsdp.FullyShardedDataParallel): {what}. FSDP1 "
    "flattens each wrapped module's parameters into one FlatParameter and keeps only this rank's slice, so no "
    "rank holds a weight matrix whole, and a polar factor of slices is not a slice of the polar factor; the "
    "optimizer state of a FlatParameter (AdamW's moments and one step count) is shared by all the weights in "
    "it, so it cannot be restarted for the projected ones alone. Nothing was changed. Use FSDP2 "
    "(torch.distributed.fsdp.fully_shard; in the Hugging Face Trainer / accelerate: fsdp_config "
    "{{'version': 2}}), whose DTensor weights fire_core.torch projects whole (docs/distributed.md)"
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
