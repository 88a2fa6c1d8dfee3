"""Consistency testing across array libraries and devices, for your own code and for FIRE's.

A model ported from PyTorch to JAX, training moved to a GPU, a framework
upgraded: each should leave FIRE's weights where they were. This module runs
one function on every array library and device installed here, from the
same seeded inputs, and measures how far each result lies from NumPy in
float64::

    >>> import fire_core, fire_core.testing as ft
    >>> table = ft.compare(lambda w: fire_core.project(w, 10, method="fast"), (3, 48, 32))
    >>> table.ok
    True
    >>> ft.assert_consistent(lambda w: fire_core.reinit(w, "oihw"), (8, 3, 3, 3))  # raises on a disagreement

Backends (:data:`BACKENDS`): ``numpy``, ``array_api_strict`` (the proof that
code uses only the array API standard), ``torch`` (CPU), ``torch:cuda``,
``jax`` (CPU), ``jax:gpu`` and ``cupy`` (a CUDA device). :func:`backends`
says which are present and, for the others, why not. Importing this module
imports no framework: each is imported when its backend is first asked for.

Tolerances (:data:`TOLERANCES`), on the largest absolute difference divided
by ``max(1, max |reference|)`` (so an absolute bound for results with
entries at most 1, as projections are, and a relative one for larger):

* ``float64``: 1e-12, the bound the project's own tests use between
  frameworks (``tests/test_cross_framework.py``, ``tests/test_cli.py``);
  measured differences are below 1e-14.
* ``float32``: 3e-5, from ``tests/test_polar.py``: every backend's float32
  projection lies within 1.5e-5 of the float64 one (``"fast"``'s first step
  has slope 8.4 at 0 and lifts the rounding of small directions with it), so
  twice that; ``"fire"`` and ``"svd"`` agree within 2e-7.
* ``bfloat16``: 2^-7, one bfloat16 ulp relative (``tests/test_plan.py``):
  fire_core computes bfloat16 in float32 and rounds the result once, so the
  float32 result and the float64 one may round to neighbouring values.

Each dtype's reference is the function in NumPy float64 applied to the
inputs *as rounded to that dtype*, so a row measures the computation, not
the rounding of its inputs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "BACKENDS",
    "DTYPES",
    "TOLERANCES",
    "Backend",
    "Comparison",
    "Row",
    "backends",
    "get",
    "compare",
    "assert_consistent",
]

BACKENDS = ("numpy", "array_api_strict", "torch", "torch:cuda", "jax", "jax:gpu", "cupy")
DTYPES = ("float64", "float32", "bfloat16")
TOLERANCES = {"float64": 1e-12, "float32": 3e-5, "bfloat16": 2.0**-7}

# Backends without a bfloat16 dtype (NumPy, the array API standard, CuPy).
_NO_BFLOAT16 = {"numpy", "array_api_strict", "cupy"}


class Unavailable(Exception):
    """A backend that is not installed here, or whose device is absent; the message says which."""


@dataclass(frozen=True)
class Backend:
    """An array library on one device, as tests see it.

    ``xp`` is its array API namespace; ``asarray`` puts a NumPy array on the
    device (same dtype), ``to_numpy`` brings an array back; ``context()`` is
    entered around any computation (float64 enabled for JAX, only there).
    """

    name: str
    device: str
    xp: object = field(repr=False)
    asarray: Callable = field(repr=False)
    to_numpy: Callable = field(repr=False)
    context: Callable = field(default=contextlib.nullcontext, repr=False)

    def __str__(self) -> str:
        return self.name

    def dtype(self, name: str):
        """The backend's dtype called ``name``; :class:`Unavailable` when it has none."""
        if name == "bfloat16" and self.name.split(":")[0] in _NO_BFLOAT16:
            raise Unavailable(f"{self.name} has no bfloat16")
        return getattr(self.xp, name)


@dataclass(frozen=True)
class Availability:
    """One row of :func:`backends`: ``backend`` when available, else ``reason``."""

    name: str
    backend: Backend | None
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.backend is not None


def _torch(device: str) -> Backend:
    torch = importlib.import_module("torch")
    from array_api_compat import torch as xp_torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable(f"torch {torch.__version__} sees no CUDA device")
    name = "torch" if device == "cpu" else "torch:cuda"
    label = "cpu" if device == "cpu" else f"cuda:0 ({torch.cuda.get_device_name(0)})"
    return Backend(name, label, xp_torch, lambda a: torch.asarray(a, device=device),
                   lambda x: x.detach().cpu().numpy())


def _jax(platform: str) -> Backend:
    jax = importlib.import_module("jax")
    jnp = importlib.import_module("jax.numpy")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise Unavailable(f"jax {jax.__version__} has no {platform} device") from None
    dev = devices[0]
    name = "jax" if platform == "cpu" else "jax:gpu"
    # jax.enable_x64 is a context manager (jax >= 0.4.36 as a top-level name).
    x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else importlib.import_module("jax.experimental").enable_x64
    return Backend(name, f"{dev.platform}:{dev.id} ({dev.device_kind})", jnp,
                   lambda a: jax.device_put(a, dev), np.asarray, context=lambda: x64(True))


def _make(name: str) -> Backend:
    if name == "numpy":
        return Backend("numpy", "cpu", np, np.asarray, np.asarray)
    if name == "array_api_strict":
        strict = importlib.import_module("array_api_strict")
        return Backend(name, "cpu", strict, strict.asarray, lambda x: np.from_dlpack(x))
    if name in ("torch", "torch:cuda"):
        return _torch("cpu" if name == "torch" else "cuda")
    if name in ("jax", "jax:gpu"):
        return _jax("cpu" if name == "jax" else "gpu")
    if name == "cupy":
        cupy = importlib.import_module("cupy")
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # no driver: CUDARuntimeError
            raise Unavailable(f"cupy {cupy.__version__} finds no CUDA driver ({e})") from None
        if count < 1:
            raise Unavailable(f"cupy {cupy.__version__} sees no CUDA device")
        props = cupy.cuda.runtime.getDeviceProperties(0)
        label = f"cuda:0 ({props['name'].decode() if isinstance(props['name'], bytes) else props['name']})"
        return Backend(name, label, cupy, cupy.asarray, lambda x: x.get())
    raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")


_CACHE: dict[str, Availability] = {}


def _available(name: str) -> Availability:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")
    if name not in _CACHE:
        try:
            _CACHE[name] = Availability(name, _make(name))
        except Unavailable as e:
            _CACHE[name] = Availability(name, None, str(e))
        except ImportError as e:
            module = e.name or name.split(":")[0]
            _CACHE[name] = Availability(name, None, f"{module} is not installed ({e})")
    return _CACHE[name]


def get(name: str) -> Backend:
    """The backend called ``name`` (one of :data:`BACKENDS`); :class:`Unavailable` with the reason if absent."""
    found = _available(name)
    if found.backend is None:
        raise Unavailable(f"backend {name} unavailable: {found.reason}")
    return found.backend


def backends(names: Sequence[str] | None = None) -> list[Availability]:
    """Every backend of ``names`` (default :data:`BACKENDS`): available, or with the reason it is not.

    >>> [b.name for b in backends() if b.available][:1]
    ['numpy']
    """
    return [_available(n) for n in (BACKENDS if names is None else names)]


# --------------------------------------------------------------------------- comparison


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` (to nearest, ties to even) and held in float64.

    bfloat16 keeps float32's top 16 bits; NumPy has no bfloat16, so the
    rounding is done on the bit pattern of finite values.
    """
    if dtype == "bfloat16":
        bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
        return bits.view(np.float32).astype(np.float64)
    return np.asarray(a).astype(dtype).astype(np.float64)


def _inputs(arrays, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for a in arrays:
        if isinstance(a, tuple) and all(isinstance(d, (int, np.integer)) for d in a):
            out.append(rng.normal(size=a))  # a shape: seeded standard normal entries
        else:
            a = np.asarray(a)
            if not np.issubdtype(a.dtype, np.floating):
                raise TypeError(f"compare takes floating arrays or shapes, got an array of {a.dtype}")
            out.append(a.astype(np.float64))
    return out


def _leaves(result) -> list:
    """The arrays of a result: an array, or a (nested) tuple, list or dict of arrays."""
    if isinstance(result, dict):
        return [leaf for k in sorted(result) for leaf in _leaves(result[k])]
    if isinstance(result, (tuple, list)):
        return [leaf for r in result for leaf in _leaves(r)]
    return [result]


@dataclass(frozen=True)
class Row:
    """One backend in one dtype: differences against the NumPy float64 reference.

    ``max_abs`` is the largest absolute difference, ``max_rel`` that divided
    by ``max(1, max |reference|)``, compared with ``tol``. ``ok`` is None for
    a row that did not run (``note`` says why), else whether it passed.
    """

    backend: str
    device: str
    dtype: str
    max_abs: float = math.nan
    max_rel: float = math.nan
    tol: float = math.nan
    ok: bool | None = None
    note: str = ""
    present: bool = True  # False: the backend itself is absent here


@dataclass
class Comparison:
    """What :func:`compare` measured: one :class:`Row` per backend and dtype."""

    rows: list[Row]
    name: str = ""

    @property
    def ok(self) -> bool:
        """No row that ran exceeded its tolerance (rows that did not run do not count)."""
        return all(r.ok is not False for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]

    def __iter__(self):
        return iter(self.rows)

    def __str__(self) -> str:
        header = ["backend", "device", "dtype", "max abs", "max rel", "tol", ""]
        body = []
        for r in self.rows:
            if r.ok is None:
                body.append([r.backend, r.device, r.dtype, "-", "-", "-", f"skipped: {r.note}"])
            else:
                verdict = "ok" if r.ok else "FAIL" + (f": {r.note}" if r.note else "")
                body.append([r.backend, r.device, r.dtype, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.tol:.1e}",
                             verdict])
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
        lines = [f"{self.name}: against NumPy float64" if self.name else "against NumPy float64"]
        for cells in [header, *body]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        return "\n".join(lines)


def _measure(got_leaves, want_leaves) -> tuple[float, float, str]:
    if len(got_leaves) != len(want_leaves):
        return math.inf, math.inf, f"{len(got_leaves)} result arrays, the reference has {len(want_leaves)}"
    worst_abs = worst_rel = 0.0
    for got, want in zip(got_leaves, want_leaves):
        if got.shape != want.shape:
            return math.inf, math.inf, f"shape {got.shape}, the reference's is {want.shape}"
        if got.size == 0:
            continue
        diff = np.abs(got - want)
        if not np.all(np.isfinite(diff)):
            return math.inf, math.inf, "non-finite values"
        top = float(np.max(diff))
        worst_abs = max(worst_abs, top)
        worst_rel = max(worst_rel, top / max(1.0, float(np.max(np.abs(want)))))
    return worst_abs, worst_rel, ""


def compare(
    fn: Callable,
    *arrays,
    backends: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float64", "float32"),
    reference: Callable | None = None,
    tolerances: dict | None = None,
    seed: int = 0,
    name: str = "",
) -> Comparison:
    """Run ``fn`` on every backend and dtype from the same inputs; measure each result against NumPy float64.

    ``arrays`` are NumPy arrays (any floating dtype) or shapes, filled with
    seeded standard normal numbers (``seed``). For each dtype the inputs are
    rounded to it, put on each backend's device in that dtype, and passed to
    ``fn``; its result (an array, or a tuple/list/dict of arrays) comes back
    to NumPy and is compared with ``reference`` (default ``fn``) applied to
    the same rounded inputs as NumPy float64 arrays. ``backends`` (default
    all of :data:`BACKENDS`) and ``dtypes`` choose the rows; a backend that is
    absent, or lacks a dtype, gives a row that says so. ``tolerances``
    overrides :data:`TOLERANCES` per dtype. An exception raised by ``fn``
    propagates: it names a bug, not a disagreement.

    bfloat16 is not in the default ``dtypes``: fire_core computes it in
    float32, but a function of your own that multiplies bfloat16 matrices on
    a CPU without bfloat16 instructions may crash the process (SIGILL).
    """
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; expected some of {DTYPES}")
    tol = {**TOLERANCES, **(tolerances or {})}
    inputs = _inputs(arrays, seed)
    reference = fn if reference is None else reference
    rows = []
    wants = {}
    for d in dtypes:
        rounded = [round_to(a, d) for a in inputs]
        wants[d] = (rounded, [np.asarray(x, np.float64) for x in _leaves(reference(*rounded))])
    for b in (BACKENDS if backends is None else backends):
        found = _available(b)
        for d in dtypes:
            if not found.available:
                rows.append(Row(b, "-", d, note=found.reason, present=False))
                continue
            be = found.backend
            try:
                dt = be.dtype(d)
            except Unavailable as e:
                rows.append(Row(b, be.device, d, note=str(e)))
                continue
            rounded, want = wants[d]
            with be.context():
                xs = [be.asarray(a.astype(np.float32) if d == "bfloat16" else a.astype(d)) for a in rounded]
                if d == "bfloat16":
                    xs = [be.xp.astype(x, dt) for x in xs]  # exact: the values are bfloat16 already
                out = _leaves(fn(*xs))
                got = []
                for x in out:
                    if d == "bfloat16" and getattr(x, "dtype", None) == dt:
                        x = be.xp.astype(x, be.xp.float32)
                    got.append(np.asarray(be.to_numpy(x), np.float64))
            abs_, rel, note = _measure(got, want)
            rows.append(Row(b, be.device, d, abs_, rel, tol[d], bool(rel <= tol[d]), note))
    return Comparison(rows, name)


def assert_consistent(fn: Callable, *arrays, backends: Sequence[str] | None = None, **options) -> Comparison:
    """:func:`compare`, raising ``AssertionError`` with the table when a backend exceeds its tolerance.

    A backend named in ``backends`` that is absent is a failure too (so a
    test cannot pass by losing its backend); with ``backends=None`` absent
    ones are listed and skipped. Returns the :class:`Comparison` when all agree.
    """
    table = compare(fn, *arrays, backends=backends, **options)
    missing = [r for r in table.rows if not r.present] if backends is not None else []
    if table.failures or missing:
        lines = [str(table)]
        if table.failures:
            lines.append(f"{len(table.failures)} row(s) beyond tolerance")
        if missing:
            lines.append("requested backends absent: " + ", ".join(sorted({r.backend for r in missing})))
        raise AssertionError("\n".join(lines))
    return table


def requested_backends(env: str | None = None) -> tuple[list[str], bool]:
    """The backends ``FIRE_CORE_BACKENDS`` names (comma-separated), and whether it named any.

    Unset, it is every CPU backend plus ``cupy`` (which needs a GPU and so
    skips on a machine without one); the device backends ``torch:cuda`` and
    ``jax:gpu`` run when named. An unknown name is a ValueError.
    """
    env = os.environ.get("FIRE_CORE_BACKENDS") if env is None else env
    if not env:
        return list(DEFAULT_TEST_BACKENDS), False
    names = [n.strip() for n in env.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise ValueError(f"FIRE_CORE_BACKENDS names unknown backends {unknown}; known: {BACKENDS}")
    return names, True


# The backends a test fixture runs on by default (see requested_backends).
DEFAULT_TEST_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")


# --------------------------------------------------------------------------- fire-core check

CHECK_STEPS = 10  # enough for "fast" to reach the polar factor; "fire" as the reference runs it
_LINEAR, _CONV, _ATTENTION = (24, 40), (8, 3, 3, 3), (16, 4, 4)  # torch Linear "oi", Conv2d "oihw", Flax query "ioo"


def _torch_layouts(method):
    """The reference of an adapter row whose weights are a Linear ("oi") and a Conv2d ("oihw"): reinit of each."""

    def reference(w_lin, w_conv):
        from .. import reinit

        return reinit(w_lin, "oi", steps=CHECK_STEPS, method=method), reinit(w_conv, "oihw", steps=CHECK_STEPS,
                                                                            method=method)

    return reference


def _torch_adapter(method):
    def run(w_lin, w_conv):
        import torch

        import fire_core.torch

        model = torch.nn.Sequential(torch.nn.Linear(40, 24, bias=False), torch.nn.Conv2d(3, 8, 3, bias=False))
        model = model.to(device=w_lin.device, dtype=w_lin.dtype)
        with torch.no_grad():
            model[0].weight.copy_(w_lin)
            model[1].weight.copy_(w_conv)
        fire_core.torch.apply(model, CHECK_STEPS, method=method)
        return model[0].weight.detach(), model[1].weight.detach()

    return run, _torch_layouts(method), (_LINEAR, _CONV), ("torch", "torch:cuda")


def _flax_adapter(method):
    def run(k_dense, k_conv):
        import fire_core.flax

        params = {"Dense_0": {"kernel": k_dense}, "Conv_0": {"kernel": k_conv}}
        new = fire_core.flax.apply(params, CHECK_STEPS, method=method)
        return new["Dense_0"]["kernel"], new["Conv_0"]["kernel"]

    def reference(k_dense, k_conv):
        from .. import reinit

        return reinit(k_dense, "io", steps=CHECK_STEPS, method=method), reinit(k_conv, "hwio", steps=CHECK_STEPS,
                                                                             method=method)

    return run, reference, ((40, 24), (3, 3, 3, 8)), ("jax", "jax:gpu")


def _equinox_adapter(method):
    def run(w_lin, w_conv):
        import equinox as eqx
        import jax

        import fire_core.equinox

        key = jax.random.key(0)
        model = [eqx.nn.Linear(40, 24, use_bias=False, key=key), eqx.nn.Conv2d(3, 8, 3, use_bias=False, key=key)]
        model = eqx.tree_at(lambda m: (m[0].weight, m[1].weight), model, (w_lin, w_conv))
        new = fire_core.equinox.apply(model, CHECK_STEPS, method=method)
        return new[0].weight, new[1].weight

    return run, _torch_layouts(method), (_LINEAR, _CONV), ("jax", "jax:gpu")


def _cupy_adapter(method):
    def run(w_lin, w_conv):
        import fire_core.cupy

        arrays = {"fc.weight": w_lin.copy(), "conv.weight": w_conv.copy()}
        fire_core.cupy.apply(arrays, CHECK_STEPS, method=method)
        return arrays["fc.weight"], arrays["conv.weight"]

    return run, _torch_layouts(method), (_LINEAR, _CONV), ("cupy",)


# Keras has no row: it fixes its backend once per process, at import (KERAS_BACKEND), and places its
# variables on that backend's default device; tests/test_keras.py checks one model on every backend instead.
_ADAPTERS = {"torch": (("torch",), _torch_adapter), "flax": (("jax", "flax"), _flax_adapter),
             "equinox": (("jax", "equinox"), _equinox_adapter), "cupy": (("cupy",), _cupy_adapter)}


def check_cases():
    """``(name, fn, reference, inputs, backends)`` for every check: the core on every backend, each installed adapter.

    ``project`` and ``reinit`` in the three layouts run on every backend; an
    adapter runs on its framework's backends, when its framework is installed
    (absent ones come back as ``(name, reason)`` in the second list).
    """
    from .. import project, reinit

    cases, absent = [], []
    for method in ("fire", "fast", "svd"):
        cases.append((f"project {method}", lambda w, m=method: project(w, CHECK_STEPS, method=m), None,
                      ((3, 48, 32),), None))
        for layout, shape in (("oi", _LINEAR), ("oihw", _CONV), ("ioo", _ATTENTION)):
            cases.append((f"reinit {layout} {method}",
                          lambda w, m=method, lay=layout: reinit(w, lay, steps=CHECK_STEPS, method=m), None,
                          (shape,), None))
    for adapter, (modules, make) in _ADAPTERS.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            absent.append((f"fire_core.{adapter}", f"{missing[0]} is not installed"))
            continue
        for method in ("fire", "fast", "svd"):
            fn, ref, shapes, on = make(method)
            cases.append((f"{adapter}.apply {method}", fn, ref, shapes, on))
    return cases, absent


@dataclass
class CheckResult:
    """The agreement of every check case: ``tables`` maps a case name to its :class:`Comparison`."""

    tables: dict
    absent_adapters: list
    dtypes: tuple

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables.values())

    def __str__(self) -> str:
        present = [a.name for a in backends() if a.available]
        header = ["case", "dtype", "tol", *present]
        body = []
        skipped = {}
        for case, table in self.tables.items():
            for d in self.dtypes:
                cells = [case, d, f"{TOLERANCES[d]:.1e}"]
                for b in present:
                    rows = [r for r in table.rows if (r.backend, r.dtype) == (b, d)]
                    if not rows:
                        cells.append("")  # the case does not run there (another framework's adapter)
                    elif rows[0].ok is None:
                        cells.append("n/a")
                        skipped[rows[0].note] = None
                    else:
                        cells.append(f"{rows[0].max_rel:.1e}" + ("" if rows[0].ok else " FAIL"))
                body.append(cells)
        widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append("Cells: largest difference from NumPy float64 divided by max(1, max |reference|); "
                     "FAIL above tol. Tolerances: fire_core.testing.TOLERANCES.")
        for note in skipped:
            lines.append(f"n/a: {note}")
        for a in backends():
            if not a.available:
                lines.append(f"absent: {a.name}: {a.reason}")
        for name, reason in self.absent_adapters:
            lines.append(f"not checked: {name}: {reason}")
        fails = sum(len(t.failures) for t in self.tables.values())
        ran = sum(1 for t in self.tables.values() for r in t.rows if r.ok is not None)
        lines.append(f"{ran - fails} of {ran} agree" + ("" if not fails else f"; {fails} DISAGREE"))
        return "\n".join(lines)


def check(dtypes: Sequence[str] = DTYPES) -> CheckResult:
    """Every case of :func:`check_cases` on every backend present, in ``dtypes``: what ``fire-core check`` prints."""
    cases, absent = check_cases()
    tables = {}
    for name, fn, ref, shapes, on in cases:
        names = [a.name for a in backends(on) if a.available] if on else [a.name for a in backends() if a.available]
        tables[name] = compare(fn, *shapes, backends=names, dtypes=dtypes, reference=ref, name=name)
    return CheckResult(tables, absent, tuple(dtypes))


# --------------------------------------------------------------------------- fire-core check --bench

BENCH_METHODS = (("fire", 5), ("fast", 8))
_MATMULS_PER_STEP = {"fire": 2, "fast": 3}  # X^T X and X A; the quintic adds A A (fire_core.polar)


def _synchronize(backend: Backend, result) -> None:
    if backend.name.startswith("jax"):
        result.block_until_ready()
    elif backend.name == "torch:cuda":
        import torch

        torch.cuda.synchronize()
    elif backend.name == "cupy":
        import cupy

        cupy.cuda.runtime.deviceSynchronize()


def _best_time(backend: Backend, fn, x, repeat: int) -> float:
    import time

    _synchronize(backend, fn(x))  # warm up: compilation, allocation, autotuning
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        _synchronize(backend, fn(x))
        best = min(best, time.perf_counter() - start)
    return best


def bench(sizes: dict | None = None, repeat: int = 3) -> list[dict]:
    """Per backend and device, float32: ``project``'s time against that device's matmul floor and exact SVD polar.

    The floor is ``matmuls * t(x @ x)``: the matmuls a method does at that
    size (2 a step for ``"fire"``, 3 for ``"fast"``) at the speed of a bare
    matmul of the same matrix. ``efficiency = floor / time`` (1 = nothing
    but matmuls); ``vs_svd = t(U V^T by SVD) / time``. ``sizes`` maps a
    backend name to n (n x n); default 1024 on a CPU, 4096 on a GPU. JAX is
    timed jitted. array_api_strict is left out (it wraps NumPy).
    """
    from .. import project

    rows = []
    for found in backends():
        if not found.available or found.name == "array_api_strict":
            continue
        be = found.backend
        gpu = found.name in ("torch:cuda", "jax:gpu", "cupy")
        n = (sizes or {}).get(found.name, 4096 if gpu else 1024)
        with be.context():
            x = be.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))

            def jit(f, name=found.name):
                if name.startswith("jax"):
                    import jax

                    return jax.jit(f)
                return f

            t_mm = _best_time(be, jit(lambda a: a @ a), x, repeat)

            def svd_polar(a, xp=be.xp):
                u, _, vh = xp.linalg.svd(a, full_matrices=False)
                return u @ vh

            t_svd = _best_time(be, jit(svd_polar), x, repeat)
            for method, steps in BENCH_METHODS:
                t = _best_time(be, jit(lambda a, m=method, s=steps: project(a, s, method=m)), x, repeat)
                floor = _MATMULS_PER_STEP[method] * steps * t_mm
                rows.append({"backend": found.name, "device": be.device, "n": n, "method": method, "steps": steps,
                             "seconds": t, "matmul_seconds": t_mm, "floor_seconds": floor, "efficiency": floor / t,
                             "svd_seconds": t_svd, "vs_svd": t_svd / t})
    return rows


def bench_table(rows: list[dict]) -> str:
    header = ["backend", "device", "n", "method", "steps", "project ms", "floor ms", "efficiency", "svd ms", "vs svd"]
    body = [[r["backend"], r["device"], str(r["n"]), r["method"], str(r["steps"]), f"{r['seconds'] * 1e3:.1f}",
             f"{r['floor_seconds'] * 1e3:.1f}", f"{r['efficiency']:.0%}", f"{r['svd_seconds'] * 1e3:.1f}",
             f"{r['vs_svd']:.1f}x"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("floor = matmuls of the method x time of one bare n x n float32 matmul on that device; "
                 "efficiency = floor / project time; vs svd = exact SVD polar time / project time.")
    return "\n".join(lines)


def environment() -> list[str]:
    """The machine as ``fire-core check --output`` records it: devices, library versions, TF32 settings."""
    import platform

    lines = [f"python {platform.python_version()} on {platform.platform()}"]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    lines.append(f"CPU: {cpu} ({os.cpu_count()} logical cores)")
    for a in backends():
        if a.available and a.name in ("torch:cuda", "jax:gpu", "cupy"):
            lines.append(f"GPU ({a.name}): {a.backend.device}")
    from .. import __version__

    versions = [f"fire_core {__version__}", f"numpy {np.__version__}"]
    for mod in ("array_api_compat", "array_api_strict", "torch", "jax", "jaxlib", "flax", "optax", "cupy"):
        if importlib.util.find_spec(mod) is not None:
            try:
                versions.append(f"{mod} {importlib.import_module(mod).__version__}")
            except Exception as e:  # installed but broken: say so
                versions.append(f"{mod} (import failed: {type(e).__name__})")
    lines.append("versions: " + ", ".join(versions))
    tf32 = []
    if "torch" in {v.split()[0] for v in versions}:
        torch = importlib.import_module("torch")
        tf32.append(f"torch allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
                    f"float32_matmul_precision={torch.get_float32_matmul_precision()!r}")
    if "jax" in {v.split()[0] for v in versions}:
        jax = importlib.import_module("jax")
        tf32.append(f"jax default_matmul_precision={jax.config.jax_default_matmul_precision!r} "
                    "(None: XLA's default, TF32 for float32 on NVIDIA GPUs that have it)")
    if "cupy" in {v.split()[0] for v in versions}:
        tf32.append(f"cupy CUPY_TF32={os.environ.get('CUPY_TF32', '0')!r}")
    lines.append("TF32: " + ("; ".join(tf32) if tf32 else "no GPU library installed"))
    return lines
