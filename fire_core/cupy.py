"""FIRE on named CuPy arrays (a state dict kept on the GPU), in place, each on its own device.

>>> import cupy, fire_core.cupy
>>> state = {"fc.weight": cupy.random.standard_normal((256, 128)), "fc.bias": cupy.zeros(256)}
>>> report = fire_core.cupy.apply(state, steps=5)   # fc.weight rewritten in place; fc.bias untouched

Which arrays are projected, and in which layout, follows the ``"torch"`` or
``"flax"`` naming convention of :mod:`fire_core.conventions` (``layouts=`` for
transposed convolutions, ``split=`` for fused layers). The math runs in the
core on the arrays' own device: all matrices of one shape, dtype and device
in one batched projection; every array is validated before any is written.
"""

from __future__ import annotations

try:
    import cupy
except ImportError as e:  # pragma: no cover - depends on the machine
    raise ImportError(
        "fire_core.cupy needs CuPy: pip install 'fire-core[cupy]' (CUDA 12), or the cupy-cuda11x / "
        "cupy-cuda13x wheel that matches your CUDA driver"
    ) from e

from .core.conventions import apply_inplace
from .core.report import Report

__all__ = ["apply"]


def _device(array):
    return cupy.cuda.Device(array.device.id)


def apply(
    arrays,
    steps: int = 5,
    *,
    convention: str = "torch",
    include=None,
    exclude=None,
    method: str = "fire",
    scale="fire",
    layouts=None,
    split=None,
    dry_run: bool = False,
) -> Report:
    """Project the FIRE targets of ``arrays`` (a mapping of names to CuPy arrays) in place.

    ``convention`` is ``"torch"`` (``fc.weight`` as ``(out, in)``, conv
    ``(out, in, kh, kw)``, ``in_proj_weight`` split into q, k, v) or
    ``"flax"`` (``Dense_0/kernel`` as ``(in, out)``, conv ``(kh, kw, in,
    out)``, attention kernels). ``include`` / ``exclude`` are glob patterns on
    names and module prefixes, or a callable; ``method`` and ``scale`` as in
    :func:`fire_core.reinit`. Non-floating arrays are left alone; a value that
    is not a CuPy array, and an argument of the wrong type, is a TypeError.
    ``Report.skipped`` lists every array of two or more axes that was not
    projected, with the reason; the same array under two names is one tied
    weight (one row, ``aliases``). With ``dry_run`` nothing is written and
    the Report shows what would change. Returns the :class:`Report`.
    """
    return apply_inplace(
        arrays, steps, convention=convention, include=include, exclude=exclude, method=method, scale=scale,
        layouts=layouts, split=split, dry_run=dry_run,
        is_array=lambda x: isinstance(x, cupy.ndarray), array_kind="a CuPy array", context=_device,
    )
