"""Every training benchmark (does FIRE help?), one after another, each in its own process.

The benchmarks of the three domains of the FIRE paper and the three digits
benchmarks, in the order docs/benchmarks.md reports them:

* ``plasticity``: warm start on scikit-learn digits (random labels, subset);
* ``stability``: FIRE's scale rules at a task switch, four architectures;
* ``language``: continual pre-training of a small GPT (corpus A, then A+B);
* ``rl``: DQN and TD3 with a high replay ratio (primacy bias);
* ``bitflip``: Dohare et al.'s slowly-changing regression (Nature 2024).
* ``permuted``: label-permuted digits tasks, where nothing is lost (issue 25's held-out networks).

    python benchmarks/run_all.py --quick    # every quick mode: a smoke test, a few minutes
    python benchmarks/run_all.py            # every full run (about an hour on 2 cores)

Each benchmark writes its own ``.md``, ``.png`` and ``.json`` into ``--out``
(quick modes: ``<name>-quick.*``). The speed benchmarks (``speed.py``,
``torch_apply.py``, ``flax_apply.py``, ``distributed.py``) measure one device
each and are run on their own. Exit status 1 if any benchmark failed; the
table printed at the end gives each one's wall time and status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("plasticity", "stability", "language", "rl", "bitflip", "permuted")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every benchmark's quick mode (numbers not meaningful)")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    p.add_argument("--jobs", type=int, default=2, help="worker processes of each benchmark (one thread each)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for every benchmark's results")
    a = p.parse_args(argv)
    chosen = [b for b in a.only.split(",") if b]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown or not chosen:
        p.error(f"unknown benchmarks {unknown}; choose from {BENCHMARKS}")
    rows, failed = [], []
    for name in chosen:
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--jobs", str(a.jobs), "--out", str(a.out)]
        if a.quick:
            cmd.append("--quick")
        print(f"+ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            failed.append(name)
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        rows.append(f"| {name} | {'ok' if done.returncode == 0 else f'FAILED (exit {done.returncode})'} | {seconds:.0f} |")
    print("| benchmark | status | wall time (s) |\n|---|---|---|\n" + "\n".join(rows))
    if failed:
        print(f"run_all: {', '.join(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
