"""Which signal says "FIRE now helps"? A measured study for ``when_needed`` (issue 25, phase 1).

Settings, each built from scratch on scikit-learn's digits (no download) and
trained to a task boundary, where plasticity is either really lost (FIRE is
expected to help) or the weights merely grew in healthy learning (FIRE is
expected to cost):

* ``mlp``: the 64-128-128-10 ReLU MLP of ``plasticity.py``; phase 1 memorizes
  shuffled labels (``random``: lost) or trains on a random 10% of the true
  labels (``subset``: healthy), 300 epochs either way;
* ``cnn-bn``, ``transformer``: the BatchNorm CNN and the pre-LN transformer
  classifier of ``stability.py`` (its model builders, imported), ``random``
  vs ``subset``, phase 1 as long as ``stability.py``'s (100 and 120 epochs);
* ``ln-mlp``: the MLP with a LayerNorm before each hidden ReLU, ``random`` vs
  ``subset``, 300 epochs;
* ``cnn``: the plain CNN of ``stability.py`` (no normalization) after random
  labels, 150 epochs (``stability.py`` measured FIRE neither helping nor
  costing there);
* ``cnn-perm``: the plain CNN of ``stability.py`` (no normalization) trained
  with Adam through label-permuted digits tasks (task 0: the true labels,
  task k: the labels mapped by a random permutation), ``--perm-epochs``
  epochs a task, measured at the boundaries after task 0 (``cnn-perm/b1``)
  and after task 1 (``cnn-perm/b2``; the network of doing nothing at b1).
  Nothing is lost there: the weights grow while the network learns.
  ``mlp-perm`` and ``transformer-perm``: the same task sequence for the MLP
  and the pre-LN transformer (added after the lookahead's K was read off the
  other settings: settings neither K nor any threshold was chosen on).

After phase 1 the new task is the true labels of the 1347 training images
(``cnn-perm``: the next permutation). Ground truth, per seed: new-task test
accuracy after ``--epochs2`` epochs (``cnn-perm``: ``--perm-epochs``) on the
new task with a fresh Adam (lr 1e-3, batch 64), once after FIRE at the
boundary (``fire_core.torch.apply``, ``--steps`` Newton–Schulz steps, the
reference scale) and once doing nothing; the paired difference says whether
FIRE helped in that setting.

Signals at the boundary (each with its wall time; "init" is the initial
network of the same seed, measured the same way, as a poll before the first
step would):

* weights only: the worst layer's DfI/n to FIRE's target
  (``fire_core.schedule.target_dfi``) over init's worst (``dfi_ratio``: what
  ``DfIAbove(100, relative=True, reduce="max")`` reads); the spread of each
  matrix's squared singular values normalized to mean 1,
  ``var(s^2 / mean s^2)`` (conv kernels per tap), worst matrix
  (``spread``) and over init's worst (``spread_ratio``); the smallest stable
  rank ``||W||_F^2 / ||W||_2^2 / min(m, n)`` over init's smallest
  (``stable_rank_ratio``);
* a probe batch of the new task (``--probe`` examples held out of the
  lookahead's batches): the lowest feature srank / full rank over the
  activation layers (Kumar et al. 2021, delta 0.01) over init's
  (``srank_ratio``); the cross-entropy (``probe_loss``, and over init's:
  ``loss_ratio``) and the gradient norm of all parameters (over init's:
  ``grad_ratio``), in training mode;
* lookahead: two copies of the network, one with FIRE applied; each takes K
  Adam steps (a fresh Adam, lr 1e-3) cycling over ``--look-batches`` batches of
  64 new-task examples; then the probe's loss of each. ``look_K`` is
  ``loss(FIRE copy) / loss(copy doing nothing)`` after K steps, for each K in
  ``--look-steps`` (below 1: FIRE learns the new task faster), and
  ``look_K_seconds`` the cost of the whole check up to K (copies, FIRE, 2K
  steps, the probe losses).

Threshold: for each signal, chosen on the held-out seeds (``--heldout``,
default 100-102) of the ``mlp`` setting only, as the geometric midpoint
between the lost and the healthy values when they separate there (the side
on which lost values lie decides whether the rule fires above or below it),
then applied unchanged to the evaluation seeds of every setting.

    python benchmarks/when_needed_study.py            # 8 evaluation seeds, 3 held out: 8-15 min on 2 cores
    python benchmarks/when_needed_study.py --quick    # seconds, numbers not meaningful

Writes ``benchmarks/results/when_needed_study.md`` and ``.json``
(``--quick``: ``when_needed_study-quick.*``); ``--replot`` redraws the .md
from a saved .json.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fire_core.torch
from fire_core.demo import BATCH, accuracy, digits, make_optimizer, train
from fire_core.diagnostics import srank
from fire_core.layout import to_matrices
from fire_core.schedule import target_dfi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_run_options, command_line, load_run, mean_se, names, save_run, seed_runner  # noqa: E402
from plasticity import phase1_task  # noqa: E402
from stability import EPOCHS1, make_cnn, make_model  # noqa: E402

ARCHS = ("mlp", "cnn-bn", "transformer", "ln-mlp", "cnn", "cnn-perm", "mlp-perm", "transformer-perm")
PHASE1 = {"mlp": 300, "cnn-bn": EPOCHS1["cnn-bn"], "transformer": EPOCHS1["transformer"], "ln-mlp": 300, "cnn": EPOCHS1["cnn"]}
SIGNALS = (
    # name, what it is, "up": lost reads higher / "down": lost reads lower is decided on the held-out seeds
    ("dfi_ratio", "worst-layer DfI/n over init's (weights)"),
    ("spread", "worst normalized s^2 spread (weights)"),
    ("spread_ratio", "worst spread over init's (weights)"),
    ("stable_rank_ratio", "lowest stable rank / min(m,n) over init's (weights)"),
    ("srank_ratio", "lowest feature srank / full rank over init's (probe)"),
    ("probe_loss", "new-task probe loss (probe)"),
    ("loss_ratio", "probe loss over init's (probe)"),
    ("grad_ratio", "probe gradient norm over init's (probe)"),
)


# --- the networks --------------------------------------------------------------------------------


def make_ln_mlp(seed: int, hidden: int = 128) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden), nn.LayerNorm(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def build(arch: str, seed: int) -> nn.Module:
    if arch == "ln-mlp":
        return make_ln_mlp(seed)
    if arch in ("cnn", "cnn-perm"):
        return make_cnn(seed, bn=False)
    return make_model(arch.removesuffix("-perm"), seed)


# --- the signals ---------------------------------------------------------------------------------


def weight_signals(model) -> dict:
    """Worst DfI/n, worst normalized-spectrum spread, lowest stable rank fraction over the FIRE-selected weights."""
    dfi, spread, stable = [], [], []
    for _, w, layout in fire_core.torch.select(model):
        dfi.append(float(torch.max(target_dfi(w.to(torch.float64), layout))))
        mats = to_matrices(w.to(torch.float64), layout)  # (stack * taps, m, n)
        lam = torch.linalg.svdvals(mats) ** 2
        mean = lam.mean(dim=-1)
        spread.append(float(torch.max((lam ** 2).mean(dim=-1) / mean ** 2 - 1.0)))
        stable.append(float(torch.min(lam.sum(dim=-1) / lam.max(dim=-1).values / lam.shape[-1])))
    return {"dfi": max(dfi), "spread": max(spread), "stable_rank": min(stable)}


def probe_signals(model, x, y) -> dict:
    """On a copy, in training mode: the probe's loss, the gradient norm, the lowest feature srank fraction."""
    twin = copy.deepcopy(model).train()
    loss = nn.functional.cross_entropy(twin(x), y)
    grads = torch.autograd.grad(loss, [p for p in twin.parameters() if p.requires_grad])
    grad = math.sqrt(sum(float(torch.sum(g.to(torch.float64) ** 2)) for g in grads))
    feats = fire_core.torch.activations(twin, x)
    ranks = [float(srank(a)) / min(a.shape) for a in feats.values()]
    return {"loss": float(loss.detach()), "grad": grad, "srank": min(ranks)}


def lookahead(model, x_look, y_look, x_probe, y_probe, ks, fire_steps) -> dict:
    """FIRE copy vs untouched copy after K Adam steps on the look batches: loss ratio on the probe, and cost."""
    out = {}
    started = time.perf_counter()
    copies = {"none": copy.deepcopy(model), "fire": copy.deepcopy(model)}
    fire_core.torch.apply(copies["fire"], steps=fire_steps)
    opts = {k: make_optimizer(m) for k, m in copies.items()}
    for m in copies.values():
        m.train()
    batches = [(x_look[i : i + BATCH], y_look[i : i + BATCH]) for i in range(0, x_look.shape[0], BATCH)]
    step = 0
    for k_target in sorted(ks):
        while step < k_target:
            xb, yb = batches[step % len(batches)]
            for key, m in copies.items():
                loss = nn.functional.cross_entropy(m(xb), yb)
                opts[key].zero_grad(set_to_none=True)
                loss.backward()
                opts[key].step()
            step += 1
        with torch.no_grad():  # training mode (batch statistics), on copies: nothing kept
            losses = {key: float(nn.functional.cross_entropy(m(x_probe), y_probe)) for key, m in copies.items()}
        out[f"look_{k_target}"] = losses["fire"] / losses["none"]
        out[f"look_{k_target}_none"] = losses["none"]
        out[f"look_{k_target}_fire"] = losses["fire"]
        out[f"look_{k_target}_seconds"] = time.perf_counter() - started
    return out


def signals(model, fresh, x_new, y_new, seed: int, cfg: dict) -> dict:
    """Every signal at a boundary, each with its cost; the new task's data split into look batches and a probe."""
    order = torch.randperm(x_new.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    n_look = cfg["look_batches"] * BATCH
    look, probe = order[:n_look], order[n_look : n_look + cfg["probe"]]
    x_probe, y_probe = x_new[probe], y_new[probe]
    out, cost = {}, {}
    started = time.perf_counter()
    w_now = weight_signals(model)
    cost["weights"] = time.perf_counter() - started
    w_init = weight_signals(fresh)
    started = time.perf_counter()
    p_now = probe_signals(model, x_probe, y_probe)
    cost["probe"] = time.perf_counter() - started
    p_init = probe_signals(fresh, x_probe, y_probe)
    out["dfi_ratio"] = w_now["dfi"] / w_init["dfi"]
    out["spread"] = w_now["spread"]
    out["spread_init"] = w_init["spread"]
    out["spread_ratio"] = w_now["spread"] / w_init["spread"]
    out["stable_rank_ratio"] = w_now["stable_rank"] / w_init["stable_rank"]
    out["srank_ratio"] = p_now["srank"] / p_init["srank"]
    out["probe_loss"] = p_now["loss"]
    out["loss_ratio"] = p_now["loss"] / p_init["loss"]
    out["grad_ratio"] = p_now["grad"] / p_init["grad"]
    look = lookahead(model, x_new[look], y_new[look], x_probe, y_probe, cfg["look_steps"], cfg["steps"])
    out.update({k: v for k, v in look.items() if not k.endswith("_seconds")})
    cost.update({k.removesuffix("_seconds"): v for k, v in look.items() if k.endswith("_seconds")})
    return {"signals": out, "cost": cost}


# --- one seed ------------------------------------------------------------------------------------


def new_task(model, x, y, x_test, y_test, epochs: int, seed: int) -> float:
    """Train on the new task with a fresh Adam; the test accuracy at the end (eval mode)."""
    train(model, make_optimizer(model), x, y, epochs, seed=seed)
    model.eval()
    return accuracy(model, x_test, y_test)


def boundary(model, fresh, x_new, y_new, x_test, y_test, epochs: int, seed: int, cfg: dict) -> dict:
    """Signals at the boundary, then the ground truth: the new task after FIRE vs after doing nothing."""
    row = signals(model, fresh, x_new, y_new, seed, cfg)
    fired = copy.deepcopy(model)
    fire_core.torch.apply(fired, steps=cfg["steps"])
    row["fire"] = new_task(fired, x_new, y_new, x_test, y_test, epochs, 10 * seed + 1)
    untouched = copy.deepcopy(model)
    row["none"] = new_task(untouched, x_new, y_new, x_test, y_test, epochs, 10 * seed + 1)
    return row, untouched


def run_seed(arch: str, kind: str, seed: int, cfg: dict) -> list[tuple[str, dict]]:
    """One network to its boundary (two boundaries for the label-permuted tasks); ``[(setting, row)]``."""
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = digits()
    fresh = build(arch, seed)
    model = build(arch, seed)
    if arch.endswith("-perm"):
        gen = torch.Generator().manual_seed(500 + seed)
        perms = [torch.arange(10)] + [torch.randperm(10, generator=gen) for _ in range(2)]
        epochs = cfg["perm_epochs"]
        train(model, make_optimizer(model), x_train, y_train, epochs, seed=seed)
        rows = []
        for b in (1, 2):
            p = perms[b]
            started = time.perf_counter()
            row, model = boundary(model, fresh, x_train, p[y_train], x_test, p[y_test], epochs, seed + b, cfg)
            row["seconds"] = time.perf_counter() - started
            rows.append((f"{arch}/b{b}", row))  # the next boundary follows doing nothing through this task
        return rows
    x_old, y_old = phase1_task("random-labels" if kind == "random" else "subset", seed, x_train, y_train)
    epochs1 = cfg["epochs1"] or PHASE1[arch]
    train(model, make_optimizer(model), x_old, y_old, epochs1, seed=seed)
    model.eval()
    started = time.perf_counter()
    row, _ = boundary(model, fresh, x_train, y_train, x_test, y_test, cfg["epochs2"], seed, cfg)
    row["seconds"] = time.perf_counter() - started
    row["phase1_old"] = accuracy(model, x_old, y_old)
    return [(f"{arch}/{kind}", row)]


# --- thresholds and tables -----------------------------------------------------------------------


def signal_names(cfg: dict) -> list[str]:
    return [s for s, _ in SIGNALS] + [f"look_{k}" for k in cfg["look_steps"]]


def describe(name: str) -> str:
    if name.startswith("look_"):
        return f"lookahead, K={name[5:]}: probe loss with FIRE / without"
    return dict(SIGNALS)[name]


def choose(lost: list[float], healthy: list[float]) -> dict:
    """The geometric midpoint between the two groups, if they separate; which side fires."""
    lo_l, hi_l, lo_h, hi_h = min(lost), max(lost), min(healthy), max(healthy)
    if lo_l > hi_h:
        return {"separates": True, "fires": "above", "threshold": math.sqrt(lo_l * hi_h)}
    if hi_l < lo_h:
        return {"separates": True, "fires": "below", "threshold": math.sqrt(hi_l * lo_h)}
    return {"separates": False, "fires": "above" if np.median(lost) > np.median(healthy) else "below", "threshold": None}


def decide(value: float, rule: dict) -> bool:
    return value > rule["threshold"] if rule["fires"] == "above" else value < rule["threshold"]


def analyse(rows: dict, cfg: dict) -> dict:
    """Per signal: the threshold from the held-out seeds, and its decision on every evaluation setting."""
    held = rows["heldout"]
    lost = lambda name: [r["signals"][name] for r in held["mlp/random"]]  # noqa: E731
    healthy = lambda name: [r["signals"][name] for r in held["mlp/subset"]]  # noqa: E731
    rules = {name: choose(lost(name), healthy(name)) for name in signal_names(cfg)}
    truth = {}
    for setting, runs in rows["eval"].items():
        diff = [100 * (r["fire"] - r["none"]) for r in runs]
        m, s = mean_se(diff)
        truth[setting] = {"diff": m, "se": s, "helps": bool(m > 2 * s), "costs": bool(m < -2 * s)}
    verdicts = {}
    for name, rule in rules.items():
        if rule["threshold"] is None:
            continue
        per = {}
        for setting, runs in rows["eval"].items():
            fired = [decide(r["signals"][name], rule) for r in runs]
            gain = [100 * ((r["fire"] if f else r["none"]) - r["none"]) for r, f in zip(runs, fired)]
            per[setting] = {"fired": int(sum(fired)), "of": len(runs), "gain": mean_se(gain)[0]}
        verdicts[name] = per
    return {"rules": rules, "truth": truth, "verdicts": verdicts}


def fmt_v(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def span(values) -> str:
    return f"{fmt_v(float(np.median(values)))} ({fmt_v(min(values))}–{fmt_v(max(values))})"


def write_markdown(rows: dict, cfg: dict, path: Path, seconds: float) -> None:
    a = analyse(rows, cfg)
    settings = list(rows["eval"])
    sig = signal_names(cfg)
    lines = [
        "# FIRE when needed: which signal separates lost plasticity from healthy growth",
        "",
        f"`{cfg['command']}` — evaluation seeds {cfg['seeds']}, held-out seeds {cfg['heldout']} (the `mlp` "
        f"setting only). Phase 1 epochs: {cfg['epochs1'] or PHASE1}; new task: {cfg['epochs2']} epochs "
        f"(`cnn-perm`: {cfg['perm_epochs']} epochs a task); FIRE `method=\"fire\"`, {cfg['steps']} steps, the "
        f"reference scale; probe {cfg['probe']} new-task examples, lookahead on {cfg['look_batches']} batches of "
        f"{BATCH}. Wall time {seconds / 60:.1f} min with {cfg['jobs']} worker process(es) on a {os.cpu_count()}-core "
        f"{platform.machine()} CPU (shared, loaded), torch {torch.__version__}. Produced by "
        "`benchmarks/when_needed_study.py` (its docstring defines every signal).",
        "",
    ]
    if cfg["quick"]:
        lines += ["**Quick mode: too few seeds and epochs for the numbers to mean anything.**", ""]
    lines += [
        "## Ground truth: FIRE at the boundary vs doing nothing",
        "",
        "New-task test accuracy after training on the new task; paired difference per seed, mean ± standard "
        "error. *Helps* / *costs*: the mean is more than 2 standard errors above / below 0.",
        "",
        "| setting | none (%) | FIRE (%) | FIRE − none (pts) | verdict |",
        "|---|---|---|---|---|",
    ]
    for s in settings:
        runs, t = rows["eval"][s], a["truth"][s]
        none_m, _ = mean_se([100 * r["none"] for r in runs])
        fire_m, _ = mean_se([100 * r["fire"] for r in runs])
        verdict = "helps" if t["helps"] else ("costs" if t["costs"] else "neither")
        lines.append(f"| {s} | {none_m:.1f} | {fire_m:.1f} | {t['diff']:+.2f} ± {t['se']:.2f} | {verdict} |")
    lines += [
        "",
        "## Signal values at the boundary (median, range over the evaluation seeds)",
        "",
        "| signal | " + " | ".join(settings) + " | held out: mlp/random | held out: mlp/subset |",
        "|---" * (len(settings) + 3) + "|",
    ]
    for name in sig:
        cells = [span([r["signals"][name] for r in rows["eval"][s]]) for s in settings]
        held = [span([r["signals"][name] for r in rows["heldout"][s]]) for s in ("mlp/random", "mlp/subset")]
        lines.append(f"| `{name}`: {describe(name)} | " + " | ".join(cells + held) + " |")
    lines += [
        "",
        "## Thresholds chosen on the held-out `mlp` seeds, applied unchanged",
        "",
        "Each cell: firings out of seeds, and the mean gain over doing nothing (pts) of following the rule "
        "(FIRE where it fires, nothing elsewhere). A rule is right in a setting when it fires where FIRE "
        "helps and stays quiet where it costs.",
        "",
        "| signal | rule | " + " | ".join(settings) + " | wrong settings |",
        "|---" * (len(settings) + 3) + "|",
    ]
    for name in sig:
        rule = a["rules"][name]
        if rule["threshold"] is None:
            lines.append(f"| `{name}` | does not separate the held-out seeds | " + " | ".join("—" for _ in settings) + " | — |")
            continue
        cells, wrong = [], []
        for s in settings:
            v, t = a["verdicts"][name][s], a["truth"][s]
            cells.append(f"{v['fired']}/{v['of']}, {v['gain']:+.2f}")
            if (t["helps"] and v["fired"] < v["of"]) or (t["costs"] and v["fired"] > 0):
                wrong.append(s)
        lines.append(f"| `{name}` | fires {rule['fires']} {fmt_v(rule['threshold'])} | " + " | ".join(cells)
                     + f" | {', '.join(wrong) or 'none'} |")
    lines += ["", "## Margins", "",
              "For each signal with a held-out threshold, over the evaluation seeds: the value closest to the "
              "threshold (or furthest past it) among the settings where FIRE helps (it must fire there), where it "
              "costs (it must not), and where it does neither (either decision is harmless; firings counted). "
              "*Right*: fired at every seed where FIRE helps and at none where it costs.", "",
              "| signal | threshold | closest where FIRE helps | closest where FIRE costs | neither: closest, firings "
              "| right |",
              "|---|---|---|---|---|---|"]
    for name in sig:
        rule = a["rules"][name]
        if rule["threshold"] is None:
            continue
        sign = 1.0 if rule["fires"] == "above" else -1.0
        group = lambda want: [(sign * r["signals"][name], s) for s in settings  # noqa: E731
                              if want(a["truth"][s]) for r in rows["eval"][s]]
        helps = group(lambda t: t["helps"])
        costs = group(lambda t: t["costs"])
        neither = group(lambda t: not t["helps"] and not t["costs"])
        right = all(v > sign * rule["threshold"] for v, _ in helps) and all(v < sign * rule["threshold"] for v, _ in costs)
        cell = lambda pairs, pick: "—" if not pairs else f"{fmt_v(sign * pick(pairs)[0])} ({pick(pairs)[1]})"  # noqa: E731
        fired = sum(v > sign * rule["threshold"] for v, _ in neither)
        closest = min(neither, key=lambda p: abs(p[0] - sign * rule["threshold"])) if neither else None
        lines.append(f"| `{name}` | {fmt_v(rule['threshold'])} | {cell(helps, min)} | {cell(costs, max)} | "
                     + ("—" if closest is None else f"{fmt_v(sign * closest[0])} ({closest[1]}); {fired}/{len(neither)} fired")
                     + f" | {'yes' if right else 'no'} |")
    costs = {}
    for runs in rows["eval"].values():
        for r in runs:
            for k, v in r["cost"].items():
                costs.setdefault(k, []).append(v)
    lines += [
        "",
        "## Cost of one check (seconds, median over every evaluation boundary, one CPU thread, loaded machine)",
        "",
        "| what | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {np.median(v):.4f} |" for k, v in costs.items()]
    lines += [
        "",
        "`weights`: every weight signal (one SVD per matrix, conv taps batched); `probe`: one forward and backward "
        "on the probe plus the feature sranks; `look_K`: the whole lookahead up to K steps (two copies, FIRE, "
        "2K Adam steps, two probe forwards), cumulative.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed each, short phases: a smoke test")
    p.add_argument("--seeds", type=int, default=None, help="evaluation seeds 0..N-1 (default 8; quick 1)")
    p.add_argument("--heldout", type=int, default=None, help="held-out mlp seeds from 100 (default 3; quick 1)")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {ARCHS} (mlp always runs)")
    p.add_argument("--epochs1", type=int, default=None, help=f"phase-1 epochs (default per network {PHASE1}; quick 3)")
    p.add_argument("--epochs2", type=int, default=None, help="new-task epochs (default 10; quick 1)")
    p.add_argument("--perm-epochs", type=int, default=None, help="cnn-perm epochs a task (default 15; quick 1)")
    p.add_argument("--steps", type=int, default=10, help="Newton-Schulz steps of FIRE (default 10, the vision reference)")
    p.add_argument("--probe", type=int, default=256, help="probe examples of the new task (default 256)")
    p.add_argument("--look-batches", type=int, default=4, help="new-task batches the lookahead cycles over (default 4)")
    p.add_argument("--look-steps", default=None, help="comma-separated K of the lookahead (default 10,25,50,100,200; quick 2,4)")
    add_run_options(p)
    a = p.parse_args(argv)
    if a.replot is not None:
        cfg, rows, seconds = load_run(a.replot)
        write_markdown(rows, cfg, a.replot.with_suffix(".md"), seconds)
        print(a.replot.with_suffix(".md").read_text())
        return 0
    archs = names(p, "networks", a.archs, ARCHS)
    if "mlp" not in archs:
        archs.insert(0, "mlp")
    ks = a.look_steps or ("2,4" if a.quick else "10,25,50,100,200")
    cfg = dict(
        quick=a.quick, seeds=list(range(a.seeds or (1 if a.quick else 8))),
        heldout=list(range(100, 100 + (a.heldout or (1 if a.quick else 3)))),
        epochs1=a.epochs1 or (3 if a.quick else None), epochs2=a.epochs2 or (1 if a.quick else 10),
        perm_epochs=a.perm_epochs or (1 if a.quick else 15), steps=a.steps, probe=a.probe,
        look_batches=a.look_batches, look_steps=sorted({int(k) for k in ks.split(",") if k}),
        jobs=max(1, min(2, a.jobs)), command=command_line(__file__, argv),
    )
    kinds = lambda arch: ("perm",) if arch.endswith("-perm") else {"cnn": ("random",)}.get(arch, ("random", "subset"))  # noqa: E731
    jobs = [("mlp", kind, seed, cfg) for seed in cfg["heldout"] for kind in kinds("mlp")]
    held_n = len(jobs)
    jobs += [(arch, kind, seed, cfg) for arch in archs for seed in cfg["seeds"] for kind in kinds(arch)]
    started = time.perf_counter()
    with seed_runner(run_seed, cfg["jobs"]) as run_all:
        done = run_all(jobs)
    rows = {"heldout": {}, "eval": {}}
    for k, out in enumerate(done):
        for setting, row in out:
            rows["heldout" if k < held_n else "eval"].setdefault(setting, []).append(row)
    seconds = time.perf_counter() - started
    stem = a.out / ("when_needed_study-quick" if a.quick else "when_needed_study")
    save_run(stem, cfg, rows, seconds)
    write_markdown(rows, cfg, stem.with_suffix(".md"), seconds)
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.md and .json ({seconds:.0f} s of runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
