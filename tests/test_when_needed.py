"""fire_core.schedule.when_needed / LookaheadBelow, and benchmarks/when_needed_study.py --quick.

The rule is a trial on the new task: two copies of the model, one with FIRE,
each trained a few steps on new-task batches, their losses compared on a
held-out probe. Here it is run on small MLPs driven to lose plasticity behind
LayerNorm and BatchNorm (memorizing 256 shuffled labels at Adam lr 1e-2),
and on a plain MLP whose weights only grew (a 10% subset of the true labels
at the same learning rate, then the full set). Measured on seeds 0-2 when
this test was written (10 epochs on the new task afterwards): FIRE gained
+6.4 to +8.9 points behind LayerNorm and +4.4 to +12.2 behind BatchNorm, and
the trial's ratio read 0.29-0.31; on the plain MLP FIRE gained +0.2 to +1.8,
the ratio read 0.84-1.06, and the data-free DfI ratio had grown past 200.
"""

from __future__ import annotations

import copy
import doctest
import json
import math
from pathlib import Path

import pytest
from conftest import load_script

from fire_core.schedule import (
    LOOKAHEAD_RATIO, LOOKAHEAD_STEPS, DfIAbove, LookaheadBelow, Moment, as_schedule, traced_init, when_needed,
)
import fire_core.core.schedule as schedule_module

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

import fire_core.torch  # noqa: E402
from fire_core.demo import digits  # noqa: E402

_STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "when_needed_study.py"


# --- the trigger alone -------------------------------------------------------------------------------


def test_when_needed_is_one_lookahead_trigger_with_the_measured_threshold():
    (t,) = when_needed()
    assert isinstance(t, LookaheadBelow)
    assert t.threshold == LOOKAHEAD_RATIO and t.steps == LOOKAHEAD_STEPS and t.every == 1
    assert 0 < LOOKAHEAD_RATIO < 1
    assert t.spec() == {"type": "LookaheadBelow", "threshold": LOOKAHEAD_RATIO, "every": 1, "unit": "step",
                        "cooldown": 1, "reduce": "mean", "steps": LOOKAHEAD_STEPS}
    (e,) = when_needed(2, unit="epoch", steps=7, threshold=0.25)
    assert (e.every, e.unit, e.steps, e.threshold) == (2, "epoch", 7, 0.25)


def test_the_docstring_example_runs():
    finder = doctest.DocTestFinder()
    tests = finder.find(when_needed, "when_needed", globs={})
    runner = doctest.DocTestRunner()
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0 and runner.summarize(verbose=False).attempted >= 3


def test_it_fires_below_the_ratio_and_reports_both_losses():
    schedule = as_schedule(when_needed(threshold=0.5, steps=10))
    asked = []

    def trial(k):
        asked.append(k)
        return (2.0, 0.8)

    firing = schedule.poll(Moment(step=3, lookahead=trial))
    assert asked == [10]
    assert firing is not None and "0.8 / without 2 = 0.4 < 0.5" in firing.reasons[0]
    assert schedule.triggers[0].last_value == pytest.approx(0.4, rel=1e-15)
    assert schedule.poll(Moment(step=4, lookahead=lambda k: (2.0, 1.0))) is None  # 0.5 is not below 0.5
    assert schedule.triggers[0].last_value == 0.5


def test_a_poll_at_step_0_runs_no_trial():
    schedule = as_schedule(when_needed())

    def trial(k):
        raise AssertionError("no trial on the initial network")

    assert schedule.poll(Moment(step=0, lookahead=trial)) is None
    assert schedule.triggers[0].last_check is None


def test_missing_or_bad_trials_are_refused_naming_the_problem_and_change_nothing():
    schedule = as_schedule(when_needed())
    before = json.dumps(schedule.state_dict())
    with pytest.raises(ValueError, match="needs a trial of FIRE on the new task"):
        schedule.poll(Moment(step=5))
    for bad, what in [((1.0,), "must return"), ((float("nan"), 1.0), "finite and non-negative"),
                      ((1.0, -0.5), "finite and non-negative"), (3.0, "must return")]:
        with pytest.raises(ValueError, match=what):
            schedule.poll(Moment(step=5, lookahead=lambda k, bad=bad: bad))
    assert json.dumps(schedule.state_dict()) == before
    with pytest.raises(ValueError, match="positive"):
        LookaheadBelow(0.0)
    with pytest.raises(ValueError, match="steps"):
        LookaheadBelow(0.5, steps=0)
    with pytest.raises(ValueError, match="reduce"):
        LookaheadBelow(0.5, reduce="max")


def test_zero_losses_never_fire():
    t = LookaheadBelow(0.5)
    assert t.check(Moment(step=1, lookahead=lambda k: (0.0, 0.0))) is None and t.last_value == 1.0
    assert t.check(Moment(step=2, lookahead=lambda k: (0.0, 0.1))) is None and t.last_value == math.inf


def test_progress_resumes_in_a_new_schedule():
    first = as_schedule(when_needed(every=10))
    assert first.poll(Moment(step=10, lookahead=lambda k: (1.0, 0.1))) is not None
    saved = json.loads(json.dumps(first.state_dict()))
    again = as_schedule(when_needed(every=10))
    again.load_state_dict(saved)
    t = again.triggers[0]
    assert t.last_fired == 10 and t.last_losses == (1.0, 0.1) and len(again.history) == 1
    assert again.poll(Moment(step=15, lookahead=lambda k: (1.0, 0.1))) is None  # not yet the next multiple
    assert again.poll(Moment(step=20, lookahead=lambda k: (1.0, 0.1))) is not None


def test_optax_refuses_it_under_jit():
    pytest.importorskip("jax")
    with pytest.raises(ValueError, match="never sees"):
        traced_init(as_schedule(when_needed()))


def test_moment_keeps_its_positional_fields():
    m = Moment(3, 1, "epoch", None, None, {"a": 1})
    assert (m.step, m.epoch, m.at, m.context, m.lookahead) == (3, 1, "epoch", {"a": 1}, None)
    assert "LookaheadBelow" in schedule_module.__all__ and "when_needed" in schedule_module.__all__


# --- on real networks --------------------------------------------------------------------------------

WIDTH, SAMPLES, LR, STEPS1 = 64, 256, 1e-2, 800  # phase 1: memorize (or learn) at a high learning rate


def _net(norm: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layer = {"ln": nn.LayerNorm, "bn": nn.BatchNorm1d, "none": lambda h: nn.Identity()}[norm]
    return nn.Sequential(nn.Linear(64, WIDTH), layer(WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), layer(WIDTH),
                         nn.ReLU(), nn.Linear(WIDTH, 10))


def _fit(model, x, y, steps, seed, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    done = 0
    while done < steps:
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                return


def _trial(model, x_look, y_look, x_probe, y_probe):
    """Moment.lookahead for a plain loop: copies, FIRE on one, k Adam steps each, the probe's losses."""

    def lookahead(k):
        copies = [copy.deepcopy(model), copy.deepcopy(model)]
        fire_core.torch.apply(copies[1], steps=10)
        losses = []
        for c in copies:
            opt = torch.optim.Adam(c.parameters(), lr=1e-3)
            c.train()
            for step in range(k):
                b = slice((step % 4) * 64, (step % 4 + 1) * 64)
                loss = nn.functional.cross_entropy(c(x_look[b]), y_look[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                losses.append(float(nn.functional.cross_entropy(c(x_probe), y_probe)))
        return tuple(losses)

    return lookahead


@pytest.fixture(scope="module")
def polled():
    """Each network polled by when_needed() (and by the data-free DfIAbove) at its boundary."""
    torch.set_num_threads(1)
    x, y, _, _ = digits()
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(99))
    look, probe = order[:256], order[256:512]
    out = {}
    for name, norm, task in [("layernorm, lost", "ln", "random"), ("batchnorm, lost", "bn", "random"),
                             ("plain, only grew", "none", "subset")]:
        gen = torch.Generator().manual_seed(0)
        model = _net(norm, 0)
        schedule = as_schedule(when_needed() + [DfIAbove(100, every=1, relative=True, reduce="max")])
        weights = lambda: fire_core.torch.select(model)  # noqa: E731
        assert schedule.poll(Moment(step=0, weights=weights)) is None  # the initial network: DfI's baseline
        if task == "random":
            keep = torch.randperm(x.shape[0], generator=gen)[:SAMPLES]
            x_old, y_old = x[keep], y[keep][torch.randperm(SAMPLES, generator=gen)]
        else:
            keep = torch.randperm(x.shape[0], generator=gen)[: x.shape[0] // 10]
            x_old, y_old = x[keep], y[keep]
        _fit(model, x_old, y_old, STEPS1, 0, LR)
        batches = [(x[look[i : i + 64]], y[look[i : i + 64]]) for i in range(0, 256, 64)]
        trial = fire_core.torch.trial(model, batches, (x[probe], y[probe]), steps=10)  # what a user passes
        seen = []

        def recorded(k, trial=trial):
            seen.append(trial(k))
            return seen[-1]

        firing = schedule.poll(Moment(step=STEPS1, weights=weights, lookahead=recorded))
        out[name] = (firing, schedule, seen, model, (x[look], y[look], x[probe], y[probe]))
    return out


@pytest.mark.parametrize("name", ["layernorm, lost", "batchnorm, lost"])
def test_it_fires_where_plasticity_was_lost_behind_normalization(polled, name):
    firing, schedule, seen, _, _ = polled[name]
    (without, with_fire), = seen
    assert with_fire / without < LOOKAHEAD_RATIO
    assert firing is not None and any(r.startswith("lookahead:") for r in firing.reasons)
    assert schedule.triggers[0].last_value == pytest.approx(with_fire / without, rel=1e-12)


def test_it_stays_quiet_on_a_network_that_only_grew(polled):
    firing, schedule, seen, _, _ = polled["plain, only grew"]
    (without, with_fire), = seen
    assert with_fire / without > LOOKAHEAD_RATIO
    assert schedule.triggers[0].last_value == pytest.approx(with_fire / without, rel=1e-12)
    # its weights grew: the data-free rule reads a DfI ratio past 100 and fires; the trial does not
    assert firing is not None and len(firing.reasons) == 1 and firing.reasons[0].startswith("DfI/n")


# --- the study script --------------------------------------------------------------------------------


def test_the_library_trial_is_the_hand_written_loop_and_changes_nothing(polled):
    _, _, _, model, (x_look, y_look, x_probe, y_probe) = polled["layernorm, lost"]
    batches = [(x_look[i : i + 64], y_look[i : i + 64]) for i in range(0, 256, 64)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    rng = torch.random.get_rng_state()
    got = fire_core.torch.trial(model, batches, (x_probe, y_probe), steps=10)(30)
    want = _trial(model, x_look, y_look, x_probe, y_probe)(30)
    assert got == pytest.approx(want, rel=1e-5)
    assert not model.training and torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    model.train()


def test_the_trial_takes_keyword_inputs_and_its_own_loss():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, *, x):
            return self.fc(x)

    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    mse = nn.functional.mse_loss
    without, with_fire = fire_core.torch.trial(Keyword(), [({"x": x}, y)], ({"x": x}, y), loss=mse)(3)
    assert math.isfinite(without) and math.isfinite(with_fire) and without != with_fire


@pytest.mark.parametrize("args, match", [
    (([], (1, 2)), "batches"), (([(1, 2, 3)], (1, 2)), "batches"), (([(1, 2)], 5), "probe"),
])
def test_a_bad_trial_is_refused_naming_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        fire_core.torch.trial(nn.Linear(2, 2), *args)
    with pytest.raises(ValueError, match="lr"):
        fire_core.torch.trial(nn.Linear(2, 2), [(1, 2)], (1, 2), lr=0)


@pytest.fixture(scope="module")
def study():
    return load_script(_STUDY, "when_needed_study")


def test_the_weight_signals_match_an_svd_by_hand(study):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 5))
    got = study.weight_signals(model)
    spreads, stables = [], []
    conv = model[0].weight.detach().to(torch.float64)
    mats = [conv[:, :, i, j] for i in range(3) for j in range(3)] + [model[3].weight.detach().to(torch.float64)]
    for m in mats:
        s2 = torch.linalg.svdvals(m).numpy() ** 2
        spreads.append(float(((s2 / s2.mean()) ** 2).mean() - 1.0))
        stables.append(float(s2.sum() / s2.max() / min(m.shape)))
    assert got["spread"] == pytest.approx(max(spreads), rel=1e-10)
    assert got["stable_rank"] == pytest.approx(min(stables), rel=1e-10)


def test_the_quick_study_runs_and_records_every_signal(study, tmp_path):
    assert study.main(["--quick", "--jobs", "1", "--archs", "mlp,cnn-perm", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "when_needed_study-quick.json").read_text())
    rows = saved["results"]
    assert set(rows["eval"]) == {"mlp/random", "mlp/subset", "cnn-perm/b1", "cnn-perm/b2"}
    assert set(rows["heldout"]) == {"mlp/random", "mlp/subset"}
    names = study.signal_names(saved["cfg"])
    for runs in rows["eval"].values():
        for r in runs:
            assert set(names) <= set(r["signals"]) and 0 <= r["fire"] <= 1 and 0 <= r["none"] <= 1
            for k in saved["cfg"]["look_steps"]:
                s = r["signals"]
                assert s[f"look_{k}"] == pytest.approx(s[f"look_{k}_fire"] / s[f"look_{k}_none"], rel=1e-12)
                assert r["cost"][f"look_{k}"] > 0
    assert "## Thresholds chosen on the held-out" in (tmp_path / "when_needed_study-quick.md").read_text()


def test_a_threshold_is_the_geometric_midpoint_only_where_the_groups_separate(study):
    assert study.choose([4.0, 8.0], [1.0, 2.0]) == {"separates": True, "fires": "above", "threshold": math.sqrt(8.0)}
    assert study.choose([0.1, 0.2], [0.8, 1.0]) == {"separates": True, "fires": "below", "threshold": math.sqrt(0.16)}
    assert study.choose([1.0, 3.0], [2.0, 4.0])["threshold"] is None
