"""Deep RL at a high replay ratio (primacy bias): periodic resets, shrink & perturb and FIRE.

Off-policy agents that take many gradient steps per environment step overfit
their first experiences and lose the ability to learn from later ones: the
*primacy bias* of Nikishin et al. 2022 ("The Primacy Bias in Deep
Reinforcement Learning", ICML), whose remedy is to reset part of the agent
periodically; D'Oro et al. 2023 ("Sample-Efficient Reinforcement Learning by
Breaking the Replay Ratio Barrier", ICLR) showed that with such resets the
replay ratio can be scaled up. This benchmark asks whether FIRE, applied on
the same schedule, does the same job while keeping what the agent learned.

Agents, written here in plain torch, every network of every (method, seed)
pair held in one stacked tensor per layer (weights ``(members, out, in)``,
run with ``torch.baddbmm``; Adam written elementwise with a step count per
member, so each member trains exactly as it would alone):

* ``dqn``: DQN (Mnih et al. 2015; Huber loss, Polyak target tau 0.01) on
  CartPole-v1, MLP 4-64-64-2, Adam lr 1e-3, batch 64, gamma 0.99,
  epsilon-greedy 1 -> 0.05 over the first 10% of the steps, 1000 uniformly
  random warm-up steps;
* ``td3``: TD3 (Fujimoto et al. 2018: twin critics, target policy noise 0.2
  clipped at 0.5, exploration noise 0.1, both times the action bound, actor
  and targets updated every 2nd critic step, tau 0.005, Adam lr 1e-3, as
  in its paper) on Pendulum-v1, with smaller networks and batch than the
  paper's 400-300 units and 100 to fit the CPU budget: actor 3-64-64-1
  (tanh), critics 4-64-64-1, batch 64, 1000 uniformly random warm-up steps.

Both environments are vectorized here in numpy with gymnasium's dynamics
(tests/test_rl_benchmark.py checks them step for step against gymnasium's
own ``CartPole-v1`` and ``Pendulum-v1``); nothing is downloaded.

Replay ratio (gradient steps per environment step): 8 for DQN and 4 for
TD3 by default (``--replay-ratio``), where the primacy bias is reported:
Nikishin et al. train SAC on DMC at 1 update per step as the baseline and
find resets matter more the higher the ratio; D'Oro et al. scale it to 8-32
(SAC up to 128). The usual CartPole DQN and Pendulum TD3 settings are at or
below 1; 8 and 4 are what fits the CPU budget while being well past them.

Methods, the periodic ones every ``P = steps / 5`` environment steps
(4 interventions, at 20/40/60/80% of training, the same P for all: the
cadence of Nikishin et al. 2022, Sec. 4, who reset SPR every 2e4 of its
1e5 Atari steps); after every intervention the target networks are set to the new
online networks:

* ``none``;
* ``reset-last``: the last Linear layer of every online network (DQN: the
  Q head; TD3: the actor's and both critics' output layers) to a fresh
  PyTorch-default init and its Adam state cleared, as Nikishin et al. reset
  SPR's final layer;
* ``reset``: every layer of every online network to a fresh init, Adam state
  cleared (Nikishin et al.'s SAC resets: all layers of actor and critic);
* ``S&P``: shrink and perturb (Ash & Adams 2020) in the interpolation form
  ``theta <- lam theta + (1 - lam) theta_0'`` with ``theta_0'`` a fresh init
  and ``lam = 0.8`` (the coefficient D'Oro et al. 2023 use for SR-SPR's
  encoder), every parameter of the online networks; Adam state kept;
* ``FIRE``: ``fire_core.reinit(W, "Soi", steps=10)`` on every hidden and
  output weight of the online networks (biases kept), the target networks
  set to the projected online networks as the reference does; the Adam
  state is kept for DQN (the reference's DQN keeps it) and cleared for TD3
  (the reference's SAC starts fresh optimizer states);
* ``FIRE@DfI``, ``FIRE@dormant``: ``benchmarks/common.WhenNeeded`` per seed,
  checked on the initial network when learning starts (the baseline) and
  then every ``P / 4`` environment steps; FIRE as in ``FIRE`` on that seed's
  networks when it fires. Weights: the seed's slices of the online weights
  as ``(name, array, "oi")``; features: the seed's hidden activations (every
  hidden layer of every online network; TD3's critics get the buffer's
  actions) on a fixed probe batch of 256 transitions drawn from its replay
  buffer when learning starts.
* ``FIRE when needed`` (``common.NEEDED``): ``common.WhenNeeded("when_needed")``
  per seed, the library's rule as it ships (``fire_core.schedule.when_needed()``:
  a trial of FIRE, FIRE when probe loss with / without < 0.526 after 200
  steps), polled where ``FIRE@DfI`` is (the initial network when learning
  starts, no trial there; then every ``P / 4`` environment steps). The
  trial, ``fire_core.torch.trial(net, batches, probe, loss=td_loss,
  lr=1e-3, steps=10)``, sees the seed's replay buffer only: its 512 most
  recent transitions (the new task), shuffled by the seed's own generator,
  4 batches of 64 to train on and a probe of 256 held out of them
  (``TRIAL``; quick mode 4 x 8 and 16). The regression targets are the
  agent's TD targets, computed once at the check with its current target
  networks (TD3: with the target-policy smoothing noise) and fixed during
  the trial. ``net`` is a copy of the seed's online Q network (DQN; loss:
  the benchmark's Huber loss on Q(s, a) of the action taken) or of both
  its online critics as one module (TD3; loss: both critics' squared
  errors summed, the benchmark's critic loss); FIRE in the trial is the
  FIRE row's on those networks (every Linear weight, 10 steps, biases
  kept), and each copy trains with a fresh Adam at lr 1e-3 (the agents'
  own lr). TD3's actor takes no part in the trial (its loss, -Q1, has no
  fixed target to regress on); the critics are what FIRE is meant to keep
  able to fit new targets. When the rule fires, FIRE is applied to that
  seed exactly as in ``FIRE`` (``fire_agent``: every online network, TD3's
  actor included, Adam as there, targets set to the projected networks).
  Cost: a trial is 400 Adam steps of batch 64 on one unbatched network
  (two copies, 200 each), where the agent takes 3200 (DQN) or 1600 (TD3
  critic) gradient steps between two checks; its wall time is reported
  per check and as a share of the row's training time.

Measured: the greedy (DQN) or deterministic (TD3) policy's return on
``--eval-episodes`` evaluation episodes every ``steps / 20`` environment
steps, with the same start states for every method of a seed; the area
under that curve (the mean of all evaluations) and the final return (the
mean of the evaluations in the last 20% of training); mean ± standard
error over seeds and the per-seed paired difference to ``none``; FIRE's own
wall time as a fraction of the training time (common.fire_fraction); when
each trigger fired.

    python benchmarks/rl.py            # full run: 10 seeds, both agents
    python benchmarks/rl.py --quick    # < 1 minute, numbers not meaningful

Writes ``benchmarks/results/rl.md``, ``rl.png`` and the raw per-seed
numbers ``rl.json`` (quick: ``rl-quick.*``); ``--replot rl.json`` redraws
from the latter. The seeds are split into ``--jobs`` chunks per agent, each
chunk trained in one worker process; a seed's numbers do not depend on the
chunking except through the random numbers that sample the replay batches
(one generator per process).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fire_core
import fire_core.torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    NEEDED, NEEDED_TABLE, WhenNeeded, add_run_options, command_line, fire_fraction, fmt, goals, goals_cell,
    load_run, mean_se, names, save_run, seed_runner, write_outputs,
)

AGENTS = ("dqn", "td3")
METHODS = ("none", "reset-last", "reset", "S&P", "FIRE", "FIRE@DfI", "FIRE@dormant", NEEDED)
TRIGGERED = {"FIRE@DfI": "DfI", "FIRE@dormant": "dormant", NEEDED: "when_needed"}
PERIODIC = ("reset-last", "reset", "S&P", "FIRE")
INTERVENTIONS = 4  # periodic interventions: P = steps / (INTERVENTIONS + 1)
SNP_LAMBDA = 0.8
FIRE_STEPS = 10
PROBE = 256
FINAL_WINDOW = 0.2  # the final return: evaluations in the last 20% of training
# the when-needed trial's data, per check and seed: batches x batch transitions to train on and a probe held out
# of them, all from the most recent batches * batch + probe transitions of the seed's replay buffer
TRIAL = {"batches": 4, "batch": 64, "probe": 256}
TRIAL_QUICK = {"batches": 4, "batch": 8, "probe": 16}
TRIAL_LR = 1e-3  # the library's default trial; also both agents' own Adam lr

# the full run's sizes, from a timed reduced run (5 seeds x 7 methods in one process, as one chunk of
# --jobs 2): 12.6 ms a DQN and 22.8 ms a TD3 gradient step on a loaded 2-core x86 machine, so
# about 12 + 11 min per worker, ~23 min wall at --jobs 2 (~45 CPU-min). With the eighth method (FIRE when needed,
# its trials 7.9 CPU-min of the run) the full run took 43 min wall at --jobs 2 beside other benchmarks on the 2 cores
FULL = {"dqn": dict(steps=8_000, replay_ratio=8, learning_starts=1000),
        "td3": dict(steps=8_000, replay_ratio=4, learning_starts=1000)}
QUICK = {"dqn": dict(steps=500, replay_ratio=2, learning_starts=50),
         "td3": dict(steps=400, replay_ratio=2, learning_starts=50)}


# --- vectorized environments (gymnasium's dynamics, numpy, one row per member) ------------------------


class CartPoles:
    """``n`` CartPole-v1 environments (gymnasium 1.x: Euler integrator, 500-step limit)."""

    obs_dim, n_actions, limit = 4, 2, 500
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    x_threshold, theta_threshold = 2.4, 12 * 2 * math.pi / 360

    def __init__(self, n: int):
        self.state = np.zeros((n, 4))
        self.t = np.zeros(n, dtype=np.int64)

    @staticmethod
    def initial(rng: np.random.Generator, k: int = 1) -> np.ndarray:
        return rng.uniform(-0.05, 0.05, size=(k, 4))

    def obs(self) -> np.ndarray:
        return self.state.astype(np.float32)

    def step(self, action: np.ndarray):
        """(obs, reward, terminated, truncated) after ``action`` (n,) in {0, 1}; no auto-reset."""
        x, x_dot, th, th_dot = self.state.T
        total = self.masspole + self.masscart
        pml = self.masspole * self.length
        force = np.where(action == 1, self.force_mag, -self.force_mag)
        cos, sin = np.cos(th), np.sin(th)
        temp = (force + pml * np.square(th_dot) * sin) / total
        th_acc = (self.gravity * sin - cos * temp) / (self.length * (4.0 / 3.0 - self.masspole * np.square(cos) / total))
        x_acc = temp - pml * th_acc * cos / total
        self.state = np.stack(
            [x + self.tau * x_dot, x_dot + self.tau * x_acc, th + self.tau * th_dot, th_dot + self.tau * th_acc], axis=1
        )
        self.t += 1
        x, th = self.state[:, 0], self.state[:, 2]
        terminated = (x < -self.x_threshold) | (x > self.x_threshold) | (th < -self.theta_threshold) | (th > self.theta_threshold)
        truncated = ~terminated & (self.t >= self.limit)
        return self.obs(), np.ones(len(x)), terminated, truncated


class Pendulums:
    """``n`` Pendulum-v1 environments (g = 10, 200-step limit); actions (n, 1) in [-2, 2]."""

    obs_dim, act_dim, max_action, limit = 3, 1, 2.0, 200
    max_speed, dt, g, m, l = 8.0, 0.05, 10.0, 1.0, 1.0

    def __init__(self, n: int):
        self.state = np.zeros((n, 2))
        self.t = np.zeros(n, dtype=np.int64)

    @staticmethod
    def initial(rng: np.random.Generator, k: int = 1) -> np.ndarray:
        return rng.uniform(low=[-math.pi, -1.0], high=[math.pi, 1.0], size=(k, 2))

    def obs(self) -> np.ndarray:
        th, th_dot = self.state.T
        return np.stack([np.cos(th), np.sin(th), th_dot], axis=1).astype(np.float32)

    def step(self, action: np.ndarray):
        th, th_dot = self.state.T
        u = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -self.max_action, self.max_action)
        norm = ((th + np.pi) % (2 * np.pi)) - np.pi
        costs = norm**2 + 0.1 * th_dot**2 + 0.001 * u**2
        new_dot = th_dot + (3 * self.g / (2 * self.l) * np.sin(th) + 3.0 / (self.m * self.l**2) * u) * self.dt
        new_dot = np.clip(new_dot, -self.max_speed, self.max_speed)
        self.state = np.stack([th + new_dot * self.dt, new_dot], axis=1)
        self.t += 1
        terminated = np.zeros(len(th), dtype=bool)
        return self.obs(), -costs, terminated, self.t >= self.limit


# --- stacked networks and their optimizer -----------------------------------------------------------


def init_layer(gen: torch.Generator, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's default nn.Linear init: weight and bias uniform in +-1/sqrt(d_in)."""
    bound = 1.0 / math.sqrt(d_in)
    w = (torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound
    b = (torch.rand(d_out, generator=gen) * 2 - 1) * bound
    return w, b


class StackedMLP:
    """ReLU MLPs of one shape, ``members`` of them: layer ``k`` is ``W[k] (members, out, in)``, ``b[k] (members, out)``."""

    def __init__(self, sizes: tuple[int, ...], inits: list[list[tuple[torch.Tensor, torch.Tensor]]]):
        self.sizes = tuple(sizes)
        self.W = [torch.stack([m[k][0] for m in inits]).requires_grad_() for k in range(len(sizes) - 1)]
        self.b = [torch.stack([m[k][1] for m in inits]).requires_grad_() for k in range(len(sizes) - 1)]

    @staticmethod
    def draw(gen: torch.Generator, sizes) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [init_layer(gen, sizes[k + 1], sizes[k]) for k in range(len(sizes) - 1)]

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for pair in zip(self.W, self.b) for p in pair]

    @property
    def members(self) -> int:
        return self.W[0].shape[0]

    def forward(self, x: torch.Tensor, rows: slice | None = None, hidden: list | None = None) -> torch.Tensor:
        """``x (members, batch, in)`` -> ``(members, batch, out)``; ``rows`` runs a slice of the members."""
        last = len(self.W) - 1
        for k, (w, b) in enumerate(zip(self.W, self.b)):
            if rows is not None:
                w, b = w[rows], b[rows]
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if k < last:
                x = torch.relu(x)
                if hidden is not None:
                    hidden.append(x)
        return x

    def copy_from(self, other: "StackedMLP", idx: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            for p, q in zip(self.params, other.params):
                if idx is None:
                    p.copy_(q)
                else:
                    p[idx] = q[idx]

    def polyak(self, other: "StackedMLP", tau: float) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(self.params, other.params, tau)

    def clone(self) -> "StackedMLP":
        new = object.__new__(StackedMLP)
        new.sizes = self.sizes
        new.W = [w.detach().clone().requires_grad_() for w in self.W]
        new.b = [b.detach().clone().requires_grad_() for b in self.b]
        return new


class StackedAdam:
    """Adam (Kingma & Ba 2015, torch's defaults) elementwise on stacked parameters, one step count per member."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, (self.b1, self.b2), self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = [torch.zeros(p.shape[0]) for p in params]

    def step(self, grads) -> None:
        with torch.no_grad():
            for p, g, m, v, t in zip(self.params, grads, self.m, self.v, self.t):
                t += 1
                m.lerp_(g, 1 - self.b1)
                v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
                shape = (-1,) + (1,) * (p.ndim - 1)
                bc1 = (1 - self.b1**t).view(shape)
                bc2 = (1 - self.b2**t).view(shape)
                p.sub_(self.lr * (m / bc1) / ((v / bc2).sqrt() + self.eps))

    def clear(self, idx: torch.Tensor, which: list[int] | None = None) -> None:
        """Fresh state for members ``idx`` of the parameters ``which`` (default all)."""
        for k in range(len(self.params)) if which is None else which:
            self.m[k][idx] = 0
            self.v[k][idx] = 0
            self.t[k][idx] = 0


# --- interventions on members ``idx`` of an online network -------------------------------------------


def fire_members(net: StackedMLP, idx: torch.Tensor) -> None:
    """FIRE on every weight of members ``idx``: ``fire_core.reinit`` with a stack axis, biases kept."""
    with torch.no_grad():
        for w in net.W:
            w[idx] = fire_core.reinit(w[idx].detach(), "Soi", steps=FIRE_STEPS)


def fresh_members(net: StackedMLP, idx: torch.Tensor, gens: list[torch.Generator], layers: list[int]):
    """A fresh default init of ``layers`` for each member in ``idx`` (one generator per member)."""
    out = {k: ([], []) for k in layers}
    for m in idx.tolist():
        for k in layers:
            w, b = init_layer(gens[m], net.sizes[k + 1], net.sizes[k])
            out[k][0].append(w)
            out[k][1].append(b)
    return {k: (torch.stack(ws), torch.stack(bs)) for k, (ws, bs) in out.items()}


def intervene(method: str, net: StackedMLP, opt: StackedAdam, idx: torch.Tensor, gens, clear_on_fire: bool) -> None:
    """One periodic method on members ``idx`` of ``net`` (the target is synced by the caller)."""
    n = len(net.W)
    with torch.no_grad():
        if method == "FIRE":
            fire_members(net, idx)
            if clear_on_fire:
                opt.clear(idx)
        elif method in ("reset", "reset-last"):
            layers = list(range(n)) if method == "reset" else [n - 1]
            for k, (w, b) in fresh_members(net, idx, gens, layers).items():
                net.W[k][idx], net.b[k][idx] = w, b
            opt.clear(idx, [j for k in layers for j in (2 * k, 2 * k + 1)])
        elif method == "S&P":
            for k, (w, b) in fresh_members(net, idx, gens, list(range(n))).items():
                net.W[k][idx] = SNP_LAMBDA * net.W[k][idx] + (1 - SNP_LAMBDA) * w
                net.b[k][idx] = SNP_LAMBDA * net.b[k][idx] + (1 - SNP_LAMBDA) * b
        else:
            raise ValueError(method)


# --- the agents ------------------------------------------------------------------------------------


class Replay:
    """One replay buffer per member, stacked in one tensor ``(members, capacity, obs + act + 1 + obs + 1)``.

    Every member adds one transition a step, so all have the same size; a
    batch is one ``index_select`` over the flattened buffer.
    """

    def __init__(self, members: int, capacity: int, obs_dim: int, act_dim: int, act_dtype):
        self.dims = (obs_dim, act_dim, 1, obs_dim, 1)
        self.data = torch.zeros(members, capacity, sum(self.dims))
        self.capacity, self.act_dtype = capacity, act_dtype
        self.size, self.rows = 0, torch.arange(members).unsqueeze(1)

    def add(self, obs, act, rew, nxt, done) -> None:
        row = torch.cat([torch.from_numpy(obs), act.float(), torch.from_numpy(rew).float().unsqueeze(1),
                         torch.from_numpy(nxt), torch.from_numpy(done).float().unsqueeze(1)], 1)
        self.data[:, self.size] = row
        self.size += 1

    def split(self, x: torch.Tensor):
        """(obs, act, rew, next, done) views of rows ``x (members, batch, width)``."""
        obs, act, rew, nxt, done = torch.split(x, self.dims, dim=2)
        return obs, act.to(self.act_dtype), rew.squeeze(2), nxt, done.squeeze(2)

    def sample(self, batch: int, gen: torch.Generator):
        M = self.rows.shape[0]
        idx = torch.randint(0, self.size, (M, batch), generator=gen) + self.rows * self.capacity
        flat = self.data.view(M * self.capacity, -1).index_select(0, idx.view(-1))
        return self.split(flat.view(M, batch, -1))

    def pick(self, n: int, gen: torch.Generator):
        """A fixed batch of ``n`` transitions per member (the triggers' probe): (obs, act as float)."""
        idx = torch.randint(0, self.size, (self.rows.shape[0], n), generator=gen)
        x = self.data[self.rows, idx]
        obs, act, *_ = torch.split(x, self.dims, dim=2)
        return obs.contiguous(), act.contiguous()


class DQN:
    env_cls = CartPoles
    hidden = (64, 64)
    lr, batch, gamma, tau = 1e-3, 64, 0.99, 0.01
    learning_starts, eps_final, eps_fraction = 1000, 0.05, 0.1
    clear_on_fire = False  # the reference's DQN keeps the Adam state

    def __init__(self, seeds: list[int], n_methods: int):
        sizes = (4, *self.hidden, 2)
        inits = [StackedMLP.draw(torch.Generator().manual_seed(1000 * s + 1), sizes) for s in seeds] * n_methods
        self.q = StackedMLP(sizes, inits)
        self.q_target = self.q.clone()
        self.opt = StackedAdam(self.q.params, self.lr)
        self.M = self.q.members
        self.updates = 0

    def online(self):
        return [("q", self.q, self.opt)]

    def sync_targets(self, idx) -> None:
        self.q_target.copy_from(self.q, idx)

    def act(self, obs: np.ndarray, t: int, total: int, gen: torch.Generator) -> tuple[np.ndarray, torch.Tensor]:
        if t < self.learning_starts:
            a = torch.randint(0, 2, (self.M,), generator=gen)
        else:
            eps = max(self.eps_final, 1 - (1 - self.eps_final) * t / (self.eps_fraction * total))
            with torch.no_grad():
                greedy = self.q.forward(torch.from_numpy(obs).unsqueeze(1)).squeeze(1).argmax(1)
            explore = torch.rand(self.M, generator=gen) < eps
            a = torch.where(explore, torch.randint(0, 2, (self.M,), generator=gen), greedy)
        return a.numpy(), a.unsqueeze(1)

    def policy(self, obs: torch.Tensor) -> np.ndarray:
        """Greedy actions for ``obs (members, envs, 4)``."""
        with torch.no_grad():
            return self.q.forward(obs).argmax(2).numpy()

    def update(self, buf: Replay, gen: torch.Generator) -> None:
        obs, act, rew, nxt, done = buf.sample(self.batch, gen)
        with torch.no_grad():
            y = rew + self.gamma * (1 - done) * self.q_target.forward(nxt).max(2).values
        q = self.q.forward(obs).gather(2, act).squeeze(2)
        # summed over members, averaged over the batch: each member's gradient is its own
        loss = torch.nn.functional.smooth_l1_loss(q, y, reduction="sum") / self.batch
        self.opt.step(torch.autograd.grad(loss, self.q.params))
        self.q_target.polyak(self.q, self.tau)
        self.updates += 1

    # the when-needed trial: the Q network of one member as an nn.Module, regressed on fixed TD targets

    def trial_net(self, m: int) -> torch.nn.Module:
        """Member ``m``'s online Q network as a plain ``nn.Sequential`` (a copy; the stack is untouched)."""
        return member_mlp(self.q, m)

    def td_targets(self, m: int, rew, nxt, done, gen: torch.Generator) -> torch.Tensor:
        """``y = r + gamma (1 - done) max_a Q_target(s', a)`` with member ``m``'s target network, as in :meth:`update`."""
        with torch.no_grad():
            q_next = self.q_target.forward(nxt.unsqueeze(0), rows=slice(m, m + 1))[0]
            return rew + self.gamma * (1 - done) * q_next.max(1).values

    @staticmethod
    def trial_pairs(obs, act, y) -> tuple:
        """``(inputs, targets)`` of the trial: the observations, and (actions taken, TD targets)."""
        return obs, (act, y)

    @staticmethod
    def td_loss(q: torch.Tensor, targets) -> torch.Tensor:
        """:meth:`update`'s loss for one member: Huber on ``Q(s, a)`` of the actions taken, averaged over the batch."""
        act, y = targets
        return torch.nn.functional.smooth_l1_loss(q.gather(1, act).squeeze(1), y)

    def features(self, probe) -> dict[str, torch.Tensor]:
        """Hidden activations of every member on its probe batch: ``{layer: (members, batch, units)}``."""
        hidden: list = []
        with torch.no_grad():
            self.q.forward(probe[0], hidden=hidden)
        return {f"q.relu{k}": h for k, h in enumerate(hidden)}


class TD3:
    env_cls = Pendulums
    hidden = (64, 64)
    lr, batch, gamma, tau = 1e-3, 64, 0.99, 0.005
    learning_starts, policy_delay = 1000, 2
    expl_noise, policy_noise, noise_clip = 0.1, 0.2, 0.5  # times the action bound
    clear_on_fire = True  # the reference's SAC starts fresh optimizer states

    def __init__(self, seeds: list[int], n_methods: int):
        a_sizes, c_sizes = (3, *self.hidden, 1), (4, *self.hidden, 1)
        gens = [torch.Generator().manual_seed(1000 * s + 2) for s in seeds]
        actor = [StackedMLP.draw(g, a_sizes) for g in gens]
        q1 = [StackedMLP.draw(g, c_sizes) for g in gens]
        q2 = [StackedMLP.draw(g, c_sizes) for g in gens]
        self.actor = StackedMLP(a_sizes, actor * n_methods)
        self.M = self.actor.members
        # the twin critics in one stack: member m's are rows m and M + m
        self.critic = StackedMLP(c_sizes, q1 * n_methods + q2 * n_methods)
        self.actor_target, self.critic_target = self.actor.clone(), self.critic.clone()
        self.actor_opt = StackedAdam(self.actor.params, self.lr)
        self.critic_opt = StackedAdam(self.critic.params, self.lr)
        self.updates = 0
        self.max_action = Pendulums.max_action

    def critic_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([idx, idx + self.M])

    def online(self):
        return [("actor", self.actor, self.actor_opt), ("critic", self.critic, self.critic_opt)]

    def sync_targets(self, idx) -> None:
        self.actor_target.copy_from(self.actor, idx)
        self.critic_target.copy_from(self.critic, self.critic_rows(idx))

    def pi(self, net: StackedMLP, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(net.forward(obs))

    def act(self, obs: np.ndarray, t: int, total: int, gen: torch.Generator):
        if t < self.learning_starts:
            a = (torch.rand(self.M, 1, generator=gen) * 2 - 1) * self.max_action
        else:
            with torch.no_grad():
                a = self.pi(self.actor, torch.from_numpy(obs).unsqueeze(1)).squeeze(1)
            noise = torch.randn(self.M, 1, generator=gen) * self.expl_noise * self.max_action
            a = (a + noise).clamp(-self.max_action, self.max_action)
        return a.numpy(), a

    def policy(self, obs: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.pi(self.actor, obs).squeeze(2).numpy()

    def q_in(self, obs, act):
        return torch.cat([obs, act], 2).repeat(2, 1, 1)

    def update(self, buf: Replay, gen: torch.Generator) -> None:
        obs, act, rew, nxt, done = buf.sample(self.batch, gen)
        M = self.M
        with torch.no_grad():
            noise = (torch.randn(act.shape, generator=gen) * self.policy_noise * self.max_action).clamp(
                -self.noise_clip * self.max_action, self.noise_clip * self.max_action)
            a2 = (self.pi(self.actor_target, nxt) + noise).clamp(-self.max_action, self.max_action)
            q_t = self.critic_target.forward(self.q_in(nxt, a2)).squeeze(2)
            y = rew + self.gamma * (1 - done) * torch.minimum(q_t[:M], q_t[M:])
        q = self.critic.forward(self.q_in(obs, act)).squeeze(2)
        loss = torch.sum((q - y.repeat(2, 1)) ** 2) / self.batch
        self.critic_opt.step(torch.autograd.grad(loss, self.critic.params))
        self.updates += 1
        if self.updates % self.policy_delay == 0:
            a = self.pi(self.actor, obs)
            q1 = self.critic.forward(torch.cat([obs, a], 2), rows=slice(0, M))
            actor_loss = -q1.sum() / self.batch
            self.actor_opt.step(torch.autograd.grad(actor_loss, self.actor.params))
            self.actor_target.polyak(self.actor, self.tau)
            self.critic_target.polyak(self.critic, self.tau)

    # the when-needed trial: member m's twin critics as one nn.Module, regressed on fixed TD targets

    def trial_net(self, m: int) -> torch.nn.Module:
        """Member ``m``'s two online critics (rows ``m`` and ``M + m``) as one :class:`TwinCritic` (a copy)."""
        return TwinCritic(member_mlp(self.critic, m), member_mlp(self.critic, m + self.M))

    def td_targets(self, m: int, rew, nxt, done, gen: torch.Generator) -> torch.Tensor:
        """:meth:`update`'s target with member ``m``'s target actor and critics, smoothing noise drawn from ``gen``."""
        with torch.no_grad():
            noise = (torch.randn(nxt.shape[0], 1, generator=gen) * self.policy_noise * self.max_action).clamp(
                -self.noise_clip * self.max_action, self.noise_clip * self.max_action)
            a2 = self.max_action * torch.tanh(self.actor_target.forward(nxt.unsqueeze(0), rows=slice(m, m + 1))[0])
            a2 = (a2 + noise).clamp(-self.max_action, self.max_action)
            x = torch.cat([nxt, a2], 1).unsqueeze(0)
            q1 = self.critic_target.forward(x, rows=slice(m, m + 1))[0, :, 0]
            q2 = self.critic_target.forward(x, rows=slice(m + self.M, m + self.M + 1))[0, :, 0]
            return rew + self.gamma * (1 - done) * torch.minimum(q1, q2)

    @staticmethod
    def trial_pairs(obs, act, y) -> tuple:
        """``(inputs, targets)`` of the trial: (observation, action taken) pairs, and the TD targets."""
        return torch.cat([obs, act], 1), y

    @staticmethod
    def td_loss(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`update`'s critic loss for one member: both critics' squared errors summed, averaged over the batch."""
        return torch.sum((q - y) ** 2) / y.shape[0]

    def features(self, probe) -> dict[str, torch.Tensor]:
        obs, act = probe
        ha: list = []
        hc: list = []
        with torch.no_grad():
            self.actor.forward(obs, hidden=ha)
            self.critic.forward(self.q_in(obs, act), hidden=hc)
        out = {f"actor.relu{k}": h for k, h in enumerate(ha)}
        for k, h in enumerate(hc):
            out[f"q1.relu{k}"], out[f"q2.relu{k}"] = h[: self.M], h[self.M :]
        return out


AGENT_CLASSES = {"dqn": DQN, "td3": TD3}


def member_mlp(net: StackedMLP, row: int) -> torch.nn.Sequential:
    """Row ``row`` of ``net`` as ``Linear, ReLU, ..., Linear`` holding copies of its weights (no random draw)."""
    layers: list[torch.nn.Module] = []
    last = len(net.W) - 1
    for k, (w, b) in enumerate(zip(net.W, net.b)):
        lin = torch.nn.utils.skip_init(torch.nn.Linear, w.shape[2], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(w[row])
            lin.bias.copy_(b[row])
        layers.append(lin)
        if k < last:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


class TwinCritic(torch.nn.Module):
    """TD3's two critics of one member: ``x (batch, obs + act)`` -> ``(2, batch)``."""

    def __init__(self, q1: torch.nn.Module, q2: torch.nn.Module):
        super().__init__()
        self.q1, self.q2 = q1, q2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.q1(x)[:, 0], self.q2(x)[:, 0]])


def trial_data(agent, buf: "Replay", m: int, gen: torch.Generator, sizes: dict) -> tuple[list, tuple]:
    """The when-needed trial's ``(batches, probe)`` for member ``m``, from its replay buffer only.

    The ``batches * batch + probe`` most recent transitions (the "new task"),
    shuffled by ``gen`` (the seed's own trial generator): the first
    ``batches * batch`` cut into ``batches`` batches, the rest the probe. The
    targets are the agent's TD targets computed once, here, with its current
    target networks, so the trial regresses on fixed targets.
    """
    n, b, p = sizes["batches"], sizes["batch"], sizes["probe"]
    window = n * b + p
    if buf.size < window:
        raise ValueError(f"rl trial: the replay buffer holds {buf.size} transitions, the trial needs {window} "
                         f"({n} batches of {b} and a probe of {p})")
    rows = buf.data[m, buf.size - window: buf.size]
    rows = rows[torch.randperm(window, generator=gen)]
    obs, act, rew, nxt, done = (x[0] for x in buf.split(rows.unsqueeze(0)))
    y = agent.td_targets(m, rew, nxt, done, gen)
    pair = lambda sl: agent.trial_pairs(obs[sl], act[sl], y[sl])  # noqa: E731
    return [pair(slice(i * b, (i + 1) * b)) for i in range(n)], pair(slice(n * b, window))


def needed_trial(agent, buf: "Replay", m: int, gen: torch.Generator, sizes: dict):
    """``Moment.lookahead`` for member ``m``: ``fire_core.torch.trial`` of its Q network / twin critics.

    FIRE in the trial is the FIRE row's on those networks (``steps=FIRE_STEPS``,
    every Linear weight, biases kept); each copy trains with a fresh Adam at
    ``TRIAL_LR`` on the agent's own TD loss.
    """
    batches, probe = trial_data(agent, buf, m, gen, sizes)
    return fire_core.torch.trial(agent.trial_net(m), batches, probe, loss=agent.td_loss, lr=TRIAL_LR, steps=FIRE_STEPS)


def member_weights(agent, m: int) -> list[tuple[str, torch.Tensor, str]]:
    """``(name, weight, "oi")`` of every online weight of member ``m`` (TD3: both critics)."""
    out = []
    for name, net, _ in agent.online():
        rows = [m] if net.members == agent.M else [m, m + agent.M]
        for r, row in enumerate(rows):
            label = name if len(rows) == 1 else f"q{r + 1}"
            out += [(f"{label}.{k}", w.detach()[row], "oi") for k, w in enumerate(net.W)]
    return out


def fire_agent(agent, idx: torch.Tensor) -> None:
    """FIRE on members ``idx`` of every online network, then the targets set to the projected networks."""
    for _, net, opt in agent.online():
        rows = idx if net.members == agent.M else agent.critic_rows(idx)
        intervene("FIRE", net, opt, rows, None, agent.clear_on_fire)
    agent.sync_targets(idx)


# --- one chunk of seeds: every method at once ---------------------------------------------------------


def evaluate(agent, seeds: list[int], n_methods: int, episodes: int, k: int) -> np.ndarray:
    """Mean return of ``episodes`` greedy episodes per member; the same start states for each method of a seed."""
    env_cls = agent.env_cls
    starts = [env_cls.initial(np.random.default_rng([s, 7, k]), episodes) for s in seeds]
    env = env_cls(agent.M * episodes)
    env.state = np.concatenate(starts * n_methods, axis=0)
    ret = np.zeros(agent.M * episodes)
    alive = np.ones(agent.M * episodes, dtype=bool)
    while alive.any():
        obs = torch.from_numpy(env.obs()).view(agent.M, episodes, -1)
        a = agent.policy(obs).reshape(agent.M * episodes, *(() if env_cls is CartPoles else (1,)))
        _, r, term, trunc = env.step(a)
        ret += r * alive
        alive &= ~(term | trunc)
    return ret.reshape(agent.M, episodes).mean(1)


def run_chunk(agent_name: str, seeds: list[int], cfg: dict) -> dict:
    """Train every method on ``seeds`` (all members in one stack); plain floats out, per method a list per seed.

    Subnormals are flushed to zero while it runs (Adam's second moments of tiny gradients: denormals are slow
    on x86) and no longer after: FTZ/DAZ holds for the whole thread, numpy included, and the tests run this
    inside the pytest process.
    """
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        return train_chunk(agent_name, seeds, cfg)
    finally:
        torch.set_flush_denormal(False)  # torch's default


def train_chunk(agent_name: str, seeds: list[int], cfg: dict) -> dict:
    """:func:`run_chunk`'s work."""
    spec = cfg["agents"][agent_name]
    steps, ratio = spec["steps"], spec["replay_ratio"]
    methods = cfg["methods"]
    S, n_m = len(seeds), len(methods)
    agent = AGENT_CLASSES[agent_name](seeds, n_m)
    agent.learning_starts = spec["learning_starts"]
    M = agent.M
    env_cls = agent.env_cls
    gen = torch.Generator().manual_seed(10_007 * (seeds[0] + 1) + len(seeds))
    # training start states: one generator per member, the same stream for every method of a seed
    rngs = [np.random.default_rng([s, 3]) for _ in methods for s in seeds]
    fresh = [torch.Generator().manual_seed(1000 * s + 100 + j) for j in range(n_m) for s in seeds]
    env = env_cls(M)
    env.state = np.concatenate([env_cls.initial(r) for r in rngs], axis=0)
    act_dim, act_dtype = (1, torch.int64) if env_cls is CartPoles else (1, torch.float32)
    buf = Replay(M, steps, env_cls.obs_dim, act_dim, act_dtype)
    member = lambda method: torch.arange(S) + S * methods.index(method)  # noqa: E731

    period = steps // (INTERVENTIONS + 1)
    check_every = max(1, period // 4)
    eval_every = max(1, steps // cfg["evals"])
    triggers = {m: [WhenNeeded(kind) for _ in seeds] for m, kind in TRIGGERED.items() if m in methods}
    # the when-needed trial's shuffles and TD3 smoothing noise: one generator per seed, apart from the run's own
    trial_gens = [torch.Generator().manual_seed(1000 * s + 9) for s in seeds]
    probe = None
    fire_seconds = {m: 0.0 for m in methods}
    interventions = {m: [] for m in methods}
    curves, eval_steps = [], []
    train_seconds = 0.0
    trial_seconds, trial_checks = 0.0, 0

    def check_triggers(t: int, baseline: bool) -> float:
        """Poll every trigger at step ``t`` (``baseline``: the initial network); returns the seconds spent in trials."""
        nonlocal trial_checks
        spent = 0.0
        feats = agent.features(probe) if "FIRE@dormant" in triggers else None
        for method, per_seed in triggers.items():
            rows = member(method)
            for j, trig in enumerate(per_seed):
                m = int(rows[j])
                weights = member_weights(agent, m) if trig.kind == "DfI" else None
                features = None if feats is None or trig.kind != "dormant" else {k: v[m] for k, v in feats.items()}
                trial = trig.kind == "when_needed" and not baseline  # step 0 of the schedule runs no trial
                t0 = time.perf_counter()
                lookahead = needed_trial(agent, buf, m, trial_gens[j], cfg["trial"]) if trial else None
                reason = trig.check(t, weights=weights, features=features, lookahead=lookahead)
                if trial:
                    spent += time.perf_counter() - t0
                    trial_checks += 1
                if reason:
                    started = time.perf_counter()
                    fire_agent(agent, torch.tensor([m]))
                    fire_seconds[method] += time.perf_counter() - started
        return spent

    for t in range(steps + 1):
        if t % eval_every == 0:
            curves.append(evaluate(agent, seeds, n_m, cfg["eval_episodes"], len(curves)))
            eval_steps.append(t)
        if t == steps:
            break
        started = time.perf_counter()
        obs = env.obs()
        a_np, a_t = agent.act(obs, t, steps, gen)
        nxt, rew, term, trunc = env.step(a_np)
        buf.add(obs, a_t, rew, nxt, term)
        for i in np.flatnonzero(term | trunc):
            env.state[i] = env_cls.initial(rngs[i])[0]
            env.t[i] = 0
        done_steps = t + 1
        if done_steps >= agent.learning_starts:
            if probe is None:  # the initial network: the triggers' baseline, and the fixed probe batch
                probe = buf.pick(PROBE, gen)
                if triggers:
                    trial_seconds += check_triggers(done_steps, baseline=True)
            for _ in range(ratio):
                agent.update(buf, gen)
            if done_steps % period == 0 and done_steps < steps:
                for method in PERIODIC:
                    if method not in methods:
                        continue
                    idx = member(method)
                    t0 = time.perf_counter()
                    if method == "FIRE":
                        fire_agent(agent, idx)
                    else:
                        for _, net, opt in agent.online():
                            rows = idx if net.members == M else agent.critic_rows(idx)
                            intervene(method, net, opt, rows, fresh if net.members == M else fresh + fresh, False)
                        agent.sync_targets(idx)
                    if method == "FIRE":
                        fire_seconds[method] += time.perf_counter() - t0
                    interventions[method].append(done_steps)
            if triggers and done_steps % check_every == 0 and done_steps > agent.learning_starts:
                trial_seconds += check_triggers(done_steps, baseline=False)
        train_seconds += time.perf_counter() - started

    train_seconds -= trial_seconds  # the trials are reported on their own, not as training

    curves = np.stack(curves, axis=1)  # (members, evals)
    eval_steps = np.asarray(eval_steps)
    final_mask = eval_steps >= (1 - FINAL_WINDOW) * steps
    out = {"seeds": list(seeds), "train_seconds": train_seconds, "eval_steps": eval_steps.tolist(), "methods": {},
           "trial_seconds": trial_seconds, "trial_checks": trial_checks}
    for method in methods:
        rows = member(method)
        per = []
        for j in range(S):
            c = curves[int(rows[j])]
            row = {"curve": c.tolist(), "auc": float(c.mean()), "final": float(c[final_mask].mean())}
            if method in triggers:
                trig = triggers[method][j]
                row.update(fired_at=list(trig.fired_at), values=list(trig.values), checks=trig.checks)
                if trig.kind == "when_needed":
                    row["losses"] = list(trig.losses)
            per.append(row)
        # the method's share of the stacked training time: its members over all members
        share = train_seconds * S / M
        out["methods"][method] = {
            "seeds": per, "fire_seconds": fire_seconds[method], "train_share_seconds": share,
            "fire_fraction": fire_fraction(fire_seconds[method], share) if method.startswith("FIRE") else None,
            "interventions": interventions[method],
        }
    return out


# --- aggregation and output -------------------------------------------------------------------------


def merge(chunks: list[dict]) -> dict:
    """The chunks of one agent -> per method, the per-seed rows in seed order, and summed times."""
    methods = list(chunks[0]["methods"])
    res = {"eval_steps": chunks[0]["eval_steps"], "train_seconds": sum(c["train_seconds"] for c in chunks),
           "seeds": [s for c in chunks for s in c["seeds"]], "methods": {},
           "trial_seconds": sum(c["trial_seconds"] for c in chunks), "trial_checks": sum(c["trial_checks"] for c in chunks)}
    for m in methods:
        parts = [c["methods"][m] for c in chunks]
        fire_s, share = sum(p["fire_seconds"] for p in parts), sum(p["train_share_seconds"] for p in parts)
        res["methods"][m] = {
            "seeds": [r for p in parts for r in p["seeds"]], "fire_seconds": fire_s, "train_share_seconds": share,
            "fire_fraction": fire_fraction(fire_s, share) if m.startswith("FIRE") else None,
            "interventions": parts[0]["interventions"],
        }
    return res


def fired_summary(rows: list[dict]) -> str:
    counts = [len(r["fired_at"]) for r in rows]
    firsts = [r["fired_at"][0] for r in rows if r["fired_at"]]
    text = f"{np.mean(counts):.1f} per seed (range {min(counts)}-{max(counts)}, {sum(c > 0 for c in counts)}/{len(rows)} seeds)"
    if firsts:
        text += f"; first at step {int(np.median(firsts))} (median)"
    return text


def table(agent: str, res: dict, cfg: dict) -> list[str]:
    methods = list(res["methods"])
    ref = "none" if "none" in methods else methods[0]
    spec = cfg["agents"][agent]
    get = lambda m, k: [r[k] for r in res["methods"][m]["seeds"]]  # noqa: E731
    lines = [
        f"### {agent}: {'DQN on CartPole-v1' if agent == 'dqn' else 'TD3 on Pendulum-v1'}",
        "",
        f"{spec['steps']} environment steps, replay ratio {spec['replay_ratio']} "
        f"({(spec['steps'] - spec['learning_starts'] + 1) * spec['replay_ratio']} gradient steps, after {spec['learning_starts']} "
        f"warm-up steps are collected), periodic methods at steps {_periodic_steps(spec)}; "
        f"triggers checked every {max(1, spec['steps'] // (INTERVENTIONS + 1) // 4)} steps. Seeds {res['seeds']}. "
        f"Training wall time of this agent: {res['train_seconds'] / 60:.1f} CPU-min (all methods, stacked).",
        "",
        f"| method | area under the return curve | paired diff. to {ref} | final return | paired diff. to {ref} "
        "| FIRE time / training time | fired |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rows = res["methods"][m]
        auc, fin = get(m, "auc"), get(m, "final")
        d_auc = [a - b for a, b in zip(auc, get(ref, "auc"))]
        d_fin = [a - b for a, b in zip(fin, get(ref, "final"))]
        frac = rows["fire_fraction"]
        fired = fired_summary(rows["seeds"]) if m in TRIGGERED else (
            f"every seed at {rows['interventions']}" if m in PERIODIC else "—")
        lines.append(
            f"| {m} | {fmt(auc)} | {'—' if m == ref else fmt(d_auc)} | {fmt(fin)} | {'—' if m == ref else fmt(d_fin)} "
            f"| {'—' if frac is None else f'{100 * frac:.2f}%'} | {fired} |"
        )
    best_auc = max(methods, key=lambda m: mean_se(get(m, "auc"))[0])
    best_fin = max(methods, key=lambda m: mean_se(get(m, "final"))[0])
    lines += ["", f"Highest mean area under the curve: **{best_auc}**; highest mean final return: **{best_fin}** "
              "(compare the paired differences and their standard errors before calling it a win).", ""]
    return lines


def needed_cells(res: dict) -> dict:
    """The when-needed row of one agent: goals on the area under the curve, firings, trial ratios and cost."""
    get = lambda m: [r["auc"] for r in res["methods"][m]["seeds"]]  # noqa: E731
    rows = res["methods"][NEEDED]["seeds"]
    counts = [len(r["fired_at"]) for r in rows]
    ratios = [v for r in rows for v in r["values"] if not math.isnan(v)]
    per_check = res["trial_seconds"] / res["trial_checks"] if res["trial_checks"] else math.nan
    share = res["methods"][NEEDED]["train_share_seconds"]  # the row's members' share of the stacked training
    return {
        "goals": goals(get("none"), get("FIRE"), get(NEEDED), higher_is_better=True),
        "fired": f"{np.mean(counts):.1f} firings a seed ({sum(c > 0 for c in counts)}/{len(rows)} seeds fired)",
        "ratios": ratios, "per_check": per_check, "fraction": fire_fraction(res["trial_seconds"], share),
    }


def needed_section(results: dict, cfg: dict) -> list[str]:
    """The "FIRE when needed" section: one row per agent (DQN/CartPole, TD3/Pendulum)."""
    agents = [ag for ag, res in results.items() if {"none", "FIRE", NEEDED} <= set(res["methods"])]
    if not agents:
        return []
    trial = cfg["trial"]
    lines = [
        "## FIRE when needed (`fire_core.schedule.when_needed()`)",
        "",
        f"`{NEEDED}`: `common.WhenNeeded(\"when_needed\")` per seed (the library's rule as it ships: "
        "`LookaheadBelow(0.526, steps=200)`), polled where `FIRE@DfI` is: on the initial network when learning "
        "starts (no trial there) and then every steps/20 environment steps. Its trial, "
        "`fire_core.torch.trial(net, batches, probe, loss=td_loss, lr=1e-3, steps=10)`, is built from the "
        f"seed's replay buffer only: the {trial['batches'] * trial['batch'] + trial['probe']} most recent "
        f"transitions (the new task), shuffled, {trial['batches']} batches of {trial['batch']} to train on and a "
        f"probe of {trial['probe']} held out of them; the regression targets are the agent's TD targets computed "
        "once at the check with its current target networks (TD3: with target-policy smoothing noise), fixed "
        "during the trial. `net` is a copy of the online Q network (DQN; loss: the benchmark's Huber on "
        "Q(s, a) of the action taken) or of both online critics as one module (TD3; loss: the sum of both "
        "critics' squared errors, the benchmark's critic loss); FIRE in the trial is the FIRE row's on those "
        "networks (every Linear weight, 10 steps, biases kept). The actor takes no part in the trial (its loss "
        "has no fixed target). When the rule fires, FIRE is applied to that seed exactly as in the `FIRE` row "
        "(DQN: the Q network, Adam state kept; TD3: actor and both critics, Adam state cleared; targets set to "
        "the projected networks).",
        "",
        "Metric: the area under the return curve (the mean evaluation return over training), higher is better; "
        "differences are paired over seeds, mean ± standard error, in return units. *Trial cost per check*: "
        "the wall time of one seed's trial (data, targets and both trained copies), and all the row's trials "
        "as a % of the row's share of the stacked training time (its members' share; a plain, unbatched "
        "agent trains slower, so the % is an upper bound for one). In optimizer steps: a trial takes 400 "
        "Adam steps on batches of 64; between two checks the agent takes steps/20 times its replay ratio "
        "gradient steps (below).",
        "",
        *NEEDED_TABLE,
    ]
    notes = []
    for ag in agents:
        res, spec = results[ag], cfg["agents"][ag]
        c = needed_cells(res)
        g = c["goals"]
        diff = lambda d: f"{d['mean']:.1f} ± {d['se']:.1f}"  # noqa: E731
        name = "DQN, CartPole-v1" if ag == "dqn" else "TD3, Pendulum-v1"
        lines.append(
            f"| {name}, replay ratio {spec['replay_ratio']} | area under the return curve (higher is better) "
            f"| {diff(g['fire_minus_none'])} | {diff(g['needed_minus_none'])} | {diff(g['needed_minus_fire'])} "
            f"| {c['fired']} | {c['per_check']:.2f} s ({100 * c['fraction']:.1f}% of training) | {goals_cell(g)} |"
        )
        r = np.asarray(c["ratios"])
        between = max(1, spec["steps"] // (INTERVENTIONS + 1) // 4) * spec["replay_ratio"]
        notes.append(
            f"- {name}: trial ratio (probe loss with FIRE / without) over all {len(r)} checks of all seeds: "
            f"median {np.median(r):.3f}, range {r.min():.3f}-{r.max():.3f} ({int((r < 0.526).sum())} below 0.526); "
            f"{res['trial_checks']} trials took {res['trial_seconds'] / 60:.1f} CPU-min in all; "
            f"{between} agent gradient steps between checks{' (critic steps; half as many actor steps)' if ag == 'td3' else ''}."
            if len(r) else f"- {name}: no trial ran."
        )
    return lines + [""] + notes + [""]


def _periodic_steps(spec) -> list[int]:
    p = spec["steps"] // (INTERVENTIONS + 1)
    return [p * k for k in range(1, INTERVENTIONS + 1)]


def plot(results: dict, cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = list(results)
    fig, axes = plt.subplots(1, len(agents), figsize=(6.5 * len(agents), 4.5), squeeze=False)
    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors))
    for ax, agent in zip(axes[0], agents):
        res = results[agent]
        x = np.asarray(res["eval_steps"])
        for m, rows in res["methods"].items():
            c = np.array([r["curve"] for r in rows["seeds"]])
            mu = c.mean(0)
            se = c.std(0, ddof=1) / math.sqrt(len(c)) if len(c) > 1 else 0 * mu
            style = "-" if m.startswith("FIRE") else "--"
            ax.plot(x, mu, style, color=colors[m], label=m)
            ax.fill_between(x, mu - se, mu + se, color=colors[m], alpha=0.15)
        for s in _periodic_steps(cfg["agents"][agent]):
            ax.axvline(s, color="gray", lw=0.6, ls=":")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("evaluation return")
        title = "DQN, CartPole-v1" if agent == "dqn" else "TD3, Pendulum-v1"
        ax.set_title(f"{title}, replay ratio {cfg['agents'][agent]['replay_ratio']} (mean ± s.e., {len(c)} seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(results: dict, cfg: dict, path: Path, png: Path, seconds: float) -> None:
    lines = [
        "# Deep RL at a high replay ratio: resets, shrink & perturb and FIRE",
        "",
        f"`{cfg['command']}` — {cfg['seeds']} seeds, all {len(cfg['methods'])} methods of a seed trained side by "
        f"side from the same initial networks and start states. Wall time {seconds / 60:.1f} min with "
        f"{cfg['jobs']} worker process(es) on a {os.cpu_count()}-core {platform.machine()} CPU "
        f"({platform.platform()}), torch {torch.__version__}, python {platform.python_version()}.",
        "",
        f"Return curve: the mean return of {cfg['eval_episodes']} greedy (DQN) / deterministic (TD3) evaluation "
        f"episodes every steps/{cfg['evals']} environment steps. *Area under the return curve* = the mean of all "
        f"{cfg['evals'] + 1} evaluations (step 0 included); *final return* = the mean of the evaluations in the "
        f"last {int(100 * FINAL_WINDOW)}% of training. Mean ± standard error over seeds; *paired diff.* is the "
        "per-seed difference to `none`. Periodic methods every steps/5 environment steps (reset-last: the output "
        f"layer of every online network; reset: all layers; S&P: theta <- {SNP_LAMBDA} theta + "
        f"{1 - SNP_LAMBDA:.1f} fresh init; FIRE: fire_core.reinit, {FIRE_STEPS} steps, every weight of the online "
        "networks), targets set to the new online networks. FIRE keeps DQN's Adam state and clears TD3's. "
        "`FIRE@DfI` / `FIRE@dormant`: common.WhenNeeded per seed, checked every steps/20 environment steps; "
        "*fired* says how often and (median over seeds) first when. *FIRE time / training time*: FIRE's own wall "
        "time (projection and target sync) over the method's share of the stacked training time (the members of "
        "all methods train in one batched process, so the share is the training time times the method's share "
        "of the members).",
        "",
    ]
    if cfg["quick"]:
        lines += ["**Quick mode: too few seeds and steps for the numbers to mean anything.**", ""]
    for agent, res in results.items():
        lines += table(agent, res, cfg)
    lines += needed_section(results, cfg)
    lines += [f"![rl]({png.name})", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, very short runs: a smoke test under a minute")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10; quick 2)")
    p.add_argument("--agents", default=",".join(AGENTS), help=f"comma-separated subset of {AGENTS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--steps", type=int, default=None, help="environment steps per agent (default: dqn 8000, td3 8000)")
    p.add_argument("--replay-ratio", type=int, default=None, help="gradient steps per environment step (default: dqn 8, td3 4)")
    p.add_argument("--learning-starts", type=int, default=None, help="random warm-up steps before learning (default 1000; quick 50)")
    p.add_argument("--evals", type=int, default=None, help="evaluations over training, every steps/evals (default 20; quick 10)")
    p.add_argument("--eval-episodes", type=int, default=None, help="episodes per evaluation (default 5; quick 2)")
    add_run_options(p, "worker processes (one thread each); the seeds of each agent are split in this many chunks")
    a = p.parse_args(argv)
    if a.replot is not None:
        cfg, results, seconds = load_run(a.replot)
        return write_outputs(a.replot.with_suffix(""), results, cfg, seconds, plot, write_markdown)
    agents = names(p, "agents", a.agents, AGENTS)
    methods = names(p, "methods", a.methods, METHODS)
    methods = [m for m in METHODS if m in methods]
    sizes = QUICK if a.quick else FULL
    specs = {ag: dict(sizes[ag]) for ag in agents}
    for spec in specs.values():
        if a.steps is not None:
            spec["steps"] = a.steps
        if a.replay_ratio is not None:
            spec["replay_ratio"] = a.replay_ratio
        if a.learning_starts is not None:
            spec["learning_starts"] = a.learning_starts
    trial = dict(TRIAL_QUICK if a.quick else TRIAL)
    window = trial["batches"] * trial["batch"] + trial["probe"]
    for ag, spec in specs.items():
        if spec["steps"] // (INTERVENTIONS + 1) <= spec["learning_starts"]:
            p.error(f"{ag}: --steps / {INTERVENTIONS + 1} must exceed the {spec['learning_starts']} warm-up steps")
        every = max(1, spec["steps"] // (INTERVENTIONS + 1) // 4)
        first = (spec["learning_starts"] // every + 1) * every  # the first check after the warm-up
        if NEEDED in methods and first < window:
            p.error(f"{ag}: the first '{NEEDED}' check (step {first}) would find fewer transitions than its trial "
                    f"takes ({window}); raise --learning-starts or --steps")
    cfg = dict(
        quick=a.quick, seeds=a.seeds or (2 if a.quick else 10), agents=specs, methods=methods, jobs=max(1, a.jobs),
        trial=trial,
        evals=a.evals or (10 if a.quick else 20), eval_episodes=a.eval_episodes or (2 if a.quick else 5),
        command=command_line(__file__, argv),
    )
    seeds = list(range(cfg["seeds"]))
    chunks = [list(c) for c in np.array_split(seeds, min(cfg["jobs"], len(seeds))) if len(c)]
    jobs = [(ag, [int(s) for s in c], cfg) for ag in agents for c in chunks]
    started = time.perf_counter()
    with seed_runner(run_chunk, cfg["jobs"]) as run_all:
        done = run_all(jobs)
    results = {ag: merge([r for (ag2, _, _), r in zip(jobs, done) if ag2 == ag]) for ag in agents}
    seconds = time.perf_counter() - started
    stem = a.out / ("rl-quick" if a.quick else "rl")
    save_run(stem, cfg, results, seconds)
    return write_outputs(stem, results, cfg, seconds, plot, write_markdown)


if __name__ == "__main__":
    sys.exit(main())
