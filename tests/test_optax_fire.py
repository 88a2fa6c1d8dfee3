"""fire_core.optax.with_fire: FIRE inside an optax optimizer, on short jitted training runs.

Every check is against an independent computation: the parameters after a
firing against ``fire_core.flax.apply`` of the parameters before it, the
inner state against a fresh ``tx.init``, the other updates against the bare
optimizer's, the DfI trigger against ``target_dfi`` measured here on the
host. Float32 throughout (x64 off for this module).
"""

from __future__ import annotations

import functools
import logging
import pickle
from typing import NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import fire_core.flax as ff  # noqa: E402
import fire_core.optax as fo  # noqa: E402
from fire_core.schedule import DfIAbove, DormantAbove, Every, SrankBelow, target_dfi  # noqa: E402

STEPS = 10  # Newton-Schulz steps of every FIRE here
fire = jax.jit(functools.partial(ff.apply, steps=STEPS))  # the expected weights (jit: compiled once, not op by op)
KERNELS = ("Conv_0", "Dense_0", "Dense_1")


@pytest.fixture(scope="module", autouse=True)
def float32():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", old)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(x)


def data(seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (16, 6, 6, 1), jnp.float32), jax.random.normal(ky, (16, 3), jnp.float32)


X, Y = data()
MODEL = CNN()
PARAMS = jax.jit(MODEL.init)(jax.random.key(2), X)["params"]  # jitted: eager flax runs op by op


def committed(tree):
    """``tree`` placed on the device explicitly, as jit's outputs are: else the second call compiles again."""
    return jax.device_put(tree, jax.devices()[0])


def loss(params, x=X, y=Y):
    return jnp.mean((MODEL.apply({"params": params}, x) - y) ** 2)


gradient = jax.jit(jax.grad(loss))


@functools.lru_cache(maxsize=None)
def make_step(tx, jit=True):
    """One update of ``tx`` from given gradients, compiled once per transformation."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    return jax.jit(step) if jit else step


def train(tx, n, params=PARAMS, state=None, jit=True):
    """``n`` updates; the params before each, and the updates, states and gradients of each."""
    step = make_step(tx, jit)
    params, state = committed((params, tx.init(params) if state is None else state))
    hist = {"params": [], "states": [], "updates": [], "grads": [], "before": []}
    for _ in range(n):
        grads = gradient(params) if jit else jax.grad(loss)(params)
        hist["before"].append(params)
        hist["states"].append(state)
        params, state, updates = step(params, state, grads)
        hist["updates"].append(updates)
        hist["grads"].append(grads)
    hist["params"].append(params)
    hist["final"] = state
    return hist


def firings(hist) -> list[int]:
    """The counts (updates done before) at which an update fired, read from the states."""
    states = hist["states"][1:] + [hist["final"]]
    counts = [sum(fo.fired(s)["fired_by"].values()) for s in hist["states"][:1] + states]
    return [k for k in range(len(states)) if counts[k + 1] > counts[k]]


def landing_tolerance(new, old):
    """Elementwise bound on |apply_updates(old, new - old) - new| in float32.

    u = fl(new - old) errs by 2^-24 |new - old|, and XLA may fuse the final
    scale of FIRE with the subtraction (one FMA: u rounded from the unrounded
    new, another half ulp of |new|); fl(old + u) adds 2^-24 |new|. So
    2^-24 (|new - old| + 2 |new|), with a hair of slack for the second-order terms.
    """
    return 2.0**-24 * (jnp.abs(new - old) + 2 * jnp.abs(new)) * (1 + 2.0**-20)


@pytest.fixture(scope="module")
def run():
    """One run of Adam with FIRE at count 5, twelve updates; and the bare Adam it wraps."""
    tx = optax.adam(1e-2)
    wrapped = fo.with_fire(tx, schedule=[5], steps=STEPS)
    return {"tx": tx, "wrapped": wrapped, "hist": train(wrapped, 12)}


# --- when it fires --------------------------------------------------------------------------------------


def test_fires_at_the_listed_steps_only():
    hist = train(fo.with_fire(optax.sgd(1e-2), schedule=[3, 7], steps=1), 10)
    assert firings(hist) == [3, 7]
    assert fo.fired(hist["final"])["last_fired"] == 7


def test_every_n_fires_at_each_multiple():
    hist = train(fo.with_fire(optax.sgd(1e-2), schedule=Every(4), steps=1), 13)
    assert firings(hist) == [4, 8, 12]


def test_a_traceable_callable_decides():
    hist = train(fo.with_fire(optax.sgd(1e-2), schedule=lambda count: count % 5 == 2, steps=1), 10)
    assert firings(hist) == [2, 7]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))


def test_dfi_trigger_fires_at_the_first_check_past_the_threshold():
    """A network started at FIRE's target (DfI 0) whose DfI training drives up; checked every 3 updates."""
    mlp = MLP()
    kx, ky = jax.random.split(jax.random.key(3))
    x, y = jax.random.normal(kx, (64, 8)), 5 * jax.random.normal(ky, (64, 4))
    params = jax.jit(functools.partial(ff.apply, method="svd"))(jax.jit(mlp.init)(jax.random.key(4), x)["params"])
    threshold, every = 2.0, 3
    schedule = DfIAbove(threshold, every=every)
    tx = fo.with_fire(optax.adam(1e-2), schedule=schedule, steps=STEPS)
    mse = lambda p: jnp.mean((mlp.apply({"params": p}, x) - y) ** 2)  # noqa: E731

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(mse)(p), s, p)
        return optax.apply_updates(p, updates), s

    @jax.jit
    def per_layer_dfi(p):  # the trigger's value, measured here: target_dfi of each layer's kernel
        return jnp.stack([target_dfi(p[name]["kernel"], "io")[0] for name in p])

    mean_dfi = lambda p: float(np.mean(np.asarray(per_layer_dfi(p), np.float64)))  # noqa: E731

    (params, state), seen = committed((params, tx.init(params))), {}
    for count in range(30):
        if count and count % every == 0:
            seen[count] = mean_dfi(params)
        params, state = step(params, state)
        if fo.fired(state)["last_fired"] is not None:
            break
    first_above = min(c for c, v in seen.items() if v > threshold)
    assert count == first_above  # it fired at that update and not before
    assert seen[min(seen)] < threshold  # the DfI crossed the threshold during training
    assert all(v <= threshold for c, v in seen.items() if c < first_above)
    info = fo.fired(state, schedule)
    assert info["last_fired"] == first_above and info["fired_by"] == {repr(schedule): 1}
    np.testing.assert_allclose(info["dfi"][repr(schedule)], seen[first_above], rtol=1e-5)


# --- what a firing does ---------------------------------------------------------------------------------


def test_params_after_the_firing_equal_flax_apply_of_the_params_before(run):
    hist = run["hist"]
    before, after = hist["before"][5], hist["before"][6]
    expected = fire(before)
    for name in KERNELS:
        new, old, got = expected[name]["kernel"], before[name]["kernel"], after[name]["kernel"]
        assert not np.allclose(new, old)
        assert bool(jnp.all(jnp.abs(got - new) <= landing_tolerance(new, old))), name
    for name in KERNELS:  # not projected: a zero update, so bitwise the old values
        np.testing.assert_array_equal(after[name]["bias"], before[name]["bias"])


def test_projected_leaves_restart_their_state_and_the_others_keep_theirs(run):
    tx, hist = run["tx"], run["hist"]
    old, new = hist["states"][5].inner_state, hist["states"][6].inner_state
    fresh = tx.init(hist["before"][6])
    adam, adam_old, adam_fresh = new[0], old[0], fresh[0]
    assert int(adam.count) == int(adam_fresh.count) == 0  # restarted, as reset_opt_state does
    for name in KERNELS:
        for moment in ("mu", "nu"):
            np.testing.assert_array_equal(getattr(adam, moment)[name]["kernel"], getattr(adam_fresh, moment)[name]["kernel"])
            np.testing.assert_array_equal(getattr(adam, moment)[name]["bias"], getattr(adam_old, moment)[name]["bias"])
            assert float(jnp.abs(getattr(adam_old, moment)[name]["bias"]).max()) > 0


def test_the_firing_update_does_not_use_the_gradient(run):
    hist = run["hist"]
    other = committed(jax.tree_util.tree_map(lambda g: -3 * g + 1, hist["grads"][5]))
    _, _, updates = make_step(run["wrapped"])(hist["before"][5], hist["states"][5], other)
    for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(hist["updates"][5])):
        np.testing.assert_array_equal(a, b)


def test_other_updates_are_the_bare_optimizers_bitwise(run):
    tx, hist = run["tx"], run["hist"]
    bare = jax.jit(tx.update)
    for k in [k for k in range(12) if k != 5]:
        state = hist["states"][k]
        updates, inner = bare(hist["grads"][k], state.inner_state, hist["before"][k])
        got_u, got_s = hist["updates"][k], (hist["states"] + [hist["final"]])[k + 1].inner_state
        for a, b in zip(jax.tree_util.tree_leaves((updates, inner)), jax.tree_util.tree_leaves((got_u, got_s))):
            np.testing.assert_array_equal(a, b, err_msg=f"update {k + 1}")


def test_jit_and_eager_agree():
    tx = fo.with_fire(optax.adam(1e-2), schedule=[1], steps=2)
    jitted, eager = train(tx, 2), train(tx, 2, jit=False)  # an ordinary update, then FIRE's
    assert firings(jitted) == firings(eager) == [1]
    for a, b in zip(jax.tree_util.tree_leaves(jitted["params"]), jax.tree_util.tree_leaves(eager["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


def test_training_goes_on_after_the_firing(run):
    hist = run["hist"]
    losses = [float(loss(p)) for p in hist["before"][6:] + hist["params"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


# --- checkpoints ----------------------------------------------------------------------------------------


def restored(state):
    """The state through a checkpointer's round trip: leaves to NumPy, pickled, unpickled, unflattened."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    leaves = pickle.loads(pickle.dumps([np.asarray(x) for x in leaves]))
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])


@pytest.mark.parametrize("at", [3, 8], ids=["before-the-boundary", "after-the-firing"])
def test_a_resumed_run_neither_fires_twice_nor_misses(run, at):
    hist = run["hist"]
    resumed = train(run["wrapped"], 12 - at, params=hist["before"][at], state=restored(hist["states"][at]))
    assert [at + k for k in firings(resumed)] == ([5] if at < 5 else [])
    assert fo.fired(resumed["final"])["fired_by"] == {0: 1} and fo.fired(resumed["final"])["updates"] == 12
    for a, b in zip(jax.tree_util.tree_leaves(resumed["params"]), jax.tree_util.tree_leaves(hist["params"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("other", [[8], [5, 9], Every(4)], ids=["moved", "extended", "every"])
def test_a_state_restored_into_another_schedule_is_refused_naming_both(run, other):
    """Under jit the traced progress has no boundaries to match: [5] restored into [8] would mark 8 done."""
    hist = run["hist"]
    tx = fo.with_fire(optax.adam(1e-2), schedule=other, steps=STEPS)
    with pytest.raises(Exception, match=r'made by the schedule .*"steps":\[5\].*not by this one'):
        train(tx, 1, params=hist["before"][3], state=restored(hist["states"][3]))
    with pytest.raises(ValueError, match="made by the schedule"):
        fo.fired(hist["states"][3], schedule=other)


# --- nnx.Optimizer ----------------------------------------------------------------------------------------


class Net(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_nnx_optimizer_lands_on_fire_weights_at_the_boundary():
    model = Net(nnx.Rngs(0))
    tx = optax.adam(1e-2)
    optimizer = nnx.Optimizer(model, fo.with_fire(tx, schedule=[3], steps=STEPS), wrt=nnx.Param)
    x, y = jax.random.normal(jax.random.key(5), (32, 5)), jax.random.normal(jax.random.key(6), (32, 3))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    for count in range(5):
        before = nnx.as_pure(nnx.state(model, nnx.Param))  # arrays, not the model's own Variables
        step(model, optimizer)
        after = nnx.as_pure(nnx.state(model, nnx.Param))
        expected = fire(before)
        for layer in ("hidden", "out"):
            new, old, got = (t[layer]["kernel"] for t in (expected, before, after))
            landed = bool(jnp.all(jnp.abs(got - new) <= landing_tolerance(new, old)))
            assert landed == (count == 3), (count, layer)
            if count == 3:
                np.testing.assert_array_equal(after[layer]["bias"], before[layer]["bias"])
                assert float(jnp.abs(optimizer.opt_state.inner_state[0].mu[layer]["kernel"][...]).max()) == 0
    assert fo.fired(optimizer.opt_state)["last_fired"] == 3


# --- refusals and logs ----------------------------------------------------------------------------------


def test_update_without_params_is_an_error():
    tx = fo.with_fire(optax.sgd(1e-2), schedule=[3])
    with pytest.raises(ValueError, match=r"without params.*update\(grads, state, params\)"):
        tx.update(PARAMS, tx.init(PARAMS))


@pytest.mark.parametrize("trigger", [DormantAbove(0.5), SrankBelow(0.5)], ids=["dormant", "srank"])
def test_activation_triggers_are_refused_when_built(trigger):
    with pytest.raises(ValueError, match="activations of a probe batch"):
        fo.with_fire(optax.sgd(1e-2), schedule=trigger)


def test_bad_options_are_refused_when_built_and_a_dead_pattern_at_init():
    with pytest.raises(ValueError, match="unknown method"):
        fo.with_fire(optax.sgd(1e-2), schedule=[3], method="newton")
    with pytest.raises(ValueError, match="unknown scale"):
        fo.with_fire(optax.sgd(1e-2), schedule=[3], scale="big")
    tx = fo.with_fire(optax.sgd(1e-2), schedule=[3], include=["Dense_9"])
    with pytest.raises(ValueError, match="Dense_9"):
        tx.init(PARAMS)


def test_the_selection_and_each_firing_are_logged(caplog):
    tx = fo.with_fire(optax.sgd(1e-2), schedule=[1], steps=1, exclude=["Conv_0"])
    with caplog.at_level(logging.INFO, logger="fire_core.optax"):
        train(tx, 2)
        jax.effects_barrier()
    text = caplog.text
    assert "2 weights are projected" in text and "Dense_0/kernel (io)" in text
    assert "left alone: Conv_0/kernel" in text
    assert "FIRE at update 2 (after 1 updates): fired by AtSteps([1])" in text


# --- inside optax.multi_transform / optax.masked, and around them ---------------------------------------

IN_A = {"Conv_0": "a", "Dense_0": "a", "Dense_1": "b"}  # labels: with_fire's part, and another transformation's
MASK_A = {"Conv_0": True, "Dense_0": True, "Dense_1": False}
fire_a = jax.jit(functools.partial(ff.apply, steps=STEPS, include=["Conv_0", "Dense_0"]))  # FIRE of part a only


def fire_state(state):
    """The FireState somewhere inside an optax state."""
    found = [x for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, fo.FireState))
             if isinstance(x, fo.FireState)]
    assert len(found) == 1
    return found[0]


def assert_part_a_fired(hist, at, expected=fire_a):
    """At update ``at + 1`` part a's kernels land on FIRE's weights, its biases stay, and its Adam state restarts."""
    before, after = hist["before"][at], hist["before"][at + 1]
    expected = expected(before)
    for name in ("Conv_0", "Dense_0"):
        new, old, got = expected[name]["kernel"], before[name]["kernel"], after[name]["kernel"]
        assert not np.allclose(new, old)
        assert bool(jnp.all(jnp.abs(got - new) <= landing_tolerance(new, old))), name
        np.testing.assert_array_equal(after[name]["bias"], before[name]["bias"])
    old_adam = fire_state(hist["states"][at]).inner_state[0]
    adam = fire_state(hist["states"][at + 1]).inner_state[0]
    assert int(adam.count) == 0 and int(old_adam.count) == at
    for name in ("Conv_0", "Dense_0"):
        for moment in ("mu", "nu"):
            assert float(jnp.abs(getattr(adam, moment)[name]["kernel"]).max()) == 0  # tx.init's zeros
            np.testing.assert_array_equal(getattr(adam, moment)[name]["bias"], getattr(old_adam, moment)[name]["bias"])
            assert float(jnp.abs(getattr(old_adam, moment)[name]["bias"]).max()) > 0
    assert isinstance(adam.mu["Dense_1"], optax.MaskedNode)  # part b has no state in with_fire


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_with_fire_inside_multi_transform_fires_on_its_part_only(jit):
    wrapped = fo.with_fire(optax.adam(1e-2), schedule=[2], steps=STEPS)
    hist = train(optax.multi_transform({"a": wrapped, "b": optax.sgd(1e-2)}, IN_A), 4, jit=jit)
    assert firings(hist) == [2]
    assert_part_a_fired(hist, 2)
    before, after, grads = hist["before"][2], hist["before"][3], hist["grads"][2]
    sgd_updates, _ = optax.sgd(1e-2).update(grads["Dense_1"], optax.sgd(1e-2).init(before["Dense_1"]))
    for leaf in ("kernel", "bias"):  # part b took its own sgd step
        np.testing.assert_array_equal(after["Dense_1"][leaf], optax.apply_updates(before["Dense_1"], sgd_updates)[leaf])


def test_with_fire_inside_masked_fires_on_the_masked_in_leaves_only():
    hist = train(optax.masked(fo.with_fire(optax.adam(1e-2), schedule=[2], steps=STEPS), MASK_A), 4)
    assert firings(hist) == [2]
    assert_part_a_fired(hist, 2)
    before, after, grads = hist["before"][2], hist["before"][3], hist["grads"][2]
    for leaf in ("kernel", "bias"):  # optax.masked passes the masked-out leaves' updates through
        np.testing.assert_array_equal(after["Dense_1"][leaf], before["Dense_1"][leaf] + grads["Dense_1"][leaf])


def test_with_fire_inside_multi_transform_names_the_leaves_it_does_not_see(caplog):
    wrapped = fo.with_fire(optax.adam(1e-2), schedule=[1], steps=1)
    with caplog.at_level(logging.INFO, logger="fire_core.optax"):
        optax.multi_transform({"a": wrapped, "b": optax.set_to_zero()}, IN_A).init(PARAMS)
    assert "2 weights are projected" in caplog.text
    assert "left alone: Dense_1: masked out" in caplog.text


# --- leaves tx freezes (optax.set_to_zero) are left alone, as fire_core.torch leaves frozen weights ------

FROZEN_DENSE_0 = {"Conv_0": "train", "Dense_0": "frozen", "Dense_1": "train"}
fire_but_dense_0 = jax.jit(functools.partial(ff.apply, steps=STEPS, exclude=["Dense_0"]))


def frozen_dense_0(then=None):
    tx = optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, FROZEN_DENSE_0)
    return tx if then is None else optax.chain(tx, then)


@pytest.mark.parametrize("then", [None, optax.scale_by_schedule(lambda count: 1.0 / (1 + count))],
                         ids=["multi_transform", "then-a-schedule"])
def test_with_fire_around_multi_transform_leaves_set_to_zero_leaves_alone(then, caplog):
    with caplog.at_level(logging.INFO, logger="fire_core.optax"):
        hist = train(fo.with_fire(frozen_dense_0(then), schedule=[2], steps=STEPS), 4)
        jax.effects_barrier()
    assert firings(hist) == [2]
    before, after = hist["before"][2], hist["before"][3]
    expected = fire_but_dense_0(before)
    for name in ("Conv_0", "Dense_1"):
        new, old, got = expected[name]["kernel"], before[name]["kernel"], after[name]["kernel"]
        assert bool(jnp.all(jnp.abs(got - new) <= landing_tolerance(new, old))), name
    for leaf in ("kernel", "bias"):  # frozen: never moved, not even by FIRE
        np.testing.assert_array_equal(after["Dense_0"][leaf], PARAMS["Dense_0"][leaf])
    assert "2 weights are projected" in caplog.text
    assert "left alone: Dense_0/kernel" in caplog.text and "frozen: tx's update of it ignores the gradient" in caplog.text


def test_with_fire_inside_multi_transform_leaves_the_set_to_zero_part_alone():
    wrapped = fo.with_fire(optax.adam(1e-2), schedule=[2], steps=STEPS)
    hist = train(optax.multi_transform({"a": wrapped, "b": optax.set_to_zero()}, IN_A), 4)
    assert firings(hist) == [2]
    assert_part_a_fired(hist, 2)
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(hist["params"][0]["Dense_1"][leaf], PARAMS["Dense_1"][leaf])


def test_trainable_true_projects_the_frozen_leaves_too():
    hist = train(fo.with_fire(frozen_dense_0(), schedule=[1], steps=STEPS, trainable=True), 3)
    before, after = hist["before"][1], hist["before"][2]
    expected = fire(before)
    for name in KERNELS:
        new, old, got = expected[name]["kernel"], before[name]["kernel"], after[name]["kernel"]
        assert bool(jnp.all(jnp.abs(got - new) <= landing_tolerance(new, old))), name


# --- with_fire wraps the whole optimizer: fire_core.optax.check refuses what would move its landing -------


def test_check_refuses_with_fire_followed_by_more_of_a_chain():
    tx = optax.chain(fo.with_fire(optax.scale_by_adam(), schedule=[1]), optax.scale_by_learning_rate(1e-2))
    with pytest.raises(ValueError, match=r"element 1 of an optax.chain .*of 2 .*with_fire\(optax.chain\(\.\.\.\)\)"):
        fo.check(tx, PARAMS)
    named = optax.named_chain(("adam", fo.with_fire(optax.scale_by_adam(), schedule=[1])),
                              ("lr", optax.scale_by_learning_rate(1e-2)))
    with pytest.raises(ValueError, match="optax.chain"):
        fo.check(named, PARAMS)
    inside = optax.multi_transform({"a": optax.chain(fo.with_fire(optax.scale_by_adam(), schedule=[1]),
                                                     optax.scale(-1e-2)), "b": optax.sgd(1e-2)}, IN_A)
    with pytest.raises(ValueError, match="optax.chain"):
        fo.check(inside, PARAMS)


class DoubledState(NamedTuple):
    inner: object


def doubled(inner):
    """A wrapper fire_core does not know (it doubles the inner updates)."""

    def init(params):
        return DoubledState(inner.init(params))

    def update(updates, state, params=None):
        updates, inner_state = inner.update(updates, state.inner, params)
        return jax.tree_util.tree_map(lambda u: 2 * u, updates), DoubledState(inner_state)

    return optax.GradientTransformation(init, update)


def test_check_refuses_with_fire_inside_a_wrapper_it_does_not_know():
    with pytest.raises(ValueError, match="DoubledState"):
        fo.check(doubled(fo.with_fire(optax.adam(1e-2), schedule=[1])), PARAMS)


@pytest.mark.parametrize("make", [
    lambda w: w,
    lambda w: optax.chain(optax.clip_by_global_norm(1.0), w),
    lambda w: optax.multi_transform({"a": w, "b": optax.sgd(1e-2)}, IN_A),
    lambda w: optax.masked(w, MASK_A),
    lambda w: optax.MultiSteps(w, every_k_schedule=2),
    lambda w: optax.apply_if_finite(w, 3),
], ids=["alone", "last-of-a-chain", "multi_transform", "masked", "MultiSteps", "apply_if_finite"])
def test_check_accepts_with_fire_whose_step_reaches_the_weights(make):
    assert fo.check(make(fo.with_fire(optax.adam(1e-2), schedule=[1])), PARAMS) is None


def test_with_fire_around_the_whole_chain_lands_on_fire_weights():
    inner = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
    tx = fo.with_fire(inner, schedule=[2], steps=STEPS)
    fo.check(tx, PARAMS)
    hist = train(tx, 4)
    before, after = hist["before"][2], hist["before"][3]
    expected = fire(before)
    for name in KERNELS:
        new, old, got = expected[name]["kernel"], before[name]["kernel"], after[name]["kernel"]
        assert bool(jnp.all(jnp.abs(got - new) <= landing_tolerance(new, old))), name
