"""PyTorch Lightning: FIRE as a ``Callback``, applied when a schedule says so.

::

    import lightning.pytorch as pl
    from fire_core.lightning import FIRECallback

    trainer = pl.Trainer(max_steps=3000, callbacks=[FIRECallback(schedule=[1000, 2000], steps=10)])

At each firing the callback makes one :func:`fire_core.torch.apply` call on
the ``LightningModule`` with the user's ``apply`` options and every optimizer
the trainer holds (the state of exactly the projected parameters is dropped),
optionally restarts every learning-rate scheduler from its initial state
(``restart_warmup=True``), and logs the report's numbers to every logger.
When to fire is :mod:`fire_core.schedule`'s business: the callback polls
:meth:`~fire_core.schedule.Schedule.poll` once at step 0 when a run starts
from scratch (measured triggers take the initial network as their baseline),
after each optimizer step (``on_train_batch_end``, ``step =
trainer.global_step``) and at each epoch start (``on_train_epoch_start``). It
applies FIRE through ``poll(fire=...)``, so a firing that fails is not
recorded, and keeps the schedule's progress in its ``state_dict()`` under a
``state_key`` that does not depend on the schedule (the class name and
``name=``), so that a run resumed from a checkpoint in a new process neither
fires twice nor misses a boundary, and a changed schedule is carried over or
refused by :meth:`~fire_core.schedule.Schedule.load_state_dict`. ``FIRE`` is
an alias of :class:`FIRECallback`. See ``docs/lightning.md``.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fire_core.lightning needs PyTorch Lightning (lightning>=2.2): pip install 'fire-core[lightning]'"
    ) from exc

import torch

from .. import torch as fire_torch
from ..core.schedule import DormantAbove, Moment, SrankBelow, as_schedule, check_trial

__all__ = ["FIRECallback", "FIRE"]

_TAKEN = {  # apply's arguments the callback fills in itself, and why a user cannot pass them
    "optimizer": "the callback resets every optimizer the trainer holds",
    "probe": "pass probe= to FIRECallback itself",
    "dry_run": "a callback that changes nothing has nothing to do; call fire_core.torch.apply(dry_run=True) yourself",
}


class FIRECallback(pl.Callback):
    """Apply FIRE to the ``LightningModule`` when ``schedule`` fires.

    ``schedule``: any form :func:`fire_core.schedule.as_schedule` takes (a
    list of steps, ``Every(n)``, a callable of a Moment, ``DfIAbove``,
    ``DormantAbove``, ``SrankBelow``, or a list of these).

    ``name``: the callback's identity in a checkpoint. Its progress is saved
    under ``state_key``: ``"FIRECallback"``, or ``"FIRECallback{'name': ...}"``
    with a name (built like ``ModelCheckpoint``'s key), the same in every
    process and whatever the schedule, so a run resumed with a changed
    schedule finds its progress and carries it over (or is refused naming
    both schedules). Two callbacks in one ``Trainer`` need distinct names:
    Lightning refuses two stateful callbacks with one ``state_key``.

    ``probe``: the model's inputs for ``pl_module(...)`` (a tensor, a tuple
    of positional inputs or a dict of keyword inputs), or a callable of no
    arguments returning them; moved to the module's device. It gives the
    activation triggers their features (the outputs of the model's
    activation modules, read by :func:`fire_core.torch.activations`) and
    each firing's function drift (``fire/drift``). It is run once when
    ``fit`` starts, so a probe that does not fit the model fails then.

    ``restart_warmup``: at a firing, every scheduler in
    ``trainer.lr_scheduler_configs`` is put back into the state it had when
    training started, with its optimizer's param-group hyperparameters, so
    the learning rates from then on are those of a fresh scheduler.

    ``log``: log ``fire/fired`` (the number of firings so far) and the
    report's :meth:`~fire_core.report.Report.metrics` (``fire/weights``,
    ``fire/skipped``, and unless ``report=False`` ``fire/sfe``,
    ``fire/dfi_before``, ``fire/dfi_after``; ``fire/drift`` with a probe) to
    every logger at the firing's step, and print the report.

    Every other keyword is :func:`fire_core.torch.apply`'s (``steps``,
    ``method``, ``scale``, ``include``, ``exclude``, ``split``, ``layouts``,
    ``frozen``, ``conv_groups``, ``adapters``, ``report``, ``distributed``),
    checked here.

    ``last_report`` is the Report of the latest firing, ``history`` the
    schedule's :class:`~fire_core.schedule.Firing` list (restored with the
    checkpoint; each firing's ``info`` holds the numbers logged for it).
    """

    def __init__(self, schedule, probe=None, restart_warmup: bool = False, log: bool = True, *,
                 name: str | None = None, trial=None, **apply_options):
        self.selection = fire_torch.check_options(apply_options, taken=_TAKEN, who="FIRECallback")
        for option, value in (("restart_warmup", restart_warmup), ("log", log)):
            if not isinstance(value, bool):
                raise TypeError(f"FIRECallback: {option} must be True or False, got {value!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"FIRECallback: name must be a non-empty string (the checkpoint key), got {name!r}")
        self.schedule = as_schedule(schedule)
        feature_triggers = [t for t in self.schedule.triggers if isinstance(t, (DormantAbove, SrankBelow))]
        if feature_triggers and probe is None:
            raise ValueError(f"{feature_triggers[0]!r} measures activations of a probe batch: pass probe=")
        if probe is not None and not (callable(probe) or isinstance(probe, (torch.Tensor, tuple, dict))):
            raise TypeError(
                "FIRECallback: probe is the model's inputs (a tensor, a tuple of positional inputs, a dict of keyword "
                f"inputs) or a callable returning them, got {type(probe).__name__}"
            )
        check_trial(self.schedule, trial, "FIRECallback")
        self.name = name
        self.apply_options = dict(apply_options)
        self.probe, self.restart_warmup, self.log, self.trial = probe, restart_warmup, log, trial
        self.last_report = None
        self._measures_features = bool(feature_triggers)
        self._initial: list[tuple[Any, dict, list[dict]]] = []
        self._warned: set[str] = set()

    @property
    def history(self):
        return self.schedule.history

    @property
    def state_key(self) -> str:
        """Where the checkpoint keeps this callback's progress: the class name and ``name=``, nothing else."""
        return type(self).__qualname__ if self.name is None else self._generate_state_key(name=self.name)

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the schedule's progress; a changed schedule is carried over (logged) or refused naming both."""
        for line in self.schedule.load_state_dict(state_dict["schedule"]):
            rank_zero_info(f"FIRE ({self.state_key}): {line}")

    # --- the moments FIRE acts in ----------------------------------------------------------------

    def setup(self, trainer, pl_module, stage) -> None:
        """Refuse a second FIRE callback saved under the same key (one's progress would overwrite the other's).

        Lightning refuses that when the ``Trainer`` is built; this catches a
        callback added afterwards, before any checkpoint is read.
        """
        same = [cb for cb in trainer.callbacks if isinstance(cb, FIRECallback) and cb.state_key == self.state_key]
        if len(same) > 1:
            raise ValueError(
                f"{len(same)} FIRE callbacks in this Trainer save their progress under one state_key "
                f"{self.state_key!r}, so a checkpoint would keep only one: give each a distinct name= "
                "(FIRECallback(schedule, name='...'))"
            )

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Find this callback's progress in a checkpoint that saved it under another key, never losing it in silence.

        A checkpoint written by an older fire_core (keyed by the schedule's
        repr) or with another ``name=`` holds FIRE progress that Lightning
        would not hand to ``load_state_dict``. If it is the only FIRE state
        in the checkpoint, it is adopted; if there are several and none is
        this callback's, which one is meant cannot be told: a ValueError
        names them and this callback's key.
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        saved = [key for key, value in states.items() if _is_fire_state(value)]
        claimed = {cb.state_key for cb in trainer.callbacks if isinstance(cb, FIRECallback)}
        if not [key for key in saved if key not in claimed]:
            return  # no FIRE progress but other callbacks' own: this callback starts afresh
        if len(saved) == 1:
            states[self.state_key] = states[saved[0]]
            rank_zero_info(f"FIRE: the checkpoint's FIRE progress saved under {saved[0]!r} is taken up by this "
                           f"callback ({self.state_key!r}), the only FIRE state it holds")
            return
        raise ValueError(
            f"the checkpoint holds FIRE progress under {', '.join(map(repr, saved))} and none under this callback's "
            f"key {self.state_key!r}: which one to resume cannot be told. Give each FIRECallback the name= its run "
            "was saved with (the key is FIRECallback{'name': ...})"
        )

    def on_fit_start(self, trainer, pl_module) -> None:
        """Check the selection and the probe on the real model and note the schedulers' initial state, before any step.

        Lightning calls this after ``configure_optimizers`` and before it
        restores optimizer and scheduler states from a checkpoint, so what
        is kept here is the state a fresh run starts from.
        """
        fire_torch.select(pl_module, **self.selection)  # a pattern that selects nothing fails now, not at step 1000
        if self._measures_features and not fire_torch.activation_modules(pl_module):
            raise ValueError(
                f"{self.schedule!r} measures the outputs of activation modules (nn.ReLU, nn.GELU, nn.SiLU, ...), "
                f"and {type(pl_module).__name__} has none (functional activations such as F.relu cannot be "
                "hooked): use nn.ReLU() modules, or a data-free trigger (DfIAbove)"
            )
        if self.probe is not None:
            self._check_probe(pl_module)
        self._initial = []
        if self.restart_warmup:
            for config in trainer.lr_scheduler_configs:
                s = config.scheduler
                groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in s.optimizer.param_groups]
                self._initial.append((s, copy.deepcopy(s.state_dict()), groups))

    def on_train_start(self, trainer, pl_module) -> None:
        """A run from scratch is polled at step 0: measured triggers take the initial network as their baseline."""
        if trainer.global_step == 0:
            self._poll(trainer, pl_module, "step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step == self.schedule.last_poll:  # no optimizer step since the last poll (accumulation)
            return
        self._poll(trainer, pl_module, "step")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._poll(trainer, pl_module, "epoch")

    # --- polling and firing ----------------------------------------------------------------------

    def _poll(self, trainer, pl_module, at: str) -> None:
        moment = Moment(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            at=at,
            weights=lambda: fire_torch.select(pl_module, **self.selection),
            features=(lambda: self._features(pl_module)) if self.probe is not None else None,
            context={"trainer": trainer, "pl_module": pl_module},
            lookahead=None if self.trial is None else (lambda k: self.trial(pl_module)(k)),
        )
        agree = None
        if trainer.world_size > 1 and not self.schedule.deterministic:  # rank 0's decision on every rank
            agree = lambda decision: trainer.strategy.broadcast(decision, src=0)  # noqa: E731
        # the firing and its record are one step: if apply fails, the schedule is put back as before this poll
        firing = self.schedule.poll(moment, agree=agree, fire=lambda f: self._fire(trainer, pl_module, f))
        if firing is not None and self.log:
            self._log(trainer, pl_module, firing)

    def _fire(self, trainer, pl_module, firing) -> None:
        optimizers = [o.optimizer if isinstance(o, LightningOptimizer) else o for o in trainer.optimizers]
        probe = self._probe_inputs(pl_module) if self.probe is not None else None
        report = fire_torch.apply(pl_module, optimizer=optimizers, probe=probe, **self.apply_options)
        if self.restart_warmup:
            for scheduler, state, groups in self._initial:
                scheduler.load_state_dict(copy.deepcopy(state))
                for group, initial in zip(scheduler.optimizer.param_groups, groups):
                    group.update(copy.deepcopy(initial))
        self.last_report = report
        firing.info = {"fire/fired": float(len(self.schedule.history) + 1), **report.metrics()}

    def _log(self, trainer, pl_module, firing) -> None:
        metrics = dict(firing.info)
        for logger in trainer.loggers:  # at the firing's own step, whatever log_every_n_steps says
            logger.log_metrics(metrics, step=trainer.global_step)
        pl_module.log_dict(metrics, logger=False)  # and in trainer.callback_metrics (monitors, progress bar)
        report = self.last_report
        rank_zero_info(f"{firing}\n{report}")
        notes = [n for n in report.notes if not n.startswith("report=False")]  # what the user asked for: no warning
        for line in report.skipped_lines() + notes:
            if line not in self._warned:
                self._warned.add(line)
                rank_zero_warn(f"FIRE: {line}")

    def _probe_inputs(self, pl_module):
        inputs = self.probe() if callable(self.probe) else self.probe
        return move_data_to_device(inputs, pl_module.device)

    def _check_probe(self, pl_module) -> None:
        """Run the probe once the way a firing will (activations, else the plain forward of the drift), leaving no trace."""
        model = type(pl_module).__name__
        try:
            inputs = self._probe_inputs(pl_module)
            if self._measures_features:
                fire_torch.activations(pl_module, inputs)
            else:
                fire_torch._run_probe(pl_module, inputs, {})  # apply's own probe run: no_grad, buffers and RNG kept
        except Exception as exc:
            raise ValueError(
                f"FIRECallback: the probe does not run on {model}: {model}(*probe) raised {type(exc).__name__}: {exc}. "
                "probe= is the model's inputs for pl_module(...) (a tensor, a tuple of positional inputs, a dict of "
                "keyword inputs) or a callable returning them, not an (x, y) batch of the dataloader"
            ) from exc

    def _features(self, pl_module) -> dict:
        """``{name: (samples, units)}`` outputs of the activation modules on the probe (fire_core.torch.activations)."""
        return fire_torch.activations(pl_module, self._probe_inputs(pl_module))


FIRE = FIRECallback  # the name of earlier versions: the same class


def _is_fire_state(state) -> bool:
    """Whether a checkpoint's callback state is a FIRE callback's (a saved ``Schedule.state_dict()``)."""
    schedule = state.get("schedule") if isinstance(state, Mapping) else None
    return isinstance(schedule, Mapping) and "trigger_state" in schedule and "history" in schedule
