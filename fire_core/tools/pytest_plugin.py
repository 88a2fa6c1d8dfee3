"""The pytest plugin of :mod:`fire_core.testing`: ``fire_backend`` and ``fire_xp`` fixtures for your tests.

Installed with fire-core (entry point ``pytest11``), so any test suite can write::

    def test_my_layer_agrees(fire_backend):
        w = fire_backend.asarray(np.random.default_rng(0).normal(size=(64, 32)))
        out = fire_backend.to_numpy(my_fire_step(w))
        ...

and the test runs once per backend: ``numpy``, ``array_api_strict``,
``torch``, ``jax`` (float64 enabled) and ``cupy``, plus ``torch:cuda`` and
``jax:gpu`` when ``FIRE_CORE_BACKENDS`` (or ``--fire-backends``) names them.
A backend that is not installed skips with the reason; one named in
``FIRE_CORE_BACKENDS`` but absent is an error (``cupy`` skips), so a CI job
cannot silently lose a backend. ``fire_xp`` is the backend's array API
namespace. Disable the plugin with ``-p no:fire_core``.
"""

from __future__ import annotations

import os

import pytest

from . import testing


def params() -> list[str]:
    """The fixture's parameters: the default test backends and every backend ``FIRE_CORE_BACKENDS`` names."""
    try:
        named, _ = testing.requested_backends()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    return list(dict.fromkeys([*testing.DEFAULT_TEST_BACKENDS, *named]))


def backend(name: str) -> testing.Backend:
    """The backend ``name`` for a test: skipped (with the reason) when not requested or absent.

    Absent but named in ``FIRE_CORE_BACKENDS``: an error (``cupy`` excepted).
    JAX gets ``jax_enable_x64`` switched on for the session, so that
    ``jnp.asarray`` of a float64 array stays float64 in the test's own code.
    """
    try:
        names, strict = testing.requested_backends()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if name not in names:
        pytest.skip(f"{name} not in FIRE_CORE_BACKENDS")
    found = testing.backends([name])[0]
    if not found.available:
        if strict and name != "cupy":
            raise testing.Unavailable(f"backend {name} is named in FIRE_CORE_BACKENDS but unavailable: {found.reason}")
        pytest.skip(f"backend {name} unavailable: {found.reason}")
    if name.startswith("jax"):
        import jax

        jax.config.update("jax_enable_x64", True)
    return found.backend


def pytest_addoption(parser):
    parser.addoption("--fire-backends", metavar="NAMES", default=None,
                     help="comma-separated backends for the fire_backend fixture (sets FIRE_CORE_BACKENDS); "
                          f"known: {','.join(testing.BACKENDS)}")


def pytest_configure(config):
    value = config.getoption("--fire-backends", default=None)
    if value:
        os.environ["FIRE_CORE_BACKENDS"] = value


def pytest_generate_tests(metafunc):
    if "fire_backend" in metafunc.fixturenames:
        metafunc.parametrize("fire_backend", params(), indirect=True)


@pytest.fixture
def fire_backend(request) -> testing.Backend:
    return backend(request.param)


@pytest.fixture
def fire_xp(fire_backend):
    return fire_backend.xp
