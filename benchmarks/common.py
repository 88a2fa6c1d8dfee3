"""What the seed-averaged training benchmarks (plasticity, stability, language, rl, bitflip) share.

Running the seeds (in spawned worker processes, one thread each, or in this
one), the mean ± standard error they report, the files a run leaves
(``<stem>.json`` with everything, from which ``--replot`` redraws
``<stem>.md`` and ``<stem>.png``), and the one rule by which every benchmark
applies FIRE *when needed* instead of at every boundary (:class:`WhenNeeded`,
``fire_core.schedule.when_needed()`` itself) and how a row of it is judged
(:func:`goals`).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from fire_core.schedule import DfIAbove, DormantAbove, Moment, as_schedule, when_needed


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan"))


def fmt(values, scale=1.0, digits=1) -> str:
    m, s = mean_se(np.asarray(values) * scale)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


@contextlib.contextmanager
def seed_runner(run_seed: Callable, workers: int):
    """Yields ``run(jobs)``: ``run_seed(*job)`` for each job, in order, over ``workers`` processes."""
    if workers <= 1:
        yield lambda jobs: [run_seed(*job) for job in jobs]
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        yield lambda jobs: list(pool.map(run_seed, *zip(*jobs)))


def save_run(stem: Path, cfg: dict, results: dict, seconds: float) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"cfg": cfg, "results": results, "seconds": seconds}))


def load_run(path: Path) -> tuple[dict, dict, float]:
    saved = json.loads(path.read_text())
    return saved["cfg"], saved["results"], saved["seconds"]


RESULTS = Path(__file__).resolve().parent / "results"


def add_run_options(parser, jobs_help: str = "worker processes (one thread each)") -> None:
    """``--jobs``, ``--out`` and ``--replot``, the same in every training benchmark."""
    parser.add_argument("--jobs", type=int, default=2, help=jobs_help)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md, .png and .json")
    parser.add_argument("--replot", type=Path, default=None, help="rewrite the .md and .png from a saved .json, run nothing")


def names(parser, what: str, text: str, known) -> list[str]:
    """The comma-separated ``text`` as a list, in the order given; an unknown name, or none, is ``parser``'s error."""
    given = [name for name in text.split(",") if name]
    bad = sorted(set(given) - set(known))
    if bad or not given:
        parser.error(f"{f'unknown {what} {bad}' if bad else f'no {what} given'}; choose from {list(known)}")
    return given


def command_line(script: str, argv) -> str:
    """How the run was started, for its results file: ``python benchmarks/<script> <arguments>``."""
    return " ".join([f"python benchmarks/{Path(script).name}", *(argv if argv is not None else sys.argv[1:])])


def write_outputs(stem: Path, results, cfg: dict, seconds: float, plot: Callable, markdown: Callable) -> int:
    """``<stem>.png`` by ``plot(results, cfg, png)``, ``<stem>.md`` by ``markdown(results, cfg, md, png, seconds)``; prints the table."""
    md, png = stem.with_suffix(".md"), stem.with_suffix(".png")
    plot(results, cfg, png)
    markdown(results, cfg, md, png, seconds)
    print(md.read_text())
    print(f"wrote {md} and {png} ({seconds:.0f} s of runs)", file=sys.stderr)
    return 0


# --- FIRE when needed: the library's rule, polled by every benchmark ------------------------------

DFI_RATIO = 100.0
"""``FIRE@DfI`` (the earlier, data-free rule, kept for comparison) fires when the largest
per-layer DfI/n (``fire_core.schedule.target_dfi``: the weights' distance from FIRE's target,
0 on it) has grown to this many times the largest at initialization. One Gram matrix per
layer. Chosen once, on held-out seeds (100-102) of the digits warm start (plasticity.py, MLP
64-128-128-10): the ratio at the boundary was 62-65 where plasticity is not lost (subset) and
13800-19200 where it is (random labels); 100 is the smallest power of ten above every no-loss
value. Used unchanged in every benchmark (docs/benchmarks.md)."""

DORMANT_SHARE = 0.3
"""``FIRE@dormant`` fires when the share of tau-dormant units (Sokar et al. 2023, tau 0.025),
averaged over the layers' activations on a probe batch, exceeds this. Chosen on the same
held-out seeds: the share was 0.20-0.25 at initialization, 0.16-0.19 after the subset phase
and 0.08-0.13 after random labels (it fell where plasticity was lost), so no share separates
the settings there; 0.3 is the smallest multiple of 0.1 above every held-out value, initial
ones included. Used unchanged in every benchmark."""

TRIGGERS = ("when_needed", "DfI", "dormant")
NEEDED = "FIRE when needed"
"""The row every benchmark gives the recommended rule, ``fire_core.schedule.when_needed()``."""


class WhenNeeded:
    """A rule that decides, where a benchmark looks, whether to apply FIRE: the library's own triggers.

    ``kind="when_needed"``: :func:`fire_core.schedule.when_needed` as it ships
    (a trial of FIRE on the new task's data, ratio below 0.526 after 200
    steps); ``kind="DfI"``: :class:`fire_core.schedule.DfIAbove`
    (``DFI_RATIO``, relative to the first check, worst layer); ``kind="dormant"``:
    :class:`fire_core.schedule.DormantAbove` (``DORMANT_SHARE``, mean over layers).
    The benchmark calls :meth:`check` where it would look: once on the initial
    network (the schedule's step 0: the DfI baseline; nothing fires there),
    then at each task boundary or every K steps, and applies FIRE when it
    returns a reason. ``weights``: the ``(name, array, layout)`` FIRE would
    project (``fire_core.torch.select(model)`` or stacked arrays);
    ``features``: ``{layer: (samples, units)}`` activations of a probe batch;
    ``lookahead``: ``Moment.lookahead`` (``fire_core.torch.trial(...)``). Only
    what the rule reads is needed.
    """

    def __init__(self, kind: str, dfi_ratio: float = DFI_RATIO, dormant_share: float = DORMANT_SHARE):
        if kind not in TRIGGERS:
            raise ValueError(f"trigger kind must be one of {TRIGGERS}, got {kind!r}")
        self.kind = kind
        if kind == "when_needed":
            triggers = when_needed()
        elif kind == "DfI":
            triggers = [DfIAbove(dfi_ratio, every=1, relative=True, reduce="max")]
        else:
            triggers = [DormantAbove(dormant_share, every=1, reduce="mean")]
        self.schedule = as_schedule(triggers)
        self.checks = 0
        self.fired_at: list[int] = []  # the caller's step (or boundary) of each firing
        self.values: list[float] = []  # the measured value at every check (nan where nothing was measured)
        self.losses: list[list[float] | None] = []  # when_needed: the trial's (without, with FIRE) at every check

    def check(self, where: int, weights: Iterable | None = None, features: Mapping | None = None,
              lookahead: Callable | None = None) -> str | None:
        """The reason to apply FIRE now (at the caller's step or boundary ``where``), or None."""
        trigger = self.schedule.triggers[0]
        moment = Moment(  # the first check is the schedule's step 0: the initial network, never fires
            step=self.checks,
            weights=None if weights is None else (lambda: weights),
            features=None if features is None else (lambda: features),
            lookahead=lookahead,
        )
        self.checks += 1
        firing = self.schedule.poll(moment)
        measured = trigger.last_check == moment.step  # this poll read the network (the trial skips step 0)
        self.values.append(float(trigger.last_value) if measured else math.nan)
        if self.kind == "when_needed":
            self.losses.append(list(trigger.last_losses) if measured else None)
        if firing is None:
            return None
        self.fired_at.append(where)
        return "; ".join(firing.reasons)


NEEDED_TABLE = [
    "| setting | metric | FIRE − none | when needed − none | when needed − FIRE | fired | trial cost per check | goals |",
    "|---|---|---|---|---|---|---|---|",
]
"""The head of the "FIRE when needed" table in every training benchmark's results: one row per setting."""


def goals(none, fire, needed, higher_is_better: bool = True) -> dict:
    """The two goals of a when-needed rule in one setting, from paired per-seed results.

    ``none``, ``fire``, ``needed``: one number per seed (the same seeds) for
    doing nothing, FIRE at every boundary and the rule. A paired difference
    is *significant* when its 95% Student-t interval excludes 0. Goal 1
    (capture the gain): where FIRE beats none significantly, the rule keeps
    at least 80% of FIRE's mean gain (``kept``). Goal 2 (never cost): the
    rule is not significantly worse than none. Differences are signed so that
    positive is better (``higher_is_better=False`` for a loss).
    """
    from scipy import stats

    sign = 1.0 if higher_is_better else -1.0
    none, fire, needed = (np.asarray(v, dtype=float) for v in (none, fire, needed))

    def paired(a, b):
        d = sign * (a - b)
        m, se = mean_se(d)
        half = float(stats.t.ppf(0.975, len(d) - 1) * se) if len(d) > 1 else math.inf
        return {"mean": m, "se": se, "low": m - half, "high": m + half}

    gain, vs_none, vs_fire = paired(fire, none), paired(needed, none), paired(needed, fire)
    helps = gain["low"] > 0
    kept = vs_none["mean"] / gain["mean"] if gain["mean"] != 0 else math.nan
    return {
        "fire_minus_none": gain, "needed_minus_none": vs_none, "needed_minus_fire": vs_fire,
        "fire_helps": bool(helps), "fire_hurts": bool(gain["high"] < 0), "kept": kept,
        "goal1": (bool(kept >= 0.8) if helps else None),  # None: FIRE gains nothing significant here
        "goal2": bool(vs_none["high"] >= 0),
    }


def goals_cell(g: dict) -> str:
    """``goals()`` in one table cell: each goal met, missed or not at stake."""
    one = "n/a" if g["goal1"] is None else f"{'met' if g['goal1'] else 'MISSED'} ({100 * g['kept']:.0f}%)"
    return f"gain kept: {one}; never cost: {'met' if g['goal2'] else 'MISSED'}"


def machine(device: str) -> str:
    """The machine line of the speed results files: CPU model, torch (threads, GPU), jax, numpy."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"CPU: {cpu}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if device == "cuda":
            parts.append(f"GPU: {torch.cuda.get_device_name()}")
    except ImportError:
        pass
    try:
        import jax

        parts.append(f"jax {jax.__version__}")
    except ImportError:
        pass
    parts.append(f"numpy {np.__version__}")
    return ", ".join(parts)


def fire_fraction(fire_seconds: float, train_seconds: float) -> float:
    """FIRE's own wall time as a fraction of the training time of the phase it belongs to."""
    return float(fire_seconds) / float(train_seconds) if train_seconds > 0 else float("nan")
