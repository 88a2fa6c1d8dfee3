"""`python -m fire_core.demo` (what `fire-core demo` runs), as a subprocess in its quick mode."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

RUNS = ("no intervention", "FIRE", "fresh network")


def run_demo(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}\nimport sys\nfrom fire_core.demo import main\nsys.exit(main({list(args)!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick():
    return run_demo("--quick")


def test_quick_demo_exits_zero_without_stderr(quick):
    assert quick.returncode == 0, quick.stderr
    assert quick.stderr == ""


def test_demo_prints_the_fire_report_of_every_linear_layer(quick):
    rows = re.findall(r"^(\d)\.weight\s+(\d+x\d+)\s+oi\s", quick.stdout, flags=re.M)
    assert rows == [("0", "32x64"), ("2", "32x32"), ("4", "10x32")]
    assert "FIRE method=fire, steps=10, scale='fire': projected 3 weights" in quick.stdout


def test_demo_prints_accuracy_after_the_switch_and_per_epoch_for_each_run(quick):
    lines = quick.stdout.splitlines()
    header = next(k for k, line in enumerate(lines) if line.split() == ["epoch", "no", "intervention", "FIRE", "fresh", "network"])
    table = [line.split() for line in lines[header + 1 : header + 4]]
    assert [row[0] for row in table] == ["0", "1", "2"]  # epoch 0 = right after the switch
    for row in table:
        assert len(row) == 4
        assert all(0.0 <= float(v) <= 100.0 for v in row[1:])
    for name in RUNS:
        assert re.search(rf"^  {name}\s+\d+\.\d%\s+\d+\s+\d+\.\d%$", quick.stdout, flags=re.M), name


def test_demo_result_line_matches_the_table(quick):
    last = quick.stdout.split("phase 2:")[1].splitlines()[4].split()  # the epoch-2 row
    m = re.search(r"with FIRE (\d+\.\d)% vs (\d+\.\d)% without \(([+-]\d+\.\d) points", quick.stdout)
    assert m, quick.stdout
    assert (m.group(1), m.group(2)) == (last[2], last[1])
    assert float(m.group(3)) == pytest.approx(float(last[2]) - float(last[1]), abs=0.11)


def test_demo_is_deterministic(quick):
    again = run_demo("--quick")
    strip = lambda s: re.sub(r", \d+\.\d s$", "", s, flags=re.M)  # noqa: E731
    assert strip(again.stdout) == strip(quick.stdout)


def test_demo_passes_method_and_steps_to_fire():
    out = run_demo("--quick", "--method", "svd", "--epochs1", "2", "--epochs2", "1")
    assert out.returncode == 0, out.stderr
    assert "FIRE method=svd, scale='fire': projected 3 weights" in out.stdout


@pytest.mark.parametrize("module, package", [("torch", "torch"), ("sklearn", "scikit-learn")])
def test_demo_names_the_extra_when_a_dependency_is_missing(module, package):
    out = run_demo("--quick", prelude=f"import sys; sys.modules[{module!r}] = None")
    assert out.returncode == 1
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert f"({package} is missing)" in out.stderr
    assert 'pip install "fire-core[demo]"' in out.stderr


@pytest.mark.parametrize("args", [["--epochs2", "0"], ["--method", "nope"], ["--steps", "-1"]])
def test_demo_rejects_bad_options_with_usage_error(capsys, args):
    from fire_core.demo import main

    with pytest.raises(SystemExit) as exc:
        main(["--quick", *args])
    assert exc.value.code == 2
    assert "usage: fire-core demo" in capsys.readouterr().err


def test_module_runs_as_script():
    out = subprocess.run(
        [sys.executable, "-m", "fire_core.demo", "--quick", "--epochs1", "1", "--epochs2", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "result: final test accuracy with FIRE" in out.stdout
