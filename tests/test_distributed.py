"""Distributed FIRE: FSDP2 (DTensor) models on 2 gloo ranks, and sharded JAX arrays on 4 host devices.

Each distributed case runs in a subprocess (ranks are spawned there; JAX's
device count is fixed before jax is imported). The FSDP2 results are compared
with the unsharded ``fire_core.torch.apply`` on the same weights, computed in
this process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")
from torch import nn  # noqa: E402

import fire_core.torch as ft  # noqa: E402
from fire_core._distributed_torch import assign_owners, matrix_cost  # noqa: E402

# --- owner assignment --------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_owner_assignment_covers_each_matrix_once_and_is_balanced(world):
    rng = random.Random(world)
    costs = [rng.choice([1, 3, 9, 27]) * rng.randint(1, 50) for _ in range(40)]
    owners = assign_owners(costs, world)
    assert len(owners) == len(costs) and all(0 <= r < world for r in owners)  # each matrix exactly one owner
    loads = [sum(c for c, r in zip(costs, owners) if r == rank) for rank in range(world)]
    assert sum(loads) == sum(costs)
    # greedy largest-first: no rank ends more than the biggest single matrix above the mean
    assert max(loads) <= sum(costs) / world + max(costs)
    assert max(loads) <= 4 / 3 * max(sum(costs) / world, max(costs))  # LPT's bound against the optimum's lower bound


def test_owner_assignment_of_equal_matrices_is_round_robin():
    assert assign_owners([5] * 6, 3) == [0, 1, 2, 0, 1, 2]


def test_matrix_cost_counts_taps_and_the_gram_side():
    assert matrix_cost((8, 3), "oi") == 8 * 3 * 3
    assert matrix_cost((4, 6, 3, 3), "oihw") == 9 * 4 * 6 * 4


# --- FSDP2 on 2 gloo ranks ----------------------------------------------------------------------------

MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Block(nn.Module):  # attention + MLP; 13 hidden units split 7 / 6 over 2 ranks
        def __init__(self, d=10, heads=2, hidden=13):
            super().__init__()
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.norm = nn.LayerNorm(d)
            self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + self.fc2(torch.relu(self.fc1(self.norm(x))))

    def transformer():  # the head's one row leaves rank 1 an empty shard
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 10), Block(), Block(), nn.Linear(10, 1)).double()
    """
)

FSDP2_SCRIPT = MODEL + textwrap.dedent(
    """
    import json, sys, numpy as np, torch.distributed as dist, torch.multiprocessing as mp

    def run(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        import fire_core.torch as ft
        from fire_core import _distributed_torch as fd

        mesh = init_device_mesh("cpu", (2,))
        model, twin = transformer(), transformer()
        for m in (model, twin):
            for block in m[1:3]:
                fully_shard(block, mesh=mesh)
            fully_shard(m, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        model(torch.randn(3, 4, 5, dtype=torch.float64)).square().mean().backward()
        opt.step()  # every parameter now has Adam state
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters()):
                p.to_local().copy_(q.to_local())
        names = [n for n, _ in model.named_parameters()]
        old = {n: p.full_tensor().detach().numpy().copy() for n, p in model.named_parameters()}
        storage = [(p.placements, p.to_local().data_ptr(), tuple(p.to_local().shape)) for p in model.parameters()]
        local = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}

        # a NaN on this rank's shard of a weight owned by the other rank: every rank fails, nothing changes
        fd.last_stats.clear()
        ft.apply(model, dry_run=True)
        owners = fd.last_stats["owners"]
        bad = "1.fc2.weight"
        failed = []
        with torch.no_grad():
            shard = dict(model.named_parameters())[bad].to_local()
            keep = shard[0, 0].item()
            if rank == 0:
                shard[0, 0] = float("nan")
            try:
                ft.apply(model, optimizer=opt)
            except ValueError as err:
                failed.append(str(err))
            shard[0, 0] = keep
        unchanged = all(torch.equal(p.to_local(), local[n]) for n, p in model.named_parameters())
        states = sum(1 for p in model.parameters() if p in opt.state)

        report = ft.apply(model, optimizer=opt)
        stats = dict(fd.last_stats)
        # a replicated DTensor weight: every rank projects it itself, no communication
        from torch.distributed.tensor import Replicate, distribute_tensor
        torch.manual_seed(2)
        solo = nn.Linear(6, 4).double()
        solo.weight = nn.Parameter(distribute_tensor(solo.weight.detach(), mesh, [Replicate()]))
        solo_report = ft.apply(solo)
        solo_new = solo.weight.to_local().detach().numpy()
        replicated = ft.apply(twin, distributed="replicate")
        after = [(p.placements, p.to_local().data_ptr(), tuple(p.to_local().shape)) for p in model.parameters()]
        new = {n: p.full_tensor().detach().numpy() for n, p in model.named_parameters()}
        twin_new = {n: p.full_tensor().detach().numpy() for n, p in twin.named_parameters()}
        kept_state = sorted(n for n, p in model.named_parameters() if p in opt.state)
        np.savez(f"{out}-{rank}.npz", **{"old/" + n: v for n, v in old.items()}, **{"new/" + n: v for n, v in new.items()},
                 **{"twin/" + n: v for n, v in twin_new.items()}, solo=solo_new)
        with open(f"{out}-{rank}.json", "w") as f:
            json.dump(dict(report=report.to_dict(), replicated=replicated.to_dict(), stats=stats, owners=owners,
                           storage_kept=storage == after, failed=failed, unchanged=unchanged, states=states,
                           n_params=len(names), kept_state=kept_state, solo_names=solo_report.names), f)
        dist.barrier()  # no rank tears gloo down while the other still talks
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(source: str, tmp, world: int):
    """Run a rank script; each rank's (arrays from ``r-<rank>.npz``, dict from ``r-<rank>.json``), and the
    unsharded model loaded with the weights the script started from (its ``old/`` arrays)."""
    script = tmp / "ranks.py"
    script.write_text(source)
    out = subprocess.run(
        [sys.executable, str(script), str(_free_port()), str(tmp / "r")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = []
    for rank in range(world):
        with np.load(tmp / f"r-{rank}.npz") as arrays:
            tensors = {k: arrays[k] for k in arrays.files}
        ranks.append((tensors, json.loads((tmp / f"r-{rank}.json").read_text())))
    namespace = {}
    exec(MODEL, namespace)
    plain = namespace["transformer"]()
    old = {k[len("old/") :]: v for k, v in ranks[0][0].items() if k.startswith("old/")}
    plain.load_state_dict({k: torch.from_numpy(v) for k, v in old.items()})
    return ranks, plain


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """Run the 2-rank FSDP2 script once; its per-rank outputs and the unsharded model's, for the tests below."""
    ranks, plain = _run_ranks(FSDP2_SCRIPT, tmp_path_factory.mktemp("fsdp2"), 2)
    report = ft.apply(plain)
    return ranks, plain, report


def test_fsdp2_owner_result_equals_unsharded_apply(fsdp2_run):
    ranks, plain, _ = fsdp2_run
    for tensors, _ in ranks:
        for name, p in plain.named_parameters():
            np.testing.assert_allclose(tensors["new/" + name], p.detach().numpy(), rtol=0, atol=1e-10, err_msg=name)


def test_fsdp2_replicate_strategy_equals_unsharded_apply(fsdp2_run):
    ranks, plain, _ = fsdp2_run
    for tensors, _ in ranks:
        for name, p in plain.named_parameters():
            np.testing.assert_allclose(tensors["twin/" + name], p.detach().numpy(), rtol=0, atol=1e-10, err_msg=name)


def test_fsdp2_report_is_complete_and_equal_on_every_rank(fsdp2_run):
    ranks, _, report = fsdp2_run
    first = ranks[0][1]["report"]
    assert ranks[1][1]["report"] == first
    assert [row["name"] for row in first["rows"]] == report.names
    for got, want in zip(first["rows"], report.rows):
        for key in ("scale", "sfe", "dfi_before", "dfi_after"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (got["name"], key)
    assert [row["name"] for row in ranks[0][1]["replicated"]["rows"]] == report.names


def test_replicated_dtensor_weight_equals_unsharded_apply(fsdp2_run):
    ranks, _, _ = fsdp2_run
    torch.manual_seed(2)
    solo = nn.Linear(6, 4).double()
    ft.apply(solo)
    for tensors, info in ranks:
        np.testing.assert_allclose(tensors["solo"], solo.weight.detach().numpy(), rtol=0, atol=1e-12)
        assert info["solo_names"] == ["weight"]


def test_fsdp2_weights_stay_sharded_in_their_own_storage(fsdp2_run):
    ranks, _, _ = fsdp2_run
    assert all(info["storage_kept"] for _, info in ranks)  # placements, local data_ptr and shard shapes


def test_fsdp2_optimizer_state_dropped_for_projected_weights_only(fsdp2_run):
    ranks, plain, report = fsdp2_run
    projected = {name.split("[")[0] for name in report.names}
    others = sorted(n for n, _ in plain.named_parameters() if n not in projected)
    for _, info in ranks:
        assert info["states"] == info["n_params"]  # the failed call dropped nothing
        assert info["kept_state"] == others


def test_fsdp2_failure_on_one_rank_fails_every_rank_and_changes_nothing(fsdp2_run):
    ranks, _, _ = fsdp2_run
    for _, info in ranks:
        assert len(info["failed"]) == 1 and "1.fc2.weight" in info["failed"][0] and "NaN" in info["failed"][0]
        assert info["unchanged"]


def test_fsdp2_work_is_split_over_owners(fsdp2_run):
    ranks, _, report = fsdp2_run
    stats = [info["stats"] for _, info in ranks]
    assert stats[0]["owners"] == stats[1]["owners"]  # every rank agrees on the assignment
    assert sorted(set(stats[0]["owners"])) == [0, 1]
    assert stats[0]["weights"] + stats[1]["weights"] == len(report)  # each matrix projected on one rank
    total = stats[0]["cost"] + stats[1]["cost"]
    assert max(s["cost"] for s in stats) <= 0.6 * total
    # no rank receives the whole model: what a rank receives is about the other rank's shards of its half
    for s in stats:
        assert 0 < s["received"] and 0 < s["sent"]


HSDP_SCRIPT = MODEL + textwrap.dedent(
    """
    import json, sys, numpy as np, torch.distributed as dist, torch.multiprocessing as mp

    def run(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        import fire_core.torch as ft
        from fire_core import _distributed_torch as fd

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        model = transformer()
        for block in model[1:3]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        placements = sorted({str(p.placements) for p in model.parameters()})
        old = {n: p.full_tensor().detach().numpy().copy() for n, p in model.named_parameters()}
        storage = [(p.placements, p.to_local().data_ptr(), tuple(p.to_local().shape)) for p in model.parameters()]
        report = ft.apply(model)
        stats = dict(fd.last_stats)
        after = [(p.placements, p.to_local().data_ptr(), tuple(p.to_local().shape)) for p in model.parameters()]
        new = {n: p.full_tensor().detach().numpy() for n, p in model.named_parameters()}
        # replicated on both mesh dimensions: every rank projects it itself
        torch.manual_seed(2)
        solo = nn.Linear(6, 4).double()
        solo.weight = nn.Parameter(distribute_tensor(solo.weight.detach(), mesh, [Replicate(), Replicate()]))
        ft.apply(solo)
        np.savez(f"{out}-{rank}.npz", **{"old/" + n: v for n, v in old.items()}, **{"new/" + n: v for n, v in new.items()},
                 solo=solo.weight.to_local().detach().numpy())
        with open(f"{out}-{rank}.json", "w") as f:
            json.dump(dict(report=report.to_dict(), stats=stats, placements=placements, storage_kept=storage == after), f)
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=4)
    """
)


def test_hsdp_owner_ranks_on_a_2d_mesh_equal_unsharded_apply(tmp_path):
    """HSDP (Replicate, Shard) on a 2 x 2 mesh: owners within each shard group, same result as unsharded."""
    ranks, plain = _run_ranks(HSDP_SCRIPT, tmp_path, 4)
    report = ft.apply(plain)
    torch.manual_seed(2)
    solo = nn.Linear(6, 4).double()
    ft.apply(solo)
    assert ranks[0][1]["placements"] == ["(Replicate(), Shard(dim=0))"]
    for tensors, info in ranks:
        for name, p in plain.named_parameters():
            np.testing.assert_allclose(tensors["new/" + name], p.detach().numpy(), rtol=0, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(tensors["solo"], solo.weight.detach().numpy(), rtol=0, atol=1e-12)
        assert [row["name"] for row in info["report"]["rows"]] == report.names  # complete on every rank
        assert info["storage_kept"]
        assert info["stats"]["world"] == 2  # owners are the ranks of a shard group, not all four
    stats = [info["stats"] for _, info in ranks]
    assert stats[0]["owners"] == stats[1]["owners"] == stats[2]["owners"] and sorted(set(stats[0]["owners"])) == [0, 1]
    # each shard group projects every matrix once; the two replica groups do the same work
    assert stats[0]["weights"] + stats[1]["weights"] == stats[2]["weights"] + stats[3]["weights"] == len(report)


# --- JAX arrays sharded over 4 host devices -----------------------------------------------------------------

JAX_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import fire_core
    jax.config.update("jax_enable_x64", True)
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 24))
    k = rng.normal(size=(3, 3, 8, 12))
    ws = jax.device_put(w, NamedSharding(mesh, P("x", None)))
    ks = jax.device_put(k, NamedSharding(mesh, P(None, None, None, "x")))
    assert np.max(np.abs(np.asarray(fire_core.reinit(ws, "io")) - np.asarray(fire_core.reinit(w, "io")))) <= 1e-12
    got = {}
    rep = fire_core.reinit_many([("w", ws, "io"), ("k", ks, "hwio")], write=got.__setitem__)
    assert np.max(np.abs(np.asarray(got["k"]) - np.asarray(fire_core.reinit(k, "hwio")))) <= 1e-12
    assert rep.names == ["w", "k"] and rep["k"]["taps"] == 9
    print("OK")
    """
)


def _on_four_host_devices(source: str) -> None:
    """Run a script that prints OK in a process with 4 JAX host devices (set before jax is imported)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


def test_reinit_on_sharded_jax_arrays_outside_jit():
    pytest.importorskip("jax")
    _on_four_host_devices(JAX_SCRIPT)


def test_unknown_distributed_strategy_is_refused_before_anything_is_written():
    model = nn.Linear(3, 4)
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match="distributed"):
        ft.apply(model, distributed="allgather")
    assert torch.equal(model.weight, before)


STACKED_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import fire_core.flax as ff
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    params = {f"layer{k}": {"kernel": rng.normal(size=(32, 24))} for k in range(5)}  # 5 same-shaped leaves
    plain = ff.apply(jax.tree.map(jnp.asarray, params), scale="variance")
    for mode in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((4,), ("x",), axis_types=(mode,))
        shard = jax.tree.map(lambda a: NamedSharding(mesh, P("x", None)), params)
        ps = jax.device_put(params, shard)
        outs = [ff.apply(ps, scale="variance")]
        if mode == AxisType.Explicit:
            jitted = jax.jit(lambda p: ff.apply(p, scale="variance"))
            outs.append(jitted(ps))
            hlo = jitted.lower(ps).compile().as_text()
            # each device projects whole matrices: weights move (all-to-all), no Gram product is all-reduced
            assert "all-to-all" in hlo and "all-reduce" not in hlo and "all-gather" not in hlo, hlo
        for out in outs:
            for a, b, c in zip(jax.tree.leaves(out), jax.tree.leaves(plain), jax.tree.leaves(ps)):
                assert a.sharding.is_equivalent_to(c.sharding, a.ndim), (mode, a.sharding, c.sharding)
                assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 1e-12, mode
    print("OK")
    """
)


def test_same_shaped_sharded_flax_leaves_are_projected_whole_per_device():
    pytest.importorskip("flax")
    _on_four_host_devices(STACKED_SCRIPT)


@pytest.mark.slow
def test_benchmark_script_quick_mode(tmp_path):
    pytest.importorskip("jax")
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "distributed.py")
    out = tmp_path / "distributed.md"
    res = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(out)], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert "| 2 | 1 | 6 | 0.500 |" in text  # rank 1 of 2 owns half of the 12 matrices and half the work
    assert "(the adapter stacks) | all-to-all" in text
