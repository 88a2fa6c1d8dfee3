"""FIRE in the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[FIRECallback(schedule=[1000])])``.

:class:`FIRECallback` polls a :mod:`fire_core.schedule` schedule after every
optimizer step (``on_step_end``, ``step = state.global_step``) and at every
epoch start (``on_epoch_begin``). At a firing it makes one adapter call,
``fire_core.torch.apply(model, optimizer=inner, **apply_options)``, on

* the model the Trainer holds, unwrapped through accelerate
  (``trainer.accelerator.unwrap_model``; DDP and ``torch.compile`` wrappers
  are taken off by ``fire_core.torch`` too, FSDP2's DTensor parameters go
  through its distributed path; FSDP1, ``fsdp_config`` version 1, is refused
  at ``on_train_begin``: its FlatParameters hold slices of many weights);
* the torch optimizer inside accelerate's ``AcceleratedOptimizer``
  (``.optimizer``): the AdamW state of exactly the projected parameters is
  dropped, the others keep theirs.

GPT-2's fused ``c_attn`` (a ``Conv1D``) is split into q, k, v by
``fire_core.torch`` as the reference does; the tied LM head is projected once
(see ``docs/transformers.md`` for the measurement behind that default).

``restart_warmup=True`` restarts the Trainer's learning-rate scheduler from
its first step. The report's totals are logged through ``Trainer.log`` (so
they are in ``state.log_history`` and reach every reporter), its skipped
weights and notes through the ``transformers`` logger. The schedule's
progress is saved in the Trainer's checkpoints (a stateful callback) and
restored on ``resume_from_checkpoint``.

A TrainerCallback is not handed the Trainer, which ``Trainer.log`` needs:
build the callback with ``trainer=`` or through :func:`attach`, or give it
the trainer later with :meth:`FIRECallback.bind`.

Under DeepSpeed (``TrainingArguments(deepspeed=...)``, ZeRO stages 0-3) the
callback hands ``fire_core.torch.apply`` the engine's ZeRO optimizer, which
reads each weight whole from DeepSpeed's fp32 master and writes the weight,
the master and the optimizer state (``docs/distributed.md``). DeepSpeed
steps each parameter group as one flat tensor with one Adam step count, so
the weights FIRE projects need a group of their own
(``fire_core.torch.param_groups``; ``docs/transformers.md`` shows the
``create_optimizer`` override); what cannot be written exactly (that, or
offloading) is refused at ``on_train_begin``, with nothing changed.
"""

from __future__ import annotations

import json
import math
from typing import Any

try:
    import transformers
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fire_core.transformers needs the transformers library (and accelerate for its Trainer): "
        "pip install 'fire-core[transformers]'"
    ) from exc

import torch
from torch import nn

from .. import torch as fire_torch
from ..core.schedule import DormantAbove, Moment, Schedule, SrankBelow, as_schedule, check_trial
from ..core.triggers import callable_name
from ..torch import _deepspeed
from ..torch._checks import _FSDP1, _fsdp1_problem

__all__ = ["FIRECallback", "FIRE", "attach"]

logger = transformers.utils.logging.get_logger(__name__)

# apply's arguments the callback gives itself, and why a user cannot pass them
_TAKEN = {
    "optimizer": "the callback resets the torch optimizer inside the Trainer's AcceleratedOptimizer",
    "probe": "pass probe= to FIRECallback itself",
}

# learning-rate schedulers whose whole state is last_epoch and the groups' initial lr:
# restarting them is setting those back. Others (SequentialLR, ChainedScheduler hold
# sub-schedulers; ReduceLROnPlateau follows a metric) are refused with restart_warmup.
_RESTARTABLE = (
    torch.optim.lr_scheduler.LambdaLR,
    torch.optim.lr_scheduler.MultiplicativeLR,
    torch.optim.lr_scheduler.StepLR,
    torch.optim.lr_scheduler.MultiStepLR,
    torch.optim.lr_scheduler.ConstantLR,
    torch.optim.lr_scheduler.LinearLR,
    torch.optim.lr_scheduler.ExponentialLR,
    torch.optim.lr_scheduler.PolynomialLR,
    torch.optim.lr_scheduler.CosineAnnealingLR,
    torch.optim.lr_scheduler.OneCycleLR,
)


class FIRECallback(TrainerCallback, ExportableState):
    """Apply FIRE to the Trainer's model at the steps ``schedule`` gives.

    ``schedule``: any :func:`fire_core.schedule.as_schedule` form: a list of
    steps (``[1000, 2000]``: after the 1000th optimizer step), ``Every(N)``
    or ``{"every": N}`` (``"unit": "epoch"`` for epoch starts), a callable of
    a :class:`~fire_core.schedule.Moment` (its ``context`` holds
    ``trainer``, ``model``, ``state``, ``args``), a trigger (``DfIAbove``,
    ``DormantAbove``, ``SrankBelow``) or a list of these.

    ``probe``: keyword inputs of the model (``{"input_ids": ...}``), a tensor,
    or a callable returning one. Given, each report has the function drift
    on it (``fire/drift``), and the activation triggers read the outputs of
    the model's activation modules on it. It is run once at
    ``on_train_begin``, as a firing would run it: a probe the model does not
    take stops ``train()`` there, with nothing changed.

    ``restart_warmup``: after each firing, the Trainer's LR scheduler starts
    again from its first step, as the reference's language code restarts
    its schedule.

    ``trainer``: the Trainer whose ``log`` the totals go through (see
    :func:`attach`). ``log=False`` logs nothing through the Trainer (the
    reports are still in :attr:`last_report`, the firings in
    :attr:`history`, skipped weights in the ``transformers`` logger).

    ``name``: this callback's identity in the checkpoints' saved progress,
    for one callback among several on a Trainer (unique among them). By
    default a callback is known by its schedule's
    :meth:`~fire_core.schedule.Schedule.spec` and its position among the
    Trainer's FIRECallbacks; a name lets its schedule change between runs
    (carried over by :meth:`~fire_core.schedule.Schedule.load_state_dict`)
    whatever the others do.

    ``apply_options``: :func:`fire_core.torch.apply`'s (``steps``,
    ``method``, ``scale``, ``include``, ``exclude``, ``split``, ``layouts``,
    ``frozen``, ``conv_groups``, ``report``, ``distributed``...), checked
    here; the selection options are checked against the model at
    ``on_train_begin``.

    A fresh run polls the schedule once at step 0 (``on_train_begin``): the
    measured triggers take the initial network as their baseline. Each
    firing goes through ``Schedule.poll(..., fire=...)``: if
    ``fire_core.torch.apply`` fails (a NaN weight), the error propagates,
    the schedule is as it was (nothing marked done) and the LR scheduler is
    not restarted. A recorded firing logs ``fire/fired`` (the number of
    firings so far) and :meth:`~fire_core.report.Report.metrics` (no SFE or
    DfI with ``report=False``), kept in its ``Firing.info``.
    ``FIRE`` is another name of this class.
    """

    def __init__(self, schedule=None, *, name: str | None = None, probe=None, restart_warmup: bool = False,
                 trainer=None, log: bool = True, trial=None, **apply_options):
        if schedule is None:
            raise TypeError(
                "FIRECallback needs schedule= (a list of steps, Every(N), a callable or a trigger). If the Trainer "
                "is rebuilding it from a checkpoint (TrainingArguments(restore_callback_states_from_checkpoint="
                "True)): a schedule's triggers and callables cannot be saved as arguments, so leave that option "
                "False; FIRECallback restores its own progress from the checkpoint when training resumes"
            )
        self.select_options = fire_torch.check_options(apply_options, taken=_TAKEN, who="FIRECallback")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"FIRECallback: name must be a non-empty string, got {type(name).__name__} {name!r}")
        self.name = name
        for option, value in (("restart_warmup", restart_warmup), ("log", log)):
            if not isinstance(value, bool):
                raise TypeError(f"FIRECallback: {option} must be True or False, got {value!r}")
        if apply_options.get("dry_run"):
            raise ValueError("FIRECallback: dry_run=True would change nothing at a firing; use "
                             "fire_core.torch.apply(model, dry_run=True) to look at a report")
        self.schedule: Schedule = as_schedule(schedule)
        needs_probe = [t for t in self.schedule.triggers if isinstance(t, (DormantAbove, SrankBelow))]
        if needs_probe and probe is None:
            raise ValueError(f"FIRECallback: {needs_probe[0]!r} reads activations of a probe batch: pass probe=")
        check_trial(self.schedule, trial, "FIRECallback")
        self.probe, self.trial = probe, trial
        self.restart_warmup = restart_warmup
        self.log = log
        self.apply_options = dict(apply_options)
        self.trainer = trainer
        self.last_report = None  # the Report of the latest firing
        self._shown: set[str] = set()

    # --- the Trainer ------------------------------------------------------------------------------

    def bind(self, trainer) -> "FIRECallback":
        """Give the callback the Trainer it logs through; returns the callback."""
        if not callable(getattr(trainer, "log", None)):
            raise TypeError(f"bind expects a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        return self

    @property
    def history(self) -> list:
        """Every :class:`~fire_core.schedule.Firing` so far (restored with the schedule on resume)."""
        return self.schedule.history

    # --- checkpointing: transformers' stateful callbacks ------------------------------------------

    def identity(self) -> dict:
        """This callback's identity in saved progress: ``{"name": name}``, or its schedule's spec and position.

        The position is its index among the Trainer's callbacks of this class
        (None while unbound). JSON-able and the same in every process.
        """
        if self.name is not None:
            return {"name": self.name}
        return {"name": None, "spec": self.schedule.spec(), "index": self._index()}

    def state(self) -> dict:
        """What the Trainer saves in its checkpoint's ``trainer_state.json``: the identity and the schedule's progress."""
        return {"args": {}, "attributes": {"identity": self.identity(), "schedule": self.schedule.state_dict()}}

    def _siblings(self) -> list:
        """The Trainer's callbacks saved under this class's name (transformers keys stateful callbacks by it)."""
        if self.trainer is None or getattr(self.trainer, "callback_handler", None) is None:
            return [self]
        same = [c for c in self.trainer.callback_handler.callbacks if type(c).__name__ == type(self).__name__]
        return same if any(c is self for c in same) else [self]

    def _index(self) -> int | None:
        if self.trainer is None or getattr(self.trainer, "callback_handler", None) is None:
            return None
        return next((k for k, c in enumerate(self._siblings()) if c is self), None)

    def _who(self) -> str:
        return type(self).__name__ + (f" {self.name!r}" if self.name is not None else f" {self.schedule.spec()}")

    def _restore(self, state) -> None:
        """Load this callback's latest saved progress (on resume); log what a changed schedule carried over."""
        if not state.global_step:  # a fresh run: nothing to resume
            return
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        entries = [] if saved is None else saved if isinstance(saved, list) else [saved]
        entry = self._mine([e for e in entries if isinstance(e, dict)])
        if entry is not None:
            progress = entry.get("attributes", {}).get("schedule", {})
        else:  # resumed from a checkpoint that holds no progress of this callback: nothing of it has fired
            progress = {"format": 2, "triggers": [], "specs": [], "trigger_state": [], "history": [],
                        "last_poll": int(state.global_step), "last_epoch": None}
        try:
            lines = self.schedule.load_state_dict(progress)
        except ValueError as exc:
            raise ValueError(f"{self._who()} cannot resume from the checkpoint at step {state.global_step}: {exc}") from exc
        for line in lines:
            logger.info("%s: %s", self._who(), line)

    def _mine(self, entries: list) -> dict | None:
        """This callback's latest entry among the saved states of its class, or None when none is its.

        The Trainer appends every callback's state to the list at each save
        (and the list of a resumed run grows on the checkpoint's), so an
        identity appears many times: the last entry wins. Each callback of
        the Trainer is matched to a saved identity, by the same rules on
        every callback: its name; else the same spec at the same position;
        else the same spec, if one saved unnamed identity has it; else (a
        changed schedule) the one saved unnamed identity no callback
        claimed, when it is the only unclaimed callback. Anything else is
        refused, asking for ``name=``.
        """
        known = [e for e in entries if isinstance(e.get("attributes", {}).get("identity"), dict)]
        if entries and not known:  # saved by an older fire_core: no identity
            return self._legacy(entries)
        latest: dict[str, dict] = {}
        for e in known:
            key = json.dumps(e["attributes"]["identity"], sort_keys=True)
            latest.pop(key, None)
            latest[key] = e  # insertion order: the latest save last
        saved = {key: json.loads(key) for key in latest}
        siblings = self._siblings()
        claimed: dict[int, str] = {}  # sibling index -> saved key
        free = dict(saved)
        idents = [c.identity() for c in siblings]
        for k, ident in enumerate(idents):  # the same identity
            key = json.dumps(ident, sort_keys=True)
            if key in free:
                claimed[k] = key
                del free[key]
        for k, ident in enumerate(idents):  # the same schedule, moved among the callbacks
            if k in claimed or ident["name"] is not None:
                continue
            same = [key for key, v in free.items() if v.get("name") is None and v.get("spec") == ident["spec"]]
            if len(same) == 1:
                claimed[k] = same[0]
                del free[same[0]]
        unnamed = [key for key, v in free.items() if v.get("name") is None]
        left = [k for k in range(len(siblings)) if k not in claimed]
        ours = next(k for k, c in enumerate(siblings) if c is self)
        if ours in claimed:
            return latest[claimed[ours]]
        if not unnamed:
            return None  # new since the checkpoint
        if len(unnamed) == 1 and len(left) == 1:  # one schedule changed: carried over (or refused) by the schedule
            return latest[unnamed[0]]
        shown = "; ".join(_shown(saved[key]) for key in unnamed)
        raise ValueError(
            f"{self._who()}: the checkpoint holds the progress of FIRECallbacks no callback of this Trainer matches "
            f"by its name or schedule ({shown}), and {len(left)} callbacks to give it to: which is whose would be a "
            "guess. Give each FIRECallback name= (its identity in the checkpoints), or resume with the saved schedules"
        )

    def _check_name(self) -> None:
        """A name is an identity: two callbacks of one Trainer may not share it."""
        if self.name is None:
            return
        twins = [c for c in self._siblings() if getattr(c, "name", None) == self.name]
        if len(twins) > 1:
            raise ValueError(f"{len(twins)} FIRECallbacks of this Trainer have name={self.name!r}: a name is a "
                             "callback's identity in the checkpoints' saved progress, give each its own")

    def _legacy(self, entries: list) -> dict:
        """The entry of a checkpoint saved before states carried an identity: by position in the latest save."""
        siblings = self._siblings()
        if len(entries) == 1 and len(siblings) == 1:
            return entries[0]
        index = self._index()
        if index is None or len(entries) % len(siblings):
            raise ValueError(
                f"the checkpoint holds {len(entries)} {type(self).__name__} states saved without an identity (an "
                "older fire_core): bind each callback to the Trainer (attach or trainer=), with the callbacks the "
                "checkpoint was saved with, so that its state is found by its position in the latest save"
            )
        return entries[len(entries) - len(siblings) + index]

    # --- the events -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.log and self.trainer is None:
            raise ValueError(
                "FIRECallback logs its reports through Trainer.log, and a TrainerCallback is not given the "
                "Trainer: use fire_core.transformers.attach(trainer, schedule=...), FIRECallback(..., "
                "trainer=trainer), or callback.bind(trainer) before train(); log=False logs nothing"
            )
        self._check_name()
        model = self._model(model)
        _refuse_fsdp1(self.trainer, model)
        # a selection typo, or DeepSpeed state FIRE could not write exactly, fails here, not at the firing
        fire_torch.check(model, optimizer=_inner_optimizer(optimizer), **self.select_options)
        if self.restart_warmup:
            _check_restartable(_inner_scheduler(lr_scheduler))
        if self.probe is not None:
            self._try_probe(model)
        self._restore(state)
        if state.global_step == 0:  # a fresh run: the initial network is the measured triggers' baseline
            self._poll(args, state, control, "step", 0,
                       {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler, **kwargs})

    def on_step_end(self, args, state, control, **kwargs):
        self._poll(args, state, control, "step", int(state.global_step), kwargs)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._poll(args, state, control, "epoch", int(math.floor(state.epoch or 0)), kwargs)

    # --- a firing ---------------------------------------------------------------------------------

    def _poll(self, args, state, control, at: str, epoch_or_step: int, kwargs) -> None:
        model = self._model(kwargs.get("model"))
        epoch = epoch_or_step if at == "epoch" else int(math.floor(state.epoch or 0))
        moment = Moment(
            step=int(state.global_step),
            epoch=epoch,
            at=at,
            weights=lambda: fire_torch.select(model, **self.select_options),
            features=None if self.probe is None else (lambda: _activations(model, self._probe(model))),
            context={"trainer": self.trainer, "model": model, "state": state, "args": args},
            lookahead=None if self.trial is None else (lambda k: self.trial(model)(k)),
        )
        firing = self.schedule.poll(moment, fire=lambda f: self._fire(f, model, kwargs))
        if firing is not None:
            self._logged(firing, state, control)

    def _fire(self, firing, model: nn.Module, kwargs) -> None:
        """Apply FIRE for ``firing``; called inside the poll, so a failure leaves the schedule as it was."""
        scheduler = _inner_scheduler(kwargs.get("lr_scheduler")) if self.restart_warmup else None
        if scheduler is not None:
            _check_restartable(scheduler)
        probe = None if self.probe is None else self._probe(model)
        report = fire_torch.apply(model, optimizer=_inner_optimizer(kwargs.get("optimizer")), probe=probe,
                                  **self.apply_options)
        if scheduler is not None:  # only once the weights are written: a failed firing leaves the scheduler
            _restart(scheduler)
        self.last_report = report
        firing.info.update(report.metrics())

    def _logged(self, firing, state, control) -> None:
        """Log a recorded firing: the report to the ``transformers`` logger, the numbers through ``Trainer.log``."""
        report = self.last_report
        if state.is_world_process_zero:
            logger.info("%s\n%s", firing, report)
            shown = "\n".join(report.skipped_lines() + list(report.notes))
            if shown and shown not in self._shown:  # each distinct set once, not at every firing
                self._shown.add(shown)
                logger.warning("FIRE at step %d left weights alone or noted:\n%s", firing.step, shown)
        if self.log:
            due = control.should_log  # Trainer.log clears it; the Trainer's own loss log of this step must still run
            self.trainer.log({"fire/fired": float(len(self.history)), **firing.info})
            control.should_log = due

    def _try_probe(self, model: nn.Module) -> None:
        """Run the probe once as a firing (or an activation trigger) would, changing nothing; a clear error if it fails."""
        try:
            probe = self._probe(model)
            if any(isinstance(t, (DormantAbove, SrankBelow)) for t in self.schedule.triggers):
                _activations(model, probe)
            else:  # the plain forward of the drift, as fire_core.torch.apply runs it
                fire_torch._run_probe(model, probe, {})
        except Exception as exc:
            raise ValueError(
                f"FIRECallback: the probe ({_describe(self.probe)}) fails on the model ({type(model).__name__}) "
                f"when training starts: {type(exc).__name__}: {exc}. probe= must be inputs this model takes (a dict "
                "of keyword inputs, a tensor, a tuple), or a callable returning them; nothing was changed"
            ) from exc

    def _model(self, model) -> nn.Module:
        if self.trainer is not None:
            accelerator = getattr(self.trainer, "accelerator", None)
            held = model if model is not None else self.trainer.model
            return accelerator.unwrap_model(held) if accelerator is not None else held
        if model is None:
            raise ValueError("FIRECallback: the Trainer passed no model to the callback")
        return model

    def _probe(self, model: nn.Module):
        probe = self.probe() if callable(self.probe) else self.probe
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return _to_device(probe, device)


def attach(trainer, schedule, **options) -> FIRECallback:
    """Add a :class:`FIRECallback` bound to ``trainer`` (for ``Trainer.log``) and return it."""
    callback = FIRECallback(schedule, trainer=trainer, **options)
    trainer.add_callback(callback)
    return callback


FIRE = FIRECallback  # the name the Lightning and SB3 callbacks had first; one class


def _shown(identity: dict) -> str:
    """A saved identity, for a message."""
    if identity.get("name") is not None:
        return f"name={identity['name']!r}"
    return f"schedule {identity.get('spec')} at position {identity.get('index')}"


def _describe(probe) -> str:
    """What the probe is, for a message: its keys, shape or callable's name."""
    if isinstance(probe, dict):
        return f"a dict of keyword inputs {sorted(map(str, probe))}"
    if isinstance(probe, torch.Tensor):
        return f"a tensor of shape {tuple(probe.shape)}"
    if isinstance(probe, tuple):
        return f"a tuple of {len(probe)} inputs"
    if callable(probe):
        return f"the callable {callable_name(probe)}"
    return type(probe).__name__


def _refuse_fsdp1(trainer, model: nn.Module) -> None:
    """FSDP1 through accelerate (``fsdp_config`` version 1): refuse when training starts, nothing changed.

    The model the callback is handed, unwrapped by accelerate, has lost only
    its outer ``FullyShardedDataParallel``: its parameters are FlatParameters
    (``use_orig_params=False``) or 1-D views of this rank's slice of one
    (``use_orig_params=True``), and inner wrapped blocks are still FSDP1
    modules. :func:`fire_core.torch.apply` refuses each of these; this check
    says it at ``on_train_begin`` in the Trainer's terms, also from accelerate's
    plugin alone (``fsdp_version == 1``).
    """
    plugin = None
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    version = getattr(plugin, "fsdp_version", None)
    problem = _fsdp1_problem(model)
    if version == 1 or problem is not None:
        raise ValueError(
            "FIRECallback: the Trainer's model is sharded by FSDP1 (torch's FullyShardedDataParallel, which "
            "accelerate applies for fsdp_config version 1), refused when training starts. "
            + (problem or _FSDP1.format(what="accelerate's FSDP plugin has fsdp_version=1"))
        )


def _inner_optimizer(optimizer):
    """The optimizer whose state FIRE resets: the torch optimizer inside accelerate's ``AcceleratedOptimizer``
    (``.optimizer``), or under DeepSpeed the engine's ZeRO optimizer (whose own inner optimizer steps the flat
    fp32 masters; ``fire_core.torch`` resets it group by group)."""
    while optimizer is not None and not _deepspeed.is_wrapper(optimizer):
        inner = getattr(optimizer, "optimizer", None)
        if not (isinstance(inner, torch.optim.Optimizer) or _deepspeed.is_wrapper(inner)):
            break
        optimizer = inner
    return optimizer


def _inner_scheduler(scheduler):
    """The torch scheduler inside accelerate's ``AcceleratedScheduler`` (``.scheduler``), or the one given."""
    while scheduler is not None and hasattr(scheduler, "scheduler") and not hasattr(scheduler, "last_epoch"):
        scheduler = scheduler.scheduler
    return scheduler


def _check_restartable(scheduler) -> None:
    if scheduler is None:
        raise ValueError("restart_warmup=True, but the Trainer passed no lr_scheduler to the callback")
    if not isinstance(scheduler, _RESTARTABLE):
        raise TypeError(
            f"restart_warmup=True cannot restart a {type(scheduler).__name__}: only schedulers whose state is "
            f"their step count are restarted ({', '.join(t.__name__ for t in _RESTARTABLE)}; the Trainer's "
            "lr_scheduler_type 'linear', 'cosine', 'constant_with_warmup'... are LambdaLR); pass "
            "restart_warmup=False or one of those"
        )


def _restart(scheduler) -> None:
    """Put ``scheduler`` back at its first step, as a new one on the same optimizer would be.

    A new scheduler starts from the groups' ``initial_lr`` at ``last_epoch = -1``
    and takes its initial step (``last_epoch = 0``); the chainable forms
    (LinearLR...) compute from the current lr, so it is set back first.
    """
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = lr
    scheduler.last_epoch = -1
    scheduler._initial_step()


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _activations(model: nn.Module, probe) -> dict[str, torch.Tensor]:
    """:func:`fire_core.torch.activations` of the probe in eval mode (no dropout), the model's mode restored."""
    was_training = model.training
    try:
        model.eval()
        return fire_torch.activations(model, probe, forward=_call)
    finally:
        model.train(was_training)


def _call(model: nn.Module, probe) -> Any:
    if isinstance(probe, dict):
        return model(**probe)
    if isinstance(probe, tuple):
        return model(*probe)
    return model(probe)
