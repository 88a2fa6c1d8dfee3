"""Distributed FIRE: DTensor models on gloo ranks (FSDP2 and tensor parallel on 2 ranks, HSDP and TP + FSDP2
on 2 x 2 meshes of 4 ranks), and sharded JAX arrays on 4 host devices.

Each distributed case runs in a subprocess (ranks are spawned there; JAX's
device count is fixed before jax is imported); the torch cases share one
2-rank and one 4-rank run, since starting ranks costs most of the time. The
results are compared with the unsharded ``fire_core.torch.apply`` on the
same weights, computed in this process.
"""

from __future__ import annotations

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
from ranks import run_ranks  # noqa: E402
from fire_core.torch._distributed import assign_owners, matrix_cost  # noqa: E402

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


# --- DTensor models on gloo ranks: FSDP2 and TP on 2 ranks, HSDP and TP + FSDP2 on 4 -----------------

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

MLP = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp():  # under TP the first two Linears are split over the ranks, the last stays a plain tensor
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 5)).double()

    def deep_mlp():  # TP + FSDP2: four Linears split colwise / rowwise, the last one left to FSDP2 alone
        torch.manual_seed(0)
        sizes = [6, 10, 8, 12, 9, 5]  # 10 and 9 rows: uneven pieces on the 2 x 2 mesh
        layers = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers[:-1]).double()

    TP_PLAN = {"0": "colwise", "2": "rowwise", "4": "colwise", "6": "rowwise"}
    """
)

RANK_HELPERS = textwrap.dedent(
    """
    import datetime, json, os, sys
    import numpy as np, torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch.distributed.tensor import DTensor
    from ranks import finish

    STRATEGIES = ("owner", "replicate")

    def start(rank, rendezvous, world):
        # A file rendezvous, not a TCP port: no port to pick, so none another process can take first. A mismatched
        # collective fails after the timeout instead of hanging; generous, since a loaded machine starts ranks slowly.
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=240))

    def local_part(t):
        return t.to_local() if isinstance(t, DTensor) else t

    def snapshot(model, opt=None):
        # this rank's own bytes: the local shards of the parameters and of the optimizer state
        params = {n: local_part(p).detach().clone() for n, p in model.named_parameters()}
        state = {} if opt is None else {
            n: {k: local_part(v).detach().clone() for k, v in opt.state[p].items()}
            for n, p in model.named_parameters() if p in opt.state
        }
        return params, state

    def same(a, b):
        (pa, sa), (pb, sb) = a, b
        return (pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa) and sa.keys() == sb.keys()
                and all(sa[n].keys() == sb[n].keys() and all(torch.equal(sa[n][k], sb[n][k]) for k in sa[n])
                        for n in sa))

    def restore(model, saved):
        with torch.no_grad():
            for n, p in model.named_parameters():
                local_part(p).copy_(saved[0][n])

    def poisoned(rank, model, opt, strategy, name, bad_rank, value):
        # apply with `value` in one element of `bad_rank`'s local shard of `name` only; the others hold it clean
        import fire_core.torch as ft
        before = snapshot(model, opt)
        shard = local_part(dict(model.named_parameters())[name])
        error = None
        with torch.no_grad():
            if rank == bad_rank:
                shard[0, 0] = value
        try:
            ft.apply(model, optimizer=opt, distributed=strategy)
        except ValueError as err:
            error = str(err)
        with torch.no_grad():
            if rank == bad_rank:
                shard[0, 0] = before[0][name][0, 0]
        return dict(strategy=strategy, weight=name, bad_rank=bad_rank, value=value, error=error,
                    unchanged=same(before, snapshot(model, opt)))

    def trained(model):
        # an optimizer with state for every parameter, after one step of the sharded model
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        model(torch.randn(4, 6, dtype=torch.float64)).square().mean().backward()
        opt.step()
        return opt

    def full(model):
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().numpy().copy()
                for n, p in model.named_parameters()}

    def results(rank, model, opt, bad):
        # each poisoned call, then each strategy's clean result from the same weights
        import fire_core.torch as ft
        old, saved = full(model), snapshot(model)
        cases = [poisoned(rank, model, opt, s, name, bad_rank, value)
                 for s in STRATEGIES for name, bad_rank, value in bad]
        new, names = {}, {}
        for s in STRATEGIES:
            restore(model, saved)
            names[s] = ft.apply(model, distributed=s).names
            new.update({f"{s}/{n}": v for n, v in full(model).items()})
        restore(model, saved)
        arrays = {**{"old/" + n: v for n, v in old.items()}, **new}
        return cases, names, arrays

    """
)

TWO_RANK_SCRIPT = MODEL + MLP + RANK_HELPERS + textwrap.dedent(
    """
    def tp(rank, mesh):
        # tensor parallel on the 2 ranks: poisoned calls and clean results, and check_finite on DTensors
        from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        from fire_core._array import array_namespace, check_finite
        from fire_core.torch import apply as ft_apply

        model = mlp()
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        placements = {n: str(getattr(p, "placements", None)) for n, p in model.named_parameters()}
        opt = trained(model)
        # 0: colwise, 2: rowwise, 4: a plain weight the TP plan left out (each rank holds its own copy)
        bad = [("0.weight", 0, float("nan")), ("2.weight", 1, float("inf")), ("4.weight", 1, float("nan"))]
        cases, names, arrays = results(rank, model, opt, bad)

        def verdict(x):  # check_finite's error text on this rank, or None
            try:
                check_finite(x, array_namespace(x), "w")
            except ValueError as err:
                return str(err)
            return None

        copy = torch.ones(3, 4, dtype=torch.float64)
        if rank == 1:
            copy[2, 1] = float("nan")
        direct = dict(
            # a replicated weight whose copy on rank 1 alone holds a NaN
            replica=verdict(DTensor.from_local(copy, mesh, [Replicate()])),
            # Partial(sum): a finite addend on each rank, an Inf in the weight they add up to
            partial=verdict(DTensor.from_local(torch.full((3, 4), 1e308, dtype=torch.float64), mesh, [Partial()])),
            # finite values whose local sums overflow to Inf
            overflow=verdict(distribute_tensor(torch.full((4, 4), 1e308, dtype=torch.float64), mesh, [Shard(0)])),
        )
        # per-layer drift on a probe: a colwise layer's output is a shard on each rank
        torch.manual_seed(7)
        probed = ft_apply(model, probe=torch.randn(4, 6, dtype=torch.float64), dry_run=True)
        drifts = dict(model=probed.drift, rows={row["name"]: row["drift"] for row in probed.rows})
        info = dict(cases=cases, names=names, placements=placements, direct=direct, drifts=drifts)
        return {"tp/" + k: v for k, v in arrays.items()}, info

    def run(rank, rendezvous, out):
        start(rank, rendezvous, 2)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        import fire_core.torch as ft
        from fire_core.torch import _distributed as fd

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
        tp_arrays, tp_info = tp(rank, mesh)
        arrays = {**{"old/" + n: v for n, v in old.items()}, **{"new/" + n: v for n, v in new.items()},
                  **{"twin/" + n: v for n, v in twin_new.items()}, "solo": solo_new, **tp_arrays}
        finish(rank, out, arrays, dict(
            report=report.to_dict(), replicated=replicated.to_dict(), stats=stats, owners=owners,
            storage_kept=storage == after, failed=failed, unchanged=unchanged, states=states, n_params=len(names),
            kept_state=kept_state, solo_names=solo_report.names, tp=tp_info,
        ))

    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
    """
)


def _loaded(ranks, source: str = MODEL, build: str = "transformer", prefix: str = ""):
    """The unsharded model ``build()`` of ``source``, loaded with the weights the script started from
    (its ``<prefix>old/`` arrays)."""
    namespace = {}
    exec(source, namespace)
    plain = namespace[build]()
    start = prefix + "old/"
    old = {k[len(start) :]: v for k, v in ranks[0][0].items() if k.startswith(start)}
    plain.load_state_dict({k: torch.from_numpy(v) for k, v in old.items()})
    return plain


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The 2-rank script's per-rank outputs (FSDP2 and tensor parallel), run once for the tests below."""
    return run_ranks(TWO_RANK_SCRIPT, tmp_path_factory.mktemp("two_ranks"), 2)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """The 4-rank script's per-rank outputs (HSDP and TP + FSDP2 on 2 x 2 meshes), run once."""
    return run_ranks(FOUR_RANK_SCRIPT, tmp_path_factory.mktemp("four_ranks"), 4)


@pytest.fixture(scope="module")
def fsdp2_run(two_ranks):
    """The FSDP2 part of the 2-rank run, and the unsharded model after ``apply`` with its report."""
    plain = _loaded(two_ranks)
    report = ft.apply(plain)
    return two_ranks, plain, report


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


FOUR_RANK_SCRIPT = MODEL + MLP + RANK_HELPERS + textwrap.dedent(
    """
    def tp_fsdp2(rank, hsdp_mesh):
        # TP + FSDP2 on a 2 x 2 mesh; then a NaN in one replica of an HSDP weight, and shards that are not
        # torch.chunk's pieces
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        import fire_core.torch as ft
        from fire_core.torch import _distributed as fd

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = deep_mlp()
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(model, mesh["tp"], {name: styles[style]() for name, style in TP_PLAN.items()})
        fully_shard(model, mesh=mesh["dp"])
        placements = {n: str(p.placements) for n, p in model.named_parameters()}
        opt = trained(model)
        cases, names, arrays = results(rank, model, opt, [("0.weight", 0, float("nan")), ("2.weight", 3, float("inf"))])
        # the owner path with the optimizer: who projected what, the state kept, the storage kept
        storage = [(p.placements, p.to_local().data_ptr(), tuple(p.to_local().shape)) for p in model.parameters()]
        states = sum(1 for p in model.parameters() if p in opt.state)
        report = ft.apply(model, optimizer=opt)
        stats = dict(fd.last_stats)
        after = [(p.placements, p.to_local().data_ptr(), tuple(p.to_local().shape)) for p in model.parameters()]
        arrays.update({"opt/" + n: v for n, v in full(model).items()})
        owner = dict(report=report.to_dict(), stats=stats, storage_kept=storage == after, states=states,
                     kept_state=sorted(n for n, p in model.named_parameters() if p in opt.state))

        # HSDP (Replicate, Shard): owner ranks in each shard group; the NaN in rank 0's shard is in one
        # replica only, and the other replica group must stop too
        hsdp = mlp()
        fully_shard(hsdp, mesh=hsdp_mesh)
        hsdp_case = poisoned(rank, hsdp, trained(hsdp), "owner", "2.weight", 0, float("nan"))
        hsdp_case["placements"] = str(hsdp[2].weight.placements)

        # 8 rows held 2 / 3 / 1 / 2 where torch.chunk gives 2 each: ranks 0 and 3 hold a piece of the size
        # torch.chunk gives, ranks 1 and 2 do not, and all four must refuse alike
        odd = nn.Linear(5, 8).double()
        torch.manual_seed(3)
        piece = torch.randn([2, 3, 1, 2][rank], 5, dtype=torch.float64)
        line = init_device_mesh("cpu", (4,))
        odd.weight = nn.Parameter(DTensor.from_local(piece, line, [Shard(0)], shape=(8, 5), stride=(5, 1)))
        try:
            ft.apply(odd)
            odd_error = None
        except ValueError as err:
            odd_error = str(err)
        odd_case = dict(error=odd_error, unchanged=torch.equal(odd.weight.to_local(), piece))
        # the same on the 2 x 2 mesh, sharded along both dimensions: (4, 3) each, but ranks 2 and 3 hold (2, 3)
        piece2 = torch.randn([4, 4, 2, 2][rank], 3, dtype=torch.float64)
        odd.weight = nn.Parameter(DTensor.from_local(piece2, mesh, [Shard(0), Shard(1)], shape=(8, 6), stride=(6, 1)))
        try:
            ft.apply(odd)
            odd_case["error_2d"] = None
        except ValueError as err:
            odd_case["error_2d"] = str(err)
        odd_case["unchanged_2d"] = torch.equal(odd.weight.to_local(), piece2)
        info = dict(cases=cases, names=names, placements=placements, hsdp=hsdp_case, odd=odd_case, owner=owner)
        return {"tp/" + k: v for k, v in arrays.items()}, info

    def run(rank, rendezvous, out):
        start(rank, rendezvous, 4)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        import fire_core.torch as ft
        from fire_core.torch import _distributed as fd

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
        tp_arrays, tp_info = tp_fsdp2(rank, mesh)
        arrays = {**{"old/" + n: v for n, v in old.items()}, **{"new/" + n: v for n, v in new.items()},
                  "solo": solo.weight.to_local().detach().numpy(), **tp_arrays}
        finish(rank, out, arrays, dict(
            report=report.to_dict(), stats=stats, placements=placements, storage_kept=storage == after, tp=tp_info
        ))

    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=4)
    """
)


def test_hsdp_owner_ranks_on_a_2d_mesh_equal_unsharded_apply(four_ranks):
    """HSDP (Replicate, Shard) on a 2 x 2 mesh: owners within each shard group, same result as unsharded."""
    ranks = four_ranks
    plain = _loaded(ranks)
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


# --- failures are collective: a NaN or Inf in one rank's shard ----------------------------------------------
#
# Tensor parallel (ColwiseParallel / RowwiseParallel) on 2 ranks, and TP + FSDP2 on a 2 x 2 mesh of 4 ranks,
# with a NaN or an Inf in one rank's local shard only: every rank must raise the same error and keep every
# byte of its parameters and optimizer state. A verdict read from one rank's shard alone lets only that rank
# raise while the others wait in the next collective: the rank scripts set a 240 s gloo timeout and the runner
# kills them after RANK_TIMEOUT, so a hang fails the test instead of stalling CI. (The cases run in the
# 2-rank and the 4-rank scripts above: their `tp` and `tp_fsdp2` functions.)


def _tp_part(ranks, build="mlp"):
    """The tensor-parallel part of a rank run: per rank (its ``tp/`` arrays unprefixed, its ``tp`` dict),
    and the unsharded MLP with the weights it started from, after ``apply``, with its report."""
    plain = _loaded(ranks, MLP, build, prefix="tp/")
    report = ft.apply(plain)
    part = [({k[len("tp/") :]: v for k, v in t.items() if k.startswith("tp/")}, info["tp"]) for t, info in ranks]
    return part, (plain, report)


@pytest.fixture(scope="module")
def tp_run(two_ranks):
    return _tp_part(two_ranks)


@pytest.fixture(scope="module")
def tp_fsdp2_run(four_ranks):
    return _tp_part(four_ranks, "deep_mlp")


def _cases(ranks, strategy):
    """Per poisoned call: the ranks' (error, unchanged) results, one list per call."""
    per_rank = [[c for c in info["cases"] if c["strategy"] == strategy] for _, info in ranks]
    return list(zip(*per_rank))


def _assert_same_error_everywhere(results, weight):
    errors = [r["error"] for r in results]
    assert errors[0] is not None, f"no rank raised for {weight}"
    assert all(e == errors[0] for e in errors), errors  # every rank: the same ValueError
    assert weight in errors[0] and "NaN or Inf" in errors[0], errors[0]


@pytest.mark.parametrize("strategy", ["owner", "replicate"])
def test_tp_nan_in_one_ranks_shard_fails_every_rank_with_the_same_error(tp_run, strategy):
    ranks, _ = tp_run
    assert ranks[0][1]["placements"]["0.weight"] == "(Shard(dim=0),)"  # colwise
    assert ranks[0][1]["placements"]["2.weight"] == "(Shard(dim=1),)"  # rowwise
    for results in _cases(ranks, strategy):
        _assert_same_error_everywhere(results, results[0]["weight"])


@pytest.mark.parametrize("strategy", ["owner", "replicate"])
def test_tp_failed_call_leaves_every_ranks_weights_and_optimizer_state_bitwise_unchanged(tp_run, strategy):
    ranks, _ = tp_run
    for results in _cases(ranks, strategy):
        assert all(r["unchanged"] for r in results), [(r["weight"], r["unchanged"]) for r in results]


@pytest.mark.parametrize("strategy", ["owner", "replicate"])
def test_tp_result_equals_unsharded_apply(tp_run, strategy):
    ranks, (plain, report) = tp_run
    for tensors, info in ranks:
        assert info["names"][strategy] == report.names
        for name, p in plain.named_parameters():
            got = tensors[f"{strategy}/{name}"]
            np.testing.assert_allclose(got, p.detach().numpy(), rtol=0, atol=1e-10, err_msg=name)


def test_tp_probe_drift_per_layer_is_the_whole_outputs_on_every_rank(tp_run):
    """A ColwiseParallel layer gives each rank a shard of its output: the row's drift is still the whole one's."""
    ranks, _ = tp_run
    torch = pytest.importorskip("torch")
    torch.manual_seed(7)
    x = torch.randn(4, 6, dtype=torch.float64)
    want = ft.apply(_loaded(ranks, MLP, "mlp"), probe=x, dry_run=True)  # the weights the ranks started from
    for _, info in ranks:
        got = info["drifts"]
        assert got["model"] == pytest.approx(want.drift, rel=1e-10)
        for row in want.rows:
            assert got["rows"][row["name"]] == pytest.approx(row["drift"], rel=1e-10), row["name"]


def test_check_finite_on_a_replicated_dtensor_with_a_nan_in_one_copy_fails_every_rank(tp_run):
    ranks, _ = tp_run
    errors = [info["direct"]["replica"] for _, info in ranks]
    assert errors[0] is not None and errors[0] == errors[1] and "rank 1" in errors[0], errors


def test_check_finite_on_a_partial_dtensor_judges_the_summed_weight(tp_run):
    ranks, _ = tp_run  # 1e308 + 1e308 overflows: the weight is Inf although each rank's addend is finite
    errors = [info["direct"]["partial"] for _, info in ranks]
    assert errors[0] is not None and errors[0] == errors[1] and "NaN or Inf" in errors[0], errors


def test_check_finite_on_a_dtensor_whose_local_sums_overflow_passes_on_every_rank(tp_run):
    ranks, _ = tp_run
    assert [info["direct"]["overflow"] for _, info in ranks] == [None, None]


@pytest.mark.parametrize("strategy", ["owner", "replicate"])
def test_tp_fsdp2_2x2_nan_in_one_ranks_shard_fails_every_rank_with_the_same_error(tp_fsdp2_run, strategy):
    ranks, _ = tp_fsdp2_run
    # sharded along both mesh dimensions: FSDP2's _StridedShard over the colwise shard, and rowwise
    assert ranks[0][1]["placements"]["0.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert ranks[0][1]["placements"]["2.weight"] == "(Shard(dim=0), Shard(dim=1))"
    for results in _cases(ranks, strategy):
        _assert_same_error_everywhere(results, results[0]["weight"])


@pytest.mark.parametrize("strategy", ["owner", "replicate"])
def test_tp_fsdp2_2x2_failed_call_leaves_every_ranks_weights_and_optimizer_state_bitwise_unchanged(
    tp_fsdp2_run, strategy
):
    ranks, _ = tp_fsdp2_run
    for results in _cases(ranks, strategy):
        assert all(r["unchanged"] for r in results), [(r["weight"], r["unchanged"]) for r in results]


@pytest.mark.parametrize("strategy", ["owner", "replicate"])
def test_tp_fsdp2_2x2_result_equals_unsharded_apply(tp_fsdp2_run, strategy):
    ranks, (plain, report) = tp_fsdp2_run
    for tensors, info in ranks:
        assert info["names"][strategy] == report.names
        for name, p in plain.named_parameters():
            got = tensors[f"{strategy}/{name}"]
            np.testing.assert_allclose(got, p.detach().numpy(), rtol=0, atol=1e-10, err_msg=name)


def test_tp_fsdp2_2x2_owner_path_projects_each_matrix_once_on_one_of_the_four_ranks(tp_fsdp2_run):
    """TP + FSDP2: each weight sharded along both mesh dimensions is gathered whole to one owner among all four
    ranks (not every rank computing everything, as the DTensor path does); the weight FSDP2 alone shards (the
    last Linear, left out of the TP plan) to one owner in each of its two dp groups."""
    ranks, (plain, report) = tp_fsdp2_run
    assert ranks[0][1]["placements"]["4.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert ranks[0][1]["placements"]["6.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert ranks[0][1]["placements"]["8.weight"] == "(Shard(dim=0),)"
    stats = [info["owner"]["stats"] for _, info in ranks]
    assert [s["world"] for s in stats] == [4, 4, 4, 4]  # owners among all four ranks
    assert sum(s["weights"] for s in stats) == len(report) + 1  # 8.weight once per dp group, the others once
    whole = [s["groups"][0] for s in stats]  # the weights sharded along both mesh dimensions come first
    assert all(g["ranks"] == [0, 1, 2, 3] for g in whole)
    assert whole[0]["owners"] == whole[1]["owners"] == whole[2]["owners"] == whole[3]["owners"]
    assert sorted(whole[0]["owners"]) == [0, 1, 2, 3]  # four matrices: one for each rank, by cost
    assert [g["weights"] for g in whole] == [1, 1, 1, 1]  # each projected once, over all four ranks
    dp = [s["groups"][1] for s in stats]  # 8.weight on the dp sub-mesh: ranks {0, 2} and {1, 3}
    assert [g["ranks"] for g in dp] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert dp[0]["weights"] + dp[2]["weights"] == dp[1]["weights"] + dp[3]["weights"] == 1
    assert all(len(s["groups"]) == 2 for s in stats)
    # no rank receives the whole model: the others' pieces of the one matrix it owns, and of 8.weight if it owns it
    model_bytes = 8 * sum(p.numel() for name, p in plain.named_parameters() if name.endswith("weight"))
    for s in stats:
        assert 0 < s["received"] < model_bytes / 2 and 0 < s["sent"] < model_bytes / 2


def test_tp_fsdp2_2x2_owner_path_with_optimizer_equals_unsharded_apply_and_keeps_storage(tp_fsdp2_run):
    ranks, (plain, report) = tp_fsdp2_run
    for tensors, info in ranks:
        for name, p in plain.named_parameters():
            np.testing.assert_allclose(tensors["opt/" + name], p.detach().numpy(), rtol=0, atol=1e-10, err_msg=name)
        assert info["owner"]["storage_kept"]  # the same DTensors: placements, local data_ptr and shapes


def test_tp_fsdp2_2x2_optimizer_state_dropped_for_projected_weights_only(tp_fsdp2_run):
    ranks, (plain, report) = tp_fsdp2_run
    projected = set(report.names)
    others = sorted(n for n, _ in plain.named_parameters() if n not in projected)
    assert others == [f"{k}.bias" for k in (0, 2, 4, 6, 8)]
    for _, info in ranks:
        assert info["owner"]["states"] == len(list(plain.parameters()))  # the poisoned calls dropped nothing
        assert info["owner"]["kept_state"] == others


def test_tp_fsdp2_2x2_report_is_complete_and_equal_on_every_rank(tp_fsdp2_run):
    ranks, (plain, report) = tp_fsdp2_run
    first = ranks[0][1]["owner"]["report"]
    assert all(info["owner"]["report"] == first for _, info in ranks)
    assert [row["name"] for row in first["rows"]] == report.names
    for got, want in zip(first["rows"], report.rows):
        for key in ("scale", "sfe", "dfi_before", "dfi_after"):
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (got["name"], key)


def test_hsdp_nan_in_one_replica_fails_both_replica_groups_and_changes_nothing(tp_fsdp2_run):
    ranks, _ = tp_fsdp2_run
    results = [info["hsdp"] for _, info in ranks]
    assert results[0]["placements"] == "(Replicate(), Shard(dim=0))"
    _assert_same_error_everywhere(results, "2.weight")
    assert all(r["unchanged"] for r in results)


def test_shards_that_are_not_torch_chunk_pieces_are_refused_alike_on_every_rank(tp_fsdp2_run):
    ranks, _ = tp_fsdp2_run
    results = [info["odd"] for _, info in ranks]
    errors = [r["error"] for r in results]
    assert errors[0] is not None and all(e == errors[0] for e in errors), errors
    assert "weight" in errors[0] and "torch.chunk" in errors[0] and "rank 1: 3" in errors[0], errors[0]
    assert all(r["unchanged"] for r in results)
    errors = [r["error_2d"] for r in results]  # sharded along both mesh dimensions (the TP + FSDP2 owner path)
    assert errors[0] is not None and all(e == errors[0] for e in errors), errors
    assert "[(4, 3), (4, 3), (4, 3), (4, 3)]" in errors[0] and "rank 2: (2, 3); rank 3: (2, 3)" in errors[0], errors[0]
    assert all(r["unchanged_2d"] for r in results)


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
    res = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, timeout=900)
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
        [sys.executable, script, "--quick", "--out", str(out)], capture_output=True, text=True, timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert "| 2 | 1 | 6 | 0.500 |" in text  # rank 1 of 2 owns half of the 12 matrices and half the work
    # TP + FSDP2: matrices of cost 4, 4, 3 (q, k, v) and 1 per block, 2 blocks, by cost over 4 owners: 7, 7, 5, 5
    assert "| 2x2 TP+FSDP2 | 0 | 4 | 0.292 |" in text and "| 2x2 TP+FSDP2 | 3 | 2 | 0.208 |" in text
    assert "(the adapter stacks) | all-to-all" in text
