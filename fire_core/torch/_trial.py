"""The trial :func:`fire_core.schedule.when_needed` reads: FIRE tried on copies of the model, on the new task's data."""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn


def trial(
    model: nn.Module,
    batches: Sequence,
    probe,
    *,
    loss: Callable | None = None,
    lr: float = 1e-3,
    **apply_options,
) -> Callable[[int], tuple[float, float]]:
    """``Moment.lookahead`` for :func:`fire_core.schedule.when_needed`: does FIRE help on the new task's data?

    Returns ``lookahead(k)``, which makes two copies of ``model`` (``copy.deepcopy``),
    applies ``fire_core.torch.apply(copy, **apply_options)`` to one, trains
    each for ``k`` steps of a fresh ``torch.optim.Adam(lr=lr)`` over
    ``batches`` (cycled, in train mode), and returns the two copies' ``loss``
    on ``probe`` (under ``no_grad``, still in train mode): ``(without FIRE,
    with FIRE)``. The model, its optimizer, its mode and the global random
    number generator are left as they were; the copies are dropped.

    ``batches``: ``(inputs, targets)`` pairs of the new task; ``probe``: an
    ``(inputs, targets)`` pair held out of them. ``inputs`` is a tensor, a
    tuple of positional inputs or a dict of keyword inputs. ``loss``:
    ``loss(outputs, targets) -> scalar tensor``, cross-entropy by default.
    ``when_needed()``'s threshold was measured with this trial on 4 batches
    of 64, a probe of 256, ``lr=1e-3`` and FIRE at ``steps=10``
    (``benchmarks/when_needed_study.py``); another setup needs its own
    threshold. Cost: two copies of the model and their optimizer state, and
    ``2 * k`` optimizer steps.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trial expects a torch.nn.Module, got {type(model).__name__}")
    batches = list(batches)
    if not batches or any(not (isinstance(b, (tuple, list)) and len(b) == 2) for b in batches):
        raise ValueError("trial: batches must be a non-empty list of (inputs, targets) pairs of the new task")
    if not (isinstance(probe, (tuple, list)) and len(probe) == 2):
        raise ValueError("trial: probe must be one (inputs, targets) pair, held out of the batches")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"trial: lr must be a positive number, got {lr!r}")
    loss = nn.functional.cross_entropy if loss is None else loss
    from . import apply

    def lookahead(k: int) -> tuple[float, float]:
        state = torch.random.get_rng_state()
        try:
            losses = []
            for fire in (False, True):
                twin = copy.deepcopy(model)
                if fire:
                    apply(twin, **apply_options)
                opt = torch.optim.Adam([p for p in twin.parameters() if p.requires_grad], lr=lr)
                twin.train()
                for step in range(int(k)):
                    inputs, targets = batches[step % len(batches)]
                    opt.zero_grad(set_to_none=True)
                    loss(_call(twin, inputs), targets).backward()
                    opt.step()
                with torch.no_grad():
                    losses.append(float(loss(_call(twin, probe[0]), probe[1])))
                del twin, opt
            return losses[0], losses[1]
        finally:
            torch.random.set_rng_state(state)

    return lookahead


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)
