"""FIRE for Equinox models: ``new = fire_core.equinox.apply(model)``.

An Equinox model is a pytree of ``eqx.Module`` instances, so :func:`apply` is
a pure function of it, as :func:`fire_core.flax.apply` is of a parameter tree:
it returns a new model of the same structure, dtypes and shardings, eagerly or
under ``eqx.filter_jit``. :func:`report` measures a before/after pair, and
:func:`reset_opt_state` restarts the optax state of exactly the projected
leaves (``fire_core.flax``'s optax machinery, which maps every per-parameter
part of an optax state onto its leaf).

This module only maps the model onto the core. Each weight is named by its
path, the fields and indices joined by ``.`` (``layers.0.weight``,
``blocks.1.attn.query_proj.weight``), and read by the type of the module that
holds it, found by walking the model, never by its shape. :data:`MODULE_TABLE`
says what each module type holds:

=========================================  ==========================================================
module type                                its arrays (layout before any stack axes)
=========================================  ==========================================================
``eqx.nn.Linear``                          ``weight`` ``(out, in)``: ``"oi"``
``eqx.nn.Conv``, ``Conv1d/2d/3d``          ``weight`` ``(out, in/groups, *taps)``: ``"oiw"``,
                                           ``"oihw"``, ``"oidhw"``: each tap's stored matrix
``eqx.nn.ConvTranspose``, ``...1d/2d/3d``  ``weight`` ``(out, in/groups, *taps)`` as well (checked
                                           against ``jax.lax.conv_transpose``; not ``(in, out)``)
``eqx.nn.GRUCell``                         ``weight_ih`` ``(3h, in)``, ``weight_hh`` ``(3h, h)``: per
                                           gate block ``[r]``, ``[z]``, ``[n]``, each ``"oi"``
``eqx.nn.LSTMCell``                        the same with 4 blocks ``[i]``, ``[f]``, ``[g]``, ``[o]``
``eqx.nn.MultiheadAttention``              four Linears (``query_proj``, ``key_proj``,
                                           ``value_proj``, ``output_proj``), each by its own row
``eqx.nn.Embedding``                       left alone: a lookup table
``LayerNorm``, ``RMSNorm``, ``GroupNorm``,  left alone: normalization scales and shifts
``BatchNorm``
``eqx.nn.WeightNorm``, ``SpectralNorm``    everything under them left alone: the layer's weight is
                                           reparametrized (``layouts=`` projects it anyway)
``eqx.nn.StateIndex``                      left alone: a stateful layer's initial state
=========================================  ==========================================================

Biases are left alone. Every floating array of two or more axes that is not
projected is in ``Report.skipped`` with its reason, and a ``layouts=``
pattern projects any array in the layout it gives.

Stacked models
--------------
``eqx.filter_vmap(make_model)(keys)`` (an ensemble) and a layer stack made the
same way for ``jax.lax.scan`` put extra axes on every leaf, while each
module's fields (``in_features``, ``out_channels``, ``hidden_size``, ...)
still describe one member. A weight whose shape is not the one its module
declares is refused, naming it, unless ``stacked=`` says how many of its
leading axes are stack axes: ``stacked={"ensemble": 1}`` (a pattern naming
weights or the modules holding them) or ``stacked=1`` (every covered weight).
The rest of the shape must then be exactly the declared one, and each member
is projected and scaled on its own (layout ``"Loi"``, ``"Loihw"``: uppercase
letters are stack axes). The declared shape shows that there are extra axes,
but not where ``filter_vmap``'s ``out_axes`` put them, nor that they are a
stack rather than a mistake, so they are never assumed.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
from collections.abc import Mapping

try:
    import equinox as eqx
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fire_core.equinox needs Equinox: pip install 'fire-core[equinox]'") from e
import jax
import jax.numpy as jnp

from . import flax as _flax  # the JAX projection, measuring and optax machinery (fire_core.flax's public calls)
from .core.layout import parse_layout
from .core.patterns import Patterns, _first_match, check_layouts
from .core.report import Report
from .flax._select import _key_name  # a key path entry's name, as the Flax adapter reads it

__all__ = ["apply", "report", "reset_opt_state", "select", "MODULE_TABLE"]

_STACK_LETTERS = "LMNPQRSTUVWXYZ"
_TAPS = {1: "w", 2: "hw", 3: "dhw"}
_MORE_TAPS = "abcdefghjklmnpqrstuvwxyz"  # no "i" or "o": those are the feature axes


# --- what each module type holds -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
    """One array of a module: its layout and declared shape, or why it is left alone.

    ``layout``: one letter per axis of one member (``"oi"``, ``"oihw"``), or
    None for an array left alone, with ``reason``. ``shape``: the shape the
    module's fields say the array has (without stack axes). ``blocks``: labels
    of equal blocks along the output axis, each projected as its own matrix.
    """

    layout: str | None
    shape: tuple[int, ...] | None = None
    blocks: tuple[str, ...] | None = None
    reason: str | None = None


def _skip(reason: str) -> Slot:
    return Slot(None, reason=reason)


_BIAS = _skip("a bias")
_GRU_GATES = ("r", "z", "n")  # GRUCell: reset, update, new (its jnp.split order)
_LSTM_GATES = ("i", "f", "g", "o")  # LSTMCell: input, forget, cell, output


def _size(n) -> int:
    return 1 if n == "scalar" else int(n)  # Linear's "scalar" features are stored as an axis of 1


def _linear(m) -> dict[str, Slot]:
    return {"weight": Slot("oi", (_size(m.out_features), _size(m.in_features))), "bias": _BIAS}


def _taps(n: int) -> str:
    return _TAPS.get(n) or _MORE_TAPS[:n]


def _conv(m) -> dict[str, Slot]:
    """Conv and ConvTranspose alike: ``(out, in/groups, *taps)``; a grouped conv's tap as the matrix stored."""
    shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    return {"weight": Slot("oi" + _taps(m.num_spatial_dims), shape), "bias": _BIAS}


def _cell(gates):
    def rule(m) -> dict[str, Slot]:
        g, h = len(gates), m.hidden_size
        return {
            "weight_ih": Slot("oi", (g * h, m.input_size), blocks=gates),
            "weight_hh": Slot("oi", (g * h, h), blocks=gates),
            "bias": _BIAS,
            "bias_n": _BIAS,
        }

    return rule


def _embedding(m) -> dict[str, Slot]:
    return {"weight": _skip("an embedding (a lookup table)")}


def _norm(m) -> dict[str, Slot]:
    return {"weight": _skip("a normalization scale"), "bias": _skip("a normalization shift")}


#: Module type -> ``rule(module) -> {field: Slot}`` (fields it does not name: no rule), or a Slot for
#: every array anywhere under a module of that type (wrappers whose inner weights FIRE must not touch).
MODULE_TABLE: dict[type, object] = {
    eqx.nn.Linear: _linear,
    eqx.nn.Conv: _conv,
    eqx.nn.ConvTranspose: _conv,
    eqx.nn.GRUCell: _cell(_GRU_GATES),
    eqx.nn.LSTMCell: _cell(_LSTM_GATES),
    eqx.nn.Embedding: _embedding,
    eqx.nn.LayerNorm: _norm,
    eqx.nn.RMSNorm: _norm,
    eqx.nn.GroupNorm: _norm,
    eqx.nn.BatchNorm: _norm,
    eqx.nn.WeightNorm: _skip(
        "under eqx.nn.WeightNorm: the layer uses g * v / ||v||, a reparametrized weight FIRE has no rule for "
        "(layouts= projects it)"
    ),
    eqx.nn.SpectralNorm: _skip(
        "under eqx.nn.SpectralNorm: the layer divides its weight by its largest singular value, a reparametrized "
        "weight FIRE has no rule for (layouts= projects it)"
    ),
    eqx.nn.StateIndex: _skip("a stateful layer's initial state (eqx.nn.StateIndex), not a weight"),
}
# eqx.nn.MultiheadAttention has no row: its arrays are those of its four Linears.


def _entry(module):
    for cls in type(module).__mro__:
        if cls in MODULE_TABLE:
            return MODULE_TABLE[cls]
    return None


# --- the tree ---------------------------------------------------------------------------------------------


def _child(node, k):
    """The child of ``node`` under the key path entry ``k``, or None where the key cannot be followed."""
    try:
        if isinstance(k, jax.tree_util.GetAttrKey):
            return getattr(node, k.name)
        if isinstance(k, jax.tree_util.SequenceKey):
            return node[k.idx]
        if isinstance(k, jax.tree_util.DictKey):
            return node[k.key]
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return None


def _slot(model, path) -> Slot | None:
    """What the modules on ``path`` say about the array there; None when no module has a rule for it."""
    node = model
    for k in path[:-1]:
        if isinstance(node, eqx.Module):
            entry = _entry(node)
            if isinstance(entry, Slot):  # a wrapper: everything under it
                return entry
        node = _child(node, k)
        if node is None:
            return None
    if isinstance(node, eqx.Module):  # the module holding the array
        entry = _entry(node)
        if isinstance(entry, Slot):
            return entry
        if entry is not None and isinstance(path[-1], jax.tree_util.GetAttrKey):
            return entry(node).get(path[-1].name)
    return None


def _why_left(name: str, owner_type: str | None) -> str:
    field = name.rsplit(".", 1)[-1]
    if "bias" in field:
        return "a bias"
    if "embed" in name.lower():
        return "an embedding"
    where = f"{owner_type}.{field}" if owner_type else field
    return f"no rule for {where} (layouts= projects it)"


def _owner_type(model, path) -> str | None:
    node = model
    for k in path[:-1]:
        node = _child(node, k)
        if node is None:
            return None
    return type(node).__name__ if isinstance(node, eqx.Module) else None


# --- selection --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Weight:
    index: int  # position among the flattened leaves
    name: str
    array: object
    layout: str
    blocks: tuple[str, ...] | None  # equal blocks along axis ``axis``
    axis: int

    def items(self, array=None):
        """``(name, array, layout)`` per matrix group FIRE projects: the whole weight, or each gate block."""
        array = self.array if array is None else array
        if not self.blocks:
            return [(self.name, array, self.layout)]
        parts = jnp.split(array, len(self.blocks), axis=self.axis)
        return [(f"{self.name}[{label}]", part, self.layout) for label, part in zip(self.blocks, parts)]


def _check_stacked(stacked):
    """``stacked`` as ``{pattern: n}``; an int ``n`` is every covered weight (``{"*": n}``)."""
    if stacked is None:
        return {}
    if isinstance(stacked, int) and not isinstance(stacked, bool):
        stacked = {"*": stacked}
    if not isinstance(stacked, Mapping):
        raise TypeError(
            f"stacked must be a number of leading stack axes or a mapping of glob patterns to such numbers, got "
            f"{type(stacked).__name__}"
        )
    for pattern, n in stacked.items():
        if not isinstance(pattern, str) or isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"stacked must map glob patterns to numbers of leading stack axes, got {pattern!r}: {n!r}")
        if n < 1:
            raise ValueError(f"stacked: {pattern!r} must map to at least 1 stack axis, got {n}")
    return dict(stacked)


def _layout_for(layouts: dict, name: str, ndim: int):
    """The first ``layouts`` pattern naming ``name`` (or a module above it) whose layout fits ``ndim`` axes."""
    fitting = {p: lay for p, lay in layouts.items() if lay is None or len(lay) == ndim}
    return _first_match(fitting, name, ".")


def _how_stacked(name: str, shape, slot: Slot) -> str:
    module = name.rpartition(".")[0] or name
    extra = len(shape) - len(slot.shape)
    if extra > 0 and tuple(shape[extra:]) == slot.shape:
        letters = _STACK_LETTERS[:extra]
        return (
            f"its module declares {slot.shape}, so it has {extra} extra leading axis(es): an ensemble "
            f"(eqx.filter_vmap) or a stacked layer for jax.lax.scan? Say so with stacked={{{module!r}: {extra}}} "
            f"(or stacked={extra} for the whole model; each member is projected on its own), "
            f"layouts={{{name!r}: {letters + slot.layout!r}}}, or exclude it"
        )
    return (
        f"its module declares {slot.shape}, which the shape does not hold as trailing axes; give its layout with "
        f"layouts={{{name!r}: ...}} (uppercase letters are stack axes), or exclude it"
    )


def _plan(model, include, exclude, layouts, stacked):
    """Flatten ``model`` and decide every array: ``(pairs, treedef, chosen, skipped)``; raises before any work."""
    include, exclude = Patterns(include, "include"), Patterns(exclude, "exclude")
    layouts, stacked = check_layouts(layouts), _check_stacked(stacked)
    pairs, treedef = jax.tree_util.tree_flatten_with_path(model)
    used: set[str] = set()
    names, known, chosen, skipped, problems = [], [], [], [], []
    for index, (path, leaf) in enumerate(pairs):
        if not eqx.is_array(leaf):
            continue
        name = ".".join(_key_name(k) for k in path)
        names.append(name)
        shape = tuple(int(s) for s in leaf.shape)
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or len(shape) < 2:
            continue  # not a weight matrix: integer state, biases and norms of one axis
        pattern, override = _layout_for(layouts, name, len(shape))
        slot = None
        if pattern is not None:
            used.add(pattern)
        else:
            slot = _slot(model, path)
            if slot is None or slot.layout is None:
                skipped.append((name, shape, slot.reason if slot else _why_left(name, _owner_type(model, path))))
                continue
        known.append(name)
        stack_pattern, n = (None, None) if pattern is not None else _first_match(stacked, name, ".")
        n = n or 0  # leading stack axes
        if stack_pattern is not None:  # used when it names a weight, also one include/exclude leave out
            used.add(stack_pattern)
        keep = include.func(name, leaf) if include.func else (include.hit(name) if include.patterns else True)
        drop = exclude.func(name, leaf) if exclude.func else exclude.hit(name)
        if not keep or drop:
            skipped.append((name, shape, "excluded by exclude=" if keep else "not matched by include="))
            continue
        if pattern is not None and override is None:
            skipped.append((name, shape, f"layouts pattern {pattern!r} maps it to None"))
            continue
        if 0 in shape:
            skipped.append((name, shape, "empty"))
            continue
        if pattern is not None:
            parse_layout(override, shape, name)
            chosen.append(_Weight(index, name, leaf, override, None, 0))
            continue
        if stack_pattern is not None:
            if shape[n:] != slot.shape:
                problems.append(
                    f"{name} {shape}: stacked pattern {stack_pattern!r} gives {n} leading stack axis(es), leaving "
                    f"{shape[n:]}, but its module declares {slot.shape}"
                )
                continue
        elif shape != slot.shape:
            problems.append(f"{name} {shape}: {_how_stacked(name, shape, slot)}")
            continue
        chosen.append(_Weight(index, name, leaf, _STACK_LETTERS[:n] + slot.layout, slot.blocks, n))
    for what, mapping in (("layouts", layouts), ("stacked", stacked)):
        for pattern in mapping:
            if pattern not in used:
                close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5) or names[:3]
                raise ValueError(
                    f"fire_core.equinox: {what} pattern {pattern!r} matches no weight FIRE would consider "
                    f"(closest: {', '.join(close) or 'none, the model holds no arrays'})"
                )
    include.check_used(known, "weight FIRE would consider")
    exclude.check_used(known, "weight FIRE would consider")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(f"fire_core.equinox: {len(problems)} weight(s) not understood, nothing was changed:\n  {shown}")
    if not chosen:
        reasons = sorted({reason for _, _, reason in skipped})
        raise ValueError(
            "fire_core.equinox: no weight selected, nothing to project"
            + (f" (left alone: {'; '.join(reasons)})" if reasons else " (the model has no array of 2 or more axes)")
        )
    return pairs, treedef, chosen, skipped


def _flat(chosen, arrays=None):
    """The selected matrices as a flat ``{name: array}`` and ``{escaped name: layout}`` for fire_core.flax."""
    flat, layouts = {}, {}
    for k, weight in enumerate(chosen):
        for name, array, layout in weight.items(None if arrays is None else arrays[k]):
            flat[name] = array
            layouts[glob.escape(name)] = layout  # a pattern naming exactly this key, brackets and all
    return flat, layouts


# --- the public calls ---------------------------------------------------------------------------------------


def select(model, *, include=None, exclude=None, layouts=None, stacked=None) -> dict[str, str]:
    """The weights :func:`apply` would project, as ``{name: layout}`` (gate blocks as ``name[r]``, ...)."""
    _, _, chosen, _ = _plan(model, include, exclude, layouts, stacked)
    return {name: layout for weight in chosen for name, _, layout in weight.items()}


def apply(
    model, steps: int = 5, *, include=None, exclude=None, layouts=None, stacked=None, method: str = "fire",
    scale="fire",
):
    """FIRE on every covered weight of an Equinox model; returns a new model.

    ::

        model = fire_core.equinox.apply(model, steps=10)
        model = eqx.filter_jit(fire_core.equinox.apply)(model)     # the same, compiled

    Pure: ``model`` is not modified; the result has its structure, dtypes and
    (under jit) shardings, and every array not projected is the input's own.
    ``steps``, ``method`` and ``scale`` are those of :func:`fire_core.reinit`.
    Which weights are covered, and in which layout, is the module docstring's
    table; all matrices of one shape are projected in one batched call.

    ``include`` / ``exclude``: glob patterns matched against each weight's
    name (``layers.0.weight``) and each module path above it (``layers.0``,
    ``layers``), or a callable ``(name, array) -> bool``. ``layouts``:
    ``{pattern: layout or None}``, first match wins, applied to the arrays
    its layout fits (a pattern naming a module sets its weight, not its bias);
    it overrides the table (no gate blocks) and ``None`` leaves an array alone.
    ``stacked``: ``{pattern: n}`` or ``n``, the leading stack axes of the
    weights of an ensemble or a layer stack (module docstring).

    Raises before any work, with nothing changed: a pattern that matches no
    weight, a call that selects nothing, a weight whose shape is not the one
    its module declares (stacked without ``stacked=``), and eagerly a NaN or
    Inf weight, each error naming the weight.
    """
    pairs, treedef, chosen, _ = _plan(model, include, exclude, layouts, stacked)
    flat, flat_layouts = _flat(chosen)
    new = _flax.apply(flat, steps, layouts=flat_layouts, method=method, scale=scale)
    leaves = [leaf for _, leaf in pairs]
    for weight in chosen:
        parts = [new[name] for name, _, _ in weight.items()]
        leaves[weight.index] = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=weight.axis)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def report(
    before, after, *, include=None, exclude=None, layouts=None, stacked=None, scale="fire", method=None, steps=None,
) -> Report:
    """A :class:`fire_core.Report` of what :func:`apply` did, from the models before and after.

    Pass the selection arguments (``include``, ``exclude``, ``layouts``,
    ``stacked``) and ``scale`` given to :func:`apply`; ``method`` and
    ``steps`` only label the report. One row per projected weight (per gate
    block for the RNN cells) with ``sfe``, ``dfi_before`` and ``dfi_after``
    as :func:`fire_core.flax.report` gives them; ``Report.skipped`` names
    every floating array of two or more axes left alone, with the reason.
    Reads values: call it outside jit.
    """
    _, treedef, chosen, skipped = _plan(before, include, exclude, layouts, stacked)
    after_leaves, after_def = jax.tree_util.tree_flatten(after)
    if after_def != treedef:
        raise ValueError(f"fire_core.equinox.report: before and after are different trees:\n{treedef}\nvs\n{after_def}")
    flat_before, flat_layouts = _flat(chosen)
    flat_after, _ = _flat(chosen, [after_leaves[w.index] for w in chosen])
    rep = _flax.report(flat_before, flat_after, layouts=flat_layouts, scale=scale, method=method, steps=steps)
    order = {name: k for k, name in enumerate(flat_before)}  # the model's order (fire_core.flax sorts dict keys)
    rep.rows.sort(key=lambda row: order[row["name"]])
    for name, shape, reason in skipped:
        rep.skip(name, shape, reason)
    return rep


def reset_opt_state(opt_state, before, after, *, tx=None, reset_count: bool = True, filter_spec=eqx.is_array):
    """The optax state with the parts of the leaves FIRE changed restarted; returns a new state.

    Equinox trains ``optax`` on ``eqx.filter(model, filter_spec)``::

        opt_state = tx.init(eqx.filter(model, eqx.is_array))
        new = fire_core.equinox.apply(model)
        opt_state = fire_core.equinox.reset_opt_state(opt_state, model, new, tx=tx)

    ``before`` and ``after`` are the models passed to and returned by
    :func:`apply` (or their filtered parameters); pass the ``filter_spec``
    the state was initialized with if it was not ``eqx.is_array``. The rest
    is :func:`fire_core.flax.reset_opt_state`: every per-parameter part of the
    state (Adam's ``mu`` and ``nu``, momentum traces, ...) of a leaf whose
    values changed restarts at ``tx.init``'s value (zeros without ``tx``),
    the others are kept; ``reset_count`` restarts Adam's bias-correction
    count. Works under jit.
    """
    return _flax.reset_opt_state(
        opt_state, eqx.filter(before, filter_spec), eqx.filter(after, filter_spec), reset_count=reset_count, tx=tx
    )
