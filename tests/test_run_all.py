"""benchmarks/run_all.py --quick: every training benchmark's quick mode runs and leaves its files (CI smoke test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"


def test_every_quick_mode_runs_and_writes_its_table_plot_and_numbers(tmp_path):
    done = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--jobs", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    sys.path.insert(0, str(RUN_ALL.parent))
    try:
        from run_all import BENCHMARKS
    finally:
        sys.path.pop(0)
    for name in BENCHMARKS:
        assert f"| {name} | ok |" in done.stdout
        md = (tmp_path / f"{name}-quick.md").read_text()
        assert "Quick mode" in md and "FIRE@DfI" in md and "FIRE@dormant" in md, name
        assert (tmp_path / f"{name}-quick.png").stat().st_size > 1000
        saved = json.loads((tmp_path / f"{name}-quick.json").read_text())
        assert saved["cfg"]["quick"] is True


def test_an_unknown_benchmark_is_refused_with_the_choices():
    done = subprocess.run([sys.executable, str(RUN_ALL), "--only", "vision"], capture_output=True, text=True)
    assert done.returncode == 2 and "plasticity" in done.stderr and "vision" in done.stderr
