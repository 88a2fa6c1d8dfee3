"""Probes: the model's outputs (and its modules') before and after, activations, and output drift.

Runs leave no trace: ``no_grad``, the model's current mode, buffers
restored, the random number generators forked.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ..core._array import sum_over_mesh
from ..core.metrics import drift


# --- probe (function drift) and normalization statistics -------------------------------


def _probe_args(probe) -> tuple[tuple, dict]:
    """``probe`` -> (args, kwargs) for ``model(*args, **kwargs)``: a tensor, a tuple of inputs, or a dict of keyword inputs."""
    if isinstance(probe, torch.Tensor):
        return (probe,), {}
    if isinstance(probe, tuple):
        return probe, {}
    if isinstance(probe, Mapping):
        return (), dict(probe)
    raise TypeError(f"probe must be a tensor, a tuple of inputs or a dict of keyword inputs, got {type(probe).__name__}")


def _float_tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors in a module's output (a tensor, or nested tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _float_tensors(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _float_tensors(o)]
    return []


def _owners(model: nn.Module, targets) -> dict[str, nn.Module]:
    """Report name -> the module that owns the weight (whose output the per-layer drift compares)."""
    out = {}
    for t in targets:
        prefix = t.param_name.rpartition(".")[0]
        out[t.name] = model.get_submodule(prefix) if prefix else model
    return out


def activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s activation modules by name: types from ``torch.nn``'s activations or ``transformers.activations``.

    ``nn.MultiheadAttention`` is defined among torch's activations but is an
    attention layer (its output is no unit's activation): it is not one.
    """
    kinds = ("torch.nn.modules.activation", "transformers.activations")
    return {
        name or type(m).__name__: m
        for name, m in model.named_modules()
        if type(m).__module__.startswith(kinds) and not isinstance(m, nn.MultiheadAttention)
    }


def activations(model: nn.Module, probe, *, modules: Mapping[str, nn.Module] | None = None, forward=None):
    """``{module name: (samples, units)}`` outputs of ``model``'s activation modules on ``probe``, leaving no trace.

    What the activation triggers of :mod:`fire_core.schedule`
    (``DormantAbove``, ``SrankBelow``) measure. ``modules``: the modules
    whose outputs are read (default: every module whose type comes from
    ``torch.nn``'s activations or ``transformers.activations``: ReLU, GELU,
    SiLU, Tanh...; a model with none is a ValueError). An output of 2 axes
    is ``(batch, units)``; of 3, ``(batch, tokens, units)``; of 4 or more,
    ``(batch, channels, *spatial)`` with each channel a unit; every other
    axis becomes samples. ``probe`` is what :func:`apply` takes (a tensor, a
    tuple of positional inputs, a dict of keyword inputs), or anything
    ``forward(model, probe)`` knows how to run. As for :func:`apply`'s
    probe: ``no_grad``, the model's current mode, buffers restored, random
    numbers not advanced.
    """
    if modules is None:
        modules = activation_modules(model)
    if not modules:
        raise ValueError(
            f"the activation triggers read the outputs of activation modules, and {type(model).__name__} has none "
            "(torch.nn activations such as nn.ReLU(), or transformers.activations; a functional F.relu is not "
            "a module): add them as modules, pass modules=, or use the data-free trigger DfIAbove"
        )
    _, captured = _run_probe(model, probe, dict(modules), forward=forward)
    features = {}
    for name, outputs in captured.items():
        for k, a in enumerate(outputs):
            if a.ndim >= 4:  # (batch, channels, *spatial): each channel is a unit
                a = a.movedim(1, -1)
            features[name if len(outputs) == 1 else f"{name}[{k}]"] = a.reshape(-1, a.shape[-1]).float()
    return features


def _run_probe(model: nn.Module, probe, owners: dict[str, nn.Module], forward=None):
    """The model's outputs on the probe and each owner module's outputs, leaving no trace.

    Runs under ``no_grad`` in the model's current mode. Buffers (BatchNorm
    running statistics in train mode) are restored afterwards and the random
    number generators are forked, so two calls see the same dropout masks
    and the caller's RNG state is not advanced. ``forward(model, probe)``
    replaces the plain call ``model(probe)``.
    """
    args, kwargs = ((), {}) if forward is not None else _probe_args(probe)
    modules = {id(m): m for m in owners.values()}
    captured: dict[int, list] = {k: [] for k in modules}

    def hook(mod, inputs, output):  # cloned: a later in-place op (ReLU(inplace=True)) must not change it
        captured[id(mod)].extend(t.detach().clone() for t in _float_tensors(output))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            result = forward(model, probe) if forward is not None else model(*args, **kwargs)
            out = [t.detach().clone() for t in _float_tensors(result)]
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return out, {name: captured[id(m)] for name, m in owners.items()}


def _stats_note(model: nn.Module) -> str | None:
    """A note naming the modules with running statistics (BatchNorm), which FIRE leaves stale."""
    names = [
        name or type(mod).__name__
        for name, mod in model.named_modules()
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats and mod.running_mean is not None
    ]
    if not names:
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"note: running statistics of {shown} were measured with the old weights and no longer match; refresh them "
        "with torch.optim.swa_utils.update_bn(loader, model) before evaluating in eval mode (docs/stability.md)"
    )


def _drifts(before, after, rows, targets) -> float:
    """The model's output drift; each row gets the drift of its owning module's output (None if it never ran).

    A sharded (DTensor) weight's module may give each rank only its shard of
    the output (ColwiseParallel): its sums of squares are added over the
    weight's mesh, in the targets' order on every rank, so that every rank
    reports the drift of the whole output. Outputs that are replicated
    scale both sums alike, which leaves the ratio as it is.
    """
    (out_before, layers_before), (out_after, layers_after) = before, after
    by_name = {row["name"]: row for row in rows}
    for t in targets:
        row = by_name.get(t.name)
        if row is None:
            continue
        b, a = layers_before.get(t.name), layers_after.get(t.name)
        ok = bool(b) and len(a) == len(b)
        mesh = getattr(t.tensor, "device_mesh", None)
        if mesh is None:
            row["drift"] = drift(b, a) if ok else None
            continue
        sums = torch.zeros(2, dtype=torch.float64, device=t.tensor.to_local().device)
        for x, y in zip(b, a) if ok else ():
            x, y = (v.to_local() if hasattr(v, "to_local") else v for v in (x, y))
            x, y = x.to(sums.device, torch.float64), y.to(sums.device, torch.float64)
            sums[0] += ((y - x) ** 2).sum()
            sums[1] += (x * x).sum()
        sum_over_mesh(sums, mesh)  # every rank takes part, whatever it captured
        num, den = sums.tolist()
        row["drift"] = None if not ok else (math.sqrt(num / den) if den else (0.0 if num == 0 else math.inf))
    return drift(out_before, out_after)
