"""FIRE on DeepSpeed engines: ZeRO stages 0-3, fp32 and bf16, on 2 gloo ranks, against plain PyTorch.

One rank script trains a small conv + MLP under every stage and precision
(a torch Adam as the client optimizer, FIRE's weights in a parameter group
of their own via ``fire_core.torch.param_groups``), applies FIRE to the
engine, and trains two more steps. Each rank records the fp32 masters and
the optimizer state before the call, the masters and the model's weights
after it, and the masters after the two steps. Here the same is done in one
process with plain PyTorch, from the masters and state recorded before the
call: ``fire_core.torch.apply(model, optimizer=adam)`` (``apply(engine)`` in
fp32, ``apply(engine.module, optimizer=engine.optimizer)`` in bf16), then the same two
global batches. The refusals (a parameter group shared with weights FIRE
does not project, offloaded optimizer state) are checked to change nothing.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

import fire_core.torch as ft  # noqa: E402
from ranks import run_ranks  # noqa: E402

# Newton-Schulz in float32 on two sides (a rank, this process) whose BLAS may block the products differently:
# each of the steps' products rounds at about 1e-7 of the weight's scale (about 1 here), amplified by the
# iteration's few steps; 1e-5 leaves room for that, and FIRE's change to the weights is above 0.05.
FP32_NS = 1e-5

MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    LR = 1e-2


    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(3, 8, 3), nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 5))


    def batch(k):
        g = torch.Generator().manual_seed(100 + k)
        return torch.randn(8, 3, 8, generator=g), torch.randn(8, 5, generator=g)
    """
)

SCRIPT = MODEL + textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from ranks import finish

    CASES = [(stage, bf16) for stage in (0, 1, 2, 3) for bf16 in (False, True)]


    def config(stage, bf16, **zero):
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0, "zero_allow_untested_optimizer": True,
               "zero_force_ds_cpu_optimizer": False,
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, **zero}}
        if bf16:
            cfg["bf16"] = {"enabled": True}
        return cfg


    def masters(engine):
        # the fp32 copy the optimizer steps, whole, read through DeepSpeed's own API (independent of fire_core)
        from deepspeed.utils import safe_get_full_fp32_param
        opt, out = engine.optimizer, {}
        unfused = {}
        if type(opt).__name__ == "FP16_UnfusedOptimizer":
            unfused = {id(p): m for g, mg in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(g, mg)}
        for name, p in engine.module.named_parameters():
            if id(p) in unfused:
                out[name] = unfused[id(p)].detach().reshape(p.shape).float().clone()
            elif hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                out[name] = safe_get_full_fp32_param(p).detach().float().clone()
            else:
                out[name] = p.detach().float().clone()
        return out


    def weights(engine):
        import deepspeed
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
            return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


    def state(engine):
        from deepspeed.utils import safe_get_full_optimizer_state
        opt, out = engine.optimizer, {}
        inner = getattr(opt, "optimizer", opt)
        step = max((float(s["step"]) for s in inner.state.values()), default=0.0)
        keys = {}
        if type(opt).__name__ == "FP16_UnfusedOptimizer":
            keys = {id(p): m for g, mg in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(g, mg)}
        flat = {}
        if hasattr(opt, "bit16_groups"):  # ZeRO 1/2: each group's flat state, gathered from its partitions
            # (read directly: DeepSpeed 0.19's per-parameter state fragments miss some groups' keys)
            for group, part in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
                for key in ("exp_avg", "exp_avg_sq"):
                    pieces = [torch.empty_like(part) for _ in range(dist.get_world_size())]
                    dist.all_gather(pieces, inner.state[part][key])
                    whole, start = torch.cat(pieces), 0
                    for p in group:
                        flat[(id(p), key)] = whole[start : start + p.numel()]
                        start += p.numel()
        for name, p in engine.module.named_parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                if (id(p), key) in flat:
                    value = flat[(id(p), key)]
                elif hasattr(p, "ds_id"):
                    value = safe_get_full_optimizer_state(p, key)
                else:
                    value = inner.state[keys.get(id(p), p)][key]
                out[f"{key}/{name}"] = value.detach().reshape(getattr(p, "ds_shape", p.shape)).float().clone()
        return out, step, len(inner.state)


    def engine_for(stage, bf16, groups=True, **zero):
        import deepspeed
        model = build()
        opt = torch.optim.Adam(ft.param_groups(model) if groups else model.parameters(), lr=LR)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, bf16, **zero))
        return engine


    def train(engine, k, rank, dtype):
        x, y = batch(k)
        x, y = x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]
        loss = (engine(x.to(dtype)).float() - y).pow(2).mean()
        engine.backward(loss)
        engine.step()


    def snapshot(engine):
        s, step, n = state(engine)
        return {**{"m/" + k: v for k, v in masters(engine).items()}, **{"w/" + k: v for k, v in weights(engine).items()},
                **s}, step, n


    def refusal(call):
        # the ValueError's message, or None if the call went through
        try:
            call()
        except ValueError as err:
            return str(err)
        return None


    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


    def run(rank, rendezvous, out):
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=2)
        import deepspeed
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip an unused JIT build
        deepspeed.init_distributed(dist_backend="gloo")
        global ft
        import fire_core.torch as ft

        arrays, info = {}, {}
        for stage, bf16 in CASES:
            tag = f"{stage}-{'bf16' if bf16 else 'fp32'}"
            dtype = torch.bfloat16 if bf16 else torch.float32
            engine = engine_for(stage, bf16)
            train(engine, 0, rank, dtype)
            train(engine, 1, rank, dtype)
            before = masters(engine)
            st, step, n_before = state(engine)
            # both spellings: the engine, or its module with its optimizer
            report = ft.apply(engine.module, optimizer=engine.optimizer) if bf16 else ft.apply(engine)
            after, bit16 = masters(engine), weights(engine)
            n_after = len(getattr(engine.optimizer, "optimizer", engine.optimizer).state)
            train(engine, 2, rank, dtype)
            train(engine, 3, rank, dtype)
            final = masters(engine)
            for prefix, values in (("before", before), ("after", after), ("final", final), ("state", st),
                                   ("bit16", {k: v.float() for k, v in bit16.items()})):
                arrays.update({f"{tag}/{prefix}/{k}": v.numpy() for k, v in values.items()})
            info[tag] = dict(report=report.to_dict(), step=step, states=[n_before, n_after],
                             optimizer=type(engine.optimizer).__name__,
                             bit16_dtype=str(next(engine.module.parameters()).dtype))

        # refused: one parameter group holding FIRE's weights and the biases (one shared Adam step count)
        for stage in (2, 3):
            engine = engine_for(stage, False, groups=False)
            train(engine, 0, rank, torch.float32)
            old, _, _ = snapshot(engine)
            error = refusal(lambda: ft.apply(engine))
            new, _, _ = snapshot(engine)
            # without optimizer=, the state is kept and the masters are still written
            before = masters(engine)
            report = ft.apply(engine.module)
            after = masters(engine)
            kept, _, _ = snapshot(engine)
            tag = f"mixed-{stage}"
            arrays.update({f"{tag}/before/{k}": v.numpy() for k, v in before.items()})
            arrays.update({f"{tag}/after/{k}": v.numpy() for k, v in after.items()})
            info[tag] = dict(error=error, unchanged=same(old, new),
                             state_kept=all(torch.equal(kept[k], new[k]) for k in new if k.startswith("exp_avg")),
                             names=report.names)

        # refused: offloaded optimizer state
        for stage in (2, 3):
            engine = engine_for(stage, False, offload_optimizer={"device": "cpu"})
            train(engine, 0, rank, torch.float32)
            old, _, _ = snapshot(engine)
            error = refusal(lambda: ft.apply(engine))
            new, _, _ = snapshot(engine)
            info[f"offload-{stage}"] = dict(error=error, unchanged=same(old, new))

        # a NaN in one rank's copy of a master (ZeRO-2): every rank raises, nothing changes anywhere
        engine = engine_for(2, False)
        train(engine, 0, rank, torch.float32)
        old, _, _ = snapshot(engine)
        flat = engine.optimizer.single_partition_of_fp32_groups[0]
        keep = flat[0].item()
        if rank == 1:
            with torch.no_grad():
                flat[0] = float("nan")
        error = refusal(lambda: ft.apply(engine))
        with torch.no_grad():
            flat[0] = keep
        new, _, _ = snapshot(engine)
        info["nan"] = dict(error=error, unchanged=same(old, new))

        finish(rank, out, arrays, info)


    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
    """
)

CASES = [(stage, bf16) for stage in (0, 1, 2, 3) for bf16 in (False, True)]
TAGS = [f"{stage}-{'bf16' if bf16 else 'fp32'}" for stage, bf16 in CASES]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(SCRIPT, tmp_path_factory.mktemp("deepspeed"), 2)


def _model():
    namespace = {}
    exec(MODEL, namespace)
    return namespace


def _part(arrays, prefix):
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _reference(arrays, tag):
    """Plain PyTorch from the recorded masters and Adam state: FIRE with the optimizer, then two more steps."""
    ns = _model()
    model = ns["build"]()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in _part(arrays, f"{tag}/before/").items()})
    opt = torch.optim.Adam(ft.param_groups(model), lr=ns["LR"])
    state = _part(arrays, f"{tag}/state/")
    for name, p in model.named_parameters():
        opt.state[p] = {"step": torch.tensor(2.0), "exp_avg": torch.from_numpy(state[f"exp_avg/{name}"]).clone(),
                        "exp_avg_sq": torch.from_numpy(state[f"exp_avg_sq/{name}"]).clone()}
    report = ft.apply(model, optimizer=opt)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in (2, 3):
        x, y = ns["batch"](k)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return report, after, final


@pytest.mark.parametrize("tag", TAGS)
def test_masters_and_weights_equal_plain_pytorch_fire(ranks, tag):
    arrays, info = ranks[0]
    report, after, _ = _reference(arrays, tag)
    got = _part(arrays, f"{tag}/after/")
    old = _part(arrays, f"{tag}/before/")
    for name, value in after.items():
        # fp32 masters: the projection of the fp32 masters, to fp32 rounding of the Newton-Schulz products
        np.testing.assert_allclose(got[name], value.numpy(), rtol=0, atol=FP32_NS, err_msg=f"{tag} {name}")
    moved = max(float(np.abs(got[n] - old[n]).max()) for n in old if old[n].ndim > 1)
    assert moved > 0.05  # FIRE changed the masters (before this change it wrote the model's copy only)
    assert info[tag]["report"]["rows"] and [r["name"] for r in info[tag]["report"]["rows"]] == report.names


@pytest.mark.parametrize("tag", TAGS)
def test_model_weights_are_the_masters_rounded_to_their_dtype(ranks, tag):
    arrays, info = ranks[0]
    masters, bit16 = _part(arrays, f"{tag}/after/"), _part(arrays, f"{tag}/bit16/")
    dtype = torch.bfloat16 if tag.endswith("bf16") else torch.float32
    assert info[tag]["bit16_dtype"] == str(dtype)
    for name in masters:
        rounded = torch.from_numpy(masters[name]).to(dtype).float().numpy()
        np.testing.assert_array_equal(bit16[name], rounded, err_msg=f"{tag} {name}")


@pytest.mark.parametrize("tag", TAGS)
def test_two_more_steps_follow_plain_pytorch(ranks, tag):
    """The restarted Adam state of the projected group and the kept state of the biases, in two steps."""
    arrays, info = ranks[0]
    _, after, final = _reference(arrays, tag)
    got = _part(arrays, f"{tag}/final/")
    lr = _model()["LR"]
    # fp32: the two runs differ by the rounding of the gradient reduction over 2 ranks (1.5e-8 measured).
    # bf16: the forward runs in bf16, so the gradients differ by bf16 rounding; an Adam step moves a weight
    # by about lr, and a rounded gradient can flip its sign: up to 2 lr apart per step, 4 lr in two steps
    # (0.0200 measured at worst). FIRE undone by the optimizer would be about 0.3 away.
    atol = 1e-5 if tag.endswith("fp32") else 4 * lr
    for name, value in final.items():
        np.testing.assert_allclose(got[name], value.numpy(), rtol=0, atol=atol, err_msg=f"{tag} {name}")
        # and far from where the old weights would have gone: FIRE was not undone by the optimizer
    old = _part(arrays, f"{tag}/before/")
    assert max(float(np.abs(got[n] - old[n]).max()) for n in old if old[n].ndim > 1) > 0.05
    n_before, n_after = info[tag]["states"]
    assert n_after == n_before - (3 if tag.startswith("0-") else 1)  # stage 0: per weight; ZeRO: the group


def test_report_is_complete_and_equal_on_every_rank(ranks):
    for tag in TAGS:
        rows = [info[tag]["report"]["rows"] for _, info in ranks]
        assert rows[0] == rows[1]
        assert [r["name"] for r in rows[0]] == ["0.weight", "2.weight", "4.weight"]


@pytest.mark.parametrize("stage", [2, 3])
def test_a_group_shared_with_other_weights_is_refused_and_nothing_changes(ranks, stage):
    for _, info in ranks:
        case = info[f"mixed-{stage}"]
        assert case["error"] is not None and "parameter group of their own" in case["error"]
        assert "0.weight" in case["error"] and "bias" in case["error"]
        assert case["unchanged"]


@pytest.mark.parametrize("stage", [2, 3])
def test_without_the_optimizer_masters_are_written_and_state_kept(ranks, stage):
    arrays, info = ranks[0]
    case = info[f"mixed-{stage}"]
    assert case["state_kept"] and case["names"] == ["0.weight", "2.weight", "4.weight"]
    ns = _model()
    model = ns["build"]()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in _part(arrays, f"mixed-{stage}/before/").items()})
    ft.apply(model)
    got = _part(arrays, f"mixed-{stage}/after/")
    for name, p in model.named_parameters():
        np.testing.assert_allclose(got[name], p.detach().numpy(), rtol=0, atol=FP32_NS, err_msg=name)


@pytest.mark.parametrize("stage", [2, 3])
def test_offloaded_optimizer_is_refused_and_nothing_changes(ranks, stage):
    for _, info in ranks:
        case = info[f"offload-{stage}"]
        assert case["error"] is not None and "offload" in case["error"] and case["unchanged"]


def test_nan_in_one_ranks_master_fails_every_rank_and_changes_nothing(ranks):
    errors = [info["nan"]["error"] for _, info in ranks]
    assert errors[0] is not None and errors[0] == errors[1] and "NaN" in errors[0]
    assert all(info["nan"]["unchanged"] for _, info in ranks)


def test_param_groups_split_fire_weights_from_the_rest():
    model = _model()["build"]()
    groups = ft.param_groups(model)
    named = {id(p): n for n, p in model.named_parameters()}
    assert [[named[id(p)] for p in g["params"]] for g in groups] == [
        ["0.weight", "2.weight", "4.weight"], ["0.bias", "2.bias", "4.bias"]
    ]
    assert [len(g["params"]) for g in ft.param_groups(model, exclude="4")] == [2, 4]
    with pytest.raises(TypeError):
        ft.param_groups(object())
