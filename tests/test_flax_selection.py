"""fire_core.flax selection: patterns users type, nothing skipped in silence, frozen leaves."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import fire_core  # noqa: E402
import fire_core.flax as ff  # noqa: E402

pytestmark = pytest.mark.usefixtures("x64")


def random_like(tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=jnp.shape(a))), tree)


class Net(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, 16)(tokens)
        x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, out_features=16)(x)
        x = nn.LayerNorm()(x)
        x = nn.Dense(8)(x)
        return nn.Dense(4)(x) + self.param("offset", nn.initializers.zeros, (5, 4))


def at(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def net_params():
    shapes = jax.eval_shape(Net().init, jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))
    return random_like(shapes["params"])


ATT = "MultiHeadDotProductAttention_0"
KERNELS = {f"{ATT}/{m}/kernel" for m in ("query", "key", "value", "out")} | {"Dense_0/kernel", "Dense_1/kernel"}


# --- patterns users type -----------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["include", "exclude"])
def test_a_pattern_matching_nothing_is_an_error_with_the_closest_paths(what):
    with pytest.raises(ValueError, match=rf"{what} pattern 'Dense_9' matches no kernel.*closest: Dense_"):
        ff.apply(net_params(), **{what: "Dense_9"})


def test_an_exclude_pattern_matching_only_a_bias_is_an_error():
    # biases are never projected: excluding one is a misunderstanding, not a no-op
    with pytest.raises(ValueError, match="exclude pattern 'Dense_0/bias'"):
        ff.apply(net_params(), exclude="Dense_0/bias")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(include=3), TypeError),
        (dict(exclude=[1]), TypeError),
        (dict(include={"Dense_0": True}), TypeError),
        (dict(layouts=["io"]), TypeError),
        (dict(layouts={"Dense_0": 2}), TypeError),
        (dict(stacked=["Dense_0"]), TypeError),
        (dict(stacked={"Dense_0": "1"}), TypeError),
        (dict(stacked={"Dense_0": 0}), ValueError),
        (dict(model="net"), TypeError),
    ],
)
def test_arguments_of_the_wrong_type(kwargs, error):
    with pytest.raises(error):
        ff.apply(net_params(), **kwargs)


@pytest.mark.parametrize("option", ["layouts", "stacked"])
def test_layouts_and_stacked_patterns_matching_nothing_are_errors(option):
    value = {"Dens_1": "io"} if option == "layouts" else {"Dens_1": 1}
    with pytest.raises(ValueError, match=rf"{option} pattern 'Dens_1' matches no kernel; closest: Dense_1"):
        ff.select(net_params(), **{option: value})


def test_brackets_in_a_pattern_still_select_modules_by_class():
    assert set(ff.select(net_params(), include="Dense_[01]")) == {"Dense_0/kernel", "Dense_1/kernel"}


def test_a_pattern_selects_a_kernel_by_its_module_path_or_full_path():
    params = net_params()
    assert set(ff.select(params, include=[f"{ATT}/out", "Dense_1/kernel"])) == {f"{ATT}/out/kernel", "Dense_1/kernel"}


# --- nothing skipped in silence ------------------------------------------------------------------------------


def test_report_lists_every_floating_parameter_of_two_or_more_axes_left_alone():
    params = net_params()
    new = ff.apply(params, exclude="Dense_1", layouts={f"{ATT}/value": None})
    rep = ff.report(params, new, exclude="Dense_1", layouts={f"{ATT}/value": None})
    reasons = {s["name"]: s["reason"] for s in rep.skipped}
    assert reasons == {
        "Embed_0/embedding": "an embedding",
        f"{ATT}/query/bias": "a bias",  # (heads, head_dim)
        f"{ATT}/key/bias": "a bias",
        f"{ATT}/value/bias": "a bias",
        f"{ATT}/value/kernel": f"layouts pattern '{ATT}/value' maps it to None",
        "Dense_1/kernel": "excluded by exclude=",
        "offset": "not a kernel (layouts= adds it)",
    }
    # every floating leaf of >= 2 axes is either a row or listed
    leaves = {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}
    big = {name for name, x in leaves.items() if x.ndim >= 2}
    assert big == set(rep.names) | set(reasons)
    assert "left alone (an embedding): Embed_0/embedding (11x16)" in str(rep)


def test_not_matched_by_include_is_listed():
    params = net_params()
    rep = ff.report(params, ff.apply(params, include="Dense_0"), include="Dense_0")
    assert {s["name"] for s in rep.skipped if s["reason"] == "not matched by include="} == KERNELS - {"Dense_0/kernel"}


def test_a_call_that_selects_nothing_is_an_error():
    params = net_params()
    with pytest.raises(ValueError, match="no weight selected"):
        ff.apply(params, exclude=sorted(KERNELS))
    with pytest.raises(ValueError, match="no weight selected"):
        ff.apply({"Embed_0": {"embedding": jnp.ones((4, 3))}})


def test_an_empty_kernel_is_skipped_and_the_rest_projected():
    params = {"Dense_0": {"kernel": jnp.ones((4, 0))}, "Dense_1": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)))}}
    new = ff.apply(params)
    assert new["Dense_0"]["kernel"] is params["Dense_0"]["kernel"]
    np.testing.assert_allclose(new["Dense_1"]["kernel"], fire_core.reinit(params["Dense_1"]["kernel"], "io"), rtol=1e-12)
    rep = ff.report(params, new)
    assert rep.skipped == [{"name": "Dense_0/kernel", "shape": (4, 0), "reason": "empty"}]


def test_a_layouts_pattern_adds_a_parameter_the_rules_skip():
    params = net_params()
    new = ff.apply(params, layouts={"offset": "io"}, include="offset")
    np.testing.assert_allclose(new["offset"], fire_core.reinit(params["offset"], "io"), rtol=1e-12)


# --- frozen leaves -----------------------------------------------------------------------------------------


FROZEN = "frozen: trainable= marks it not trained (leave trainable= out to project it)"


def test_an_optax_mask_leaves_the_frozen_kernels_alone():
    params = net_params()
    mask = jax.tree_util.tree_map_with_path(lambda path, _: not str(path[0].key).startswith(ATT), params)
    optax.masked(optax.adam(1e-3), mask).init(params)  # the mask the optimizer trains with
    new = ff.apply(params, trainable=mask)
    for name in KERNELS:
        changed = not np.array_equal(at(new, name), at(params, name))
        assert changed == (not name.startswith(ATT)), name
    rep = ff.report(params, new, trainable=mask)
    assert {s["name"] for s in rep.skipped if s["reason"] == FROZEN} == {n for n in KERNELS if n.startswith(ATT)}
    assert set(rep.names) == {"Dense_0/kernel", "Dense_1/kernel"}


def test_multi_transform_labels_and_a_prefix_mask():
    params = net_params()
    labels = {k: ("frozen" if k == ATT else "train") for k in params}  # a prefix of the parameter tree
    optax.multi_transform({"train": optax.adam(1e-3), "frozen": optax.set_to_zero()}, labels).init(params)
    trainable = jax.tree_util.tree_map(lambda label: label != "frozen", labels)
    assert set(ff.select(params, trainable=trainable)) == {"Dense_0/kernel", "Dense_1/kernel"}
    # a function of the parameters, as optax.masked also takes
    assert set(ff.select(params, trainable=lambda p: trainable)) == {"Dense_0/kernel", "Dense_1/kernel"}


def test_a_mask_that_does_not_fit_the_tree_is_an_error():
    with pytest.raises(ValueError, match="trainable="):
        ff.select(net_params(), trainable={"nothing": True})


class LoraNet(nnx.Module):
    def __init__(self, rngs):
        self.base = nnx.LoRALinear(6, 5, lora_rank=2, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)


def test_an_nnx_filter_or_optimizer_marks_the_trained_leaves():
    model = LoraNet(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)  # only the adapters train
    for trainable in (nnx.LoRAParam, opt):
        with pytest.raises(ValueError, match="no weight selected.*frozen"):  # no kernel is a LoRAParam
            ff.select(state, trainable=trainable, model=model)
    assert set(ff.select(state, trainable=nnx.Param, model=model)) == {"base/kernel", "head/kernel"}
    assert set(ff.select(state, trainable=nnx.PathContains("head"), model=model)) == {"head/kernel"}


def test_update_leaves_what_its_optimizer_does_not_train_alone():
    model = LoraNet(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Any(nnx.LoRAParam, nnx.PathContains("head")))
    base = np.asarray(model.base.kernel[...])
    rep = ff.update(model, optimizer=opt)
    assert np.array_equal(model.base.kernel[...], base)
    assert rep.names == ["head/kernel"]
    assert {s["name"]: s["reason"] for s in rep.skipped}["base/kernel"] == FROZEN
    ff.update(model, optimizer=opt, trainable=nnx.Param)  # the option that includes them
    assert not np.array_equal(model.base.kernel[...], base)


def test_an_nnx_filter_on_a_linen_tree_is_a_type_error():
    with pytest.raises(TypeError, match="nnx filter"):
        ff.select(net_params(), trainable=nnx.Param)
