"""FIRE for Stable-Baselines3 agents: ``model.learn(n, callback=fire_core.sb3.FIRECallback(schedule=[50_000]))``.

A ``BaseCallback`` (``FIRECallback``; ``FIRE`` is the same class) that polls
a :mod:`fire_core.schedule` after every ``env.step()`` (``_on_step``), and
once at step 0 when ``learn`` starts from the beginning, counting
**environment steps** as SB3 does (``model.num_timesteps``, all
environments together). At a firing it makes one
:func:`fire_core.torch.apply` call on the agent's online networks, through
``Schedule.poll(fire=...)`` so that a firing that fails is not recorded:

* their layer weights are projected, together (a features extractor shared
  by actor and critic is one weight, projected once);
* the state of exactly the projected parameters is dropped from every
  optimizer of those networks (the others keep theirs);
* each target network is copied from its projected online network
  (``load_state_dict``), unless ``sync_targets=False``;
* ``fire/fired`` and the report's :meth:`~fire_core.report.Report.metrics`
  go to SB3's logger, the report itself to :attr:`FIRECallback.last_report`,
  and the firing (with those numbers, ``n_updates`` and ``targets_synced`` in
  its ``info``) to :attr:`FIRECallback.history`.

Which networks, optimizers and targets each algorithm has is one table,
:data:`ALGORITHMS`; an algorithm not in it (by class or base class) is a
TypeError at the start of ``learn``, before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

try:
    import stable_baselines3 as sb3
    from stable_baselines3.common.callbacks import BaseCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fire_core.sb3 needs Stable-Baselines3: pip install 'fire-core[sb3]'"
    ) from exc

import numpy as np
import torch
from torch import nn

from .. import torch as fire_torch
from ..core.report import Report
from ..core.schedule import Firing, Moment, Schedule, as_schedule, check_trial

__all__ = ["FIRECallback", "FIRE", "ALGORITHMS", "Agent"]


@dataclass(frozen=True)
class Agent:
    """What FIRE touches in one algorithm, as attributes of ``model.policy``.

    ``networks``: the online networks projected (empty: the whole policy).
    ``optimizers``: dotted paths of the optimizers whose state of the
    projected parameters is dropped. ``targets``: ``(target, online)`` pairs
    synced after the projection. ``forward``: runs the networks on a batch of
    observations, for the activation triggers' probe.
    """

    networks: tuple[str, ...]
    optimizers: tuple[str, ...]
    targets: tuple[tuple[str, str], ...]
    forward: Callable[[nn.Module, torch.Tensor], object]


def _actor_critic(policy, obs):
    return policy.critic(obs, policy.actor(obs))


ALGORITHMS: dict[type, Agent] = {
    sb3.DQN: Agent(("q_net",), ("optimizer",), (("q_net_target", "q_net"),), lambda p, obs: p.q_net(obs)),
    sb3.SAC: Agent(("actor", "critic"), ("actor.optimizer", "critic.optimizer"), (("critic_target", "critic"),),
                   _actor_critic),
    # DDPG is a TD3 subclass in SB3 and is found through it.
    sb3.TD3: Agent(("actor", "critic"), ("actor.optimizer", "critic.optimizer"),
                   (("actor_target", "actor"), ("critic_target", "critic")), _actor_critic),
    sb3.PPO: Agent((), ("optimizer",), (), lambda p, obs: p(obs)),
    sb3.A2C: Agent((), ("optimizer",), (), lambda p, obs: p(obs)),
}

_SET_HERE = {"model": "the callback passes the agent's networks",
             "optimizer": "the callback resets the agent's own optimizers (see ALGORITHMS)",
             "probe": "probe= is the callback's own (observations for the activation triggers)",
             "dry_run": "a callback that changes nothing has nothing to do; call fire_core.torch.apply(dry_run=True) "
                        "yourself"}

_OLD_TOTALS = {"weights": "fire/weights", "skipped": "fire/skipped", "sfe": "fire/sfe",
               "dfi_before": "fire/dfi_before", "dfi_after": "fire/dfi_after"}


class FIRECallback(BaseCallback):
    """Apply FIRE to an SB3 agent when ``schedule`` fires (``FIRE`` is the same class).

    ``schedule``: any :func:`fire_core.schedule.as_schedule` form, in
    environment steps (``model.num_timesteps``); epoch-unit triggers are
    refused (SB3 has no epochs). The schedule's :class:`~fire_core.schedule.Moment`
    has ``context={"model", "n_updates", "callback"}``: ``n_updates`` is the
    number of gradient updates so far (``model._n_updates``), for a
    callable schedule that counts updates. When ``learn`` starts from step
    0 the schedule is polled once at step 0 (never a firing): a measured
    trigger takes the initial network as its baseline.

    ``sync_targets``: copy each target network from its projected online
    network (default, as the reference does); False keeps the old targets.

    ``probe``: a batch of observations (array, dict of arrays or tensor) on
    which :class:`~fire_core.schedule.DormantAbove` / ``SrankBelow`` read the
    outputs of the activation modules of the projected networks. It is run
    once when ``learn`` starts, so a probe that does not fit fails there.

    ``log``: record each firing's numbers in SB3's logger (``fire/fired``
    and :meth:`fire_core.report.Report.metrics`). ``verbose >= 1`` prints
    each firing with the weights left alone and the report's notes, and what
    :meth:`load_state_dict` carried over; ``verbose >= 2`` the whole report
    table.

    ``**apply_options``: :func:`fire_core.torch.apply`'s (``steps``,
    ``method``, ``scale``, ``include``, ``exclude``, ``report``, ...). Names
    are checked, and the values tried on a 2 x 2 weight, here
    (fire_core.torch.check_options); the selection options are checked
    against the agent's networks at the start of ``learn``. Patterns match
    the names of ``model.policy.named_parameters()`` (``q_net.q_net.0``,
    ``actor.mu``, ``critic.qf0``, ``mlp_extractor``).

    ``history``: the schedule's :class:`~fire_core.schedule.Firing` list;
    each one's ``info`` holds the logged numbers, ``n_updates`` and
    ``targets_synced``.
    """

    def __init__(self, schedule, sync_targets: bool = True, probe=None, log: bool = True, verbose: int = 0,
                 trial=None, **apply_options):
        super().__init__(verbose)
        self.selection = fire_torch.check_options(apply_options, taken=_SET_HERE, who="FIRECallback()")
        for name, value in (("sync_targets", sync_targets), ("log", log)):
            if not isinstance(value, bool):
                raise TypeError(f"FIRECallback(): {name} must be True or False, got {value!r}")
        self.schedule: Schedule = as_schedule(schedule)
        epochs = [t for t in self.schedule.triggers if t.unit != "step"]
        if epochs:
            raise ValueError(
                f"FIRECallback(): {epochs} count epochs, which SB3 does not have; give the schedule in "
                "environment steps"
            )
        check_trial(self.schedule, trial, "FIRECallback()")
        self.sync_targets = sync_targets
        self.probe, self.trial = probe, trial
        self.log = log
        self.apply_options = apply_options
        self.last_report: Report | None = None
        self._resumed: list[str] = []  # load_state_dict's lines, for SB3's logger when learn starts

    @property
    def history(self) -> list[Firing]:
        """Every :class:`~fire_core.schedule.Firing` so far (the schedule's; restored by :meth:`load_state_dict`)."""
        return self.schedule.history

    # --- the agent ---------------------------------------------------------------------------

    def _init_callback(self) -> None:
        algo = type(self.model)
        self.agent = next((ALGORITHMS[c] for c in algo.__mro__ if c in ALGORITHMS), None)
        if self.agent is None:
            names = ", ".join(c.__name__ for c in ALGORITHMS)
            raise TypeError(
                f"fire_core.sb3.FIRECallback does not know the networks of {algo.__name__}; supported: {names} "
                "(and their subclasses, DDPG through TD3). Add an Agent to fire_core.sb3.ALGORITHMS, or call "
                "fire_core.torch.apply on its networks yourself"
            )
        policy = self.model.policy
        self.networks = (
            policy if not self.agent.networks else nn.ModuleDict({n: getattr(policy, n) for n in self.agent.networks})
        )
        self.optimizers = [_attr(policy, path) for path in self.agent.optimizers]
        self._select()  # the selection options against the real networks, before the first step

    def _select(self):
        return fire_torch.select(self.networks, **self.selection)

    def _features(self) -> dict:
        if self.probe is None:
            raise ValueError(
                "an activation trigger needs observations: pass FIRECallback(probe=batch of observations)"
            )
        policy = self.model.policy
        if isinstance(self.probe, torch.Tensor):
            obs = self.probe.to(policy.device)
        else:
            obs = policy.obs_to_tensor(self.probe if isinstance(self.probe, dict) else np.asarray(self.probe))[0]
        # a PPO forward samples actions: activations() leaves the run's random numbers as they were
        found = fire_torch.activations(self.networks, obs, forward=lambda _, o: self.agent.forward(policy, o))
        return {name: a.cpu() for name, a in found.items()}

    def _check_probe(self) -> None:
        """Run the probe once, as a check would, so that one that does not fit fails before the first step."""
        try:
            self._features()
        except Exception as exc:
            space = self.model.observation_space
            expects = f"{type(space).__name__} of shape {space.shape}" if space.shape else str(space)
            raise ValueError(
                f"FIRECallback: the probe ({_shape(self.probe)}) does not run on {type(self.model).__name__}'s "
                f"networks ({', '.join(self.agent.networks) or 'the policy'}; observations: {expects}): "
                f"{type(exc).__name__}: {str(exc).rstrip('.')}. Pass probe= a batch of observations as the "
                "environment gives them"
            ) from exc

    def _moment(self) -> Moment:
        return Moment(
            step=self.num_timesteps,
            weights=self._select,
            features=self._features,
            context={"model": self.model, "n_updates": int(getattr(self.model, "_n_updates", 0)), "callback": self},
            lookahead=None if self.trial is None else (lambda k: self.trial(self.model)(k)),
        )

    # --- each step ---------------------------------------------------------------------------

    def _on_training_start(self) -> None:
        for line in self._resumed:  # what load_state_dict carried over, into SB3's log outputs too
            self.logger.log(f"FIRECallback: {line}")
        self._resumed = []
        if self.probe is not None:
            self._check_probe()
        if self.num_timesteps == 0:  # a run from the start: the initial network is the measured baseline
            self.schedule.poll(self._moment())

    def _on_step(self) -> bool:
        moment = self._moment()
        firing = self.schedule.poll(moment, fire=lambda f: self._fire(f, moment.context["n_updates"]))
        if firing is not None:
            self._report(firing)
        return True

    def _fire(self, firing: Firing, n_updates: int) -> None:
        """Apply FIRE and sync the targets; an error leaves the schedule as it was (Schedule.poll(fire=))."""
        report = fire_torch.apply(self.networks, optimizer=self.optimizers, **self.apply_options)
        synced = []
        if self.sync_targets and report.applied:
            policy = self.model.policy
            for target, online in self.agent.targets:
                getattr(policy, target).load_state_dict(getattr(policy, online).state_dict())
                synced.append(target)
        firing.info.update(report.metrics(), n_updates=int(n_updates), targets_synced=synced)
        self.last_report = report

    def _report(self, firing: Firing) -> None:
        """Log a recorded firing: the running count and the report's numbers."""
        metrics = {k: v for k, v in firing.info.items() if k.startswith("fire/")}
        if self.log:
            self.logger.record("fire/fired", len(self.history))
            for key, value in metrics.items():
                self.logger.record(key, value)
        if self.verbose >= 2:
            print(f"{firing}\n{self.last_report}")
        elif self.verbose >= 1:
            head = f"{firing}: {int(metrics['fire/weights'])} weights projected"
            if "fire/sfe" in metrics:
                head += f", total SFE {metrics['fire/sfe']:.4g}"
            lines = [head, *self.last_report.skipped_lines(), *self.last_report.notes]
            if firing.info["targets_synced"]:
                lines.append(f"targets synced: {', '.join(firing.info['targets_synced'])}")
            print("\n".join(lines))

    # --- progress ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The schedule's progress with its firings, JSON-able: save it beside ``model.save()``."""
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state) -> list[str]:
        """Restore :meth:`state_dict` (before ``learn(..., reset_num_timesteps=False)``).

        Through :meth:`fire_core.schedule.Schedule.load_state_dict`: the same
        schedule resumes exactly, a changed one is carried over boundary by
        boundary or refused (ValueError naming both, nothing changed).
        Returns the lines saying what was carried over (printed with
        ``verbose >= 1``, and written to SB3's logger when ``learn`` starts).
        The format of fire_core before the history moved into the schedule
        (``{"schedule": ..., "history": [dicts]}``) loads too: its numbers go
        to each firing's ``info``.
        """
        if not isinstance(state, Mapping) or not isinstance(state.get("schedule"), Mapping):
            raise ValueError(f"FIRECallback.load_state_dict takes what state_dict() returned, got {state!r}"[:300])
        lines = self.schedule.load_state_dict(state["schedule"])
        if "history" in state:  # the previous format: each firing's numbers beside the schedule
            old = {(h["step"], tuple(h["reasons"])): h for h in state["history"]}
            for firing in self.schedule.history:
                h = old.get((firing.step, tuple(firing.reasons)))
                if h is not None and not firing.info:
                    firing.info = {"n_updates": h.get("n_updates"), "targets_synced": list(h.get("targets_synced", [])),
                                   **{new: float(h[k]) for k, new in _OLD_TOTALS.items() if k in h}}
        if self.verbose >= 1:
            for line in lines:
                print(f"FIRECallback: {line}")
        self._resumed = list(lines)
        return lines


FIRE = FIRECallback  # the name before the integrations agreed on FIRECallback


def _shape(probe) -> str:
    if isinstance(probe, Mapping):
        return "{" + ", ".join(f"{k!r}: {_shape(v)}" for k, v in probe.items()) + "}"
    shape = getattr(probe, "shape", None)
    if shape is None:
        try:
            shape = np.asarray(probe).shape
        except Exception:
            return type(probe).__name__
    return f"{type(probe).__name__} of shape {tuple(shape)}"


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
