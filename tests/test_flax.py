"""fire_core.flax: Flax/JAX parameter trees through the core, checked against a plain loop."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from flax.core import FrozenDict  # noqa: E402

import fire_core  # noqa: E402
import fire_core.flax as ff  # noqa: E402
from fire_core.plan import reinit_many  # noqa: E402


pytestmark = pytest.mark.usefixtures("x64")  # conftest's: float64 JAX for every test here


# --- an independent reference: one matrix at a time, in numpy --------------------------------------


def ns_loop(m, steps):
    """The reference's cubic Newton–Schulz on one d_out x d_in matrix."""
    tall = m.shape[0] >= m.shape[1]
    x = m if tall else m.T
    x = x / np.linalg.norm(x)
    for _ in range(steps):
        x = 1.5 * x - 0.5 * x @ (x.T @ x)
    return x if tall else x.T


def fire_loop(w, kind, steps=5):
    """FIRE of one Flax kernel, tap by tap, with the (d_out x d_in) matrix written out per kind."""
    w = np.asarray(w, dtype=np.float64)
    out = np.empty_like(w)
    if kind == "dense":  # (in, out)
        d_in, d_out = w.shape
        out[...] = ns_loop(w.T, steps).T * math.sqrt(d_out / d_in)
    elif kind == "conv":  # (*spatial, in, out), each tap on its own
        d_in, d_out = w.shape[-2:]
        taps = list(np.ndindex(*w.shape[:-2]))
        for t in taps:
            out[t] = ns_loop(w[t].T, steps).T * math.sqrt(d_out / d_in) / len(taps)
    elif kind == "qkv":  # (in, heads, head_dim) -> one (heads*head_dim) x in matrix
        d_in, d_out = w.shape[0], w.shape[1] * w.shape[2]
        out[...] = (ns_loop(w.reshape(d_in, d_out).T, steps).T * math.sqrt(d_out / d_in)).reshape(w.shape)
    elif kind == "attn_out":  # (heads, head_dim, out) -> one out x (heads*head_dim) matrix
        d_in, d_out = w.shape[0] * w.shape[1], w.shape[2]
        out[...] = (ns_loop(w.reshape(d_in, d_out).T, steps).T * math.sqrt(d_out / d_in)).reshape(w.shape)
    else:
        raise AssertionError(kind)
    return out


def to64(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


def leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def assert_close(a, b, tol=1e-12):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


# --- models ------------------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(24)(x))
        x = nn.relu(nn.Dense(40)(x))
        return nn.Dense(5)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=False)(x)
        x = nn.Conv(12, (2,))(x.reshape(x.shape[0], -1, 8))
        x = nn.Conv(4, (2, 2, 2))(x.reshape(x.shape[0], 6, 6, 1, 12))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Embed(11, 16)(x)
        x = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=24, out_features=20)(x)
        return nn.LayerNorm()(x)


@functools.lru_cache(maxsize=None)
def _variables(model, x_shape, x_dtype, seed):
    """A linen model's variables tree with random normal leaves (init's structure, no forward compile)."""
    x = jax.ShapeDtypeStruct(x_shape, x_dtype)
    shapes = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32), x)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def fresh(tree):
    """New containers around the same leaves, so a test may assign into its copy."""
    return jax.tree_util.tree_map(lambda x: x, tree)


def mlp_params():
    return to64(_variables(MLP(), (1, 7), jnp.float32, 0)["params"])


def cnn_variables():
    return fresh(_variables(CNN(), (2, 6, 6, 3), jnp.float32, 1))


def attn_params():
    return to64(_variables(Attn(), (1, 5), jnp.int32, 2)["params"])


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(6, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=6, qkv_features=8, decode=False, rngs=rngs)
        self.head = nnx.Linear(6, 4, rngs=rngs)


def nnx_model():
    """An NnxNet with random float64 parameters, built without running its initializers."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxNet(nnx.Rngs(0))))
    rng = np.random.default_rng(3)
    state = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float64), state)
    return nnx.merge(graphdef, state)


# --- apply: values ------------------------------------------------------------------------------------


def test_linen_mlp_matches_loop():
    params = mlp_params()
    new = ff.apply(params, 5)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        assert_close(new[name]["kernel"], fire_loop(params[name]["kernel"], "dense"))
        assert new[name]["bias"] is params[name]["bias"]


def test_linen_cnn_matches_loop_kernel_wise():
    params = to64(cnn_variables()["params"])
    new = ff.apply(params, 7)
    for name in ("Conv_0", "Conv_1", "Conv_2"):  # 2-D, 1-D and 3-D kernels
        assert_close(new[name]["kernel"], fire_loop(params[name]["kernel"], "conv", 7))
    assert_close(new["Dense_0"]["kernel"], fire_loop(params["Dense_0"]["kernel"], "dense", 7))
    assert new["BatchNorm_0"]["scale"] is params["BatchNorm_0"]["scale"]


def test_attention_kernels_are_one_matrix_each():
    params = attn_params()
    new = ff.apply(params)
    att, new_att = params["MultiHeadDotProductAttention_0"], new["MultiHeadDotProductAttention_0"]
    for part in ("query", "key", "value"):
        assert_close(new_att[part]["kernel"], fire_loop(att[part]["kernel"], "qkv"))
    assert_close(new_att["out"]["kernel"], fire_loop(att["out"]["kernel"], "attn_out"))
    assert new["Embed_0"]["embedding"] is params["Embed_0"]["embedding"]
    assert new["LayerNorm_0"]["scale"] is params["LayerNorm_0"]["scale"]


def test_nnx_state_through_nnx_update_matches_loop():
    model = nnx_model()
    state = to64(nnx.state(model, nnx.Param))
    nnx.update(model, ff.apply(state, model=model))  # the module tells that `conv` is an nnx.Conv
    assert_close(model.conv.kernel[...], fire_loop(state["conv"]["kernel"][...], "conv"))
    assert_close(model.head.kernel[...], fire_loop(state["head"]["kernel"][...], "dense"))
    assert_close(model.attn.query.kernel[...], fire_loop(state["attn"]["query"]["kernel"][...], "qkv"))
    assert_close(model.attn.out.kernel[...], fire_loop(state["attn"]["out"]["kernel"][...], "attn_out"))
    assert np.array_equal(model.norm.scale[...], state["norm"]["scale"][...])


def test_nnx_selection_names_have_no_value_suffix():
    model = nnx_model()
    assert set(ff.select(nnx.state(model), model=model)) == {
        "conv/kernel", "head/kernel", "attn/query/kernel", "attn/key/kernel", "attn/value/kernel", "attn/out/kernel",
    }


def test_nnx_update_module_in_place_with_report():
    model = nnx_model()
    old = np.asarray(model.head.kernel[...])
    rep = ff.update(model, 5)
    assert_close(model.head.kernel[...], fire_loop(old, "dense"))
    assert rep["head/kernel"]["layout"] == "io"
    assert len(rep) == 6


@pytest.mark.parametrize("tree", ["linen", "nnx"])
def test_jit_equals_eager(tree):
    model = None if tree == "linen" else nnx_model()
    params = to64(cnn_variables()["params"]) if tree == "linen" else nnx.state(model)
    eager = ff.apply(params, 5, method="fast", model=model)
    jitted = jax.jit(lambda p: ff.apply(p, 5, method="fast", model=model))(params)
    assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        assert_close(b, a)


def test_eager_apply_compiles_one_program_per_tree_and_equals_the_core_op_by_op():
    """Concrete leaves are checked, then projected by one jax.jit program (cached per tree structure)."""
    params = to64(cnn_variables()["params"])
    chosen = [(name, leaf(params, name), lay) for name, lay in ff.select(params).items()]
    op_by_op = {}
    reinit_many(chosen, write=op_by_op.__setitem__, report=False)  # the core's own eager path
    before = ff._compiled_project._cache_size()
    new = ff.apply(params)
    assert ff._compiled_project._cache_size() == before + 1
    for name in op_by_op:
        assert_close(leaf(new, name), op_by_op[name])
    ff.apply(jax.tree_util.tree_map(lambda x: x + 1, params))  # new values, same structure: no new program
    assert ff._compiled_project._cache_size() == before + 1


def test_a_weight_whose_result_needs_a_host_check_is_projected_op_by_op():
    """One "fast" step can lift entries to 1.77 x scale: near float32's largest value the new entries
    are checked on the host before they are returned, which a compiled program would skip."""
    from fire_core.plan import host_checked

    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
    params = {"Dense_0": {"kernel": kernel}}
    assert host_checked([("k", kernel, "io")], steps=1, method="fast", scale=1.8e38)
    before = ff._compiled_project._cache_size()
    new = ff.apply(params, 1, method="fast", scale=1.8e38)["Dense_0"]["kernel"]
    assert ff._compiled_project._cache_size() == before
    want = {}
    reinit_many([("k", kernel, "io")], steps=1, method="fast", scale=1.8e38, write=want.__setitem__, report=False)
    np.testing.assert_allclose(np.asarray(new), np.asarray(want["k"]), rtol=1e-6)  # float32 rounding, 4 x 4
    assert np.abs(np.asarray(new)).max() > 3e38
    with pytest.raises(ValueError, match="Dense_0/kernel: the new weight is not representable in float32"):
        ff.apply(params, 1, method="fast", scale=2e38)


def test_frozendict_stays_frozendict():
    params = FrozenDict(mlp_params())
    new = ff.apply(params)
    assert isinstance(new, FrozenDict)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)


def test_variables_dict_touches_only_params():
    variables = cnn_variables()
    new = ff.apply(variables)
    assert set(new) == set(variables)
    for a, b in zip(jax.tree_util.tree_leaves(new["batch_stats"]), jax.tree_util.tree_leaves(variables["batch_stats"])):
        assert a is b
    assert_close(new["params"]["Conv_0"]["kernel"], fire_loop(variables["params"]["Conv_0"]["kernel"], "conv"), 1e-5)


def test_variables_dict_leaves_kernels_of_other_collections():
    variables = {"params": mlp_params(), "other": {"Dense_0": {"kernel": jnp.ones((3, 4))}}}
    new = ff.apply(variables)
    assert new["other"]["Dense_0"]["kernel"] is variables["other"]["Dense_0"]["kernel"]
    assert set(ff.select(variables)) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_kept(dtype):
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), mlp_params())
    new = ff.apply(params)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)):
        assert a.dtype == b.dtype and a.shape == b.shape
    ref = fire_loop(np.asarray(params["Dense_1"]["kernel"], np.float64), "dense")
    assert_close(new["Dense_1"]["kernel"], ref, 1e-2)


def test_input_tree_is_not_modified():
    params = mlp_params()
    copy = jax.tree_util.tree_map(np.array, params)
    ff.apply(params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(copy)):
        assert np.array_equal(a, b)


def test_scale_and_method_pass_through():
    params = mlp_params()
    new = ff.apply(params, method="svd", scale=None)
    k = new["Dense_1"]["kernel"]
    assert float(fire_core.dfi(k)) < 1e-20


# --- selection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        ("Dense_1", None, {"Dense_1/kernel"}),
        (["Dense_0", "Dense_2/*"], None, {"Dense_0/kernel", "Dense_2/kernel"}),
        (None, "Dense_[01]", {"Dense_2/kernel"}),
        ("Dense_*", "Dense_1/*", {"Dense_0/kernel", "Dense_2/kernel"}),
        (lambda path, w: path.startswith("Dense_2"), None, {"Dense_2/kernel"}),
        (None, lambda path, w: w.shape != (7, 24), {"Dense_0/kernel"}),
    ],
)
def test_include_exclude(include, exclude, expected):
    params = mlp_params()
    new = ff.apply(params, include=include, exclude=exclude)
    changed = {f"{k}/kernel" for k in params if not np.array_equal(new[k]["kernel"], params[k]["kernel"])}
    assert changed == expected
    assert set(ff.select(params, include=include, exclude=exclude)) == expected


def test_include_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="Dense_9"):
        ff.apply(mlp_params(), include="Dense_9")


def test_layouts_override_default_rule():
    class Proj(nn.Module):  # a DenseGeneral contracting two axes: (heads, head_dim, out)
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(6, axis=(-2, -1), name="proj")(x)

    params = to64(Proj().init(jax.random.PRNGKey(0), jnp.ones((1, 3, 4)))["params"])
    with pytest.raises(ValueError, match=r"proj/kernel \(3, 4, 6\)"):  # by name and shape: a 1-D conv, or this
        ff.select(params)
    new = ff.apply(params, layouts={"proj": "iio"})
    assert_close(new["proj"]["kernel"], fire_loop(params["proj"]["kernel"], "attn_out"))


def test_one_axis_kernel_is_skipped():
    assert ff.select({"odd": {"kernel": jnp.ones((4,))}, "Dense_0": {"kernel": jnp.ones((3, 4))}}) == {
        "Dense_0/kernel": "io"
    }


def test_layouts_none_skips_a_leaf():
    params = mlp_params()
    assert "Dense_0/kernel" not in ff.select(params, layouts={"Dense_0": None})


def test_kernel_without_default_layout_is_an_error_naming_it():
    params = {"odd": {"kernel": jnp.ones((2, 1, 1, 1, 3, 4))}, "Dense_0": {"kernel": jnp.ones((3, 4))}}
    with pytest.raises(ValueError, match="odd/kernel"):
        ff.apply(params)
    assert set(ff.select(params, exclude="odd")) == {"Dense_0/kernel"}


def test_nan_is_an_error_naming_the_leaf():
    params = mlp_params()
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        ff.apply(params)


def test_nan_check_is_skipped_under_jit():
    params = mlp_params()
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[0, 0].set(jnp.inf)
    new = jax.jit(ff.apply)(params)
    assert not np.all(np.isfinite(new["Dense_1"]["kernel"]))
    assert np.all(np.isfinite(new["Dense_0"]["kernel"]))


def test_integer_kernel_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="Dense_0/kernel"):
        ff.apply({"Dense_0": {"kernel": jnp.ones((3, 4), jnp.int32)}})


def test_bad_selection_arguments():
    with pytest.raises(TypeError, match="include"):
        ff.apply(mlp_params(), include=[1])
    with pytest.raises(TypeError, match="layouts"):
        ff.apply(mlp_params(), layouts=["io"])


# --- report ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["fire", "variance", None, 0.5])
def test_report_rows_equal_the_core_report(scale):
    params = to64(cnn_variables()["params"])
    new = ff.apply(params, 5, scale=scale)
    rep = ff.report(params, new, scale=scale)
    core = reinit_many(
        [(name, leaf(params, name), lay) for name, lay in ff.select(params).items()],
        steps=5, scale=scale, write=lambda *_: None,
    )
    assert rep.names == core.names
    for a, b in zip(rep.rows, core.rows):
        assert (a["shape"], a["layout"], a["taps"], a["n"]) == (b["shape"], b["layout"], b["taps"], b["n"])
        for key in ("scale", "sfe", "dfi_before", "dfi_after"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12)


def test_report_dfi_after_is_zero_for_an_exact_projection_under_norm_scale():
    params = mlp_params()
    new = ff.apply(params, method="svd", scale="norm")
    rep = ff.report(params, new, scale="norm")
    for row in rep:
        assert row["dfi_after"] < 1e-20
        before = np.asarray(leaf(params, row["name"]))
        assert row["scale"] == pytest.approx(np.linalg.norm(before) / math.sqrt(row["n"]), rel=1e-12)


def test_report_sfe_is_the_squared_distance():
    params = mlp_params()
    new = ff.apply(params)
    rep = ff.report(params, new)
    d = np.asarray(new["Dense_1"]["kernel"]) - np.asarray(params["Dense_1"]["kernel"])
    assert rep["Dense_1/kernel"]["sfe"] == pytest.approx(np.sum(d * d), rel=1e-12)


def test_report_of_different_trees_is_an_error():
    with pytest.raises(ValueError, match="different trees"):
        ff.report(mlp_params(), {"Dense_0": {"kernel": jnp.ones((7, 24))}})


# --- optimizer state -----------------------------------------------------------------------------------


def adam_after_steps(params, tx, n=5):
    state = tx.init(params)
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.1) + 0.01 * x, params)
    for _ in range(n):
        _, state = tx.update(grads, state, params)
    return state, grads


def test_reset_zeroes_moments_of_exactly_the_projected_leaves():
    params = mlp_params()
    tx = optax.adam(1e-3)
    state, _ = adam_after_steps(params, tx)
    new = ff.apply(params, include="Dense_1")
    reset = ff.reset_opt_state(state, params, new)
    adam = reset[0]
    for moments, old in ((adam.mu, state[0].mu), (adam.nu, state[0].nu)):
        assert not np.any(moments["Dense_1"]["kernel"])
        assert np.array_equal(moments["Dense_1"]["bias"], old["Dense_1"]["bias"])
        assert np.array_equal(moments["Dense_0"]["kernel"], old["Dense_0"]["kernel"])
    assert int(adam.count) == 0 and int(state[0].count) == 5


def test_reset_count_false_keeps_the_count():
    params = mlp_params()
    state, _ = adam_after_steps(params, optax.adam(1e-3))
    reset = ff.reset_opt_state(state, params, ff.apply(params), reset_count=False)
    assert int(reset[0].count) == 5
    assert not np.any(reset[0].mu["Dense_0"]["kernel"])


def test_reset_keeps_schedule_counts():
    params = mlp_params()
    tx = optax.adam(optax.linear_schedule(1e-3, 0.0, 100))
    state, _ = adam_after_steps(params, tx)
    reset = ff.reset_opt_state(state, params, ff.apply(params))
    counts = [v for _, v in optax.tree_utils.tree_get_all_with_path(reset, "count")]
    assert sorted(int(c) for c in counts) == [0, 5]  # Adam's reset, the schedule's kept


def test_reset_with_nothing_changed_keeps_everything():
    params = mlp_params()
    state, _ = adam_after_steps(params, optax.adam(1e-3))
    same = ff.reset_opt_state(state, params, params)
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(state)):
        assert np.array_equal(a, b)


def test_reset_momentum_of_sgd():
    params = mlp_params()
    state, _ = adam_after_steps(params, optax.sgd(0.1, momentum=0.9))
    reset = ff.reset_opt_state(state, params, ff.apply(params, include="Dense_2"))
    traces = optax.tree_utils.tree_get(reset, "trace")
    assert not np.any(traces["Dense_2"]["kernel"]) and np.any(traces["Dense_1"]["kernel"])


@pytest.mark.parametrize("count", [50, 10_000])
def test_reset_with_count_makes_the_next_update_a_fresh_adams(count):
    params = mlp_params()
    tx = optax.adam(1e-3)
    state, grads = adam_after_steps(params, tx, 2)
    state = optax.tree_utils.tree_set(state, count=jnp.asarray(count, jnp.int32))
    new = ff.apply(params)
    fresh, _ = tx.update(grads, tx.init(new), new)
    with_count, _ = tx.update(grads, ff.reset_opt_state(state, params, new), new)
    without, _ = tx.update(grads, ff.reset_opt_state(state, params, new, reset_count=False), new)

    def norm(u):
        return float(jnp.linalg.norm(u["Dense_1"]["kernel"]))

    assert norm(with_count) == pytest.approx(norm(fresh), rel=1e-6)
    # Zeroed moments, old count t: m_hat = (1-b1) g / (1-b1^t), v_hat = (1-b2) g^2 / (1-b2^t);
    # a fresh Adam's first step has m_hat / sqrt(v_hat) = g / |g|.
    b1, b2, t = 0.9, 0.999, count + 1
    expected = (1 - b1) / (1 - b1**t) / math.sqrt((1 - b2) / (1 - b2**t))
    assert norm(without) / norm(fresh) == pytest.approx(expected, rel=1e-3)


def test_reset_opt_state_under_jit_and_for_nnx_state():
    model = nnx_model()
    state = nnx.state(model, nnx.Param)
    tx = optax.adam(1e-3)
    opt, _ = adam_after_steps(state, tx, 3)
    new = ff.apply(state, include="head")
    reset = jax.jit(ff.reset_opt_state)(opt, state, new)
    assert not np.any(reset[0].mu["head"]["kernel"][...])
    assert np.array_equal(reset[0].mu["conv"]["kernel"][...], opt[0].mu["conv"]["kernel"][...])


def test_reset_opt_state_of_an_nnx_optimizer():
    model = nnx_model()
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    grads = jax.tree_util.tree_map(jnp.ones_like, nnx.state(model, nnx.Param))
    opt.update(model, grads)
    before = nnx.state(model, nnx.Param)
    after = ff.apply(before, include="head")
    old_conv = np.asarray(opt.opt_state[0].mu["conv"]["kernel"][...])
    opt.opt_state = ff.reset_opt_state(opt.opt_state, before, after)
    adam = opt.opt_state[0]
    assert not np.any(adam.mu["head"]["kernel"][...]) and not np.any(adam.nu["head"]["kernel"][...])
    assert np.array_equal(adam.mu["conv"]["kernel"][...], old_conv)
    assert int(adam.count[...]) == 0


def test_reset_with_a_mismatched_tree_is_an_error():
    params = mlp_params()
    state, _ = adam_after_steps(params, optax.adam(1e-3))
    other = {"x": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="structure"):
        ff.reset_opt_state(state, other, ff.apply(other))


# --- sharding (4 host devices, in a subprocess) ---------------------------------------------------------

SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import fire_core.flax as ff
    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 4
    rng = np.random.default_rng(0)
    params = {
        "a": {"kernel": rng.normal(size=(64, 32)), "bias": rng.normal(size=(32,))},
        "b": {"kernel": rng.normal(size=(64, 32))},
        "Conv_0": {"kernel": rng.normal(size=(3, 3, 16, 32))},
    }
    specs = {"a": {"kernel": P("x", None), "bias": P("x")}, "b": {"kernel": P(None, "x")},
             "Conv_0": {"kernel": P(None, None, None, "x")}}
    plain = ff.apply(jax.tree.map(jnp.asarray, params), 5)
    for mode in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((4,), ("x",), axis_types=(mode,))
        shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
        ps = jax.device_put(params, shard)
        runs = {"eager": ff.apply(ps, 5)}
        if mode == AxisType.Explicit:  # shardings are types: jit keeps them by itself
            runs["jit"] = jax.jit(ff.apply)(ps)
        else:  # Auto: XLA chooses output shardings unless told
            runs["jit"] = jax.jit(ff.apply, out_shardings=shard)(ps)
        for how, out in runs.items():
            for (path, a), b, c in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(plain),
                                       jax.tree.leaves(ps)):
                assert a.sharding.spec == c.sharding.spec, (mode, how, path, a.sharding, c.sharding)
                assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 1e-12, (mode, how, path)
        rep = ff.report(ps, runs["jit"])
        assert rep.names == ["Conv_0/kernel", "a/kernel", "b/kernel"]
        nan = params["Conv_0"]["kernel"].copy()
        nan[0, 0, 0, 0] = np.nan
        bad = dict(ps, Conv_0={"kernel": jax.device_put(nan, shard["Conv_0"]["kernel"])})
        try:
            ff.apply(bad)
            raise AssertionError("a sharded NaN weight was projected")
        except ValueError as e:
            assert "Conv_0/kernel" in str(e)
    # no per-shard projection: each Gram matrix of the sharded side is all-reduced
    hlo = jax.jit(ff.apply).lower(ps).compile().as_text()
    assert "all-reduce" in hlo and "all-gather" not in hlo, hlo
    print("OK")
    """
)


def test_sharded_params_keep_sharding_and_equal_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def test_benchmark_script_quick_mode(tmp_path):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "flax_apply.py")
    out = tmp_path / "flax.md"
    res = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert "| fire | 5 |" in text and "| 10000 |" in text
