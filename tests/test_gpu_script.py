"""benchmarks/gpu.py: the GPU run's plan, and its dry run on the CPU end to end (CI's run of the script).

The dry run runs once for the module (every step on the CPU, small sizes,
one BLAS thread); the GPU plan is built from a stand-in of what a GPU
machine's probe reports, so its commands, environment, time limits and
missing-step reasons are checked here without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
STEPS = ["check", "tests", "speed-torch", "speed-jax", "speed-cupy", "torch_apply", "chunks"]


gpu = load_script(SCRIPT, "fire_gpu_script")


def _probe(**changes) -> dict:
    """What gpu.py's probe reports on the GPU image the issue names (H100, torch 2.11 cu130, jax 0.11.2, CuPy 14.2)."""
    found = {"python": "3.12.3", "cpu": "Some Xeon", "numpy": "2.3.0", "numpy_reason": "",
             "pytest": "8.4.0", "pytest_reason": "", "hypothesis": "6.130.0", "hypothesis_reason": "",
             "torch": "2.11.0+cu130", "torch_reason": "", "torch_gpu": "NVIDIA H100 80GB HBM3", "torch_cuda": "13.0",
             "jax": "0.11.2", "jax_reason": "", "jax_gpu": "NVIDIA H100 80GB HBM3",
             "cupy": "14.2.0", "cupy_reason": "", "cupy_gpu": "NVIDIA H100 80GB HBM3", "plugin_installed": False}
    found.update(changes)
    return found


def _by_name(steps):
    return {s.name: s for s in steps}


# --------------------------------------------------------------------------- the GPU plan, without a GPU


def test_the_gpu_plan_runs_every_step_on_cuda_within_eight_minutes(tmp_path):
    steps = gpu.plan(tmp_path, dry=False, found=_probe())
    assert [s.name for s in steps] == STEPS
    assert not any(s.missing or s.skipped for s in steps)
    assert sum(s.budget for s in steps) + 15 <= gpu.TOTAL_SECONDS < 8 * 60  # the probe takes about 15 s
    s = _by_name(steps)
    assert s["check"].argv[:4] == ["-m", "fire_core", "check", "--bench"] and "--size" not in s["check"].argv
    for name in ("speed-torch", "speed-jax", "speed-cupy", "torch_apply", "chunks"):
        argv = s[name].argv
        assert argv[argv.index("--device") + 1] == "cuda" and "--quick" not in argv, name
        assert Path(argv[argv.index("--out") + 1]).name == s[name].table, name
    for backend in ("torch", "jax", "cupy"):
        argv = s[f"speed-{backend}"].argv
        assert argv[argv.index("--backends") + 1] == backend
    assert s["speed-cupy"].argv[s["speed-cupy"].argv.index("--sections") + 1] == "1"
    tests = s["tests"]
    assert tests.env["FIRE_CORE_BACKENDS"] == "torch:cuda,jax:gpu,cupy"
    files = {Path(a).name for a in tests.argv if a.startswith("tests/")}
    assert {"test_cupy.py", "test_torch.py", "test_polar.py", "test_plan.py"} <= files
    assert "test_keras.py" not in files  # its `backend` is a Keras backend, not the suite's fixture
    for step in steps:
        assert step.env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false", step.name  # JAX leaves the GPU to the others
        assert "CUDA_VISIBLE_DEVICES" not in step.env and "JAX_PLATFORMS" not in step.env, step.name
        assert "PYTHONPATH=. python " in gpu.command(step), step.name  # fire_core need not be installed there


def test_the_pytest_plugin_is_loaded_by_name_only_where_its_entry_point_is_not_installed(tmp_path):
    without = _by_name(gpu.plan(tmp_path, dry=False, found=_probe(plugin_installed=False)))["tests"].argv
    assert without[without.index("-p", without.index("no:cacheprovider")) + 1] == "fire_core.tools.pytest_plugin"
    installed = _by_name(gpu.plan(tmp_path, dry=False, found=_probe(plugin_installed=True)))["tests"].argv
    assert "fire_core.tools.pytest_plugin" not in installed  # pytest would register it twice and stop


def test_what_is_missing_on_the_gpu_machine_is_recorded_with_the_reason(tmp_path):
    found = _probe(cupy=None, cupy_reason="cupy is not installed", cupy_gpu=None,
                   jax_gpu=None, jax_reason="jax 0.11.2 has no gpu device (no CUDA plugin)")
    s = _by_name(gpu.plan(tmp_path, dry=False, found=found))
    assert s["speed-cupy"].missing == "cupy is not installed"
    assert s["speed-jax"].missing == "jax 0.11.2 has no gpu device (no CUDA plugin)"
    assert not s["speed-torch"].missing and not s["tests"].missing
    assert s["tests"].env["FIRE_CORE_BACKENDS"] == "torch:cuda"
    assert "cupy cases not run: cupy is not installed" in s["tests"].notes
    assert "jax:gpu cases not run: jax 0.11.2 has no gpu device (no CUDA plugin)" in s["tests"].notes

    s = _by_name(gpu.plan(tmp_path, dry=False, found=_probe(pytest=None, pytest_reason="pytest is not installed",
                                                            hypothesis=None,
                                                            hypothesis_reason="hypothesis is not installed")))
    assert s["tests"].missing == "pytest is not installed"
    s = _by_name(gpu.plan(tmp_path, dry=False, found=_probe(hypothesis=None,
                                                            hypothesis_reason="hypothesis is not installed")))
    left = [n for n in s["tests"].notes if n.startswith("hypothesis is absent")]
    assert len(left) == 1 and "test_polar.py" in left[0]
    assert "tests/test_polar.py" not in s["tests"].argv and "tests/test_cupy.py" in s["tests"].argv

    no_cuda = _probe(torch_gpu=None, torch_reason="torch 2.11.0 sees no CUDA device")
    s = _by_name(gpu.plan(tmp_path, dry=False, found=no_cuda))
    for name in ("speed-torch", "torch_apply", "chunks"):
        assert s[name].missing == "torch 2.11.0 sees no CUDA device", name


def test_the_dry_plan_hides_cuda_and_lifts_the_time_limits(tmp_path):
    steps = gpu.plan(tmp_path, dry=True, found=_probe(torch_gpu=None, jax_gpu=None, cupy_gpu=None))
    assert [s.name for s in steps] == STEPS
    for step in steps:
        assert step.env["CUDA_VISIBLE_DEVICES"] == "" and step.env["JAX_PLATFORMS"] == "cpu", step.name
        assert step.budget == gpu.DRY_LIMIT
    s = _by_name(steps)
    assert s["speed-cupy"].skipped.startswith("dry run")
    assert s["check"].argv[-2:] == ["--size", "64"]
    for name in ("speed-torch", "speed-jax", "torch_apply", "chunks"):
        argv = s[name].argv
        assert argv[argv.index("--device") + 1] == "cpu" and "--quick" in argv, name


def _item(marker=None, **params):
    return SimpleNamespace(get_closest_marker=lambda name: marker if name == "gpu" else None,
                           callspec=SimpleNamespace(params=params))


def test_the_cuda_cases_are_gpu_marked_tests_and_the_backend_fixtures_on_a_gpu():
    assert gpu.is_cuda_case(_item(marker=object()))
    for b in ("torch:cuda", "jax:gpu", "cupy"):
        assert gpu.is_cuda_case(_item(backend=b)) and gpu.is_cuda_case(_item(fire_backend=b))
    for b in ("numpy", "array_api_strict", "torch", "jax"):
        assert not gpu.is_cuda_case(_item(backend=b))
    assert not gpu.is_cuda_case(SimpleNamespace(get_closest_marker=lambda name: None))  # not parametrized
    ranks = [gpu.case_rank(_item(marker=object())), gpu.case_rank(_item(backend="torch:cuda")),
             gpu.case_rank(_item(backend="cupy")), gpu.case_rank(_item(backend="jax:gpu"))]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4  # JAX's compiles last: a time limit cuts them first


def test_test_results_keep_what_ran_and_list_what_was_not_reached(tmp_path):
    log = tmp_path / "tests.jsonl"
    events = [
        {"event": "collected", "nodeids": ["a[torch:cuda]", "b[cupy]", "c[cupy]", "d[jax:gpu]", "e"], "deselected": 7},
        {"event": "report", "nodeid": "a[torch:cuda]", "when": "call", "outcome": "passed", "duration": 0.5,
         "message": ""},
        {"event": "report", "nodeid": "b[cupy]", "when": "call", "outcome": "failed", "duration": 0.25,
         "message": "AssertionError: 1e-3 > 1e-12"},
        {"event": "report", "nodeid": "c[cupy]", "when": "setup", "outcome": "skipped", "duration": 0.0,
         "message": "needs 2 CUDA devices"},
        {"event": "report", "nodeid": "e", "when": "setup", "outcome": "failed", "duration": 0.0,
         "message": "fixture broke"},
    ]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    cases, deselected, errors = gpu.test_results(log)
    outcome = {c["test"]: c["outcome"] for c in cases}
    assert outcome == {"a[torch:cuda]": "passed", "b[cupy]": "failed", "c[cupy]": "skipped",
                       "d[jax:gpu]": "not reached", "e": "error in setup"}
    assert deselected == 7 and errors == []
    md = gpu.tests_table(log, "GPU: NVIDIA H100", "python benchmarks/gpu.py _pytest", dry=False)
    assert "GPU: NVIDIA H100" in md and "5 CUDA cases (7 other tests of these files deselected)" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| test ")]
    assert [r.split(" | ")[1] for r in rows] == ["failed", "error in setup", "not reached", "skipped", "passed"]
    assert "AssertionError: 1e-3 > 1e-12" in rows[0]


def test_a_failed_or_stopped_step_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    """main() over stand-in steps: one fails, one outlives its limit (with a child), one writes its table."""
    pid_file = tmp_path / "grandchild.pid"
    sleeper = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    out = tmp_path / "out"

    def fake_plan(out_dir, dry, found):
        return [
            gpu.Step("fails", "exits 3", 60, ["-c", "import sys; sys.exit(3)"], None),
            gpu.Step("hangs", "sleeps past its limit", 8, ["-c", sleeper], None),  # 8 s: time to start its child
            gpu.Step("gone", "needs what is not here", 60, ["-c", "pass"], None, missing="cupy is not installed"),
            gpu.Step("writes", "writes its table", 60,
                     ["-c", f"open({str(out_dir / 't.md')!r}, 'w').write('CPU: Some Xeon\\n')"], "t.md"),
        ]

    monkeypatch.setattr(gpu, "plan", fake_plan)
    monkeypatch.setattr(gpu, "probe_machine", lambda dry, timeout: _probe(cpu="Some Xeon"))
    assert gpu.main(["--dry-run", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status["fails"] == "FAILED (exit 3)"
    assert status["hangs"].startswith("TIMEOUT")
    assert status["gone"] == "missing: cupy is not installed"
    assert status["writes"] == "ok"
    md = (out / "summary.md").read_text()
    for name in status:
        assert f"| {name} | {status[name]} |" in md
    assert "fails, hangs did not succeed" in capsys.readouterr().err
    # the stopped step's whole process group went with it
    pid = int(pid_file.read_text())
    for _ in range(50):
        state = Path(f"/proc/{pid}/status")
        if not state.exists() or re.search(r"State:\s+Z", state.read_text()):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the stopped step's child process was left running")


def test_an_occupied_out_folder_is_refused_before_anything_runs(tmp_path, monkeypatch):
    (tmp_path / "old.md").write_text("x")
    monkeypatch.setattr(gpu, "probe_machine", lambda dry, timeout: pytest.fail("probed"))
    with pytest.raises(SystemExit) as e:
        gpu.main(["--dry-run", "--out", str(tmp_path)])
    assert e.value.code == 2


# --------------------------------------------------------------------------- the dry run, end to end


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry") / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the dry run did not finish in 30 minutes:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return SimpleNamespace(code=proc.returncode, stdout=stdout, stderr=stderr, out=out,
                           summary=json.loads((out / "summary.json").read_text()))


def test_the_dry_run_succeeds_and_records_every_step(dry_run):
    assert dry_run.code == 0, dry_run.stdout[-4000:] + dry_run.stderr[-4000:]
    steps = {s["name"]: s for s in dry_run.summary["steps"]}
    assert list(steps) == STEPS and dry_run.summary["dry_run"] is True
    have = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
    expected_ok = ["check", "tests"] + [n for n, m in (("speed-torch", "torch"), ("speed-jax", "jax"),
                                                       ("torch_apply", "torch"), ("chunks", "torch")) if have(m)]
    for name in expected_ok:
        assert steps[name]["status"] == "ok", (name, steps[name]["status"])
    cupy = steps["speed-cupy"]["status"]
    assert cupy == ("skipped: dry run: CuPy runs only on a CUDA device" if have("cupy")
                    else "missing: cupy is not installed")
    md = (dry_run.out / "summary.md").read_text()
    assert "dry run on the CPU" in md
    for name, step in steps.items():
        assert f"| {name} | {step['status']} |" in md and f"`{step['command']}`" in md
        assert step["command"].startswith("CUDA_VISIBLE_DEVICES='' JAX_PLATFORMS=cpu")
        if step["status"] == "ok":
            assert (dry_run.out / "logs" / f"{name}.log").exists()
            assert not any("does not name the device" in n for n in step["notes"]), step["notes"]


def test_every_dry_table_names_the_cpu(dry_run):
    cpu = gpu.cpu_model()
    tables = [s["table"] for s in dry_run.summary["steps"] if s["status"] == "ok"]
    assert len(tables) >= 3
    for table in tables:
        assert cpu in (dry_run.out / table).read_text(), table


def test_the_dry_runs_cuda_cases_are_collected_and_skipped(dry_run):
    md = (dry_run.out / "tests.md").read_text()
    counts = re.search(r"^(\d+) CUDA cases \((\d+) other tests of these files deselected\): (.*)$", md, re.M)
    assert counts, md[:2000]
    total = int(counts.group(1))
    assert total > 100 and counts.group(3) == f"{total} skipped"  # CUDA hidden: nothing ran, nothing failed
    for case in ("tests/test_cupy.py::test_gpu_apply_equals_numpy",
                 "tests/test_torch.py::test_cuda_weights_stay_on_their_device",
                 "tests/test_polar.py::"):
        assert f"| {case}" in md, case
    assert "[numpy" not in md and "[torch-" not in md and "[jax-" not in md  # no CPU case slipped in
    notes = {s["name"]: s["notes"] for s in dry_run.summary["steps"]}["tests"]
    assert any(n.startswith("dry run: CUDA hidden") for n in notes)


def test_the_dry_chunk_sizes_give_the_same_weights(dry_run):
    pytest.importorskip("torch")
    md = (dry_run.out / "chunks.md").read_text()
    rows = [ln.split("|")[1:-1] for ln in md.splitlines() if re.match(r"\| [\d.]+( \(default\))? \|", ln)]
    assert len(rows) == 9, md  # three weight sets x three chunk sizes
    calls = [int(r[1]) for r in rows]
    assert calls[0] > calls[2]  # the smallest chunks take more batched calls than the largest
    for r in rows:
        assert float(r[5]) <= 1e-6, r  # float32 weights: chunking changes the batching, not the math
