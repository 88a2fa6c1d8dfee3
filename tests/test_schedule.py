"""fire_core.schedule: the schedule forms, resumption, the data-free DfI trigger and the activation triggers."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fire_core
from fire_core.schedule import (
    AtSteps,
    DfIAbove,
    DormantAbove,
    Every,
    Moment,
    Schedule,
    SrankBelow,
    When,
    as_schedule,
    target_dfi,
    traced_init,
    traced_poll,
)


def _fired_steps(schedule: Schedule, steps, **moment) -> list[int]:
    return [k for k in steps if schedule.poll(Moment(step=k, **moment))]


# --- forms ---------------------------------------------------------------------------------------------


def test_a_list_fires_once_at_each_step():
    s = as_schedule([20, 10])
    assert _fired_steps(s, range(1, 31)) == [10, 20]
    assert [f.reasons for f in s.history] == [["scheduled at step 10"], ["scheduled at step 20"]]


def test_a_boundary_between_polls_fires_at_the_first_poll_past_it_and_says_so():
    s = as_schedule([10, 12])
    assert _fired_steps(s, range(0, 31, 7)) == [14]  # polls at 0, 7, 14, 21, 28: both boundaries at 14, once
    assert s.history[0].reasons == ["scheduled at steps 10, 12 (reached at step 14)"]


def test_every_n_fires_at_multiples_only():
    assert _fired_steps(as_schedule(Every(4)), range(0, 14)) == [4, 8, 12]
    assert _fired_steps(as_schedule({"every": 4, "start": 2}), range(0, 14)) == [6, 10]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), gaps=st.lists(st.integers(1, 12), min_size=1, max_size=30))
def test_every_n_fires_exactly_when_a_multiple_was_crossed(n, gaps):
    polls = np.cumsum(gaps).tolist()
    fired = _fired_steps(as_schedule(Every(n)), polls)
    crossed = [b for a, b in zip([0, *polls], polls) if b // n > a // n]  # independent: a new multiple since the last poll
    assert fired == crossed


def test_epoch_units_fire_only_at_epoch_polls():
    s = as_schedule(AtSteps([2], unit="epoch"))
    assert not s.poll(Moment(step=50, epoch=2, at="step"))
    assert s.poll(Moment(step=50, epoch=2, at="epoch")).reasons == ["scheduled at epoch 2"]
    assert _fired_steps(as_schedule({"every": 2, "unit": "epoch"}), range(1, 7), at="epoch", epoch=None) == []


def test_every_in_epochs_fires_at_epoch_multiples():
    s = as_schedule(Every(2, unit="epoch"))
    fired = [e for e in range(0, 7) if s.poll(Moment(step=10 * e, epoch=e, at="epoch"))]
    assert fired == [2, 4, 6]


def test_a_callable_fires_when_true_and_its_string_is_the_reason():
    task = {0: "a", 5: "b", 9: "c"}
    current = {"id": "a"}

    def boundary(m):
        new = task.get(m.step, current["id"])
        changed, current["id"] = new != current["id"], new
        return f"task {new}" if changed else False

    s = as_schedule(boundary)
    assert _fired_steps(s, range(1, 12)) == [5, 9]
    assert [f.reasons for f in s.history] == [["task b"], ["task c"]]


def test_a_list_of_forms_fires_when_any_fires_with_every_reason():
    s = as_schedule([6, Every(3), When(lambda m: m.step == 7)])
    assert _fired_steps(s, range(1, 10)) == [3, 6, 7, 9]
    assert s.history[1].reasons == ["scheduled at step 6", "every 3 steps: step 6"]
    assert str(s.history[1]) == "FIRE at step 6: scheduled at step 6; every 3 steps: step 6"


@pytest.mark.parametrize(
    "spec, error, text",
    [
        ([], ValueError, "never be applied"),
        (3, TypeError, "schedule= takes"),
        ("100", TypeError, "schedule= takes"),
        ([[100]], TypeError, "nested lists"),
        ([0], ValueError, "at least 1"),
        ([1.5], TypeError, "schedule= takes"),
        ({"every": 0}, ValueError, "at least 1"),
        ({"each": 10}, ValueError, "{'every': N}"),
        (None, TypeError, "schedule= takes"),
    ],
)
def test_bad_forms_are_errors_naming_the_problem(spec, error, text):
    with pytest.raises(error, match=text.replace("[", r"\[").replace("{", r"\{")):
        as_schedule(spec)


def test_bad_trigger_arguments_are_errors():
    with pytest.raises(ValueError, match="unit must be one of"):
        Every(3, unit="minute")
    with pytest.raises(TypeError, match="threshold must be a finite number"):
        DfIAbove(float("nan"))
    with pytest.raises(ValueError, match="reduce must be"):
        DfIAbove(1.0, reduce="median")
    with pytest.raises(ValueError, match=r"share of units in \[0, 1\)"):
        DormantAbove(1.5)
    with pytest.raises(ValueError, match=r"fraction of the full rank"):
        SrankBelow(0.0)
    with pytest.raises(ValueError, match="Moment.at"):
        as_schedule([3]).poll(Moment(step=3, at="batch"))


# --- resumption ----------------------------------------------------------------------------------------


def _resumed(spec, stop: int, end: int) -> tuple[list[int], list[int]]:
    """Steps fired by one run polled 1..end, and by a run saved after ``stop`` and resumed in a new schedule."""
    whole = _fired_steps(as_schedule(spec() if callable(spec) else spec), range(1, end + 1))
    first = as_schedule(spec() if callable(spec) else spec)
    before = _fired_steps(first, range(1, stop + 1))
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds
    second = as_schedule(spec() if callable(spec) else spec)
    second.load_state_dict(saved)
    return whole, before + _fired_steps(second, range(stop + 1, end + 1))


@pytest.mark.parametrize("stop", [5, 9, 10, 11, 19, 20, 29])
@pytest.mark.parametrize("spec", [[10, 20], {"every": 10}, lambda: [10, Every(7)]], ids=["list", "every", "both"])
def test_a_resumed_run_fires_exactly_where_an_uninterrupted_one_does(spec, stop):
    whole, resumed = _resumed(spec, stop, 30)
    assert resumed == whole


def test_a_run_resumed_from_before_a_boundary_polled_late_still_fires_once():
    first = as_schedule([100])
    _fired_steps(first, range(1, 91))
    second = as_schedule([100])
    second.load_state_dict(first.state_dict())
    assert _fired_steps(second, [130, 140]) == [130]  # the first poll past 100 after the resume (a long eval, say)


def test_history_survives_a_resume():
    first = as_schedule([3])
    _fired_steps(first, range(1, 5))
    second = as_schedule([3])
    second.load_state_dict(first.state_dict())
    assert [f.to_dict() for f in second.history] == [{"step": 3, "epoch": None, "reasons": ["scheduled at step 3"]}]


def _saved_after(spec, polls) -> dict:
    first = as_schedule(spec)
    _fired_steps(first, polls)
    return json.loads(json.dumps(first.state_dict()))


def test_an_extended_step_list_carries_over_what_fired_and_fires_only_the_new_boundary():
    saved = _saved_after([6], range(1, 9))  # fired at 6, checkpoint at step 8
    second = as_schedule([6, 14])
    lines = second.load_state_dict(saved)
    assert _fired_steps(second, range(9, 20)) == [14]  # 6 is not fired again at 9
    assert [f.step for f in second.history] == [6, 14]
    assert "AtSteps([6])" in lines[0] and "AtSteps([6, 14])" in lines[0]


def test_a_changed_schedule_with_a_passed_boundary_that_never_fired_is_refused_naming_both():
    saved = _saved_after([6], range(1, 9))
    second = as_schedule([4, 6, 14])
    before = second.state_dict()
    with pytest.raises(ValueError, match=r"AtSteps\(\[6\]\).*AtSteps\(\[4, 6, 14\]\).*boundaries 4 at or before"):
        second.load_state_dict(saved)
    assert second.state_dict() == before  # refused before anything changed


def test_a_changed_every_carries_over_when_its_passed_multiples_fired_and_is_refused_otherwise():
    saved = _saved_after(Every(10), range(1, 24))  # fired at 10, 20
    coarser = as_schedule(Every(20))
    coarser.load_state_dict(saved)
    assert _fired_steps(coarser, range(24, 61)) == [40, 60]
    with pytest.raises(ValueError, match="boundaries 5, 15"):
        as_schedule(Every(5)).load_state_dict(saved)
    assert _fired_steps(_loaded([10, 20, 30], saved), range(24, 40)) == [30]  # a list over Every's boundaries


def _loaded(spec, saved):
    s = as_schedule(spec)
    s.load_state_dict(saved)
    return s


def test_a_dropped_trigger_is_said_and_a_new_when_starts_after_the_saved_position():
    saved = _saved_after([6, 20], range(1, 9))
    resumed = as_schedule([6, When(lambda m: m.step % 5 == 0, name="fives")])
    lines = resumed.load_state_dict(saved)
    assert any("dropped" in line and "AtSteps([6, 20])" in line for line in lines)
    assert _fired_steps(resumed, range(9, 21)) == [10, 15, 20]


def test_a_new_measured_trigger_is_refused_and_the_same_one_keeps_its_baseline():
    weights = [("w", np.eye(3) * 1.5, "oi")]
    first = as_schedule([DfIAbove(2.0, every=5, relative=True), 100])
    for step in (0, 5, 10):
        first.poll(Moment(step=step, weights=lambda: weights))
    saved = json.loads(json.dumps(first.state_dict()))
    with pytest.raises(ValueError, match="measured trigger"):
        as_schedule([DfIAbove(3.0, every=5, relative=True), 100]).load_state_dict(saved)
    again = as_schedule([Every(20), DfIAbove(2.0, every=5, relative=True)])  # the same DfIAbove beside a new Every
    again.load_state_dict(saved)
    assert again.triggers[1].baseline == first.triggers[1].baseline and again.triggers[1].last_check == 10


_NEW_PROCESS = """
import functools, json, sys
from fire_core.schedule import When, DfIAbove, as_schedule, Moment

class TaskSwitch:
    def __call__(self, moment):
        return moment.step in (3, 7)

def changed(moment, at):
    return moment.step == at

schedule = as_schedule([When(TaskSwitch()), When(functools.partial(changed, at=5)), DfIAbove(2.0, every=4)])
if sys.argv[1] == "save":
    for step in range(1, 5):
        schedule.poll(Moment(step=step, weights=lambda: [("w", [[1.0, 0.0], [0.0, 1.0]], "oi")]))
    print(json.dumps(schedule.state_dict()))
else:
    schedule.load_state_dict(json.loads(sys.stdin.read()))
    fired = [k for k in range(5, 9) if schedule.poll(Moment(step=k, weights=lambda: [("w", [[1.0, 0.0], [0.0, 1.0]], "oi")]))]
    print(json.dumps([f.step for f in schedule.history]))
"""


def test_callable_triggers_resume_in_a_new_process(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_NEW_PROCESS)
    saved = subprocess.run([sys.executable, str(script), "save"], capture_output=True, text=True, check=True).stdout
    assert "0x" not in saved  # no memory address in the identity
    out = subprocess.run([sys.executable, str(script), "load"], input=saved, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [3, 5, 7]


def test_when_is_named_by_its_callable_and_partials_and_objects_have_no_address():
    import functools

    class Switch:
        def __call__(self, moment):
            return False

    assert When(Switch()).spec()["name"].endswith("Switch")
    assert When(functools.partial(max, 1)).spec()["name"] == "partial(builtins.max)"
    assert "0x" not in repr(When(Switch())) and When(Switch(), name="task").spec()["name"] == "task"


def test_a_state_saved_before_specs_loads_into_the_same_schedule_and_refuses_another():
    old = {"triggers": ["AtSteps([6])"], "trigger_state": [{"done": [6]}], "history": [], "last_poll": 8}
    same = as_schedule([6])
    same.load_state_dict(old)
    assert _fired_steps(same, range(9, 12)) == []
    with pytest.raises(ValueError, match="older fire_core"):
        as_schedule([6, 14]).load_state_dict(old)


# --- a failed firing leaves the schedule as it was -----------------------------------------------------


def test_a_firing_that_raises_is_not_recorded_and_the_boundary_fires_at_the_next_poll():
    s = as_schedule([5, DfIAbove(0.5, every=5)])
    weights = lambda: [("w", np.eye(2) * 3.0, "oi")]  # noqa: E731
    for step in range(1, 5):
        s.poll(Moment(step=step, weights=weights))
    before = json.loads(json.dumps(s.state_dict()))

    def failing(firing):
        raise RuntimeError("a NaN weight")

    with pytest.raises(RuntimeError, match="a NaN weight"):
        s.poll(Moment(step=5, weights=weights), fire=failing)
    assert s.state_dict() == before  # no boundary done, no check, no cooldown, no history
    applied = []
    assert s.poll(Moment(step=6, weights=weights), fire=applied.append) is not None
    assert [f.step for f in applied] == [6] and [f.step for f in s.history] == [6]


def test_a_check_that_raises_leaves_the_schedule_as_it_was():
    s = as_schedule([3, DfIAbove(0.5, every=3)])
    before = s.state_dict()
    with pytest.raises(ValueError, match="needs the model's weights"):
        s.poll(Moment(step=3))
    assert s.state_dict() == before


# --- measured triggers: cadence and baseline -----------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: DfIAbove(100.0, every=10), lambda: When(lambda m: False, every=10)],
                         ids=["dfi", "when"])
def test_periodic_triggers_check_at_the_first_poll_at_or_past_each_multiple(make):
    trigger = make()
    checked = []
    weights = lambda: [("w", np.eye(2), "oi")]  # noqa: E731
    s = as_schedule(trigger)
    for step in range(7, 141, 7):  # a loop polling every 7 steps
        before = trigger.state_dict()
        s.poll(Moment(step=step, weights=weights))
        if trigger.state_dict() != before:
            checked.append(step)
    crossed = [b for a, b in zip(range(0, 141, 7), range(7, 141, 7)) if b // 10 > a // 10]
    assert checked == crossed and len(checked) == 14


def test_a_poll_at_step_zero_measures_the_initial_network_as_the_baseline_and_never_fires():
    scale = {"c": 3.0}
    weights = lambda: [("w", np.eye(2) * scale["c"], "oi")]  # noqa: E731
    trigger = DfIAbove(2.0, every=5, relative=True)
    s = as_schedule(trigger)
    assert s.poll(Moment(step=0, weights=weights)) is None  # far from the target, but before training
    assert trigger.baseline == pytest.approx(64.0) and trigger.last_check == 0
    assert s.poll(Moment(step=0, weights=weights)) is None and trigger.last_check == 0  # once
    scale["c"] = 4.0  # (16 - 1)^2 = 225 > 2 x 64
    assert [k for k in range(1, 6) if s.poll(Moment(step=k, weights=weights))] == [5]


# --- target_dfi: the per-layer DfI relative to FIRE's target -------------------------------------------


def _svd_target_dfi(w: np.ndarray, layout: str) -> np.ndarray:
    """Independently: the small-side Gram's eigenvalues are sigma^2, so ||G - I||^2 = sum (sigma^2 / ref^2 - 1)^2."""
    lay = fire_core.layout.parse_layout(layout, w.shape)
    mats = fire_core.to_matrices(w.astype(np.float64), layout)
    ref = math.sqrt(lay.d_out / lay.d_in) / lay.taps
    per = [np.sum((np.linalg.svd(m, compute_uv=False) ** 2 / ref**2 - 1) ** 2) for m in mats]
    k = min(lay.d_out, lay.d_in)
    return np.array([sum(per[s * lay.taps : (s + 1) * lay.taps]) / (lay.taps * k) for s in range(lay.stack)])


@pytest.mark.parametrize(
    "layout, shape", [("oi", (7, 5)), ("oi", (3, 9)), ("oihw", (4, 6, 3, 3)), ("hwio", (2, 2, 5, 4)), ("Loi", (3, 6, 4))]
)
def test_target_dfi_equals_the_singular_value_form_on_every_backend(backend, layout, shape):
    w = np.random.default_rng(len(shape)).normal(size=shape) * 0.3
    got = backend.to_numpy(target_dfi(backend.asarray(w), layout))
    np.testing.assert_allclose(got, _svd_target_dfi(w, layout), rtol=1e-10)


def test_target_dfi_reads_zero_at_fires_target_and_one_for_a_zero_weight():
    w = np.random.default_rng(0).normal(size=(6, 4, 3, 3))
    fired = fire_core.reinit(w, "oihw", method="svd")
    assert target_dfi(fired, "oihw")[0] < 1e-24
    assert target_dfi(np.zeros((5, 8)), "oi")[0] == pytest.approx(1.0, rel=1e-15)


# --- the data-free trigger on a real training run ------------------------------------------------------


def test_dfi_trigger_fires_when_training_drives_the_dfi_up_and_not_before():
    torch = pytest.importorskip("torch")
    import fire_core.torch as ft

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4))
    x, y = torch.randn(128, 16), torch.randint(0, 4, (128,))  # random labels: memorized with growing weights
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trigger = DfIAbove(2.0, every=5, relative=True, reduce="max")
    schedule = as_schedule(trigger)
    checks = []
    fired_at = None
    for step in range(1, 101):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        firing = schedule.poll(Moment(step=step, weights=lambda: ft.select(model)))
        if trigger.last_check == step:
            checks.append((step, trigger.last_value))
        if firing:
            fired_at = step
            break
    assert fired_at is not None, checks
    baseline = checks[0][1]
    assert all(v <= 2.0 * baseline for _, v in checks[:-1])  # never above the limit before it fired
    assert checks[-1][0] == fired_at and checks[-1][1] > 2.0 * baseline
    assert fired_at > 5  # the first check only measures the baseline
    assert "highest 4.weight" in schedule.history[0].reasons[0]  # the 64 -> 4 head grows fastest


def test_dfi_trigger_checks_every_k_steps_only_and_waits_a_cooldown_after_firing():
    calls = []

    def weights():
        calls.append(1)
        return [("w", np.eye(3) * 2.0, "oi")]  # DfI/n = (4 - 1)^2 = 9

    s = as_schedule(DfIAbove(1.0, every=4, cooldown=8))
    fired = [k for k in range(1, 30) if s.poll(Moment(step=k, weights=weights))]
    assert fired == [4, 12, 20, 28]
    assert len(calls) == 4  # read only at check steps: 4, 12, 20, 28 (8, 16, 24 fall in the cooldown)


def test_dfi_trigger_without_weights_is_an_error_naming_it():
    with pytest.raises(ValueError, match="needs the model's weights"):
        as_schedule(DfIAbove(1.0, every=1)).poll(Moment(step=1))


# --- activation triggers -------------------------------------------------------------------------------


def _features(dead: int, units: int = 10, batch: int = 64):
    a = np.abs(np.random.default_rng(dead).normal(size=(batch, units)))
    a[:, :dead] = 0.0
    return a


def test_dormant_trigger_fires_when_the_share_of_dormant_units_passes_the_threshold():
    dead = {"n": 1}
    s = as_schedule(DormantAbove(0.25, every=1, cooldown=10))
    fired = []
    for step in range(1, 6):
        dead["n"] = step  # 10%, 20%, ... dormant
        if s.poll(Moment(step=step, features=lambda: {"relu1": _features(dead["n"])})):
            fired.append(step)
    assert fired == [3]  # 30% > 25%; 40% and 50% fall in the cooldown
    assert "relu1" in s.history[0].reasons[0]


def test_srank_trigger_fires_when_features_collapse():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(64, 8))
    collapsed = rng.normal(size=(64, 1)) @ rng.normal(size=(1, 8))
    s = as_schedule(SrankBelow(0.5, every=1))
    assert not s.poll(Moment(step=1, features=lambda: {"h": full}))
    assert s.poll(Moment(step=2, features=lambda: {"h": collapsed})).reasons[0].startswith("srank / full rank")


def test_activation_trigger_without_a_probe_is_an_error_naming_the_option():
    with pytest.raises(ValueError, match="pass probe="):
        as_schedule(DormantAbove(0.1, every=1)).poll(Moment(step=1))


# --- the traced form (optax, under jit) ----------------------------------------------------------------


@pytest.mark.parametrize("measured", [DfIAbove(3.0, every=3, reduce="max"), DfIAbove(40.0, every=3, relative=True),
                                      When(lambda m: m.step % 9 == 0, every=3)], ids=["dfi", "relative", "when"])
def test_traced_poll_fires_where_the_python_schedule_does(measured):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def spec():
        m = copy.deepcopy(measured)
        if isinstance(m, When):  # traced, the callable gets the count itself
            m.fn = (lambda k: k % 9 == 0) if traced_form["on"] else (lambda moment: moment.step % 9 == 0)
        return [7, 12, Every(5), Every(11), m]

    weights = [np.eye(3) * (1.1 + 0.05 * k) for k in range(40)]  # DfI/n = ((1.1 + 0.05 k)^2 - 1)^2 grows with k
    traced_form = {"on": False}
    python = as_schedule(spec())
    # polled from count 0 as optax is: the initial network is the relative trigger's baseline
    expected = [k for k in range(40) if python.poll(Moment(step=k, weights=lambda k=k: [("w", weights[k], "oi")]))]
    traced_form["on"] = True

    traced = as_schedule(spec())
    poll = jax.jit(lambda state, k, w: traced_poll(traced, state, k, lambda: target_dfi(w, "oi")))
    state = traced_init(traced)
    got = []
    for k in range(40):
        fire, state = poll(state, k, jnp.asarray(weights[k], jnp.float32))
        if bool(fire):
            got.append(k)
    assert got == expected
    assert int(state["last_fired"]) == expected[-1]


def test_activation_triggers_are_refused_under_jit():
    pytest.importorskip("jax")
    with pytest.raises(ValueError, match="needs activations"):
        traced_init(as_schedule(DormantAbove(0.1)))


def test_a_relative_dfi_trigger_keeps_its_first_baseline_across_firings():
    # DfI/n of c * I is (c^2 - 1)^2: 0.016 at the first check; a baseline re-taken after the firing at 2 would
    # be 0.92 (step 3) and nothing after would pass 1.2 x that
    scales = {1: 0.5 ** 0.5 * 1.5, 2: 0.3, 3: 0.2, 4: 1.0, 5: 0.6, 6: 0.2}
    values = {k: (c * c - 1) ** 2 for k, c in scales.items()}
    s = as_schedule(DfIAbove(1.2, every=1, relative=True))
    fired = [k for k in sorted(scales) if s.poll(Moment(step=k, weights=lambda k=k: [("w", np.eye(2) * scales[k], "oi")]))]
    limit = 1.2 * values[1]
    assert fired == [k for k in sorted(scales) if k > 1 and values[k] > limit]  # always against step 1's value
    assert fired == [2, 3, 5, 6]


def test_agree_makes_every_process_follow_the_broadcast_decision_and_records_only_it():
    rank0 = as_schedule(When(lambda m: m.step == 3))
    other = as_schedule(When(lambda m: m.step == 4))  # a callable that decides otherwise on another rank
    decisions = {}
    for step in range(1, 6):
        decisions[step] = rank0.poll(Moment(step=step))
        decision = None if decisions[step] is None else decisions[step].to_dict()
        mine = other.poll(Moment(step=step), agree=lambda _, d=decision: d)
        assert (mine is None) == (decisions[step] is None)
    assert [f.to_dict() for f in other.history] == [f.to_dict() for f in rank0.history]
    assert [f.step for f in other.history] == [3]
    assert as_schedule([3, Every(2)]).deterministic and not as_schedule([3, DfIAbove(1.0)]).deterministic
