"""FIRE for Stable-Baselines3 agents: ``model.learn(n, callback=fire_core.sb3.FIRE(schedule=[50_000]))``.

A ``BaseCallback`` that polls a :mod:`fire_core.schedule` after every
``env.step()`` (``_on_step``), counting **environment steps** as SB3 does
(``model.num_timesteps``, all environments together), and at a firing makes
one :func:`fire_core.torch.apply` call on the agent's online networks:

* their layer weights are projected, together (a features extractor shared
  by actor and critic is one weight, projected once);
* the state of exactly the projected parameters is dropped from every
  optimizer of those networks (the others keep theirs);
* each target network is copied from its projected online network
  (``load_state_dict``), unless ``sync_targets=False``;
* the report's totals go to SB3's logger (``fire/...``), the report itself to
  :attr:`FIRE.last_report` and a summary to :attr:`FIRE.history`.

Which networks, optimizers and targets each algorithm has is one table,
:data:`ALGORITHMS`; an algorithm not in it (by class or base class) is a
TypeError at the start of ``learn``, before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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

from . import torch as fire_torch
from .report import Report
from .schedule import Moment, as_schedule

__all__ = ["FIRE", "ALGORITHMS", "Agent"]


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
             "probe": "probe= is the callback's own (observations for the activation triggers)"}


class FIRE(BaseCallback):
    """Apply FIRE to an SB3 agent when ``schedule`` fires.

    ``schedule``: any :func:`fire_core.schedule.as_schedule` form, in
    environment steps (``model.num_timesteps``); epoch-unit triggers are
    refused (SB3 has no epochs). The schedule's :class:`~fire_core.schedule.Moment`
    has ``context={"model", "n_updates", "callback"}``: ``n_updates`` is the
    number of gradient updates so far (``model._n_updates``), for a
    callable schedule that counts updates.

    ``sync_targets``: copy each target network from its projected online
    network (default, as the reference does); False keeps the old targets.

    ``probe``: a batch of observations (array, dict of arrays or tensor) on
    which :class:`~fire_core.schedule.DormantAbove` / ``SrankBelow`` read the
    outputs of the activation modules of the projected networks.

    ``verbose >= 1`` prints each firing with the weights left alone and the
    report's notes; ``verbose >= 2`` the whole report table.

    ``**apply_options``: :func:`fire_core.torch.apply`'s (``steps``,
    ``method``, ``scale``, ``include``, ``exclude``, ...). Names are checked,
    and the values tried on a 2 x 2 weight, here (fire_core.torch.check_options); the selection
    options are checked against the agent's networks at the start of
    ``learn``. Patterns match the names of ``model.policy.named_parameters()``
    (``q_net.q_net.0``, ``actor.mu``, ``critic.qf0``, ``mlp_extractor``).
    """

    def __init__(self, schedule, sync_targets: bool = True, probe=None, verbose: int = 0, **apply_options):
        super().__init__(verbose)
        self.selection = fire_torch.check_options(apply_options, taken=_SET_HERE, who="FIRE()")
        if not isinstance(sync_targets, bool):
            raise TypeError(f"FIRE(): sync_targets must be True or False, got {sync_targets!r}")
        self.schedule = as_schedule(schedule)
        epochs = [t for t in self.schedule.triggers if t.unit != "step"]
        if epochs:
            raise ValueError(
                f"FIRE(): {epochs} count epochs, which SB3 does not have; give the schedule in environment steps"
            )
        self.sync_targets = sync_targets
        self.probe = probe
        self.apply_options = apply_options
        self.last_report: Report | None = None
        self.history: list[dict] = []

    # --- the agent ---------------------------------------------------------------------------

    def _init_callback(self) -> None:
        algo = type(self.model)
        self.agent = next((ALGORITHMS[c] for c in algo.__mro__ if c in ALGORITHMS), None)
        if self.agent is None:
            names = ", ".join(c.__name__ for c in ALGORITHMS)
            raise TypeError(
                f"fire_core.sb3.FIRE does not know the networks of {algo.__name__}; supported: {names} (and "
                "their subclasses, DDPG through TD3). Add an Agent to fire_core.sb3.ALGORITHMS, or call "
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
            raise ValueError("an activation trigger needs observations: pass FIRE(probe=batch of observations)")
        policy = self.model.policy
        if isinstance(self.probe, torch.Tensor):
            obs = self.probe.to(policy.device)
        else:
            obs = policy.obs_to_tensor(self.probe if isinstance(self.probe, dict) else np.asarray(self.probe))[0]
        # a PPO forward samples actions: activations() leaves the run's random numbers as they were
        found = fire_torch.activations(self.networks, obs, forward=lambda _, o: self.agent.forward(policy, o))
        return {name: a.cpu() for name, a in found.items()}

    # --- each step ---------------------------------------------------------------------------

    def _on_step(self) -> bool:
        moment = Moment(
            step=self.num_timesteps,
            weights=self._select,
            features=self._features,
            context={"model": self.model, "n_updates": getattr(self.model, "_n_updates", 0), "callback": self},
        )
        firing = self.schedule.poll(moment)
        if firing is not None:
            self._fire(firing, moment.context["n_updates"])
        return True

    def _fire(self, firing, n_updates: int) -> None:
        report = fire_torch.apply(self.networks, optimizer=self.optimizers, **self.apply_options)
        synced = []
        if self.sync_targets and report.applied:
            policy = self.model.policy
            for target, online in self.agent.targets:
                getattr(policy, target).load_state_dict(getattr(policy, online).state_dict())
                synced.append(target)
        totals = {key: report.total(key) for key in ("sfe", "dfi_before", "dfi_after")}
        self.last_report = report
        self.history.append({**firing.to_dict(), "n_updates": int(n_updates), **totals, "weights": len(report),
                             "skipped": len(report.skipped), "targets_synced": synced})
        if len(report):  # report=False measures nothing
            for key, value in totals.items():
                self.logger.record(f"fire/{key}", value)
        self.logger.record("fire/fired", len(self.history))
        self.logger.record("fire/weights", len(report))
        self.logger.record("fire/skipped", len(report.skipped))
        if self.verbose >= 2:
            print(f"{firing}\n{report}")
        elif self.verbose >= 1:
            lines = [f"{firing}: {len(report)} weights projected, total SFE {totals['sfe']:.4g}"]
            lines += report.skipped_lines() + list(report.notes)
            if synced:
                lines.append(f"targets synced: {', '.join(synced)}")
            print("\n".join(lines))

    # --- progress ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The schedule's progress and the firings so far, JSON-able: save it beside ``model.save()``."""
        return {"schedule": self.schedule.state_dict(), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state) -> None:
        """Restore :meth:`state_dict` (before ``learn(..., reset_num_timesteps=False)``)."""
        self.schedule.load_state_dict(state["schedule"])
        self.history = [dict(h) for h in state.get("history", [])]


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
