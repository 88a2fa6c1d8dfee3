"""fire_core.flax.reset_opt_state and update(optimizer=): optax states after FIRE, against fresh ones.

Each optimizer is checked against its own freshly initialized state: after the
reset, the parts of the projected leaves equal ``tx.init(after)``'s, the other
leaves' parts are the old state's own, and one update afterwards moves the
projected leaves exactly as a fresh optimizer's first update. The "projected"
tree is made here (2-D kernels replaced by their SVD polar factor), so these
tests read only which leaves changed, as ``reset_opt_state`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import fire_core.flax as ff  # noqa: E402

pytestmark = pytest.mark.usefixtures("x64")  # conftest's: float64 JAX for every test here

PROJECTED = (("Dense_1", "kernel"), ("Conv_0", "kernel"))


# --- trees, training, and the independent checks ------------------------------------------------------


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(6, 8))), "bias": jnp.asarray(rng.normal(size=8))},
        "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(8, 8))), "bias": jnp.asarray(rng.normal(size=8))},
        "Conv_0": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 6)))},
        "LayerNorm_0": {"scale": jnp.asarray(1.0 + 0.1 * rng.normal(size=8))},
    }


def polar(w):
    """The orthogonal polar factor of each trailing matrix, by SVD (the projection FIRE approximates)."""
    u, _, vh = np.linalg.svd(np.asarray(w), full_matrices=False)
    return jnp.asarray(u @ vh)


def projected(params, which=PROJECTED):
    new = jax.tree_util.tree_map(lambda x: x, params)  # a new tree sharing the untouched arrays
    for module, name in which:
        new[module] = dict(new[module], **{name: polar(params[module][name])})
    return new


def grads_for(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)


def trained(tx, params, steps=3):
    """``tx``'s state after ``steps`` updates with varying gradients."""
    state, update = tx.init(params), jax.jit(tx.update)  # compiled once: eager optax runs op by op
    for k in range(steps):
        _, state = update(grads_for(params, seed=10 + k), state, params)
    return state


def names(path) -> tuple[str, ...]:
    out = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                out.append(str(getattr(key, attr)))
                break
    return tuple(out)


def owner(path, params):
    """The parameter a state leaf belongs to: its key path contains that parameter's keys in a row."""
    keys = names(path)
    for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        want = names(p)
        if any(keys[k : k + len(want)] == want for k in range(len(keys) - len(want) + 1)):
            return want
    return None


def flat(state):
    pairs = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    return [(p, x) for p, x in pairs if not isinstance(x, optax.MaskedNode)]


def check_parts(reset, old, fresh, params, which=PROJECTED) -> dict:
    """Projected leaves' parts are fresh's, the others' are old's (bitwise: both are copies).

    Returns the leaves that belong to no parameter (counts, hyperparameters), by key path.
    """
    rest = {}
    for (path, r), (_, o), (_, f) in zip(flat(reset), flat(old), flat(fresh), strict=True):
        leaf = owner(path, params)
        if leaf in which:
            assert np.array_equal(r, f), f"{jax.tree_util.keystr(path)} is not restarted"
        elif leaf is not None:
            assert np.array_equal(r, o), f"{jax.tree_util.keystr(path)} of an untouched leaf changed"
        else:
            rest[jax.tree_util.keystr(path)] = (r, o, f)
    return rest


def counts_beside_projected_parts(state, params, which=PROJECTED) -> set[str]:
    """Key paths of the step counts that are fields of the same state as a projected leaf's statistics.

    A state field holding per-parameter statistics has paths ``state + field + parameter keys``.
    """
    pairs = flat(state)
    beside = set()
    for path, _ in pairs:
        if names(path)[-1:] not in (("count",), ("t",)):
            continue
        parent = path[:-1]
        for other, _ in pairs:
            leaf = owner(other, params)
            if leaf in which and other[: len(parent)] == parent and len(other) == len(parent) + 1 + len(leaf):
                beside.add(jax.tree_util.keystr(path))
    return beside


def updates_on(tx, state, params, grads, which=PROJECTED):
    updates, _ = jax.jit(tx.update)(grads, state, params)
    return [np.asarray(updates[m][n]) for m, n in which]


def labels(params, kernel_label, other_label):
    return {
        m: {n: kernel_label if n == "kernel" and x.ndim == 2 else other_label for n, x in leaves.items()}
        for m, leaves in params.items()
    }


OPTIMIZERS = {
    "adam": lambda p: optax.adam(1e-3),
    "adamw": lambda p: optax.adamw(1e-3, weight_decay=0.1),
    "sgd_momentum": lambda p: optax.sgd(1e-2, momentum=0.9),
    "nesterov": lambda p: optax.sgd(1e-2, momentum=0.9, nesterov=True),
    "lion": lambda p: optax.lion(1e-4),
    "rmsprop_centered": lambda p: optax.rmsprop(1e-3, momentum=0.9, centered=True, initial_scale=0.5),
    "adagrad": lambda p: optax.adagrad(1e-2),
    "yogi": lambda p: optax.yogi(1e-2),
    "amsgrad": lambda p: optax.amsgrad(1e-3),
    "adabelief": lambda p: optax.adabelief(1e-3),
    "novograd": lambda p: optax.novograd(1e-3),
    "lamb": lambda p: optax.lamb(1e-3),
    "lars": lambda p: optax.lars(1e-3),
    "adafactor": lambda p: optax.adafactor(1e-3, min_dim_size_to_factor=4),
    "sm3": lambda p: optax.sm3(1e-2),
    "muon": lambda p: optax.contrib.muon(1e-3),
    "masked_adam": lambda p: optax.masked(
        optax.adam(1e-3), {"Dense_0": False, "Dense_1": True, "Conv_0": True, "LayerNorm_0": False}
    ),
    "chain_clip_adam": lambda p: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    "multi_transform": lambda p: optax.multi_transform(
        {"adam": optax.adam(1e-3), "sgd": optax.sgd(1e-2, momentum=0.9)}, labels(p, "adam", "sgd")
    ),
    "apply_if_finite": lambda p: optax.apply_if_finite(optax.adam(1e-3), 3),
    "conditionally_mask": lambda p: optax.transforms.conditionally_mask(optax.adam(1e-3), lambda step: step >= 0),
    "adan": lambda p: optax.adan(1e-3),
    "adadelta": lambda p: optax.adadelta(1e-1),
    "rprop": lambda p: optax.rprop(1e-3),
    "rmsprop_bias_corrected": lambda p: optax.rmsprop(1e-3, bias_correction=True, initial_scale=0.5),
    "ema": lambda p: optax.chain(optax.ema(0.9), optax.scale(-1e-2)),
}


_TRAINED: dict = {}


def setting(name):
    """(params, tx, state after 3 updates) for OPTIMIZERS[name], built once (arrays are immutable)."""
    if name not in _TRAINED:
        params = make_params()
        tx = OPTIMIZERS[name](params)
        _TRAINED[name] = params, tx, trained(tx, params)
    return _TRAINED[name]


# --- every optimizer against its own fresh state --------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_projected_leaves_parts_restart_at_tx_init_and_the_others_are_kept(name):
    params, tx, state = setting(name)
    new = projected(params)
    reset = ff.reset_opt_state(state, params, new, tx=tx)
    rest = check_parts(reset, state, tx.init(new), params)
    for path, (r, old, fresh) in rest.items():  # counts next to reset statistics restart, all else is kept
        if path in counts_beside_projected_parts(state, params):
            assert int(r) == int(fresh) == 0, path
        else:
            assert np.array_equal(r, old), path


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_next_update_of_projected_leaves_is_a_fresh_optimizers_first(name):
    params, tx, state = setting(name)
    new, grads = projected(params), grads_for(params, seed=99)
    got = updates_on(tx, ff.reset_opt_state(state, params, new, tx=tx), new, grads)
    want = updates_on(tx, tx.init(new), new, grads)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15)


HYPERPARAMETER_START = ("adagrad", "rmsprop_centered", "rprop", "rmsprop_bias_corrected")
# yogi's moments start at 1e-6 in a ScaleByAdamState, which is Adam's type: only tx tells them apart
ZERO_STARTING = [name for name in OPTIMIZERS if name not in (*HYPERPARAMETER_START, "yogi")]


@pytest.mark.parametrize("name", ZERO_STARTING)
def test_zero_starting_states_restart_the_same_without_tx(name):
    params, tx, state = setting(name)
    new = projected(params)
    without = ff.reset_opt_state(state, params, new)
    with_tx = ff.reset_opt_state(state, params, new, tx=tx)
    for (path, a), (_, b) in zip(flat(without), flat(with_tx), strict=True):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", HYPERPARAMETER_START)
def test_states_starting_at_a_hyperparameter_need_tx(name):
    params, tx, state = setting(name)
    with pytest.raises(ValueError, match=r"starts at a hyperparameter.*pass tx="):
        ff.reset_opt_state(state, params, projected(params))
    fresh = jax.tree_util.tree_leaves(tx.init(params))
    assert any(np.any(np.asarray(x) != 0) for x in fresh if np.ndim(x) > 0)  # their start is not zero


def test_yogi_moments_restart_at_its_initial_accumulator_with_tx():
    params, tx = make_params(), optax.chain(optax.scale_by_yogi(initial_accumulator_value=1e-3), optax.scale(-1e-2))
    state, new = trained(tx, params), projected(params)
    adam = ff.reset_opt_state(state, params, new, tx=tx)[0]  # a ScaleByAdamState, as Adam's
    np.testing.assert_array_equal(adam.nu["Dense_1"]["kernel"], np.full((8, 8), 1e-3))
    np.testing.assert_array_equal(adam.mu["Conv_0"]["kernel"], np.full((3, 3, 2, 6), 1e-3))


def test_reset_with_nothing_changed_returns_every_leaf_as_it_was():
    params, tx, state = setting("multi_transform")
    same = ff.reset_opt_state(state, params, params, tx=tx)
    for (path, a), (_, b) in zip(flat(same), flat(state), strict=True):
        assert a is b, jax.tree_util.keystr(path)


# --- wrappers ---------------------------------------------------------------------------------------------


def multi_steps(params, k=3):
    inner = optax.multi_transform(
        {"adam": optax.adam(1e-3), "sgd": optax.sgd(1e-2, momentum=0.9)}, labels(params, "adam", "sgd")
    )
    return optax.MultiSteps(inner, every_k_schedule=k)


def test_multi_steps_of_multi_transform_restarts_the_inner_adam_moments():
    params = make_params()
    tx = multi_steps(params)
    state, new = trained(tx, params, steps=4), projected(params)  # 4 = one emitted update and one micro-step
    assert int(state.mini_step) == 1 and int(state.gradient_step) == 1
    reset = ff.reset_opt_state(state, params, new, tx=tx)
    fresh = tx.init(new)
    check_parts(reset.inner_opt_state, state.inner_opt_state, fresh.inner_opt_state, params)
    adam = reset.inner_opt_state.inner_states["adam"].inner_state[0]
    assert not np.any(adam.mu["Dense_1"]["kernel"]) and not np.any(adam.nu["Dense_1"]["kernel"])
    assert int(adam.count) == 0


def test_multi_steps_restarts_its_accumulation_window():
    params = make_params()
    tx = multi_steps(params)
    state = trained(tx, params, steps=4)
    reset = ff.reset_opt_state(state, params, projected(params), tx=tx)
    assert int(reset.mini_step) == 0 and int(reset.gradient_step) == 1  # the schedule's step is kept
    # a window restarted for every leaf: the partial window's gradients were taken at the old weights
    assert not any(np.any(x) for x in jax.tree_util.tree_leaves(reset.acc_grads))


def test_multi_steps_next_emitted_update_of_projected_leaves_is_a_fresh_ones_first():
    params = make_params()
    tx = multi_steps(params, k=3)
    state, new = trained(tx, params, steps=4), projected(params)
    a, b = ff.reset_opt_state(state, params, new, tx=tx), tx.init(new)
    update = jax.jit(tx.update)
    for k in range(3):
        grads = grads_for(params, seed=50 + k)
        ua, a = update(grads, a, new)
        ub, b = update(grads, b, new)
    assert np.any(ub["Dense_1"]["kernel"])  # the third micro-step emits
    for m, n in PROJECTED:
        np.testing.assert_allclose(ua[m][n], ub[m][n], rtol=1e-12, atol=1e-15)


def test_multi_steps_with_reset_count_false_keeps_the_window_and_zeroes_projected_accumulators():
    params = make_params()
    tx = multi_steps(params)
    state = trained(tx, params, steps=4)
    reset = ff.reset_opt_state(state, params, projected(params), reset_count=False)
    assert int(reset.mini_step) == 1
    assert not np.any(reset.acc_grads["Dense_1"]["kernel"])
    np.testing.assert_array_equal(reset.acc_grads["Dense_0"]["kernel"], state.acc_grads["Dense_0"]["kernel"])


def test_inject_hyperparams_keeps_the_schedule_and_restarts_adam():
    params = make_params()
    schedule = optax.linear_schedule(1e-3, 1e-4, 10)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
    state, new, grads = trained(tx, params, steps=4), projected(params), grads_for(params, seed=7)
    reset = ff.reset_opt_state(state, params, new, tx=tx)
    schedule_counts = [int(c) for p, c in flat(reset) if names(p)[-1] == "count" and "inner_state" not in names(p)]
    assert schedule_counts and all(c == 4 for c in schedule_counts)
    assert int(reset.inner_state[0].count) == 0
    # the next update: a fresh Adam's first, at the learning rate the schedule has reached
    fresh = tx.init(new)
    expected = fresh._replace(
        count=state.count, hyperparams=state.hyperparams, hyperparams_states=state.hyperparams_states
    )
    for g, w in zip(updates_on(tx, reset, new, grads), updates_on(tx, expected, new, grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15)


def test_adafactor_factored_statistics_of_projected_leaves_restart():
    params, _, state = setting("adafactor")
    new = projected(params)
    factored = state[0]
    assert factored.v_row["Dense_1"]["kernel"].shape == (8,) and factored.v["Dense_1"]["kernel"].shape == (1,)
    reset = ff.reset_opt_state(state, params, new)[0]
    assert not np.any(reset.v_row["Dense_1"]["kernel"]) and not np.any(reset.v_col["Dense_1"]["kernel"])
    assert not np.any(reset.v["Conv_0"]["kernel"])  # (3, 3, 2, 6) is not factored: a full second moment
    np.testing.assert_array_equal(reset.v_row["Dense_0"]["kernel"], factored.v_row["Dense_0"]["kernel"])
    assert int(reset.count) == 0


def test_muon_restarts_its_muon_and_adam_groups():
    params, _, state = setting("muon")
    reset = ff.reset_opt_state(state, params, projected(params))
    muon = reset.inner_states["muon"].inner_state[0]
    adam = reset.inner_states["adam"].inner_state[0]
    assert not np.any(muon.mu["Dense_1"]["kernel"]) and int(muon.count) == 0  # 2-D: Muon's group
    assert not np.any(adam.mu["Conv_0"]["kernel"]) and int(adam.count) == 0  # 4-D: Adam's group
    old = state.inner_states["muon"].inner_state[0]
    np.testing.assert_array_equal(muon.mu["Dense_0"]["kernel"], old.mu["Dense_0"]["kernel"])
    np.testing.assert_array_equal(muon.ns_coeffs, old.ns_coeffs)


def test_a_group_without_projected_leaves_keeps_its_count():
    params, tx, state = setting("multi_transform")
    new = projected(params, which=(("Conv_0", "kernel"),))  # only the SGD group's leaf
    reset = ff.reset_opt_state(state, params, new, tx=tx)
    assert int(reset.inner_states["adam"].inner_state[0].count) == 3


def test_lbfgs_restarts_its_whole_history():
    params = make_params()
    tx = optax.lbfgs()

    def loss(p):
        return sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree_util.tree_leaves(p))

    @jax.jit
    def step(p, state):
        value, grad = jax.value_and_grad(loss)(p)
        updates, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state

    p, state = params, tx.init(params)
    for _ in range(3):
        p, state = step(p, state)
    new = projected(p, which=(("Dense_1", "kernel"),))
    reset = ff.reset_opt_state(state, p, new, tx=tx)
    for (path, r), (_, f) in zip(flat(reset), flat(tx.init(new)), strict=True):
        assert np.array_equal(r, f), jax.tree_util.keystr(path)  # every leaf's part: the history is joint
    with pytest.raises(ValueError, match=r"ScaleByLBFGSState.*one history of all parameters.*pass tx="):
        ff.reset_opt_state(state, p, new)


# --- states that cannot be mapped -------------------------------------------------------------------------


class OddState(NamedTuple):
    count: jnp.ndarray
    sketch: jnp.ndarray  # one array for the whole tree: which part is whose?


class LikeParamsState(NamedTuple):
    trace: dict


def transformation(init):
    return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


def test_an_unknown_state_with_arrays_of_unrelated_shapes_is_an_error():
    params = make_params()
    tx = optax.chain(optax.adam(1e-3), transformation(lambda p: OddState(jnp.zeros([], jnp.int32), jnp.ones((5, 3)))))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"opt_state\[1\]\.sketch is a float64 array of shape \(5, 3\).*tx\.init"):
        ff.reset_opt_state(state, params, projected(params), tx=tx)


def test_an_unknown_state_shaped_like_the_params_but_other_shapes_is_refused():
    params = make_params()
    state = (LikeParamsState(jax.tree_util.tree_map(lambda x: jnp.ones(x.shape[:1]), params)),)
    with pytest.raises(ValueError, match=r"LikeParamsState.*tree structure of the parameters but other shapes"):
        ff.reset_opt_state(state, params, projected(params))


def test_an_unknown_state_shaped_like_the_params_restarts_from_tx_init_and_needs_tx():
    params = make_params()
    tx = transformation(lambda p: LikeParamsState(jax.tree_util.tree_map(lambda x: jnp.full_like(x, 2.0), p)))
    state = LikeParamsState(jax.tree_util.tree_map(lambda x: 3.0 * x, params))
    new = projected(params)
    with pytest.raises(ValueError, match=r"opt_state\.trace.*does not know.*pass tx="):
        ff.reset_opt_state(state, params, new)
    reset = ff.reset_opt_state(state, params, new, tx=tx)
    check_parts(reset, state, tx.init(new), params)


def test_tx_that_did_not_make_the_state_is_an_error():
    params = make_params()
    state = trained(optax.adam(1e-3), params)
    with pytest.raises(ValueError, match="another structure than opt_state"):
        ff.reset_opt_state(state, params, projected(params), tx=optax.sgd(1e-2, momentum=0.9))


# --- under jit ----------------------------------------------------------------------------------------------


def test_reset_under_jit_equals_the_eager_reset():
    params = make_params()
    tx = multi_steps(params)
    state, new = trained(tx, params, steps=4), projected(params)
    eager = ff.reset_opt_state(state, params, new, tx=tx)
    traced = jax.jit(lambda s, b, a: ff.reset_opt_state(s, b, a, tx=tx))(state, params, new)
    for (path, a), (_, b) in zip(flat(traced), flat(eager), strict=True):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)


# --- nnx: update(model, optimizer=) ---------------------------------------------------------------------------


class Net(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(6, 8, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.body(x)))


def nnx_trained(tx, wrt=nnx.Param, steps=3):
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx, wrt=wrt)
    rng = np.random.default_rng(3)
    step = nnx.jit(lambda opt, model, grads: opt.update(model, grads))
    for _ in range(steps):
        grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), nnx.state(model, wrt))
        step(opt, model, grads)
    return model, opt


def pure(tree):
    return jax.tree_util.tree_map(lambda v: v.get_value(), tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def test_update_restarts_an_nnx_optimizers_state_in_place():
    tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), every_k_schedule=2)
    model, opt = nnx_trained(tx, steps=3)
    old_state, old_step = pure(opt.opt_state), int(opt.step[...])
    ff.update(model, include="head", optimizer=opt)
    after = pure(nnx.state(model, nnx.Param))
    fresh = tx.init(after)
    reset = pure(opt.opt_state)
    check_parts(
        reset.inner_opt_state, old_state.inner_opt_state, fresh.inner_opt_state, after, which=(("head", "kernel"),)
    )
    assert int(reset.inner_opt_state[1][0].count) == 0 and int(reset.mini_step) == 0
    assert int(opt.step[...]) == old_step


def test_update_with_an_optimizer_of_some_params_restarts_those():
    model, opt = nnx_trained(optax.adam(1e-3), wrt=nnx.All(nnx.Param, nnx.PathContains("head")))
    old = pure(opt.opt_state)[0]
    ff.update(model, optimizer=opt)  # body and head projected; the optimizer knows only head
    adam = pure(opt.opt_state)[0]
    assert set(adam.mu) == {"head"}
    assert not np.any(adam.mu["head"]["kernel"]) and int(adam.count) == 0
    np.testing.assert_array_equal(adam.mu["head"]["bias"], old.mu["head"]["bias"])


def test_update_that_fails_on_the_optimizer_leaves_model_and_optimizer_as_they_were():
    tx = optax.chain(optax.adam(1e-3), transformation(lambda p: OddState(jnp.zeros([], jnp.int32), jnp.ones((5, 3)))))
    model, opt = nnx_trained(tx)
    params, state = pure(nnx.state(model, nnx.Param)), pure(opt.opt_state)
    with pytest.raises(ValueError, match=r"sketch"):
        ff.update(model, optimizer=opt)
    for a, b in zip(
        jax.tree_util.tree_leaves(pure(nnx.state(model, nnx.Param))), jax.tree_util.tree_leaves(params), strict=True
    ):
        assert np.array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(pure(opt.opt_state)), jax.tree_util.tree_leaves(state), strict=True):
        assert np.array_equal(a, b)


def test_update_with_something_else_as_optimizer_is_a_type_error():
    model, _ = nnx_trained(optax.adam(1e-3), steps=0)
    with pytest.raises(TypeError, match="nnx.Optimizer"):
        ff.update(model, optimizer=optax.adam(1e-3))
