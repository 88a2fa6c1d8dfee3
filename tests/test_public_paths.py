"""The layout (docs/architecture.md): old import paths still work, and imports only go down the layers."""

import ast
import importlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import fire_core
from fire_core import _PUBLIC

PACKAGE = Path(fire_core.__file__).parent
# the modules each old path needs beyond numpy (an integration imports its trainer)
NEEDS = {
    "lightning": ("lightning",),
    "transformers": ("transformers",),
    "sb3": ("stable_baselines3",),
    "optax": ("optax", "flax"),
    "demo": ("torch",),
    "_pytest_plugin": ("pytest",),
}


@pytest.mark.parametrize("old", sorted(_PUBLIC))
def test_old_path_is_the_moved_module(old):
    for name in NEEDS.get(old, ()):
        pytest.importorskip(name)
    module = importlib.import_module(f"fire_core.{old}")
    assert module is importlib.import_module(f"fire_core.{_PUBLIC[old]}")
    assert sys.modules[f"fire_core.{old}"] is module
    assert getattr(fire_core, old) is module
    assert module.__name__ == module.__spec__.name == f"fire_core.{_PUBLIC[old]}"


def test_from_old_path_import_names():
    from fire_core.conventions import apply_inplace, select
    from fire_core.layout import scale_factor
    from fire_core.metrics import drift
    from fire_core.plan import GPU_CHUNK_BYTES, reinit_many
    from fire_core.report import Report
    from fire_core.schedule import DfIAbove, Every, as_schedule

    assert reinit_many is fire_core.reinit_many and Report is fire_core.Report
    assert GPU_CHUNK_BYTES > 0 and callable(select) and callable(apply_inplace) and callable(scale_factor)
    assert callable(drift) and DfIAbove.__name__ == "DfIAbove"
    assert repr(as_schedule(Every(3))) == "Schedule(Every(3))"


def test_objects_pickle_through_the_moved_modules():
    from fire_core.schedule import Every, Firing

    report = fire_core.Report(method="fire", steps=5, scale="fire")
    for obj in (Every(3), Firing(5, None, ["at step 5"]), report):
        assert type(pickle.loads(pickle.dumps(obj))) is type(obj)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        fire_core.no_such_module  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fire_core.no_such_module")


def test_import_fire_core_imports_no_framework():
    code = (
        "import sys, fire_core, fire_core.plan, fire_core.schedule, fire_core.conventions\n"
        "heavy = ('torch', 'jax', 'flax', 'cupy', 'optax', 'lightning', 'transformers', 'stable_baselines3')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_python_dash_m_fire_core():
    res = subprocess.run([sys.executable, "-m", "fire_core", "--version"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == f"fire-core {fire_core.__version__}"


def test_python_dash_m_through_an_old_path():
    """``python -m fire_core.demo`` (tests/test_demo.py runs the demo itself) finds the moved module's code."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    res = subprocess.run([sys.executable, "-m", "fire_core.demo", "--help"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr


# --------------------------------------------------------------------------- the import graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The fire_core modules ``path`` imports (anywhere in it), old paths read as their new ones."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            head, _, rest = n.partition("fire_core.")
            if head or not rest:
                continue
            old = rest.split(".")[0]
            if old in _PUBLIC:
                n = f"fire_core.{_PUBLIC[old]}" + rest[len(old):]
            found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # an import names a module, or a name inside one: keep the longest module it names
        graph[name] = set()
        for n in _imports(path):
            while n and n not in files:
                n = n.rpartition(".")[0]
            if n and n != name and not name.startswith(n + "."):  # a package is imported before its modules
                graph[name].add(n)
    return graph


def test_core_imports_nothing_above_it():
    above = ("fire_core.torch", "fire_core.flax", "fire_core.cupy", "fire_core.integrations", "fire_core.tools")
    for name, deps in _graph().items():
        if name.startswith("fire_core.core"):
            bad = sorted(d for d in deps if d.startswith(above) or not d.startswith("fire_core.core"))
            assert not bad, f"{name} imports {bad}"


def test_only_array_imports_array_api_compat():
    for path in (PACKAGE / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if any(m.split(".")[0] == "array_api_compat" for m in mods):
            assert path.name == "_array.py", path


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
