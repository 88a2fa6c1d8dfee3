"""docs/reference.md: the fire_core call for each of the reference's interventions equals that setting's rule.

Each rule is written out here independently, as the reference code's
behaviour is described in the docs (no reference code is copied): a plain
loop over the layers the setting selects, one spatial tap at a time, with
the cubic Newton–Schulz step of ``conftest.reference_newton_schulz``. The
models are float64 so that agreement is to rounding.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import reference_newton_schulz

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import fire_core.torch as ft  # noqa: E402


def fire_matrix(w: np.ndarray, steps: int, eps: float = 0.0) -> np.ndarray:
    """The cubic iteration on one matrix, scaled by sqrt(out/in) (rows are outputs).

    With ``eps`` the start is ``W / (||W||_F + eps)``, as the reference's SAC code starts (the others
    divide by the norm alone: ``conftest.reference_newton_schulz``).
    """
    scale = math.sqrt(w.shape[0] / w.shape[1])
    if not eps:
        return reference_newton_schulz(w, steps) * scale
    x = w.T if w.shape[1] > w.shape[0] else w
    x = x / (np.sqrt(np.sum(x * x)) + eps)
    for _ in range(steps):
        x = 1.5 * x - 0.5 * (x @ (x.T @ x))
    return (x.T if w.shape[1] > w.shape[0] else x) * scale


def fire_torch_weight(w: np.ndarray, steps: int) -> np.ndarray:
    """A torch Linear (out, in) or Conv2d (out, in, kh, kw) weight, tap by tap, divided by the taps."""
    if w.ndim == 2:
        return fire_matrix(w, steps)
    out = np.empty_like(w)
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            out[:, :, i, j] = fire_matrix(w[:, :, i, j], steps)
    return out / (w.shape[2] * w.shape[3])


DOC = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def doc_recipe(heading: str, **replace) -> dict:
    """Run the python blocks of docs/reference.md's ``### `` section whose title starts with ``heading``.

    Returns the namespace they leave; ``replace`` maps text in the blocks to what it is replaced with first
    (to run a recipe with another setting).
    """
    sections = re.split(r"^### ", DOC.read_text(), flags=re.M)
    section = next(sec for sec in sections if sec.startswith(heading))
    code = "".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))
    for old, new in replace.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, f"docs/reference.md ### {heading}", "exec"), namespace)
    return namespace


def weights(model) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def assert_weights(model, want: dict[str, np.ndarray]) -> None:
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), want[name], rtol=0, atol=1e-12, err_msg=name)


# --- vision: every Linear and Conv2d, heads included, 10 steps, a fresh optimizer -----------------


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc, self.head = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x))))).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))


def test_vision_setting_projects_every_linear_and_conv2d_at_10_steps_with_a_fresh_optimizer():
    torch.manual_seed(0)
    model = SmallCNN().double()
    old = weights(model)
    want = {n: (fire_torch_weight(w, 10) if n.endswith("weight") and w.ndim in (2, 4) else w) for n, w in old.items()}

    report = ft.apply(model, steps=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # the reference builds a new one each task

    assert_weights(model, want)
    assert report.names == ["conv1.weight", "conv2.weight", "fc.weight", "head.weight"]
    assert not optimizer.state


# --- ViT: only to_q and to_k ----------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.to_out = nn.Linear(d, d)


class TinyViT(nn.Module):
    def __init__(self, d=12, depth=2):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(attn=Attention(d), ff=nn.Linear(d, 2 * d))) for _ in range(depth))
        self.head = nn.Linear(d, 5)


def test_vit_setting_projects_only_to_q_and_to_k():
    torch.manual_seed(1)
    model = TinyViT().double()
    old = weights(model)
    picked = {n for n in old if n.split(".")[-2] in ("to_q", "to_k")}
    want = {n: (fire_torch_weight(w, 10) if n in picked else w) for n, w in old.items()}

    ft.apply(model, steps=10, include=["*.to_q", "*.to_k"])

    assert_weights(model, want)


# --- language (nanoGPT): c_attn as q, k, v; 5 steps; AdamW state cleared; schedule restarted ----------


class GPTBlock(nn.Module):
    def __init__(self, e):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(e, 3 * e, bias=False), nn.Linear(e, e, bias=False)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(e, 4 * e, bias=False), nn.Linear(4 * e, e, bias=False)


class NanoGPT(nn.Module):
    def __init__(self, e=16, vocab=40, layers=2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, e), wpe=nn.Embedding(8, e),
            h=nn.ModuleList(GPTBlock(e) for _ in range(layers)), ln_f=nn.LayerNorm(e),
        ))
        self.lm_head = nn.Linear(e, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does


def language_rule(old: dict[str, np.ndarray], e: int, steps: int) -> dict[str, np.ndarray]:
    """Every Linear weight projected; c_attn as three (e, e) row blocks, each at its own scale (1)."""
    new = {}
    for name, w in old.items():
        if name.endswith("c_attn.weight"):
            new[name] = np.concatenate([fire_matrix(w[k * e : (k + 1) * e], steps) for k in range(3)])
        elif name.endswith(("c_proj.weight", "c_fc.weight")) or name == "lm_head.weight":
            new[name] = fire_matrix(w, steps)
        else:
            new[name] = w
    return new


def test_language_setting_splits_c_attn_projects_the_tied_head_and_clears_the_optimizer():
    torch.manual_seed(2)
    model = NanoGPT().double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / 10))
    loss = model.lm_head(model.transformer.wte(torch.tensor([1, 2]))).square().mean()
    loss.backward()
    optimizer.step()
    schedule.step()
    old = weights(model)  # named_parameters lists the tied weight once (as transformer.wte.weight)

    report = ft.apply(model, steps=5)
    optimizer.state.clear()  # the reference clears all of AdamW's state, not only the projected weights'
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / 10))  # warm-up again

    want = language_rule({("lm_head.weight" if n == "transformer.wte.weight" else n): w for n, w in old.items()}, 16, 5)
    np.testing.assert_allclose(model.lm_head.weight.detach().numpy(), want["lm_head.weight"], rtol=0, atol=1e-12)
    assert model.transformer.wte.weight is model.lm_head.weight
    for name, p in model.named_parameters():
        if name != "transformer.wte.weight":
            np.testing.assert_allclose(p.detach().numpy(), want[name], rtol=0, atol=1e-12, err_msg=name)
    assert "transformer.h.0.attn.c_attn.weight[q]" in report.names
    assert report["lm_head.weight"]["aliases"] == ["transformer.wte.weight"]
    assert not optimizer.state and optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def nanogpt_lr(it: int, chunk_iters: int, lr: float = 6e-4, min_lr: float = 6e-5) -> float:
    """The reference's schedule in one chunk, written out: linear warm-up, then cosine to min_lr."""
    warm = min(int(0.1 * chunk_iters), 2000)
    if it < warm:
        return lr * (it + 1) / (warm + 1)
    t = min(1.0, (it - warm) / (chunk_iters - warm))  # past the chunk's end: min_lr
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("chunk_iters", [1000, 50000])
def test_language_recipe_has_two_adamw_groups_and_restarts_the_references_schedule(chunk_iters):
    ns = doc_recipe("Language", **{"6e-4, 6e-5, 1000": f"6e-4, 6e-5, {chunk_iters}"})
    model, optimizer, scheduler = ns["model"], ns["optimizer"], ns["scheduler"]
    decay, no_decay = optimizer.param_groups
    params = list(model.parameters())  # the tied weight once
    assert {id(p) for p in decay["params"]} == {id(p) for p in params if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in params if p.dim() < 2} != set()
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.95)
    assert not optimizer.state
    warm = min(chunk_iters // 10, 2000)
    probes = {0, 1, warm - 1, warm, warm + 1, (warm + chunk_iters) // 2, chunk_iters - 1, chunk_iters,
              chunk_iters + 3}
    for it in range(chunk_iters + 4):
        if it in probes:
            for group in optimizer.param_groups:
                assert group["lr"] == pytest.approx(nanogpt_lr(it, chunk_iters), rel=1e-12, abs=0), it
        optimizer.step()  # no gradients: only the schedule moves
        scheduler.step()
    assert nanogpt_lr(warm, chunk_iters) == 6e-4 and nanogpt_lr(chunk_iters, chunk_iters) == pytest.approx(6e-5)


# --- DQN (Atari): convolutions FIRE'd at 10 steps, Linear layers back to their initial values -------


class QNetwork(nn.Module):
    def __init__(self, actions=3, bias=True):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 8, 4, stride=2), nn.Conv2d(8, 8, 3)
        self.fc1, self.fc2 = nn.Linear(8 * 2 * 2, 16, bias=bias), nn.Linear(16, actions)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("bias", [True, False], ids=["with-bias", "bias-free-fc1"])
def test_dqn_setting_projects_the_convolutions_resets_the_linears_and_keeps_adam(bias):
    dqn_fire = doc_recipe("DQN")["dqn_fire"]  # the documented recipe (docs/reference.md)
    torch.manual_seed(3)
    q = QNetwork(bias=bias).double()
    init = QNetwork(bias=bias).double()
    init.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-4, eps=1.5e-4)
    for _ in range(3):  # training moves q away from its initial values, and Adam gathers state
        optimizer.zero_grad()
        q(torch.randn(2, 4, 10, 10, dtype=torch.float64)).square().mean().backward()
        optimizer.step()
    target = QNetwork(bias=bias).double()
    target.load_state_dict(q.state_dict())
    old, initial = weights(q), weights(init)
    old_target = weights(target)
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in q.parameters()}

    report = dqn_fire(q, target, init)

    want = {}
    for name, w in old.items():
        layer = name.split(".")[0]
        if layer.startswith("conv"):
            want[name] = fire_torch_weight(w, 10) if name.endswith("weight") else w
        else:
            want[name] = initial[name]
    assert_weights(q, want)
    want_target = {n: (want[n] if not n.startswith("conv") or n.endswith("weight") else old_target[n]) for n in want}
    assert_weights(target, want_target)
    assert report.names == ["conv1.weight", "conv2.weight"]
    for p in q.parameters():  # Adam's moments and steps untouched
        for k, v in optimizer.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k


# --- SAC (Flax, SimBa): Dense kernels, critic ensembles member by member, fresh optimizers ----------


def test_sac_setting_projects_actor_and_vmapped_critic_members_at_full_scale(x64):
    jax = x64
    import flax.linen as ln
    import jax.numpy as jnp
    import optax

    import fire_core.flax as ff

    if True:
        class Critic(ln.Module):
            @ln.compact
            def __call__(self, obs, act):
                h = ln.relu(ln.Dense(16)(jnp.concatenate([obs, act], -1)))
                h = ln.LayerNorm()(ln.relu(ln.Dense(16)(h)))
                return ln.Dense(1)(h)

        class Ensemble(ln.Module):
            @ln.compact
            def __call__(self, obs, act):
                critics = ln.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=None, out_axes=0, axis_size=2)
                return critics()(obs, act)

        class Actor(ln.Module):
            @ln.compact
            def __call__(self, obs):
                return ln.Dense(3)(ln.relu(ln.Dense(16)(obs)))

        obs, act = jnp.ones((1, 5)), jnp.ones((1, 3))
        critic_def, actor_def = Ensemble(), Actor()
        wide = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), tree)  # noqa: E731
        critic = wide(critic_def.init(jax.random.PRNGKey(0), obs, act)["params"])
        actor = wide(actor_def.init(jax.random.PRNGKey(1), obs)["params"])
        tx = optax.adamw(1e-4, weight_decay=1e-2)

        # the documented recipe
        new_actor = ff.apply(actor, steps=10, model=(actor_def, obs))
        new_critic = ff.apply(critic, steps=10, model=(critic_def, obs, act))
        target_critic = new_critic
        actor_opt, critic_opt = tx.init(new_actor), tx.init(new_critic)

        def rule(tree):  # every kernel of a Dense module, a 3-axis one member by member; 1e-8 added to the norm
            def one(path, leaf):
                names = [getattr(k, "key", "") for k in path]
                if names[-1] != "kernel" or not names[-2].startswith("Dense"):
                    return np.asarray(leaf)
                x = np.asarray(leaf)
                members = x[None] if x.ndim == 2 else x
                return np.stack([fire_matrix(m.T, 10, eps=1e-8).T for m in members]).reshape(x.shape)
            return jax.tree_util.tree_map_with_path(one, tree)

        for got, want in ((new_actor, rule(actor)), (new_critic, rule(critic)), (target_critic, rule(critic))):
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                # fire_core's exact zero guard vs the reference's 1e-8 in the norm: ~1e-8 relative
                np.testing.assert_allclose(np.asarray(a), b, rtol=1e-7, atol=1e-9)
        # per member matrix, at most 1e-8 / ||W||_F apart relative (the bound docs/reference.md states)
        for old, got in ((actor, new_actor), (critic, new_critic)):
            for path, w in jax.tree_util.tree_leaves_with_path(old):
                if getattr(path[-1], "key", "") != "kernel":
                    continue
                new = np.asarray(got_leaf(got, path))
                for m_old, m_new, m_ref in zip(*(np.reshape(x, (-1, *np.shape(w)[-2:]))
                                                 for x in (np.asarray(w), new, np.asarray(got_leaf(rule(old), path))))):
                    bound = 1e-8 / np.linalg.norm(m_old)
                    assert np.linalg.norm(m_new - m_ref) <= bound * np.linalg.norm(m_ref) * (1 + 1e-3) + 1e-14
        fresh = tx.init(new_critic)
        for a, b in zip(jax.tree_util.tree_leaves(critic_opt), jax.tree_util.tree_leaves(fresh)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        del actor_opt

        # scaler_type="ortho_init": scale 1 (scale=1.0); "muon" (the default above) is sqrt(d_out/d_in)
        ortho = ff.apply(actor, steps=10, model=(actor_def, obs), scale=1.0)
        for path, w in jax.tree_util.tree_leaves_with_path(actor):
            if getattr(path[-1], "key", "") == "kernel":
                want = fire_matrix(np.asarray(w).T, 10, eps=1e-8).T / math.sqrt(w.shape[1] / w.shape[0])
                np.testing.assert_allclose(np.asarray(got_leaf(ortho, path)), want, rtol=1e-7, atol=1e-9)


def got_leaf(tree, path):
    """The leaf of ``tree`` at a ``tree_leaves_with_path`` path."""
    for key in path:
        tree = tree[key.key]
    return tree


def test_a_zero_kernel_gives_zeros_as_the_jax_reference_does(x64):
    import fire_core.flax as ff

    params = {"Dense_0": {"kernel": np.zeros((4, 3)), "bias": np.ones(3)}}
    got = ff.apply(params, steps=10)
    assert np.array_equal(np.asarray(got["Dense_0"]["kernel"]), np.zeros((4, 3)))
    assert np.array_equal(fire_matrix(np.zeros((3, 4)), 10, eps=1e-8), np.zeros((3, 4)))  # the JAX rule: zeros
    with np.errstate(invalid="ignore"):
        assert np.isnan(fire_matrix(np.zeros((3, 4)), 10)).all()  # the torch rule, W / ||W||: NaN
