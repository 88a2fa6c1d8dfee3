"""The one module that talks to array-api-compat, plus the checks every entry point shares.

Nothing here imports a framework: ``is_torch_array`` and friends look at
``sys.modules`` only, so a framework is touched only when the caller already
passed one of its arrays.
"""

from __future__ import annotations

import sys

import numpy as np
from array_api_compat import (
    array_namespace,
    device,
    is_cupy_array,
    is_jax_array,
    is_torch_array,
    is_torch_namespace,
    to_device,
)

__all__ = [
    "array_namespace",
    "device_of",
    "is_tracing",
    "is_torch_namespace",
    "is_plain_tensor",
    "dense",
    "check_finite",
    "work_dtype",
    "to_floats",
    "on_accelerator",
]


def device_of(x):
    """The array's device, or None where it has none to report (a JAX tracer, a JAX array on several devices).

    A JAX array sharded over several devices reports its sharding as its
    device, which cannot place a new array of another shape; new arrays made
    next to it (``asarray(..., device=None)``) go to the default device and
    JAX moves them as the sharded computation needs.
    """
    if is_jax_array(x):
        try:
            if len(x.sharding.device_set) > 1:
                return None
        except Exception:  # tracers have no concrete sharding
            return None
    try:
        return device(x)
    except Exception:  # tracers and exotic wrappers
        return None


def on_accelerator(x) -> bool:
    """True for an array on a GPU (or another accelerator): CuPy, torch off the CPU, JAX off the CPU."""
    if is_cupy_array(x):
        return True
    if is_torch_array(x):
        return x.device.type not in ("cpu", "meta")
    if is_jax_array(x):
        try:
            return any(d.platform != "cpu" for d in x.sharding.device_set)
        except Exception:  # a tracer: where it runs is not known here
            jax = sys.modules["jax"]
            return jax.default_backend() != "cpu"
    return False


def is_plain_tensor(x) -> bool:
    """A concrete ``torch.Tensor`` itself: not a subclass (a DTensor), not traced (``torch.compile``).

    Fast paths that write in place or into views (``out=``) take only these.
    """
    torch = sys.modules.get("torch")
    return torch is not None and type(x) is torch.Tensor and not is_tracing(x)


def is_tracing(x) -> bool:
    """True while ``x`` is a symbolic value (``jax.jit``, ``torch.compile``, ``torch.jit``).

    Value checks need a concrete array; under tracing they are skipped.
    """
    if is_jax_array(x):
        jax = sys.modules["jax"]
        return isinstance(x, jax.core.Tracer)
    if is_torch_array(x):
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return True
        functorch = getattr(torch._C, "_functorch", None)
        return bool(functorch is not None and functorch.is_functorch_wrapped_tensor(x))
    return False


def work_dtype(x, xp, what: str = "input"):
    """The dtype the math runs in: float32/float64 as given, narrower floats in float32.

    Integer, bool and complex arrays are a TypeError (complex would need the
    conjugate transpose, which is not implemented).
    """
    dtype = x.dtype
    if xp.isdtype(dtype, "complex floating"):
        raise TypeError(f"{what}: complex arrays are not supported, got {dtype} with shape {tuple(x.shape)}")
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"{what}: expected a real floating-point array, got {dtype} with shape {tuple(x.shape)}")
    if dtype == xp.float32 or dtype == xp.float64:
        return dtype
    if xp.finfo(dtype).bits < 32:  # float16, bfloat16, float8 ...
        return xp.float32
    raise TypeError(f"{what}: unsupported floating dtype {dtype} (use float16/bfloat16/float32/float64)")


def check_finite(x, xp, what: str = "input") -> None:
    """ValueError if ``x`` holds NaN or Inf. Skipped (no host sync possible) under tracing.

    A DTensor (a sharded torch weight) is judged over its whole device mesh:
    every rank of the mesh reaches the same verdict and raises the same error
    (see :func:`_check_finite_on_mesh`). Like every DTensor operation this is
    a collective: all ranks of the mesh must call it, in the same order.
    """
    if is_tracing(x):
        return
    if _is_dtensor(x):
        _check_finite_on_mesh(x, what)
        return
    # One reduction instead of an elementwise test and a second reduction: a NaN
    # or Inf anywhere makes the sum NaN or Inf. Only a non-finite sum (which a
    # finite array can also give, by overflow) is checked element by element.
    with np.errstate(over="ignore", invalid="ignore"):  # NumPy would warn on Inf - Inf and overflow
        total = xp.sum(x)
    if bool(xp.isfinite(total)):
        return
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{what}: contains NaN or Inf (shape {tuple(x.shape)})")


def _is_dtensor(x) -> bool:
    """A torch DTensor; none can exist unless ``torch.distributed.tensor`` was imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _check_finite_on_mesh(x, what: str) -> None:
    """:func:`check_finite` of a DTensor, with the verdict of every rank of its mesh.

    A rank holds only its local shard, and a reduction of a sharded DTensor
    is left ``Partial`` (each rank's value covers its shard only), which
    ``bool()`` reads locally: the rank whose shard holds the NaN would raise
    while the others went on into the next collective and waited there for
    ever. Here each rank tests its own shard and the integer flags are
    summed over every mesh dimension (an exact all-reduce), so every rank
    holds the same numbers and decides alike. As for any array, the first
    pass is one sum of the shard (NaN or Inf anywhere makes it non-finite);
    only when some rank's sum is not finite (which a finite shard can also
    give, by overflow) does every rank count its non-finite elements, and
    the error names the ranks whose shards hold them. A replicated copy is
    tested on every rank too, so a NaN in one replica only is found.
    """
    torch = sys.modules["torch"]
    mesh = x.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is outside the mesh: it holds nothing and joins none of its collectives
        return
    placements = list(x.placements)
    if any(p.is_partial() for p in placements):  # the local values are addends of the weight's, not its elements
        replicate = sys.modules["torch.distributed.tensor"].Replicate()
        x = x.redistribute(mesh, [replicate if p.is_partial() else p for p in placements])
    with torch.no_grad():
        local = x.to_local()
        suspect = torch.logical_not(torch.isfinite(local.sum())).to(torch.int32).reshape(1)
        sum_over_mesh(suspect, mesh)
        if int(suspect.item()) == 0:
            return
        # One slot per rank of the mesh, each filled by its own rank only: the sum is every rank's count.
        counts = torch.zeros(mesh.size(), dtype=torch.int64, device=local.device)
        counts[int(np.ravel_multi_index(tuple(coordinate), tuple(mesh.shape)))] = torch.logical_not(
            torch.isfinite(local)
        ).sum()
        sum_over_mesh(counts, mesh)
        counts = counts.tolist()
    if not any(counts):  # every element finite: some local sum overflowed
        return
    ranks = mesh.mesh.flatten().tolist()
    held = [f"rank {ranks[k]} ({n} value{'s' if n > 1 else ''})" for k, n in enumerate(counts) if n]
    shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more ranks" if len(held) > 4 else "")
    raise ValueError(
        f"{what}: contains NaN or Inf (shape {tuple(x.shape)}, sharded {tuple(placements)}; "
        f"non-finite values in the local shard of {shown})"
    )


def largest_magnitude_on_mesh(x) -> float:
    """``max |x|`` of a whole DTensor, the same on every rank of its mesh.

    Each rank reduces its own shard (an empty shard, which FSDP2 gives a
    rank when a weight has fewer rows than the mesh has ranks, counts as 0)
    and the results are all-reduced with MAX over every mesh dimension.
    ``torch.amax`` of the DTensor itself fails on an empty local shard.
    Partial placements are first made replicated, as in :func:`check_finite`.
    """
    torch, dist = sys.modules["torch"], sys.modules["torch.distributed"]
    mesh = x.device_mesh
    placements = list(x.placements)
    if any(p.is_partial() for p in placements):
        replicate = sys.modules["torch.distributed.tensor"].Replicate()
        x = x.redistribute(mesh, [replicate if p.is_partial() else p for p in placements])
    with torch.no_grad():
        local = x.to_local()
        top = torch.zeros(1, dtype=torch.float64, device=local.device)
        if local.numel():
            top[0] = torch.maximum(local.max(), -local.min()).to(torch.float64)
        if mesh.get_coordinate() is not None:
            for dim in range(mesh.ndim):
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return float(top.item())


def sum_over_mesh(t, mesh) -> None:
    """All-reduce the torch tensor ``t`` in place over every rank of ``mesh``: a sum along each mesh dimension in turn.

    Exact for integers, and each rank ends with the same values: after the
    sums along dimensions ``0..k`` a rank holds the sum over the ranks that
    differ from it in those coordinates only.
    """
    dist = sys.modules["torch.distributed"]
    for dim in range(mesh.ndim):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))


def dense(x, xp):
    """``x`` in row-major order, copied only if it is not already.

    A conv layer's taps are strided views of its kernel; everything done to
    them elementwise (norms, scaling, differences) runs 3-4x faster on one
    row-major copy. JAX arrays and array-api-strict's have no strides to fix.
    """
    if is_torch_array(x):
        return x.contiguous()
    if is_cupy_array(x):
        return sys.modules["cupy"].ascontiguousarray(x)
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x)
    return x


def whole(x):
    """``x`` itself, or for a DTensor the whole tensor on every rank (for short per-matrix vectors only)."""
    return x.full_tensor() if _is_dtensor(x) else x


def to_floats(x) -> list[float]:
    """A 1-D array -> Python floats, in one host transfer where the backend allows it."""
    if is_cupy_array(x):
        return x.get().astype(np.float64).tolist()
    if is_torch_array(x):
        if callable(getattr(x, "full_tensor", None)):  # a DTensor: gather the (short) vector first
            x = x.full_tensor()
        return x.detach().to("cpu", dtype=sys.modules["torch"].float64).tolist()
    try:
        return np.asarray(x, dtype=np.float64).tolist()
    except Exception:
        pass
    try:
        return np.asarray(to_device(x, "cpu"), dtype=np.float64).tolist()
    except Exception:
        return [float(x[i]) for i in range(x.shape[0])]
