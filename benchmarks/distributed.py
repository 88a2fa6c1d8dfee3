"""FIRE on sharded models: communication and time per rank vs world size (CPU, gloo), and sharded JAX.

Run from the repository root (needs the ``torch`` and ``jax`` extras):

    python benchmarks/distributed.py           # writes benchmarks/results/distributed-cpu.md
    python benchmarks/distributed.py --quick   # a small model, few repeats (smoke test of the script)

PyTorch part: ``world`` CPU processes (1, 2, 4) join a gloo process group,
each builds the same transformer-shaped model (float32; per block a
``nn.MultiheadAttention`` with its fused ``in_proj_weight`` projected as q, k,
v, and a 4x MLP; no embedding), shards it with FSDP2 (``fully_shard`` per
block and at the root, on ``init_device_mesh("cpu", (world,))``; HSDP on
a 2 x 2 mesh, ``(Replicate(), Shard(0))``: two replicas, each sharded over
two ranks; and tensor parallel + FSDP2 on a 2 x 2 ``("dp", "tp")`` mesh:
per block ``parallelize_module`` on the "tp" dimension with ``fc1``
colwise, ``fc2`` and ``attn.out_proj`` rowwise, ``in_proj_weight``
``Shard(0)`` (the heads split, as a colwise q/k/v would be), then
``fully_shard`` on "dp", so every matrix is sharded along both mesh
dimensions) and times
``fire_core.torch.apply`` (``report=True``, the default) on every rank. For
the default ``distributed="owner"`` strategy the bytes each rank sent and
received are counted by the implementation itself
(``fire_core.torch._distributed.last_stats``: the payloads of its gathers and
scatters, padding included, not the small ``all_gather_object`` of the report
rows), with the share of the projection work (``taps * d_out * d_in * n``)
each rank owned. ``distributed="replicate"`` (every rank runs the core on the
DTensors, whose sharded matmuls communicate implicitly) is timed for
comparison; its collectives are counted with ``CommDebugMode``.

JAX part, in a subprocess with 4 host devices: the same kind of parameter
tree as Flax kernels, every leaf sharded along its first axis
(``P("x", None)``, FSDP style). ``jax.jit(fire_core.flax.apply)`` (XLA
partitions each matrix's matmuls: the Gram products are all-reduced) is
compared with stacking same-shaped leaves on a new leading axis sharded over
the devices (each device then projects whole matrices; XLA moves the weights
with all-to-all). The collectives of the compiled programs are read from the
HLO text; wire bytes per device are estimated from each collective's result
buffers (ring all-reduce ``2 (p-1)/p B``, all-gather and all-to-all
``(p-1)/p B``). All times are the minimum over repeats, on a machine shared
with other jobs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# --- PyTorch: FSDP2 on gloo ------------------------------------------------------------------------------


def transformer(d: int, blocks: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(d, max(1, d // 64), batch_first=True)
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    torch.manual_seed(0)
    return nn.Sequential(*(Block() for _ in range(blocks)))


LAYOUTS = {"hsdp": "2x2 HSDP", "tp": "2x2 TP+FSDP2"}  # the 2 x 2 meshes of 4 ranks, by name


def _mesh_shape(world) -> tuple:
    """``4`` -> (4,): FSDP2 over 4 ranks; ``"hsdp"``: 2 replicas sharded over 2 ranks each; ``"tp"``: TP + FSDP2."""
    return (world,) if isinstance(world, int) else (2, 2)


def _label(world) -> str:
    return str(world) if isinstance(world, int) else LAYOUTS[world]


def _replicas(world) -> int:
    """How many copies of the whole projection work the ranks do (HSDP: one per replica group)."""
    return 2 if world == "hsdp" else 1


def _shard(model, world):
    """Shard ``model`` as ``world`` says (see the module docstring); the mesh."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    shape = _mesh_shape(world)
    names = {"hsdp": ("replicate", "shard"), "tp": ("dp", "tp")}.get(world)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    dp = mesh
    if world == "tp":
        dp = mesh["dp"]
        for block in model:
            plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel(), "attn.out_proj": RowwiseParallel()}
            parallelize_module(block, mesh["tp"], plan)
            w = block.attn.in_proj_weight
            block.attn.in_proj_weight = nn.Parameter(distribute_tensor(w.detach(), mesh["tp"], [Shard(0)]))
    for block in model:
        fully_shard(block, mesh=dp)
    fully_shard(model, mesh=dp)
    return mesh


def _rank(rank, world, rendezvous, cfg, out):
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    import fire_core.torch as ft
    from fire_core.torch import _distributed as fd

    torch.set_num_threads(1)  # one core per rank, as ranks on one machine would be given
    size = math.prod(_mesh_shape(world))
    # a file rendezvous: no TCP port to pick, so none another process on the machine can take first
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size)
    model = transformer(cfg["d"], cfg["blocks"])
    _shard(model, world)
    saved = [p.to_local().detach().clone() for p in model.parameters()]
    result = {}
    for strategy in ("owner", "replicate"):
        times = []
        for _ in range(cfg["repeats"]):
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.to_local().copy_(s)
            dist.barrier()
            t = time.perf_counter()
            if strategy == "replicate" and not times:
                with CommDebugMode() as comm:
                    ft.apply(model, distributed=strategy)
                counts = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
            else:
                ft.apply(model, distributed=strategy)
            times.append(time.perf_counter() - t)
        entry = {"ms": 1e3 * min(times)}
        if strategy == "owner":
            stats = fd.last_stats
            entry.update(sent=stats["sent"], received=stats["received"], weights=stats["weights"], cost=stats["cost"])
        else:
            entry.update(collectives=counts)
        result[strategy] = entry
    gathered = [None] * size
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()
    _exit_now()


def _exit_now() -> None:
    """End a rank with status 0 once its work is written, without the interpreter's teardown.

    Once (in CI, 2 cores shared by two test processes) rank 0 died after its work with
    "terminate called without an active exception" (SIGABRT), and mp.spawn then failed the
    whole run. Threads that outlive destroy_process_group (gloo's, and on rank 0 the TCPStore
    server's) are torn down with the interpreter, where gloo's threads can abort the process
    (described in pytorch/pytorch pull request #179291). Nothing of the benchmark is left to
    do at that point.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torch_runs(cfg) -> dict[int, list[dict]]:
    import torch.multiprocessing as mp

    runs = {}
    for world in cfg["worlds"]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "ranks.json")
            rendezvous = os.path.join(tmp, "rendezvous")
            mp.spawn(_rank, args=(world, rendezvous, cfg, out), nprocs=math.prod(_mesh_shape(world)))
            runs[world] = json.loads(Path(out).read_text())
    return runs


def model_facts(cfg) -> tuple[int, int]:
    """(weights FIRE projects, their bytes in float32) of the benchmark model."""
    import fire_core.torch as ft

    model = transformer(cfg["d"], cfg["blocks"])
    rep = ft.apply(model, dry_run=True)
    return len(rep), sum(4 * r["taps"] * (r["shape"][0] * r["shape"][1]) for r in rep.rows)


# --- JAX: current sharded path vs same-shaped leaves stacked over the devices --------------------------------

JAX_CHILD = r"""
import os, re, sys, json, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import fire_core, fire_core.flax as ff
from fire_core.layout import parse_layout, scale_factor

cfg = json.loads(sys.argv[1])
d, blocks, repeats = cfg["d"], cfg["blocks"], cfg["repeats"]
mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
rng = np.random.default_rng(0)
params = {f"block{k}": {name: {"kernel": rng.normal(size=shape).astype(np.float32)} for name, shape in
          (("query", (d, d)), ("key", (d, d)), ("value", (d, d)), ("out", (d, d)), ("up", (d, 4 * d)), ("down", (4 * d, d)))}
          for k in range(blocks)}
shard = jax.tree.map(lambda a: NamedSharding(mesh, P("x", None)), params)
ps = jax.device_put(params, shard)

def stacked(tree, pin):
    # same-shaped leaves on a new leading axis, sharded over the devices; each device projects whole matrices
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    groups = {}
    for i, a in enumerate(leaves):
        groups.setdefault((a.shape, str(a.dtype)), []).append(i)
    out = list(leaves)
    for (shape, _), idx in groups.items():
        s = jax.lax.with_sharding_constraint(jnp.stack([leaves[i] for i in idx]), NamedSharding(mesh, P("x")))
        new = fire_core.reinit(s, "zio", scale=scale_factor("fire", parse_layout("io", shape)))  # z: one tap per leaf
        if pin:  # the result kept in the stack's sharding, as the adapter does
            new = jax.lax.with_sharding_constraint(new, NamedSharding(mesh, P("x")))
        for j, i in enumerate(idx):
            out[i] = new[j]
    return jax.tree_util.tree_unflatten(treedef, out)

WIRE = {"all-reduce": lambda b: 2 * 3 / 4 * b, "all-gather": lambda b: 3 / 4 * b, "all-to-all": lambda b: 3 / 4 * b,
        "reduce-scatter": lambda b: 3 * b, "collective-permute": lambda b: b}
SIZE = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2}

def collectives(hlo):
    counts, wire = {}, 0.0
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) (all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)(-start)?\(", line)
        if not m:
            continue
        counts[m.group(2)] = counts.get(m.group(2), 0) + 1
        b = sum(SIZE[t] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
                for t, dims in re.findall(r"(f32|f64|bf16|f16)\[([\d,]*)\]", m.group(1)))
        wire += WIRE[m.group(2)](b)
    return counts, wire

explicit = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
ps_explicit = jax.device_put(params, jax.tree.map(lambda a: NamedSharding(explicit, P("x", None)), params))
result = {}
for name, f, args in (
    ("current", jax.jit(ff.apply, out_shardings=shard), ps),
    ("unpinned", jax.jit(lambda t: stacked(t, False), out_shardings=shard), ps),
    ("stacked", jax.jit(lambda t: stacked(t, True), out_shardings=shard), ps),
    ("adapter", jax.jit(ff.apply), ps_explicit),
):
    counts, wire = collectives(f.lower(args).compile().as_text())
    out = jax.block_until_ready(f(args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); jax.block_until_ready(f(args)); times.append(time.perf_counter() - t)
    kept = all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(args)))
    result[name] = dict(collectives=counts, wire_mb=wire / 2**20, ms=1e3 * min(times), kept=kept, out=out)
result["unpinned"].pop("out")
a, b, c = (result[k].pop("out") for k in ("current", "stacked", "adapter"))
result["max_diff"] = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
result["max_diff_adapter"] = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                                 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
print("RESULT " + json.dumps(result))
"""


def jax_run(cfg) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, "-c", JAX_CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=1800
    )
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    line = next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


# --- the report ------------------------------------------------------------------------------------------


def render(cfg, facts, runs, jax_result, machine_line) -> str:
    count, nbytes = facts
    lines = [
        "# FIRE on sharded models (CPU)",
        "",
        f"Machine: {machine_line}. Shared with other jobs; each torch rank runs one thread.",
        "",
        f"## PyTorch FSDP2, HSDP and TP + FSDP2, gloo: transformer d={cfg['d']}, {cfg['blocks']} blocks, float32",
        "",
        f"{count} weight matrices ({nbytes / 2**20:.1f} MiB) projected; steps=5, report on. "
        f"Owner strategy (default): per-rank bytes counted by the implementation (gather + scatter payloads, "
        f"padding included); replicate: collectives counted by `CommDebugMode` on its first call. "
        f"Times: min over {cfg['repeats']} calls.",
        "",
        "| world | rank | owner: weights | owner: work share | owner: sent MiB | owner: received MiB | owner ms | replicate ms | replicate collectives |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for world, ranks in runs.items():
        total = sum(r["owner"]["cost"] for r in ranks) / _replicas(world) or 1  # each replica does the whole work
        for rank, r in enumerate(ranks):
            o, rep = r["owner"], r["replicate"]
            coll = ", ".join(f"{k} {v}" for k, v in sorted(rep["collectives"].items())) or "none"
            lines.append(
                f"| {_label(world)} | {rank} | {o['weights']} | {o['cost'] / total:.3f} | {o['sent'] / 2**20:.2f} | "
                f"{o['received'] / 2**20:.2f} | {o['ms']:.0f} | {rep['ms']:.0f} | {coll} |"
            )
    lines += ["", "Slowest rank per world size (the call ends when the last rank is done):", ""]
    lines += ["| world | owner ms | replicate ms |", "|---:|---:|---:|"]
    for world, ranks in runs.items():
        lines.append(
            f"| {_label(world)} | {max(r['owner']['ms'] for r in ranks):.0f} | {max(r['replicate']['ms'] for r in ranks):.0f} |"
        )
    j = jax_result
    lines += [
        "",
        f"## JAX, 4 host devices: {cfg['jax_blocks']} blocks of d={cfg['jax_d']} kernels "
        f"(4 of d x d, d x 4d, 4d x d), float32, every leaf `P(\"x\", None)`",
        "",
        "| path | collectives in the compiled program | est. wire MiB per device | ms | shardings kept |",
        "|---|---|---:|---:|---|",
    ]
    labels = {
        "current": "`jax.jit(apply, out_shardings=...)`, Auto mesh: XLA's sharded matmuls",
        "unpinned": "same-shaped leaves stacked, only the stack's input sharding constrained",
        "stacked": "same-shaped leaves stacked, input and result constrained to the stack sharding",
        "adapter": "`jax.jit(apply)`, Explicit mesh (the adapter stacks)",
    }
    for name in ("current", "unpinned", "stacked", "adapter"):
        r = j[name]
        coll = ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items())) or "none"
        lines.append(f"| {labels[name]} | {coll} | {r['wire_mb']:.2f} | {r['ms']:.0f} | {r['kept']} |")
    lines += [
        "",
        f"Largest difference from the current path's results: stacked {j['max_diff']:.2g}, "
        f"adapter {j['max_diff_adapter']:.2g} (float32).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small model and few repeats (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/distributed-cpu.md)")
    args = ap.parse_args(argv)
    if args.quick:
        cfg = dict(d=64, blocks=2, repeats=2, worlds=(2, "tp"), jax_d=64, jax_blocks=4)  # worlds 1, 4, HSDP in the full run
    else:
        cfg = dict(d=256, blocks=8, repeats=5, worlds=(1, 2, 4, "hsdp", "tp"), jax_d=256, jax_blocks=8)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine

    runs = torch_runs(cfg)
    jax_result = jax_run(dict(d=cfg["jax_d"], blocks=cfg["jax_blocks"], repeats=cfg["repeats"]))
    text = render(cfg, model_facts(cfg), runs, jax_result, machine("cpu"))
    out = args.out or RESULTS / ("distributed-cpu-quick.md" if args.quick else "distributed-cpu.md")
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
