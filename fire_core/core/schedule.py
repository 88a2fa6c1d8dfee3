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
import functools
import json
import math
import numbers
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ._array import array_namespace, to_floats, work_dtype
from .diagnostics import DORMANT_TAU, SRANK_DELTA, dormant_ratio, srank
from .layout import parse_layout, scale_factor, to_matrices
from .metrics import gram_dfi, small_gram

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
    "Schedule",
    "as_schedule",
    "target_dfi",
    "traced_init",
    "traced_poll",
]

UNITS = ("step", "epoch")


@dataclass
class Moment:
    """Where training stands when the schedule is polled.

    ``step``: optimizer steps completed. ``epoch``: the current epoch (None
    where the framework has none). ``at``: ``"step"`` (after an optimizer
    step) or ``"epoch"`` (at an epoch's start, ``epoch`` being its index).
    ``weights()``: ``(name, array, layout)`` of the weights FIRE would
    project. ``features()``: ``{name: (batch, units) activations}`` of a
    probe batch. ``context``: anything else the integration passes (the
    trainer, the model), for user callables.
    """

    step: int
    epoch: int | None = None
    at: str = "step"
    weights: Callable[[], Iterable[tuple[str, Any, str]]] | None = None
    features: Callable[[], Mapping[str, Any]] | None = None
    context: Mapping[str, Any] = field(default_factory=dict)

    def position(self, unit: str) -> int | None:
        """The count a trigger in ``unit`` compares with, or None if this poll is not in that unit."""
        if unit == "step":
            return self.step if self.at == "step" else None
        return self.epoch if self.at == "epoch" else None


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


class Trigger:
    """One condition for applying FIRE. Subclasses define :meth:`check` and their saved state.

    :meth:`spec` is the trigger's identity: a JSON-able dict of its type and
    the arguments that decide when it fires, the same in every process (no
    memory address), so that saved progress is found again on resume.
    """

    unit = "step"

    def spec(self) -> dict:  # pragma: no cover - abstract
        """The trigger's stable identity: its type and the arguments that decide when it fires."""
        raise NotImplementedError

    def check(self, moment: Moment) -> str | None:  # pragma: no cover - abstract
        """The reason FIRE should be applied now, or None."""
        raise NotImplementedError

    def fired(self, moment: Moment) -> None:
        """Called when FIRE was applied at ``moment`` (by this trigger or another)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        if state:
            raise ValueError(f"{self!r} keeps no state, got {dict(state)!r}")

    def describe(self) -> str:
        return repr(self)


def _count(value, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
    return int(value)


def _unit(unit) -> str:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    return unit


class AtSteps(Trigger):
    """FIRE at each of the given steps (or epochs): at the first poll at or past each, once."""

    def __init__(self, steps: Iterable[int], unit: str = "step"):
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise TypeError(f"AtSteps expects a list of {unit}s, got {type(steps).__name__} {steps!r}")
        self.unit = _unit(unit)
        self.steps = sorted({_count(s, f"a {self.unit} of the schedule", minimum=1) for s in steps})
        if not self.steps:
            raise ValueError("AtSteps: the list of steps is empty (FIRE would never be applied)")
        self.done: list[int] = []

    def __repr__(self) -> str:
        return f"AtSteps({self.steps}{'' if self.unit == 'step' else ', unit=' + repr(self.unit)})"

    def spec(self):
        return {"type": "AtSteps", "steps": list(self.steps), "unit": self.unit}

    def boundaries(self, until: int) -> list[int]:
        """This trigger's boundaries at or before ``until``."""
        return [s for s in self.steps if s <= until]

    def adopt(self, until: int) -> None:
        """Take every boundary at or before ``until`` as done (a changed schedule resumed there)."""
        self.done = self.boundaries(until)

    def check(self, moment):
        now = moment.position(self.unit)
        if now is None:
            return None
        due = [s for s in self.steps if s <= now and s not in self.done]
        if not due:
            return None
        self.done.extend(due)
        late = "" if due[-1] == now else f" (reached at {self.unit} {now})"
        names = ", ".join(map(str, due))
        return f"scheduled at {self.unit}{'s' if len(due) > 1 else ''} {names}{late}"

    def state_dict(self):
        return {"done": list(self.done)}

    def load_state_dict(self, state):
        self.done = [int(s) for s in state.get("done", [])]


class Every(Trigger):
    """FIRE every ``n`` steps (or epochs), first at ``start + n``: at steps ``n, 2n, ...`` by default."""

    def __init__(self, n: int, unit: str = "step", start: int = 0):
        self.n = _count(n, "Every(n)", minimum=1)
        self.unit = _unit(unit)
        self.start = _count(start, "Every(start=)")
        self.last = 0  # the last multiple fired: k with start + k n reached

    def __repr__(self) -> str:
        extra = ("" if self.unit == "step" else f", unit={self.unit!r}") + (f", start={self.start}" if self.start else "")
        return f"Every({self.n}{extra})"

    def spec(self):
        return {"type": "Every", "n": self.n, "unit": self.unit, "start": self.start}

    def boundaries(self, until: int) -> range:
        """This trigger's boundaries at or before ``until``."""
        return range(self.start + self.n, until + 1, self.n)

    def adopt(self, until: int) -> None:
        """Take every multiple at or before ``until`` as done (a changed schedule resumed there)."""
        self.last = len(self.boundaries(until))

    def check(self, moment):
        now = moment.position(self.unit)
        if now is None or now < self.start + self.n:
            return None
        k = (now - self.start) // self.n
        if k <= self.last:
            return None
        self.last = k
        boundary = self.start + k * self.n
        late = "" if boundary == now else f" (reached at {self.unit} {now})"
        return f"every {self.n} {self.unit}s: {self.unit} {boundary}{late}"

    def state_dict(self):
        return {"last": self.last}

    def load_state_dict(self, state):
        self.last = int(state.get("last", 0))


class When(Trigger):
    """FIRE when ``fn(moment)`` is true (a string it returns is the reason).

    ``fn`` is called at the first poll at or past each multiple of ``every``
    (every poll with the default 1; never at step 0, before training).
    ``name``: the trigger's identity in saved progress. By default it is the
    callable's qualified name (``mymodule.task_switched``; the class for a
    callable object, the wrapped function for a ``functools.partial``), the
    same in every process; give ``name`` to tell apart two triggers built
    from one function.
    """

    def __init__(self, fn: Callable[[Moment], Any], every: int = 1, unit: str = "step", *, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"When expects a callable of a Moment, got {type(fn).__name__} {fn!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"When(name=) must be a string, got {type(name).__name__} {name!r}")
        self.fn = fn
        self.every = _count(every, "When(every=)", minimum=1)
        self.unit = _unit(unit)
        self.name = name if name is not None else callable_name(fn)
        self.last: int | None = None  # the position of the last check

    def __repr__(self) -> str:
        extra = ("" if self.every == 1 else f", every={self.every}") + ("" if self.unit == "step" else f", unit={self.unit!r}")
        return f"When({self.name}{extra})"

    def spec(self):
        return {"type": "When", "name": self.name, "every": self.every, "unit": self.unit}

    def check(self, moment):
        now = _crossed(moment.position(self.unit), self.last, self.every)
        if now is None:
            return None
        self.last = now
        verdict = self.fn(moment)
        if not verdict:
            return None
        return verdict if isinstance(verdict, str) else f"{self.describe()} returned {verdict!r} at {self.unit} {now}"

    def state_dict(self):
        return {"last": self.last}

    def load_state_dict(self, state):
        self.last = state.get("last")

    def adopt(self, until: int) -> None:
        """Resume a changed schedule at ``until``: the next check is at the first multiple past it."""
        self.last = until


def callable_name(fn) -> str:
    """A name for ``fn`` that is the same in every process: ``module.qualname``, never a memory address."""
    if isinstance(fn, functools.partial):
        return f"partial({callable_name(fn.func)})"
    named = fn if hasattr(fn, "__qualname__") else type(fn)
    module = getattr(named, "__module__", None)
    return f"{module}.{named.__qualname__}" if module else named.__qualname__


def _crossed(now: int | None, last: int | None, every: int) -> int | None:
    """``now`` if a multiple of ``every`` (the first is ``every`` itself) was reached since ``last``, else None.

    A trigger checked "every K steps" checks at the first poll at or past
    each multiple of K, whatever the polls' spacing (SB3 counts steps of all
    environments, gradient accumulation skips steps).
    """
    if now is None or now < every:
        return None
    if last is not None and now // every <= last // every:
        return None
    return now


_REDUCE = {"mean": lambda v: math.fsum(v) / len(v), "max": max, "min": min}


class _Periodic(Trigger):
    """A measured trigger: checked every ``every`` steps, the last check and its value kept.

    Subclasses give the per-layer values (:meth:`_values`), how they may be
    reduced (``reduces``), the side of the limit that fires (``below``) and
    the reason's text (:meth:`_reason`).
    """

    reduces = ("mean", "max")
    below = False  # fires when the reduced value is above the limit (below it: srank)

    def __init__(self, threshold: float, every: int, unit: str, cooldown: int | None, reduce: str):
        name = type(self).__name__
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
            raise TypeError(f"{name}: threshold must be a finite number, got {threshold!r}")
        if reduce not in self.reduces:
            raise ValueError(f"{name}: reduce must be {' or '.join(map(repr, self.reduces))}, got {reduce!r}")
        self.threshold = float(threshold)
        self.every = _count(every, f"{name}(every=)", minimum=1)
        self.unit = _unit(unit)
        self.cooldown = _count(self.every if cooldown is None else cooldown, f"{name}(cooldown=)")
        self.reduce = reduce
        self.last_check: int | None = None
        self.last_value: float | None = None
        self.last_fired: int | None = None

    def _due(self, moment) -> int | None:
        """The position to check at: 0 (measure only) or the first poll at or past each multiple of ``every``."""
        now = moment.position(self.unit)
        if now == 0:  # before training: the initial network is measured (a baseline), never a reason to fire
            return 0 if self.last_check is None else None
        now = _crossed(now, self.last_check, self.every)
        if now is None:
            return None
        multiple = now - now % self.every  # the multiple this poll reached; one inside the cooldown is passed over
        if self.last_fired is not None and multiple - self.last_fired < max(self.cooldown, 1):
            return None
        return now

    def spec(self):
        return {"type": type(self).__name__, "threshold": self.threshold, "every": self.every, "unit": self.unit,
                "cooldown": self.cooldown, "reduce": self.reduce, **self._options()}

    def _options(self) -> dict:
        """The subclass's own arguments that decide when it fires (part of :meth:`spec`)."""
        return {}

    def _limit(self, value: float) -> float | None:
        """The limit this check's reduced ``value`` is compared with (None: this check only measures)."""
        return self.threshold

    def check(self, moment):
        now = self._due(moment)
        if now is None:
            return None
        values = self._values(moment)
        value = _REDUCE[self.reduce](list(values.values()))
        self.last_check, self.last_value = now, value
        limit = self._limit(value)
        if now == 0 or limit is None or not (value < limit if self.below else value > limit):
            return None
        worst = (min if self.below else max)(values, key=values.get)
        return self._reason(values, value, now, worst)

    def fired(self, moment):
        now = moment.position(self.unit)
        if now is not None:
            self.last_fired = now

    def state_dict(self):
        return {"last_check": self.last_check, "last_value": self.last_value, "last_fired": self.last_fired}

    def load_state_dict(self, state):
        self.last_check = state.get("last_check")
        self.last_value = state.get("last_value")
        self.last_fired = state.get("last_fired")


class DfIAbove(_Periodic):
    """FIRE when the weights' DfI relative to FIRE's target exceeds ``threshold``: data-free.

    Every ``every`` steps the integration's weights (those FIRE would
    project) are read and :func:`target_dfi` is taken of each layer: the
    report's "DfI before" over the layer's ``taps * min(d_out, d_in)``, so 0
    at FIRE's target and 1 for a zero weight whatever the layer's size. One
    Gram matrix per layer and tap, no data, no projection. Initial values
    depend on the init and the shape: PyTorch's default ``nn.Linear`` init
    (variance ``1 / (3 d_in)``) reads about ``(1/3 - 1)^2 = 0.44`` when
    ``d_out >= d_in`` but about ``(d_in / (3 d_out) - 1)^2`` when the layer
    narrows (19 for a 64 -> 4 head), so an absolute threshold belongs to
    one architecture; ``relative=True`` carries over.

    ``reduce``: ``"mean"`` (over layers, each layer counted once) or
    ``"max"``. With ``relative=True`` the threshold is a ratio to the value
    of the first check (the trigger fires when the DfI grew by that factor),
    which carries over between models whose initial DfI differs: every
    integration polls once at step 0, before the first optimizer step, so
    that check is the initial network's (a poll at step 0 measures and never
    fires). The baseline is kept across firings (right after FIRE the DfI is near 0 and
    climbs fast, so a baseline taken then would fire again at once). After a
    firing the next check is at least ``cooldown`` steps later (default
    ``every``).
    """

    def __init__(self, threshold: float, every: int = 100, *, reduce: str = "mean", relative: bool = False,
                 unit: str = "step", cooldown: int | None = None):
        super().__init__(threshold, every, unit, cooldown, reduce)
        if self.threshold <= 0:
            raise ValueError(f"DfIAbove: threshold must be positive, got {threshold!r}")
        self.relative = bool(relative)
        self.baseline: float | None = None

    def _options(self):
        return {"relative": self.relative}

    def __repr__(self) -> str:
        return f"DfIAbove({self.threshold:g}, every={self.every}, reduce={self.reduce!r}, relative={self.relative})"

    def _values(self, moment) -> dict[str, float]:
        if moment.weights is None:
            raise ValueError(f"{self!r} needs the model's weights, which this integration did not pass")
        per_layer: dict[str, float] = {}
        for name, w, layout in moment.weights():
            values = to_floats(target_dfi(w, layout))
            for k, v in enumerate(values):
                per_layer[name if len(values) == 1 else f"{name}[{k}]"] = v
        if not per_layer:
            raise ValueError(f"{self!r}: the integration passed no weights to measure")
        return per_layer

    def _limit(self, value):
        if not self.relative:
            return self.threshold
        if self.baseline is None:  # the first check measures the baseline
            self.baseline = value
            return None
        return self.threshold * self.baseline

    def _reason(self, values, value, now, worst):
        against = f"{self.threshold:g} x the first check's {self.baseline:.4g}" if self.relative else f"{self.threshold:g}"
        return (
            f"DfI/n ({self.reduce} over {len(values)} layers) {value:.4g} > {against} at {self.unit} {now}; "
            f"highest {worst} {values[worst]:.4g}"
        )

    def state_dict(self):
        return {**super().state_dict(), "baseline": self.baseline}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.baseline = state.get("baseline")


class _OnFeatures(_Periodic):
    """A trigger on the activations of a probe batch (``moment.features()``), one value per layer."""

    def _values(self, moment) -> dict[str, float]:
        if moment.features is None:
            raise ValueError(
                f"{self!r} needs activations of a probe batch: pass probe= to the integration "
                "(or features= where it takes one)"
            )
        values = {name: self._measure(a) for name, a in moment.features().items()}
        if not values:
            raise ValueError(f"{self!r}: the probe gave no activations to measure")
        return values


class DormantAbove(_OnFeatures):
    """FIRE when the share of tau-dormant units (Sokar et al. 2023) exceeds ``threshold`` on a probe batch.

    ``reduce="mean"`` averages the layers' ratios; ``"max"`` takes the worst layer.
    """

    def __init__(self, threshold: float, every: int = 100, *, tau: float = DORMANT_TAU, reduce: str = "mean",
                 unit: str = "step", cooldown: int | None = None):
        super().__init__(threshold, every, unit, cooldown, reduce)
        if not 0 <= self.threshold < 1:
            raise ValueError(f"DormantAbove: threshold is a share of units in [0, 1), got {threshold!r}")
        self.tau = float(tau)

    def _options(self):
        return {"tau": self.tau}

    def __repr__(self) -> str:
        return f"DormantAbove({self.threshold:g}, every={self.every}, tau={self.tau:g}, reduce={self.reduce!r})"

    def _measure(self, a) -> float:
        return float(dormant_ratio(a, self.tau))

    def _reason(self, values, value, now, worst):
        return (
            f"dormant ratio (tau={self.tau:g}, {self.reduce} over {len(values)} layers) {value:.3g} > "
            f"{self.threshold:g} at {self.unit} {now}; highest {worst} {values[worst]:.3g}"
        )


class SrankBelow(_OnFeatures):
    """FIRE when the features' effective rank (Kumar et al. 2021) falls below ``threshold`` on a probe batch.

    The srank of each layer is divided by its largest possible value
    ``min(batch, units)`` so the threshold is a fraction in ``(0, 1]``; the
    lowest layer decides (``reduce="min"``) or their mean (``"mean"``).
    """

    reduces = ("mean", "min")
    below = True

    def __init__(self, threshold: float, every: int = 100, *, delta: float = SRANK_DELTA, reduce: str = "min",
                 unit: str = "step", cooldown: int | None = None):
        super().__init__(threshold, every, unit, cooldown, reduce)
        if not 0 < self.threshold <= 1:
            raise ValueError(f"SrankBelow: threshold is a fraction of the full rank in (0, 1], got {threshold!r}")
        self.delta = float(delta)

    def _options(self):
        return {"delta": self.delta}

    def __repr__(self) -> str:
        return f"SrankBelow({self.threshold:g}, every={self.every}, delta={self.delta:g}, reduce={self.reduce!r})"

    def _measure(self, a) -> float:
        full = min(a.shape[-2], a.shape[-1])
        return float(srank(a, self.delta)) / full

    def _reason(self, values, value, now, worst):
        return (
            f"srank / full rank ({self.reduce} over {len(values)} layers) {value:.3g} < {self.threshold:g} "
            f"at {self.unit} {now}; lowest {worst} {values[worst]:.3g}"
        )


def target_dfi(w, layout: str, /):
    """Per-layer DfI of ``w`` relative to FIRE's target, normalized: shape ``(stack,)``.

    Each matrix (tap) is divided by the reference scale
    (``scale_factor("fire")``: ``sqrt(d_out / d_in)``, over the taps for a
    conv), and ``||G - I||_F^2`` of its small-side Gram matrix ``G`` is summed
    over the layer's taps and divided by ``taps * min(d_out, d_in)``: the
    report's ``dfi_before`` per unit of the layer. 0 at FIRE's target, 1 for a
    zero weight. Runs eagerly or traced (``jax.jit``); float16 and bfloat16
    are measured in float32.
    """
    xp = array_namespace(w)
    lay = parse_layout(layout, w.shape)
    mats = xp.astype(to_matrices(w, layout), work_dtype(w, xp, "target_dfi"), copy=False)
    ref = scale_factor("fire", lay)
    per_matrix = gram_dfi(small_gram(mats / ref, xp), xp)
    per_layer = xp.sum(xp.reshape(per_matrix, (lay.stack, lay.taps)), axis=1)
    return per_layer / (lay.taps * min(lay.d_out, lay.d_in))


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
