"""fire_core.sb3.FIRE on real Stable-Baselines3 runs (CartPole-v1, Pendulum-v1, a few hundred steps).

Each run has a snapshot callback before FIRE and one after it in a
CallbackList, so the networks and optimizer states are deep-copied right
before and right after the firing; the expected weights are
fire_core.torch.apply on a copy of each network taken before it.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("stable_baselines3")
from stable_baselines3 import DQN, PPO, SAC, TD3  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback, CallbackList  # noqa: E402
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm  # noqa: E402
from stable_baselines3.common.policies import ActorCriticPolicy  # noqa: E402
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor  # noqa: E402

import fire_core.torch as fire_torch  # noqa: E402
from fire_core.schedule import DfIAbove, Every, When  # noqa: E402
from fire_core.sb3 import ALGORITHMS, FIRE  # noqa: E402

AT, TOTAL = 150, 250
OPTIONS = {"steps": 10}


class Features(BaseFeaturesExtractor):
    """A features extractor with a weight, so that sharing it between actor and critic matters."""

    def __init__(self, space, dim: int = 8):
        super().__init__(space, dim)
        self.linear = nn.Sequential(nn.Linear(space.shape[0], dim), nn.ReLU())

    def forward(self, obs):
        return self.linear(obs)


SETUPS = {
    "dqn": (DQN, "CartPole-v1", dict(learning_starts=20, train_freq=1, target_update_interval=50)),
    # share_features_extractor: the extractor is one module in actor and critic (in both TD3 optimizers)
    "sac": (SAC, "Pendulum-v1", dict(learning_starts=20, policy_kwargs=dict(
        features_extractor_class=Features, share_features_extractor=True))),
    "td3": (TD3, "Pendulum-v1", dict(learning_starts=20, policy_kwargs=dict(
        features_extractor_class=Features, share_features_extractor=True))),
    "ppo": (PPO, "CartPole-v1", dict(n_steps=64, batch_size=32, n_epochs=2)),
}


class Snapshot(BaseCallback):
    """A deep copy of the policy (its optimizers included) and the logged values at the first step >= ``at``."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.policy, self.step, self.logged = at, None, None, None

    def _on_step(self) -> bool:
        if self.policy is None and self.num_timesteps >= self.at:
            self.policy = copy.deepcopy(self.model.policy)
            self.step = self.num_timesteps
            self.logged = dict(self.model.logger.name_to_value)
        return True


def make(name: str, seed: int = 0):
    algo, env, kwargs = SETUPS[name]
    kwargs = copy.deepcopy(kwargs)
    policy_kwargs = {"net_arch": [16, 16], **kwargs.pop("policy_kwargs", {})}
    return algo("MlpPolicy", env, policy_kwargs=policy_kwargs, seed=seed, device="cpu", **kwargs)


class Run:
    def __init__(self, name: str, sync_targets: bool = True):
        torch.manual_seed(0)
        self.name = name
        self.model = make(name)
        self.agent = ALGORITHMS[type(self.model)]
        self.before, self.after = Snapshot(AT), Snapshot(AT)
        self.fire = FIRE(schedule=[AT], sync_targets=sync_targets, **OPTIONS)
        self.model.learn(TOTAL, callback=CallbackList([self.before, self.fire, self.after]))

    def networks(self, policy) -> dict[str, nn.Module]:
        return {n: getattr(policy, n) for n in self.agent.networks} or {"": policy}

    def projected(self) -> set[str]:
        rows = self.fire.last_report.rows
        return {row["name"] for row in rows} | {a for row in rows for a in row.get("aliases", [])}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(SETUPS))
def run(request):
    return Run(request.param)


@pytest.fixture(scope="module", params=["dqn", "td3"])
def unsynced(request):
    return Run(request.param, sync_targets=False)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters(remove_duplicate=False))


# --- at a firing ---------------------------------------------------------------------------------


def test_fires_at_the_scheduled_timestep_only(run):
    assert [h["step"] for h in run.fire.history] == [AT]
    assert run.before.step == run.after.step == AT
    assert run.fire.history[0]["reasons"] == [f"scheduled at step {AT}"]


def test_each_network_equals_fire_torch_apply_on_a_copy_taken_before(run):
    for name, got in run.networks(run.after.policy).items():
        expected = copy.deepcopy(run.networks(run.before.policy)[name])
        fire_torch.apply(expected, **OPTIONS)
        want = _params(expected)
        for key, value in _params(got).items():
            torch.testing.assert_close(value, want[key], rtol=1e-6, atol=1e-7, msg=f"{name}.{key}")
    targets = tuple(f"{t}." for t, _ in run.agent.targets)  # synced: test_targets_equal_the_projected_networks
    old = _params(run.before.policy)
    changed = {k for k, v in _params(run.after.policy).items() if not k.startswith(targets) and not torch.equal(v, old[k])}
    assert changed == run.projected()


def test_optimizer_state_of_exactly_the_projected_parameters_is_fresh(run):
    projected = run.projected()
    for path in run.agent.optimizers:
        before, after = (_attr(s.policy, path) for s in (run.before, run.after))
        names = {id(p): n for n, p in _params(run.after.policy).items()}
        old = {n: before.state.get(p) for n, p in _params(run.before.policy).items()}
        held = [names[id(p)] for group in after.param_groups for p in group["params"]]
        assert set(held) & projected, path
        for group in after.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                if name in projected:
                    assert p not in after.state, f"{path}: {name} kept its state"
                else:  # as it was (a parameter with no gradient yet, TD3's shared extractor in critic.optimizer: none)
                    kept, was = after.state.get(p, {}), old[name] or {}
                    assert set(kept) == set(was), f"{path}: {name}"
                    for key, value in kept.items():
                        assert torch.equal(value, was[key]), f"{path}: {name} {key} changed"


def test_targets_equal_the_projected_networks(run):
    for target, online in run.agent.targets:
        want = getattr(run.after.policy, online).state_dict()
        got = getattr(run.after.policy, target).state_dict()
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), f"{target}.{key}"
    assert run.fire.history[0]["targets_synced"] == [t for t, _ in run.agent.targets]


def test_sync_targets_false_keeps_the_old_targets(unsynced):
    assert unsynced.agent.targets and unsynced.fire.history[0]["targets_synced"] == []
    for target, _ in unsynced.agent.targets:
        old = getattr(unsynced.before.policy, target).state_dict()
        for key, value in getattr(unsynced.after.policy, target).state_dict().items():
            assert torch.equal(value, old[key]), f"{target}.{key}"


def test_learning_goes_on_after_the_firing(run):
    assert run.model.num_timesteps >= TOTAL
    now, then = _params(run.model.policy), _params(run.after.policy)
    assert all(torch.isfinite(v).all() for v in now.values())
    assert any(not torch.equal(now[k], then[k]) for k in run.projected())


def test_the_logger_gets_the_report_totals(run):
    logged, report = run.after.logged, run.fire.last_report
    for key in ("sfe", "dfi_before", "dfi_after"):
        assert logged[f"fire/{key}"] == pytest.approx(report.total(key), rel=1e-12)
    assert logged["fire/fired"] == 1 and logged["fire/weights"] == len(report) and logged["fire/skipped"] == 0


def test_a_features_extractor_shared_by_actor_and_critic_is_projected_once():
    run = Run("sac")
    actor, critic = run.after.policy.actor, run.after.policy.critic
    assert critic.features_extractor is actor.features_extractor
    row = run.fire.last_report["actor.features_extractor.linear.0.weight"]
    assert row["aliases"] == ["critic.features_extractor.linear.0.weight"]
    distinct = {id(p) for p in [*actor.parameters(), *critic.parameters()] if p.ndim >= 2}
    assert len(run.fire.last_report) == len(distinct)
    expected = copy.deepcopy(run.before.policy.actor)
    fire_torch.apply(expected, **OPTIONS)
    torch.testing.assert_close(actor.features_extractor.linear[0].weight, expected.features_extractor.linear[0].weight,
                               rtol=1e-6, atol=1e-7)


# --- triggers and progress -----------------------------------------------------------------------


def test_the_data_free_dfi_trigger_reads_the_agents_weights():
    model = make("dqn")
    fire = FIRE(schedule=DfIAbove(0.01, every=100))
    model.learn(150, callback=fire)
    assert [h["step"] for h in fire.history] == [100]
    assert fire.history[0]["reasons"][0].startswith("DfI/n (mean over 3 layers)")


def test_a_callable_schedule_sees_the_probe_activations_and_the_update_count():
    seen = {}

    def boundary(moment):
        if moment.step == 100:
            seen.update(features=moment.features(), n_updates=moment.context["n_updates"])
            return "task changed"
        return False

    model = make("ppo")
    probe = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    fire = FIRE(schedule=When(boundary), probe=probe)
    model.learn(130, callback=fire)
    assert fire.history[0]["reasons"] == ["task changed"] and fire.history[0]["n_updates"] == seen["n_updates"] == 2
    assert set(seen["features"]) == {f"mlp_extractor.{net}.{k}" for net in ("policy_net", "value_net") for k in (1, 3)}
    assert all(a.shape == (32, 16) for a in seen["features"].values())


def test_a_resumed_callback_neither_fires_twice_nor_misses_a_boundary(tmp_path):
    model = make("dqn")
    first = FIRE(schedule=[100, 200])
    model.learn(150, callback=first)
    model.save(tmp_path / "agent")
    (tmp_path / "fire.json").write_text(json.dumps(first.state_dict()))

    def resume(state):
        again = DQN.load(tmp_path / "agent", env=make("dqn").get_env(), device="cpu")
        fire = FIRE(schedule=[100, 200])
        if state:
            fire.load_state_dict(json.loads((tmp_path / "fire.json").read_text()))
        again.learn(100, callback=fire, reset_num_timesteps=False)
        return fire

    assert [h["step"] for h in resume(state=True).history] == [100, 200]
    assert [h["step"] for h in resume(state=False).history] == [151, 200]  # without its state, 100 fires again


def test_verbose_prints_the_weights_left_alone_and_the_logger_counts_them(capsys):
    model = make("dqn")
    fire = FIRE(schedule=[100], verbose=1, exclude=["q_net.q_net.4"])
    after = Snapshot(100)
    model.learn(110, callback=CallbackList([fire, after]))
    out = capsys.readouterr().out
    assert "FIRE at step 100: scheduled at step 100: 2 weights projected" in out
    assert "left alone (excluded by 'q_net.q_net.4'): q_net.q_net.4.weight (2x16)" in out
    assert [s["name"] for s in fire.last_report.skipped] == ["q_net.q_net.4.weight"]
    assert after.logged["fire/skipped"] == 1


# --- refused -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"stpes": 5}, TypeError, "unknown option stpes="),
        ({"optimizer": None}, TypeError, "optimizer= is not an option here"),
        ({"method": "polar"}, ValueError, "method"),
        ({"schedule": Every(2, unit="epoch")}, ValueError, "SB3 does not have"),
    ],
)
def test_bad_options_are_refused_at_construction(options, error, words):
    with pytest.raises(error, match=words):
        FIRE(**{"schedule": [100], **options})


def test_a_pattern_that_matches_no_weight_is_refused_before_the_first_step():
    model = make("dqn")
    old = copy.deepcopy(model.policy.state_dict())
    with pytest.raises(ValueError, match="'q_net.fc' matches no weight"):
        model.learn(50, callback=FIRE(schedule=[10], include=["q_net.fc"]))
    assert model.num_timesteps == 0
    assert all(torch.equal(v, old[k]) for k, v in model.policy.state_dict().items())


def test_an_algorithm_without_a_table_entry_is_refused_by_name():
    model = OnPolicyAlgorithm(ActorCriticPolicy, "CartPole-v1", learning_rate=1e-3, n_steps=8, gamma=0.99, gae_lambda=0.95,
                              ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, use_sde=False, sde_sample_freq=-1,
                              device="cpu")
    with pytest.raises(TypeError, match="does not know the networks of OnPolicyAlgorithm; supported: DQN, SAC, TD3"):
        model.learn(16, callback=FIRE(schedule=[8]))
    assert model.num_timesteps == 0


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
