"""Shared fixtures: the ``xp`` fixture runs a core test once per array backend.

Backends: numpy, array_api_strict (the proof that the core uses only the
standard), torch, jax (with x64 enabled) and cupy (only with a CUDA device),
as :mod:`fire_core.testing` defines them; ``torch:cuda`` and ``jax:gpu`` run
when named in FIRE_CORE_BACKENDS.
Choose a subset with ``FIRE_CORE_BACKENDS=numpy,torch``. A backend that is not
installed is skipped with the reason; one named in FIRE_CORE_BACKENDS but
missing is an error, so CI cannot silently lose a backend.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from fire_core import _pytest_plugin, testing

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests import it themselves and say so
    pass
else:
    # Nothing in the suite may depend on how fast this machine is right now: on a loaded 2-core machine one
    # example can take seconds, and hypothesis' default 200 ms deadline (and its too_slow health check) would fail
    # a correct test. Explicit @settings inherit these (they are created after this profile is loaded).
    settings.register_profile("fire-core", deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("fire-core")

# The backend table lives in fire_core.testing (users get the same through its pytest plugin's
# fire_backend fixture); these names keep the suite's own spelling.
ALL_BACKENDS = tuple(_pytest_plugin.params())
Backend = testing.Backend
get_backend = _pytest_plugin.backend  # skip with the reason, or error when named in FIRE_CORE_BACKENDS


# The order pytest-xdist hands files out in (README's command: --dist loadfile --no-loadscope-reorder):
# the files that take longest in one process first, longest first (measured with --durations=0 on
# 2 cores: 31-90 s each, of 619 s in all), so that none of them starts last and leaves the other
# workers idle; then the rest by their number of tests, most first (xdist's own default order).
SLOW_FIRST = ("test_keras.py", "test_flax.py", "test_distributed.py", "test_transformers_deepspeed.py",
              "test_gpu_script.py", "test_run_all.py", "test_transformers_fsdp.py", "test_deepspeed.py",
              "test_extreme.py", "test_cli.py", "test_equinox.py", "test_polar.py", "test_flax_stacked.py",
              "test_docs.py")


def pytest_collection_modifyitems(config, items):
    per_file: dict = {}
    for item in items:
        per_file[item.path] = per_file.get(item.path, 0) + 1
    rank = {name: k for k, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), -per_file[item.path]))  # stable within a file


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> Backend:
    return get_backend(request.param)


@pytest.fixture
def xp(backend):
    return backend.xp


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def reference_newton_schulz(w: np.ndarray, steps: int) -> np.ndarray:
    """The paper's iteration written out for one float64 matrix, as the reference code reads.

    Independent of fire_core: tall orientation, Frobenius normalization,
    ``X <- 1.5 X - 0.5 X (X^T X)``, transpose back.
    """
    assert w.ndim == 2
    wide = w.shape[1] > w.shape[0]
    x = w.T if wide else w
    x = x / np.sqrt(np.sum(x * x))
    for _ in range(steps):
        a = x.T @ x
        x = 1.5 * x - 0.5 * (x @ a)
    return x.T if wide else x


def reference_fire_conv(w: np.ndarray, steps: int) -> np.ndarray:
    """FIRE on a torch-layout weight (out, in, *taps), one tap at a time in a plain loop."""
    out = np.empty_like(w)
    taps = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1
    for idx in np.ndindex(*w.shape[2:]):
        sl = (slice(None), slice(None)) + idx
        out[sl] = reference_newton_schulz(w[sl], steps)
    return out * np.sqrt(w.shape[0] / w.shape[1]) / taps


def polar_svd(w: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(w, full_matrices=False)
    return u @ vh


def matrix_with_condition(rng, m: int, n: int, cond: float, dtype=np.float64) -> np.ndarray:
    """U diag(s) V^T with s log-spaced from 1 down to 1/cond."""
    k = min(m, n)
    u, _ = np.linalg.qr(rng.normal(size=(m, k)))
    v, _ = np.linalg.qr(rng.normal(size=(n, k)))
    s = np.geomspace(1.0, 1.0 / cond, k)
    return ((u * s) @ v.T).astype(dtype)


def flax_params(seed=2):
    """A linen-style params tree: Dense, Conv, attention (q/k/v/out) kernels, and leaves FIRE leaves alone."""
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {"kernel": rng.normal(size=(6, 8)), "bias": rng.normal(size=8)},
        "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 6))},
        "attn": {m: {"kernel": rng.normal(size=(8, 2, 4))} for m in ("query", "key", "value")}
        | {"out": {"kernel": rng.normal(size=(2, 4, 8))}},
        "Embed_0": {"embedding": rng.normal(size=(10, 8))},
        "LayerNorm_0": {"scale": rng.normal(size=8)},
    }


@pytest.fixture
def x64():
    """JAX with float64 enabled for the test (restored after); skips without jax and flax. Yields jax."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", old)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(path: Path, name: str):
    """A script outside the package (``benchmarks/*.py``) imported as the module ``name``.

    Its folder is on ``sys.path`` while it runs (its own ``import common``, ``from plasticity import ...``), and
    the module is registered under ``name`` (dataclasses look their module up), which must not be a name the
    script's siblings are imported by.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module
