"""What the seed-averaged training benchmarks (plasticity.py, stability.py) share.

Running the seeds (in spawned worker processes, one thread each, or in this
one), the mean ± standard error they report, and the files a run leaves:
``<stem>.json`` with everything, from which ``--replot`` redraws
``<stem>.md`` and ``<stem>.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import numpy as np


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


def write_outputs(stem: Path, plot: Callable[[Path], None], markdown: Callable[[Path, Path], None], seconds: float) -> int:
    """``<stem>.png`` by ``plot(png)``, ``<stem>.md`` by ``markdown(md, png)``; prints the table."""
    md, png = stem.with_suffix(".md"), stem.with_suffix(".png")
    plot(png)
    markdown(md, png)
    print(md.read_text())
    print(f"wrote {md} and {png} ({seconds:.0f} s of runs)", file=sys.stderr)
    return 0
