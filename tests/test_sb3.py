"""fire_core.sb3.FIRECallback on real Stable-Baselines3 runs (CartPole-v1, Pendulum-v1, a few hundred steps).

Each run has a snapshot callback before FIRE and one after it in a
CallbackList, so the networks and optimizer states are deep-copied right
before and right after the firing; the expected weights are
fire_core.torch.apply on a copy of each network taken before it.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

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
from fire_core.schedule import DfIAbove, DormantAbove, Every, Firing, When, target_dfi  # noqa: E402
from fire_core.sb3 import ALGORITHMS, FIRE, FIRECallback  # noqa: E402

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
        self.fire = FIRECallback(schedule=[AT], sync_targets=sync_targets, **OPTIONS)
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
    assert [h.step for h in run.fire.history] == [AT]
    assert run.before.step == run.after.step == AT
    assert run.fire.history[0].reasons == [f"scheduled at step {AT}"]


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
    assert run.fire.history[0].info["targets_synced"] == [t for t, _ in run.agent.targets]


def test_sync_targets_false_keeps_the_old_targets(unsynced):
    assert unsynced.agent.targets and unsynced.fire.history[0].info["targets_synced"] == []
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
    info = run.fire.history[0].info  # what was logged is kept with the firing
    assert {k: info[k] for k in report.metrics()} == report.metrics()


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


def test_td3_with_three_critics_behind_vecnormalize_fires_and_goes_on_learning():
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0))
    model = TD3("MlpPolicy", env, learning_starts=40, seed=0, device="cpu",
                policy_kwargs=dict(n_critics=3, net_arch=[16, 16]))
    probe = env.normalize_obs(np.stack([env.observation_space.sample() for _ in range(16)]))
    fire, after = FIRECallback(schedule=[100, DfIAbove(1e9, every=50, relative=True)], probe=probe), Snapshot(100)
    model.learn(200, callback=CallbackList([fire, after]))
    assert [h.step for h in fire.history] == [100] and model.num_timesteps == 200
    names = {row["name"] for row in fire.last_report.rows}
    assert {f"critic.qf{k}.{i}.weight" for k in range(3) for i in (0, 2, 4)} <= names and len(names) == 12
    assert fire.history[0].info["targets_synced"] == ["actor_target", "critic_target"]
    now = _params(model.policy)
    assert all(torch.isfinite(v).all() for v in now.values())
    assert not torch.equal(now["critic.qf2.0.weight"], _params(after.policy)["critic.qf2.0.weight"])  # it learns on


# --- triggers and progress -----------------------------------------------------------------------


def test_the_data_free_dfi_trigger_reads_the_agents_weights():
    model = make("dqn")
    fire = FIRECallback(schedule=DfIAbove(0.01, every=100))
    model.learn(150, callback=fire)
    assert [h.step for h in fire.history] == [100]
    assert fire.history[0].reasons[0].startswith("DfI/n (mean over 3 layers)")


def test_a_callable_schedule_sees_the_probe_activations_and_the_update_count():
    seen = {}

    def boundary(moment):
        if moment.step == 100:
            seen.update(features=moment.features(), n_updates=moment.context["n_updates"])
            return "task changed"
        return False

    model = make("ppo")
    probe = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    fire = FIRECallback(schedule=When(boundary), probe=probe)
    model.learn(130, callback=fire)
    assert fire.history[0].reasons == ["task changed"] and fire.history[0].info["n_updates"] == seen["n_updates"] == 2
    assert set(seen["features"]) == {f"mlp_extractor.{net}.{k}" for net in ("policy_net", "value_net") for k in (1, 3)}
    assert all(a.shape == (32, 16) for a in seen["features"].values())


def test_a_resumed_callback_neither_fires_twice_nor_misses_a_boundary(tmp_path):
    model = make("dqn")
    first = FIRECallback(schedule=[100, 200])
    model.learn(150, callback=first)
    model.save(tmp_path / "agent")
    (tmp_path / "fire.json").write_text(json.dumps(first.state_dict()))

    def resume(state):
        again = DQN.load(tmp_path / "agent", env=make("dqn").get_env(), device="cpu")
        fire = FIRECallback(schedule=[100, 200])
        if state:
            fire.load_state_dict(json.loads((tmp_path / "fire.json").read_text()))
        again.learn(100, callback=fire, reset_num_timesteps=False)
        return fire

    assert [h.step for h in resume(state=True).history] == [100, 200]
    assert [h.step for h in resume(state=False).history] == [151, 200]  # without its state, 100 fires again


def test_verbose_prints_the_weights_left_alone_and_the_logger_counts_them(capsys):
    model = make("dqn")
    fire = FIRECallback(schedule=[100], verbose=1, exclude=["q_net.q_net.4"])
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
        ({"dry_run": True}, TypeError, "dry_run= is not an option here: a callback that changes nothing"),
        ({"method": "polar"}, ValueError, "method"),
        ({"schedule": Every(2, unit="epoch")}, ValueError, "SB3 does not have"),
    ],
)
def test_bad_options_are_refused_at_construction(options, error, words):
    with pytest.raises(error, match=words):
        FIRECallback(**{"schedule": [100], **options})


def test_a_pattern_that_matches_no_weight_is_refused_before_the_first_step():
    model = make("dqn")
    old = copy.deepcopy(model.policy.state_dict())
    with pytest.raises(ValueError, match="'q_net.fc' matches no weight"):
        model.learn(50, callback=FIRECallback(schedule=[10], include=["q_net.fc"]))
    assert model.num_timesteps == 0
    assert all(torch.equal(v, old[k]) for k, v in model.policy.state_dict().items())


def test_an_algorithm_without_a_table_entry_is_refused_by_name():
    model = OnPolicyAlgorithm(ActorCriticPolicy, "CartPole-v1", learning_rate=1e-3, n_steps=8, gamma=0.99, gae_lambda=0.95,
                              ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, use_sde=False, sde_sample_freq=-1,
                              device="cpu")
    with pytest.raises(TypeError, match="does not know the networks of OnPolicyAlgorithm; supported: DQN, SAC, TD3"):
        model.learn(16, callback=FIRECallback(schedule=[8]))
    assert model.num_timesteps == 0


# --- resuming in a new process -------------------------------------------------------------------

# A user's training script: a module-level task-switch object and a functools.partial as triggers.
# Each run is a new process; the model and the callback's state are saved beside each other.
CHILD = textwrap.dedent("""
    import functools, json, sys
    import torch
    from stable_baselines3 import DQN
    from fire_core.schedule import When
    from fire_core.sb3 import FIRECallback

    class TaskSwitch:  # the task changes every `period` environment steps
        def __init__(self, period):
            self.period = period
        def __call__(self, moment):
            return f"task {moment.step // self.period} starts" if moment.step % self.period == 0 else False

    def every(moment, period):
        return moment.step % period == 0

    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args["schedule"] == "callables":
        schedule = [120, When(TaskSwitch(100)), When(functools.partial(every, period=150))]
    else:
        schedule = args["schedule"]
    make = lambda: DQN("MlpPolicy", "CartPole-v1", learning_starts=20, train_freq=4, seed=0, device="cpu",
                       policy_kwargs=dict(net_arch=[8]))
    fire = FIRECallback(schedule=schedule, verbose=args.get("verbose", 0))
    lines = []
    if "load" in args:
        model = DQN.load(args["load"] + "/agent", env=make().get_env(), device="cpu")
        with open(args["load"] + "/fire.json") as f:
            lines = fire.load_state_dict(json.load(f))
        model.learn(args["until"] - model.num_timesteps, callback=fire, reset_num_timesteps=False)
    else:
        model = make()
        model.learn(args["until"], callback=fire)
    if "save" in args:
        model.save(args["save"] + "/agent")
        with open(args["save"] + "/fire.json", "w") as f:
            json.dump(fire.state_dict(), f)
    history = [h if isinstance(h, dict) else h.to_dict() for h in fire.history]
    print("RESULT " + json.dumps({"history": [[h["step"], h["reasons"]] for h in history],
                                  "num_timesteps": model.num_timesteps, "lines": lines}))
""")


def _children(tmp_path, *runs: dict) -> list[tuple[dict, str]]:
    """Run the training script once per ``runs`` entry, each in a new process, all at once; (result, stdout)."""
    script = tmp_path / "train.py"
    script.write_text(CHILD)
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps(args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for args in runs]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        out.append((json.loads(result[-1][len("RESULT "):]), stdout))
    return out


def _child(tmp_path, **args) -> tuple[dict, str]:
    return _children(tmp_path, args)[0]


def test_callable_triggers_resume_in_a_new_process_neither_repeating_nor_missing_a_firing(tmp_path):
    (whole, _), (first, _) = _children(tmp_path, dict(schedule="callables", until=400),
                                       dict(schedule="callables", until=250, save=str(tmp_path)))
    second, _ = _child(tmp_path, schedule="callables", until=400, load=str(tmp_path))
    steps = [h[0] for h in whole["history"]]
    assert steps == [100, 120, 150, 200, 300, 400]
    assert [h[0] for h in first["history"]] == [100, 120, 150, 200]
    assert second["history"] == whole["history"]  # the loaded firings, then 300 and 400: none twice, none missed
    assert second["num_timesteps"] == 400 and second["lines"] == []  # the same schedule: nothing carried over
    assert whole["history"][4][1] == ["task 3 starts", "When(partial(__main__.every)) returned True at step 300"]


def test_a_changed_schedule_resumed_in_a_new_process_fires_only_its_new_boundary(tmp_path):
    first, _ = _child(tmp_path, schedule=[600], until=800, save=str(tmp_path))
    assert [h[0] for h in first["history"]] == [600]
    second, out = _child(tmp_path, schedule=[600, 1400], until=1500, load=str(tmp_path), verbose=1)
    assert [h[0] for h in second["history"]] == [600, 1400]  # 600 not again
    assert second["lines"] and second["lines"][0].startswith("resumed the saved schedule ['AtSteps([600])'] and "
                                                             "this one ['AtSteps([600, 1400])']")
    for line in second["lines"]:  # verbose=1 prints what was carried over
        assert line in out


def test_what_a_changed_schedule_carried_over_goes_to_the_sb3_logger(tmp_path):
    from stable_baselines3.common.logger import configure

    model = make("dqn")
    first = FIRECallback(schedule=[100])
    model.learn(150, callback=first)
    again = FIRECallback(schedule=[100, 300])
    lines = again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    logger = configure(str(tmp_path), ["log"])
    model.set_logger(logger)
    model.learn(200, callback=again, reset_num_timesteps=False)
    logger.close()
    text = (tmp_path / "log.txt").read_text()
    assert lines and all(f"FIRECallback: {line}" in text for line in lines)
    assert [h.step for h in again.history] == [100, 300]

def test_a_changed_schedule_that_would_skip_a_boundary_is_refused_before_anything_changes():
    model = make("dqn")
    first = FIRECallback(schedule=[100])
    model.learn(150, callback=first)
    state = json.loads(json.dumps(first.state_dict()))
    again = FIRECallback(schedule=[100, 120])
    with pytest.raises(ValueError, match=r"AtSteps\(\[100\]\).*AtSteps\(\[100, 120\]\)"):
        again.load_state_dict(state)
    assert again.history == [] and again.state_dict() == FIRECallback(schedule=[100, 120]).state_dict()


def test_the_previous_state_format_still_loads_its_history_into_firing_info():
    model = make("dqn")
    fire = FIRECallback(schedule=[100, 200])
    model.learn(150, callback=fire)
    firing = fire.history[0]
    old = {"schedule": fire.schedule.state_dict(),
           "history": [{**firing.to_dict(), "n_updates": 80, "sfe": 1.5, "dfi_before": 2.0, "dfi_after": 0.5,
                        "weights": 3, "skipped": 0, "targets_synced": ["q_net_target"]}]}
    for f in old["schedule"]["history"]:
        f.pop("info", None)  # the schedule of that version kept no info
    again = FIRECallback(schedule=[100, 200])
    again.load_state_dict(json.loads(json.dumps(old)))
    assert [h.step for h in again.history] == [100]
    assert again.history[0].info == {"n_updates": 80, "targets_synced": ["q_net_target"], "fire/weights": 3.0,
                                     "fire/skipped": 0.0, "fire/sfe": 1.5, "fire/dfi_before": 2.0,
                                     "fire/dfi_after": 0.5}


# --- when the schedule is checked ----------------------------------------------------------------


class Counted(DfIAbove):
    """DfIAbove that records the steps it measured at."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.measured: list[int] = []

    def _values(self, moment):
        self.measured.append(moment.step)
        return super()._values(moment)


def test_with_three_envs_a_periodic_trigger_checks_at_the_first_step_past_each_multiple():
    from stable_baselines3.common.env_util import make_vec_env

    model = DQN("MlpPolicy", make_vec_env("CartPole-v1", n_envs=3, seed=0), learning_starts=20, seed=0, device="cpu",
                policy_kwargs=dict(net_arch=[8]))
    trigger = Counted(1e9, every=10)
    model.learn(72, callback=FIRECallback(schedule=trigger))
    assert trigger.measured == [0, 12, 21, 30, 42, 51, 60, 72]  # 0: the initial network


def test_the_relative_baseline_is_the_initial_network():
    model = make("dqn")
    initial = copy.deepcopy(model.policy.q_net)
    trigger = DfIAbove(1e9, every=50, relative=True)
    model.learn(60, callback=FIRECallback(schedule=trigger))
    values = [float(v) for _, w, layout in fire_torch.select(nn.ModuleDict({"q_net": initial}))
              for v in target_dfi(w, layout)]
    assert trigger.baseline == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert trigger.last_check == 50


def test_a_resumed_run_does_not_poll_step_0_again():
    model = make("dqn")
    trigger = Counted(1e9, every=50, relative=True)
    fire = FIRECallback(schedule=trigger)
    model.learn(60, callback=fire)
    model.learn(50, callback=fire, reset_num_timesteps=False)
    assert trigger.measured == [0, 50, 100]


# --- the probe, at the start ---------------------------------------------------------------------


def test_a_probe_that_does_not_fit_fails_when_learn_starts_and_changes_nothing():
    model = make("dqn")
    old = copy.deepcopy(model.policy.state_dict())
    fire = FIRECallback(schedule=[DormantAbove(0.5, every=100)], probe=np.zeros((8, 3), np.float32))
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"FIRECallback: the probe .*\(8, 3\).* DQN") as caught:
        model.learn(50, callback=fire)
    assert caught.value.__cause__ is not None  # the original error, chained
    assert model.num_timesteps == 0
    assert all(torch.equal(v, old[k]) for k, v in model.policy.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert fire.history == [] and fire.schedule.last_poll is None


def test_a_probe_that_fits_runs_once_at_the_start_without_advancing_the_random_numbers(monkeypatch):
    model = make("ppo")
    probe = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    fire = FIRECallback(schedule=[1000], probe=probe)
    calls = []
    real = fire_torch.activations
    monkeypatch.setattr(fire_torch, "activations", lambda *a, **k: calls.append(1) or real(*a, **k))
    fire.init_callback(model)
    rng = torch.get_rng_state()
    fire.on_training_start({}, {})
    assert torch.equal(torch.get_rng_state(), rng) and calls == [1]


# --- a failed firing is not recorded -------------------------------------------------------------


class Poison(BaseCallback):
    """Puts a NaN in the first layer's weight at step ``at`` (once), before FIRE polls."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.done = at, False

    def _on_step(self) -> bool:
        if not self.done and self.num_timesteps == self.at:
            with torch.no_grad():
                self.model.policy.q_net.q_net[0].weight[0, 0] = float("nan")
            self.done = True
        return True


def test_a_failed_firing_is_not_recorded_and_a_continued_or_resumed_run_fires_there():
    model = make("dqn")
    poison, fire = Poison(100), FIRECallback(schedule=[100])
    with pytest.raises(ValueError, match="finite|NaN|nan"):
        model.learn(150, callback=CallbackList([poison, fire]))
    assert model.num_timesteps == 100 and fire.history == []
    saved = json.loads(json.dumps(fire.state_dict()))
    assert saved["schedule"]["trigger_state"] == [{"done": []}] and saved["schedule"]["history"] == []
    target = model.policy.q_net_target.q_net[0].weight
    assert torch.isfinite(target).all()  # the NaN weight was not synced into the target

    with torch.no_grad():  # repaired
        model.policy.q_net.q_net[0].weight[0, 0] = 0.0
    resumed = FIRECallback(schedule=[100])
    resumed.load_state_dict(saved)
    twin = copy.deepcopy(model)
    model.learn(20, callback=CallbackList([poison, fire]), reset_num_timesteps=False)
    assert [(h.step, h.reasons) for h in fire.history] == [(101, ["scheduled at step 100 (reached at step 101)"])]
    twin.learn(20, callback=resumed, reset_num_timesteps=False)
    assert [h.step for h in resumed.history] == [101]


# --- logs ----------------------------------------------------------------------------------------


def test_the_class_is_firecallback_and_fire_is_its_alias():
    import fire_core.sb3 as sb3_module

    assert FIRECallback.__name__ == "FIRECallback" and FIRE is FIRECallback
    assert {"FIRE", "FIRECallback"} <= set(sb3_module.__all__)


def test_report_false_logs_the_weights_projected_and_no_sfe():
    model = make("dqn")
    fire, after = FIRECallback(schedule=[100], report=False), Snapshot(100)
    old = copy.deepcopy(model.policy.q_net)
    model.learn(110, callback=CallbackList([fire, after]))
    logged = {k: v for k, v in after.logged.items() if k.startswith("fire/")}
    assert logged == {"fire/fired": 1, "fire/weights": 3.0, "fire/skipped": 0.0}
    info = fire.history[0].info
    assert {k for k in info if k.startswith("fire/")} == {"fire/weights", "fire/skipped"}
    assert info["targets_synced"] == ["q_net_target"] and isinstance(info["n_updates"], int)
    assert not torch.equal(after.policy.q_net.q_net[0].weight, old.q_net[0].weight)  # the weights did move


def test_fired_is_the_running_count_and_history_is_json_able():
    model = make("dqn")
    fire, at_second = FIRECallback(schedule=Every(60)), Snapshot(120)
    model.learn(130, callback=CallbackList([fire, at_second]))
    assert [h.step for h in fire.history] == [60, 120] and all(isinstance(h, Firing) for h in fire.history)
    assert at_second.logged["fire/fired"] == 2
    assert json.loads(json.dumps(fire.state_dict()))["schedule"]["history"][1]["info"]["fire/weights"] == 3.0


def test_log_false_records_nothing_in_the_sb3_logger():
    model = make("dqn")
    fire, after = FIRECallback(schedule=[100], log=False), Snapshot(100)
    model.learn(110, callback=CallbackList([fire, after]))
    assert not [k for k in after.logged if k.startswith("fire/")] and len(fire.history) == 1


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
