"""Optimizer state after FIRE: the parts of an optax state that belong to the projected leaves, restarted.

An optax state is a tree of NamedTuples. Each optimizer's state type keeps,
per parameter leaf, statistics of the gradients seen at the old weights
(moments, accumulators, factored row and column statistics), and next to them
scalars: step counts, hyperparameters, keys. After FIRE those statistics are
stale for the leaves that were projected. :func:`reset` walks the state, maps
every per-parameter array to the parameter leaf it belongs to, and restarts
exactly the projected leaves' parts at the values a fresh ``tx.init`` gives;
the other leaves' parts are returned as they were. A per-parameter array it
cannot map with confidence is an error naming the state type and its path:
it never returns a state with a moment left stale.

:data:`_STATES` is the table of what each known optax state type holds. A
state type not in it is walked field by field; a part of it with the
parameters' tree structure and shapes is reset from ``tx.init(after)`` (which
needs ``tx``), one with that structure but other shapes is refused.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import keystr, tree_flatten_with_path

# --- what each known state type holds ---------------------------------------------------------------

MOMENT = "moment"  # a tree like the parameters, starting at zeros (Adam's mu and nu, momentum traces)
INITIAL = "initial"  # like the parameters, starting at a hyperparameter (adagrad's accumulator value,
#                      rmsprop's initial_scale, rprop's learning rate): only tx.init knows it
FACTORED = "factored"  # per parameter leaf, arrays of other shapes (row and column statistics), zeros
COUNT = "count"  # the step count behind the bias correction or decay of those statistics
WINDOW = "window"  # MultiSteps' position in its gradient-accumulation window
KEEP = "keep"  # schedule counts, hyperparameters, keys, diagnostics: not statistics of the old weights
INNER = "inner"  # a wrapped optimizer's state
JOINT = "joint"  # one history of all parameters together (L-BFGS pairs, line-search values): all or none

# (module, class name) -> kind of each field. The modules are tried in order, so a class that moved
# between optax versions is still found; one missing from the installed optax is left out.
_TABLE = [
    (("optax",), "ScaleByAdamState", {"count": COUNT, "mu": MOMENT, "nu": MOMENT}),
    (("optax",), "ScaleByAmsgradState", {"count": COUNT, "mu": MOMENT, "nu": MOMENT, "nu_max": MOMENT}),
    (("optax",), "ScaleByBeliefState", {"count": COUNT, "mu": MOMENT, "nu": MOMENT}),
    (("optax",), "ScaleByLionState", {"count": COUNT, "mu": MOMENT}),
    (("optax",), "ScaleByNovogradState", {"count": COUNT, "mu": MOMENT, "nu": FACTORED}),  # nu: one scalar a leaf
    (("optax",), "ScaleByAdanState", {"m": MOMENT, "v": MOMENT, "n": MOMENT, "g": MOMENT, "t": COUNT}),
    (("optax",), "ScaleByAdaDeltaState", {"e_g": MOMENT, "e_x": MOMENT}),
    (("optax",), "TraceState", {"trace": MOMENT}),
    (("optax",), "EmaState", {"count": COUNT, "ema": MOMENT}),
    (("optax",), "ScaleByRmsState", {"nu": INITIAL}),
    (("optax._src.transform",), "ScaleByRmsWithCountState", {"count": COUNT, "nu": INITIAL}),
    (("optax",), "ScaleByRStdDevState", {"mu": MOMENT, "nu": INITIAL}),
    (("optax._src.transform",), "ScaleByRStdDevWithCountState", {"count": COUNT, "mu": MOMENT, "nu": INITIAL}),
    (("optax",), "ScaleByRssState", {"sum_of_squares": INITIAL}),
    (("optax",), "ScaleByRpropState", {"step_sizes": INITIAL, "prev_updates": MOMENT}),
    (("optax",), "ScaleBySM3State", {"mu": FACTORED, "nu": MOMENT}),  # mu: one vector per axis of a leaf
    (("optax",), "FactoredState", {"count": COUNT, "v_row": FACTORED, "v_col": FACTORED, "v": FACTORED}),
    (("optax.contrib",), "MuonState", {"count": COUNT, "mu": MOMENT, "ns_coeffs": KEEP}),
    (("optax",), "ScaleByLBFGSState", JOINT),
    (("optax",), "ScaleByZoomLinesearchState", JOINT),
    (("optax",), "ScaleByBacktrackingLinesearchState", JOINT),
    (("optax",), "ScaleByScheduleState", {"count": KEEP}),
    (("optax.schedules._inject",), "WrappedScheduleState", {"count": KEEP}),
    (("optax.transforms._adding",), "WeightDecaySchedule", {"count": KEEP}),
    (("optax",), "AddNoiseState", {"count": KEEP, "rng_key": KEEP}),
    (("optax",), "ZeroNansState", {"found_nan": KEEP}),
    (("optax",), "EmptyState", {}),
    (("optax",), "MaskedState", {"inner_state": INNER}),
    (("optax.transforms", "optax"), "PartitionState", {"inner_states": INNER}),
    (("optax",), "InjectHyperparamsState", {"count": KEEP, "hyperparams": KEEP, "inner_state": INNER}),
    (
        ("optax",),
        "InjectStatefulHyperparamsState",
        {"count": KEEP, "hyperparams": KEEP, "hyperparams_states": KEEP, "inner_state": INNER},
    ),
    (
        ("optax",),
        "ApplyIfFiniteState",
        {"notfinite_count": KEEP, "last_finite": KEEP, "total_notfinite": KEEP, "inner_state": INNER},
    ),
    (("optax",), "ConditionallyMaskState", {"step": KEEP, "inner_state": INNER}),
    (("optax",), "ConditionallyTransformState", {"inner_state": INNER, "step": KEEP}),
    (
        ("optax",),
        "MultiStepsState",
        {"mini_step": WINDOW, "gradient_step": KEEP, "inner_opt_state": INNER, "acc_grads": MOMENT, "skip_state": KEEP},
    ),
]


def _resolve(modules, name):
    for module in modules:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found = None
        if found is not None:
            return found
    return None


_STATES = {cls: kinds for modules, name, kinds in _TABLE if (cls := _resolve(modules, name)) is not None}
_MASKED = optax.MaskedNode


def _spec(node):
    """The table's entry for ``node``'s type, or None (unknown type, or a version with other fields)."""
    kinds = _STATES.get(type(node))
    if kinds is None or kinds == JOINT:
        return kinds
    return kinds if set(getattr(node, "_fields", ())) == set(kinds) else None


def _is_placeholder(x) -> bool:
    """What optax puts where a leaf is masked out (``optax.masked``, ``multi_transform``), and None."""
    return x is None or isinstance(x, _MASKED)


# --- the parameters as the state is matched against -------------------------------------------------


class _Params:
    """The parameter leaves: key paths, shapes, and whether each was changed (a bool, traced under jit)."""

    def __init__(self, before, after):
        # placeholders are kept as leaves: inside optax.masked or multi_transform the parameters a
        # transformation sees hold optax.MaskedNode where its state does; those leaves are not its own
        pairs, treedef = tree_flatten_with_path(before, is_leaf=_is_placeholder)
        after_leaves, after_def = jax.tree_util.tree_flatten(after, is_leaf=_is_placeholder)
        if after_def != treedef:
            raise ValueError(
                "reset_opt_state: before and after are different trees; pass the parameters given to and "
                f"returned by apply\n{treedef}\nvs\n{after_def}"
            )
        self.paths = [path for path, _ in pairs]
        self.absent = {i for i, (_, leaf) in enumerate(pairs) if _is_placeholder(leaf)}
        self.shapes = [None if i in self.absent else tuple(jnp.shape(leaf)) for i, (_, leaf) in enumerate(pairs)]
        self.changed = []
        for i, (path, (_, b), a) in enumerate(zip(self.paths, pairs, after_leaves, strict=True)):
            if i in self.absent or _is_placeholder(a):
                if not (i in self.absent and _is_placeholder(a)):
                    raise ValueError(f"reset_opt_state: parameter {keystr(path)} is masked out before or after "
                                     "but not both; pass the parameters given to and returned by apply")
                self.changed.append(False)
                continue
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"reset_opt_state: parameter {keystr(path)} has shape {jnp.shape(b)} before and "
                    f"{jnp.shape(a)} after; FIRE keeps shapes, so these are not a before/after pair"
                )
            differs = jnp.any(jnp.asarray(b) != jnp.asarray(a))
            # which leaves were projected is known when the arrays are concrete; under jit it is traced
            self.changed.append(differs if isinstance(differs, jax.core.Tracer) else bool(differs))
        self.bare = treedef.num_nodes == 1 and treedef.num_leaves == 1  # params is one array
        self.index = {path: i for i, path in enumerate(self.paths)}
        self.under: dict[tuple, list[int]] = {}  # every path prefix -> the leaves below it
        for i, path in enumerate(self.paths):
            for k in range(len(path)):
                self.under.setdefault(path[:k], []).append(i)

    def owners(self, node):
        """Map ``node``'s leaves onto parameter leaves, or None if it does not map.

        Returns ``(leaves, owners, exact, treedef)``: ``node`` flattened (placeholders as leaves),
        and ``owners[k]``, the index of the parameter leaf ``k`` belongs to, or None for a
        placeholder (a masked leaf or subtree). ``exact``: every present leaf sits at a parameter's
        path with its shape (a moment); otherwise some parameter's part has other shapes or more
        structure (factored). Every parameter must be covered, by its part or a placeholder.
        """
        pairs, treedef = tree_flatten_with_path(node, is_leaf=_is_placeholder)
        leaves = [leaf for _, leaf in pairs]
        if self.bare:  # no structure to match: only an array of the parameter's shape is its part
            ok = len(leaves) == 1 and not _is_placeholder(leaves[0]) and jnp.shape(leaves[0]) == self.shapes[0]
            return (leaves, [0], True, treedef) if ok else None
        covered = [0] * len(self.paths)
        owners, exact = [], True
        for path, leaf in pairs:
            if _is_placeholder(leaf):
                below = [self.index[path]] if path in self.index else self.under.get(path)
                if not below:
                    return None
                for i in below:
                    covered[i] += 1
                owners.append(None)
                continue
            i = next((self.index[path[:k]] for k in range(len(path), 0, -1) if path[:k] in self.index), None)
            if i is None or i in self.absent:  # no parameter, or one masked out of this transformation
                return None
            if len(path) != len(self.paths[i]) or tuple(jnp.shape(leaf)) != self.shapes[i]:
                exact = False
            covered[i] += 1
            owners.append(i)
        if not all(covered) or (exact and max(covered, default=0) > 1):
            return None
        return leaves, owners, exact, treedef

    def any_changed(self, indices):
        flags = [self.changed[i] for i in indices]
        if any(f is True for f in flags):
            return True
        traced = [f for f in flags if f is not False]
        return jnp.any(jnp.stack(traced)) if traced else False


def _pick(flag, new, old):
    """``new`` where ``flag`` (a bool, or a traced bool under jit: then ``jnp.where``), else ``old``."""
    if flag is False:
        return old
    if flag is True:
        return new
    return jnp.where(flag, new, old)


# --- the walk ------------------------------------------------------------------------------------------


class _Reset:
    def __init__(self, params: _Params, reset_count: bool):
        self.params, self.reset_count = params, reset_count

    def walk(self, node, fresh, where: str, state: str | None = None):
        """``node`` restarted for the changed leaves; ``state`` names the nearest state type around it."""
        spec = _spec(node)
        if spec is not None:
            return self.known(node, fresh, where, spec)
        if _is_placeholder(node):
            return node
        if state is None or hasattr(node, "_fields"):
            state = type(node).__name__
        mapped = self.params.owners(node)
        if mapped is not None and any(o is not None for o in mapped[1]):
            if not mapped[2]:
                raise self.alien(where, state, mapped)
            return self.unknown_part(node, fresh, where, state, mapped)
        children, treedef = _children(node)
        if not children:
            return node
        if treedef.num_nodes == 1:  # a leaf
            return self.leaf(node, where, state)
        fresh_children = treedef.flatten_up_to(fresh) if fresh is not None else [None] * len(children)
        new = [
            self.walk(child, f, where + keystr(key), state)
            for (key, child), f in zip(children, fresh_children, strict=True)
        ]
        return treedef.unflatten(new)

    def known(self, node, fresh, where, spec):
        name = type(node).__name__
        if spec == JOINT:
            return self.joint(node, fresh, where, name)
        out, parts = {}, {}
        for field, kind in spec.items():
            value, start = getattr(node, field), getattr(fresh, field) if fresh is not None else None
            if kind == INNER:
                out[field] = self.walk(value, start, f"{where}.{field}", name)
            elif kind in (MOMENT, INITIAL, FACTORED):
                mapped = self.params.owners(value)
                if mapped is None or (kind != FACTORED and not mapped[2]):
                    raise ValueError(
                        f"reset_opt_state: {where}.{field} ({name}.{field}) does not have the structure and "
                        "shapes of the parameters; pass before/after as the same tree the optimizer was "
                        "initialized with (the params collection, or the nnx State it optimizes)"
                    )
                parts[field] = (value, start, mapped, kind)
            else:
                out[field] = value
        covered = sorted({i for _, _, mapped, _ in parts.values() for i in mapped[1] if i is not None})
        any_changed = self.params.any_changed(covered)
        # MultiSteps: restarting its window (mini_step 0) makes the next micro-step start a new mean, so
        # the partial window's gradients are dropped for every leaf, as in a fresh MultiSteps
        whole_window = self.reset_count and WINDOW in spec.values()
        flag = (lambda i: any_changed) if whole_window else (lambda i: self.params.changed[i])
        for field, (value, start, mapped, kind) in parts.items():
            out[field] = self.restart(value, start, mapped, kind, flag, f"{where}.{field}", name)
        for field, kind in spec.items():
            if kind in (COUNT, WINDOW) and self.reset_count:
                start = getattr(fresh, field) if fresh is not None else jnp.zeros_like(out[field])
                out[field] = _pick(any_changed, _like(start, out[field]), out[field])
        return node._replace(**out)

    def restart(self, value, start, mapped, kind, flag, where, name):
        """``value`` with the parts of changed parameter leaves at their start (``start``'s, or zeros)."""
        leaves, owners, _, treedef = mapped
        starts = treedef.flatten_up_to(start) if start is not None else [None] * len(leaves)
        new = []
        for leaf, owner, first in zip(leaves, owners, starts, strict=True):
            changed = False if owner is None else flag(owner)
            if changed is False:
                new.append(leaf)
                continue
            if first is None:
                if kind == INITIAL:
                    raise ValueError(
                        f"reset_opt_state: {where} ({name}) starts at a hyperparameter of the optimizer (an "
                        "initial accumulator value, initial scale or learning rate) that the state does not "
                        "record; pass tx= (the optimizer that made opt_state) to restart it at tx.init's values"
                    )
                first = jnp.zeros_like(leaf)
            new.append(_pick(changed, _like(first, leaf), leaf))
        return treedef.unflatten(new)

    def joint(self, node, fresh, where, name):
        """A history of all parameters together: restarted whole when any leaf it covers changed."""
        covered = set()
        for field in node._fields:
            mapped = self.params.owners(getattr(node, field))
            if mapped is not None:
                covered.update(i for i in mapped[1] if i is not None)
        any_changed = self.params.any_changed(sorted(covered) or range(len(self.params.paths)))
        if any_changed is False:
            return node
        if fresh is None:
            raise ValueError(
                f"reset_opt_state: {where} is a {name}, one history of all parameters together (curvature "
                "pairs, or a line search's last value and gradient, over every leaf at once), so it restarts "
                "whole, at tx.init's values; pass tx= (the optimizer that made opt_state)"
            )
        return jax.tree_util.tree_map(lambda f, x: _pick(any_changed, _like(f, x), x), fresh, node)

    def unknown_part(self, node, fresh, where, state, mapped):
        """A tree like the parameters in a state type fire_core does not know: restarted from ``tx.init``."""
        if fresh is None:
            if not any(self.params.changed[i] is not False for i in mapped[1] if i is not None):
                return node
            raise ValueError(
                f"reset_opt_state: {where} holds arrays shaped like the parameters in a {state}, a state type "
                "fire_core does not know, so it cannot tell what they start at; pass tx= (the optimizer that made "
                "opt_state) to restart the projected leaves' parts at tx.init(after)'s values"
            )
        return self.restart(node, fresh, mapped, MOMENT, lambda i: self.params.changed[i], where, state)

    def alien(self, where, state, mapped):
        leaves, owners, _, _ = mapped
        parts = [(k, i) for k, i in enumerate(owners) if i is not None]
        k, i = next(((k, i) for k, i in parts if jnp.shape(leaves[k]) != self.params.shapes[i]), parts[0])
        return ValueError(
            f"reset_opt_state: {where} (in a {state}) has the tree structure of the parameters but "
            f"other shapes or more structure (a {jnp.shape(leaves[k])} array for parameter "
            f"{keystr(self.params.paths[i])} of shape {self.params.shapes[i]}): a factored or stacked state "
            "fire_core does not know, whose parts it cannot map to the projected leaves with confidence. "
            "Re-initialize that optimizer's state (tx.init(new_params)) instead"
        )

    def leaf(self, x, where, state):
        shape, dtype = jnp.shape(x), getattr(x, "dtype", None)
        if len(shape) >= 1 and dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"reset_opt_state: {where} is a {dtype} array of shape {shape} in a {state}, a state type "
                "fire_core does not know, and belongs to no tree like the parameters, so fire_core cannot tell "
                "which part of it belongs to the projected leaves. Re-initialize that optimizer's state "
                "(tx.init(new_params)) instead"
            )
        return x  # scalars (counts, hyperparameters), keys and flags are no parameter's statistics


def _children(node):
    """``node``'s direct children with their keys, and the one-level tree definition."""
    pairs, treedef = tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return pairs, treedef


def _like(value, old):
    """``value`` in ``old``'s dtype; a shape that differs means ``tx`` did not make this state."""
    if jnp.shape(value) != jnp.shape(old):
        raise ValueError(
            f"reset_opt_state: tx.init(after) gives a part of shape {jnp.shape(value)} where opt_state holds "
            f"{jnp.shape(old)}; pass the optimizer that made opt_state"
        )
    dtype = getattr(old, "dtype", None)
    return jnp.asarray(value, dtype=dtype) if dtype is not None else value


def reset(opt_state, before, after, *, reset_count: bool = True, tx=None):
    """``opt_state`` (arrays, no nnx Variables) with the projected leaves' parts restarted; see the module doc."""
    params = _Params(before, after)
    fresh = None
    if tx is not None:
        init = getattr(tx, "init", None)
        if not callable(init):
            raise TypeError(f"tx must be an optax GradientTransformation (with init), got {type(tx).__name__}")
        fresh = init(after)
        got = jax.tree_util.tree_structure(fresh, is_leaf=_is_placeholder)
        want = jax.tree_util.tree_structure(opt_state, is_leaf=_is_placeholder)
        if got != want:
            raise ValueError(
                "reset_opt_state: tx.init(after) has another structure than opt_state; pass the optimizer "
                f"that made opt_state\n{want}\nvs\n{got}"
            )
    if not params.paths:
        return opt_state
    return _Reset(params, reset_count).walk(opt_state, fresh, "opt_state")
