"""Optimizer state: dropping the moments and step counts of the weights FIRE wrote."""

from __future__ import annotations

from typing import Iterable

import torch

from . import _deepspeed


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
    A DeepSpeed optimizer (ZeRO 1-3, BF16, FP16) steps one flat fp32 tensor
    per parameter group: the state of each group all of whose weights are
    in ``params`` is dropped (see :mod:`._deepspeed`).
    """
    optimizers = _optimizers(optimizer)
    params = list(params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"reset_optimizer_state expects tensors, got {type(p).__name__}")
    ids = {id(p) for p in params}
    dropped = 0
    for opt in optimizers:
        if _deepspeed.is_wrapper(opt):  # its state is keyed by flat fp32 masters, one per parameter group
            dropped += _deepspeed.reset_state(_deepspeed.masters_of([opt]), params)
            continue
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
