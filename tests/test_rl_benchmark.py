"""benchmarks/rl.py's pieces against independent computations: no training."""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gym = pytest.importorskip("gymnasium")

import fire_core  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rl  # noqa: E402


def test_stacked_forward_matches_per_member_linear():
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    sizes = (5, 7, 6, 2)
    inits = [rl.StackedMLP.draw(g, sizes) for g in gens]
    net = rl.StackedMLP(sizes, inits)
    x = torch.randn(3, 4, 5)
    hidden = []
    out = net.forward(x, hidden=hidden)
    for m, layers in enumerate(inits):
        h = x[m]
        for k, (w, b) in enumerate(layers):
            h = torch.nn.functional.linear(h, w, b)
            if k < len(layers) - 1:
                h = torch.relu(h)
                torch.testing.assert_close(hidden[k][m], h)
        torch.testing.assert_close(out[m], h)
    torch.testing.assert_close(net.forward(x[1:], rows=slice(1, 3)), out[1:])


def test_default_init_matches_nn_linear_bounds():
    w, b = rl.init_layer(torch.Generator().manual_seed(0), 50, 40)
    bound = 1 / np.sqrt(40)
    assert w.shape == (50, 40) and b.shape == (50,)
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound


def test_stacked_fire_equals_reinit_member_by_member():
    sizes = (4, 16, 8, 3)
    inits = [rl.StackedMLP.draw(torch.Generator().manual_seed(s), sizes) for s in range(4)]
    net = rl.StackedMLP(sizes, inits)
    before = [w.detach().clone() for w in net.W]
    idx = torch.tensor([1, 3])
    rl.fire_members(net, idx)
    for k, w in enumerate(net.W):
        for m in range(4):
            if m in (1, 3):
                want = fire_core.reinit(before[k][m], "oi", steps=rl.FIRE_STEPS)
                torch.testing.assert_close(w.detach()[m], want, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(w.detach()[m], before[k][m])
        assert torch.equal(net.b[k].detach(), torch.stack([layers[k][1] for layers in inits]))  # biases kept


def test_stacked_adam_equals_torch_adam_per_member():
    sizes = (3, 5, 2)
    inits = [rl.StackedMLP.draw(torch.Generator().manual_seed(s), sizes) for s in range(2)]
    net = rl.StackedMLP(sizes, inits)
    opt = rl.StackedAdam(net.params, lr=1e-2)
    singles = [[p.clone().requires_grad_() for pair in layers for p in pair] for layers in inits]
    torch_opts = [torch.optim.Adam(ps, lr=1e-2) for ps in singles]
    for step in range(4):
        grads = [torch.randn_like(p) for p in net.params]
        opt.step(grads)
        for m, (ps, o) in enumerate(zip(singles, torch_opts)):
            for p, g in zip(ps, grads):
                p.grad = g[m].clone()
            o.step()
        if step == 1:  # a cleared member restarts like a fresh optimizer
            opt.clear(torch.tensor([1]))
            singles[1] = [p.detach().clone().requires_grad_() for p in singles[1]]
            torch_opts[1] = torch.optim.Adam(singles[1], lr=1e-2)
    for m, ps in enumerate(singles):
        for p, q in zip(net.params, ps):
            torch.testing.assert_close(p.detach()[m], q.detach(), rtol=1e-5, atol=1e-6)


def test_cartpole_matches_gymnasium_step_for_step():
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(0)
    for episode in range(3):
        obs, _ = env.reset(seed=episode)
        mine = rl.CartPoles(1)
        mine.state = np.array(env.unwrapped.state, dtype=np.float64)[None]
        np.testing.assert_array_equal(mine.obs()[0], obs)
        while True:
            a = int(rng.integers(2))
            obs, r, term, trunc, _ = env.step(a)
            o, r2, t2, tr2 = mine.step(np.array([a]))
            np.testing.assert_array_equal(o[0], obs)
            assert (r2[0], bool(t2[0]), bool(tr2[0])) == (r, term, trunc)
            if term or trunc:
                break


def test_cartpole_truncates_at_500():
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    mine = rl.CartPoles(1)
    start = np.array([0.0, 0.0, 0.01, 0.0])
    mine.state = start[None].copy()
    env.unwrapped.state = start.copy()
    for _ in range(500):  # pushing toward the pole's lean keeps it up for the whole episode
        a = int(mine.state[0, 2] + mine.state[0, 3] > 0)
        obs, r, term, trunc, _ = env.step(a)
        o, r2, t2, tr2 = mine.step(np.array([a]))
        np.testing.assert_array_equal(o[0], obs)
        assert (bool(t2[0]), bool(tr2[0])) == (term, trunc)
        if term:
            break
    assert trunc and bool(tr2[0])


def test_pendulum_matches_gymnasium_step_for_step():
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=3)
    mine = rl.Pendulums(1)
    mine.state = np.array(env.unwrapped.state, dtype=np.float64)[None]
    np.testing.assert_array_equal(mine.obs()[0], obs)
    rng = np.random.default_rng(1)
    for _ in range(200):
        a = rng.uniform(-2.5, 2.5, size=(1,)).astype(np.float32)
        obs, r, term, trunc, _ = env.step(a)
        o, r2, t2, tr2 = mine.step(a[None])
        np.testing.assert_allclose(o[0], obs, rtol=0, atol=1e-6)
        assert r2[0] == pytest.approx(float(r), rel=1e-6)
        assert (bool(t2[0]), bool(tr2[0])) == (term, trunc)
    assert trunc


def test_reset_state_distributions():
    s = rl.CartPoles.initial(np.random.default_rng(0), 1000)
    assert s.shape == (1000, 4) and np.abs(s).max() <= 0.05
    p = rl.Pendulums.initial(np.random.default_rng(0), 1000)
    assert np.abs(p[:, 0]).max() <= np.pi and np.abs(p[:, 1]).max() <= 1.0


def _perturb(agent):
    """Make online and target networks and the Adam state differ, as after training."""
    for _, net, opt in agent.online():
        with torch.no_grad():
            for p in net.params:
                p.add_(0.1 * torch.randn_like(p))
        opt.step([torch.randn_like(p) for p in net.params])


@pytest.mark.parametrize("name", ["dqn", "td3"])
def test_fire_sets_targets_to_projected_online_and_handles_adam(name):
    agent = rl.AGENT_CLASSES[name]([0, 1], 2)  # 4 members
    _perturb(agent)
    targets = [agent.q_target] if name == "dqn" else [agent.actor_target, agent.critic_target]
    onlines = [agent.q] if name == "dqn" else [agent.actor, agent.critic]
    before_t = [[p.detach().clone() for p in t.params] for t in targets]
    before_o = [[p.detach().clone() for p in n.params] for n in onlines]
    before_opt = [[m.clone() for m in opt.m] for _, _, opt in agent.online()]
    rl.fire_agent(agent, torch.tensor([2]))
    for net, tgt, bt, bo in zip(onlines, targets, before_t, before_o):
        rows = [2] if net.members == agent.M else [2, 2 + agent.M]
        others = [r for r in range(net.members) if r not in rows]
        for k, (w, w0) in enumerate(zip(net.W, bo[0::2])):
            for r in rows:  # projected: FIRE of the old weight
                torch.testing.assert_close(w.detach()[r], fire_core.reinit(w0[r], "oi", steps=rl.FIRE_STEPS),
                                           rtol=1e-5, atol=1e-6)
        for p, q, q0, p0 in zip(tgt.params, net.params, bt, bo):
            assert torch.equal(p.detach()[rows], q.detach()[rows])  # target = the projected online network
            assert torch.equal(p.detach()[others], q0[others])  # other members' targets untouched
            assert torch.equal(q.detach()[others], p0[others])
    for (_, net, opt), ms in zip(agent.online(), before_opt):
        rows = [2] if net.members == agent.M else [2, 2 + agent.M]
        for m, m0 in zip(opt.m, ms):
            if name == "dqn":  # the reference's DQN keeps the Adam state
                assert torch.equal(m, m0)
            else:  # the reference's SAC starts fresh optimizer states
                assert float(m[rows].abs().sum()) == 0 and float(opt.t[0][rows].sum()) == 0
                others = [r for r in range(net.members) if r not in rows]
                assert torch.equal(m[others], m0[others])


def test_reset_last_touches_only_the_output_layer_of_the_chosen_members():
    agent = rl.DQN([0, 1], 2)
    _perturb(agent)
    before = [p.detach().clone() for p in agent.q.params]
    gens = [torch.Generator().manual_seed(m) for m in range(agent.M)]
    rl.intervene("reset-last", agent.q, agent.opt, torch.tensor([1]), gens, False)
    n = len(agent.q.params)
    for k, (p, p0) in enumerate(zip(agent.q.params, before)):
        changed = [m for m in range(agent.M) if not torch.equal(p.detach()[m], p0[m])]
        assert changed == ([1] if k >= n - 2 else [])
    assert float(agent.opt.m[n - 1][1].abs().sum()) == 0 and float(agent.opt.m[0][1].abs().sum()) > 0


def test_member_weights_name_every_online_weight():
    agent = rl.TD3([0], 1)
    names = [n for n, _, lay in rl.member_weights(agent, 0)]
    assert names == ["actor.0", "actor.1", "actor.2", "q1.0", "q1.1", "q1.2", "q2.0", "q2.1", "q2.2"]
    w = dict((n, a) for n, a, _ in rl.member_weights(agent, 0))
    assert torch.equal(w["q2.1"], agent.critic.W[1].detach()[1])
