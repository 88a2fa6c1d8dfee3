"""Permuted-labels benchmark: a sequence of digits tasks where nothing is lost, the held-out test of "when needed".

Issue 25's held-out evaluation: a family of networks no threshold was chosen
on (``common.DFI_RATIO``, ``common.DORMANT_SHARE`` and ``when_needed()``'s
0.526 were all chosen on the digits MLP warm start), trained through a
sequence of tasks in which plasticity is not lost: the weights grow in
ordinary learning, and FIRE, by resetting them, can only cost.

The tasks (scikit-learn's digits, the data split, batch size 64, Adam and
training loop of :mod:`fire_core.demo`; nothing downloaded): task 0 is the
true labels of the 1347 training images; task ``k`` (1..T-1) maps every label
through a random permutation of the 10 classes (``torch.randperm`` from a
generator seeded with ``500 + seed``, as ``when_needed_study.py``'s
``cnn-perm``: tasks 1 and 2 are the study's). Each task trains ``--epochs``
epochs with a *fresh* Adam (lr 1e-3, the demo's), its batch order drawn from
``1000 * seed + task``; at its end the test accuracy on that task (the 450
test images, labels mapped by the same permutation, eval mode) is recorded.
Networks (each seed builds it from the seed):

* ``cnn``: the plain CNN of ``stability.py`` (``make_cnn(seed, bn=False)``: two
  3x3 convs, max-pool, two linears, ReLU, no normalization);
* ``transformer``: the pre-LN transformer classifier of ``stability.py``
  (``make_model("transformer", seed)``: the 8 image rows as tokens, 2 encoder
  layers);
* ``mlp``: the 64-128-128-10 ReLU MLP of ``plasticity.py`` (the network the
  thresholds were chosen on, here in a setting none was chosen on).

Methods, each a separate run of the same seed from the same initial network
and the same batches (paired); at each task boundary (before tasks 1..T-1):

* ``none``: nothing (the next task starts from where the last one ended);
* ``FIRE``: ``fire_core.torch.apply(model, steps=--steps)`` (10, the vision
  reference) at every boundary;
* ``FIRE when needed`` (``common.NEEDED``): ``common.WhenNeeded("when_needed")``,
  that is ``fire_core.schedule.when_needed()`` as it ships (fires when the
  trial's probe-loss ratio is below 0.526), polled on the initial network
  (step 0: no trial, nothing fires) and then at each boundary with
  ``fire_core.torch.trial(model, batches, probe, steps=--steps)``: 4 batches
  of 64 and a probe of 256 other images of the NEW task's training data
  (its labels: the new permutation; no test data), drawn by a generator of
  their own (``torch.randperm`` seeded with ``10_000 + 100 * seed + task``);
  the trial's 2 x 200 Adam steps run on copies and leave the model, the
  torch RNG and so every other method's pairing untouched. When it fires,
  the same FIRE as ``FIRE``. Cost: one trial per boundary, reported as
  seconds per check and as a share of the run's training time;
* ``FIRE@DfI``: ``common.WhenNeeded("DfI")`` (``DfIAbove(100, relative=True,
  reduce="max")``), its baseline measured on the initial network, then
  checked at each boundary on the weights FIRE would project;
* ``FIRE@dormant``: ``common.WhenNeeded("dormant")``, the mean share of
  dormant units over the activation modules on the probe's 256 images (the
  initial network's on task 0's probe).

Measured per (network, method, seed): the test accuracy at the end of every
task; the primary number is its mean over tasks 1..T-1 (the tasks that come
after a boundary; higher is better), with the paired per-seed difference to
``none``; where each rule fired; the value it read at every check (trial
ratio and both probe losses, DfI, dormant share); the DfI ratio that
``FIRE@DfI`` would read on ``none``'s own trajectory (a shadow check that
acts on nothing); wall times of training, FIRE and the checks (one thread).

Issue 25 reported for the plain CNN: doing nothing reaches 0.963 new-task
accuracy; ``FIRE@DfI`` fired at 12 of 12 boundaries and cost 9.9 points
(0.864, the same as FIRE at every boundary). The .md sets this run's numbers
beside those.

    python benchmarks/permuted.py --jobs 2    # full run: 3 networks, 8 seeds, 7 tasks x 15 epochs (42 min on 2 cores shared with 4 other runs)
    python benchmarks/permuted.py --quick     # 2 seeds, 2 tasks x 1 epoch: under a minute, numbers not meaningful

Writes ``benchmarks/results/permuted.md``, ``permuted.png`` and the raw
per-seed numbers ``permuted.json`` (``--quick``: ``permuted-quick.*``);
``--replot permuted.json`` redraws the .md and .png from the latter.
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

import fire_core.torch
from fire_core.demo import BATCH, accuracy, digits, make_mlp, make_optimizer, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    NEEDED, NEEDED_TABLE, WhenNeeded, add_run_options, command_line, fmt, goals, goals_cell, load_run, mean_se,
    names, save_run, seed_runner, write_outputs,
)
from stability import make_cnn, make_model  # noqa: E402

ARCHS = ("cnn", "transformer", "mlp")
METHODS = ("none", "FIRE", NEEDED, "FIRE@DfI", "FIRE@dormant")
TRIGGERED = {NEEDED: "when_needed", "FIRE@DfI": "DfI", "FIRE@dormant": "dormant"}
DESCRIBE = {
    "cnn": "plain CNN (no normalization)",
    "transformer": "pre-LN transformer",
    "mlp": "MLP 64-128-128-10",
}
TRIAL_BATCHES = 4
PROBE = 256
# The issue's report for the plain CNN (doing nothing, FIRE@DfI and FIRE at every boundary), set beside this run's.
ISSUE = {"none": 96.3, "FIRE@DfI": 86.4, "fired": "12 of 12 boundaries", "cost": 9.9}


def build(arch: str, seed: int) -> torch.nn.Module:
    if arch == "cnn":
        return make_cnn(seed, bn=False)
    if arch == "mlp":
        return make_mlp(seed)
    return make_model(arch, seed)


def permutations(seed: int, tasks: int) -> list[torch.Tensor]:
    """The label map of each task: task 0 the identity (the true labels), task k a random permutation of 10."""
    gen = torch.Generator().manual_seed(500 + seed)
    return [torch.arange(10)] + [torch.randperm(10, generator=gen) for _ in range(tasks - 1)]


def trial_data(seed: int, task: int, x, y):
    """``TRIAL_BATCHES`` batches of 64 and a disjoint probe of ``PROBE`` from the new task's training data ``(x, y)``."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(10_000 + 100 * seed + task))
    n = TRIAL_BATCHES * BATCH
    batches = [(x[order[i : i + BATCH]], y[order[i : i + BATCH]]) for i in range(0, n, BATCH)]
    probe = order[n : n + PROBE]
    return batches, (x[probe], y[probe])


# --- one seed ------------------------------------------------------------------------------------


def run_method(arch: str, method: str, seed: int, cfg: dict, data, perms) -> dict:
    """One run of ``method`` through every task; plain numbers out."""
    x_train, y_train, x_test, y_test = data
    model = build(arch, seed)
    gate = WhenNeeded(TRIGGERED[method]) if method in TRIGGERED else None
    shadow = WhenNeeded("DfI") if method == "none" else None  # what FIRE@DfI would read doing nothing; never acts
    x_probe = trial_data(seed, 0, x_train, y_train)[1][0]
    for g in (gate, shadow):
        if g is not None:  # the initial network: the schedule's step 0 (DfI's baseline; nothing fires)
            g.check(0, weights=fire_core.torch.select(model), features=fire_core.torch.activations(model, x_probe))
    row = {"accs": [], "fired": [], "check_seconds": [], "fire_seconds": 0.0, "train_seconds": 0.0}
    for task, perm in enumerate(perms):
        y_task = perm[y_train]
        fire = task > 0 and method == "FIRE"
        if task > 0 and shadow is not None:
            shadow.check(task, weights=fire_core.torch.select(model))
        if task > 0 and gate is not None:
            started = time.perf_counter()
            if gate.kind == "when_needed":
                batches, probe = trial_data(seed, task, x_train, y_task)
                reason = gate.check(task, lookahead=fire_core.torch.trial(model, batches, probe, steps=cfg["steps"]))
            elif gate.kind == "DfI":
                reason = gate.check(task, weights=fire_core.torch.select(model))
            else:
                x_probe = trial_data(seed, task, x_train, y_task)[1][0]
                reason = gate.check(task, features=fire_core.torch.activations(model, x_probe))
            row["check_seconds"].append(time.perf_counter() - started)
            fire = reason is not None
        if fire:
            started = time.perf_counter()
            fire_core.torch.apply(model, steps=cfg["steps"])
            row["fire_seconds"] += time.perf_counter() - started
            row["fired"].append(task)
        started = time.perf_counter()
        train(model, make_optimizer(model), x_train, y_task, cfg["epochs"], seed=1000 * seed + task)
        row["train_seconds"] += time.perf_counter() - started
        model.eval()
        row["accs"].append(accuracy(model, x_test, perm[y_test]))
    if gate is not None:
        row["values"] = gate.values
        if gate.kind == "when_needed":
            row["losses"] = gate.losses
    if shadow is not None:
        row["dfi_values"] = shadow.values
    return row


def run_seed(arch: str, seed: int, cfg: dict) -> dict:
    """Every method of one network and seed; plain numbers out."""
    torch.set_num_threads(1)
    data = digits()
    perms = permutations(seed, cfg["tasks"])
    out = {"seed": seed, "perms": [p.tolist() for p in perms]}
    for method in cfg["methods"]:
        out[method] = run_method(arch, method, seed, cfg, data, perms)
    return out


# --- aggregation and output ----------------------------------------------------------------------


def score(row: dict) -> float:
    """The primary number of a run: mean test accuracy at the end of tasks 1..T-1, in %."""
    return 100 * float(np.mean(row["accs"][1:]))


def ratios(runs: list[dict], method: str = NEEDED) -> list[float]:
    """Every trial ratio read at a boundary (the initial network's check measures nothing)."""
    return [v for r in runs for v in r[method]["values"][1:] if not math.isnan(v)]


def span(values) -> str:
    if not values:
        return "—"
    return f"median {np.median(values):.3g} (range {min(values):.3g}–{max(values):.3g})"


def fired_cell(runs: list[dict], method: str, boundaries: int) -> str:
    fired = [len(r[method]["fired"]) for r in runs]
    n = len(runs)
    return (f"{sum(fired)}/{boundaries * n} boundaries: {np.mean(fired):.2g} firings a seed "
            f"({sum(f > 0 for f in fired)}/{n} seeds fired)")


def trial_cost(runs: list[dict]) -> tuple[float, float]:
    """Seconds per check (mean) and all checks' time as a % of the run's training time (mean over seeds)."""
    per = [s for r in runs for s in r[NEEDED]["check_seconds"]]
    share = [100 * sum(r[NEEDED]["check_seconds"]) / r[NEEDED]["train_seconds"] for r in runs]
    return float(np.mean(per)), float(np.mean(share))


def dfi_ratios(runs: list[dict], key: str, method: str) -> list[list[float]]:
    """Per boundary: the DfI ratio (worst layer's DfI/n over the initial network's) of every seed."""
    per = []
    for r in runs:
        v = r[method][key]
        per.append([x / v[0] for x in v[1:]])
    return [list(col) for col in zip(*per)]


def when_needed_section(results: dict, cfg: dict) -> list[str]:
    methods = cfg["methods"]
    if not all(m in methods for m in ("none", "FIRE", NEEDED)):
        return []
    b = cfg["tasks"] - 1
    lines = [
        "## FIRE when needed (`fire_core.schedule.when_needed()`)",
        "",
        f"Paired per-seed differences of the primary metric, mean ± standard error over {cfg['seeds']} seeds, in "
        "percentage points (pts). The rule is polled on the initial network and at each of the "
        f"{b} boundaries with `fire_core.torch.trial` on {TRIAL_BATCHES} batches of {BATCH} and a probe of {PROBE} "
        f"of the new task's training images (lr 1e-3, FIRE `steps={cfg['steps']}`, cross-entropy), threshold "
        "0.526 unchanged. *Goals* (`common.goals`, 95% t intervals): gain kept = the rule keeps >= 80% of FIRE's "
        "gain where FIRE gains significantly (n/a where it does not); never cost = the rule is not significantly "
        "worse than none. Trial cost: the mean seconds of one check (one thread, a loaded 2-core machine) and all "
        "checks' time as a % of the run's training time.",
        "",
        *NEEDED_TABLE,
    ]
    for arch, runs in results.items():
        none, fire, needed = ([score(r[m]) for r in runs] for m in ("none", "FIRE", NEEDED))
        g = goals(none, fire, needed, higher_is_better=True)
        cell = lambda d: f"{d['mean']:+.2f} ± {d['se']:.2f}"  # noqa: E731
        sec, share = trial_cost(runs)
        lines.append(
            f"| {arch}: {DESCRIBE[arch]}, {cfg['tasks']} label-permuted digits tasks x {cfg['epochs']} epoch(s) "
            f"| mean new-task test acc. over tasks 1–{cfg['tasks'] - 1} (pts, higher is better) "
            f"| {cell(g['fire_minus_none'])} | {cell(g['needed_minus_none'])} | {cell(g['needed_minus_fire'])} "
            f"| {fired_cell(runs, NEEDED, b)} | {sec:.2f} s, {share:.1f}% of training | {goals_cell(g)} |"
        )
    lines += ["", "Trial ratio (probe loss with FIRE / without, after 200 steps; fires below 0.526), over every "
              "boundary check of every seed:", ""]
    for arch, runs in results.items():
        r = ratios(runs)
        below = sum(v < 0.526 for v in r)
        lines.append(f"* {arch}: {span(r)}; {below} of {len(r)} below 0.526.")
    return lines + [""]


def method_table(arch: str, runs: list[dict], cfg: dict) -> list[str]:
    methods = cfg["methods"]
    b = cfg["tasks"] - 1
    lines = [
        f"### {arch}: {DESCRIBE[arch]}",
        "",
        f"Task 0 (true labels, no boundary before it): {fmt([100 * r['none']['accs'][0] for r in runs])}% for every "
        "method (nothing differs before the first boundary).",
        "",
        f"| method | mean new-task acc. over tasks 1–{b} (%) | paired diff. to none (pts) | last task's acc. (%) "
        "| fired | FIRE's time (ms a firing) |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = [score(r[m]) for r in runs]
        diff = [score(r[m]) - score(r["none"]) for r in runs] if "none" in methods else None
        last = [100 * r[m]["accs"][-1] for r in runs]
        n_fired = sum(len(r[m]["fired"]) for r in runs)
        ms = 1e3 * sum(r[m]["fire_seconds"] for r in runs) / n_fired if n_fired else float("nan")
        lines.append(
            f"| {m} | {fmt(s, 1, 2)} | {'—' if m == 'none' or diff is None else fmt(diff, 1, 2)} | {fmt(last)} "
            f"| {'—' if m == 'none' else fired_cell(runs, m, b)} | {'—' if not n_fired else f'{ms:.1f}'} |"
        )
    lines += ["", "Seeds fired at each boundary (boundary k: before task k):", "",
              "| method | " + " | ".join(str(k) for k in range(1, b + 1)) + " |", "|---" * (b + 1) + "|"]
    for m in methods:
        if m == "none":
            continue
        lines.append(f"| {m} | " + " | ".join(f"{sum(k in r[m]['fired'] for r in runs)}/{len(runs)}"
                                              for k in range(1, b + 1)) + " |")
    lines += ["", "Value each rule read at each boundary, median (range) over seeds:", "",
              "| what | " + " | ".join(str(k) for k in range(1, b + 1)) + " |", "|---" * (b + 1) + "|"]
    per_boundary = lambda m: [list(c) for c in zip(*[r[m]["values"][1:] for r in runs])]  # noqa: E731
    cells = lambda cols, f=lambda v: v: " | ".join(  # noqa: E731
        f"{np.median([f(v) for v in c]):.3g} ({min(f(v) for v in c):.3g}–{max(f(v) for v in c):.3g})" for c in cols)
    if NEEDED in methods:
        lines.append(f"| {NEEDED}: trial ratio (fires below 0.526) | {cells(per_boundary(NEEDED))} |")
    if "FIRE@DfI" in methods:
        lines.append(f"| FIRE@DfI: DfI ratio to the initial network (fires above 100) "
                     f"| {cells(dfi_ratios(runs, 'values', 'FIRE@DfI'))} |")
    if "none" in methods:
        lines.append(f"| none (shadow, acts on nothing): DfI ratio FIRE@DfI would read | "
                     f"{cells(dfi_ratios(runs, 'dfi_values', 'none'))} |")
    if "FIRE@dormant" in methods:
        lines.append(f"| FIRE@dormant: dormant share (fires above 0.3) | {cells(per_boundary('FIRE@dormant'))} |")
    if NEEDED in methods:
        loss = lambda k: [list(c) for c in zip(*[[x[k] for x in r[NEEDED]["losses"][1:]] for r in runs])]  # noqa: E731
        lines.append(f"| {NEEDED}: trial probe loss without FIRE | {cells(loss(0))} |")
        lines.append(f"| {NEEDED}: trial probe loss with FIRE | {cells(loss(1))} |")
        sec, share = trial_cost(runs)
        train_s = np.mean([r[NEEDED]["train_seconds"] for r in runs])
        lines += ["", f"Trial cost: {sec:.2f} s per check (mean), {share:.1f}% of the run's training time "
                      f"({train_s:.0f} s for {cfg['tasks']} tasks x {cfg['epochs']} epoch(s), one thread)."]
    return lines + [""]


def issue_lines(results: dict, cfg: dict) -> list[str]:
    if "cnn" not in results or not all(m in cfg["methods"] for m in ("none", "FIRE", "FIRE@DfI")):
        return []
    runs = results["cnn"]
    b = cfg["tasks"] - 1
    none, dfi, fire = ([score(r[m]) for r in runs] for m in ("none", "FIRE@DfI", "FIRE"))
    fired = sum(len(r["FIRE@DfI"]["fired"]) for r in runs)
    return [
        "## The issue's report, beside this run (plain CNN)",
        "",
        "| | issue 25 | this run |",
        "|---|---|---|",
        f"| none: new-task accuracy (%) | {ISSUE['none']} | {mean_se(none)[0]:.1f} |",
        f"| FIRE@DfI: boundaries fired | {ISSUE['fired']} | {fired} of {b * len(runs)} |",
        f"| FIRE@DfI: accuracy (%) | {ISSUE['FIRE@DfI']} | {mean_se(dfi)[0]:.1f} |",
        f"| FIRE@DfI − none (pts) | −{ISSUE['cost']} | {fmt(np.subtract(dfi, none), 1, 2)} |",
        f"| FIRE at every boundary: accuracy (%) | {ISSUE['FIRE@DfI']} (\"the same as FIRE\") | {mean_se(fire)[0]:.1f} |",
        "",
        "The issue does not state its number of tasks, epochs or seeds; here: "
        f"{cfg['tasks']} tasks x {cfg['epochs']} epoch(s), {cfg['seeds']} seeds, accuracy = mean over tasks 1–{b} "
        "of the new task's test accuracy at the end of the task.",
        "",
    ]


def write_markdown(results: dict, cfg: dict, path: Path, png: Path, seconds: float) -> None:
    lines = [
        "# Permuted-labels benchmark: FIRE where nothing is lost (held-out networks for issue 25)",
        "",
        f"`{cfg['command']}` — {cfg['seeds']} seeds per network; {cfg['tasks']} tasks on scikit-learn digits "
        f"(task 0 the true labels, task k the labels through a random permutation of the 10 classes), "
        f"{cfg['epochs']} epoch(s) a task with a fresh Adam (lr 1e-3, batch 64); test set of 450 images. FIRE "
        f"`fire_core.torch.apply(model, steps={cfg['steps']})` at every boundary (`FIRE`) or where a rule says so. "
        f"Wall time {seconds / 60:.1f} min with {cfg['jobs']} worker process(es) on a {os.cpu_count()}-core "
        f"{platform.machine()} CPU (shared, loaded), torch {torch.__version__}. Produced by "
        "`benchmarks/permuted.py` (its docstring defines every method and row).",
        "",
        "Primary metric: the test accuracy on each new task at the end of that task, averaged over tasks "
        f"1–{cfg['tasks'] - 1} (every task that follows a boundary); higher is better. *Paired diff.*: per-seed "
        "difference to `none` (same initial network, labels and batches). Mean ± standard error over seeds.",
        "",
    ]
    if cfg["quick"]:
        lines += ["**Quick mode: too few seeds, tasks and epochs for the numbers to mean anything.**", ""]
    lines += when_needed_section(results, cfg)
    lines += ["## Every method", ""]
    for arch, runs in results.items():
        lines += method_table(arch, runs, cfg)
    lines += issue_lines(results, cfg)
    lines += [f"![permuted]({png.name})", ""]
    path.write_text("\n".join(lines))


def plot(results: dict, cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(results)
    fig, axes = plt.subplots(2, len(archs), figsize=(4.8 * len(archs), 8), squeeze=False)
    colors = dict(zip(cfg["methods"], plt.get_cmap("tab10").colors))
    tasks = np.arange(cfg["tasks"])
    for col, arch in enumerate(archs):
        runs = results[arch]
        ax, tr = axes[0, col], axes[1, col]
        for m in cfg["methods"]:
            accs = 100 * np.array([r[m]["accs"] for r in runs])
            mean = accs.mean(0)
            se = accs.std(0, ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else 0 * mean
            ax.errorbar(tasks, mean, yerr=se, marker="o", ms=3, capsize=2, color=colors[m], label=m)
        ax.set_title(f"{arch}: accuracy at the end of each task", fontsize=10)
        ax.set_xlabel("task")
        ax.set_ylabel("new-task test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if NEEDED in cfg["methods"]:
            for r in runs:
                v = np.array(r[NEEDED]["values"][1:])
                tr.plot(tasks[1:], v, "o-", ms=3, alpha=0.6, color=colors[NEEDED])
            tr.axhline(0.526, color="k", ls="--", lw=1, label="threshold 0.526")
            tr.set_yscale("log")
            tr.set_title(f"{arch}: trial ratio at each boundary (one line a seed)", fontsize=10)
            tr.set_xlabel("boundary (before task)")
            tr.set_ylabel("probe loss with FIRE / without")
            tr.grid(alpha=0.3)
            tr.legend(fontsize=7)
        else:
            tr.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 seeds, 2 tasks of 1 epoch: a smoke test")
    p.add_argument("--seeds", type=int, default=None, help="seeds per network (default 8; quick 2)")
    p.add_argument("--tasks", type=int, default=None, help="tasks, the true labels first (default 7; quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs a task (default 15; quick 1)")
    p.add_argument("--steps", type=int, default=10, help="Newton-Schulz steps of FIRE and of the trial's FIRE")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {ARCHS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS} (none is required)")
    add_run_options(p)
    a = p.parse_args(argv)
    if a.replot is not None:
        cfg, results, seconds = load_run(a.replot)
        return write_outputs(a.replot.with_suffix(""), results, cfg, seconds, plot, write_markdown)
    archs = names(p, "networks", a.archs, ARCHS)
    methods = names(p, "methods", a.methods, METHODS)
    if "none" not in methods:
        p.error(f"the methods must include none (the baseline of every difference); got {methods}")
    q = a.quick
    cfg = dict(
        quick=q, seeds=a.seeds or (2 if q else 8), tasks=a.tasks or (2 if q else 7), epochs=a.epochs or (1 if q else 15),
        steps=a.steps, archs=archs, methods=methods, jobs=max(1, a.jobs), command=command_line(__file__, argv),
    )
    if cfg["tasks"] < 2:
        p.error(f"--tasks must be at least 2 (one boundary); got {cfg['tasks']}")
    # the slowest networks first, so that no long job starts last and leaves a worker idle
    cost = {"transformer": 0, "cnn": 1, "mlp": 2}
    jobs = sorted(((arch, seed, cfg) for arch in archs for seed in range(cfg["seeds"])), key=lambda j: cost[j[0]])
    started = time.perf_counter()
    with seed_runner(run_seed, cfg["jobs"]) as run_all:
        done = run_all(jobs)
    results = {arch: sorted((r for (a2, _, _), r in zip(jobs, done) if a2 == arch), key=lambda r: r["seed"])
               for arch in archs}
    seconds = time.perf_counter() - started
    stem = a.out / ("permuted-quick" if q else "permuted")
    save_run(stem, cfg, results, seconds)
    return write_outputs(stem, results, cfg, seconds, plot, write_markdown)


if __name__ == "__main__":
    sys.exit(main())
