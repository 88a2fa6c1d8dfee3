"""fire_core.equinox: Equinox models through FIRE, against independent computations.

Each projected weight is compared with ``fire_core.reinit`` of that weight in
the layout its module type gives (per gate block for the RNN cells, per member
for a stacked ensemble), and with ``method="svd"`` with the SVD polar factor
``U V^T`` from ``numpy.linalg.svd`` times the FIRE scale. The layouts
themselves are checked against what the layers compute (a ConvTranspose's
output against ``jax.lax.conv_transpose``), not against Equinox's docs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

eqx = pytest.importorskip("equinox")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import fire_core  # noqa: E402
import fire_core.equinox as fe  # noqa: E402

x64 = pytest.mark.usefixtures("x64")  # conftest's: float64 JAX (Equinox then makes float64 layers)


@pytest.fixture(autouse=True)
def _float32_by_default():
    """JAX's default float32 unless a test asks for x64: another file in this worker may have left x64 on."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", old)


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def arrays(model):
    return jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))


def polar_np(w):
    """``U V^T`` of each trailing matrix, by numpy's SVD."""
    u, _, vh = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    return u @ vh


def reinit(w, layout, **kwargs):
    """The core's FIRE of one weight, computed on NumPy (independent of the JAX path under test)."""
    return fire_core.reinit(np.asarray(w), layout, **kwargs)


def close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# --- each layer type against the core ------------------------------------------------------------------


@x64
def test_linear_weights_are_core_reinit_oi():
    mlp = eqx.nn.MLP(6, 3, 10, 2, key=keys(1)[0])
    new = fe.apply(mlp, steps=5)
    for old_layer, new_layer in zip(mlp.layers, new.layers):
        assert old_layer.weight.shape == (old_layer.out_features, old_layer.in_features)
        close(new_layer.weight, reinit(old_layer.weight, "oi", steps=5))
        assert new_layer.bias is old_layer.bias  # left alone, the input's own array
    assert new.activation is mlp.activation


@x64
@pytest.mark.parametrize("cls, layout, size", [
    (eqx.nn.Conv1d, "oiw", (9,)), (eqx.nn.Conv2d, "oihw", (7, 7)), (eqx.nn.Conv3d, "oidhw", (5, 5, 5)),
])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_weights_are_core_reinit_per_tap(cls, layout, size, groups):
    conv = cls(4, 6, 3, groups=groups, key=keys(1)[0])
    assert conv.weight.shape == (6, 4 // groups, *(3,) * len(size))  # (out, in/groups, *taps)
    new = fe.apply(conv, steps=10)
    close(new.weight, reinit(conv.weight, layout, steps=10))
    assert new.bias is conv.bias


@x64
def test_conv_transpose_weight_is_out_in_taps():
    """Equinox 0.13 stores a ConvTranspose's weight (out, in/groups, *taps), like Conv: its docs' FAQ swaps axes
    0 and 1 of a Conv's weight to make a ConvTranspose's. Checked by what the layer computes."""
    ct = eqx.nn.ConvTranspose2d(3, 5, (3, 2), use_bias=False, key=keys(1)[0])
    assert ct.weight.shape == (5, 3, 3, 2)
    x = jax.random.normal(keys(2)[1], (3, 6, 6))
    # the transposed convolution as JAX defines it, with the kernel read as OIHW (out first)
    want = jax.lax.conv_transpose(x[None], ct.weight, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))[0]
    close(ct(x), want)
    # one tap on its own: an impulse of channel vector c comes out as W[:, :, tap] @ c, an (out x in) matrix
    w = jnp.zeros_like(ct.weight).at[:, :, 2, 1].set(jax.random.normal(keys(3)[2], (5, 3)))
    c = jnp.array([1.0, -2.0, 0.5])
    y = eqx.tree_at(lambda m: m.weight, ct, w)(jnp.zeros((3, 4, 4)).at[:, 1, 1].set(c))
    (p, q), = np.argwhere(np.abs(np.asarray(y)).sum(0) > 0)
    close(y[:, p, q], w[:, :, 2, 1] @ c)


@x64
@pytest.mark.parametrize("cls, layout, size", [
    (eqx.nn.ConvTranspose1d, "oiw", 1), (eqx.nn.ConvTranspose2d, "oihw", 2), (eqx.nn.ConvTranspose3d, "oidhw", 3),
])
def test_conv_transpose_weights_are_core_reinit_per_tap(cls, layout, size):
    ct = cls(4, 7, 3, key=keys(1)[0])
    assert fe.select(ct) == {"weight": layout}
    new = fe.apply(ct, steps=10)
    close(new.weight, reinit(ct.weight, layout, steps=10))


@x64
def test_multihead_attention_projects_its_four_linears():
    attn = eqx.nn.MultiheadAttention(4, 16, key_size=12, value_size=10, output_size=8, key=keys(1)[0])
    new = fe.apply(attn, steps=5)
    names = ("query_proj", "key_proj", "value_proj", "output_proj")
    assert fe.select(attn) == {f"{n}.weight": "oi" for n in names}
    for n in names:
        old_w, new_w = getattr(attn, n).weight, getattr(new, n).weight
        close(new_w, reinit(old_w, "oi", steps=5))


@x64
@pytest.mark.parametrize("cls, gates", [(eqx.nn.GRUCell, "rzn"), (eqx.nn.LSTMCell, "ifgo")])
def test_rnn_cells_are_projected_per_gate_block(cls, gates):
    cell = cls(7, 5, key=keys(1)[0])
    new = fe.apply(cell, steps=5)
    assert list(fe.select(cell)) == [f"{w}[{g}]" for w in ("weight_ih", "weight_hh") for g in gates]
    for field, d_in in (("weight_ih", 7), ("weight_hh", 5)):
        old_w, new_w = getattr(cell, field), getattr(new, field)
        assert new_w.shape == old_w.shape == (len(gates) * 5, d_in)
        for k in range(len(gates)):
            block = slice(5 * k, 5 * (k + 1))  # the cell's jnp.split order
            close(new_w[block], reinit(old_w[block], "oi", steps=5))
        # not the whole stacked matrix projected at once
        assert not np.allclose(new_w, reinit(old_w, "oi", steps=5), atol=1e-3)


# --- the exact polar factor --------------------------------------------------------------------------------


class Everything(eqx.Module):
    conv: eqx.nn.Conv2d
    up: eqx.nn.ConvTranspose2d
    mlp: eqx.nn.MLP
    attn: eqx.nn.MultiheadAttention
    gru: eqx.nn.GRUCell
    ens: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 7)
        self.conv = eqx.nn.Conv2d(3, 8, 3, key=k[0])
        self.up = eqx.nn.ConvTranspose2d(8, 4, 2, key=k[1])
        self.mlp = eqx.nn.MLP(12, 5, 20, 2, key=k[2])
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=k[3])
        self.gru = eqx.nn.GRUCell(6, 4, key=k[4])
        self.ens = eqx.filter_vmap(lambda kk: eqx.nn.Linear(6, 9, key=kk))(jax.random.split(k[5], 3))


@x64
def test_svd_gives_the_polar_factor_times_the_scale_for_every_matrix():
    model = Everything(keys(1)[0])
    new = fe.apply(model, method="svd", stacked={"ens": 1})
    matrices = 0

    def check(old, got, d_out, d_in, taps=1):
        nonlocal matrices
        close(got, polar_np(old) * math.sqrt(d_out / d_in) / taps)
        matrices += 1

    check(model.conv.weight[:, :, 1, 2], new.conv.weight[:, :, 1, 2], 8, 3, 9)
    check(model.up.weight[:, :, 0, 1], new.up.weight[:, :, 0, 1], 4, 8, 4)  # (out, in) per tap
    for a, b in zip(model.mlp.layers, new.mlp.layers):
        check(a.weight, b.weight, *a.weight.shape)
    for n in ("query_proj", "key_proj", "value_proj", "output_proj"):
        check(getattr(model.attn, n).weight, getattr(new.attn, n).weight, 8, 8)
    for k in range(3):
        rows = slice(4 * k, 4 * (k + 1))
        check(model.gru.weight_ih[rows], new.gru.weight_ih[rows], 4, 6)
        check(model.gru.weight_hh[rows], new.gru.weight_hh[rows], 4, 4)
    for e in range(3):
        check(model.ens.weight[e], new.ens.weight[e], 9, 6)
    assert matrices == 2 + 3 + 4 + 6 + 3


# --- what is left alone, and why ---------------------------------------------------------------------------


class Custom(eqx.Module):
    kernel: jax.Array

    def __init__(self, key):
        self.kernel = jax.random.normal(key, (5, 4))


class Mixed(eqx.Module):
    emb: eqx.nn.Embedding
    norm: eqx.nn.LayerNorm
    conv: eqx.nn.Conv2d
    wn: eqx.nn.WeightNorm
    custom: Custom
    head: eqx.nn.Linear
    steps: jax.Array

    def __init__(self, key):
        k = jax.random.split(key, 5)
        self.emb = eqx.nn.Embedding(11, 6, key=k[0])
        self.norm = eqx.nn.LayerNorm((3, 6))
        self.conv = eqx.nn.Conv2d(2, 3, 3, key=k[1])
        self.wn = eqx.nn.WeightNorm(eqx.nn.Linear(6, 6, key=k[2]))
        self.custom = Custom(k[3])
        self.head = eqx.nn.Linear(6, 2, key=k[4])
        self.steps = jnp.zeros((2, 2), dtype=jnp.int32)


def test_every_floating_array_left_alone_is_reported_with_its_reason():
    model = Mixed(keys(1)[0])
    new = fe.apply(model)
    rep = fe.report(model, new)
    assert rep.names == ["conv.weight", "head.weight"]
    reasons = {s["name"]: s["reason"] for s in rep.skipped}
    assert reasons["emb.weight"] == "an embedding (a lookup table)"
    assert reasons["norm.weight"] == "a normalization scale" and reasons["norm.bias"] == "a normalization shift"
    assert reasons["conv.bias"] == "a bias"  # (3, 1, 1): three axes, still a bias
    assert "WeightNorm" in reasons["wn.layer.weight"]
    assert reasons["custom.kernel"] == "no rule for Custom.kernel (layouts= projects it)"
    assert "steps" not in reasons  # integer
    floating = {n for n, a in zip(_names(model), arrays(model)) if a.ndim >= 2 and jnp.issubdtype(a.dtype, jnp.floating)}
    assert floating == set(rep.names) | set(reasons)  # nothing silent
    for name in reasons:
        assert _get(new, name) is _get(model, name)


def _names(model):
    return [".".join(fe._key_name(k) for k in path) for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]
            if eqx.is_array(leaf)]


def _get(model, name):
    return dict(zip(_names(model), arrays(model)))[name]


@x64
def test_layouts_projects_an_array_no_rule_knows_and_none_leaves_one_alone():
    model = Mixed(keys(1)[0])
    new = fe.apply(model, layouts={"custom.kernel": "io", "head": None})
    close(new.custom.kernel, reinit(model.custom.kernel, "io"))
    assert new.head.weight is model.head.weight
    rep = fe.report(model, new, layouts={"custom.kernel": "io", "head": None})
    assert rep.names == ["conv.weight", "custom.kernel"]
    assert {s["name"]: s["reason"] for s in rep.skipped}["head.weight"] == "layouts pattern 'head' maps it to None"


def test_include_and_exclude_match_names_and_module_prefixes():
    model = Everything(keys(1)[0])
    assert list(fe.select(model, include=["mlp"])) == [f"mlp.layers.{k}.weight" for k in range(3)]
    assert list(fe.select(model, include=["mlp.layers.1*", "conv"])) == ["conv.weight", "mlp.layers.1.weight"]
    chosen = fe.select(model, exclude=["attn", "gru", "ens"])
    assert list(chosen) == ["conv.weight", "up.weight"] + [f"mlp.layers.{k}.weight" for k in range(3)]
    chosen = fe.select(model, include=lambda name, a: a.ndim == 4)
    assert list(chosen) == ["conv.weight", "up.weight"]


# --- stacked models -------------------------------------------------------------------------------------


def ensemble(n=3, seed=0):
    return eqx.filter_vmap(lambda k: eqx.nn.MLP(4, 2, 8, 2, key=k))(keys(n, seed))


def test_a_vmapped_ensemble_is_refused_without_stacked_naming_each_weight_and_the_fix():
    model = ensemble()
    before = [np.asarray(a) for a in arrays(model)]
    with pytest.raises(ValueError) as info:
        fe.apply(model)
    message = str(info.value)
    assert "nothing was changed" in message
    for k in range(3):
        assert f"layers.{k}.weight" in message
    assert "stacked={'layers.0': 1}" in message and "stacked=1" in message and "'Loi'" in message
    for a, b in zip(arrays(model), before):
        np.testing.assert_array_equal(a, b)


@x64
@pytest.mark.parametrize("stacked", [1, {"layers": 1}, {"*": 1}])
def test_a_vmapped_ensemble_is_projected_member_by_member(stacked):
    model = ensemble()
    assert all(v == "Loi" for v in fe.select(model, stacked=stacked).values())
    new = fe.apply(model, steps=5, stacked=stacked)
    for old_layer, new_layer in zip(model.layers, new.layers):
        assert old_layer.weight.shape[0] == 3
        for e in range(3):  # each member scaled and projected on its own
            close(new_layer.weight[e], reinit(old_layer.weight[e], "oi", steps=5))
        assert new_layer.bias is old_layer.bias
    member = jax.tree_util.tree_map(lambda a: a[1] if eqx.is_array(a) else a, model)
    close(fe.apply(member, steps=5).layers[1].weight, new.layers[1].weight[1])
    mapped = eqx.filter_vmap(fe.apply)(model)  # apply per member: each sees its own unstacked weights
    for a, b in zip(arrays(mapped), arrays(new)):
        close(a, b)


@x64
def test_a_vmapped_gru_cell_is_projected_per_member_and_gate():
    cells = eqx.filter_vmap(lambda k: eqx.nn.GRUCell(6, 4, key=k))(keys(2))
    assert fe.select(cells, stacked=1)["weight_hh[n]"] == "Loi"
    new = fe.apply(cells, stacked=1)
    for e in range(2):
        for k in range(3):
            rows = slice(4 * k, 4 * (k + 1))
            close(new.weight_ih[e, rows], reinit(cells.weight_ih[e, rows], "oi"))
            close(new.weight_hh[e, rows], reinit(cells.weight_hh[e, rows], "oi"))


def test_stacked_must_leave_the_shape_the_module_declares():
    with pytest.raises(ValueError, match=r"layers.0.weight \(3, 8, 4\): stacked pattern '\*' gives 2 .*declares \(8, 4\)"):
        fe.apply(ensemble(), stacked=2)
    with pytest.raises(ValueError, match=r"stacked pattern 'layers.0' gives 1 .*declares \(8, 4\)"):
        fe.apply(eqx.nn.MLP(4, 2, 8, 2, key=keys(1)[0]), stacked={"layers.0": 1})


@x64
def test_a_scanned_layer_stack_is_projected_layer_by_layer_and_still_scans():
    class Block(eqx.Module):
        lin: eqx.nn.Linear

        def __call__(self, x):
            return jnp.tanh(self.lin(x))

    class Deep(eqx.Module):
        blocks: Block  # 4 layers on a leading axis, run by lax.scan

        def __call__(self, x):
            params, static = eqx.partition(self.blocks, eqx.is_array)

            def step(h, p):
                return eqx.combine(p, static)(h), None

            return jax.lax.scan(step, x, params)[0]

    model = Deep(eqx.filter_vmap(lambda k: Block(eqx.nn.Linear(8, 8, key=k)))(keys(4)))
    with pytest.raises(ValueError, match="stacked={'blocks.lin': 1}"):
        fe.apply(model)
    new = fe.apply(model, stacked={"blocks": 1})
    for layer in range(4):
        close(new.blocks.lin.weight[layer], reinit(model.blocks.lin.weight[layer], "oi"))
    assert new(jnp.ones(8)).shape == (8,)


# --- a whole model with its optimizer ----------------------------------------------------------------------


class Model(eqx.Module):
    """Conv2d, an MLP, MultiheadAttention and a vmapped ensemble of heads."""

    conv: eqx.nn.Conv2d
    mlp: eqx.nn.MLP
    attn: eqx.nn.MultiheadAttention
    heads: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k[0])
        self.mlp = eqx.nn.MLP(4 * 16, 16, 32, 1, key=k[1])
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=k[2])
        self.heads = eqx.filter_vmap(lambda kk: eqx.nn.Linear(16, 1, key=kk))(jax.random.split(k[3], 3))
        self.norm = eqx.nn.LayerNorm(16)

    def __call__(self, x):  # x: (1, 4, 4)
        h = self.norm(self.mlp(jax.nn.relu(self.conv(x)).reshape(-1)))
        h = self.attn(h.reshape(2, 8), h.reshape(2, 8), h.reshape(2, 8)).reshape(-1)
        return jnp.mean(eqx.filter_vmap(lambda head: head(h))(self.heads))


STACKED = {"heads": 1}
PROJECTED = ["conv.weight", "mlp.layers.0.weight", "mlp.layers.1.weight", "attn.query_proj.weight",
             "attn.key_proj.weight", "attn.value_proj.weight", "attn.output_proj.weight", "heads.weight"]


def _task(seed):
    xs = jax.random.normal(keys(1, seed)[0], (32, 1, 4, 4))
    ys = jnp.sin(xs.sum(axis=(1, 2, 3)) + seed)
    return xs, ys


def _loss(model, xs, ys):
    return jnp.mean((jax.vmap(model)(xs) - ys) ** 2)


def _train(model, opt_state, tx, xs, ys, n):
    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(_loss)(model, xs, ys)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(n):
        model, opt_state, loss = step(model, opt_state)
        losses.append(float(loss))
    return model, opt_state, losses


def _by_name(tree):
    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(fe._key_name(k) for k in path): leaf for path, leaf in pairs}


def test_a_model_goes_through_fire_with_adam_and_trains_on():
    model = Model(keys(1)[0])
    tx = optax.adam(1e-2)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    model, opt_state, _ = _train(model, opt_state, tx, *_task(0), 20)

    new = fe.apply(model, steps=10, stacked=STACKED)
    rep = fe.report(model, new, stacked=STACKED, steps=10)
    assert rep.names == PROJECTED
    reset = fe.reset_opt_state(opt_state, model, new, tx=tx)

    fresh = tx.init(eqx.filter(new, eqx.is_array))
    for old_m, got_m, fresh_m in ((opt_state[0].mu, reset[0].mu, fresh[0].mu), (opt_state[0].nu, reset[0].nu, fresh[0].nu)):
        old_m, got_m, fresh_m = _by_name(old_m), _by_name(got_m), _by_name(fresh_m)
        assert set(got_m) == set(old_m)
        for name in got_m:
            if name in PROJECTED:  # the slots of exactly the projected leaves are fresh
                np.testing.assert_array_equal(got_m[name], fresh_m[name])
                assert np.any(np.asarray(old_m[name]) != 0)
            else:
                assert got_m[name] is old_m[name]
    assert int(reset[0].count) == 0 and int(opt_state[0].count) == 20

    xs, ys = _task(1)
    _, _, losses = _train(new, reset, tx, xs, ys, 15)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_reset_opt_state_works_under_jit_and_keeps_other_leaves():
    model = Model(keys(1)[0])
    tx = optax.sgd(1e-2, momentum=0.9)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    model, opt_state, _ = _train(model, opt_state, tx, *_task(0), 3)
    new = fe.apply(model, stacked=STACKED, include=["mlp"])
    eager = fe.reset_opt_state(opt_state, model, new)
    jitted = eqx.filter_jit(fe.reset_opt_state)(opt_state, model, new)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(a, b)
    trace = _by_name(eager[0].trace)
    assert not np.any(trace["mlp.layers.0.weight"]) and np.any(trace["conv.weight"])


# --- jit, dtypes, bad input ----------------------------------------------------------------------------------


def test_jit_gives_the_eager_result():
    model = Everything(keys(1)[0])
    assert model.mlp.layers[0].weight.dtype == jnp.float32
    eager = fe.apply(model, steps=5, stacked={"ens": 1})
    jitted = eqx.filter_jit(fe.apply)(model, steps=5, stacked={"ens": 1})
    for a, b in zip(arrays(eager), arrays(jitted)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(jitted)


def test_bfloat16_weights_stay_bfloat16():
    lin = eqx.nn.Linear(8, 4, dtype=jnp.bfloat16, key=keys(1)[0])
    new = fe.apply(lin)
    assert new.weight.dtype == jnp.bfloat16
    want = reinit(np.asarray(lin.weight, np.float32), "oi")
    np.testing.assert_allclose(np.asarray(new.weight, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


def test_a_nan_weight_is_an_error_naming_it_with_nothing_changed():
    model = Everything(keys(1)[0])
    bad = eqx.tree_at(lambda m: m.mlp.layers[1].weight, model, model.mlp.layers[1].weight.at[2, 3].set(jnp.nan))
    before = [np.asarray(a) for a in arrays(bad)]
    with pytest.raises(ValueError, match=r"mlp\.layers\.1\.weight"):
        fe.apply(bad, stacked={"ens": 1})
    for a, b in zip(arrays(bad), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"include": ["mlp.layer.0"]}, ValueError, r"include pattern 'mlp.layer.0' matches no weight.*closest"),
    ({"exclude": ["nothing_here"]}, ValueError, "exclude pattern 'nothing_here' matches no weight"),
    ({"layouts": {"missing": "oi"}}, ValueError, "layouts pattern 'missing' matches no weight"),
    ({"stacked": {"ensemble": 1}}, ValueError, "stacked pattern 'ensemble' matches no weight"),
    ({"stacked": {"ens": 0}}, ValueError, "at least 1 stack axis"),
    ({"stacked": "ens"}, TypeError, "stacked must be"),
    ({"layouts": {"custom": "ab"}}, ValueError, "layouts pattern 'custom' matches no weight"),
    ({"method": "newton"}, ValueError, "newton"),
    ({"scale": "huge"}, ValueError, "huge"),
    ({"include": ["gru"], "exclude": ["gru"]}, ValueError, "no weight selected"),
])
def test_bad_options_are_clear_errors(kwargs, error, match):
    model = Everything(keys(1)[0])
    kwargs = {"stacked": {"ens": 1}, **kwargs}
    with pytest.raises(error, match=match):
        fe.apply(model, **kwargs)


def test_an_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="optimizer"):
        fe.apply(eqx.nn.Linear(3, 3, key=keys(1)[0]), optimizer=optax.adam(1e-3))


def test_a_layout_that_does_not_fit_is_an_error_naming_the_weight():
    with pytest.raises(ValueError, match="weight.*needs at least one 'o' and one 'i'"):
        fe.apply(eqx.nn.Linear(3, 4, key=keys(1)[0]), layouts={"weight": "ow"})


def test_report_rows_measure_the_change():
    model = Everything(keys(1)[0])
    new = fe.apply(model, method="svd", stacked={"ens": 1})
    rep = fe.report(model, new, stacked={"ens": 1}, method="svd")
    assert rep.names[:3] == ["conv.weight", "up.weight", "mlp.layers.0.weight"]  # the model's order
    assert "gru.weight_ih[z]" in rep.names
    row = rep["mlp.layers.1.weight"]
    want = float(jnp.sum((model.mlp.layers[1].weight - new.mlp.layers[1].weight) ** 2))
    assert row["sfe"] == pytest.approx(want, rel=1e-4)
    assert all(r["dfi_after"] < 1e-4 for r in rep.rows)
    assert rep["ens.weight"]["layout"] == "Loi" and rep["ens.weight"]["stack"] == 3
    with pytest.raises(ValueError, match="different trees"):
        fe.report(model, new.mlp, stacked={"ens": 1})
