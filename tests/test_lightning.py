"""fire_core.lightning: the FIRE callback on real, short Lightning runs (CPU, synthetic data)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from torch import nn  # noqa: E402

import fire_core.torch as fire_torch  # noqa: E402
from fire_core.lightning import FIRE  # noqa: E402
from fire_core.schedule import AtSteps, DfIAbove, DormantAbove, Every  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:.*running statistics.*:UserWarning"),  # the BatchNorm note (tested below)
]
ROOT = Path(__file__).resolve().parent.parent


# --- tiny models and data -------------------------------------------------------------------------


class MLP(pl.LightningModule):
    def __init__(self, lr=1e-2, scheduler=None, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        self.lr, self.scheduler, self.scale = lr, scheduler, scale

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), self.scale * y)
        self.losses = getattr(self, "losses", []) + [float(loss.detach())]
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


class CNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
        )

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 4, 4)[:, :, :, :])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(torch.cat([x, x], dim=1)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class TwoOptimizers(MLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self(x), y))
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.net[0].parameters(), lr=1e-2),
                torch.optim.Adam([*self.net[2].parameters(), *self.net[4].parameters()], lr=1e-2)]


def loader(n=64, batch=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].abs()], dim=1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def trainer(callbacks, max_steps=12, **kw):
    kw = {"logger": False, "enable_checkpointing": False, **kw}
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, accelerator="cpu", enable_progress_bar=False,
                      enable_model_summary=False, **kw)


def twin(module):
    """A copy of the module's weights in a fresh instance of its class (not attached to any trainer)."""
    copy = type(module)()
    copy.load_state_dict(module.state_dict())
    return copy


class Before(pl.Callback):
    """Ordered before FIRE: the model and optimizer state as they are right before FIRE's hook, at every step."""

    def __init__(self):
        self.models, self.optim = {}, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.models[trainer.global_step] = twin(pl_module)
        self.optim[trainer.global_step] = [
            {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()} for opt in trainer.optimizers
        ]


class Fired(pl.Callback):
    """Ordered after FIRE: the steps at which FIRE produced a new report, and the state right after it."""

    def __init__(self, fire):
        self.fire, self.seen, self.steps, self.after, self.optim = fire, None, [], {}, {}

    def _look(self, trainer, pl_module):
        if self.fire.last_report is not None and self.fire.last_report is not self.seen:
            self.seen = self.fire.last_report
            self.steps.append(trainer.global_step)
            self.after[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.optim[trainer.global_step] = [
                {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()} for opt in trainer.optimizers
            ]

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._look(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self._look(trainer, pl_module)


def run(schedule, model=None, max_steps=12, data=None, **fire_options):
    fire = FIRE(schedule=schedule, **fire_options)
    before, fired = Before(), Fired(fire)
    model = MLP() if model is None else model
    t = trainer([before, fire, fired], max_steps=max_steps)
    t.fit(model, data or loader())
    return fire, before, fired, model, t


@pytest.fixture(scope="module")
def listed():
    return run([4, 9], steps=10)


# --- when it fires --------------------------------------------------------------------------------


def test_fires_at_the_listed_steps_and_nowhere_else(listed):
    fire, _, fired, _, _ = listed
    assert fired.steps == [4, 9]
    assert [f.step for f in fire.history] == [4, 9]


def test_fires_every_n_steps():
    _, _, fired, _, _ = run(Every(5), max_steps=17)
    assert fired.steps == [5, 10, 15]


def test_fires_at_an_epoch_start_in_epoch_units():
    fire = FIRE(schedule=AtSteps([2], unit="epoch"))
    fired = Fired(fire)
    trainer([fire, fired], max_steps=-1, max_epochs=3).fit(MLP(), loader())  # 8 batches an epoch
    assert fired.steps == [16]
    assert fire.history[0].epoch == 2


def test_fires_when_a_callable_says_so():
    seen = []

    def boundary(moment):
        seen.append(moment.context["trainer"].global_step == moment.step)
        return "task 2 starts" if moment.step == 7 else None

    fire, _, fired, _, _ = run(boundary)
    assert fired.steps == [7]
    assert fire.history[0].reasons == ["task 2 starts"]
    assert all(seen) and len(seen) == 12


# --- what a firing does ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [MLP, CNN])
def test_weights_equal_apply_on_a_copy_taken_right_before_the_firing(kind):
    _, before, fired, _, _ = run([6], model=kind(), steps=10)
    expected = before.models[6]
    fire_torch.apply(expected, steps=10)
    after = fired.after[6]
    assert after.keys() == expected.state_dict().keys()
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(after[name], value, rtol=1e-6, atol=0, msg=name)
    untouched = [n for n in after if not n.endswith("weight") or "net.1." in n]  # biases, BatchNorm
    for name in untouched:
        assert torch.equal(after[name], before.models[6].state_dict()[name]), name


def test_adam_state_is_fresh_for_exactly_the_projected_parameters(listed):
    _, before, fired, model, t = listed
    names = {p: n for n, p in model.named_parameters()}
    state = fired.optim[4][0]
    projected = {p for p in model.parameters() if names[p].endswith("weight")}
    assert not projected & set(state)  # dropped: the next step starts them as new parameters
    kept = [p for p in model.parameters() if p not in projected]
    assert kept and set(kept) <= set(state)
    for p in kept:
        for k, v in before.optim[4][0][p].items():
            assert torch.equal(state[p][k], v), (names[p], k)


def test_every_optimizer_of_the_trainer_is_reset():
    model = TwoOptimizers()
    fire, before, fired, _, t = run([6], model=model)
    assert fired.steps == [6]  # manual optimization: global_step counts both optimizers' steps, 2 a batch
    for opt, state in zip(t.optimizers, fired.optim[6]):
        mine = [p for g in opt.param_groups for p in g["params"]]
        weights = [p for p in mine if p.ndim == 2]
        biases = [p for p in mine if p.ndim == 1]
        assert weights and not set(weights) & set(state)
        assert set(biases) <= set(state)


def test_training_goes_on_after_the_firing(listed):
    _, before, fired, model, t = listed
    assert t.global_step == 12
    assert all(torch.isfinite(torch.tensor(model.losses)))
    final = model.state_dict()
    assert not torch.equal(final["net.0.weight"], fired.after[9]["net.0.weight"])


def test_report_totals_reach_the_csv_logger(tmp_path):
    fire = FIRE(schedule=[7], probe=torch.randn(16, 8))
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    trainer([fire], logger=logger).fit(MLP(), loader())  # log_every_n_steps=50: FIRE logs at its own step
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("fire/fired")]
    assert len(rows) == 1 and int(rows[0]["step"]) == 7
    report = fire.last_report
    expected = {"fire/fired": 1.0, "fire/sfe": report.total("sfe"), "fire/dfi_before": report.total("dfi_before"),
                "fire/dfi_after": report.total("dfi_after"), "fire/weights": 3.0, "fire/drift": report.drift}
    for key, value in expected.items():
        assert float(rows[0][key]) == pytest.approx(value, rel=1e-6), key
    assert report.drift > 0


def test_skipped_weights_and_notes_are_warned_once():
    with pytest.warns(UserWarning, match="running statistics") as caught:
        run([3, 6], model=CNN())
    assert sum("running statistics" in str(w.message) for w in caught) == 1


# --- triggers that measure ------------------------------------------------------------------------


def _dfi_per_unit(w):
    """DfI/n of a Linear weight relative to FIRE's target, written out: W / sqrt(d_out/d_in), small Gram."""
    d_out, d_in = w.shape
    v = w.double() / (d_out / d_in) ** 0.5
    g = v.T @ v if d_out >= d_in else v @ v.T
    return float(((g - torch.eye(g.shape[0], dtype=torch.float64)) ** 2).sum()) / min(d_out, d_in)


def test_dfi_trigger_fires_once_training_drives_the_dfi_past_its_threshold():
    threshold = 5.0  # a regression onto large targets grows the weights: DfI/n 1.6, 2.2, 3.6, 6.6 at steps 5..20
    fire, before, fired, _, _ = run(DfIAbove(threshold, every=5), model=MLP(lr=0.01, scale=10.0), max_steps=25)
    assert fired.steps, "the DfI never crossed the threshold"
    first = fired.steps[0]
    values = {s: sum(_dfi_per_unit(m.net[k].weight.detach()) for k in (0, 2, 4)) / 3
              for s, m in before.models.items() if s % 5 == 0}
    assert values[5] < threshold and first > 5  # it starts below
    assert all(values[s] <= threshold for s in values if s < first)  # not fired before the crossing
    assert values[first] > threshold
    assert fire.history[0].reasons[0].startswith("DfI/n")


def test_dormant_trigger_reads_the_activation_modules_on_the_probe():
    model = MLP()
    with torch.no_grad():
        model.net[0].bias[:12] = -100.0  # 12 of the first layer's 16 units never fire
    probe = torch.randn(32, 8)
    fire, _, fired, _, _ = run(DormantAbove(0.3, every=3), model=model, max_steps=4, probe=probe)
    assert fired.steps == [3]
    assert "dormant ratio" in fire.history[0].reasons[0] and "net.1" in fire.history[0].reasons[0]


# --- checkpoints ----------------------------------------------------------------------------------


def _checkpoint(tmp_path, max_steps):
    fire = FIRE(schedule=[8])
    t = trainer([fire], max_steps=max_steps)
    t.fit(MLP(), loader())
    path = tmp_path / f"at{max_steps}.ckpt"
    t.save_checkpoint(path)
    return fire, path


def test_a_run_resumed_before_the_boundary_fires_once_at_it(tmp_path):
    fire, path = _checkpoint(tmp_path, 5)
    assert fire.history == []
    assert torch.load(path, weights_only=False)["callbacks"][fire.state_key]["schedule"]["last_poll"] == 5
    resumed = FIRE(schedule=[8])
    fired = Fired(resumed)
    trainer([resumed, fired], max_steps=12).fit(MLP(), loader(), ckpt_path=path)
    assert fired.steps == [8]


def test_a_run_resumed_after_the_firing_does_not_fire_again(tmp_path):
    fire, path = _checkpoint(tmp_path, 10)
    assert [f.step for f in fire.history] == [8]
    resumed = FIRE(schedule=[8])
    fired = Fired(resumed)
    trainer([resumed, fired], max_steps=15).fit(MLP(), loader(), ckpt_path=path)
    assert fired.steps == []
    assert [f.step for f in resumed.history] == [8]  # the history came back with the checkpoint


# --- resuming, failures and logs (issue 21) -------------------------------------------------------


def test_the_callback_class_is_FIRECallback_and_FIRE_its_alias():
    import fire_core.lightning as fl

    assert fl.FIRECallback.__name__ == "FIRECallback"
    assert fl.FIRE is fl.FIRECallback
    assert {"FIRE", "FIRECallback"} <= set(fl.__all__)


def test_the_state_key_is_stable_and_independent_of_the_schedule():
    import fire_core.lightning as fl

    keys = {FIRE([6]).state_key, FIRE([6, 14]).state_key, FIRE(DfIAbove(2.0)).state_key,
            FIRE(lambda m: False).state_key}
    assert len(keys) == 1 and "0x" not in keys.pop()  # no schedule detail, no memory address
    named = fl.FIRECallback([6], name="fire").state_key
    assert named != FIRE([6]).state_key and named == fl.FIRECallback([6, 14], name="fire").state_key
    with pytest.raises(TypeError, match="name"):
        fl.FIRECallback([6], name=3)


RESUME_SCRIPT = '''
import functools, json, sys, warnings
import torch
torch.set_num_threads(1)
from torch import nn
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from fire_core.lightning import FIRE
from fire_core.schedule import Trigger, When


class MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class TaskSwitch:  # a callable object: "the task changed at this step"
    def __init__(self, boundaries):
        self.boundaries = boundaries

    def __call__(self, moment):
        return "task switch" if moment.step in self.boundaries else None


def at_boundary(moment, boundaries):
    return "boundary" if moment.step in boundaries else None


class Boundaries(Trigger):  # a user's own trigger: a spec, but the default repr (a memory address)
    def __init__(self, steps):
        self.steps, self.done = list(steps), []

    def spec(self):
        return {"type": "Boundaries", "steps": self.steps}

    def check(self, moment):
        due = [s for s in self.steps if s <= moment.step and s not in self.done]
        self.done.extend(due)
        return f"boundary {due} at {moment.step}" if due else None

    def state_dict(self):
        return {"done": list(self.done)}

    def load_state_dict(self, state):
        self.done = list(state["done"])


SCHEDULES = {
    "object": lambda: When(TaskSwitch([6, 14])),
    "partial": lambda: When(functools.partial(at_boundary, boundaries=(6, 14))),
    "trigger": lambda: Boundaries([6, 14]),
}

if __name__ == "__main__":
    phase, out = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :2] * x[:, 2:4]), batch_size=4)
    result = {}
    for kind, make in SCHEDULES.items():
        fire = FIRE(schedule=make())
        kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if phase == "train":
                ckpt = ModelCheckpoint(dirpath=out, filename=kind, every_n_train_steps=8, save_top_k=-1)
                pl.Trainer(max_steps=8, callbacks=[fire, ckpt], **kw).fit(MLP(), data)
            else:
                pl.Trainer(max_steps=16, callbacks=[fire], enable_checkpointing=False, **kw).fit(
                    MLP(), data, ckpt_path=f"{out}/{kind}.ckpt")
        result[kind] = {"history": [[f.step, f.reasons] for f in fire.history],
                        "warnings": [str(w.message) for w in caught if "FIRE" in str(w.message)]}
    with open(f"{out}/{phase}.json", "w") as f:
        json.dump(result, f)
'''


@pytest.fixture(scope="module")
def resumed_in_new_processes(tmp_path_factory):
    import json

    out = tmp_path_factory.mktemp("resume")
    script = out / "train.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for phase in ("train", "resume"):  # two processes: the second sees none of the first's objects
        proc = subprocess.run([sys.executable, str(script), phase, str(out)], capture_output=True, text=True,
                              env=env, cwd=out, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {phase: json.loads((out / f"{phase}.json").read_text()) for phase in ("train", "resume")}


@pytest.mark.parametrize("kind", ["object", "partial", "trigger"])
def test_a_run_resumed_in_a_new_process_neither_repeats_nor_loses_a_firing(resumed_in_new_processes, kind):
    train, resume = resumed_in_new_processes["train"][kind], resumed_in_new_processes["resume"][kind]
    assert [s for s, _ in train["history"]] == [6]
    assert [s for s, _ in resume["history"]] == [6, 14]  # 6 came back with the checkpoint, 14 fired; nothing at 9
    assert resume["warnings"] == []  # Lightning found the callback's state under its key


def _at8(tmp_path, schedule, **fire_options):
    fire = FIRE(schedule=schedule, **fire_options)
    t = trainer([fire], max_steps=8)
    t.fit(MLP(), loader())
    path = tmp_path / "at8.ckpt"
    t.save_checkpoint(path)
    return fire, path


def test_a_boundary_added_on_resume_fires_and_the_passed_one_does_not(tmp_path, caplog):
    import logging

    fire, path = _at8(tmp_path, [6])
    assert [f.step for f in fire.history] == [6]
    resumed = FIRE(schedule=[6, 14])
    fired = Fired(resumed)
    with caplog.at_level(logging.INFO):
        trainer([resumed, fired], max_steps=16).fit(MLP(), loader(), ckpt_path=path)
    assert fired.steps == [14]
    assert [f.step for f in resumed.history] == [6, 14]
    assert "scheduled at step 14" in resumed.history[1].reasons[0]
    logged = caplog.text
    assert "AtSteps([6])" in logged and "AtSteps([6, 14])" in logged  # what was carried over is logged


def test_a_changed_schedule_with_a_passed_unfired_boundary_is_refused_naming_both(tmp_path):
    _, path = _at8(tmp_path, [6])
    model = MLP()
    with pytest.raises(ValueError, match=r"AtSteps\(\[6\]\).*AtSteps\(\[4, 6\]\)"):
        trainer([FIRE(schedule=[4, 6])], max_steps=16).fit(model, loader(), ckpt_path=path)


def test_fire_state_saved_under_another_key_is_adopted_when_it_is_the_only_one(tmp_path, monkeypatch):
    import fire_core.lightning as fl

    fire, path = _at8(tmp_path, [6])
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["callbacks"].pop(fire.state_key)
    ckpt["callbacks"]["FIRE{'schedule': 'Schedule(AtSteps([6]))'}"] = state  # as the previous version keyed it
    torch.save(ckpt, path)
    resumed = fl.FIRECallback([6, 14], name="fire")
    fired = Fired(resumed)
    warned = _lightning_warnings(monkeypatch)
    trainer([resumed, fired], max_steps=16).fit(MLP(), loader(), ckpt_path=path)
    assert any("Please add the following callbacks" in w for w in warned)  # Lightning's, before our hook
    assert fired.steps == [14] and [f.step for f in resumed.history] == [6, 14]


def _lightning_warnings(monkeypatch) -> list[str]:
    """Lightning's warning about checkpointed callbacks, recorded where it is raised (trainer/call.py).

    Recorded rather than caught with pytest.warns: the warning filters are one
    process-wide list, and under load a thread left by an earlier test that
    leaves a catch_warnings block puts the suite's "error" filter back mid-test.
    """
    import lightning.pytorch.trainer.call as call

    warned: list[str] = []
    monkeypatch.setattr(call, "rank_zero_warn", lambda message, *a, **k: warned.append(str(message)))
    return warned


def test_several_fire_states_under_other_keys_are_refused_naming_them(tmp_path, monkeypatch):
    import fire_core.lightning as fl

    fire, path = _at8(tmp_path, [6])
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["callbacks"].pop(fire.state_key)
    ckpt["callbacks"]["FIRECallback{'name': 'a'}"] = state
    ckpt["callbacks"]["FIRECallback{'name': 'b'}"] = state
    torch.save(ckpt, path)
    warned = _lightning_warnings(monkeypatch)
    with pytest.raises(ValueError, match=r"(?s)'a'.*'b'.*'c'"):
        trainer([fl.FIRECallback([6], name="c")], max_steps=16).fit(MLP(), loader(), ckpt_path=path)
    assert any("add the following" in w for w in warned)


def test_two_callbacks_need_distinct_names(tmp_path):
    import fire_core.lightning as fl

    with pytest.raises(RuntimeError, match="state_key"):  # Lightning's own refusal, when the Trainer is built
        trainer([fl.FIRECallback([4]), fl.FIRECallback([6])])
    t = trainer([fl.FIRECallback([4])])
    t.callbacks.append(fl.FIRECallback([6]))  # past Lightning's check: ours, when fit starts, names the fix
    with pytest.raises(ValueError, match="name="):
        t.fit(MLP(), loader())
    a, b = fl.FIRECallback([4], name="a"), fl.FIRECallback([6], name="b")
    t = trainer([a, b], max_steps=8)
    t.fit(MLP(), loader())
    t.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert saved[a.state_key]["schedule"]["history"][0]["step"] == 4
    assert saved[b.state_key]["schedule"]["history"][0]["step"] == 6


class Checks(pl.Callback):
    """Ordered after FIRE: the steps at which a measured trigger checked."""

    def __init__(self, trigger):
        self.trigger, self.steps = trigger, []

    def _look(self):
        if self.trigger.last_check is not None and self.trigger.last_check not in self.steps:
            self.steps.append(self.trigger.last_check)

    def on_train_start(self, trainer, pl_module):
        self._look()

    def on_train_batch_end(self, *args):
        self._look()


def test_two_optimizers_check_at_the_first_poll_past_each_multiple_and_at_step_0():
    from fire_core.schedule import target_dfi

    model = TwoOptimizers()
    initial = [model.net[k].weight.detach().clone() for k in (0, 2, 4)]
    trigger = DfIAbove(100.0, every=5, relative=True)
    fire = FIRE(schedule=trigger)
    checks = Checks(trigger)
    trainer([fire, checks], max_steps=22).fit(model, loader())  # global_step 2, 4, 6, ... (two optimizers)
    assert checks.steps == [0, 6, 10, 16, 20]
    expected = sum(float(target_dfi(w, "oi")[0]) for w in initial) / 3
    assert trigger.baseline == pytest.approx(expected, rel=1e-6)  # the initial network, measured at step 0


def test_no_step_0_poll_when_resuming_past_it(tmp_path):
    trigger = DfIAbove(100.0, every=5, relative=True)
    _, path = _at8(tmp_path, trigger)
    resumed_trigger = DfIAbove(100.0, every=5, relative=True)
    checks = Checks(resumed_trigger)
    trainer([FIRE(schedule=resumed_trigger), checks], max_steps=12).fit(MLP(), loader(), ckpt_path=path)
    assert checks.steps == [5, 10]  # restored (5), then 10: no measurement at the resumed start
    assert resumed_trigger.baseline == trigger.baseline


def test_gradient_accumulation_polls_each_optimizer_step_once():
    seen = []
    fire = FIRE(schedule=lambda m: seen.append(m.step) or m.step == 3)
    fired = Fired(fire)
    trainer([fire, fired], max_steps=5, accumulate_grad_batches=2).fit(MLP(), loader())
    assert seen == [1, 2, 3, 4, 5] and fired.steps == [3]


def test_a_probe_that_does_not_fit_fails_when_training_starts():
    model = MLP()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 8)
    fire = FIRE(schedule=[6], probe=(x, x[:, :2]))  # a (x, y) batch, not the model's inputs
    t = trainer([fire])
    with pytest.raises(ValueError, match=r"(?s)FIRE.*probe.*MLP") as info:
        t.fit(model, loader())
    assert isinstance(info.value.__cause__, TypeError)
    assert t.global_step == 0 and fire.history == []
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


class Poison(pl.Callback):
    """Ordered before FIRE: a NaN in the first weight at ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")


def test_a_failed_firing_is_not_recorded_and_fires_when_resumed(tmp_path):
    fire = FIRE(schedule=[6])
    t = trainer([Poison(6), fire], max_steps=12)
    with pytest.raises(ValueError, match="net.0.weight"):
        t.fit(MLP(), loader())
    state = fire.state_dict()["schedule"]
    assert state["history"] == [] and state["trigger_state"] == [{"done": []}]  # the boundary is still ahead
    assert state["last_poll"] == 5
    t.save_checkpoint(tmp_path / "failed.ckpt")  # what an on-exception checkpoint would hold
    ckpt = torch.load(tmp_path / "failed.ckpt", weights_only=False)
    ckpt["state_dict"]["net.0.weight"] = torch.nan_to_num(ckpt["state_dict"]["net.0.weight"])  # the fix
    torch.save(ckpt, tmp_path / "fixed.ckpt")
    resumed = FIRE(schedule=[6])
    fired = Fired(resumed)
    trainer([resumed, fired], max_steps=12).fit(MLP(), loader(), ckpt_path=tmp_path / "fixed.ckpt")
    assert len(fired.steps) == 1 and fired.steps[0] >= 6
    assert [f.step for f in resumed.history] == fired.steps


def test_logs_a_running_count_and_the_report_metrics(tmp_path):
    fire = FIRE(schedule=[3, 7])
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    trainer([fire], logger=logger).fit(MLP(), loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("fire/fired")]
    assert [(int(r["step"]), float(r["fire/fired"])) for r in rows] == [(3, 1.0), (7, 2.0)]
    assert [f.info["fire/fired"] for f in fire.history] == [1.0, 2.0]
    for row, firing in zip(rows, fire.history):
        assert set(firing.info) == {"fire/fired", "fire/weights", "fire/skipped", "fire/sfe", "fire/dfi_before",
                                    "fire/dfi_after"}
        for key, value in firing.info.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-6), key
    assert fire.state_dict()["schedule"]["history"][1]["info"]["fire/fired"] == 2.0  # saved with the checkpoint


def test_report_false_is_accepted_and_logs_no_sfe_or_dfi(tmp_path):
    fire = FIRE(schedule=[3], report=False)
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    t = trainer([fire], logger=logger)
    t.fit(MLP(), loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if r.get("fire/fired"))
    assert float(row["fire/weights"]) == 3.0 and float(row["fire/fired"]) == 1.0
    assert not any(row.get(k) for k in ("fire/sfe", "fire/dfi_before", "fire/dfi_after"))
    assert "fire/sfe" not in fire.history[0].info and "fire/sfe" not in t.callback_metrics


# --- learning-rate schedules ----------------------------------------------------------------------

SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5)),
    "LinearLR": lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=30),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4),
              torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)], milestones=[4]),
}


class Rates(pl.Callback):
    """The (lr, beta1) each optimizer step uses."""

    def __init__(self):
        self.used = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        g = trainer.optimizers[0].param_groups[0]
        self.used.append((g["lr"], g["betas"][0]))


def _fresh_rates(make, n):
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched, rates = make(opt), []
    for _ in range(n):
        g = opt.param_groups[0]
        rates.append((g["lr"], g["betas"][0]))
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("name", SCHEDULERS)
def test_restart_warmup_gives_the_learning_rates_of_a_fresh_scheduler(name):
    rates = Rates()
    fire = FIRE(schedule=[6], restart_warmup=True)
    trainer([rates, fire], max_steps=16).fit(MLP(scheduler=SCHEDULERS[name]), loader())
    fresh = _fresh_rates(SCHEDULERS[name], 16)
    flat = lambda pairs: [x for pair in pairs for x in pair]  # noqa: E731
    assert flat(rates.used[:6]) == pytest.approx(flat(fresh[:6]), rel=1e-12)
    assert flat(rates.used[6:]) == pytest.approx(flat(fresh[:10]), rel=1e-12)  # step 7 on: the schedule from its start
    assert flat(fresh[6:]) != pytest.approx(flat(fresh[:10]))  # (which differs from carrying on)


def test_without_restart_warmup_the_schedule_carries_on():
    rates = Rates()
    trainer([rates, FIRE(schedule=[6])], max_steps=16).fit(MLP(scheduler=SCHEDULERS["LinearLR"]), loader())
    assert [lr for lr, _ in rates.used] == pytest.approx([lr for lr, _ in _fresh_rates(SCHEDULERS["LinearLR"], 16)], rel=1e-12)


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"stepz": 10}, TypeError, "stepz"),
        ({"optimizer": None}, TypeError, "every optimizer the trainer holds"),
        ({"dry_run": True}, TypeError, "dry_run"),
        ({"method": "exact"}, ValueError, "method"),
        ({"steps": "10"}, ValueError, "steps"),
        ({"conv_groups": "all"}, ValueError, "conv_groups"),
        ({"distributed": "shard"}, ValueError, "distributed"),
        ({"frozen": "yes"}, TypeError, "frozen"),
        ({"restart_warmup": 1}, TypeError, "restart_warmup"),
        ({"probe": [1, 2]}, TypeError, "probe"),
        ({"schedule": DormantAbove(0.5)}, ValueError, "probe="),
        ({"schedule": "often"}, TypeError, "schedule="),
    ],
)
def test_bad_options_are_errors_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FIRE(**{"schedule": [5], **kwargs})


def test_a_pattern_that_selects_nothing_fails_before_the_first_step():
    model = MLP()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="nte"):
        trainer([FIRE(schedule=[5], include=["nte.0"])]).fit(model, loader())
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_import_fire_core_does_not_import_lightning():
    code = "import sys, fire_core, fire_core.torch, fire_core.schedule; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.stdout.strip() == "False", out.stderr


# --- DDP and FSDP2 (ModelParallelStrategy) on two gloo CPU processes ----------------------------------------------------------------

DDP_SCRIPT = '''
import sys
import torch
torch.set_num_threads(1)
from torch import nn
import lightning.pytorch as pl
from fire_core.lightning import FIRE
from fire_core.schedule import When
from lightning.pytorch.strategies import ModelParallelStrategy

OUT = sys.argv[1]


class MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class FSDP2(MLP):  # parameters sharded as DTensors by fully_shard (FSDP2), through Lightning's configure_model
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def full(state):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


class Snap(pl.Callback):
    def __init__(self, tag):
        self.tag = tag

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step in (6, 8):
            names = {p: n for n, p in pl_module.named_parameters()}
            torch.save({"weights": full(pl_module.state_dict()),
                        "with_state": sorted(names[p] for p in trainer.optimizers[0].state)},
                       f"{OUT}/{self.tag}{trainer.global_step}_{trainer.global_rank}.pt")


def rank0_only(moment):  # a trigger that decides differently on the ranks: rank 0's decision must hold everywhere
    return moment.step == 8 and moment.context["trainer"].global_rank == 0


if __name__ == "__main__":
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :2] * x[:, 2:4]), batch_size=4)
    for kind in ("ddp", "fsdp2"):  # both in the same two processes: one start-up
        strategy = "ddp" if kind == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        fire = FIRE(schedule=[6, When(rank0_only)], steps=10)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=10, logger=False,
                             callbacks=[Snap(kind + "_before"), fire, Snap(kind + "_after")], enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(FSDP2() if kind == "fsdp2" else MLP(), data)
        torch.save({"history": [f.step for f in fire.history], "final": full(trainer.lightning_module.state_dict())},
                   f"{OUT}/{kind}_done_{trainer.global_rank}.pt")
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "train.py"
    script.write_text(DDP_SCRIPT)
    # Lightning's ranks meet at MASTER_PORT: a port found free here can be taken by another process before rank 0
    # binds it, so a run that lost its port is tried again with another. A hang (one rank waiting in a
    # collective) fails at the timeout, generous for a loaded machine.
    for attempt in range(3):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env,
                              cwd=out, timeout=900)
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower():
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {p.stem: torch.load(p, weights_only=False) for p in out.glob("*.pt")}


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_distributed_every_rank_fires_at_the_same_steps(ddp_run, kind):
    assert ddp_run[f"{kind}_done_0"]["history"] == ddp_run[f"{kind}_done_1"]["history"] == [6, 8]


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_distributed_every_rank_holds_apply_of_the_single_process_model(ddp_run, kind):
    for step in (6, 8):
        before = ddp_run[f"{kind}_before{step}_0"]["weights"]
        assert all(torch.equal(before[k], ddp_run[f"{kind}_before{step}_1"]["weights"][k]) for k in before)
        expected = nn.Module()
        expected.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        expected.load_state_dict(before)
        fire_torch.apply(expected, steps=10)
        for rank in (0, 1):
            after = ddp_run[f"{kind}_after{step}_{rank}"]
            for name, value in expected.state_dict().items():
                torch.testing.assert_close(after["weights"][name], value, rtol=1e-6, atol=0, msg=f"{name} rank {rank}")
            assert after["with_state"] == ["net.0.bias", "net.2.bias"]  # projected weights' Adam state dropped


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_distributed_ranks_train_on_in_step(ddp_run, kind):
    final0, final1 = ddp_run[f"{kind}_done_0"]["final"], ddp_run[f"{kind}_done_1"]["final"]
    assert all(torch.equal(final0[k], final1[k]) for k in final0)
