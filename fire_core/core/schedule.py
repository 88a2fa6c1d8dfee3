"""When to apply FIRE: one schedule for every integration, checkpointable.

Every integration (``fire_core.lightning``, ``fire_core.transformers``,
``fire_core.sb3``, ``fire_core.optax``) takes the same ``schedule=``
argument and turns it into a :class:`Schedule` with :func:`as_schedule`:

* a list of steps, ``[1000, 2000]``: :class:`AtSteps`;
* ``Every(1000)`` or ``{"every": 1000}`` (``"unit": "epoch"`` for epochs);
* a callable of a :class:`Moment`, returning a truth value or a reason
  string (a task-id change: ``lambda m: m.step in boundaries``): :class:`When`;
* a trigger read off the weights alone, :class:`DfIAbove` (the model's DfI
  relative to FIRE's target, one Gram matrix per layer, every ``K`` steps);
* a trigger on activations of a probe batch, :class:`DormantAbove`
  (Sokar et al.'s dormant ratio) or :class:`SrankBelow` (Kumar et al.'s srank);
* a trial of FIRE on the new task's data, :class:`LookaheadBelow`
  (``Moment.lookahead``); :func:`when_needed` returns the recommended rule;
* a list mixing any of these: FIRE is applied when any of them fires.

The integration calls :meth:`Schedule.poll` once before training (step 0:
measured triggers take the initial network as their baseline; nothing
fires), after each optimizer step, and at each epoch start (``at="epoch"``),
with a :class:`Moment`: the number of
optimizer steps done, the epoch, and callables that give the weights FIRE
would project (``weights()``) and the activations of a probe batch
(``features()``); a trigger calls them only when it checks. ``poll``
returns a :class:`Firing` (the step and every reason) or None.

Steps are counted as the frameworks count them: ``step`` is the number of
optimizer steps completed, and "at step 1000" means after the 1000th
update, before the 1001st. A boundary is a threshold, not an equality: a
run resumed from a checkpoint taken at step 990 still fires at its first
poll at or past 1000, and a run resumed after firing does not fire again,
because :meth:`Schedule.state_dict` saves which boundaries fired (and when
each trigger last checked), keyed by each trigger's :meth:`Trigger.spec`
(stable across processes), and :meth:`Schedule.load_state_dict` restores it,
carrying a changed schedule over boundary by boundary or refusing it. Both
are plain JSON-able dicts, for Lightning's callback state, the
``transformers`` stateful callbacks and SB3's saved files. Measured
triggers checked "every K steps" check at the first poll at or past each
multiple of K. ``poll(moment, fire=...)`` applies FIRE and records the
firing as one step: if applying fails, the schedule is as it was.

Under ``jax.jit`` (``fire_core.optax``) no Python branch may depend on a
traced step: :func:`traced_init` and :func:`traced_poll` keep the same
triggers' progress in arrays and decide with ``jnp`` operations (the
activation triggers need a forward pass and are refused there).
"""

from __future__ import annotations

import copy
import json
import numbers
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .triggers import (
    UNITS,
    AtSteps,
    DfIAbove,
    DormantAbove,
    Every,
    LOOKAHEAD_STEPS,
    LookaheadBelow,
    Moment,
    SrankBelow,
    Trigger,
    When,
    _OnFeatures,
    target_dfi,
)

__all__ = [
    "Moment",
    "Firing",
    "Trigger",
    "AtSteps",
    "Every",
    "When",
    "DfIAbove",
    "DormantAbove",
    "SrankBelow",
    "LookaheadBelow",
    "when_needed",
    "check_trial",
    "LOOKAHEAD_RATIO",
    "LOOKAHEAD_STEPS",
    "Schedule",
    "as_schedule",
    "target_dfi",
    "traced_init",
    "traced_poll",
]

@dataclass
class Firing:
    """A decision to apply FIRE: where, and why (one reason per trigger that fired).

    ``info``: what the firing did, filled in by the integration that applied
    it (the report's :meth:`~fire_core.report.Report.metrics`, targets
    synced, ...); JSON-able, saved with the history.
    """

    step: int
    epoch: int | None
    reasons: list[str]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"step": self.step, "epoch": self.epoch, "reasons": list(self.reasons)}
        if self.info:
            out["info"] = dict(self.info)
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "Firing":
        return cls(d["step"], d.get("epoch"), list(d["reasons"]), dict(d.get("info", {})))

    def __str__(self) -> str:
        where = f"step {self.step}" + ("" if self.epoch is None else f", epoch {self.epoch}")
        return f"FIRE at {where}: " + "; ".join(self.reasons)


class Schedule:
    """Triggers polled together; FIRE is applied when any fires. Holds the history of firings.

    Build it with :func:`as_schedule` from any ``schedule=`` form.
    """

    def __init__(self, triggers: Sequence[Trigger]):
        self.triggers = list(triggers)
        self.history: list[Firing] = []
        self.last_poll: int | None = None  # the step of the last poll after an optimizer step
        self.last_epoch: int | None = None  # the epoch of the last poll at an epoch's start

    def __repr__(self) -> str:
        return f"Schedule({', '.join(map(repr, self.triggers))})"

    def poll(self, moment: Moment, agree: Callable[[dict | None], dict | None] | None = None,
             fire: Callable[[Firing], Any] | None = None) -> Firing | None:
        """Check every trigger at ``moment``; a :class:`Firing` with all their reasons when any fires.

        ``fire``: what applying FIRE is (``lambda firing: fire_core.torch.apply(model, ...)``).
        Given, it is called with the firing, and the poll is one step with it:
        if ``fire`` (or a trigger's check) raises, the schedule is put back
        exactly as it was before the poll (no boundary marked done, no check,
        no cooldown, no history) and the error propagates, so a continued or
        resumed run tries again. Without ``fire`` the firing is recorded when
        it is returned, and applying it is the caller's business.

        ``agree``: in a run of several processes, a function that takes this
        process's decision (``Firing.to_dict()`` or None) and returns the one
        every process follows (rank 0's, broadcast). It is needed when a
        decision can differ between processes (a measured trigger, a user
        callable); :attr:`deterministic` says when it cannot. The decision is
        recorded (history, cooldowns) only once agreed.
        """
        if moment.at not in UNITS:
            raise ValueError(f"Moment.at must be one of {UNITS}, got {moment.at!r}")
        before = copy.deepcopy(self.state_dict())
        try:
            reasons = [r for r in (t.check(moment) for t in self.triggers) if r]
            if moment.at == "step":
                self.last_poll = moment.step
            else:
                self.last_epoch = moment.epoch
            firing = Firing(moment.step, moment.epoch, reasons) if reasons else None
            if agree is not None:
                decision = agree(None if firing is None else firing.to_dict())
                firing = None if decision is None else Firing.from_dict(decision)
            if firing is None:
                return None
            if fire is not None:
                fire(firing)
        except BaseException:
            self._restore(before)
            raise
        for t in self.triggers:
            t.fired(moment)
        self.history.append(firing)
        return firing

    @property
    def deterministic(self) -> bool:
        """Whether every process reaches the same decision from the step alone (steps and Every only)."""
        return all(isinstance(t, (AtSteps, Every)) for t in self.triggers)

    def spec(self) -> list[dict]:
        """The schedule's identity: each trigger's :meth:`Trigger.spec`, in order (JSON-able, stable across processes)."""
        return [t.spec() for t in self.triggers]

    def state_dict(self) -> dict:
        """What the schedule has done, as a JSON-able dict: firings, last polls, each trigger's identity and state."""
        return {
            "format": 2,
            "triggers": [repr(t) for t in self.triggers],
            "specs": self.spec(),
            "trigger_state": [t.state_dict() for t in self.triggers],
            "history": [f.to_dict() for f in self.history],
            "last_poll": self.last_poll,
            "last_epoch": self.last_epoch,
        }

    def load_state_dict(self, state: Mapping) -> list[str]:
        """Restore :meth:`state_dict`'s output; returns what was carried over when the schedule changed.

        The same schedule (same :meth:`spec`) resumes exactly. A changed one
        is carried over trigger by trigger and boundary by boundary, or
        refused with a ValueError naming both schedules, before anything
        changes:

        * a trigger that is in the saved schedule (same spec) keeps its progress;
        * a new step list or ``Every``: each of its boundaries at or before
          the saved position (the last poll in its unit) must have fired in
          the saved run, and is then done; one that never fired is refused
          (firing it late or skipping it would both be guesses);
        * a new ``When`` starts checking after the saved position;
        * a new measured trigger (``DfIAbove``, ``DormantAbove``,
          ``SrankBelow``) is refused: its baseline, last check and cooldown
          belong to the run it was started in;
        * saved triggers the new schedule lacks are dropped, with the
          boundaries they had left.

        The returned lines say what was carried over and dropped (empty when
        the schedule is the same); the integrations log them.
        """
        saved = _saved_schedule(state, [repr(t) for t in self.triggers])
        ours = self.spec()
        history = [Firing.from_dict(f) for f in state.get("history", [])]
        position = {"step": state.get("last_poll"), "epoch": state.get("last_epoch")}
        if [s for s, _ in saved] == ours or "specs" not in state:
            loads = [(t, st) for t, (_, st) in zip(self.triggers, saved)]
            lines = []
        else:
            loads, lines = self._carry_over(saved, position, [repr(t) for t in self.triggers],
                                            list(state.get("triggers", [])))
        for t, st in loads:  # every check ran above: nothing from here on can fail half-way
            if st is None:
                t.adopt(position[t.unit])
            else:
                t.load_state_dict(st)
        self.history = history
        self.last_poll, self.last_epoch = position["step"], position["epoch"]
        return lines

    def _carry_over(self, saved, position, ours_shown, saved_shown):
        """Which saved state each trigger takes (None: adopt the saved position), and the lines saying so."""
        both = f"the saved schedule {saved_shown} and this one {ours_shown}"
        unused = list(range(len(saved)))
        loads, carried, adopted = [], [], []
        for t in self.triggers:
            match = next((k for k in unused if saved[k][0] == t.spec()), None)
            if match is not None:
                unused.remove(match)
                loads.append((t, saved[match][1]))
                carried.append(repr(t))
                continue
            until = position[t.unit]
            if isinstance(t, (DfIAbove, _OnFeatures)):
                raise ValueError(
                    f"{both} differ in a measured trigger: {t!r} was not in the saved schedule, and its baseline, "
                    "last check and cooldown cannot be made up for a run already under way; resume with the "
                    "saved schedule's measured triggers, or start a new run"
                )
            if until is not None and isinstance(t, (AtSteps, Every)):
                missed = [b for b in t.boundaries(until) if not _fired(saved, t.unit, b)]
                if missed:
                    shown = ", ".join(map(str, missed[:5])) + (f" and {len(missed) - 5} more" if len(missed) > 5 else "")
                    raise ValueError(
                        f"{both} differ: {t!r} has {t.unit} boundaries {shown} at or before the checkpoint's "
                        f"{t.unit} {until}, where the saved run never fired; firing them late or skipping them "
                        "would both be guesses. Drop them from the schedule, or resume from a checkpoint "
                        "taken before them"
                    )
            loads.append((t, None if until is not None else {}))
            adopted.append(repr(t))
        lines = [f"resumed {both}"]
        if carried:
            lines.append(f"progress carried over unchanged: {', '.join(carried)}")
        if adopted:
            lines.append(f"new, started from the saved position (passed boundaries had fired): {', '.join(adopted)}")
        if unused:
            lines.append(f"dropped, with any boundaries still ahead: {', '.join(saved_shown[k] for k in unused)}")
        return loads, lines

    def _restore(self, state: Mapping) -> None:
        """Put back a :meth:`state_dict` of this very schedule (after a failed poll)."""
        for t, st in zip(self.triggers, state["trigger_state"]):
            t.load_state_dict(st)
        self.history = [Firing.from_dict(f) for f in state["history"]]
        self.last_poll, self.last_epoch = state["last_poll"], state["last_epoch"]


def _saved_schedule(state: Mapping, ours: list[str]) -> list[tuple[dict, dict]]:
    """``(spec, trigger state)`` pairs of a saved schedule.

    A state saved before triggers had specs is read by its reprs (``ours``:
    this schedule's) and must be this same schedule.
    """
    states = list(state.get("trigger_state", []))
    if "specs" in state:
        specs = list(state["specs"])
    else:
        reprs = list(state.get("triggers", []))
        if reprs != ours:
            raise ValueError(
                f"the saved schedule {reprs} (saved by an older fire_core, which cannot carry progress over to "
                f"another schedule) is not this one {ours}: pass the schedule the run was started with"
            )
        specs = [{"type": "repr", "repr": r} for r in reprs]
    if len(states) != len(specs):
        raise ValueError(f"a saved schedule holds {len(specs)} triggers and {len(states)} trigger states: not a "
                         "Schedule.state_dict()")
    return list(zip(specs, states))


def _fired(saved, unit: str, boundary: int) -> bool:
    """Whether the saved schedule fired at ``boundary`` (a step list's or an ``Every``'s, in ``unit``)."""
    for spec, state in saved:
        if spec.get("unit") != unit:
            continue
        if spec["type"] == "AtSteps" and boundary in state.get("done", []):
            return True
        if spec["type"] == "Every":
            k, rest = divmod(boundary - spec["start"], spec["n"])
            if rest == 0 and 1 <= k <= state.get("last", 0):
                return True
    return False


def as_schedule(spec) -> Schedule:
    """A :class:`Schedule` from any ``schedule=`` form (see the module docstring); TypeError for others."""
    if isinstance(spec, Schedule):
        return spec
    return Schedule(_triggers(spec))


def _triggers(spec) -> list[Trigger]:
    if isinstance(spec, Trigger):
        return [spec]
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if set(spec) - {"every", "unit", "start"} or "every" not in spec:
            raise ValueError(f"a schedule dict is {{'every': N}} (with optional 'unit' and 'start'), got {spec!r}")
        return [Every(spec["every"], unit=spec.get("unit", "step"), start=spec.get("start", 0))]
    if callable(spec):
        return [When(spec)]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("schedule=[] has no step and no trigger: FIRE would never be applied")
        steps = [s for s in spec if isinstance(s, numbers.Integral) and not isinstance(s, bool)]
        rest = [s for s in spec if not (isinstance(s, numbers.Integral) and not isinstance(s, bool))]
        found = [AtSteps(steps)] if steps else []
        for s in rest:
            if isinstance(s, (list, tuple)):
                raise TypeError(f"schedule: nested lists are not a schedule form, got {s!r}")
            found.extend(_triggers(s))
        return found
    raise TypeError(
        "schedule= takes a list of steps ([1000, 2000]), Every(N) or {'every': N}, a callable of a Moment, "
        f"a trigger (DfIAbove, DormantAbove, SrankBelow), or a list of these; got {type(spec).__name__} {spec!r}"
    )


# --- FIRE when needed: the recommended rule ----------------------------------------------------------

LOOKAHEAD_RATIO = 0.526
"""FIRE when the trial's probe loss with FIRE is below this fraction of the loss without.

Chosen once, on held-out seeds (100-102) of one setting, the digits MLP of
``benchmarks/plasticity.py`` after random labels (plasticity lost: 0.235-0.355
at 200 steps) and after a 10% subset (healthy: 0.78-1.12), as the geometric
midpoint of the two groups; applied unchanged to the other networks of
``benchmarks/when_needed_study.py``. The trial's length was not held out:
200 steps were taken over 100 after 100 misfired once in 8 seeds on a plain
CNN through label-permuted tasks (results and where the rule fails:
``benchmarks/results/when_needed_study.md``)."""


def when_needed(every: int = 1, *, unit: str = "step", steps: int = LOOKAHEAD_STEPS,
                threshold: float = LOOKAHEAD_RATIO, cooldown: int | None = None) -> list[Trigger]:
    """The recommended rule for applying FIRE only where it helps: a list of triggers for ``schedule=``.

    Poll it where the data shifts (at each task boundary; or every ``every``
    steps) with a :class:`Moment` whose ``lookahead(k)`` runs a trial on the
    new task's data: two copies of the model, one with FIRE applied as it
    would be, each take ``k`` steps of a fresh optimizer on a few new-task
    batches, and ``lookahead`` returns ``(probe loss without FIRE, probe loss
    with FIRE)`` on a batch of the new task held out of those. FIRE is
    applied when the ratio (with / without) is below ``threshold``
    (:class:`LookaheadBelow`).

    Why a trial and not the weights: a weight statistic cannot tell lost
    plasticity from healthy growth across networks. Behind LayerNorm or
    BatchNorm the weights of a network that lost plasticity need not grow,
    and weights grow a lot in healthy learning: in
    ``benchmarks/results/when_needed_study.md`` no DfI, spectrum-spread,
    stable-rank, feature-srank, probe-loss or gradient-norm threshold chosen
    on one setting separated the others. This trial, at 200 steps, fired at
    every seed where FIRE gained 2.9-10.1 points (MLPs with and without
    LayerNorm, a BatchNorm CNN, a pre-LN transformer after random labels)
    and at none of the boundaries where nothing was lost (subset warm
    starts, label-permuted task sequences, where FIRE cost up to 2.3
    points). It missed a small gain (+0.7 points, a plain MLP at a
    label-permuted boundary), fired at 3 of 8 seeds of a plain CNN after
    random labels where FIRE did nothing measurable, and at 100 steps it
    misfired once in 8 seeds. In every training benchmark
    (docs/benchmarks.md, "FIRE when needed") it was never significantly
    worse than doing nothing (13 settings, RL and label-permuted tasks
    included) and kept all of FIRE's gain in 5 of the 7 settings where
    FIRE helps. It never fired on a small GPT (a language model's loss
    floor keeps the ratio near 1) or on bit-flipping regression, and missed
    FIRE's gain there: the threshold belongs to classification.

    Cost per check: two copies of the model, ``2 * steps`` optimizer steps
    and two probe forwards. The default threshold belongs to the default
    ``steps`` and to that trial (Adam, lr 1e-3, 4 batches of 64, a probe of
    256); another trial needs its own threshold. A poll at step 0 runs no
    trial. Not traceable under ``jax.jit`` (``fire_core.optax`` refuses it).

    >>> from fire_core.schedule import Moment, as_schedule, when_needed
    >>> schedule = as_schedule(when_needed())
    >>> firing = schedule.poll(Moment(step=500, lookahead=lambda k: (1.9, 0.4)))   # a trial's losses
    >>> firing is not None, schedule.poll(Moment(step=1000, lookahead=lambda k: (0.5, 0.6)))
    (True, None)
    """
    return [LookaheadBelow(threshold, every, steps=steps, unit=unit, cooldown=cooldown)]


def check_trial(schedule: "Schedule", trial, who: str) -> None:
    """An integration's ``trial=`` against its schedule: required by a :class:`LookaheadBelow`, else unused.

    ``trial``: a callable taking the model the integration projects and
    returning ``Moment.lookahead`` (``fire_core.torch.trial(model, batches,
    probe)`` builds one). Raises when training is set up, not at the first
    check: a ValueError if the schedule needs a trial and none is given, a
    TypeError if ``trial`` is not callable.
    """
    if trial is not None and not callable(trial):
        raise TypeError(f"{who}: trial must be a callable taking the model and returning Moment.lookahead, "
                        f"got {type(trial).__name__}")
    needs = [t for t in schedule.triggers if isinstance(t, LookaheadBelow)]
    if needs and trial is None:
        raise ValueError(
            f"{who}: {needs[0]!r} reads a trial of FIRE on the new task's data: pass trial=, a callable taking the "
            "model and returning Moment.lookahead, e.g. trial=lambda model: fire_core.torch.trial(model, batches, "
            "probe) with a few batches of the new task and a probe batch held out of them"
        )


# --- the same triggers under jax.jit -------------------------------------------------------------------


def traced_init(schedule: Schedule) -> dict:
    """The schedule's progress as JAX arrays (for an optax state): one entry per trigger, and the last firing."""
    import jax.numpy as jnp

    text = _spec_text(schedule)
    state = {"last_fired": jnp.asarray(-1, jnp.int32), "fired_by": jnp.zeros(len(schedule.triggers), jnp.int32),
             # the schedule's identity, checked at every traced_poll: a state restored into another schedule is refused
             "spec": {"hash": jnp.asarray(_spec_hash(text), jnp.int32),
                      "text": jnp.asarray(np.frombuffer(text.encode(), np.uint8))}}
    for k, t in enumerate(schedule.triggers):
        if isinstance(t, LookaheadBelow):
            raise ValueError(
                f"{t!r} needs a trial of FIRE on the new task's data (copies of the model trained a few steps), "
                "which an optax update never sees; poll a Schedule in your own loop with Moment(lookahead=...)"
            )
        if isinstance(t, (DormantAbove, SrankBelow)):
            raise ValueError(
                f"{t!r} needs activations of a probe batch, which an optax update never sees; under jit use "
                "DfIAbove (data-free), steps, Every or a traceable When, or poll a Schedule in your own loop"
            )
        if t.unit != "step":
            raise ValueError(f"{t!r}: an optax update counts steps, not epochs; give the schedule in steps")
        if isinstance(t, AtSteps):
            state[f"t{k}"] = jnp.zeros(len(t.steps), bool)
        elif isinstance(t, Every):
            state[f"t{k}"] = jnp.asarray(0, jnp.int32)
        elif isinstance(t, DfIAbove):
            state[f"t{k}"] = {"baseline": jnp.asarray(-1.0, jnp.float32), "last_fired": jnp.asarray(-(2**30), jnp.int32),
                              "last_value": jnp.asarray(jnp.nan, jnp.float32)}
        elif isinstance(t, When):
            state[f"t{k}"] = jnp.asarray(0, jnp.int32)
        else:
            raise TypeError(f"{t!r}: no traced form for this trigger type")
    return state


def traced_poll(schedule: Schedule, state: dict, step, measure: Callable[[], Any]):
    """``(fire, new_state)`` at ``step`` (a traced int: optimizer steps completed), with no Python branch on it.

    ``measure()`` gives the model's per-layer :func:`target_dfi` values as one
    1-D array; it is traced once and evaluated (under ``lax.cond``) only at a
    :class:`DfIAbove` check step. A :class:`When` callable is called with the
    traced step and must return a traced boolean.
    """
    import jax
    import jax.numpy as jnp

    step = jnp.asarray(step, jnp.int32)
    if "spec" in state:  # (states made before the identity was kept have none to check)
        ours = _spec_text(schedule)
        jax.lax.cond(state["spec"]["hash"] != _spec_hash(ours),
                     lambda: jax.debug.callback(_refuse_traced, state["spec"]["text"], ours=ours), lambda: None)
    new = dict(state)
    verdicts = []
    for k, t in enumerate(schedule.triggers):
        s = state[f"t{k}"]
        if isinstance(t, AtSteps):
            due = jnp.logical_and(step >= jnp.asarray(t.steps, jnp.int32), jnp.logical_not(s))
            fire = jnp.any(due)
            new[f"t{k}"] = jnp.logical_or(s, due)
        elif isinstance(t, Every):
            idx = jnp.where(step >= t.start + t.n, (step - t.start) // t.n, 0)
            fire = idx > s
            new[f"t{k}"] = jnp.maximum(s, idx)
        elif isinstance(t, When):  # as the host's: at multiples of every (optax polls each count), never at 0
            due = jnp.logical_and(step >= t.every, step % t.every == 0)
            fire = jnp.logical_and(due, jnp.asarray(t.fn(step), bool))
            new[f"t{k}"] = s + fire.astype(jnp.int32)
        else:  # DfIAbove: measured at count 0 (the initial network, never a firing) and at multiples of every
            due = jnp.logical_and(step > 0, step % t.every == 0)
            due = jnp.logical_and(due, step - s["last_fired"] >= max(t.cooldown, 1))
            measured = jnp.logical_or(due, step == 0)
            shape = jax.eval_shape(measure).shape
            per_layer = jax.lax.cond(
                measured, lambda: jnp.asarray(measure(), jnp.float32), lambda: jnp.zeros(shape, jnp.float32)
            )
            value = jnp.max(per_layer) if t.reduce == "max" else jnp.mean(per_layer)
            if t.relative:
                first = s["baseline"] < 0
                limit = jnp.where(first, jnp.inf, t.threshold * s["baseline"])
                fire = jnp.logical_and(due, value > limit)
                baseline = jnp.where(jnp.logical_and(measured, first), value, s["baseline"])
            else:
                fire = jnp.logical_and(due, value > t.threshold)
                baseline = s["baseline"]
            new[f"t{k}"] = {"baseline": baseline, "last_fired": s["last_fired"],
                            "last_value": jnp.where(measured, value, s["last_value"])}
        verdicts.append(fire)
    fired = jnp.stack(verdicts) if verdicts else jnp.zeros(0, bool)
    fire = jnp.any(fired)
    new["fired_by"] = state["fired_by"] + fired.astype(jnp.int32)
    new["last_fired"] = jnp.where(fire, step, state["last_fired"])
    for k, t in enumerate(schedule.triggers):  # a firing restarts every measured trigger's cooldown
        if isinstance(t, DfIAbove):
            s = new[f"t{k}"]
            new[f"t{k}"] = {**s, "last_fired": jnp.where(fire, step, s["last_fired"])}
    return fire, new


def _spec_text(schedule: Schedule) -> str:
    return json.dumps(schedule.spec(), sort_keys=True, separators=(",", ":"))


def _spec_hash(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def saved_spec(state: Mapping) -> list | None:
    """The :meth:`Schedule.spec` a :func:`traced_init` state was made by (None for states made before it was kept)."""
    if "spec" not in state:
        return None
    return json.loads(np.asarray(state["spec"]["text"], np.uint8).tobytes().decode())


def _refuse_traced(saved, *, ours: str) -> None:
    theirs = np.asarray(saved, np.uint8).tobytes().decode()
    raise ValueError(
        f"fire_core.schedule: this optimizer state was made by the schedule {theirs}, not by this one {ours}: under "
        "jit a changed schedule cannot be carried over boundary by boundary, so it is refused; restore the state "
        "into the schedule it was saved with"
    )
