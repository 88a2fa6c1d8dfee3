"""FIRE for Flax and JAX: linen params, whole variables dicts, nnx State and modules.

:func:`apply` is a pure function of a parameter tree: it returns a new tree of
the same structure and dtypes, works eagerly and under ``jax.jit``, and keeps
sharded leaves sharded (the core's batched matmuls are traced into one XLA
program, so XLA's sharded matmul does the work; nothing projects local
shards). :func:`report` measures a before/after pair of trees,
:func:`reset_opt_state` restarts the optimizer state of the projected leaves
(as a fresh ``tx.init`` would give them), and :func:`update` does all of it
in place on an nnx Module.

Which leaves, and in which layout
---------------------------------
A leaf is a candidate when its last path entry is ``kernel`` (Flax's name for
Dense, DenseGeneral, Conv, Einsum and attention weights) and it has two or
more axes; ``embedding``, ``scale``, ``bias`` and batch statistics never are.
A kernel of two axes is a Dense ``(in, out)``: ``"io"``. One of three or more
axes is ambiguous by shape (a 1-D conv, a Dense scanned over layers and an
ensemble are all ``(a, in, out)``), so its layout is taken from what says
what it is, and a kernel nothing settles is a ValueError naming it (nothing
is guessed, nothing written):

* ``layouts={pattern: layout}`` (first match wins; ``None`` leaves it alone;
  uppercase letters are stacked layers, each projected and scaled on its
  own: ``"Lio"`` for a scanned Dense) and ``stacked={pattern: n}`` (the first
  ``n`` axes of each kernel under the pattern are stacked layers; the rest
  is read as below). A pattern matching a leaf's full path applies to that
  leaf (any name); one matching a module path (``"proj"``,
  ``"blocks/*/mlp"``) to its ``kernel``;
* ``model=``: the nnx Module, or ``(linen_module, *example_inputs)`` (traced
  once, abstractly): each kernel's module type (Dense/Linear ``"io"``,
  DenseGeneral/LinearGeneral by their axes, Conv/ConvTranspose per tap,
  Einsum by its equation, ConvLocal left alone) and the axes
  ``nn.scan``/``nn.vmap``/``nnx.vmap``/``nnx.scan`` stacked;
* partition names recorded with the weight (``nn.Partitioned``, an nnx
  Variable's ``out_sharding``): an axis named one of :data:`STACK_NAMES`
  (``"layers"``, ``"ensemble"``, ...) is a stack axis;
* Flax's own names (:mod:`fire_core.conventions`' ``"flax"`` rules, shared
  with the ``fire-core`` command): attention q/k/v ``"ioo"`` and out
  ``"iio"`` under a module with all four, linen's auto-names ``Conv_N`` /
  ``ConvTranspose_N`` (taps, then ``"io"``) and ``DenseGeneral_N`` (its bias
  tells the output axes), outside an ``nn.scan``/``nn.vmap`` module.

``trainable=`` says which leaves are trained (a pytree of bools like an
optax mask, a function ``params -> mask``, an nnx filter or an
``nnx.Optimizer``); the others are frozen and left alone.
:func:`report`'s ``Report.skipped`` lists every floating parameter of two or
more axes that was not projected, with the reason.

Paths are the tree's keys joined by ``/`` (``Dense_0/kernel``,
``encoder/layers/0/attn/query/kernel``); for a whole variables dict they are
relative to its ``params`` collection, and nnx's ``Variable`` wrapper adds no
entry. ``include``/``exclude`` take glob patterns, matched against the full
path and each of its prefixes (so ``Dense_1`` selects that module's kernel),
or a callable ``(path, array) -> bool`` (as the torch adapter's). A pattern
(include, exclude, ``layouts``, ``stacked``) that matches no kernel is a
ValueError naming the closest paths, and so is a call that selects nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..core._array import check_finite, is_tracing
from . import _select
from ._select import STACK_NAMES, _key_name
from ._select import is_variables_dict as _is_variables_dict
from ._optax_state import reset
from ..core.metrics import drift
from ..core import plan as _plan
from ..core.plan import host_checked, measure, reinit_many

__all__ = ["apply", "report", "reset_opt_state", "update", "select", "refresh_batch_stats", "STACK_NAMES"]


def select(params, *, include=None, exclude=None, layouts=None, stacked=None, model=None, trainable=None):
    """The leaves :func:`apply` would project, as ``{path: layout}``, in tree order.

    Takes :func:`apply`'s selection arguments and raises its selection errors.
    """
    _, _, chosen, _ = _select.plan(params, **_selection(include, exclude, layouts, stacked, model, trainable))
    return {leaf.path: leaf.layout for leaf in chosen}


def _selection(include, exclude, layouts, stacked, model, trainable) -> dict:
    return dict(include=include, exclude=exclude, layouts=layouts, stacked=stacked, model=model, trainable=trainable)


def apply(
    params, steps: int = 5, *, include=None, exclude=None, layouts=None, stacked=None, model=None, trainable=None,
    method: str = "fire", scale="fire",
):
    """FIRE on every selected kernel of a Flax parameter tree; returns a new tree.

    ``params`` is a linen ``params`` tree (dict or ``FrozenDict``), a whole
    variables dict (only its ``params`` collection is touched), or an nnx
    ``State`` (only ``nnx.Param`` variables are touched)::

        params = fire_core.flax.apply(params, steps=10)
        nnx.update(model, fire_core.flax.apply(nnx.state(model, nnx.Param)))

    Pure: the input is not modified, the output has the same structure, dtypes
    and (under ``jax.jit``) shardings, and unselected leaves are the input's
    own. ``method``, ``steps`` and ``scale`` are those of
    :func:`fire_core.reinit`. Eagerly, a NaN or Inf weight is a ValueError
    naming its path, raised before any work; under tracing that check is
    skipped. See the module docstring for which leaves are selected and what
    ``layouts``, ``stacked``, ``model`` and ``trainable`` say.

    A stacked tree (an ensemble's parameters with a leading member axis) may
    also be mapped member by member: ``jax.vmap(fire_core.flax.apply)(tree)``
    sees each member's own kernels.
    """
    pairs, treedef, chosen, _ = _select.plan(params, **_selection(include, exclude, layouts, stacked, model, trainable))
    leaves = [leaf for _, leaf in pairs]
    # Sharded leaves come back in their own shardings. With Explicit mesh axes (shardings in the
    # types, the default of jax.make_mesh) the core's sharded matmuls would need an output sharding
    # it cannot name, so those leaves run in auto mode; concrete leaves sharded over an Auto mesh
    # run in one jit with their shardings as output shardings. Either way XLA partitions the
    # whole-matrix products (Gram matrices are all-reduced), or, for at least one same-shaped leaf
    # per device, each device projects whole leaves of a stack (_project_stacked): nothing is
    # projected per shard.
    groups: dict[object, list] = {None: []}
    for leaf in chosen:
        key = _sharding_group(leaf.array)
        groups.setdefault(key, []).append((leaf.path, leaf.array, leaf.layout))
        if key is not None:  # these are projected while traced: check their values here, first
            check_finite(leaf.array, jnp, leaf.path)
    new = {}
    for group_key, group in groups.items():
        if group_key is None:
            _project(group, new, steps, method, scale)
            continue
        names = [name for name, _, _ in group]

        def run(arrays, group=group, names=names, mesh=group_key[1]):
            out = {}
            _project_stacked([(n, a, lay) for (n, _, lay), a in zip(group, arrays)], out, steps, method, scale, mesh)
            return [out[n] for n in names]

        arrays = [array for _, array, _ in group]
        if group_key[0] == "explicit":
            shardings = [jax.typeof(a).sharding for a in arrays]
            results = jax.jit(jax.sharding.auto_axes(run, out_sharding=shardings))(arrays)
        else:
            results = jax.jit(run, out_shardings=[a.sharding for a in arrays])(arrays)
        new.update(zip(names, results))
    out = list(leaves)
    for leaf in chosen:
        out[leaf.index] = _select.rewrap(leaves[leaf.index], new[leaf.path])
    return jax.tree_util.tree_unflatten(treedef, out)


def report(
    before, after, *, include=None, exclude=None, layouts=None, stacked=None, model=None, trainable=None,
    scale="fire", method=None, steps=None, probe=None,
):
    """A :class:`fire_core.Report` of what :func:`apply` did, from the trees before and after.

    Pass the same selection arguments (``include``, ``exclude``, ``layouts``,
    ``stacked``, ``model``, ``trainable``) and ``scale`` as to :func:`apply`;
    ``method`` and ``steps`` only label the report. ``Report.skipped`` names
    every floating parameter of two or more axes left alone, with the reason
    (an embedding, a bias, excluded, frozen, empty, ...). Rows as
    the torch adapter's (name, shape, layout, taps, n, scale, sfe,
    dfi_before, dfi_after), with ``dfi_after`` the DfI of the new weight
    divided by the factor ``scale`` applied (see :func:`fire_core.plan.measure`
    for ``scale="norm"``). Needs concrete arrays: call it outside ``jax.jit``.

    ``probe=(fn, *args)``: ``fn(before, *args)`` and ``fn(after, *args)``
    are run and the relative change of their outputs (all leaves of the
    output tree together), ``||f_after - f_before||_F / ||f_before||_F``,
    is ``Report.drift``. ``fn`` takes the trees as given here::

        new = fire_core.flax.apply(variables)
        rep = fire_core.flax.report(variables, new, probe=(functools.partial(model.apply, train=False), x))

    Per layer, as the torch adapter's rows: let ``fn`` return linen's
    ``(outputs, state)`` with the modules' outputs captured, and each row
    gets the ``drift`` of the output of the module owning its weight (None
    for a module whose output was not captured)::

        fn = functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"])
        rep = fire_core.flax.report(variables, new, probe=(fn, x))

    A variables dict (or nnx State) that carries BatchNorm statistics
    (``batch_stats``, ``nnx.BatchStat``) gets a note naming them: they were
    measured with the old weights (see ``docs/stability.md`` to refresh them).
    """
    _, treedef_b, chosen, skipped = _select.plan(
        before, **_selection(include, exclude, layouts, stacked, model, trainable)
    )
    pairs_a, treedef_a = _select.flatten(after)
    leaves_a = [leaf for _, leaf in pairs_a]
    if treedef_a != treedef_b:
        raise ValueError(f"before and after are different trees:\n{treedef_b}\nvs\n{treedef_a}")
    if probe is not None and (not isinstance(probe, tuple) or not probe or not callable(probe[0])):
        raise TypeError(f"probe must be a tuple (fn, *args) with fn(tree, *args) -> outputs, got {type(probe).__name__}")
    pairs = (  # a generator: at most one gathered weight at a time
        (leaf.path, _gathered(leaf.array), _gathered(_select.value(leaves_a[leaf.index])), leaf.layout)
        for leaf in chosen
    )
    rep = measure(pairs, scale=scale, method=method, steps=steps, stages=(_measure_arrays, _measure_dfi))
    for name, shape, reason in skipped:
        rep.skip(name, shape, reason)
    if probe is not None:
        fn, *args = probe
        out_before, out_after = fn(before, *args), fn(after, *args)
        captured = _captured(out_before), _captured(out_after)
        if captured[0] is not None and captured[1] is not None:
            (out_before, _), (out_after, _) = out_before, out_after
            for row in rep.rows:
                row["drift"] = _module_drift(row["name"], *captured)
        rep.drift = _drift(out_before, out_after)
    stats = _batch_stat_modules(before)
    if stats and rep.rows:
        rep.notes.append(_stale_stats_note(stats))
    return rep


def refresh_batch_stats(model, variables, batches, *, momentum: float = 0.99, **apply_kwargs):
    """A linen variables dict with its ``batch_stats`` re-estimated on ``batches``; returns a new dict.

    After FIRE the BatchNorm running statistics describe the old weights'
    activations. This is the Flax counterpart of torch's
    ``torch.optim.swa_utils.update_bn``: each BatchNorm's running mean and
    variance become the average, over ``batches``, of each batch's own mean
    and variance, measured in train mode with the new weights::

        new = fire_core.flax.apply(variables)
        new = fire_core.flax.refresh_batch_stats(model, new, batches, train=True)

    ``batches``: inputs (an array, or a tuple of positional inputs, each);
    ``apply_kwargs`` go to ``model.apply`` and must put the BatchNorm layers
    in train mode (``train=True``, or whatever the model's flag is).
    ``momentum`` must be the BatchNorm layers' ``momentum`` (Flax's default
    0.99): each batch is run from zero statistics, after which a train-mode
    pass holds ``(1 - momentum)`` times that batch's statistics, so no layer
    keeps any of the stale ones (plain extra passes would need about
    ``1 / (1 - momentum)`` batches to wash them out).
    """
    if not _is_variables_dict(variables) or "batch_stats" not in variables:
        raise ValueError("refresh_batch_stats expects a variables dict with 'params' and 'batch_stats' collections")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["batch_stats"])
    total, count = zeros, 0
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        _, updates = model.apply({**variables, "batch_stats": zeros}, *args, mutable=["batch_stats"], **apply_kwargs)
        total = jax.tree_util.tree_map(jnp.add, total, updates["batch_stats"])
        count += 1
    if count == 0:
        raise ValueError("refresh_batch_stats: batches is empty")
    factor = 1.0 / (count * (1.0 - momentum))
    return {**variables, "batch_stats": jax.tree_util.tree_map(lambda t: t * factor, total)}


def _drift(out_before, out_after) -> float:
    """Relative change of two output trees (all leaves together), by the core's measure."""
    b, a = jax.tree_util.tree_leaves(_values(out_before)), jax.tree_util.tree_leaves(_values(out_after))
    if len(b) != len(a):
        raise ValueError(f"probe: the outputs before and after are different trees ({len(b)} vs {len(a)} leaves)")
    return drift([_gathered(x) for x in b], [_gathered(x) for x in a])


def _captured(out):
    """The ``intermediates`` of linen's ``(outputs, state)`` return, or None if ``out`` is not one."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping) and "intermediates" in out[1]:
        return out[1]["intermediates"]
    return None


def _module_drift(name: str, before, after) -> float | None:
    """Drift of the captured ``__call__`` output of the module owning the weight ``name`` (``"a/b/kernel"``)."""
    for key in name.split("/")[:-1]:
        if not isinstance(before, Mapping) or key not in before or key not in after:
            return None
        before, after = before[key], after[key]
    if not isinstance(before, Mapping) or "__call__" not in before:
        return None
    return _drift(before["__call__"], after["__call__"])


def _batch_stat_modules(tree) -> list[str]:
    """Modules holding BatchNorm running statistics in ``tree`` (a variables dict's ``batch_stats``, nnx BatchStat)."""
    if isinstance(tree, Mapping) and not isinstance(tree, nnx.State) and "batch_stats" in tree:
        pairs = jax.tree_util.tree_flatten_with_path(tree["batch_stats"], is_leaf=_is_variable)[0]
        names = [tuple(_key_name(k) for k in path) for path, _ in pairs]
    elif isinstance(tree, nnx.State):
        pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]
        names = [tuple(_key_name(k) for k in path) for path, leaf in pairs if isinstance(leaf, nnx.BatchStat)]
    else:
        return []
    return list(dict.fromkeys("/".join(n[:-1]) or n[0] for n in names if n))


def _stale_stats_note(modules: list[str]) -> str:
    shown = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
    return (
        f"note: BatchNorm running statistics ({shown}) were measured with the old weights and no longer match; "
        "re-estimate them with train-mode passes over data before evaluating with running averages "
        "(docs/stability.md)"
    )


def reset_opt_state(opt_state, before, after, *, reset_count: bool = True, tx=None):
    """The optimizer state with the parts of the leaves FIRE changed restarted; returns a new state.

    ``before`` and ``after`` are the parameters passed to and returned by
    :func:`apply` (the ``params`` collection is taken from a variables dict).
    Every per-parameter part of ``opt_state`` (Adam's ``mu`` and ``nu``,
    momentum traces, adafactor's factored row and column statistics, the
    accumulated gradients of ``optax.MultiSteps``, ...) is mapped to its
    parameter leaf, through ``chain``, ``masked``, ``multi_transform``,
    ``MultiSteps``, ``inject_hyperparams`` and the other optax wrappers; the
    parts of the leaves whose values differ between ``before`` and ``after``
    restart at their initial values, the rest are kept as they are. A
    per-parameter array that cannot be mapped with confidence (a state type
    fire_core does not know with arrays of other shapes) is a ValueError
    naming the state type and its path; no state is returned with a moment
    left stale. Works under ``jax.jit`` (the choice becomes ``jnp.where``) and
    on an nnx Optimizer's state (its Variables are returned as Variables).

    ``tx``: the optimizer that made ``opt_state``. With it, the parts restart
    at ``tx.init(after)``'s values, which is exact for every optimizer; it is
    needed for states that start at a hyperparameter (adagrad's
    ``initial_accumulator_value``, rmsprop's ``initial_scale``, rprop's step
    sizes; ``optax.yogi``, whose moments start at 1e-6, is told apart from
    Adam only by it), for L-BFGS and line searches (one history of all leaves
    together, restarted whole) and for state types fire_core does not know.
    Without it, the moments of the known types restart at zero.

    Step counts (see ``docs/flax.md`` for each kind): a count that normalizes
    the reset statistics (Adam's and Muon's bias correction, adafactor's decay,
    ``MultiSteps``' position in its accumulation window) restarts at 0 when a
    leaf it covers changed. Adam-like optimizers keep one ``count`` for the
    whole tree and divide by ``1 - beta**count``: zeroed moments with an old
    count ``t`` make the next update of those leaves ``(1 - b1) / (1 - b1**t)
    / sqrt((1 - b2) / (1 - b2**t))`` times a fresh Adam's: 0.98 at ``t =
    100``, 2.5 at 1000, up to ``sqrt(1 - b2) / (1 - b1)`` = 3.2 (defaults 0.9,
    0.999). With ``reset_count`` (the default) the reset leaves restart exactly
    like a fresh Adam; the cost is that leaves FIRE did not touch (biases,
    norms, embeddings) take smaller steps (0.40x at ``t = 1000``, 0.32x for
    long runs) until the correction wears off, over about ``1 / (1 - b2)`` =
    1000 steps. Measured in ``benchmarks/flax_apply.py``. Learning-rate
    schedule counts (``inject_hyperparams``, ``scale_by_schedule``) are kept.
    ``reset_count=False`` keeps every count.
    """
    before, after = _values(_params_only(before)), _values(_params_only(after))
    leaves, treedef = jax.tree_util.tree_flatten(opt_state, is_leaf=_is_variable)
    values = jax.tree_util.tree_unflatten(treedef, [_value(x) for x in leaves])
    new = treedef.flatten_up_to(reset(values, before, after, reset_count=reset_count, tx=tx))
    return jax.tree_util.tree_unflatten(treedef, [_rewrap(old, v) for old, v in zip(leaves, new)])


def _rewrap(old, value):
    """``value`` in the place of ``old``: an nnx Variable stays a Variable, an untouched leaf is ``old`` itself."""
    if value is _value(old):
        return old
    return old.replace(value) if isinstance(old, nnx.Variable) else value


def update(
    model,
    steps: int = 5,
    *,
    include=None,
    exclude=None,
    layouts=None,
    stacked=None,
    trainable=None,
    method: str = "fire",
    scale="fire",
    probe=None,
    optimizer=None,
    reset_count: bool = True,
):
    """FIRE on an nnx Module in place (its ``nnx.Param`` kernels); returns the :class:`fire_core.Report`.

    Shorthand for ``new = apply(nnx.state(model, nnx.Param), model=model,
    ...)``, ``nnx.update(model, new)`` and :func:`report`: the module types
    and stacked axes are read from ``model`` itself. A failure leaves the
    model as it was. Eager only (the report reads values).

    ``trainable``: as for :func:`apply` (an nnx filter, say). By default the
    leaves ``optimizer`` trains (its ``wrt`` filter) when an optimizer is
    given, so Params it does not train (a LoRA base) are left alone and
    listed as frozen; ``trainable=nnx.Param`` projects them too.

    ``probe``: an input (or a tuple of positional inputs) the model is called
    on before and after, in its current mode, on a copy of its state (a
    BatchNorm in train mode or a dropout RNG stream of ``model`` is not
    advanced); ``Report.drift`` is the relative change of the outputs. A
    model with ``nnx.BatchStat`` variables gets a note naming them.

    ``optimizer``: an ``nnx.Optimizer`` of ``model``. Its state is restarted
    in place for the projected leaves, as :func:`reset_opt_state` with its
    ``tx`` (so exactly at ``tx.init``'s values, whatever the optimizer) and
    ``reset_count``; every check runs before anything is written, so a
    failure leaves the model and the optimizer as they were. ``optimizer.step``
    (its count of updates, read by no optax transformation) is kept.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"update expects an nnx.Module, got {type(model).__name__}; use apply() for parameter trees")
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"optimizer must be an nnx.Optimizer of the model, got {type(optimizer).__name__}; "
            "for an optax state use reset_opt_state(opt_state, before, after, tx=tx)"
        )
    before = nnx.state(model, nnx.Param)
    if trainable is None and optimizer is not None:
        trainable = optimizer.wrt
    kw = _selection(include, exclude, layouts, stacked, model, trainable)
    after = apply(before, steps, method=method, scale=scale, **kw)
    rep = report(before, after, scale=scale, method=method, steps=steps, **kw)
    if probe is not None:
        args = probe if isinstance(probe, tuple) else (probe,)
        def run(p):  # on a copy (arrays shared, Variables new): calling it mutates nothing of `model`
            twin = nnx.clone(model)
            nnx.update(twin, p)
            return twin(*args)

        rep.drift = _drift(run(before), run(after))
    stats = _batch_stat_modules(nnx.state(model, nnx.BatchStat))
    if stats and rep.rows:
        rep.notes.append(_stale_stats_note(stats))
    writes = _optimizer_writes(optimizer, model, after, reset_count) if optimizer is not None else []
    nnx.update(model, after)
    for variable, value in writes:
        variable.set_value(value)
    return rep


def _optimizer_writes(optimizer, model, after, reset_count):
    """The (Variable, new value) pairs that restart ``optimizer``'s state for the leaves FIRE changed.

    The optimizer's state is shaped like ``nnx.state(model, optimizer.wrt)``, which may hold fewer
    leaves than the Params (or other ones): the parameters after FIRE are read from a copy of the
    model with ``after`` written into it, under the same filter.
    """
    twin = nnx.clone(model)  # arrays shared, Variables new: `model` is not written here
    nnx.update(twin, after)
    before_w = _values(nnx.state(model, optimizer.wrt))
    after_w = _values(nnx.state(twin, optimizer.wrt))
    leaves, treedef = jax.tree_util.tree_flatten(optimizer.opt_state, is_leaf=_is_variable)
    values = jax.tree_util.tree_unflatten(treedef, [_value(x) for x in leaves])
    new = treedef.flatten_up_to(reset(values, before_w, after_w, reset_count=reset_count, tx=optimizer.tx))
    writes = []
    for old, value in zip(leaves, new):
        if value is _value(old):
            continue
        if not isinstance(old, nnx.Variable):
            raise TypeError(f"update: the optimizer state holds a bare {type(old).__name__}, not an nnx Variable; "
                            "it cannot be written in place")
        writes.append((old, value))
    return writes


# --- mapping the tree onto (name, array, layout) -------------------------------------------------


def _project(items, out: dict, steps, method, scale) -> None:
    """Project ``(name, array, layout)`` items into ``out``.

    Concrete JAX arrays are checked here (each problem a named error) and then
    projected by one compiled program per tree structure: eager dispatch
    would compile every operation for every new shape on the first call
    (seconds for a small MLP, measured in ``benchmarks/flax_apply.py``), one
    ``jax.jit`` compiles the whole projection once. Weights whose new values
    must be checked on the host before they are returned (extreme magnitudes,
    ``plan.host_checked``), tracers and other arrays take the core's own path.
    """
    arrays = [array for _, array, _ in items]
    if items and all(isinstance(a, jax.Array) and not is_tracing(a) for a in arrays) and not host_checked(
        items, steps=steps, method=method, scale=scale
    ):
        layouts = tuple(layout for _, _, layout in items)
        out.update(zip((name for name, _, _ in items), _compiled_project(arrays, layouts, steps, method, scale)))
        return
    reinit_many(items, steps=steps, method=method, scale=scale, write=out.__setitem__, report=False)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _compiled_project(arrays, layouts, steps, method, scale):
    out: dict = {}
    items = [(str(k), array, layout) for k, (array, layout) in enumerate(zip(arrays, layouts))]
    reinit_many(items, steps=steps, method=method, scale=scale, write=out.__setitem__, report=False)
    return [out[str(k)] for k in range(len(arrays))]


def _project_stacked(items, out: dict, steps, method, scale, mesh) -> None:
    """Sharded leaves, traced: same-shaped ones stacked on a new axis sharded over all of ``mesh``'s devices.

    Each device then projects whole matrices of its part of the stack: the
    weights move once each way (all-to-all) instead of every Gram product of
    every step being all-reduced (measured in ``benchmarks/distributed.py``).
    Only groups with at least one leaf per device are stacked (fewer would
    leave devices idle); the rest go to XLA's sharded matmuls as they are.
    The stack is one more stack axis of the layout, so each leaf is scaled
    as its own layer (``scale="norm"`` included).
    """
    devices = getattr(mesh, "size", 1)
    if devices < 2 or not hasattr(mesh, "axis_names"):
        return _project(items, out, steps, method, scale)
    groups: dict[tuple, list] = {}
    for name, array, layout in items:
        groups.setdefault((tuple(array.shape), str(array.dtype), layout), []).append((name, array))
    rest = []
    for (shape, _, layout), members in groups.items():
        if len(members) < devices:
            rest += [(name, array, layout) for name, array in members]
            continue
        stack = jnp.stack([array for _, array in members])
        spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
        if isinstance(mesh, jax.sharding.Mesh):  # a concrete mesh (Auto axes); Explicit ones are the context's
            spec = jax.sharding.NamedSharding(mesh, spec)
        stack = jax.lax.with_sharding_constraint(stack, spec)
        letter = next(c for c in "ZYXWVUTSRQPNMLKJHGFEDCBA" if c not in layout)  # the leaves as stacked layers
        new = {}
        _project([("stack", stack, letter + layout)], new, steps, method, scale)
        # the result pinned to the stack's sharding too: else XLA propagates the leaves' own
        # shardings back into the iteration and all-gathers there (measured: 4x slower)
        result = jax.lax.with_sharding_constraint(new["stack"], spec)
        for k, (name, _) in enumerate(members):
            out[name] = result[k]
    _project(rest, out, steps, method, scale)


def _sharding_group(x):
    """How a leaf keeps its sharding: ("explicit", mesh), ("concrete", mesh) or None (nothing to keep)."""
    try:
        mesh = jax.typeof(x).sharding.mesh
    except Exception:
        mesh = None
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    if mesh is not None and explicit is not None and explicit in getattr(mesh, "axis_types", ()):
        return ("explicit", mesh)
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and len(x.sharding.device_set) > 1:
        return ("concrete", getattr(x.sharding, "mesh", None) or tuple(sorted(d.id for d in x.sharding.device_set)))
    return None


# plan.measure's two device steps compiled once per shape (eager dispatch compiles each of their
# dozens of operations for every new shape); host arrays (gathered sharded weights) stay on NumPy.
_measure_arrays_jit = jax.jit(_plan._measure_arrays, static_argnums=(2, 3))
_measure_dfi_jit = jax.jit(_plan._measure_dfi)


def _measure_arrays(before, after, layout, work):
    if isinstance(before, jax.Array) and isinstance(after, jax.Array):
        return _measure_arrays_jit(before, after, layout, work)
    return _plan._measure_arrays(before, after, layout, work)


def _measure_dfi(*arrays):
    if all(isinstance(a, jax.Array) for a in arrays):
        return _measure_dfi_jit(*arrays)
    return _plan._measure_dfi(*arrays)


def _gathered(x):
    """A sharded ``x`` gathered whole to the host (measuring needs whole matrices), else ``x``."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and len(x.sharding.device_set) > 1:
        wide = x.dtype in (jnp.float32, jnp.float64)
        return np.asarray(x) if wide else np.asarray(x, dtype=np.float32)  # the core measures narrow floats in f32
    return x


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _value(leaf):
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _values(tree):
    """``tree`` with every nnx Variable replaced by its value."""
    return jax.tree_util.tree_map(_value, tree, is_leaf=_is_variable)


def _params_only(tree):
    return tree["params"] if _is_variables_dict(tree) else tree
