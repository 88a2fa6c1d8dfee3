"""FIRE in the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[FIRECallback(schedule=[1000])])``.

:class:`FIRECallback` polls a :mod:`fire_core.schedule` schedule after every
optimizer step (``on_step_end``, ``step = state.global_step``) and at every
epoch start (``on_epoch_begin``). At a firing it makes one adapter call,
``fire_core.torch.apply(model, optimizer=inner, **apply_options)``, on

* the model the Trainer holds, unwrapped through accelerate
  (``trainer.accelerator.unwrap_model``; DDP and ``torch.compile`` wrappers
  are taken off by ``fire_core.torch`` too, FSDP2's DTensor parameters go
  through its distributed path);
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

DeepSpeed ZeRO-3 partitions every parameter into a placeholder (a
parameter with ``ds_id``/``ds_status``, usually empty) that only DeepSpeed
can gather; FIRE needs whole matrices, so such a model is refused at
``on_train_begin`` with nothing changed.
"""

from __future__ import annotations

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

from . import torch as fire_torch
from .schedule import DormantAbove, Moment, Schedule, SrankBelow, as_schedule

__all__ = ["FIRECallback", "attach"]

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
    the model's activation modules on it.

    ``restart_warmup``: after each firing, the Trainer's LR scheduler starts
    again from its first step, as the reference's language code restarts
    its schedule.

    ``trainer``: the Trainer whose ``log`` the totals go through (see
    :func:`attach`). ``log=False`` logs nothing through the Trainer (the
    reports are still in :attr:`last_report`, the firings in
    :attr:`history`, skipped weights in the ``transformers`` logger).

    ``apply_options``: :func:`fire_core.torch.apply`'s (``steps``,
    ``method``, ``scale``, ``include``, ``exclude``, ``split``, ``layouts``,
    ``frozen``, ``conv_groups``, ``distributed``...), checked here; the
    selection options are checked against the model at ``on_train_begin``.
    """

    def __init__(self, schedule=None, *, probe=None, restart_warmup: bool = False, trainer=None, log: bool = True,
                 **apply_options):
        if schedule is None:
            raise TypeError(
                "FIRECallback needs schedule= (a list of steps, Every(N), a callable or a trigger). If the Trainer "
                "is rebuilding it from a checkpoint (TrainingArguments(restore_callback_states_from_checkpoint="
                "True)): a schedule's triggers and callables cannot be saved as arguments, so leave that option "
                "False; FIRECallback restores its own progress from the checkpoint when training resumes"
            )
        self.select_options = fire_torch.check_options(apply_options, taken=_TAKEN, who="FIRECallback")
        for name, value in (("restart_warmup", restart_warmup), ("log", log)):
            if not isinstance(value, bool):
                raise TypeError(f"FIRECallback: {name} must be True or False, got {value!r}")
        if apply_options.get("dry_run"):
            raise ValueError("FIRECallback: dry_run=True would change nothing at a firing; use "
                             "fire_core.torch.apply(model, dry_run=True) to look at a report")
        self.schedule: Schedule = as_schedule(schedule)
        needs_probe = [t for t in self.schedule.triggers if isinstance(t, (DormantAbove, SrankBelow))]
        if needs_probe and probe is None:
            raise ValueError(f"FIRECallback: {needs_probe[0]!r} reads activations of a probe batch: pass probe=")
        self.probe = probe
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

    def state(self) -> dict:
        """What the Trainer saves in its checkpoint's ``trainer_state.json``: the schedule's progress."""
        return {"args": {}, "attributes": {"schedule": self.schedule.state_dict()}}

    def _restore(self, state) -> None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if saved is None:
            return
        if isinstance(saved, list):  # several FIRECallbacks: saved in the order the Trainer holds them
            saved = self._mine(saved)
        self.schedule.load_state_dict(saved.get("attributes", {}).get("schedule", {}))

    def _mine(self, saved: list) -> dict:
        """This callback's entry among several saved FIRECallback states."""
        if self.trainer is not None:
            same = [c for c in self.trainer.callback_handler.callbacks if type(c) is type(self)]
            if len(same) == len(saved) and any(c is self for c in same):
                return saved[next(k for k, c in enumerate(same) if c is self)]
        ours = [repr(t) for t in self.schedule.triggers]
        found = [s for s in saved if s.get("attributes", {}).get("schedule", {}).get("triggers") == ours]
        if len(found) != 1:
            raise ValueError(
                f"the checkpoint holds {len(saved)} {type(self).__name__} states and {len(found)} of them have this "
                f"callback's schedule {ours}: bind each callback to the Trainer (attach or trainer=) so its "
                "saved state is found by position"
            )
        return found[0]

    # --- the events -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.log and self.trainer is None:
            raise ValueError(
                "FIRECallback logs its reports through Trainer.log, and a TrainerCallback is not given the "
                "Trainer: use fire_core.transformers.attach(trainer, schedule=...), FIRECallback(..., "
                "trainer=trainer), or callback.bind(trainer) before train(); log=False logs nothing"
            )
        model = self._model(model)
        _refuse_placeholders(model)
        _refuse_deepspeed(self.trainer, args)
        fire_torch.select(model, **self.select_options)  # a selection typo fails here, not at the firing
        if self.restart_warmup:
            _check_restartable(_inner_scheduler(lr_scheduler))
        self._restore(state)

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
        )
        firing = self.schedule.poll(moment)
        if firing is not None:
            self._fire(firing, model, state, control, kwargs)

    def _fire(self, firing, model: nn.Module, state, control, kwargs) -> None:
        _refuse_placeholders(model)
        scheduler = _inner_scheduler(kwargs.get("lr_scheduler")) if self.restart_warmup else None
        if scheduler is not None:
            _check_restartable(scheduler)
        probe = None if self.probe is None else self._probe(model)
        report = fire_torch.apply(model, optimizer=_inner_optimizer(kwargs.get("optimizer")), probe=probe,
                                  **self.apply_options)
        if scheduler is not None:
            _restart(scheduler)
        self.last_report = report
        if state.is_world_process_zero:
            logger.info("%s\n%s", firing, report)
            shown = "\n".join(report.skipped_lines() + list(report.notes))
            if shown and shown not in self._shown:  # each distinct set once, not at every firing
                self._shown.add(shown)
                logger.warning("FIRE at step %d left weights alone or noted:\n%s", firing.step, shown)
        if self.log:
            due = control.should_log  # Trainer.log clears it; the Trainer's own loss log of this step must still run
            self.trainer.log(_totals(report))
            control.should_log = due

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


def _totals(report) -> dict[str, float]:
    """The report as the numbers logged at a firing."""
    logs = {
        "fire/fired": 1.0,
        "fire/weights": float(len(report.rows)),
        "fire/sfe": report.total("sfe"),
        "fire/dfi_before": report.total("dfi_before"),
        "fire/dfi_after": report.total("dfi_after"),
        "fire/skipped": float(len(report.skipped)),
    }
    if report.drift is not None:
        logs["fire/drift"] = float(report.drift)
    return logs


def _refuse_placeholders(model: nn.Module) -> None:
    """DeepSpeed ZeRO-3's partitioned parameters cannot be projected: refuse them, naming the limitation."""
    held = [name for name, p in model.named_parameters() if hasattr(p, "ds_id") or hasattr(p, "ds_status")]
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise RuntimeError(
            f"FIRE cannot act on DeepSpeed ZeRO-3 partitioned parameters ({shown}): each rank holds a "
            "placeholder (ds_id/ds_status) and a slice of every matrix, and Newton-Schulz on slices is "
            "wrong; nothing was changed. Use DDP, or FSDP through accelerate (its DTensor "
            "parameters are projected whole by fire_core.torch)"
        )


def _refuse_deepspeed(trainer, args) -> None:
    """Any DeepSpeed ZeRO stage keeps its own fp32 copy of the weights, which FIRE cannot reach: refuse.

    ZeRO stages 1 and 2 hold each rank's partition of the weights in fp32
    inside DeepSpeed's optimizer and copy it into the model's parameters after
    every step, so weights written by FIRE would be overwritten by the old
    ones at the next step (stage 3 is refused for its placeholders first).
    """
    enabled = bool(getattr(trainer, "is_deepspeed_enabled", False)) or bool(getattr(args, "deepspeed", None))
    if enabled:
        raise RuntimeError(
            "FIRE cannot act on a Trainer that runs DeepSpeed: every ZeRO stage keeps its own fp32 copy of the "
            "weights in DeepSpeed's optimizer and writes it back after each step, so projected weights would be "
            "overwritten by the old ones; nothing was changed. Use DDP, or FSDP through accelerate (its DTensor "
            "parameters are projected whole by fire_core.torch)"
        )


def _inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (``.optimizer``), or the one given."""
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
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
