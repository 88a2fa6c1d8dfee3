"""benchmarks/rl.py's pieces against independent computations, and one short quick-mode run (its trial scripted)."""

import json
import math
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


# --- FIRE when needed: the trial's network, data, targets and loss, and the rule's firing ---------------------


def _filled(agent, size: int, seed: int = 0) -> "rl.Replay":
    """A replay buffer of ``size`` random transitions per member (distinct observations, some episode ends)."""
    g = torch.Generator().manual_seed(seed)
    env, M = agent.env_cls, agent.M
    discrete = env is rl.CartPoles
    buf = rl.Replay(M, size, env.obs_dim, 1, torch.int64 if discrete else torch.float32)
    for _ in range(size):
        obs = torch.randn(M, env.obs_dim, generator=g).numpy()
        act = torch.randint(0, 2, (M, 1), generator=g) if discrete else torch.rand(M, 1, generator=g) * 4 - 2
        rew = torch.randn(M, generator=g).double().numpy()
        nxt = torch.randn(M, env.obs_dim, generator=g).numpy()
        done = (torch.rand(M, generator=g) < 0.2).numpy()
        buf.add(obs, act, rew, nxt, done)
    return buf


def _mlp(params, x):
    """A plain ReLU MLP from ``[(w, b), ...]``, written out with functional.linear."""
    for k, (w, b) in enumerate(params):
        x = torch.nn.functional.linear(x, w, b)
        if k < len(params) - 1:
            x = torch.relu(x)
    return x


def _member(net, row):
    return [(w.detach()[row], b.detach()[row]) for w, b in zip(net.W, net.b)]


@pytest.mark.parametrize("name", ["dqn", "td3"])
def test_trial_net_is_the_member_and_trial_fire_is_the_fire_rows(name):
    agent = rl.AGENT_CLASSES[name]([0, 1], 2)  # 4 members
    _perturb(agent)
    m = 3
    net = agent.trial_net(m)
    x = torch.randn(9, 4)
    if name == "dqn":
        torch.testing.assert_close(net(x), _mlp(_member(agent.q, m), x))
        rows = {"": m}
        stacked = agent.q
    else:  # both critics, rows m and M + m of the stack
        want = torch.stack([_mlp(_member(agent.critic, r), x)[:, 0] for r in (m, m + agent.M)])
        torch.testing.assert_close(net(x), want)
        rows = {"q1.": m, "q2.": m + agent.M}
        stacked = agent.critic
    before = [p.detach().clone() for p in stacked.params]
    fire_core.torch.apply(net, steps=rl.FIRE_STEPS)  # what the trial does to its FIRE copy
    assert all(torch.equal(p.detach(), q) for p, q in zip(stacked.params, before))  # a copy: the stack untouched
    linears = dict(net.named_modules())
    for prefix, row in rows.items():
        for k in range(len(stacked.W)):
            lin = linears[f"{prefix}{2 * k}"]
            torch.testing.assert_close(lin.weight.detach(), fire_core.reinit(before[2 * k][row], "oi", steps=rl.FIRE_STEPS),
                                       rtol=1e-5, atol=1e-6)
            assert torch.equal(lin.bias.detach(), before[2 * k + 1][row])  # biases kept, as in the FIRE row


def _by_obs(buf, m, window):
    """The last ``window`` transitions of member ``m``, keyed by their observation's first entry."""
    x = buf.data[m, buf.size - window: buf.size]
    obs, act, rew, nxt, done = (t[0] for t in buf.split(x.unsqueeze(0)))
    return {float(obs[i, 0]): (obs[i], act[i], rew[i], nxt[i], done[i]) for i in range(window)}


@pytest.mark.parametrize("name", ["dqn", "td3"])
def test_trial_data_is_the_recent_window_with_fixed_td_targets_and_the_agents_loss(name):
    agent = rl.AGENT_CLASSES[name]([0, 1], 1)
    _perturb(agent)
    with torch.no_grad():  # targets differ from the online networks, as after training
        targets = [agent.q_target] if name == "dqn" else [agent.actor_target, agent.critic_target]
        for t in targets:
            for p in t.params:
                p.add_(0.1 * torch.randn_like(p))
    if name == "td3":
        agent.policy_noise = 0.0  # the target written out below has no smoothing noise
    buf = _filled(agent, 40)
    sizes = {"batches": 3, "batch": 4, "probe": 5}
    m = 1
    state = torch.random.get_rng_state()
    batches, probe = rl.trial_data(agent, buf, m, torch.Generator().manual_seed(0), sizes)
    assert torch.equal(torch.random.get_rng_state(), state)  # its own generator only
    assert [len(b[1] if name == "td3" else b[1][1]) for b in batches] == [4, 4, 4]
    recent = _by_obs(buf, m, 17)
    seen = []
    net = agent.trial_net(m)
    for inputs, tgt in [*batches, probe]:
        obs = inputs if name == "dqn" else inputs[:, :4 - 1]
        y = tgt[1] if name == "dqn" else tgt
        want_loss = 0.0
        for i in range(len(obs)):
            o, a, r, n, d = recent[float(obs[i, 0])]  # from the 17 most recent transitions of member m
            seen.append(float(o[0]))
            torch.testing.assert_close(obs[i], o)
            if name == "dqn":
                assert int(tgt[0][i]) == int(a[0])
                want_y = r + 0.99 * (1 - d) * _mlp(_member(agent.q_target, m), n).max()
                q = _mlp(_member(agent.q, m), o)[a[0]]
                want_loss += float(torch.nn.functional.huber_loss(q, want_y, delta=1.0))
            else:
                torch.testing.assert_close(inputs[i, 3:], a)
                a2 = 2.0 * torch.tanh(_mlp(_member(agent.actor_target, m), n))
                qs = [_mlp(_member(agent.critic_target, r_), torch.cat([n, a2]))[0] for r_ in (m, m + agent.M)]
                want_y = r + 0.99 * (1 - d) * torch.minimum(*qs)
                for r_ in (m, m + agent.M):
                    want_loss += float((_mlp(_member(agent.critic, r_), torch.cat([o, a]))[0] - want_y) ** 2)
            torch.testing.assert_close(y[i], want_y.reshape(()), rtol=1e-5, atol=1e-5)
        # the trial's loss is the agent's TD loss, averaged over the batch
        with torch.no_grad():
            got = float(agent.td_loss(net(inputs), tgt))
        assert got == pytest.approx(want_loss / len(obs), rel=1e-5, abs=1e-6)
    assert sorted(seen) == sorted(recent)  # every recent transition once: the probe held out of the batches
    with pytest.raises(ValueError, match="replay buffer holds 40 transitions, the trial needs 48"):
        rl.trial_data(agent, buf, m, torch.Generator(), {"batches": 4, "batch": 8, "probe": 16})


def test_td3_trial_targets_use_clipped_smoothing_noise():
    agent = rl.TD3([0], 1)
    buf = _filled(agent, 30)
    sizes = {"batches": 2, "batch": 5, "probe": 10}
    agent.policy_noise = 100.0  # every noise draw clipped at +-noise_clip * max_action = +-1, so a2 = clamp(pi +- 1)
    _, (x, y) = rl.trial_data(agent, buf, 0, torch.Generator().manual_seed(3), sizes)
    recent = _by_obs(buf, 0, 20)
    for i in range(len(x)):
        _, _, r, n, d = recent[float(x[i, 0])]
        pi = 2.0 * torch.tanh(_mlp(_member(agent.actor_target, 0), n))
        options = []
        for shift in (1.0, -1.0):
            a2 = (pi + shift).clamp(-2, 2)
            qs = [_mlp(_member(agent.critic_target, r_), torch.cat([n, a2]))[0] for r_ in (0, 1)]
            options.append(float(r + 0.99 * (1 - d) * torch.minimum(*qs)))
        assert min(abs(float(y[i]) - o) for o in options) < 1e-4


def test_needed_trial_is_fire_core_trial_with_the_agents_loss_and_fire():
    agent = rl.DQN([0], 1)
    _perturb(agent)
    buf = _filled(agent, 20)
    sizes = {"batches": 2, "batch": 4, "probe": 6}
    before = [p.detach().clone() for p in agent.q.params]
    got = rl.needed_trial(agent, buf, 0, torch.Generator().manual_seed(5), sizes)(3)
    batches, probe = rl.trial_data(agent, buf, 0, torch.Generator().manual_seed(5), sizes)
    want = []
    for fire in (False, True):  # written out: two copies, FIRE on one, 3 Adam steps each, the probe loss
        net = agent.trial_net(0)
        if fire:
            with torch.no_grad():
                for lin in (net[0], net[2], net[4]):
                    lin.weight.copy_(fire_core.reinit(lin.weight, "oi", steps=rl.FIRE_STEPS))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for step in range(3):
            obs, (act, y) = batches[step % 2]
            opt.zero_grad()
            torch.nn.functional.smooth_l1_loss(net(obs).gather(1, act).squeeze(1), y).backward()
            opt.step()
        with torch.no_grad():
            obs, (act, y) = probe
            want.append(float(torch.nn.functional.smooth_l1_loss(net(obs).gather(1, act).squeeze(1), y)))
    assert got == pytest.approx(tuple(want), rel=1e-5)
    assert all(torch.equal(p.detach(), q) for p, q in zip(agent.q.params, before))


# One quick run of the benchmark (none, FIRE, FIRE when needed; both agents), the trial's ratio scripted per
# (member, step) so that the rule's firing can be checked against it; shared by the tests below.

def _scripted_ratio(m: int, step: int) -> float:
    """Below, exactly at and above when_needed()'s 0.526, in turn over the checks (every 15 steps here)."""
    return (0.3, 0.526, 0.9)[(step // 15 + m) % 3]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl")
    calls, fired = [], []
    real_fire_agent = rl.fire_agent

    def fake_trial(agent, buf, m, gen, sizes):
        rl.trial_data(agent, buf, m, gen, sizes)  # the real data (it must be there), a scripted verdict
        step = buf.size

        def lookahead(k):
            calls.append((type(agent).__name__, m, step, k))
            return 1.0, _scripted_ratio(m, step)
        return lookahead

    def recording_fire_agent(agent, idx):
        fired.append((type(agent).__name__, idx.tolist()))
        return real_fire_agent(agent, idx)

    mp = pytest.MonkeyPatch()
    mp.setattr(rl, "needed_trial", fake_trial)
    mp.setattr(rl, "fire_agent", recording_fire_agent)
    try:
        assert rl.main(["--quick", "--jobs", "1", "--steps", "300", "--eval-episodes", "1",
                        "--methods", f"none,FIRE,{rl.NEEDED}", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out, calls, fired


def test_a_run_in_this_process_leaves_subnormals_unflushed(quick_run):
    """run_chunk flushes subnormals to zero while it trains and not after: FTZ/DAZ would hold for every later
    test in this pytest process (numpy included; a zero matrix's log2 in fire_core once tripped on it)."""
    tiny = np.array([np.finfo(np.float64).smallest_subnormal])
    assert float((tiny * 1.0)[0]) > 0.0


def test_quick_needed_fires_iff_the_trial_ratio_is_below_the_threshold(quick_run):
    out, calls, fired = quick_run
    saved = json.loads((out / "rl-quick.json").read_text())
    for agent_name, cls in (("dqn", "DQN"), ("td3", "TD3")):
        res = saved["results"][agent_name]
        rows = res["methods"][rl.NEEDED]["seeds"]
        assert res["trial_checks"] == sum(1 for c in calls if c[0] == cls) > 0
        for j, row in enumerate(rows):
            m = 2 * 2 + j  # 2 seeds, the third method
            mine = [(step, k) for c_, m_, step, k in calls if c_ == cls and m_ == m]
            assert mine and all(k == 200 for _, k in mine)  # the shipped rule's trial length
            ratios = [_scripted_ratio(m, step) for step, _ in mine]
            assert math.isnan(row["values"][0]) and row["values"][1:] == pytest.approx(ratios)  # step 0: no trial
            assert row["losses"][0] is None and row["losses"][1:] == [[1.0, r] for r in ratios]
            want = [step for (step, _), r in zip(mine, ratios) if r < 0.526]
            assert row["fired_at"] == want and want  # 0.3 fires; 0.526 (not below) and 0.9 do not
            # and FIRE was applied to that member (only) once per firing, as the FIRE row applies it
            assert fired.count((cls, [m])) == len(want)
        periodic = [c for c in fired if c == (cls, [2, 3])]  # the FIRE row: its two members at each boundary
        assert len(periodic) == len(res["methods"]["FIRE"]["interventions"]) == 4


def test_quick_needed_section_and_replot(quick_run):
    out, _, _ = quick_run
    md = (out / "rl-quick.md").read_text()
    assert "## FIRE when needed (`fire_core.schedule.when_needed()`)" in md
    header = ("| setting | metric | FIRE − none | when needed − none | when needed − FIRE | fired | "
              "trial cost per check | goals |")
    assert header in md
    section = md.split(header)[1]
    for setting in ("DQN, CartPole-v1", "TD3, Pendulum-v1"):
        line = next(x for x in section.splitlines() if x.startswith(f"| {setting}"))
        assert "area under the return curve (higher is better)" in line and "firings a seed" in line
        assert "gain kept:" in line and "never cost:" in line
        assert f"- {setting}: trial ratio" in section
    assert f"| {rl.NEEDED} |" in md  # a row of the agents' own tables
    again = out / "replot"
    again.mkdir()
    (again / "rl-quick.json").write_text((out / "rl-quick.json").read_text())
    assert rl.main(["--replot", str(again / "rl-quick.json")]) == 0
    assert (again / "rl-quick.md").read_text() == md
