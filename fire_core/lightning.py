"""PyTorch Lightning: FIRE as a ``Callback``, applied when a schedule says so.

::

    import lightning.pytorch as pl
    from fire_core.lightning import FIRE

    trainer = pl.Trainer(max_steps=3000, callbacks=[FIRE(schedule=[1000, 2000], steps=10)])

At each firing the callback makes one :func:`fire_core.torch.apply` call on
the ``LightningModule`` with the user's ``apply`` options and every optimizer
the trainer holds (the state of exactly the projected parameters is dropped),
optionally restarts every learning-rate scheduler from its initial state
(``restart_warmup=True``), and logs the report's totals to every logger.
When to fire is :mod:`fire_core.schedule`'s business: the callback polls
:meth:`~fire_core.schedule.Schedule.poll` after each optimizer step
(``on_train_batch_end``, ``step = trainer.global_step``) and at each epoch
start (``on_train_epoch_start``), and keeps the schedule's progress in its
``state_dict()`` so that a run resumed from a checkpoint neither fires twice
nor misses a boundary. See ``docs/lightning.md``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

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

from . import torch as fire_torch
from .schedule import DormantAbove, Moment, SrankBelow, as_schedule

__all__ = ["FIRE"]

_TAKEN = {  # apply's arguments the callback fills in itself, and why a user cannot pass them
    "optimizer": "the callback resets every optimizer the trainer holds",
    "probe": "pass probe= to FIRE itself",
    "dry_run": "a callback that changes nothing has nothing to do; call fire_core.torch.apply(dry_run=True) yourself",
    "report": "the callback logs the report's totals",
}


class FIRE(pl.Callback):
    """Apply FIRE to the ``LightningModule`` when ``schedule`` fires.

    ``schedule``: any form :func:`fire_core.schedule.as_schedule` takes (a
    list of steps, ``Every(n)``, a callable of a Moment, ``DfIAbove``,
    ``DormantAbove``, ``SrankBelow``, or a list of these).

    ``probe``: the model's inputs for ``pl_module(...)`` (a tensor, a tuple
    of positional inputs or a dict of keyword inputs), or a callable of no
    arguments returning them; moved to the module's device. It gives the
    activation triggers their features (the outputs of the model's
    activation modules, read by :func:`fire_core.torch.activations`) and each firing's function
    drift (``fire/drift``).

    ``restart_warmup``: at a firing, every scheduler in
    ``trainer.lr_scheduler_configs`` is put back into the state it had when
    training started, with its optimizer's param-group hyperparameters, so
    the learning rates from then on are those of a fresh scheduler.

    ``log``: log ``fire/fired``, ``fire/sfe``, ``fire/dfi_before``,
    ``fire/dfi_after``, ``fire/weights`` (and ``fire/drift`` with a probe)
    to every logger at the firing's step, and print the report.

    Every other keyword is :func:`fire_core.torch.apply`'s (``steps``,
    ``method``, ``scale``, ``include``, ``exclude``, ``split``, ``layouts``,
    ``frozen``, ``conv_groups``, ``distributed``), checked here.

    ``last_report`` is the Report of the latest firing, ``history`` the
    schedule's firings (restored with the checkpoint).
    """

    def __init__(self, schedule, probe=None, restart_warmup: bool = False, log: bool = True, **apply_options):
        self.selection = fire_torch.check_options(apply_options, taken=_TAKEN, who="FIRE")
        for name, value in (("restart_warmup", restart_warmup), ("log", log)):
            if not isinstance(value, bool):
                raise TypeError(f"FIRE: {name} must be True or False, got {value!r}")
        self.schedule = as_schedule(schedule)
        feature_triggers = [t for t in self.schedule.triggers if isinstance(t, (DormantAbove, SrankBelow))]
        if feature_triggers and probe is None:
            raise ValueError(f"{feature_triggers[0]!r} measures activations of a probe batch: pass probe=")
        if probe is not None and not (callable(probe) or isinstance(probe, (torch.Tensor, tuple, dict))):
            raise TypeError(
                "FIRE: probe is the model's inputs (a tensor, a tuple of positional inputs, a dict of keyword inputs) "
                f"or a callable returning them, got {type(probe).__name__}"
            )
        self.apply_options = dict(apply_options)
        self.probe, self.restart_warmup, self.log = probe, restart_warmup, log
        self.last_report = None
        self._measures_features = bool(feature_triggers)
        self._initial: list[tuple[Any, dict, list[dict]]] = []
        self._warned: set[str] = set()

    @property
    def history(self):
        return self.schedule.history

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=repr(self.schedule))

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.schedule.load_state_dict(state_dict["schedule"])

    # --- the moments FIRE acts in ----------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        """Check the selection on the real model and note the schedulers' initial state, before any step.

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
        self._initial = []
        if self.restart_warmup:
            for config in trainer.lr_scheduler_configs:
                s = config.scheduler
                groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in s.optimizer.param_groups]
                self._initial.append((s, copy.deepcopy(s.state_dict()), groups))

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
        )
        agree = None
        if trainer.world_size > 1 and not self.schedule.deterministic:  # rank 0's decision on every rank
            agree = lambda decision: trainer.strategy.broadcast(decision, src=0)  # noqa: E731
        firing = self.schedule.poll(moment, agree=agree)
        if firing is not None:
            self._fire(trainer, pl_module, firing)

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
        if not self.log:
            return
        metrics = {
            "fire/fired": 1.0,
            "fire/sfe": report.total("sfe"),
            "fire/dfi_before": report.total("dfi_before"),
            "fire/dfi_after": report.total("dfi_after"),
            "fire/weights": float(len(report)),
        }
        if report.drift is not None:
            metrics["fire/drift"] = float(report.drift)
        for logger in trainer.loggers:  # at the firing's own step, whatever log_every_n_steps says
            logger.log_metrics(metrics, step=trainer.global_step)
        pl_module.log_dict(metrics, logger=False)  # and in trainer.callback_metrics (monitors, progress bar)
        rank_zero_info(f"{firing}\n{report}")
        for line in report.skipped_lines() + list(report.notes):
            if line not in self._warned:
                self._warned.add(line)
                rank_zero_warn(f"FIRE: {line}")

    def _probe_inputs(self, pl_module):
        inputs = self.probe() if callable(self.probe) else self.probe
        return move_data_to_device(inputs, pl_module.device)

    def _features(self, pl_module) -> dict:
        """``{name: (samples, units)}`` outputs of the activation modules on the probe (fire_core.torch.activations)."""
        return fire_torch.activations(pl_module, self._probe_inputs(pl_module))


