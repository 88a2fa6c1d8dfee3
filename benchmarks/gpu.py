"""The GPU run in one command: every GPU table of fire_core, written into one folder.

    python benchmarks/gpu.py --out DIR             # on a machine with CUDA torch, JAX's CUDA plugin and CuPy
    python benchmarks/gpu.py --dry-run --out DIR   # the same plan on the CPU, small sizes (CI runs this)
    python benchmarks/gpu.py --list --out DIR      # print the plan, run nothing

Run from anywhere; nothing is installed. The repository root is put on
``PYTHONPATH`` of every step, so fire_core need not be installed either.
The steps, each a process of its own with its own time limit (together
under 8 minutes; a step that fails or runs out of time does not stop the
others):

* ``check``: ``python -m fire_core check --bench``: every backend and
  device against NumPy float64, and ``project``'s speed per device
  (``check.md``);
* ``tests``: the test suite's CUDA cases: tests marked ``gpu`` and the
  backend-parametrized tests on ``torch:cuda``, ``cupy`` and ``jax:gpu``,
  in that order (``tests.md``: a row per test, from ``tests.jsonl``, which
  records each result as it comes, so a stopped run keeps what it ran and
  lists what it did not reach);
* ``speed-torch``, ``speed-jax``, ``speed-cupy``: ``benchmarks/speed.py
  --device cuda``, one backend each, section 1 (``project`` against its
  matmul floor) and, for torch and JAX, section 2 (``fast`` against exact
  polar factors); section 3 is NumPy on the host and section 4 is the
  ``torch_apply`` step (``speed-<backend>.md``);
* ``torch_apply``: ``benchmarks/torch_apply.py --device cuda``
  (``torch_apply.md``);
* ``chunks``: ``benchmarks/chunks.py --device cuda``: reinit_many at 16, 64
  and 256 MiB a chunk, time and peak memory (``chunks.md``).

``--dry-run`` runs the same steps with small sizes on the CPU (CUDA hidden
from every step, one BLAS thread, no time limit that a slow machine could
hit): the CUDA test cases are collected and skipped (the ``cupy`` ones and
the ``gpu`` marked ones; ``torch:cuda`` and ``jax:gpu`` cases are not
generated without a device), and ``speed-cupy`` is not run (CuPy needs a
CUDA device). Every table names its device. ``summary.md`` (and
``summary.json``) list each step, its status, wall and CPU time, time
limit, table and command; ``logs/`` holds each step's output. A step that cannot run because something is missing
(pytest, CuPy, a CUDA device) is recorded as ``missing`` with the reason.
Exit status: 0 when no step failed or ran out of time, 1 otherwise, 2 for
bad arguments or, without ``--dry-run``, a machine with no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests"
TOTAL_SECONDS = 465  # every step, the probe included, ends by then: the whole run stays under 8 minutes
# Each step's time limit on a GPU, in seconds: estimates made without a GPU (no GPU run has happened yet),
# leaving the probe about 15 s of TOTAL_SECONDS. A dry run has no limit a loaded CPU could hit (DRY_LIMIT each).
BUDGETS = {"check": 100, "tests": 120, "speed-torch": 55, "speed-jax": 55, "speed-cupy": 35, "torch_apply": 25,
           "chunks": 40}
DRY_LIMIT = 600
GPU_BACKENDS = ("torch:cuda", "jax:gpu", "cupy")  # fire_core.testing's device backends
PLUGIN = "fire_core.tools.pytest_plugin"
# An environment that hides CUDA from torch, JAX and CuPy: the dry run is a CPU run on any machine. One BLAS
# thread: on a loaded machine torch's spinning threads made the dry run's torch steps 3-4x slower.
DRY_ENV = {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# JAX takes 75% of a GPU's memory when it starts unless told not to; torch and CuPy share the GPU here.
GPU_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


@dataclass
class Step:
    name: str
    what: str
    budget: float  # seconds
    argv: list[str]  # after the interpreter
    table: str | None  # the table file it writes, relative to --out
    env: dict = field(default_factory=dict)
    missing: str = ""  # why it cannot run here
    skipped: str = ""  # why it is not run in this mode
    notes: list[str] = field(default_factory=list)
    status: str = "pending"
    seconds: float | None = None
    cpu_seconds: float | None = None  # user + system time of the step's processes


# --------------------------------------------------------------------------- what this machine has


def probe() -> dict:
    """What the steps need, as this interpreter (under the step environment) sees it."""
    import importlib
    import importlib.metadata

    found: dict = {"python": platform.python_version(), "cpu": cpu_model()}

    def version(module: str):
        try:
            return importlib.import_module(module).__version__, ""
        except ModuleNotFoundError as e:
            if e.name == module:
                return None, f"{module} is not installed"
            return None, f"{module} does not import: {e}"
        except Exception as e:  # present but broken (a CUDA library missing, ...): say so
            return None, f"{module} does not import: {type(e).__name__}: {str(e).splitlines()[0][:200]}"

    for name in ("numpy", "pytest", "hypothesis"):
        found[name], found[f"{name}_reason"] = version(name)
    found["torch"], found["torch_reason"] = version("torch")
    found["torch_gpu"] = None
    if found["torch"]:
        import torch

        if torch.cuda.is_available():
            found["torch_gpu"] = torch.cuda.get_device_name(0)
            found["torch_cuda"] = torch.version.cuda
        else:
            found["torch_reason"] = f"torch {torch.__version__} sees no CUDA device"
    found["jax"], found["jax_reason"] = version("jax")
    found["jax_gpu"] = None
    if found["jax"]:
        import jax

        try:
            found["jax_gpu"] = jax.devices("gpu")[0].device_kind
        except RuntimeError as e:
            found["jax_reason"] = f"jax {jax.__version__} has no gpu device ({str(e).splitlines()[0][:160]})"
    found["cupy"], found["cupy_reason"] = version("cupy")
    found["cupy_gpu"] = None
    if found["cupy"]:
        import cupy

        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("no CUDA device")
            name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
            found["cupy_gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as e:  # no driver, no device
            found["cupy_reason"] = f"cupy {cupy.__version__} finds no CUDA device ({str(e).splitlines()[0][:160]})"
    eps = importlib.metadata.entry_points(group="pytest11")  # an installed fire-core registers its plugin here
    found["plugin_installed"] = any(ep.value.split(":")[0] == PLUGIN for ep in eps)
    return found


def probe_machine(dry: bool, timeout: float) -> dict:
    """:func:`probe` in a process with the steps' environment (the dry run's hides CUDA)."""
    env = {**os.environ, **(DRY_ENV if dry else GPU_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_probe"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"finding out what this machine has took over {timeout:.0f} s") from None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise RuntimeError(f"could not find out what this machine has (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}") from None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(found: dict) -> str | None:
    return found.get("torch_gpu") or found.get("cupy_gpu") or found.get("jax_gpu")


def device_line(found: dict, dry: bool) -> str:
    cpu = f"CPU: {found['cpu']} ({os.cpu_count()} logical cores)"
    if dry:
        return f"{cpu}; dry run: CUDA hidden from every step"
    gpus = [f"torch {found['torch']} (CUDA {found.get('torch_cuda')}): {found['torch_gpu']}"
            if found.get("torch_gpu") else None,
            f"jax {found['jax']}: {found['jax_gpu']}" if found.get("jax_gpu") else None,
            f"cupy {found['cupy']}: {found['cupy_gpu']}" if found.get("cupy_gpu") else None]
    return f"GPU: {gpu_name(found)} ({'; '.join(g for g in gpus if g)}); {cpu}"


# --------------------------------------------------------------------------- the plan


def gpu_case_files(tests: Path = TESTS) -> list[Path]:
    """Test files with CUDA cases: a ``gpu`` mark, or a test or fixture taking the suite's backend fixtures.

    A file that parametrizes ``backend`` itself (test_keras.py: Keras backends) does not use the fixture.
    Which tests of these files are CUDA cases is decided per test, once collected (:func:`is_cuda_case`).
    """
    import ast

    files = []
    for path in sorted(tests.glob("test_*.py")):
        text = path.read_text()
        own = re.search(r"""parametrize\(\s*["']backend["']""", text)
        uses = any({"xp", "backend", "fire_backend", "fire_xp"} & {a.arg for a in node.args.args}
                   for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and (node.name.startswith("test") or any("fixture" in ast.unparse(d) for d in node.decorator_list)))
        if "mark.gpu" in text or (uses and not own):
            files.append(path)
    return files


def needs_hypothesis(path: Path) -> bool:
    return re.search(r"^(from|import) hypothesis\b", path.read_text(), re.M) is not None


def _rel(path: Path | str) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def plan(out: Path, dry: bool, found: dict) -> list[Step]:
    """Every step of the run, with its command, time limit and, where it cannot run, why."""
    o = lambda name: _rel(out / name)  # noqa: E731
    gpu = not dry
    steps = []

    check = ["-m", "fire_core", "check", "--bench", "--output", o("check.md"), "--force"]
    steps.append(Step("check", "fire-core check --bench: every backend and device against NumPy float64, and speed",
                      0, check + (["--size", "64"] if dry else []), "check.md"))

    files = gpu_case_files()
    t = Step("tests", "the test suite's CUDA cases (gpu-marked tests; backend tests on torch:cuda, cupy, jax:gpu)",
             0, [], "tests.md")
    if found.get("pytest") is None:
        t.missing = found.get("pytest_reason") or "pytest is not installed"
    if found.get("hypothesis") is None:
        left = [f for f in files if needs_hypothesis(f)]
        files = [f for f in files if f not in left]
        if left:
            t.notes.append(f"hypothesis is absent ({found.get('hypothesis_reason')}): left out "
                           f"{', '.join(f.name for f in left)}, which import it")
    if gpu:
        named = [b for b, key in zip(GPU_BACKENDS, ("torch_gpu", "jax_gpu", "cupy_gpu")) if found.get(key)]
        for b, key in zip(GPU_BACKENDS, ("torch", "jax", "cupy")):
            if b not in named:
                t.notes.append(f"{b} cases not run: {found.get(f'{key}_reason')}")
        if not named:
            reasons = "; ".join(found.get(f"{k}_reason", "") for k in ("torch", "jax", "cupy"))
            t.missing = t.missing or f"no GPU backend: {reasons}"
    else:
        named = ["cupy"]  # torch:cuda/jax:gpu named without a device is an error by design; cupy skips with the reason
        t.notes.append("dry run: CUDA hidden, so the CUDA cases are collected and skipped; the torch:cuda and jax:gpu "
                       "parameters are not generated (FIRE_CORE_BACKENDS may not name an absent device)")
    t.env = {"FIRE_CORE_BACKENDS": ",".join(named) or "cupy"}
    plugin = [] if found.get("plugin_installed") else ["-p", PLUGIN]  # the pytest11 entry point loads it otherwise
    t.argv = [_rel(Path(__file__)), "_pytest", "--log", o("tests.jsonl"), "-q", "-p", "no:cacheprovider", *plugin,
              *[_rel(f) for f in files]]
    t.notes.insert(0, "files: " + ", ".join(f.name for f in files))
    steps.append(t)

    quick = ["--quick"] if dry else []
    device = ["--device", "cpu" if dry else "cuda"]
    n = 64 if dry else 2048
    for backend, sections in (("torch", "1,2"), ("jax", "1,2"), ("cupy", "1")):
        s = Step(f"speed-{backend}", f"benchmarks/speed.py, {backend}: project vs its matmul floor"
                 + (f", fast vs exact polar factors ({n}x{n})" if "2" in sections else ""), 0,
                 ["benchmarks/speed.py", *device, *quick, "--backends", backend, "--sections", sections,
                  "--exact-n", str(n), "--out", o(f"speed-{backend}.md")], f"speed-{backend}.md")
        s.notes.append("section 3 (NumPy on the host) and section 4 (the torch_apply step) left out"
                       + ("" if dry else "; section 2 at 2048, not speed.py's 4096 on cuda, whose float64 NumPy "
                          "reference runs on the host, to stay within the run's limit")
                       + ("; CuPy has no exact polar factor in section 2" if backend == "cupy" else ""))
        if found.get(backend) is None:
            s.missing = found.get(f"{backend}_reason") or f"{backend} is not installed"
        elif gpu and not found.get(f"{backend}_gpu"):
            s.missing = found.get(f"{backend}_reason")
        elif dry and backend == "cupy":
            s.skipped = "dry run: CuPy runs only on a CUDA device"
        steps.append(s)

    ta = Step("torch_apply", "benchmarks/torch_apply.py: fire_core.torch.apply vs the reference's per-layer loop",
              0, ["benchmarks/torch_apply.py", *device, *quick, *(["--repeat", "1", "--models", "gpt"] if dry else []),
                  "--out", o("torch_apply.md")], "torch_apply.md")
    ch = Step("chunks", "benchmarks/chunks.py: reinit_many at 16, 64, 256 MiB a chunk, time and peak memory",
              0, ["benchmarks/chunks.py", *device, *quick, "--out", o("chunks.md")], "chunks.md")
    for s in (ta, ch):
        if found.get("torch") is None or (gpu and not found.get("torch_gpu")):
            s.missing = found.get("torch_reason") or "torch is not installed"
    steps += [ta, ch]
    base = dict(DRY_ENV if dry else GPU_ENV)
    for s in steps:
        s.env = {**base, **s.env}
        s.budget = DRY_LIMIT if dry else BUDGETS[s.name]
    return steps


def command(step: Step) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in step.env.items())
    return f"{env} PYTHONPATH=. python {shlex.join(step.argv)}".strip()


# --------------------------------------------------------------------------- running


def run_step(step: Step, out: Path, limit: float) -> None:
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    log = out / "logs" / f"{step.name}.log"
    print(f"+ {command(step)}  (limit {limit:.0f} s)", flush=True)
    started, used = time.perf_counter(), _children_cpu()
    with open(log, "w") as f:
        f.write(f"$ {command(step)}\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, *step.argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            step.status = "ok" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired:
            _kill(proc)
            step.status = f"TIMEOUT (stopped after {limit:.0f} s)"
        except KeyboardInterrupt:
            _kill(proc)
            step.status = "interrupted"
            raise
        finally:
            step.seconds = time.perf_counter() - started
            step.cpu_seconds = _children_cpu() - used
    if step.status != "ok":
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print("\n".join(f"  | {line}" for line in tail), file=sys.stderr, flush=True)


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _kill(proc: subprocess.Popen) -> None:
    """The step's whole process group (its own session): the step and anything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_results(log: Path) -> tuple[list[dict], int, list[str]]:
    """Each CUDA case of a tests.jsonl with its outcome ("not reached" if the run stopped first)."""
    cases: dict[str, dict] = {}
    deselected, errors = 0, []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "collected":
            deselected = event["deselected"]
            for nodeid in event["nodeids"]:
                cases.setdefault(nodeid, {"test": nodeid, "outcome": "not reached", "seconds": 0.0, "message": ""})
        elif event["event"] == "collect_error":
            errors.append(f"{event['nodeid']}: {event['message']}")
        elif event["event"] == "report":
            c = cases.setdefault(event["nodeid"], {"test": event["nodeid"], "outcome": "not reached",
                                                   "seconds": 0.0, "message": ""})
            c["seconds"] += event["duration"]
            when, outcome = event["when"], event["outcome"]
            if outcome == "failed":
                c["outcome"], c["message"] = ("failed" if when == "call" else f"error in {when}"), event["message"]
            elif outcome == "skipped" and c["outcome"] == "not reached":
                c["outcome"], c["message"] = "skipped", event["message"]
            elif when == "call" and c["outcome"] == "not reached":
                c["outcome"] = outcome
    return list(cases.values()), deselected, errors


def tests_table(log: Path, device: str, cmd: str, dry: bool) -> str:
    """tests.md: the counts, then a row per CUDA case, failures first."""
    cases, deselected, errors = test_results(log)
    order = ("failed", "error in setup", "error in teardown", "not reached", "skipped", "passed")
    counts = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    cases.sort(key=lambda c: (order.index(c["outcome"]) if c["outcome"] in order else 0, c["test"]))
    lines = ["# The test suite's CUDA cases" + (" (dry run: CUDA hidden, so they skip)" if dry else ""), "", device, "",
             f"`{cmd}`", "", f"{len(cases)} CUDA cases ({deselected} other tests of these files deselected): "
             + ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: order.index(kv[0])
                                                        if kv[0] in order else 0)), ""]
    lines += [f"Collection error: {e}" for e in errors] + ([""] if errors else [])
    lines += ["| test | outcome | s | message |", "|---|---|---:|---|"]
    lines += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.2f} | {c['message'].replace('|', '/')} |"
              for c in cases]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, steps: list[Step], found: dict, dry: bool, argv: list[str], seconds: float) -> None:
    device = device_line(found, dry)
    versions = ", ".join(f"{m} {found[m]}" for m in ("numpy", "torch", "jax", "cupy", "pytest", "hypothesis")
                         if found.get(m))
    lines = [f"# GPU run: summary{' (dry run on the CPU: small sizes, not for quoting)' if dry else ''}", "",
             f"* {device}", f"* python {found['python']}; {versions}",
             f"* command: `python benchmarks/gpu.py {shlex.join(argv)}`",
             f"* total wall time: {seconds:.0f} s" + ("" if dry else f" (limit {TOTAL_SECONDS} s)"), "",
             "| step | status | wall s | CPU s | limit s | table | command |", "|---|---|---:|---:|---:|---|---|"]
    for s in steps:
        sec = "" if s.seconds is None else f"{s.seconds:.1f}"
        cpu = "" if s.cpu_seconds is None else f"{s.cpu_seconds:.1f}"
        lines.append(f"| {s.name} | {s.status} | {sec} | {cpu} | {s.budget:.0f} | {s.table or ''} | `{command(s)}` |")
    lines += ["", "Steps:", ""]
    for s in steps:
        lines.append(f"* {s.name}: {s.what}.")
        lines += [f"  * {n}" for n in s.notes]
    lines.append("")
    (out / "summary.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(
        {"dry_run": dry, "device": device, "probe": found, "seconds": seconds,
         "steps": [{**asdict(s), "command": command(s)} for s in steps]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_pytest"]:
        return _pytest(argv[1:])
    if argv[:1] == ["_probe"]:
        print(json.dumps(probe()))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the tables, summary.md and logs/")
    ap.add_argument("--dry-run", action="store_true", help="the same plan on the CPU with small sizes (about a minute)")
    ap.add_argument("--only", default=None, help="comma-separated steps to run (the others are recorded as skipped)")
    ap.add_argument("--list", action="store_true", help="print the plan and run nothing")
    ap.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    a = ap.parse_args(argv)
    started = time.perf_counter()
    deadline = started + TOTAL_SECONDS
    out = a.out.resolve()
    if out.exists() and not out.is_dir():
        ap.error(f"--out {a.out}: exists and is not a folder")
    if not a.list and out.is_dir() and any(out.iterdir()) and not a.force:
        ap.error(f"--out {a.out}: the folder is not empty (pass --force to write into it)")

    try:
        found = probe_machine(a.dry_run, timeout=90)
    except RuntimeError as e:
        print(f"gpu.py: {e}", file=sys.stderr)
        return 2
    if not a.dry_run and not gpu_name(found):
        print("gpu.py: no CUDA device here: " + "; ".join(found[f"{k}_reason"] for k in ("torch", "jax", "cupy"))
              + ". --dry-run runs the plan on the CPU.", file=sys.stderr)
        return 2
    steps = plan(out, a.dry_run, found)
    if a.only is not None:
        chosen = [n for n in a.only.split(",") if n]
        unknown = sorted(set(chosen) - {s.name for s in steps})
        if unknown or not chosen:
            ap.error(f"--only: unknown steps {unknown}; choose from {[s.name for s in steps]}")
        for s in steps:
            if s.name not in chosen and not s.missing:
                s.skipped = "not in --only"
    print(device_line(found, a.dry_run), flush=True)
    if a.list:
        for s in steps:
            state = (f"missing: {s.missing}" if s.missing else f"skipped: {s.skipped}" if s.skipped
                     else f"limit {s.budget:.0f} s")
            print(f"{s.name} ({state}): {command(s)}")
            for n in s.notes:
                print(f"    {n}")
        return 0

    (out / "logs").mkdir(parents=True, exist_ok=True)
    try:
        for s in steps:
            if s.missing:
                s.status = f"missing: {s.missing}"
            elif s.skipped:
                s.status = f"skipped: {s.skipped}"
            else:
                limit = s.budget if a.dry_run else min(s.budget, deadline - time.perf_counter())
                if limit < 5:
                    s.status = "NOT RUN (no time left of the run's limit)"
                else:
                    run_step(s, out, limit)
                    if s.name == "tests" and (out / "tests.jsonl").exists():
                        (out / "tests.md").write_text(tests_table(out / "tests.jsonl", device_line(found, a.dry_run),
                                                                  command(s), a.dry_run))
                    _check_table(s, out, found, a.dry_run)
            took = "" if s.seconds is None else f" ({s.seconds:.1f} s, CPU {s.cpu_seconds:.1f} s)"
            print(f"{s.name}: {s.status}{took}", flush=True)
            write_summary(out, steps, found, a.dry_run, argv, time.perf_counter() - started)
    except KeyboardInterrupt:
        write_summary(out, steps, found, a.dry_run, argv, time.perf_counter() - started)
        print("gpu.py: interrupted", file=sys.stderr)
        return 130
    bad = [s.name for s in steps if not s.status.startswith(("ok", "missing", "skipped"))]
    missing = [s.name for s in steps if s.status.startswith("missing")]
    print(f"wrote {out / 'summary.md'} ({time.perf_counter() - started:.0f} s)")
    if missing:
        print(f"gpu.py: missing here, not run: {', '.join(missing)} (reasons in summary.md)", file=sys.stderr)
    if bad:
        print(f"gpu.py: {', '.join(bad)} did not succeed", file=sys.stderr)
    return 1 if bad else 0


def _check_table(step: Step, out: Path, found: dict, dry: bool) -> None:
    """A step that succeeded wrote its table, and the table names the device it measured."""
    if step.status != "ok" or not step.table:
        return
    path = out / step.table
    if not path.exists():
        step.status = f"FAILED (exit 0 but no {step.table})"
        return
    name = found["cpu"] if dry else gpu_name(found)
    if name not in path.read_text():
        step.notes.append(f"{step.table} does not name the device ({name})")


# --------------------------------------------------------------------------- the tests step's pytest


def _pytest(args: list[str]) -> int:
    """pytest keeping only the CUDA cases (the rest reported as deselected), each result logged as it comes."""
    import pytest

    log = None
    if args[:1] == ["--log"]:
        log, args = args[1], args[2:]
    here = str(HERE)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # benchmarks/ shadows no test module

    class CudaCases:
        def __init__(self):
            self.out = open(log, "w") if log else None

        def write(self, event: dict) -> None:
            if self.out:
                self.out.write(json.dumps(event) + "\n")
                self.out.flush()

        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(self, config, items):
            keep = sorted((i for i in items if is_cuda_case(i)), key=case_rank)
            drop = [i for i in items if not is_cuda_case(i)]
            if drop:
                config.hook.pytest_deselected(items=drop)
            items[:] = keep
            self.write({"event": "collected", "nodeids": [i.nodeid for i in keep], "deselected": len(drop)})

        def pytest_collectreport(self, report):
            if report.failed:
                self.write({"event": "collect_error", "nodeid": report.nodeid, "message": _message(report)})

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                self.write({"event": "report", "nodeid": report.nodeid, "when": report.when,
                            "outcome": report.outcome, "duration": report.duration, "message": _message(report)})

    return int(pytest.main(args, plugins=[CudaCases()]))


def _message(report) -> str:
    """A skip's reason, or a failure's first ``E`` line, on one line."""
    if report.skipped and isinstance(report.longrepr, tuple):
        text = str(report.longrepr[2]).removeprefix("Skipped: ")
    else:
        lines = (getattr(report, "longreprtext", "") or "").splitlines()
        errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
        text = errors[0] if errors else (lines[-1] if lines else "")
    return text.strip()[:200]


def case_rank(item) -> int:
    """The order the CUDA cases run in: gpu-marked, torch:cuda, cupy, then jax:gpu (its compiles take longest)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    backend = next((params.get(k) for k in ("backend", "fire_backend") if params.get(k) in GPU_BACKENDS), None)
    return {None: 0, "torch:cuda": 1, "cupy": 2, "jax:gpu": 3}[backend]


def is_cuda_case(item) -> bool:
    """A test marked ``gpu``, or one parametrized by the backend fixtures on a GPU backend."""
    if item.get_closest_marker("gpu") is not None:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(params.get(k) in GPU_BACKENDS for k in ("backend", "fire_backend"))


if __name__ == "__main__":
    sys.exit(main())
