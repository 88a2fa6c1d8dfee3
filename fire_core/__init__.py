"""fire_core: FIRE (Frobenius-Isometry REinitialization) for every array framework.

FIRE (Han et al., ICLR 2026) restores a network's plasticity at a shift in its
training data by replacing each weight matrix with (an approximation of) its
nearest orthogonal matrix, scaled to the layer's shape. The core here is
written once against the array API standard and runs on NumPy, PyTorch, JAX,
CuPy and any other compliant library; ``fire_core.torch``, ``fire_core.flax``
and ``fire_core.cupy`` map framework structures onto it.

>>> import numpy as np, fire_core
>>> w = np.random.default_rng(0).normal(size=(128, 64))
>>> new = fire_core.reinit(w, "oi", steps=5)          # a torch-Linear-shaped weight
>>> q = fire_core.project(w, 30, method="fast")       # the polar factor U V^T
>>> float(fire_core.dfi(q)) < 1e-20
True
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .core.layout import from_matrices, to_matrices
from .core.metrics import dfi, sfe
from .core.plan import reinit, reinit_many
from .core.polar import METHODS, project
from .core.report import Report

__version__ = "0.1.0"

__all__ = [
    "project",
    "reinit",
    "reinit_many",
    "to_matrices",
    "from_matrices",
    "sfe",
    "dfi",
    "Report",
    "METHODS",
    "__version__",
]

# --------------------------------------------------------------------------- public paths of moved modules
# The import paths the README, docs and users' code show, kept working after the modules moved into
# core/, integrations/ and tools/ (docs/architecture.md). ``fire_core.<old>`` is the very module object
# ``fire_core.<new>``, imported only when asked for: ``import fire_core`` still imports no framework.
_PUBLIC = {
    # the array-API core
    "_array": "core._array",
    "polar": "core.polar",
    "layout": "core.layout",
    "metrics": "core.metrics",
    "diagnostics": "core.diagnostics",
    "plan": "core.plan",
    "report": "core.report",
    "conventions": "core.conventions",
    "schedule": "core.schedule",
    # the trainer integrations
    "lightning": "integrations.lightning",
    "transformers": "integrations.transformers",
    "sb3": "integrations.sb3",
    "optax": "integrations.optax",
    # the tools
    "cli": "tools.cli",
    "testing": "tools.testing",
    "demo": "tools.demo",
    "_pytest_plugin": "tools.pytest_plugin",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``fire_core.<old>`` for each row of ``_PUBLIC`` and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package != __name__ or old not in _PUBLIC:
            return None
        real = importlib.util.find_spec(f"{__name__}.{_PUBLIC[old]}")  # imports the new path's parents only
        return importlib.util.spec_from_loader(fullname, self, origin=real.origin)

    def create_module(self, spec):
        # the module under its new name (imported now if it was not); the import system then files it
        # under the old name too, in sys.modules and as an attribute of fire_core.
        module = importlib.import_module(f"{__name__}.{_PUBLIC[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # already executed under its new name; the import system stamped the old name's spec on it: undo that
        module.__spec__ = module.__spec__.loader_state

    def get_code(self, fullname):
        # ``python -m fire_core.demo`` (runpy) runs the new module's code; runpy gives it the old name's
        # package, so a module run this way imports its neighbours by absolute paths (as demo does)
        real = importlib.util.find_spec(f"{__name__}.{_PUBLIC[fullname.rpartition('.')[2]]}")
        return real.loader.get_code(real.name)


# one finder, also when this package is imported afresh (a test that clears sys.modules)
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_Alias" or type(f).__module__ != __name__]
sys.meta_path.append(_Alias())


def __getattr__(name):
    """``fire_core.plan`` and the other old paths as attributes, imported on first use."""
    if name in _PUBLIC:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name not in (f"{__name__}.{name}", f"{__name__}.{_PUBLIC[name]}"):
                raise  # the module is there but needs a framework that is not: say which
            raise AttributeError(f"module {__name__!r} has no attribute {name!r} ({e})") from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
