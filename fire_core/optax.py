"""FIRE inside an optax optimizer: ``with_fire(tx, schedule=...)``, a GradientTransformation.

A JAX training loop changes one line::

    tx = fire_core.optax.with_fire(optax.adam(1e-3), schedule=[1000])

and at the scheduled update the optimizer returns, instead of ``tx``'s
update, the step that lands the parameters on FIRE's weights:

* the updates are ``fire_core.flax.apply(params) - params`` for the leaves
  FIRE projects and 0 for every other leaf, so ``optax.apply_updates`` gives
  FIRE's weights (to the rounding of ``p + (new - p)``, see ``docs/optax.md``);
* the inner state of exactly the projected leaves restarts as ``tx.init``
  gives it (:func:`fire_core.flax.reset_opt_state` with ``tx``); the other
  leaves' state is kept as it was;
* the gradient passed to that update is not used (``tx`` is not run on it).

Every other update is ``tx``'s own, updates and state passed through. The
decision is traced (``jax.lax.cond`` on the schedule's traced verdict), so
the wrapper works under ``jax.jit`` and inside ``nnx.Optimizer``.

Steps are optax's: the count of updates done before this one. ``schedule=
[1000]`` makes the 1001st update FIRE's: the parameters after it are FIRE of
the parameters after 1000 ordinary updates. ``Every(n)`` fires at updates
``n + 1, 2n + 1, ...``; a callable gets that traced count and returns a
traced bool; :class:`fire_core.schedule.DfIAbove` measures the projected
leaves' :func:`fire_core.schedule.target_dfi` every ``every`` updates. The
schedule logic is :mod:`fire_core.schedule`'s (``traced_init``,
``traced_poll``); its progress lives in the optax state, so it is saved and
restored with it by any checkpointer, and :func:`fired` reads it back.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _flax_select
from .conventions import check_patterns
from .flax import apply as flax_apply
from .flax import reset_opt_state
from .layout import check_scale
from .polar import check_method
from .schedule import DfIAbove, as_schedule, target_dfi, traced_init, traced_poll

__all__ = ["with_fire", "FireState", "fired"]

log = logging.getLogger("fire_core.optax")

_SELECTION = ("include", "exclude", "layouts", "stacked", "model", "trainable")


class FireState(NamedTuple):
    """``with_fire``'s state: updates done, the inner optimizer's state, the schedule's traced progress."""

    count: jax.Array  # int32: updates done before the next one
    inner_state: Any
    progress: dict  # fire_core.schedule.traced_init's arrays


def with_fire(
    tx: optax.GradientTransformation,
    schedule,
    *,
    steps: int = 5,
    method: str = "fire",
    scale="fire",
    include=None,
    exclude=None,
    layouts=None,
    stacked=None,
    model=None,
    trainable=None,
) -> optax.GradientTransformationExtraArgs:
    """``tx`` with FIRE applied to the parameters at the updates ``schedule`` picks.

    ``schedule``: any :func:`fire_core.schedule.as_schedule` form counted in
    updates (steps, ``Every``, a traceable callable of the count,
    ``DfIAbove``); the activation triggers need a forward pass an optax
    update never sees and are refused here. The other options are
    :func:`fire_core.flax.apply`'s and are checked now; the selection is
    checked against the parameters at ``init``. ``update`` needs ``params``.
    """
    if not callable(getattr(tx, "init", None)) or not callable(getattr(tx, "update", None)):
        raise TypeError(f"with_fire wraps an optax GradientTransformation, got {type(tx).__name__}")
    plan = as_schedule(schedule)
    traced_init(plan)  # refuses activation and epoch triggers now, before training starts
    check_method(method, steps)
    check_scale(scale)
    check_patterns(include, "include")
    check_patterns(exclude, "exclude")
    _flax_select._check_options(layouts, stacked)
    selection = dict(include=include, exclude=exclude, layouts=layouts, stacked=stacked, model=model,
                     trainable=trainable)
    options = dict(steps=steps, method=method, scale=scale, **selection)
    inner = optax.with_extra_args_support(tx)

    def init(params):
        _, _, chosen, skipped = _flax_select.plan(params, **selection)  # selection errors raise here
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(params)):
            _log_selection(chosen, skipped)
        return FireState(jnp.zeros((), jnp.int32), inner.init(params), traced_init(plan))

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "with_fire: update(grads, state) was called without params; FIRE projects the parameters, "
                "so call update(grads, state, params)"
            )
        if not isinstance(state, FireState):
            raise TypeError(f"with_fire: expected the FireState its init made, got {type(state).__name__}")
        chosen = _flax_select.plan(params, **selection)[2]

        def measure():  # per-layer DfI relative to FIRE's target, of the leaves FIRE would project
            return jnp.concatenate([jnp.ravel(target_dfi(leaf.array, leaf.layout)) for leaf in chosen])

        fire, progress = traced_poll(plan, state.progress, state.count, measure)

        # the arrays enter both branches as operands, so they are traced there even in an eager call
        operands = (updates, state.inner_state, params, extra_args)

        def ordinary(updates, inner_state, params, extra_args):
            return inner.update(updates, inner_state, params, **extra_args)

        like = jax.eval_shape(ordinary, *operands)[0]

        def firing(updates, inner_state, params, extra_args):
            new = flax_apply(params, **options)
            inner_state = reset_opt_state(inner_state, params, new, tx=tx)
            jax.debug.callback(_log_firing, state.count, progress["fired_by"] - state.progress["fired_by"],
                               reasons=[repr(t) for t in plan.triggers])
            return _landing(_flax_select.plan(params, **selection), new, like), inner_state

        new_updates, inner_state = jax.lax.cond(fire, firing, ordinary, *operands)
        return new_updates, FireState(optax.safe_int32_increment(state.count), inner_state, progress)

    return optax.GradientTransformationExtraArgs(init, update)


def _landing(plan, new, like):
    """Updates that take ``params`` to ``new``: ``new - params`` on the projected leaves, 0 elsewhere.

    ``plan``: ``_flax_select.plan(params)``; ``like``: the shapes and dtypes of the inner
    optimizer's updates (what both branches return).
    """
    pairs, _, chosen, _ = plan
    new_leaves = [leaf for _, leaf in _flax_select.flatten(new)[0]]
    out_leaves, out_def = jax.tree_util.tree_flatten(like)
    if len(out_leaves) != len(pairs):
        raise ValueError(
            f"with_fire: the inner optimizer's updates have {len(out_leaves)} leaves and params {len(pairs)}; "
            "pass params with the structure of the gradients"
        )
    delta = [jnp.zeros(o.shape, o.dtype) for o in out_leaves]
    for leaf in chosen:
        before, after = leaf.array, _flax_select.value(new_leaves[leaf.index])
        delta[leaf.index] = (after - before).astype(out_leaves[leaf.index].dtype)
    return jax.tree_util.tree_unflatten(out_def, delta)


def _log_selection(chosen, skipped) -> None:
    log.info("with_fire: %d weights are projected at each firing: %s", len(chosen),
             ", ".join(f"{leaf.path} ({leaf.layout})" for leaf in chosen))
    for name, shape, reason in skipped:
        log.info("with_fire: left alone: %s %s: %s", name, tuple(shape), reason)


def _log_firing(count, fired_now, *, reasons) -> None:
    which = [r for r, f in zip(reasons, np.asarray(fired_now)) if f]
    log.info("FIRE at update %d (after %d updates): fired by %s", int(count) + 1, int(count), ", ".join(which))


def fired(state, schedule=None) -> dict:
    """What FIRE did so far, read on the host from an optax state holding a :class:`FireState`.

    ``{"updates": updates done, "last_fired": the count at the last firing (the
    firing was update ``last_fired + 1``) or None, "fired_by": firings per
    trigger, "dfi": the last DfIAbove check's value per DfIAbove trigger (NaN
    before the first check)}``. Triggers are listed in the schedule's order;
    pass ``schedule`` (as given to :func:`with_fire`) to key them by name.
    """
    found = [x for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, FireState))
             if isinstance(x, FireState)]
    if len(found) != 1:
        raise ValueError(f"fired: expected one FireState in the optax state, found {len(found)}")
    fs = found[0]
    progress = fs.progress
    last = int(progress["last_fired"])
    counts = [int(c) for c in np.asarray(progress["fired_by"])]
    n = len(counts)
    names = [repr(t) for t in as_schedule(schedule).triggers] if schedule is not None else list(range(n))
    if len(names) != n:
        raise ValueError(f"fired: the state has {n} triggers, the schedule given {len(names)}")
    dfi = {names[k]: float(progress[f"t{k}"]["last_value"]) for k in range(n)
           if isinstance(progress[f"t{k}"], dict) and "last_value" in progress[f"t{k}"]}
    if schedule is not None:
        kinds = [isinstance(t, DfIAbove) for t in as_schedule(schedule).triggers]
        if [names[k] in dfi for k in range(n)] != kinds:
            raise ValueError("fired: the schedule given is not the one the state was made with")
    return {"updates": int(fs.count), "last_fired": None if last < 0 else last,
            "fired_by": dict(zip(names, counts)), "dfi": dfi}
