"""Running a multi-process rank script from a test: each rank's arrays and JSON come back to the test.

The rank scripts import :func:`finish` from here (this folder is on their ``PYTHONPATH``).

The script gets two arguments, a rendezvous file path (new for each run) and
an output prefix; each rank writes ``<prefix>-<rank>.npz`` and
``<prefix>-<rank>.json``. The script and the ranks it spawns run in a
session of their own, killed whole if they outlive ``RANK_TIMEOUT``, so ranks
waiting in a collective that never completes fail the test and leave nothing
behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = str(HERE.parent)
RANK_TIMEOUT = 900  # seconds for a whole rank script, generous for a loaded machine


def run_script(source: str, tmp, *args, env: dict | None = None, world: int = 2) -> None:
    """Run the rank script ``source`` in ``tmp`` as ``script.py <rendezvous> <tmp/...args>``; fail the test
    with its stderr if it fails or outlives ``RANK_TIMEOUT``."""
    script = tmp / "rank_script.py"  # not ranks.py: the script imports this module
    script.write_text(source)
    rendezvous = tempfile.mktemp(dir=tmp, prefix="rendezvous-")  # a new file for each run (FileStore's rule)
    proc = subprocess.Popen(
        [sys.executable, str(script), rendezvous, *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp,
        # the ranks import the fire_core this process imports, not whatever an installed copy points at, and
        # this module (finish)
        env=dict(os.environ, OMP_NUM_THREADS="1",
                 PYTHONPATH=os.pathsep.join([ROOT, str(HERE), os.environ.get("PYTHONPATH", "")]), **(env or {})),
    )
    try:
        _, err = proc.communicate(timeout=RANK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the {world} ranks did not finish within {RANK_TIMEOUT} s (a collective hung):\n{err[-4000:]}")
    assert proc.returncode == 0, err[-6000:]


def run_ranks(source: str, tmp, world: int, env: dict | None = None, args: tuple = (), name: str = "r"):
    """Run the rank script ``source`` (its arguments: a rendezvous file, the output prefix ``tmp/<name>``, then
    ``args``); each rank's (arrays, dict) from ``<name>-<rank>.npz`` / ``.json``."""
    run_script(source, tmp, tmp / name, *args, env=env, world=world)
    ranks = []
    for rank in range(world):
        with np.load(tmp / f"{name}-{rank}.npz") as arrays:
            tensors = {k: arrays[k] for k in arrays.files}
        ranks.append((tensors, json.loads((tmp / f"{name}-{rank}.json").read_text())))
    return ranks


def finish(rank: int, out: str, arrays: dict, info: dict) -> None:
    """In a rank process: write ``<out>-<rank>.npz`` and ``.json`` (what :func:`run_ranks` reads) and end the rank."""
    import torch.distributed as dist

    np.savez(f"{out}-{rank}.npz", **arrays)
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump(info, f)
    dist.barrier()  # no rank tears gloo down while another still talks
    dist.destroy_process_group()
    # status 0 without the interpreter's teardown, where threads that outlive the group
    # (gloo's, rank 0's TCPStore server) can abort the process (see benchmarks/distributed.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
