"""FIRE on Keras 3 models, in place, on the JAX, PyTorch and TensorFlow backends.

::

    import os
    os.environ.setdefault("KERAS_BACKEND", "jax")   # before the first `import keras`
    import keras, fire_core.keras

    report = fire_core.keras.apply(model, optimizer=model.optimizer)   # at a task boundary
    model.fit(x, y, callbacks=[fire_core.keras.FIRECallback(schedule=[1000, 2000])])

This module only maps a Keras model onto the core: it walks the layers, finds
each variable's owning layer in :data:`LAYER_TABLE` (what each layer type
holds, its layout, its gate blocks, or why it is left alone), hands
``(name, array, layout)`` triples to :func:`fire_core.reinit_many` in the
backend's own arrays (JAX arrays, torch tensors; TensorFlow variables through
NumPy on the host, since TensorFlow tensors are no array-API namespace), and
writes each result back with ``variable.assign`` once every weight has been
projected. Names are the variables' paths (``sequential/dense/kernel``).

Layouts (:mod:`fire_core.layout`): ``Dense`` ``"io"``; ``Conv1D/2D/3D``
``(*taps, in, out)``, ``"wio"``/``"hwio"``/``"dhwio"``; ``Conv*Transpose``
``(*taps, out, in)``, ``"hwoi"``; ``EinsumDense`` from its equation (kernel
axes found in the input are ``i``, in the output ``o``), so
``MultiHeadAttention``'s ``query``/``key``/``value`` ``(embed, heads,
head_dim)`` are ``"ioo"`` and ``attention_output`` ``(heads, head_dim,
embed)`` ``"iio"``; ``LSTMCell`` ``kernel`` ``(in, 4 units)`` and
``recurrent_kernel`` ``(units, 4 units)`` per gate block ``[i] [f] [c] [o]``
(Keras' order), ``GRUCell`` per ``[z] [r] [h]`` (Keras' order, either
``reset_after``), ``ConvLSTM*Cell`` per ``[i] [f] [c] [o]`` with its taps,
``SimpleRNNCell`` whole; ``SeparableConv``'s ``pointwise_kernel``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

try:
    import keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fire_core.keras needs Keras 3: pip install 'fire-core[keras]' and a backend (jax, torch or tensorflow), "
        "selected with KERAS_BACKEND before keras is first imported"
    ) from exc
if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover - depends on the environment
    raise ImportError(f"fire_core.keras needs Keras 3 (keras>=3.5), found keras {keras.__version__}")

import numpy as np

from .core._array import array_namespace
from .core.metrics import drift as _drift
from .core.patterns import Patterns, check_layouts, glob_match, matches
from .core.plan import reinit_many
from .core.report import Report
from .core.schedule import DormantAbove, Moment, SrankBelow, as_schedule

__all__ = ["apply", "select", "reset_optimizer_state", "FIRECallback", "FIRE", "LAYER_TABLE"]

_L = keras.layers


# --- what each layer type holds: the table -------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """What FIRE does with one variable a layer type holds.

    ``layout`` None: left alone for ``reason``. Otherwise projected in
    ``layout``, cut along its output axis into the equal blocks ``blocks``
    (labels; None: whole).
    """

    layout: str | None = None
    reason: str | None = None
    blocks: tuple[str, ...] | None = None


_TAPS = {1: "w", 2: "hw", 3: "dhw"}
_LSTM_GATES = ("i", "f", "c", "o")  # keras LSTMCell: ops.split(kernel, 4, axis=1) -> k_i, k_f, k_c, k_o
_GRU_GATES = ("z", "r", "h")  # keras GRUCell: kernel[:, :units] is z, then r, then h (also with reset_after)
_EMBEDDING = "embedding (a lookup table, not a map between layers; layouts= projects it)"
_DEPTHWISE = (
    "depthwise kernel (each input channel's own filters, not a map between features; layouts= projects it)"
)
_LORA = (
    "a LoRA factor (Keras enable_lora): projected on its own it becomes a scaled semi-orthogonal matrix and the "
    "adapter's change would jump; merge or reset the adapter, or layouts= projects it"
)
_BIAS = "a bias (EinsumDense's can have several axes; GRU reset_after keeps two as (2, 3*units))"
_NO_RULE = "no FIRE rule for a variable {attr!r} of {kind} (layouts= projects it)"
_FROZEN = "frozen (not trainable, so it cannot re-learn; frozen=True projects it)"
_NOT_INCLUDED = "not selected by include"
_NOT_FLOAT = "not floating point ({dtype})"


def _taps(layer) -> str:
    return _TAPS.get(layer.rank) or "abcdefghjklmnpqrstuvwxyz"[: layer.rank]


def _einsum_layout(equation: str) -> str | None:
    """An EinsumDense kernel's layout from its equation, or None when its axes are not inputs and outputs.

    ``"abc,cde->abde"``: ``c`` is summed with the input (``i``), ``d`` and
    ``e`` appear in the output (``o``): ``"ioo"``. A kernel axis that is in
    both the input and the output (one matrix per index) or in neither has no
    rule: refused, ``layouts=`` names it.
    """
    try:
        inputs, out = equation.replace(" ", "").split("->")
        x, kernel = inputs.split(",")
    except ValueError:
        return None
    layout = ""
    for c in kernel:
        if (c in x) == (c in out):
            return None
        layout += "i" if c in x else "o"
    return layout


def _dense(layer):
    return {"kernel": Slot("io"), "lora_kernel_a": Slot(reason=_LORA), "lora_kernel_b": Slot(reason=_LORA)}


def _einsum_dense(layer):
    layout = _einsum_layout(layer.equation)
    kernel = Slot(layout) if layout else Slot(reason=(
        f"an EinsumDense kernel of equation {layer.equation!r}, whose axes are not each an input or an output "
        "axis (layouts= names them; uppercase letters are stacked layers)"
    ))
    return {"kernel": kernel, "lora_kernel_a": Slot(reason=_LORA), "lora_kernel_b": Slot(reason=_LORA)}


def _conv(layer):
    return {"kernel": Slot(_taps(layer) + "io"), "lora_kernel_a": Slot(reason=_LORA), "lora_kernel_b": Slot(reason=_LORA)}


def _conv_transpose(layer):
    return {"kernel": Slot(_taps(layer) + "oi")}


def _separable(layer):
    return {"depthwise_kernel": Slot(reason=_DEPTHWISE), "pointwise_kernel": Slot(_taps(layer) + "io")}


def _depthwise(layer):
    return {"kernel": Slot(reason=_DEPTHWISE)}


def _gated(gates, taps=""):
    def weights(layer):
        t = _taps(layer) if taps else ""
        return {"kernel": Slot(t + "io", blocks=gates), "recurrent_kernel": Slot(t + "io", blocks=gates),
                "bias": Slot(reason=_BIAS)}
    return weights


def _embedding(layer):
    return {"embeddings": Slot(reason=_EMBEDDING), "reverse_embeddings": Slot(reason=_EMBEDDING)}


def _conv_lstm_cell():
    from keras.src.layers.rnn.conv_lstm import ConvLSTMCell  # not exported; the ConvLSTM1D/2D/3D layers' cell
    return ConvLSTMCell


@dataclass(frozen=True)
class Kind:
    """One row of :data:`LAYER_TABLE`: a layer type and the variables it holds (attribute name -> Slot)."""

    name: str
    match: object
    weights: Callable[[object], dict[str, Slot]]


# Order matters: the first row whose type matches a layer decides for it (subclasses before their bases).
LAYER_TABLE = (
    Kind("Conv1D/2D/3DTranspose", (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose), _conv_transpose),
    Kind("SeparableConv1D/2D", (_L.SeparableConv1D, _L.SeparableConv2D), _separable),
    Kind("DepthwiseConv1D/2D", (_L.DepthwiseConv1D, _L.DepthwiseConv2D), _depthwise),
    Kind("Conv1D/2D/3D", (_L.Conv1D, _L.Conv2D, _L.Conv3D), _conv),
    Kind("Dense", _L.Dense, _dense),
    Kind("EinsumDense", _L.EinsumDense, _einsum_dense),
    Kind("LSTMCell", _L.LSTMCell, _gated(_LSTM_GATES)),
    Kind("GRUCell", _L.GRUCell, _gated(_GRU_GATES)),
    Kind("SimpleRNNCell", _L.SimpleRNNCell, _gated(None)),
    Kind("ConvLSTMCell", _conv_lstm_cell(), _gated(_LSTM_GATES, taps=True)),
    Kind("Embedding", _L.Embedding, _embedding),
)


def _kind_of(layer) -> Kind | None:
    return next((k for k in LAYER_TABLE if isinstance(layer, k.match)), None)


# --- selection ----------------------------------------------------------------------------------------


@dataclass
class _Target:
    name: str  # the variable's path, or path[block]
    variable: object
    layout: str
    block: tuple[int, int, int] | None = None  # (axis, start, stop) along the output axis

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self.variable.shape)
        if self.block is None:
            return shape
        axis, start, stop = self.block
        return shape[:axis] + (stop - start,) + shape[axis + 1:]


def _backend() -> str:
    return keras.backend.backend()


def _sync(model) -> None:
    """On the JAX backend ``fit`` keeps the state in arrays of its own: put it back in the variables first."""
    if getattr(model, "_jax_state_synced", True) is False and hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def _native(variable):
    """The variable's value as an array the core computes on: JAX array, torch tensor, or NumPy (TensorFlow)."""
    backend = _backend()
    if backend == "jax":
        return variable.value
    if backend == "torch":
        return variable.value.detach()
    return _to_numpy(variable)


def _to_numpy(x) -> np.ndarray:
    """A copy of a backend array (or a variable's value) on the host, without NumPy's ``copy=`` deprecation path."""
    x = getattr(x, "value", x)
    if hasattr(x, "detach"):  # torch: a copy, never a view of the parameter's memory
        return np.array(x.detach().cpu().numpy())
    if hasattr(x, "numpy"):  # tensorflow
        return np.asarray(x.numpy())
    return np.asarray(x)


def _is_float(variable) -> bool:
    return "float" in str(variable.dtype)


def _owners(model) -> dict[int, object]:
    """``id(variable) -> the layer that holds it`` (the innermost: MultiHeadAttention's EinsumDenses, an RNN's cell)."""
    owners = {}
    for layer in reversed(model._flatten_layers(include_self=True, recursive=True)):
        for v in list(layer._trainable_variables) + list(layer._non_trainable_variables):
            owners.setdefault(id(v), layer)
    return owners


def _names(path: str, model) -> list[str]:
    """The names a pattern is tested against: the path, and it without the model's own name in front."""
    prefix = f"{model.name}/"
    return [path, path[len(prefix):]] if path.startswith(prefix) and path != prefix else [path]


def _candidates(names: list[str], target: str | None = None) -> list[str]:
    out = []
    for n in names:
        parts = n.split("/")
        out += ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return out + ([target] if target else [])


def _select(model, include=None, exclude=None, layouts=None, frozen=False):
    """``(targets, skipped, notes)`` of ``model`` (see :func:`apply`)."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"fire_core.keras expects a keras Model or Layer, got {type(model).__name__}")
    if not isinstance(frozen, bool):
        raise TypeError(f"frozen must be True or False, got {frozen!r}")
    include, exclude = Patterns(include, "include"), Patterns(exclude, "exclude")
    layouts = check_layouts(layouts)
    weights = list(model.weights)
    if not weights:
        raise ValueError(
            f"{type(model).__name__} {model.name!r} has no variables: build it first (call it on an input, or give "
            "it an Input shape)"
        )
    owners = _owners(model)
    trainable = {id(v) for v in model.trainable_variables}
    targets, skipped, known, used, seen = [], [], [], set(), set()

    def skip(path, shape, reason):
        if len(shape) >= 2:
            skipped.append({"name": path, "shape": tuple(int(d) for d in shape), "reason": reason})

    for v in weights:
        if id(v) in seen:
            continue
        seen.add(id(v))
        path, shape = v.path, tuple(int(d) for d in v.shape)
        names = _names(path, model)
        layer = owners.get(id(v))
        kind = _kind_of(layer) if layer is not None else None
        attr = v.name
        slot = kind.weights(layer).get(attr) if kind is not None else None
        pattern = next((p for p in layouts if any(glob_match(c, p) for c in _candidates(names))), None)
        if pattern is not None:
            override = layouts[pattern]
            if override is None:
                used.add(pattern)
                skip(path, shape, f"layouts pattern {pattern!r} maps it to None")
                continue
            if len(override) == len(shape):
                used.add(pattern)
                keep = slot is not None and slot.layout == override  # keeps the rule's gate blocks
                slot = slot if keep else Slot(override)
            elif slot is None or slot.layout is None:
                pattern = None  # a pattern adds a variable only where its layout fits (a bias under a matched layer)
            else:
                raise ValueError(f"{path}: layouts pattern {pattern!r} gives {override!r}, which does not fit shape {shape}")
        if len(shape) < 2 and pattern is None:
            continue  # biases, norms' scales, counters: no matrix, left alone without a listing
        if not _is_float(v):
            skip(path, shape, _NOT_FLOAT.format(dtype=v.dtype))
            continue
        if slot is None and attr == "bias":
            skip(path, shape, _BIAS)
            continue
        if slot is None:
            what = type(layer).__name__ if layer is not None else "no layer"
            skip(path, shape, _NO_RULE.format(attr=attr, kind=what))
            continue
        if slot.layout is None:
            skip(path, shape, slot.reason)
            continue
        known.append(path)
        if id(v) not in trainable and not frozen:
            skip(path, shape, _FROZEN)
            continue
        for t in _blocks(v, path, shape, slot):
            known.append(t.name)
            why = _left_out(include, exclude, names, t.name)
            if why is None:
                targets.append(t)
            else:
                skip(t.name, t.shape, why)
    for pattern in layouts:
        if pattern not in used:
            raise ValueError(f"layouts pattern {pattern!r} matches no variable")
    include.check_used(known, "variable FIRE would project")
    exclude.check_used(known, "variable FIRE would project")
    notes = []
    gated = sorted({t.variable.path for t in targets if t.block is not None})
    if gated:
        shown = ", ".join(gated[:3]) + (f" and {len(gated) - 3} more" if len(gated) > 3 else "")
        notes.append(f"note: recurrent kernels projected gate by gate (LSTM i, f, c, o; GRU z, r, h): {shown}")
    return targets, skipped, notes


def _left_out(include, exclude, names, target) -> str | None:
    """Why include/exclude leave a target out, or None (both are tested, so each pattern's use is recorded)."""
    keep = include.func(target) if include.func else (
        include.hit(names, "/", target_name=target) if include.patterns else True)
    if exclude.func:
        if exclude.func(target):
            return "excluded by the exclude function"
    elif exclude.hit(names, "/", target_name=target):
        hit = next(p for p in exclude.patterns if matches([p], names, "/", target_name=target))
        return f"excluded by exclude pattern {hit!r}"
    return None if keep else _NOT_INCLUDED


def _blocks(v, path, shape, slot) -> list[_Target]:
    if not slot.blocks:
        return [_Target(path, v, slot.layout)]
    axis = slot.layout.index("o")
    count = len(slot.blocks)
    if shape[axis] % count:
        raise ValueError(f"{path}: the output axis of shape {shape} does not split into {count} equal gate blocks")
    size = shape[axis] // count
    return [_Target(f"{path}[{label}]", v, slot.layout, (axis, k * size, (k + 1) * size))
            for k, label in enumerate(slot.blocks)]


def select(model, *, include=None, exclude=None, layouts=None, frozen=False) -> list[tuple[str, object, str]]:
    """The ``(name, array, layout)`` triples :func:`apply` would project, with the same checks; nothing written."""
    _sync(model)
    targets, _, _ = _select(model, include, exclude, layouts, frozen)
    return [(t.name, _piece(_native(t.variable), t.block), t.layout) for t in targets]


def _piece(array, block):
    if block is None:
        return array
    axis, start, stop = block
    return array[tuple(slice(start, stop) if a == axis else slice(None) for a in range(array.ndim))]


# --- the optimizer's state -----------------------------------------------------------------------------


_EMA = "_model_variables_moving_average"  # a copy of the weights (use_ema): it gets the new value


def _base_optimizer(optimizer):
    while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
        optimizer = optimizer.inner_optimizer
    return optimizer


def _slot_lists(opt, count: int) -> dict[str, list]:
    """The optimizer's per-variable lists (Adam's ``_momentums``, ``_velocities``; EMA; gradient accumulators)."""
    own = {id(v) for v in opt.variables}
    out = {}
    for attr, value in vars(opt).items():
        if attr in ("_variables", "_trainable_variables") or not isinstance(value, (list, tuple)) or len(value) != count:
            continue
        if value and all(x is None or (isinstance(x, keras.Variable) and id(x) in own) for x in value):
            out[attr] = value
    return out


def _optimizer_plan(optimizer, variables, new_values) -> list[tuple[object, object]]:
    """``(optimizer variable, value)`` pairs that restart the slots of ``variables``; computed before any write.

    Each slot gets the value a fresh optimizer of the same config starts it
    from (zeros for Adam's moments, ``initial_accumulator_value`` for
    Adagrad's); an EMA copy of a weight gets the new weight. ``iterations``
    and other global state are kept.
    """
    if optimizer is None:
        return []
    opt = _base_optimizer(optimizer)
    if not isinstance(opt, keras.optimizers.Optimizer):
        raise TypeError(f"optimizer must be a keras optimizer, got {type(optimizer).__name__}")
    if not opt.built:
        return []  # no slots yet: a fresh start already
    index = {}
    for v in variables:
        try:
            index[id(v)] = opt._get_variable_index(v)
        except KeyError:
            continue  # not trained by this optimizer: nothing kept for it
    if not index:
        return []
    lists = _slot_lists(opt, len(opt._trainable_variables))
    mine = [v for v in variables if id(v) in index]
    try:
        with warnings.catch_warnings():  # Keras' own np.array(variable) in get_config meets NumPy 2's copy= deprecation
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            fresh = type(opt).from_config(opt.get_config())
            fresh.build(mine)
    except Exception as exc:
        raise ValueError(
            f"the optimizer {type(opt).__name__} could not be rebuilt from its config to tell its initial slot values "
            f"({type(exc).__name__}: {exc}); nothing was written. Pass optimizer=None and reset its state yourself"
        ) from exc
    fresh_lists = _slot_lists(fresh, len(mine))
    plan = []
    for attr, slots in lists.items():
        for j, v in enumerate(mine):
            slot = slots[index[id(v)]]
            if slot is None:
                continue
            if attr == _EMA:
                plan.append((slot, new_values[id(v)]))
            elif attr in fresh_lists and fresh_lists[attr][j] is not None:
                plan.append((slot, _to_numpy(fresh_lists[attr][j])))
            else:
                raise ValueError(
                    f"the optimizer {type(opt).__name__} keeps per-variable state {attr!r} that a fresh copy does not "
                    "build, so its initial value is unknown; nothing was written"
                )
    return plan


def reset_optimizer_state(optimizer, variables) -> int:
    """Restart ``optimizer``'s slots of ``variables`` (zeros for Adam's moments); returns how many were reset.

    ``iterations`` (one counter for all variables) is kept; see
    ``docs/keras.md`` for what that means for Adam's bias correction.
    """
    variables = list(variables)
    plan = _optimizer_plan(optimizer, variables, {id(v): _native(v) for v in variables})
    for slot, value in plan:
        slot.assign(value)
    return len(plan)


# --- apply --------------------------------------------------------------------------------------------


def _run(model, probe):
    out = model(probe, training=False)
    return [_to_numpy(o) for o in keras.tree.flatten(out)]


def apply(
    model,
    steps: int = 5,
    *,
    optimizer=None,
    include=None,
    exclude=None,
    layouts: Mapping[str, str | None] | None = None,
    method: str = "fire",
    scale="fire",
    frozen: bool = False,
    report: bool = True,
    dry_run: bool = False,
    probe=None,
) -> Report:
    """Re-initialize ``model``'s layer weights with FIRE, in place; returns the :class:`~fire_core.report.Report`.

    ``steps``, ``method`` (``"fire"``, ``"fast"``, ``"svd"``) and ``scale``
    are the core's (:func:`fire_core.reinit`). Which variables, in which
    layout: :data:`LAYER_TABLE` (the module docstring lists it); every
    variable of two or more axes that is not projected is in
    ``Report.skipped`` with its reason (an embedding, a depthwise kernel, a
    LoRA factor, a layer type with no rule, frozen, excluded).

    ``include`` / ``exclude``: glob patterns matched against each variable's
    path (``sequential/dense/kernel``, also without the model's own name in
    front) and each prefix of it, so ``"dense"`` selects a layer and
    ``"lstm/lstm_cell/kernel[f]"`` one gate block; or a callable of the
    target name. ``layouts``: ``{pattern: layout}`` adds a variable (an
    embedding), overrides a layout, or with None leaves it alone. A pattern
    that matches nothing is a ValueError. ``frozen``: non-trainable variables
    are left alone unless True.

    ``optimizer``: a Keras optimizer (``model.optimizer``). The slots of
    exactly the projected variables restart from the value a fresh optimizer
    of the same config gives them (zeros for Adam's moments); every other
    variable's slots, and the one ``iterations`` counter, are kept. An EMA
    copy (``use_ema=True``) gets the new weight.

    ``probe``: the model's inputs; ``Report.drift`` is the relative change of
    its outputs (``model(probe, training=False)``), run once before anything
    is written. ``dry_run``: measure and write nothing.

    Every selected variable is validated first (finite values, a layout that
    fits, the optimizer's fresh slots built); a failure names the variable
    and changes nothing: the weights are written only after every projection
    is done.
    """
    if dry_run and not report:
        raise ValueError("dry_run=True computes the report only; it cannot be combined with report=False")
    if not isinstance(dry_run, bool) or not isinstance(report, bool):
        raise TypeError(f"dry_run and report must be True or False, got {dry_run!r}, {report!r}")
    if dry_run and probe is not None:
        raise ValueError("probe= measures the drift of written weights; a dry run writes nothing")
    _sync(model)
    targets, skipped, notes = _select(model, include, exclude, layouts, frozen)
    if not targets:
        alone = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:4])
        raise ValueError(
            f"no variable of {type(model).__name__} {model.name!r} is a FIRE target under the given options; nothing "
            "written (name variables with layouts= to add them)" + (f"; left alone: {alone}" if alone else "")
        )
    before = _run(model, probe) if probe is not None else None
    values = {}  # id(variable) -> its current array
    for t in targets:
        values.setdefault(id(t.variable), _native(t.variable))
    results = {}
    rep = reinit_many(
        [(t.name, _piece(values[id(t.variable)], t.block), t.layout) for t in targets],
        steps=steps, method=method, scale=scale, write=results.__setitem__, report=report,
    )
    # every projection is done: now the new values of whole variables, then the optimizer's, then writes
    variables, pieces = {}, {}
    for t in targets:
        variables[id(t.variable)] = t.variable
        pieces.setdefault(id(t.variable), []).append(t)
    new_values = {}
    for key, ts in pieces.items():
        if ts[0].block is None:
            new_values[key] = results[ts[0].name]
        else:  # the new gate blocks, and the old values of the blocks include/exclude left out
            axis, length = ts[0].block[0], int(variables[key].shape[ts[0].block[0]])
            parts, at = [], 0
            for t in sorted(ts, key=lambda t: t.block[1]):
                if t.block[1] > at:
                    parts.append(_piece(values[key], (axis, at, t.block[1])))
                parts.append(results[t.name])
                at = t.block[2]
            if at < length:
                parts.append(_piece(values[key], (axis, at, length)))
            xp = array_namespace(*parts)
            new_values[key] = xp.concat(parts, axis=axis)
    plan = [] if dry_run else _optimizer_plan(optimizer, list(variables.values()), new_values)
    if not dry_run:
        for key, v in variables.items():
            v.assign(new_values[key])
        for slot, value in plan:
            slot.assign(value)
    if rep is None:
        rep = Report(method=method, steps=int(steps), scale=scale, measured=False)
        notes.append(f"report=False: {len(targets)} weights projected, nothing measured")
    rep.applied = not dry_run
    rep.projected = len(targets)
    rep.skipped = skipped + rep.skipped
    rep.notes = notes + rep.notes
    if probe is not None:
        rep.drift = _drift(before, _run(model, probe))
    return rep


# --- the callback ------------------------------------------------------------------------------------

_APPLY_OPTIONS = ("steps", "include", "exclude", "layouts", "method", "scale", "frozen", "report")
_TAKEN = {
    "optimizer": "the callback resets model.optimizer itself",
    "probe": "pass probe= to FIRECallback itself",
    "dry_run": "a callback that changes nothing has nothing to do; call fire_core.keras.apply(dry_run=True) yourself",
}
_METRIC_KEYS = ("weights", "skipped", "sfe", "dfi_before", "dfi_after", "drift")


class FIRECallback(keras.callbacks.Callback):
    """Apply FIRE to the model in ``fit`` when ``schedule`` fires.

    ``schedule``: any form :func:`fire_core.schedule.as_schedule` takes (a
    list of steps, ``Every(n)``, ``{"every": n, "unit": "epoch"}``, a
    callable of a Moment, ``DfIAbove``, or a list of these). Steps are the
    optimizer's ``iterations`` (optimizer steps done). The callback polls the
    schedule at step 0 when training starts from 0 (the baseline of measured
    triggers), after each train batch, and at each epoch's start, and fires
    through ``Schedule.poll(moment, fire=...)``: a firing that fails (a NaN
    weight) propagates and is not recorded. Each firing is one
    :func:`apply` call with ``optimizer=model.optimizer`` and the keywords
    given here (``steps``, ``include``, ``exclude``, ``layouts``, ``method``,
    ``scale``, ``frozen``, ``report``).

    Keras does not save callbacks with a model: save :meth:`state_dict` (a
    JSON-able dict) beside the model and hand it to :meth:`load_state_dict`
    of the callback of the resumed run, which neither fires a boundary twice
    nor misses one; a changed schedule is carried over or refused naming
    both (the returned lines say what was carried over). ``name``: stored in
    the state, so that the state of one callback is not loaded into another.

    ``probe``: the model's inputs, run once when training starts (a probe
    that does not fit fails then, naming FIRECallback) and before and after
    each firing (``fire/drift``).

    ``log``: at a firing, ``fire/fired`` (firings so far) and
    :meth:`Report.metrics` go into the batch's ``logs``; at each epoch's end
    the same keys go into the epoch's ``logs`` (every epoch, so ``History``
    and ``CSVLogger`` keep one column each: the numbers of the epoch's last
    firing, NaN in an epoch without one; ``fire/fired`` is always the running
    count). Put this callback before a ``CSVLogger`` in ``callbacks=``. The
    report is printed at each firing.

    ``history``: the schedule's Firings, each ``info`` holding the logged numbers.
    """

    def __init__(self, schedule, probe=None, log: bool = True, name: str | None = None, **apply_options):
        super().__init__()
        for option in apply_options:
            if option in _TAKEN:
                raise TypeError(f"FIRECallback: {option}= is not an option here: {_TAKEN[option]}")
            if option not in _APPLY_OPTIONS:
                raise TypeError(
                    f"FIRECallback: unknown option {option!r}; fire_core.keras.apply takes {', '.join(_APPLY_OPTIONS)}"
                )
        if not isinstance(log, bool):
            raise TypeError(f"FIRECallback: log must be True or False, got {log!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"FIRECallback: name must be a non-empty string, got {name!r}")
        self.schedule = as_schedule(schedule)
        measured = [t for t in self.schedule.triggers if isinstance(t, (DormantAbove, SrankBelow))]
        if measured:
            raise ValueError(
                f"FIRECallback: {measured[0]!r} measures activations, which the Keras callback does not read yet; "
                "use step or epoch triggers, a callable, or DfIAbove"
            )
        self.probe, self.log, self.name = probe, log, name
        self.apply_options = dict(apply_options)
        self.last_report = None
        self._epoch = 0
        self._epoch_firing = None
        self._iterations_at = None

    @property
    def history(self):
        return self.schedule.history

    def state_dict(self) -> dict:
        return {"name": self.name, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: Mapping) -> list[str]:
        """Restore the schedule's progress; returns (and prints) the lines a changed schedule carried over."""
        if not isinstance(state, Mapping) or "schedule" not in state:
            raise ValueError("FIRECallback.load_state_dict expects a FIRECallback.state_dict()")
        if state.get("name") != self.name:
            raise ValueError(
                f"FIRECallback: the saved state is of the callback named {state.get('name')!r}, this one is "
                f"{self.name!r}; pass each callback its own state"
            )
        lines = self.schedule.load_state_dict(state["schedule"])
        for line in lines:
            print(f"FIRE: {line}")
        return lines

    # --- the moments -------------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        _select(self.model, *(self.apply_options.get(k) for k in ("include", "exclude", "layouts")),
                self.apply_options.get("frozen", False))  # a pattern that selects nothing fails now
        if self.probe is not None:
            try:
                _run(self.model, self.probe)
            except Exception as exc:
                raise ValueError(
                    f"FIRECallback: the probe does not run on {type(self.model).__name__} {self.model.name!r}: "
                    f"model(probe) raised {type(exc).__name__}: {exc}. probe= is the model's inputs, not an (x, y) batch"
                ) from exc
        self._iterations_at = None
        if self._step() == 0:
            self._poll("step", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_firing = None
        self._poll("epoch", logs)

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        if step == 0 or step == self.schedule.last_poll:
            return
        self._poll("step", logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.log and logs is not None:
            info = self._epoch_firing.info if self._epoch_firing is not None else {}
            logs["fire/fired"] = float(len(self.schedule.history))
            for key in self._metric_keys():
                logs[key] = float(info.get(key, math.nan))

    # --- polling and firing ------------------------------------------------------------------------

    def _metric_keys(self) -> list[str]:
        keys = ["weights", "skipped"]
        if self.apply_options.get("report", True):
            keys += ["sfe", "dfi_before", "dfi_after"]
        if self.probe is not None:
            keys.append("drift")
        return ["fire/" + k for k in keys]

    def _step(self) -> int:
        """Optimizer steps done (``optimizer.iterations``), read without syncing JAX's training state."""
        model = self.model
        opt = model.optimizer
        base = _base_optimizer(opt)
        var = base._iterations
        value = None
        state = getattr(model, "_jax_state", None)
        if getattr(model, "_jax_state_synced", True) is False and state and state.get("optimizer_variables"):
            if self._iterations_at is None:
                self._iterations_at = next((k for k, v in enumerate(opt.variables) if v is var), -1)
            if self._iterations_at >= 0:
                value = int(np.asarray(state["optimizer_variables"][self._iterations_at]))
        if value is None:
            _sync(model)
            value = int(_to_numpy(var))
        every = base.gradient_accumulation_steps
        return value // every if every else value

    def _poll(self, at: str, logs) -> None:
        step = self._step()
        moment = Moment(
            step=step, epoch=self._epoch, at=at,
            weights=lambda: select(self.model, **{k: v for k, v in self.apply_options.items()
                                                  if k in ("include", "exclude", "layouts", "frozen")}),
            context={"model": self.model, "callback": self},
        )
        firing = self.schedule.poll(moment, fire=self._fire)
        if firing is None:
            return
        self._epoch_firing = firing
        if self.log:
            if logs is not None:
                logs.update(firing.info)
            print(f"{firing}\n{self.last_report}")

    def _fire(self, firing) -> None:
        report = apply(self.model, optimizer=self.model.optimizer, probe=self.probe, **self.apply_options)
        self.last_report = report
        firing.info = {"fire/fired": float(len(self.schedule.history) + 1), **report.metrics()}


FIRE = FIRECallback  # the name the other integrations also keep: the same class
