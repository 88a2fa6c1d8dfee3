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

``with_fire`` wraps the whole optimizer, ``with_fire(optax.chain(...))``: the
landing step reaches the weights only if nothing after it changes it, and a
transformation cannot see what follows it in a chain (a learning rate after
it scales the step, and the weights land elsewhere). :func:`check` refuses a
``tx`` in which it would not land. Inside ``optax.masked`` or
``optax.multi_transform`` it works on the leaves it is given (the others are
``optax.MaskedNode`` to it, and logged as left alone).

Leaves ``tx`` freezes (``optax.set_to_zero`` in a ``multi_transform``: their
update takes no gradient) are left alone and logged as frozen, as
:func:`fire_core.torch.apply` leaves ``requires_grad=False`` weights;
``trainable=True`` projects them too.

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
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax

from ..flax import _optax_state
from ..flax import _select as _flax_select
from ..core.patterns import check_patterns
from ..flax import apply as flax_apply
from ..flax import reset_opt_state
from ..core.layout import check_scale
from ..core.polar import check_method
from ..core.schedule import DfIAbove, as_schedule, saved_spec, target_dfi, traced_init, traced_poll

__all__ = ["with_fire", "FireState", "fired", "check"]

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

    ``tx`` is the whole optimizer, learning rate included: a transformation
    chained after ``with_fire`` changes the step that lands the weights on
    FIRE's. Write ``with_fire(optax.chain(..., optax.scale_by_learning_rate(lr)))``,
    never ``optax.chain(with_fire(...), optax.scale_by_learning_rate(lr))``;
    :func:`check` refuses the second. Inside ``optax.masked`` or
    ``optax.multi_transform``, FIRE projects the leaves ``with_fire`` is given.

    ``trainable``: as :func:`fire_core.flax.apply`'s. Left out, the leaves
    ``tx`` never moves with a gradient (``optax.set_to_zero``'s, read from the
    traced update) are frozen: left alone and logged with the reason.
    ``trainable=True`` projects every selected kernel.
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
    inner = optax.with_extra_args_support(tx)

    def init(params):
        inner_state = inner.init(params)
        try:  # tx.update traced on the parameters as gradients, to read which leaves it freezes
            traced = _trace(inner, params, inner_state, params, {})
        except Exception as e:  # e.g. a line search, whose update needs extra arguments: read at each update
            traced, why = None, f"{type(e).__name__}: {e}"
        _, _, chosen, skipped = _flax_select.plan(params, **_selected(selection, params, traced))  # errors raise here
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(params)):
            _log_selection(chosen, skipped, params)
            if traced is None and selection["trainable"] is None:
                log.info("with_fire: which leaves tx freezes is read at each update (tracing tx.update at init "
                         "without its extra arguments failed: %s)", why)
        return FireState(jnp.zeros((), jnp.int32), inner_state, traced_init(plan))

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "with_fire: update(grads, state) was called without params; FIRE projects the parameters, "
                "so call update(grads, state, params)"
            )
        if not isinstance(state, FireState):
            raise TypeError(f"with_fire: expected the FireState its init made, got {type(state).__name__}")
        traced = _trace(inner, updates, state.inner_state, params, extra_args)
        chosen_by = _selected(selection, params, traced)
        chosen = _flax_select.plan(params, **chosen_by)[2]

        def measure():  # per-layer DfI relative to FIRE's target, of the leaves FIRE would project
            return jnp.concatenate([jnp.ravel(target_dfi(leaf.array, leaf.layout)) for leaf in chosen])

        fire, progress = traced_poll(plan, state.progress, state.count, measure)

        # the arrays enter both branches as operands, so they are traced there even in an eager call
        operands = (updates, state.inner_state, params, extra_args)

        def ordinary(updates, inner_state, params, extra_args):
            return inner.update(updates, inner_state, params, **extra_args)

        like = traced[1][0]  # the shapes and dtypes of tx's updates

        def firing(updates, inner_state, params, extra_args):
            new = flax_apply(params, steps=steps, method=method, scale=scale, **chosen_by)
            inner_state = reset_opt_state(inner_state, params, new, tx=tx)
            jax.debug.callback(_log_firing, state.count, progress["fired_by"] - state.progress["fired_by"],
                               reasons=[repr(t) for t in plan.triggers])
            return _landing(_flax_select.plan(params, **chosen_by), new, like), inner_state

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


def _log_selection(chosen, skipped, params) -> None:
    log.info("with_fire: %d weights are projected at each firing: %s", len(chosen),
             ", ".join(f"{leaf.path} ({leaf.layout})" for leaf in chosen))
    for name, shape, reason in skipped:
        log.info("with_fire: left alone: %s %s: %s", name, tuple(shape), reason)
    masked = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    for path, leaf in masked:
        if isinstance(leaf, optax.MaskedNode):
            log.info("with_fire: left alone: %s: masked out (optax.masked or multi_transform gives it to another "
                     "transformation, which FIRE does not touch)", "/".join(_flax_select._key_name(k) for k in path))


# --- the leaves tx freezes -------------------------------------------------------------------------------

_FROZEN = ("frozen: tx's update of it ignores the gradient (optax.set_to_zero, say), so it cannot re-learn; "
           "trainable=True projects it")


def _trace(inner, updates, inner_state, params, extra_args):
    """``inner.update`` traced on these arguments: ``(ClosedJaxpr, output shapes, inputs per part)``.

    The jaxpr's inputs are the leaves of the gradients, the state, the parameters and the extra
    arguments that are arrays, in that order; other extra arguments (a line search's ``value_fn``)
    are closed over.
    """
    extra, extra_def = jax.tree_util.tree_flatten(extra_args)
    arrays = [k for k, x in enumerate(extra) if hasattr(x, "shape") and hasattr(x, "dtype")]

    def run(updates, inner_state, params, extra_arrays):
        given = list(extra)
        for k, x in zip(arrays, extra_arrays):
            given[k] = x
        return inner.update(updates, inner_state, params, **jax.tree_util.tree_unflatten(extra_def, given))

    parts = (updates, inner_state, params, [extra[k] for k in arrays])
    closed, shapes = jax.make_jaxpr(run, return_shape=True)(*parts)
    return closed, shapes, [len(jax.tree_util.tree_leaves(part)) for part in parts]


def _selected(selection, params, traced) -> dict:
    """The selection, with the leaves tx freezes marked untrained when ``trainable=`` is not given."""
    if selection["trainable"] is not None or traced is None:
        return selection
    frozen = _gradient_free(*traced)
    pairs, _ = _flax_select.flatten(params)
    if len(frozen) != len(pairs):  # updates of another structure than params: _landing names the problem
        return selection
    return dict(selection, trainable=_flax_select.Trained([not f for f in frozen], _FROZEN))


def _gradient_free(closed, shapes, sizes) -> list[bool]:
    """Per leaf of tx's updates: True where no gradient reaches it (``optax.set_to_zero``'s leaves).

    Read from the traced update, not from its values: a leaf is gradient-free when its update
    depends on no gradient (nor array extra argument), neither directly nor through a part of the
    state a gradient flows into (a momentum, an accumulated gradient), followed to a fixpoint since
    such parts carry gradients into later updates. A learning-rate schedule's count carries none,
    so ``set_to_zero`` followed by a schedule is still gradient-free. An operation whose body is not
    looked into (``lax.cond``, ``scan``) counts every input for every output, so a leaf frozen
    there reads as trained (and is projected), never the other way round.
    """
    n_g, n_s, n_p, n_e = sizes
    bits = [1 << k for k in range(n_g + n_s + n_p + n_e)]
    out = _sources(closed.jaxpr, bits)
    n_u = len(jax.tree_util.tree_leaves(shapes[0]))
    update_src, state_src = out[:n_u], out[n_u:]
    gradient = (1 << n_g) - 1 | ((1 << n_e) - 1) << (n_g + n_s + n_p)
    if len(state_src) != n_s:  # a state of another structure: every part may carry a gradient
        gradient |= ((1 << n_s) - 1) << n_g
    while True:
        carried = gradient
        for j, src in enumerate(state_src[:n_s]):
            if src & gradient:
                carried |= 1 << (n_g + j)
        if carried == gradient:
            break
        gradient = carried
    return [not src & gradient for src in update_src]


def _sources(jaxpr, inputs: list[int]) -> list[int]:
    """For each output of ``jaxpr``, the inputs it depends on, as a bitmask (``inputs``: one per input)."""
    src = dict(zip(jaxpr.invars, inputs))

    def read(v):
        return 0 if isinstance(v, jax.extend.core.Literal) else src.get(v, 0)

    for eqn in jaxpr.eqns:
        given = [read(v) for v in eqn.invars]
        body = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr") if k in eqn.params), None)
        body = getattr(body, "jaxpr", body)  # a ClosedJaxpr's Jaxpr
        if (eqn.primitive.name in ("pjit", "jit", "closed_call", "remat", "checkpoint", "custom_jvp_call")
                and body is not None and len(body.invars) == len(given) and len(body.outvars) == len(eqn.outvars)):
            found = _sources(body, given)
        else:
            every = 0
            for g in given:
                every |= g
            found = [every] * len(eqn.outvars)
        src.update(zip(eqn.outvars, found))
    return [read(v) for v in jaxpr.outvars]


# --- with_fire wraps the whole optimizer ----------------------------------------------------------------

# wrappers that return their inner transformation's updates unchanged whenever it runs
_PASS_ON = tuple(
    cls for modules, name in [
        (("optax",), "MaskedState"), (("optax.transforms", "optax"), "PartitionState"),
        (("optax",), "MultiStepsState"), (("optax",), "ApplyIfFiniteState"),
        (("optax",), "InjectHyperparamsState"), (("optax",), "InjectStatefulHyperparamsState"),
        (("optax",), "ConditionallyMaskState"), (("optax",), "ConditionallyTransformState"),
    ] if (cls := _optax_state._resolve(modules, name)) is not None
)
_PARTITION = _optax_state._resolve(("optax.transforms", "optax"), "PartitionState")


def check(tx, params) -> None:
    """Refuse ``tx`` when a ``with_fire`` in it would not land the weights on FIRE's; returns None.

    At a firing, ``with_fire`` returns the step that takes the parameters to FIRE's
    weights, and that step lands there only if it reaches ``optax.apply_updates``
    as it is. A transformation after ``with_fire`` in an ``optax.chain`` (a
    learning rate, weight decay) changes it, and no transformation can see what
    follows it in a chain, so ``with_fire`` must wrap the whole optimizer:
    ``with_fire(optax.chain(...))``. This reads where each ``with_fire`` sits in
    ``tx`` from ``tx.init(params)`` (traced abstractly: nothing is computed) and
    raises a ValueError when one is followed by more of a chain, sits inside a
    wrapper fire_core does not know to pass its updates on unchanged, or there is
    none. Inside ``optax.masked``, ``multi_transform``, ``MultiSteps``,
    ``apply_if_finite``, ``inject_hyperparams`` and as the last element of a
    chain it is accepted. Call it once, before training.
    """
    state = jax.eval_shape(tx.init, params)
    pairs = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, FireState))[0]
    found = [path for path, leaf in pairs if isinstance(leaf, FireState)]
    if not found:
        raise ValueError("fire_core.optax.check: tx holds no with_fire (no FireState in tx.init(params))")
    for path in found:
        node, parent, where = state, None, "tx"
        for key in path:
            where_next = where + jax.tree_util.keystr((key,))
            partitions = _PARTITION is not None and isinstance(parent, _PARTITION)  # multi_transform's groups
            if type(node) is tuple or (isinstance(node, dict) and not partitions):
                keys = list(range(len(node))) if type(node) is tuple else list(node)
                pos = keys.index(key.idx if type(node) is tuple else key.key)
                if pos != len(keys) - 1:
                    raise ValueError(
                        f"fire_core.optax.check: with_fire is element {pos + 1} of an optax.chain (or named_chain) "
                        f"of {len(keys)} (at {where}); the {len(keys) - 1 - pos} transformation(s) after it change the "
                        "step that lands the weights on FIRE's (a learning rate scales it), so they would not land "
                        "there. with_fire wraps the whole optimizer: with_fire(optax.chain(...))"
                    )
            elif not (isinstance(node, dict) or isinstance(node, _PASS_ON)):
                raise ValueError(
                    f"fire_core.optax.check: with_fire sits inside a {type(node).__name__} (at {where}), the state of "
                    "a transformation fire_core does not know to return its inner updates unchanged; if it changes "
                    "them, the weights do not land on FIRE's. Wrap the whole optimizer: with_fire(...)"
                )
            parent, node, where = node, _child(node, key), where_next
    return None


def _child(node, key):
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    return getattr(node, key.name)


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
        saved = saved_spec(progress)
        if saved is not None and saved != as_schedule(schedule).spec():
            raise ValueError(f"fired: the state was made by the schedule {saved}, not by the one given "
                             f"{as_schedule(schedule).spec()}")
        kinds = [isinstance(t, DfIAbove) for t in as_schedule(schedule).triggers]
        if [names[k] in dfi for k in range(n)] != kinds:
            raise ValueError("fired: the schedule given is not the one the state was made with")
    return {"updates": int(fs.count), "last_fired": None if last < 0 else last,
            "fired_by": dict(zip(names, counts)), "dfi": dfi}
