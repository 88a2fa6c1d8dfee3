"""Stability benchmark: FIRE's scale rules at a task switch, on four architectures.

The warm start of ``benchmarks/plasticity.py`` (scikit-learn's digits, its
data split, batch size, Adam and training loop, nothing downloaded):

* phase 1 (the old task): the network memorizes *shuffled* labels of the
  1347 training images for ``--epochs1`` epochs, the classic way to make a
  network lose plasticity;
* the intervention, then phase 2 (the new task: the true labels) for
  ``--epochs2`` epochs with a fresh Adam for every method.

Methods at the switch: ``none`` (keep training) and FIRE
(``fire_core.torch.apply``, ``method="fire"``, ``--steps`` Newton–Schulz
steps, default 5 as the library's default) with each scale rule of
:func:`fire_core.layout.scale_factor`: ``fire`` (the reference,
``sqrt(d_out/d_in) / taps``), ``variance`` (``/ sqrt(taps)``), ``norm``
(each layer keeps its Frobenius norm) and ``None`` (the bare projection).
For the MLP and the transformer every projected weight is a matrix
(``taps = 1``), where ``variance`` is ``fire`` exactly: it is not run twice.
``FIRE@DfI`` and ``FIRE@dormant`` apply the ``fire`` rule *only when needed*,
decided at the switch by the one rule every benchmark uses
(``common.WhenNeeded``: the data-free DfI trigger relative to the initial
network, or the dormant-unit share on the phase-1 inputs). ``FIRE when
needed`` (``common.NEEDED``) applies the ``fire`` rule, as the ``fire`` row
does, only when :func:`fire_core.schedule.when_needed` says so
(``common.WhenNeeded``), polled where ``FIRE@DfI`` looks: on the initial
network (its step 0, no trial) and at the switch, where it reads
``fire_core.torch.trial(model, batches, probe, loss=cross_entropy,
steps=--steps, scale="fire")`` (the ``fire`` row's apply options): two
copies of the phase-1 network, one after FIRE, each trained 200 steps of a
fresh Adam (lr 1e-3) over 4 batches of 64 phase-2 training examples (the
true labels; the same draw as ``plasticity.py``'s, by its own generator),
then their cross-entropy, in training mode, on a probe of 256 other phase-2
training examples, the images fed as every network takes them (the 64
pixels; the transformer makes its 8 row tokens itself). FIRE when the ratio
(with / without) is below 0.526, a threshold chosen on the digits MLP with
FIRE at 10 steps (``benchmarks/when_needed_study.py``) and used here
unchanged, with this benchmark's FIRE. The trial leaves the model and
torch's random state as they were; its cost (400 Adam steps on copies, more
than the 10 epochs of phase 2 with the defaults) is reported.

Architectures (input: the 8x8 image):

* ``cnn``: conv 3x3 1->16, ReLU, conv 3x3 16->32, ReLU, 2x2 max-pool,
  linear 512->64, ReLU, linear 64->10; no normalization;
* ``cnn-bn``: the same with BatchNorm after each conv. Accuracy is measured
  in eval mode (running statistics), so right after FIRE the statistics are
  stale. Each FIRE rule is also reported with the statistics refreshed by
  ``torch.optim.swa_utils.update_bn`` on the phase-1 training inputs right
  after the projection (rows ``+ update_bn``). Phase 2 trains in train mode,
  where BatchNorm uses each batch's own statistics, so the refresh cannot
  change training; its rows share the final accuracy of the rule without it
  (checked: the runs are identical);
* ``mlp``: the 64-128-128-10 ReLU MLP of the plasticity benchmark;
* ``transformer``: the 8 image rows as 8 tokens, linear 8->32 plus a learned
  position embedding, 2 pre-norm encoder layers (``nn.TransformerEncoderLayer``,
  4 heads, feed-forward 64, no dropout), mean over tokens, linear 32->10.

Measured for every (architecture, method, seed): test accuracy on the new
task after each phase-2 epoch (*final* = the last), and right after the
intervention: accuracy on the old task (its shuffled labels on the training
inputs: stability), relative function drift
``||f_after(x) - f_before(x)||_F / ||f_before(x)||_F`` of the logits on the
training inputs (eval mode), and the test accuracy on the new task. Mean ±
standard error over seeds, and the paired per-seed difference of the final
accuracy to ``none``.

    python benchmarks/stability.py            # full run: 8 seeds, 24 minutes on 2 shared, loaded cores
    python benchmarks/stability.py --quick    # < 1 minute, numbers not meaningful

Writes ``benchmarks/results/stability.md``, ``stability.png`` and the raw
per-seed numbers ``stability.json`` (``--quick``: ``stability-quick.*``).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import fire_core.torch
from fire_core.demo import BATCH, accuracy, digits, make_mlp, make_optimizer, train
from fire_core.schedule import when_needed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DFI_RATIO, DORMANT_SHARE, NEEDED, NEEDED_TABLE, WhenNeeded, add_run_options, command_line, fire_fraction, fmt,
    load_run, mean_se, names, save_run, seed_runner, write_outputs,
)
from plasticity import TRIAL_BATCHES, TRIAL_PROBE, needed_rows, phase1_task, trial_data  # noqa: E402

ARCHS = ("cnn", "cnn-bn", "mlp", "transformer")
RULES = {"fire": "fire", "variance": "variance", "norm": "norm", "None": None}
MATRIX_ONLY = ("mlp", "transformer")  # every weight has taps = 1: "variance" is "fire"
TRIGGERED = {"FIRE@DfI": "DfI", "FIRE@dormant": "dormant", NEEDED: "when_needed"}  # "fire" rule when WhenNeeded says so
# Phase-1 epochs per architecture: enough to memorize most of the shuffled labels (measured on seed 0:
# cnn 92% after 160 epochs, cnn-bn 87% after 100, transformer 85% after 120; the MLP as in plasticity.py).
EPOCHS1 = {"cnn": 150, "cnn-bn": 100, "mlp": 300, "transformer": 120}


# --- the networks ---------------------------------------------------------------------------


class Image(nn.Module):
    """(batch, 64) pixels -> (batch, 1, 8, 8)."""

    def forward(self, x):
        return x.reshape(x.shape[0], 1, 8, 8)


def make_cnn(seed: int, bn: bool, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        Image(),
        nn.Conv2d(1, width, 3, padding=1), norm(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )


class RowTransformer(nn.Module):
    """The image's 8 rows as tokens; 2 pre-norm encoder layers; mean over tokens; linear head."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(0.02 * torch.randn(8, d))
        # the ReLU as a module (the same function as the default "relu"), so the dormant trigger can read it
        layer = nn.TransformerEncoderLayer(
            d, heads, 2 * d, dropout=0.0, activation=nn.ReLU(), batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.encoder(self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


def make_model(arch: str, seed: int, hidden: int = 128) -> nn.Module:
    if arch == "mlp":
        return make_mlp(seed, hidden)
    if arch in ("cnn", "cnn-bn"):
        return make_cnn(seed, bn=arch == "cnn-bn")
    torch.manual_seed(seed)
    return RowTransformer()


def methods_for(arch: str) -> list[str]:
    rules = [r for r in RULES if not (arch in MATRIX_ONLY and r == "variance")]
    out = ["none"] + rules
    if arch == "cnn-bn":
        out += [f"{r} + update_bn" for r in rules]
    return out + list(TRIGGERED)


# --- one seed ------------------------------------------------------------------------------


def logits(model, x):
    with torch.no_grad():
        return model(x)


def run_seed(arch: str, seed: int, cfg: dict) -> dict:
    """Phase 1, every scale rule, phase 2 for one architecture and seed; plain floats out."""
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits()
    x_old, y_old = phase1_task("random-labels", seed, x_train, y_train)
    base = make_model(arch, seed, cfg["hidden"])
    epochs1 = cfg["epochs1"] or EPOCHS1[arch]
    started = time.perf_counter()
    train(base, make_optimizer(base), x_old, y_old, epochs1, seed=seed)
    phase1_seconds = time.perf_counter() - started
    base.eval()
    out = {"phase1": {"old": accuracy(base, x_old, y_old), "test": accuracy(base, x_test, y_test),
                      "train_seconds": phase1_seconds}}
    f_before = logits(base, x_old)

    fresh = make_model(arch, seed, cfg["hidden"]).eval()  # the initial network: the DfI trigger's baseline
    for method in cfg.get("methods") or methods_for(arch):  # a subset: tests
        rule, refresh = method.removesuffix(" + update_bn"), method.endswith(" + update_bn")
        model = copy.deepcopy(base)
        trigger, seconds = None, 0.0
        if method in TRIGGERED:
            gate = WhenNeeded(TRIGGERED[method], cfg["dfi_ratio"], cfg["dormant_share"])
            if TRIGGERED[method] == "when_needed":  # step 0 runs no trial; at the switch, a trial of the "fire" row
                gate.check(0)
                looked = time.perf_counter()
                batches, probe = trial_data(seed, x_train, y_train)
                reason = gate.check(1, lookahead=fire_core.torch.trial(
                    model, batches, probe, loss=nn.functional.cross_entropy, steps=cfg["steps"], scale=RULES["fire"]))
                trigger = {"check_seconds": time.perf_counter() - looked, "losses": gate.losses}
            else:
                for where, net in enumerate((fresh, model)):
                    reason = gate.check(where, weights=fire_core.torch.select(net),
                                        features=fire_core.torch.activations(net, x_old))
                trigger = {}
            trigger.update(fired=reason is not None, values=gate.values)
            rule = "fire" if reason is not None else "none"
        if rule != "none":
            started = time.perf_counter()
            fire_core.torch.apply(model, steps=cfg["steps"], scale=RULES[rule])
            seconds = time.perf_counter() - started
        if refresh:  # the phase-1 inputs, in the training batch size
            loader = torch.utils.data.DataLoader(x_old, batch_size=BATCH)
            update_bn(loader, model)
        model.eval()
        f_after = logits(model, x_old)
        row = {
            "old": accuracy(model, x_old, y_old),
            "drift": float(torch.linalg.vector_norm(f_after - f_before) / torch.linalg.vector_norm(f_before)),
            "seconds": seconds,
        }
        if trigger is not None:
            row["trigger"] = trigger
        curve = [accuracy(model, x_test, y_test)]

        def record(epoch, m):
            m.eval()
            curve.append(accuracy(m, x_test, y_test))
            m.train()

        started = time.perf_counter()
        train(model, make_optimizer(model), x_train, y_train, cfg["epochs2"], seed=10 * seed + 1, after_epoch=record)
        row["train_seconds"] = time.perf_counter() - started  # the test-set evaluations included
        row["curve"], row["final"] = curve, curve[-1]
        out[method] = row
    return out


# --- aggregation and output ----------------------------------------------------------------


def table(arch: str, runs: list[dict]) -> list[str]:
    methods = [m for m in methods_for(arch) if m in runs[0]]
    col = lambda m, key: [r[m][key] for r in runs]  # noqa: E731
    p1 = lambda key: [r["phase1"][key] for r in runs]  # noqa: E731
    lines = [
        f"### {arch}",
        "",
        f"End of phase 1: old-task accuracy {fmt(p1('old'), 100)}%, test accuracy on the new task "
        f"{fmt(p1('test'), 100)}%.",
        "",
        "| method | final new-task acc. (%) | paired diff. to none (pts) | new-task acc. after 1 epoch (%) "
        "| old-task acc. right after (%) | drift right after | new-task acc. right after (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        diff = [100 * (r[m]["final"] - r["none"]["final"]) for r in runs]
        lines.append(
            f"| {m} | {fmt(col(m, 'final'), 100)} | {'—' if m == 'none' else fmt(diff, 1, 2)} "
            f"| {fmt([r[m]['curve'][1] for r in runs], 100)} | {fmt(col(m, 'old'), 100)} "
            f"| {fmt(col(m, 'drift'), 1, 3)} | {fmt([r[m]['curve'][0] for r in runs], 100)} |"
        )
    lines.append("")
    if "train_seconds" in runs[0].get("fire", {}):
        frac = [100 * fire_fraction(r["fire"]["seconds"], r["fire"]["train_seconds"]) for r in runs]
        lines += [f"FIRE (`fire` rule) took {1e3 * mean_se(col('fire', 'seconds'))[0]:.1f} ms, "
                  f"{fmt(frac, 1, 3)}% of phase 2's training time.", ""]
    for m in (m for m in methods if m in TRIGGERED):
        values = [r[m]["trigger"]["values"] for r in runs]
        read = [v[1] / v[0] for v in values] if TRIGGERED[m] == "DfI" else [v[1] for v in values]
        what = {"DfI": "largest layer DfI/n at the switch over that at initialization",
                "dormant": "dormant share on the phase-1 inputs at the switch",
                "when_needed": "trial ratio at the switch (probe loss with FIRE / without)"}[TRIGGERED[m]]
        lines.append(
            f"{m}: fired in {sum(r[m]['trigger']['fired'] for r in runs)} of {len(runs)} seeds; {what}: "
            f"median {np.median(read):.3g} (range {min(read):.3g}-{max(read):.3g})."
        )
    return lines + [""]


def needed_section(results: dict, cfg: dict) -> list[str]:
    """The when-needed row against none and the ``fire`` row per architecture: paired differences, firings, cost, goals."""
    if not all(m in runs[0] for runs in results.values() for m in ("none", "fire", NEEDED)):
        return []
    rule = when_needed()[0]
    lines = [
        "## FIRE when needed (`fire_core.schedule.when_needed()`)",
        "",
        f"`{NEEDED}` applies FIRE with the `fire` rule ({cfg['steps']} steps, as the `fire` row) at the switch when "
        "a trial says FIRE learns the new task faster: `fire_core.torch.trial(model, batches, probe, "
        f"loss=cross_entropy, steps={cfg['steps']}, scale=\"fire\")` trains two copies of the phase-1 network, one "
        f"after FIRE, {rule.steps} steps each (fresh Adam, lr 1e-3) over {TRIAL_BATCHES} batches of {BATCH} "
        f"phase-2 training examples, and compares their cross-entropy (training mode) on a probe of {TRIAL_PROBE} "
        f"other phase-2 training examples; FIRE when with / without < {rule.threshold:g}. The rule is polled on the "
        "initial network (no trial there) and at the switch, as `FIRE@DfI` is. The threshold was chosen on the "
        "digits MLP with FIRE at 10 steps (`benchmarks/when_needed_study.py`) and is used unchanged, with this "
        f"benchmark's FIRE ({cfg['steps']} steps). Differences are paired per seed, final new-task test accuracy in "
        "percentage points, mean ± standard error; FIRE is the `fire` row (FIRE at the switch, every seed). Trial "
        "cost: the check's wall time (the two copies, FIRE and the 2 x "
        f"{rule.steps} Adam steps), as a share of the phase-2 training time of the same run and of both phases' "
        "training. *Goals* (`common.goals`, 95% paired t intervals): *gain kept* where FIRE beats none "
        "significantly, the rule keeps at least 80% of FIRE's mean gain; *never cost*: the rule is not "
        "significantly worse than none.",
        "",
        *NEEDED_TABLE,
    ]
    return lines + needed_rows(results, "fire", "final new-task test acc.", rule.threshold)


def summary(results: dict) -> list[str]:
    """One line per architecture: final accuracy and old-task accuracy of every rule."""
    rules = ["none", *RULES]
    head = "| architecture | " + " | ".join(f"{r}: final / old" for r in rules) + " |"
    lines = [head, "|---" * (len(rules) + 1) + "|"]
    for arch, runs in results.items():
        cells = []
        for r in rules:
            if r not in runs[0]:
                r = "fire" if r == "variance" else r
            m_f, s_f = mean_se([100 * x[r]["final"] for x in runs])
            m_o, _ = mean_se([100 * x[r]["old"] for x in runs])
            cells.append(f"{m_f:.1f} ± {s_f:.1f} / {m_o:.0f}")
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(results: dict, cfg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (arch, runs) in zip(axes[0], results.items()):
        for k, m in enumerate(m for m in methods_for(arch) if m in runs[0]):
            fm, fs = mean_se([100 * r[m]["final"] for r in runs])
            om, os_ = mean_se([100 * r[m]["old"] for r in runs])
            marker = "s" if m == "none" else ("^" if "update_bn" in m else "o")
            ax.errorbar(om, fm, xerr=os_, yerr=fs, fmt=marker, color=plt.get_cmap("tab20")(k), label=m, capsize=3)
        ax.set_title(arch)
        ax.set_xlabel("old-task accuracy right after (%)")
        ax.set_ylabel("final new-task accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_markdown(results: dict, cfg: dict, path: Path, png: Path, seconds: float) -> None:
    phase1 = cfg["epochs1"] or ", ".join(f"{a} {EPOCHS1[a]}" for a in results)
    lines = [
        "# Stability benchmark: scale rules at a task switch on scikit-learn digits",
        "",
        f"`{cfg['command']}` — {cfg['seeds']} seeds per architecture. Phase 1: {phase1} epochs memorizing "
        f"shuffled labels of the 1347 training images; FIRE `method=\"fire\"`, {cfg['steps']} steps, with each "
        f"scale rule; phase 2: {cfg['epochs2']} epochs on the true labels with a fresh Adam (lr 1e-3, batch 64) "
        f"for every method; test set of 450 images. Wall time {seconds / 60:.1f} min with {cfg['jobs']} worker "
        f"process(es) on a {os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}.",
        "",
        "*Final*: test accuracy on the new task (true labels) after phase 2. *Old-task acc. right after*: "
        "accuracy on the phase-1 task (its shuffled labels, training inputs) right after the intervention, in "
        "eval mode (stability). *Drift*: `||f_after(x) - f_before(x)||_F / ||f_before(x)||_F` of the logits on the "
        "training inputs right after the intervention. *Paired diff.*: per-seed difference of the final accuracy "
        "to `none` (same network, data order). Mean ± standard error over seeds. For `mlp` and `transformer` "
        "`variance` equals `fire` (no conv taps) and is not run separately.",
        "",
    ]
    if cfg["quick"]:
        lines += ["**Quick mode: too few seeds and epochs for the numbers to mean anything.**", ""]
    lines += ["## Summary: final new-task accuracy (%) / old-task accuracy right after (%)", ""]
    lines += summary(results)
    for arch, runs in results.items():
        lines += table(arch, runs)
    lines += needed_section(results, cfg)
    lines += [f"![stability]({png.name})", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed per architecture, short phases: a smoke test")
    p.add_argument("--seeds", type=int, default=None, help="seeds per architecture (default 8; quick 1)")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {ARCHS}")
    p.add_argument("--epochs1", type=int, default=None, help=f"phase-1 epochs (default per architecture {EPOCHS1}; quick 2)")
    p.add_argument("--epochs2", type=int, default=None, help="phase-2 epochs (default 10; quick 1)")
    p.add_argument("--steps", type=int, default=5, help="Newton-Schulz steps of FIRE (default 5)")
    p.add_argument("--hidden", type=int, default=128, help="MLP width")
    p.add_argument("--dfi-ratio", type=float, default=DFI_RATIO, help=f"FIRE@DfI's threshold (default {DFI_RATIO:g})")
    p.add_argument("--dormant-share", type=float, default=DORMANT_SHARE,
                   help=f"FIRE@dormant's threshold (default {DORMANT_SHARE:g})")
    add_run_options(p)
    a = p.parse_args(argv)
    if a.replot is not None:
        cfg, results, seconds = load_run(a.replot)
        return write_outputs(a.replot.with_suffix(""), results, cfg, seconds, plot, write_markdown)
    archs = names(p, "architectures", a.archs, ARCHS)
    cfg = dict(
        quick=a.quick, seeds=a.seeds or (1 if a.quick else 8), epochs1=a.epochs1 or (2 if a.quick else None),
        epochs2=a.epochs2 or (1 if a.quick else 10), steps=a.steps, hidden=a.hidden, jobs=max(1, a.jobs),
        dfi_ratio=a.dfi_ratio, dormant_share=a.dormant_share,
        command=command_line(__file__, argv),
    )
    started = time.perf_counter()
    jobs = [(arch, seed, cfg) for arch in archs for seed in range(cfg["seeds"])]
    with seed_runner(run_seed, cfg["jobs"]) as run_all:
        done = run_all(jobs)
    results = {arch: [r for (a2, _, _), r in zip(jobs, done) if a2 == arch] for arch in archs}
    seconds = time.perf_counter() - started
    stem = a.out / ("stability-quick" if a.quick else "stability")
    save_run(stem, cfg, results, seconds)
    return write_outputs(stem, results, cfg, seconds, plot, write_markdown)


if __name__ == "__main__":
    sys.exit(main())
