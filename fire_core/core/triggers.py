"""The triggers a :class:`~fire_core.schedule.Schedule` polls: when FIRE should be applied.

Each trigger answers one :class:`Moment` (optimizer steps done, the epoch,
and callables that give the weights and the activations of a probe batch)
with None or a reason, and keeps its own progress under a stable
:meth:`Trigger.spec`. Counted: :class:`AtSteps`, :class:`Every`, a callable
(:class:`When`). Measured: :class:`DfIAbove` on the weights alone
(:func:`target_dfi`), :class:`DormantAbove` and :class:`SrankBelow` on the
activations, :class:`LookaheadBelow` on a trial of FIRE on the new task's data. :mod:`.schedule` combines them, records the firings and saves
the progress; a new trigger is a class here.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ._array import array_namespace, to_floats, work_dtype
from .diagnostics import DORMANT_TAU, SRANK_DELTA, dormant_ratio, srank
from .layout import parse_layout, scale_factor, to_matrices
from .metrics import gram_dfi, small_gram


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
    trainer, the model), for user callables. ``lookahead(k)``: a trial on
    the new task's data, ``(loss without FIRE, loss with FIRE)``: the loss
    on a held-out probe batch of two copies of the model, one with FIRE
    applied, after ``k`` optimizer steps each on a few new-task batches
    (read by :class:`LookaheadBelow`; see :func:`~fire_core.schedule.when_needed`).
    """

    step: int
    epoch: int | None = None
    at: str = "step"
    weights: Callable[[], Iterable[tuple[str, Any, str]]] | None = None
    features: Callable[[], Mapping[str, Any]] | None = None
    context: Mapping[str, Any] = field(default_factory=dict)
    lookahead: Callable[[int], tuple[float, float]] | None = None

    def position(self, unit: str) -> int | None:
        """The count a trigger in ``unit`` compares with, or None if this poll is not in that unit."""
        if unit == "step":
            return self.step if self.at == "step" else None
        return self.epoch if self.at == "epoch" else None


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


LOOKAHEAD_STEPS = 200
"""The trial's length: optimizer steps each copy takes (Adam, lr 1e-3, 4 new-task batches of 64, cycled)."""


class LookaheadBelow(_Periodic):
    """FIRE when a trial on the new task says FIRE learns it faster: ``loss with / loss without < threshold``.

    At each check the trigger calls ``moment.lookahead(steps)``, which the
    caller provides: two copies of the model, one with FIRE applied (as it
    would be applied), each take ``steps`` optimizer steps (a fresh
    optimizer) on a few batches of the new task, and the function returns
    ``(loss without FIRE, loss with FIRE)`` on a probe batch of the new task
    held out of those batches. The trigger fires when their ratio (with /
    without) is below ``threshold``. The value is a ratio of two losses on
    the same data, so it needs no baseline and carries across networks: it
    reads what the network can still learn, not how its weights look. Its
    cost is the trial's: two copies of the model, ``2 * steps`` optimizer
    steps and two probe forwards per check
    (``benchmarks/results/when_needed_study.md``). A poll at step 0 (the
    initial network) measures nothing. ``reduce`` is ``"mean"`` (one value).
    """

    reduces = ("mean",)
    below = True

    def __init__(self, threshold: float, every: int = 1, *, steps: int = LOOKAHEAD_STEPS, unit: str = "step",
                 cooldown: int | None = None, reduce: str = "mean"):
        super().__init__(threshold, every, unit, cooldown, reduce)
        if self.threshold <= 0:
            raise ValueError(f"LookaheadBelow: threshold is a ratio of two losses, positive, got {threshold!r}")
        self.steps = _count(steps, "LookaheadBelow(steps=)", minimum=1)
        self.last_losses: tuple[float, float] | None = None

    def _options(self):
        return {"steps": self.steps}

    def __repr__(self) -> str:
        unit = "" if self.unit == "step" else f", unit={self.unit!r}"
        return f"LookaheadBelow({self.threshold:g}, every={self.every}, steps={self.steps}{unit})"

    def _due(self, moment):
        if moment.position(self.unit) == 0:  # no trial on the initial network: nothing learned, nothing lost
            return None
        return super()._due(moment)

    def _values(self, moment) -> dict[str, float]:
        if moment.lookahead is None:
            raise ValueError(
                f"{self!r} needs a trial of FIRE on the new task's data: pass Moment(lookahead=fn), fn(k) giving "
                "(probe loss without FIRE, probe loss with FIRE) after k optimizer steps on copies of the model"
            )
        got = moment.lookahead(self.steps)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ValueError(f"{self!r}: lookahead({self.steps}) must return (loss without FIRE, loss with FIRE), "
                             f"got {got!r}")
        without, with_fire = (float(v) for v in got)
        if not (math.isfinite(without) and math.isfinite(with_fire) and without >= 0 and with_fire >= 0):
            raise ValueError(f"{self!r}: lookahead({self.steps}) returned losses {without!r} (without FIRE) and "
                             f"{with_fire!r} (with FIRE); both must be finite and non-negative")
        self.last_losses = (without, with_fire)
        if without == 0:
            ratio = 1.0 if with_fire == 0 else math.inf  # nothing left to gain without FIRE: never fires
        else:
            ratio = with_fire / without
        return {"lookahead": ratio}

    def _reason(self, values, value, now, worst):
        without, with_fire = self.last_losses
        return (
            f"lookahead: probe loss after {self.steps} steps with FIRE {with_fire:.4g} / without {without:.4g} = "
            f"{value:.3g} < {self.threshold:g} at {self.unit} {now}"
        )

    def state_dict(self):
        return {**super().state_dict(), "last_losses": None if self.last_losses is None else list(self.last_losses)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        losses = state.get("last_losses")
        self.last_losses = None if losses is None else (float(losses[0]), float(losses[1]))


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
