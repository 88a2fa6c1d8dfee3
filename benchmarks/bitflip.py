"""Bit-flipping benchmark: Dohare et al.'s Slowly-Changing Regression, online SGD, with FIRE.

The problem (Dohare, Sutton, Mahmood 2021, "Continual Backprop: Stochastic
Gradient Descent with Persistent Randomness", arXiv:2108.06325, section 2.1,
where it is the "Bit-Flipping problem"; renamed "Slowly-Changing Regression"
in Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood, Sutton, "Loss of
plasticity in deep continual learning", Nature 632, 768-774 (2024), Extended
Data Fig. 2):

* the input has ``m + 1`` bits: the first ``f`` are the *flipping* bits, of
  which one, chosen at random, flips every ``T`` examples; the next ``m - f``
  are drawn i.i.d. (fair coin) for every example; the last bit is always 1
  (Extended Data Fig. 2a);
* the target is a network with one hidden layer of linear threshold units
  (LTUs), every weight -1 or +1 (Extended Data Fig. 2a); LTU ``i`` outputs 1
  when its input sum exceeds ``theta_i = (m + 1) beta - S_i``, with ``S_i`` the
  number of its negative input weights (arXiv:2108.06325, section 2.1), and 0
  otherwise; the target is the sum of the LTUs' outputs weighted by the
  output weights (+-1, no output bias);
* numbers, from the authors' configuration of the ReLU/SGD experiment
  (github.com/shibhansh/loss-of-plasticity,
  lop/slowly_changing_regression/cfg/sgd/bp/relu.json and cfg/prob.json):
  ``m = 20`` inputs, ``f = 15`` flipping bits, ``T = 10,000``, 100 target
  LTUs, ``beta = 0.7``, a learner with one hidden layer of 5 ReLU units,
  plain SGD, step size 0.01 (the first value of the published grid
  {0.01, 0.003, 0.001}; their S&P configuration fixes 0.01), 1,000,000
  examples, 100 runs; the error is plotted as the squared error binned over
  20,000 examples (the repository's README: "bins the error into bins of size
  20000"; Nature's figure shows 100 runs and mean +- 1 standard error).

Chosen here (not found published, or changed):

* the learner's weights start Kaiming-uniform (He et al. 2015; the CBP paper
  names "uniform Kaiming distribution"): ``U(-b, b)``, ``b = gain *
  sqrt(3 / fan_in)``, gain sqrt(2) for the ReLU layer and 1 for the linear
  output; the hidden layer's bias is the weight on the constant input bit
  (so the hidden weight is ``h x (m + 1)`` = 5 x 21), the output unit has a
  bias that starts at 0;
* the loss is the squared error ``(y - y*)^2`` of the prediction made
  *before* the update on that example (online error), and the step is 0.01
  times its gradient (``2 (y - y*) ...``, as torch's MSELoss gives);
* 30 seeds by default instead of 100 (the README recommends at least 30);
  the full published length of 1M examples is run (not shortened);
* the run-to-run randomness: each seed has its own target network, stream
  and initial learner weights; every method of a seed sees the same stream
  from the same initial weights, so differences are paired per seed.

Methods (one learner per method and seed, all trained together, vectorized
across runs):

* ``none``: plain online backprop (SGD);
* ``reset``: every ``--every`` flips, all weights redrawn from the initial
  distribution (output bias back to 0);
* ``S&P``: shrink and perturb in Ash & Adams' (2020) form, every ``--every``
  flips: ``theta <- lam * theta + sigma * eps`` with ``eps`` a fresh draw from
  the initial distribution; ``(lam, sigma)`` chosen in the full run as the
  lowest whole-stream error on 3 held-out seeds over the grid
  ``SNP_GRID`` (no value for this problem was found published: Dohare et al.
  use a per-step variant with weight decay and a perturbation scale grid);
* ``FIRE``: every ``--every`` flips, ``fire_core.reinit`` (``--fire-steps``
  Newton-Schulz steps, the reference's vision setting of 10 by default) on
  the stacked hidden weights (runs, 5, 21) and output weights (runs, 1, 5)
  with the stack layout ``"Roi"``; the output bias (1-D) is left alone;
* ``FIRE@DfI``, ``FIRE@dormant``: ``benchmarks.common.WhenNeeded`` checked
  on the initial network and then at every flip (every ``T`` examples) on
  that run's weights (DfI) or the hidden ReLU activations of a probe batch
  of 500 inputs with every bit random, fixed per seed (dormant; for a ReLU
  a dead unit on the probe has score 0; the probe covers every setting of
  the flipping bits, so a unit dead on it is dead for good, while one silent
  only for the current bits revives after a flip); when it returns a reason
  the same FIRE as ``FIRE`` is applied to that run;
* ``FIRE when needed`` (``common.NEEDED``): the same, with
  ``fire_core.schedule.when_needed()`` (``common.WhenNeeded("when_needed")``)
  at FIRE@DfI's cadence (the initial network, no trial; then every flip).
  Its trial is ``fire_core.torch.trial`` on the learner as a float64 torch
  module (:func:`learner_module`), FIRE as the ``FIRE`` row's (``steps`` =
  ``--fire-steps``, both weights, the output bias left alone), Adam lr 1e-3,
  the mean squared error, on the run's 512 most recent examples
  (:func:`trial_data`: 4 batches of 64 and a probe of 256 held out of them,
  split by their own generator; at a flip they all come from the period
  that just ended, as no example of the new bits has been seen). The
  threshold 0.526 was chosen on a cross-entropy classification task and is
  applied unchanged. Cost: 2 x 200 Adam steps of a torch module a check,
  99 checks a run: far more than the learner's vectorized SGD (the results
  give both shares).

The period ``--every`` is 10 flips (100,000 examples): an intervention at
every flip would undo each period's fit before it is complete (the 5-unit
learner needs a large part of a 10,000-example period to fit after a
flip), and 10 flips leave 9 interventions in the 1M-example stream.

What FIRE does here: the hidden weight is wide (5 x 21), so its polar
factor has orthonormal *rows*: the five units' input weight vectors (with
the bias weight) become orthogonal and of equal norm ``sqrt(5/21) = 0.49``
(the FIRE scale ``sqrt(d_out/d_in)``; Kaiming's expected row norm is
``sqrt(2) = 1.41``), in the row space they already span; the 1 x 5 output
weight keeps its direction and gets norm ``sqrt(1/5) = 0.45``.

Measured per (method, seed): squared error binned over ``--bin`` examples,
mean error over the whole stream and over its last 10%, paired differences
to ``none``; when the triggers fired and the value at every check (the
trial's losses and ratio for FIRE when needed, and its wall time); DfI/n
(``fire_core.schedule.target_dfi``) of the hidden weight and the dormant
share at every flip; FIRE's wall time as a fraction of the SGD training time
(common.fire_fraction).

    python benchmarks/bitflip.py            # full run: 30 seeds, 1M examples, 20.8 min at --jobs 2 on 2 cores
                                            # shared with other runs (5.8 min before FIRE when needed's 2970
                                            # trials, 0.68 s each there)
    python benchmarks/bitflip.py --quick    # seconds, numbers not meaningful

Writes ``benchmarks/results/bitflip.md``, ``bitflip.png`` and the raw
per-seed numbers ``bitflip.json`` (the quick mode writes ``bitflip-quick.*``);
``--replot bitflip.json`` redraws from the latter.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread per worker
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import fire_core  # noqa: E402
from fire_core.diagnostics import dormant_ratio
from fire_core.schedule import target_dfi  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    NEEDED, NEEDED_TABLE, WhenNeeded, add_run_options, command_line, fire_fraction, goals, goals_cell, load_run,
    mean_se, names, save_run, seed_runner, write_outputs,
)

METHODS = ("none", "reset", "S&P", "FIRE", "FIRE@DfI", "FIRE@dormant", NEEDED)
TRIGGERED = {"FIRE@DfI": "DfI", "FIRE@dormant": "dormant", NEEDED: "when_needed"}
PERIODIC = ("reset", "S&P", "FIRE")
SNP_GRID = tuple((lam, sigma) for lam in (0.3, 0.6, 0.9) for sigma in (0.01, 0.1, 0.5))
SNP_SEEDS = (1000, 1001, 1002)  # held out: not among the seeds reported
SNP_DEFAULT = (0.6, 0.1)  # quick mode only (no sweep)
PROBE = 500
LAST = 0.1  # the share of the stream at its end that "final error" averages
TRIAL_BATCHES, TRIAL_BATCH, TRIAL_PROBE = 4, 64, 256  # FIRE when needed's trial: the most recent 512 examples
RECENT = TRIAL_BATCHES * TRIAL_BATCH + TRIAL_PROBE


# --- the problem ------------------------------------------------------------------------------


def target_network(rng: np.random.Generator, m: int, hidden: int, beta: float):
    """LTU target: input weights (hidden, m + 1) and output weights (hidden,), all +-1, thresholds (hidden,)."""
    w = rng.choice(np.array([-1.0, 1.0]), size=(hidden, m + 1))
    v = rng.choice(np.array([-1.0, 1.0]), size=hidden)
    theta = (m + 1) * beta - np.sum(w < 0, axis=1)
    return w, v, theta


def target_values(x: np.ndarray, net) -> np.ndarray:
    """The target for each row of ``x`` (n, m + 1): ``v . [w x > theta]``."""
    w, v, theta = net
    return (x @ w.T > theta).astype(np.float64) @ v


class Stream:
    """One seed's examples: ``take(n)`` gives the next ``n`` inputs (n, m + 1) and targets (n,).

    Before example ``t`` with ``t % T == 0`` and ``t > 0``, one of the ``f``
    flipping bits, chosen uniformly, flips; ``flips`` records ``(t, bit)``.
    """

    def __init__(self, seed: int, m: int, f: int, period: int, hidden: int, beta: float):
        rng = np.random.default_rng([seed, 0])
        self.net = target_network(rng, m, hidden, beta)
        self.rng = np.random.default_rng([seed, 1])
        self.m, self.f, self.period = m, f, period
        self.bits = self.rng.integers(0, 2, size=f).astype(np.float64)
        self.t = 0
        self.flips: list[tuple[int, int]] = []

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((n, self.m + 1))
        start = self.t
        first = -(-start // self.period) * self.period  # the first multiple of T at or after start
        cuts = [t for t in range(max(first, self.period), start + n, self.period)]
        edges = sorted({start, *cuts, start + n})
        for a, b in zip(edges[:-1], edges[1:]):  # segments with constant flipping bits
            if a in cuts:
                bit = int(self.rng.integers(self.f))
                self.bits[bit] = 1.0 - self.bits[bit]
                self.flips.append((a, bit))
            x[a - start : b - start, : self.f] = self.bits
        x[:, self.f : self.m] = self.rng.integers(0, 2, size=(n, self.m - self.f))
        x[:, self.m] = 1.0
        self.t += n
        return x, target_values(x, self.net)


def probe_inputs(seed: int, m: int, n: int) -> np.ndarray:
    """``n`` inputs with all ``m`` bits random (and the constant bit): the whole input space, fixed per seed.

    A ReLU unit that is dead on these is dead for every setting of the
    flipping bits (it gets no gradient whatever the stream does next); one
    that is only silent for the current flipping bits can come back after a
    flip, so the current distribution would overstate lost units (at
    initialization 40% of the 5 units are already silent on it).
    """
    x = np.random.default_rng([seed, 3]).integers(0, 2, size=(n, m + 1)).astype(np.float64)
    x[:, m] = 1.0
    return x


# --- the learner: one hidden ReLU layer, stacked over (seeds, methods) ----------------------------


def init_weights(rng: np.random.Generator, prefix: tuple, hidden: int, inputs: int):
    """Kaiming-uniform ``w1`` (*prefix, hidden, inputs), ``w2`` (*prefix, 1, hidden); ``b2`` zeros (*prefix, 1, 1)."""
    b1 = math.sqrt(2.0) * math.sqrt(3.0 / inputs)
    b2 = math.sqrt(3.0 / hidden)
    w1 = rng.uniform(-b1, b1, size=(*prefix, hidden, inputs))
    w2 = rng.uniform(-b2, b2, size=(*prefix, 1, hidden))
    return w1, w2, np.zeros((*prefix, 1, 1))


def forward(w1, w2, b2, x):
    """``x`` (..., inputs, 1) -> hidden pre-activation (..., hidden, 1), activation, prediction (..., 1, 1)."""
    pre = w1 @ x
    a = np.maximum(pre, 0.0)
    return pre, a, w2 @ a + b2


def sgd_step(w1, w2, b2, x, xt, y, lr: float):
    """One online SGD step on ``(y_hat - y)^2``, in place; returns the error ``y_hat - y`` before the step.

    ``x``: (..., inputs, 1) and its transpose ``xt`` (..., 1, inputs);
    ``y``: (..., 1, 1). Leading axes broadcast (one input per seed, one
    learner per seed and method).
    """
    pre = w1 @ x
    a = np.maximum(pre, 0.0)
    e = w2 @ a
    e += b2
    e -= y
    g = e * (2.0 * lr)  # lr * d(loss)/d(y_hat)
    d = w2.swapaxes(-1, -2) * g
    d *= pre > 0
    w2 -= g * a.swapaxes(-1, -2)
    b2 -= g
    w1 -= d * xt
    return e


def fire_stacked(w1, w2, steps: int):
    """FIRE on stacked learners: ``w1`` (R, hidden, inputs), ``w2`` (R, 1, hidden), each run its own layer."""
    return fire_core.reinit(w1, "Roi", steps=steps), fire_core.reinit(w2, "Roi", steps=steps)


def learner_module(w1, w2, b2):
    """One learner as a float64 torch module (``Linear(inputs, hidden, bias=False)``, ReLU, ``Linear(hidden, 1)``).

    The hidden layer's bias is the weight on the constant input bit (in
    ``w1``), as in :func:`forward`; the output bias is ``b2``. For
    ``fire_core.torch.trial``, which trains copies of a module.
    """
    import torch
    from torch import nn

    module = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0], bias=False), nn.ReLU(), nn.Linear(w1.shape[0], 1))
    module = module.double()
    with torch.no_grad():
        module[0].weight.copy_(torch.from_numpy(np.ascontiguousarray(w1)))
        module[2].weight.copy_(torch.from_numpy(np.ascontiguousarray(w2)))
        module[2].bias.copy_(torch.from_numpy(np.ascontiguousarray(b2).reshape(1)))
    return module


def mse(outputs, targets):
    """The benchmark's loss (the squared error of the prediction, averaged over a batch), for the trial."""
    return ((outputs[..., 0] - targets) ** 2).mean()


def trial_data(x: np.ndarray, y: np.ndarray, seed: int, t: int):
    """FIRE when needed's trial data: the ``RECENT`` most recent examples, shuffled by their own generator.

    ``TRIAL_BATCHES`` batches of ``TRIAL_BATCH`` and a probe of
    ``TRIAL_PROBE`` held out of them, as torch float64 ``(inputs, targets)``.
    """
    import torch

    if len(x) != RECENT:
        raise ValueError(f"the trial needs the {RECENT} most recent examples, got {len(x)}")
    order = np.random.default_rng([seed, 5, t]).permutation(RECENT)
    xs, ys = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    n = TRIAL_BATCHES * TRIAL_BATCH
    batches = [(xs[j : j + TRIAL_BATCH], ys[j : j + TRIAL_BATCH]) for j in range(0, n, TRIAL_BATCH)]
    return batches, (xs[n:], ys[n:])


def needed_trial(w1, w2, b2, x, y, seed: int, t: int, fire_steps: int):
    """``Moment.lookahead`` for one learner: ``fire_core.torch.trial`` on its recent examples, FIRE as the FIRE row's."""
    import fire_core.torch

    batches, probe = trial_data(x, y, seed, t)
    return fire_core.torch.trial(learner_module(w1, w2, b2), batches, probe, loss=mse, lr=1e-3, steps=fire_steps,
                                 report=False)


def snp_params(method: str, cfg: dict) -> tuple[float, float]:
    if method == "S&P":
        return tuple(cfg["snp"])
    lam, sigma = method[len("S&P[") : -1].split(",")  # a sweep row, "S&P[lam,sigma]"
    return float(lam), float(sigma)


# --- one group of seeds, every method, one process ---------------------------------------------------


def run_seed(seeds, cfg: dict) -> list[dict]:
    """Every method on each of ``seeds`` (trained together); one dict of plain numbers per seed."""
    seeds, methods = list(seeds), list(cfg["methods"])
    S, K = len(seeds), len(methods)
    m, f, T, h = cfg["m"], cfg["f"], cfg["period"], cfg["hidden"]
    n_in, lr, examples, every = m + 1, cfg["step_size"], cfg["examples"], cfg["every"] * cfg["period"]
    chunk = math.gcd(T, 1000)
    streams = [Stream(s, m, f, T, cfg["target_hidden"], cfg["beta"]) for s in seeds]
    probes = [probe_inputs(s, m, PROBE) for s in seeds]
    redraw = [[np.random.default_rng([s, 2, k]) for k in range(K)] for s in seeds]
    w1 = np.empty((S, K, h, n_in))
    w2 = np.empty((S, K, 1, h))
    b2 = np.zeros((S, K, 1, 1))
    for i, s in enumerate(seeds):  # the same initial learner for every method of a seed
        a1, a2, _ = init_weights(np.random.default_rng([s, 4]), (), h, n_in)
        w1[i], w2[i] = a1, a2

    def fresh(i, k):
        return init_weights(redraw[i][k], (), h, n_in)

    when = {(i, k): WhenNeeded(TRIGGERED[meth]) for i in range(S) for k, meth in enumerate(methods) if meth in TRIGGERED}
    needed = NEEDED in methods
    if needed:
        import torch

        torch.set_num_threads(1)
        if T < RECENT:
            raise ValueError(f"{NEEDED}'s trial reads the {RECENT} most recent examples: the period must be >= {RECENT}")
    recent = [(np.empty((0, n_in)), np.empty(0)) for _ in seeds]  # each seed's most recent RECENT examples
    trials = np.zeros((S, K), dtype=int)
    fire_s = np.zeros((S, K))
    check_s = np.zeros((S, K))
    fire_calls = np.zeros((S, K), dtype=int)
    fire_stacked(w1[:, 0].copy(), w2[:, 0].copy(), cfg["fire_steps"])  # warm-up: the first call imports and sets up

    n_bins = examples // cfg["bin"]
    sq_bins = np.zeros((n_bins, S, K))
    dfi_track = np.zeros((examples // T, S, K))
    dormant_track = np.zeros((examples // T, S, K))

    def hidden_acts(i, k, x):  # (probe, hidden) ReLU activations of learner (i, k)
        return np.maximum(x @ w1[i, k].T, 0.0)

    def boundary(t):
        """At a multiple of T (t examples trained on): diagnostics, trigger checks, periodic interventions."""
        if t < examples:
            row = t // T
            for k in range(K):
                dfi_track[row, :, k] = target_dfi(w1[:, k], "Roi")
                for i in range(S):
                    dormant_track[row, i, k] = float(dormant_ratio(hidden_acts(i, k, probes[i])))
        for (i, k), trig in when.items():
            started = time.perf_counter()
            if trig.kind == "DfI":
                reason = trig.check(t, weights=[("hidden", w1[i, k], "oi"), ("output", w2[i, k], "oi")])
            elif trig.kind == "when_needed":  # the initial network: step 0, no trial
                lookahead = None if t == 0 else needed_trial(w1[i, k], w2[i, k], b2[i, k], *recent[i], seeds[i], t,
                                                             cfg["fire_steps"])
                reason = trig.check(t, lookahead=lookahead)
                trials[i, k] += lookahead is not None
            else:
                reason = trig.check(t, features={"hidden": hidden_acts(i, k, probes[i])})
            check_s[i, k] += time.perf_counter() - started
            if reason:
                started = time.perf_counter()
                n1, n2 = fire_stacked(w1[i, k][None], w2[i, k][None], cfg["fire_steps"])
                w1[i, k], w2[i, k] = n1[0], n2[0]
                fire_s[i, k] += time.perf_counter() - started
                fire_calls[i, k] += 1
        if t == 0 or t % every or t >= examples:
            return
        for k, meth in enumerate(methods):
            if meth == "FIRE":
                started = time.perf_counter()
                n1, n2 = fire_stacked(w1[:, k], w2[:, k], cfg["fire_steps"])
                w1[:, k], w2[:, k] = n1, n2
                fire_s[:, k] += (time.perf_counter() - started) / S  # one stacked call for the S runs
                fire_calls[:, k] += 1
            elif meth == "reset":
                for i in range(S):
                    w1[i, k], w2[i, k], b2[i, k] = fresh(i, k)
            elif meth.startswith("S&P"):
                lam, sigma = snp_params(meth, cfg)
                for i in range(S):
                    e1, e2, _ = fresh(i, k)
                    w1[i, k] = lam * w1[i, k] + sigma * e1
                    w2[i, k] = lam * w2[i, k] + sigma * e2
                    b2[i, k] = lam * b2[i, k]

    # one learner alone, for scale: the per-example cost of the same step without the batch axis
    solo = init_weights(np.random.default_rng(0), (), h, n_in)
    xs1, ys1 = Stream(seeds[0], m, f, T, cfg["target_hidden"], cfg["beta"]).take(2000)
    started = time.perf_counter()
    for j in range(2000):
        sgd_step(*solo, xs1[j][:, None], xs1[j][None, :], ys1[j : j + 1, None], lr)
    solo_step_s = (time.perf_counter() - started) / 2000

    train_s = 0.0
    for t0 in range(0, examples, chunk):
        if t0 % T == 0:
            boundary(t0)
        xs, ys = zip(*(st.take(chunk) for st in streams))
        if needed:
            recent = [(np.concatenate([rx, x_])[-RECENT:], np.concatenate([ry, y_])[-RECENT:])
                      for (rx, ry), x_, y_ in zip(recent, xs, ys)]
        x = np.stack(xs, axis=1)[:, :, None, :, None]  # (chunk, S, 1, inputs, 1): one input per seed
        xt = x.swapaxes(-1, -2)
        y = np.stack(ys, axis=1)[:, :, None, None, None]
        err = np.empty((chunk, S, K))
        started = time.perf_counter()
        for j in range(chunk):
            err[j] = sgd_step(w1, w2, b2, x[j], xt[j], y[j], lr)[..., 0, 0]
        train_s += time.perf_counter() - started
        sq = err * err
        np.add.at(sq_bins, (t0 + np.arange(chunk)) // cfg["bin"], sq)
        if not np.all(np.isfinite(err)):
            raise FloatingPointError(f"seeds {seeds}: the online error is not finite at example {t0}")

    sq_bins /= cfg["bin"]
    last_bins = max(1, round(LAST * n_bins))
    out = []
    for i, s in enumerate(seeds):
        row = {"seed": s, "train_s": train_s, "learners": S * K, "solo_step_s": solo_step_s}
        for k, meth in enumerate(methods):
            curve = sq_bins[:, i, k]
            r = {
                "bins": curve.tolist(),
                "whole": float(curve.mean()),
                "last": float(curve[-last_bins:].mean()),
                "second_tenth": float(curve[last_bins : 2 * last_bins].mean()),
                "dfi_hidden": dfi_track[:, i, k].tolist(),
                "dormant": dormant_track[:, i, k].tolist(),
                "fire_s": float(fire_s[i, k]),
                "fire_calls": int(fire_calls[i, k]),
                # FIRE's time for this learner over its share of the vectorized training
                "fire_fraction": fire_fraction(fire_s[i, k], train_s / (S * K)),
            }
            if (i, k) in when:
                r["fired_at"] = list(when[i, k].fired_at)
                r["values"] = list(when[i, k].values)
                r["check_s"] = float(check_s[i, k])
                if meth == NEEDED:
                    r["trials"] = int(trials[i, k])
                    r["losses"] = list(when[i, k].losses)
            row[meth] = r
        out.append(row)
    return out


# --- aggregation and output -----------------------------------------------------------------------


def fmt_g(values, digits=3) -> str:
    m, s = mean_se(values)
    return f"{m:.{digits}g} ± {s:.2g}"


def firing_summary(runs: list[dict], method: str, cfg: dict) -> str:
    fired = [r[method]["fired_at"] for r in runs]
    counts = [len(x) for x in fired]
    if not any(counts):
        return f"never (0 of {len(runs)} runs)"
    first = [x[0] for x in fired if x]
    return (
        f"{np.mean(counts):.1f} times per run ({sum(c > 0 for c in counts)} of {len(runs)} runs fired); "
        f"first at {np.median(first) / 1000:.0f}k examples (median)"
    )


def table(runs: list[dict], cfg: dict) -> list[str]:
    methods = cfg["methods"]
    col = lambda meth, key: [r[meth][key] for r in runs]  # noqa: E731
    lines = [
        f"| method | error, last {LAST:.0%} of the stream | paired diff. to none | error, whole stream "
        "| paired diff. to none | FIRE calls per run | FIRE time / training time | when FIRE fired |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for meth in methods:
        d_last = [r[meth]["last"] - r["none"]["last"] for r in runs]
        d_whole = [r[meth]["whole"] - r["none"]["whole"] for r in runs]
        calls = np.mean(col(meth, "fire_calls"))
        uses_fire = meth.startswith("FIRE")
        frac = np.mean(col(meth, "fire_fraction"))
        when = (
            firing_summary(runs, meth, cfg) if meth in TRIGGERED
            else f"every {cfg['every']} flips" if meth in PERIODIC else "—"
        )
        lines.append(
            f"| {meth} | {fmt_g(col(meth, 'last'))} | {'—' if meth == 'none' else fmt_g(d_last, 2)} "
            f"| {fmt_g(col(meth, 'whole'))} | {'—' if meth == 'none' else fmt_g(d_whole, 2)} "
            f"| {f'{calls:.1f}' if uses_fire else '—'} | {f'{100 * frac:.3f}%' if uses_fire else '—'} | {when} |"
        )
    return lines


def verdicts(runs: list[dict], cfg: dict) -> list[str]:
    """Sentences computed from the numbers: does backprop lose plasticity here, and which method wins."""
    rise = [r["none"]["last"] - r["none"]["second_tenth"] for r in runs]
    m, s = mean_se(rise)
    base = mean_se([r["none"]["second_tenth"] for r in runs])[0]
    if m > 2 * s:
        lop = (f"**Loss of plasticity appears at this length**: backprop's error over the last {LAST:.0%} is "
               f"{m:.3g} ± {s:.2g} higher than over the second {LAST:.0%} (from {base:.3g}; paired over "
               f"{len(runs)} seeds).")
    elif m < -2 * s:
        lop = (f"**No loss of plasticity at this length**: backprop's error over the last {LAST:.0%} is "
               f"{-m:.3g} ± {s:.2g} *lower* than over the second {LAST:.0%} (from {base:.3g}).")
    else:
        lop = (f"**No clear loss of plasticity at this length**: backprop's error over the last {LAST:.0%} "
               f"differs from the second {LAST:.0%} by {m:.3g} ± {s:.2g} (from {base:.3g}), within 2 s.e.")
    methods = cfg["methods"]
    best = min(methods, key=lambda meth: np.mean([r[meth]["last"] for r in runs]))
    others = []
    for meth in methods:
        if meth == best:
            continue
        dm, ds = mean_se([r[meth]["last"] - r[best]["last"] for r in runs])
        others.append(f"{meth} +{dm:.3g} ± {ds:.2g}" + ("" if dm > 2 * ds else " (not significant)"))
    win = (f"Lowest error over the last {LAST:.0%}: **{best}**; the others, paired per seed, are above it by: "
           + "; ".join(others) + ".")
    return [lop, "", win]


def needed_section(runs: list[dict], cfg: dict) -> list[str]:
    """The section every benchmark gives ``fire_core.schedule.when_needed()``: goals against none and FIRE."""
    row = lambda meth, key: [r[meth][key] for r in runs]  # noqa: E731
    counts = [len(r[NEEDED]["fired_at"]) for r in runs]
    ratios = np.array([v for r in runs for v in r[NEEDED]["values"][1:]])
    fired_ratios = np.array([r[NEEDED]["values"][1 + j] for r in runs for j, t in enumerate(range(cfg["period"],
                             cfg["examples"], cfg["period"])) if t in r[NEEDED]["fired_at"]])
    per_check = [r[NEEDED]["check_s"] / r[NEEDED]["trials"] for r in runs]
    vectorized = [r[NEEDED]["check_s"] / (r["train_s"] / r["learners"]) for r in runs]
    alone = [r[NEEDED]["check_s"] / (r["solo_step_s"] * cfg["examples"]) for r in runs]
    lines = [
        "### FIRE when needed (`fire_core.schedule.when_needed()`)", "",
        "The library's rule as it ships (`common.WhenNeeded(\"when_needed\")`: a trial, FIRE fires when the probe "
        "loss of a FIRE copy over that of an untouched copy, each trained 200 Adam steps at lr 1e-3, is below "
        "0.526), checked where FIRE@DfI checks: on the initial network (step 0: no trial, never fires) and then "
        f"at every flip ({runs[0][NEEDED]['trials']} trials a run). The trial (`fire_core.torch.trial` on the "
        "learner as a float64 torch module, FIRE as the FIRE row's: "
        f"{cfg['fire_steps']} Newton–Schulz steps on both weights, the output bias left alone; loss: the mean "
        f"squared error) trains on {TRIAL_BATCHES} batches of {TRIAL_BATCH} and reads its probe loss on "
        f"{TRIAL_PROBE} other examples: the run's {RECENT} most recent examples (all from the period that just "
        "ended: at a flip no example of the new bits has been seen yet), split by their own generator. When it "
        "fires, the same FIRE as the FIRE row is applied to that run. The threshold was chosen on a "
        "cross-entropy classification task (the digits MLP, FIRE at 10 steps, 4 batches of 64 and a probe of 256) "
        "and is applied unchanged to this regression.", "",
        *NEEDED_TABLE,
    ]
    if "FIRE" in cfg["methods"]:
        def cells(key):
            none, fire, need = row("none", key), row("FIRE", key), row(NEEDED, key)
            diff = lambda a, b: fmt_g([x - y for x, y in zip(a, b)], 2)  # noqa: E731
            return (diff(fire, none), diff(need, none), diff(need, fire),
                    goals_cell(goals(none, fire, need, higher_is_better=False)))
        fire_none, need_none, need_fire, cell = cells("last")
        lines.append(
            f"| {cfg['m'] + 1}-{cfg['hidden']}-1 ReLU, SGD {cfg['step_size']:g}, a flip every {cfg['period']:,} "
            f"examples | squared error over the last {LAST:.0%} of the stream (lower is better; FIRE = every "
            f"{cfg['every']} flips) | {fire_none} | {need_none} | {need_fire} | {np.mean(counts):.1f} firings a seed "
            f"({sum(c > 0 for c in counts)}/{len(runs)} seeds fired) | {np.mean(per_check):.3f} s "
            f"({100 * np.mean(vectorized):.0f}% of the learner's share of the vectorized training; "
            f"{100 * np.mean(alone):.0f}% of one learner trained alone) | {cell} |")
        whole = cells("whole")
        extra = (f"Over the whole stream (the other column of the main table): FIRE − none {whole[0]}, when needed − "
                 f"none {whole[1]}, when needed − FIRE {whole[2]}; {whole[3]}.")
    else:
        lines.append("| (FIRE not run: no differences) | | | | | | | |")
        extra = ""
    lines += [
        "",
        f"Differences: mean ± s.e. over {len(runs)} paired seeds, in squared error (negative: lower error than the "
        "second method). Goals (`common.goals`, paired 95% t intervals): *gain kept* is at stake only where FIRE "
        "beats none significantly; *never cost*: FIRE when needed not significantly worse than none. " + extra,
        "",
        f"Trial cost: the wall time of a check (both trial copies, 2 x 200 Adam steps), mean over the "
        f"{runs[0][NEEDED]['trials']} checks of a run, and all of a run's checks as a share of (a) the learner's "
        "share of the vectorized SGD loop (how this benchmark trains: many learners stacked in numpy) and (b) the "
        "same stream on one learner trained alone (one numpy step per example, measured).",
        "",
        f"Trial ratio (probe loss with FIRE / without), over all {ratios.size} checks: median "
        f"{np.median(ratios):.3f}, range {ratios.min():.3f}–{ratios.max():.3f}; per run, the median ranges "
        f"{min(np.median(r[NEEDED]['values'][1:]) for r in runs):.3f}–"
        f"{max(np.median(r[NEEDED]['values'][1:]) for r in runs):.3f}; {np.mean(ratios < 0.526):.1%} of the checks "
        f"were below 0.526"
        + (f" (the ratios that fired: median {np.median(fired_ratios):.3f})." if fired_ratios.size else "."),
    ]
    return lines + [""]


def plot(results: dict, cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, methods = results["runs"], cfg["methods"]
    colors = dict(zip(methods, plt.get_cmap("tab10").colors))
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    x = (np.arange(cfg["examples"] // cfg["bin"]) + 0.5) * cfg["bin"]
    for meth in methods:
        c = np.array([r[meth]["bins"] for r in runs])
        mu = c.mean(0)
        se = c.std(0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else 0 * mu
        style = "-" if meth.startswith("FIRE") else "--"
        ax.plot(x, mu, style, color=colors[meth], label=meth)
        ax.fill_between(x, mu - se, mu + se, color=colors[meth], alpha=0.2)
    ax.set_xlabel("examples")
    ax.set_ylabel(f"squared error (mean over bins of {cfg['bin']:,})")
    ax.set_title(f"Slowly-changing regression: online error (mean ± s.e., {len(runs)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    xt = np.arange(len(runs[0]["none"]["dfi_hidden"])) * cfg["period"]
    for meth in methods:
        d = np.array([r[meth]["dfi_hidden"] for r in runs]).mean(0)
        dx.plot(xt, d, "-" if meth.startswith("FIRE") else "--", color=colors[meth], label=meth)
        for meth_t, kind in TRIGGERED.items():
            if meth == meth_t:
                fired = [t for r in runs for t in r[meth]["fired_at"]]
                dx.plot(fired, np.interp(fired, xt, d), "|", color=colors[meth], ms=10)
    dx.set_yscale("log")
    dx.set_xlabel("examples")
    dx.set_ylabel("hidden weight DfI/n (target_dfi)")
    dx.set_title("distance from FIRE's target (| = a trigger fired)")
    dx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(results: dict, cfg: dict, path: Path, png: Path, seconds: float) -> None:
    runs = results["runs"]
    lam, sigma = cfg["snp"]
    lines = [
        "# Bit-flipping (slowly-changing regression) benchmark",
        "",
        f"`{cfg['command']}` — {len(runs)} seeds ({runs[0]['seed']}–{runs[-1]['seed']}), m = {cfg['m']} bits "
        f"(+1 constant), f = {cfg['f']} flipping bits, one flip every T = {cfg['period']:,} examples, "
        f"{cfg['examples']:,} examples; target: {cfg['target_hidden']} LTUs (beta {cfg['beta']}), weights ±1; "
        f"learner {cfg['m'] + 1}-{cfg['hidden']}-1 ReLU, online SGD step {cfg['step_size']}; reset / S&P / FIRE "
        f"every {cfg['every']} flips; FIRE {cfg['fire_steps']} Newton–Schulz steps (`fire_core.reinit`, layout "
        f"`Roi`); S&P lambda {lam:g}, sigma {sigma:g}. Wall time {seconds / 60:.1f} min with {cfg['jobs']} worker "
        f"process(es) on a {os.cpu_count()}-core {platform.machine()} CPU ({platform.platform()}), numpy "
        f"{np.__version__}, python {platform.python_version()}"
        + (f", torch {cfg['torch']}" if cfg.get("torch") else "") + ".",
        "",
        "Problem: Dohare, Sutton, Mahmood 2021 (arXiv:2108.06325, the Bit-Flipping problem) and Dohare et al., "
        "Nature 632 (2024), Extended Data Fig. 2 (Slowly-Changing Regression); numbers from the authors' "
        "configuration (see the script's docstring for what was chosen here). Errors are the online squared "
        "error of the prediction before each update; mean ± standard error over seeds; *paired diff.* is the "
        "per-seed difference to `none` (same target, stream and initial weights). *FIRE time / training time* "
        "(`common.fire_fraction`, mean over runs): a learner's wall time inside `fire_core.reinit` over the "
        "whole stream (its even share of a call that projects several runs stacked) divided by its share of "
        "the vectorized SGD loop (the loop's wall time over the learners it trains together); the trigger "
        "checks' own cost is listed below the table.",
        "",
    ]
    if cfg["quick"]:
        lines += ["**Quick mode: too few seeds and examples for the numbers to mean anything.**", ""]
    lines += table(runs, cfg) + [""] + verdicts(runs, cfg) + [""]
    lines += [
        "### What the network looked like (mean over seeds)",
        "",
        "| method | hidden DfI/n at start → before the last check | dormant share (probe) at start → end |",
        "|---|---|---|",
    ]
    for meth in cfg["methods"]:
        d0, d1 = (np.mean([r[meth]["dfi_hidden"][j] for r in runs]) for j in (0, -1))
        z0, z1 = (np.mean([r[meth]["dormant"][j] for r in runs]) for j in (0, -1))
        lines.append(f"| {meth} | {d0:.3g} → {d1:.3g} | {100 * z0:.0f}% → {100 * z1:.0f}% |")
    lines += [""]
    for meth in TRIGGERED:
        if meth not in cfg["methods"] or meth == NEEDED:
            continue
        vals = np.array([r[meth]["values"] for r in runs])
        chk = np.mean([r[meth]["check_s"] for r in runs])
        lines.append(
            f"- {meth}: fired {firing_summary(runs, meth, cfg)}; checked {vals.shape[1]} times per run (the "
            f"initial network, then every flip); value at the first check {fmt_g(vals[:, 0])}, at the last "
            f"{fmt_g(vals[:, -1])}; checks took {1000 * chk:.0f} ms per run."
        )
    solo = np.mean([r["solo_step_s"] for r in runs])
    batched = np.mean([r["train_s"] / r["learners"] / cfg["examples"] for r in runs])
    per_call = [r[meth]["fire_s"] / r[meth]["fire_calls"] for r in runs for meth in cfg["methods"]
                if meth.startswith("FIRE") and r[meth]["fire_calls"]]
    if per_call:
        period = cfg["every"] * cfg["period"]
        lines.append(
            f"- Scale: one SGD step costs {1e6 * batched:.2f} µs per learner in the vectorized loop "
            f"({1e6 * solo:.1f} µs for one learner trained alone); one FIRE of a learner took "
            f"{1e3 * np.mean(per_call):.2f} ms on average (its share of a stacked call), "
            f"{100 * np.mean(per_call) / (solo * period):.3f}% of {period:,} examples of a learner trained alone."
        )
    if NEEDED in cfg["methods"]:
        lines += [""] + needed_section(runs, cfg)
    if "snp_sweep" in results:
        lines += [
            "",
            "### S&P coefficients",
            "",
            f"(lambda, sigma) chosen as the lowest whole-stream error on held-out seeds {list(SNP_SEEDS)} "
            "(S&P only, same stream length).",
            "",
            "| lambda | sigma | whole-stream error | last-10% error |",
            "|---|---|---|---|",
        ]
        for key, v in results["snp_sweep"].items():
            lines.append(f"| {key.split(',')[0]} | {key.split(',')[1]} | {fmt_g(v['whole'])} | {fmt_g(v['last'])} |")
    lines += ["", f"![bitflip]({png.name})", ""]
    path.write_text("\n".join(lines))


def _groups(seeds: list[int], parts: int) -> list[tuple[int, ...]]:
    parts = max(1, min(parts, len(seeds)))
    return [tuple(int(s) for s in g) for g in np.array_split(np.array(seeds), parts) if len(g)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, a short stream with fast flips: a smoke test in seconds")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 30; quick 2)")
    p.add_argument("--examples", type=int, default=None, help="stream length (default 1,000,000; quick 30,000)")
    p.add_argument("--period", type=int, default=None, help="examples between flips, T (default 10,000; quick 1,000)")
    p.add_argument("--bin", type=int, default=None, help="examples per error bin (default 20,000; quick 2,000)")
    p.add_argument("--every", type=int, default=10, help="flips between periodic interventions (reset, S&P, FIRE)")
    p.add_argument("--fire-steps", type=int, default=10, help="Newton-Schulz steps of FIRE")
    p.add_argument("--step-size", type=float, default=0.01)
    p.add_argument("--hidden", type=int, default=5, help="learner's hidden ReLU units")
    p.add_argument("--snp", default=None, help="S&P 'lambda,sigma' (default: the best of SNP_GRID on held-out seeds)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS} (none is required)")
    add_run_options(p)
    a = p.parse_args(argv)
    if a.replot is not None:
        cfg, results, seconds = load_run(a.replot)
        return write_outputs(a.replot.with_suffix(""), results, cfg, seconds, plot, write_markdown)
    methods = names(p, "methods", a.methods, METHODS)
    if "none" not in methods:
        p.error(f"the methods must include none (the baseline of every difference); got {methods}")
    q = a.quick
    cfg = dict(
        quick=q, seeds=a.seeds or (2 if q else 30), examples=a.examples or (30_000 if q else 1_000_000),
        period=a.period or (1_000 if q else 10_000), bin=a.bin or (2_000 if q else 20_000), every=a.every,
        fire_steps=a.fire_steps, step_size=a.step_size, hidden=a.hidden, m=20, f=15, target_hidden=100, beta=0.7,
        methods=methods, jobs=max(1, a.jobs), snp=list(SNP_DEFAULT),
        command=command_line(__file__, argv),
    )
    try:
        cfg["torch"] = metadata.version("torch")  # recorded for the header; this benchmark runs on numpy
    except metadata.PackageNotFoundError:
        pass
    if cfg["examples"] % cfg["period"] or cfg["examples"] % cfg["bin"]:
        p.error("--examples must be a multiple of --period and of --bin")
    if NEEDED in methods and cfg["period"] < RECENT:
        p.error(f"{NEEDED}'s trial reads the {RECENT} most recent examples at a flip: --period must be >= {RECENT}")
    results: dict = {}
    started = time.perf_counter()
    with seed_runner(run_seed, cfg["jobs"]) as run_all:
        if a.snp is not None:
            cfg["snp"] = [float(v) for v in a.snp.split(",")]
        elif "S&P" in methods and not q:
            grid = dict(cfg, methods=["none"] + [f"S&P[{lam:g},{sigma:g}]" for lam, sigma in SNP_GRID])
            done = [row for part in run_all([(g, grid) for g in _groups(list(SNP_SEEDS), cfg["jobs"])]) for row in part]
            sweep = {
                f"{lam:g},{sigma:g}": {
                    key: [row[f"S&P[{lam:g},{sigma:g}]"][key] for row in done] for key in ("whole", "last")
                }
                for lam, sigma in SNP_GRID
            }
            results["snp_sweep"] = sweep
            best = min(sweep, key=lambda k: np.mean(sweep[k]["whole"]))
            cfg["snp"] = [float(v) for v in best.split(",")]
        parts = run_all([(g, cfg) for g in _groups(list(range(cfg["seeds"])), cfg["jobs"])])
    results["runs"] = [row for part in parts for row in part]
    seconds = time.perf_counter() - started
    stem = a.out / ("bitflip-quick" if q else "bitflip")
    save_run(stem, cfg, results, seconds)
    return write_outputs(stem, results, cfg, seconds, plot, write_markdown)


if __name__ == "__main__":
    sys.exit(main())
