"""fire_core.torch: FIRE on nn.Module trees, in place, against a plain per-layer, per-tap loop."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch_models import (  # noqa: E402
    GPT,
    GPTBlock,
    HFConv1D,
    TinyResNet,
    Transformer,
    assert_same,
    assert_state,
    expected_state,
    fire_loop,
    ns_loop,
    seeded,
    snapshot,
    trained_adam,
)

import fire_core  # noqa: E402
import fire_core.torch as ft  # noqa: E402

# --- coverage against the reference loop -----------------------------------------------


@pytest.mark.parametrize("steps", [5, 10])
def test_resnet_matches_reference_loop(steps):
    model = seeded(TinyResNet)
    expected = expected_state(model, steps)
    ft.apply(model, steps)
    assert_state(model, expected)


def test_transformer_with_multihead_attention_matches_reference_loop():
    model = seeded(Transformer)
    expected = expected_state(model, 5)
    report = ft.apply(model)
    assert_state(model, expected)
    assert "encoder.layers.0.self_attn.in_proj_weight[k]" in report.names


def test_gpt_fused_qkv_split_matches_reference_loop():
    model = seeded(GPT)
    fused = {f"h.{k}.attn.c_attn": 3 for k in range(2)}
    expected = expected_state(model, 5, fused)
    report = ft.apply(model, split={"*.c_attn": 3})
    assert_state(model, expected)
    assert [n for n in report.names if n.startswith("h.0.attn.c_attn")] == [
        f"h.0.attn.c_attn.weight[{j}]" for j in range(3)
    ]


def test_fused_qkv_split_into_one_block_is_one_matrix():
    model = seeded(GPTBlock)
    w = model.attn.c_attn.weight.detach().numpy().copy()
    ft.apply(model, include="attn.c_attn", split={"attn.c_attn": 1})
    np.testing.assert_allclose(model.attn.c_attn.weight.detach().numpy(), fire_loop(w, 5), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv1d(6, 4, 3),
        nn.Conv2d(4, 6, (3, 2)),
        nn.Conv3d(3, 4, 2),
        nn.Conv2d(6, 8, 3, groups=2),
        nn.Conv1d(4, 4, 5, groups=4),
        nn.ConvTranspose1d(5, 3, 4),
        nn.ConvTranspose2d(3, 6, 3),
        nn.ConvTranspose3d(4, 2, 2),
        nn.ConvTranspose2d(4, 6, 2, groups=2),
    ],
    ids=repr,
)
def test_conv_kinds_match_reference_loop(layer):
    model = nn.Sequential(layer).double()
    expected = expected_state(model, 5)
    ft.apply(model)
    assert_state(model, expected)


def test_multihead_attention_with_kdim_vdim_projects_separate_weights():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=3).double()
    before = {k: getattr(attn, k).detach().numpy().copy() for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight")}
    report = ft.apply(attn)
    assert report.names == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    for k, w in before.items():
        np.testing.assert_allclose(getattr(attn, k).detach().numpy(), fire_loop(w, 5), rtol=0, atol=1e-12)


def test_default_leaves_embeddings_norms_biases_alone():
    model = seeded(Transformer)
    names = ft.apply(model, dry_run=True).names
    assert all(n.endswith(("weight", "]")) and "norm" not in n and "embed" not in n for n in names)
    expected = {f"encoder.layers.{k}.{s}" for k in range(2) for s in ("linear1.weight", "linear2.weight", "self_attn.out_proj.weight")}
    expected |= {f"encoder.layers.{k}.self_attn.in_proj_weight[{b}]" for k in range(2) for b in "qkv"}
    assert set(names) == expected | {"head.weight"}


# --- report --------------------------------------------------------------------------


def test_report_rows_match_independent_measures():
    model = seeded(TinyResNet)
    old = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    report = ft.apply(model, 5)
    for row in report:
        w_old, w_new = old[row["name"]], dict(model.named_parameters())[row["name"]].detach().numpy()
        mats_old = [w_old[(slice(None), slice(None)) + t] for t in np.ndindex(*w_old.shape[2:])]
        ref = math.sqrt(mats_old[0].shape[0] / mats_old[0].shape[1]) / len(mats_old)
        projected = [ns_loop(m, 5) for m in mats_old]

        def dfi(m):
            g = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
            return float(np.sum((g - np.eye(len(g))) ** 2))

        assert row["sfe"] == pytest.approx(float(np.sum((w_new - w_old) ** 2)), rel=1e-10)
        assert row["dfi_before"] == pytest.approx(sum(dfi(m / ref) for m in mats_old), rel=1e-10)
        assert row["dfi_after"] == pytest.approx(sum(dfi(p) for p in projected), rel=1e-9, abs=1e-12)
        assert row["scale"] == pytest.approx(ref)


def test_dry_run_changes_nothing_and_reports_what_apply_does():
    model = seeded(TinyResNet)
    opt = trained_adam(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    before = snapshot(model, opt)
    dry = ft.apply(model, optimizer=opt, dry_run=True)
    assert_same(before, snapshot(model, opt))
    assert not dry.applied and "dry run" in str(dry)
    real = ft.apply(model, optimizer=opt)
    assert real.applied and real.names == dry.names
    for a, b in zip(dry, real):
        assert a == b


def test_method_and_scale_pass_through():
    torch.manual_seed(0)
    lin = nn.Linear(6, 9).double()
    ft.apply(lin, method="svd", scale=None)
    w = lin.weight.detach().numpy().copy()
    np.testing.assert_allclose(w.T @ w, np.eye(6), atol=1e-12)
    ft.apply(lin, method="svd", scale=0.5)
    np.testing.assert_allclose(lin.weight.detach().numpy(), 0.5 * w, atol=1e-12)


# --- selection -----------------------------------------------------------------------


def test_include_module_prefix_selects_everything_under_it():
    model = seeded(TinyResNet)
    names = ft.apply(model, include="layer2", dry_run=True).names
    assert names == ["layer2.0.conv1.weight", "layer2.0.conv2.weight", "layer2.0.down.0.weight"]


def test_include_glob_on_nested_modules():
    model = seeded(TinyResNet)
    names = ft.apply(model, include=["*.conv1"], dry_run=True).names
    assert names == ["layer1.0.conv1.weight", "layer2.0.conv1.weight"]


def test_exclude_removes_from_default_and_block_names_match_literally():
    model = seeded(Transformer)
    names = ft.apply(model, exclude=["head", "encoder.layers.0.self_attn.in_proj_weight[k]", "*.linear*"], dry_run=True).names
    assert names == [
        "encoder.layers.0.self_attn.in_proj_weight[q]",
        "encoder.layers.0.self_attn.in_proj_weight[v]",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.1.self_attn.in_proj_weight[q]",
        "encoder.layers.1.self_attn.in_proj_weight[k]",
        "encoder.layers.1.self_attn.in_proj_weight[v]",
        "encoder.layers.1.self_attn.out_proj.weight",
    ]


def test_excluded_block_keeps_its_rows():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(6, 2).double()
    w = attn.in_proj_weight.detach().numpy().copy()
    ft.apply(attn, exclude="in_proj_weight[k]")
    got = attn.in_proj_weight.detach().numpy()
    np.testing.assert_array_equal(got[6:12], w[6:12])
    np.testing.assert_allclose(got[:6], fire_loop(w[:6], 5), atol=1e-12)
    np.testing.assert_allclose(got[12:], fire_loop(w[12:], 5), atol=1e-12)


def test_callable_include_gets_name_and_tensor():
    model = seeded(TinyResNet)
    seen = []

    def pick(name, tensor):
        seen.append((name, tuple(tensor.shape)))
        return tensor.ndim == 2

    assert ft.apply(model, include=pick, dry_run=True).names == ["fc.weight"]
    assert ("stem.weight", (8, 3, 3, 3)) in seen


def test_include_pattern_matching_nothing_is_an_error_with_the_closest_names():
    model = seeded(TinyResNet)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"include pattern 'layer2.0.conv' matches no weight.*closest: .*layer2.0.conv1.weight"):
        ft.apply(model, include=["fc", "layer2.0.conv"])
    assert_same(before, snapshot(model))


def test_tied_weight_is_projected_once():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    b.weight = a.weight
    model = nn.Sequential(a, b)
    w = a.weight.detach().numpy().copy()
    report = ft.apply(model)
    assert report.names == ["0.weight"]
    np.testing.assert_allclose(b.weight.detach().numpy(), fire_loop(w, 5), atol=1e-12)


def test_distinct_parameters_sharing_storage_are_projected_once():
    """``nn.Parameter(t)`` of another weight's tensor shares its storage: tied, though not the same object."""
    torch.manual_seed(0)
    a, b = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    b.weight = nn.Parameter(a.weight.detach())
    assert b.weight is not a.weight and b.weight.data_ptr() == a.weight.data_ptr()
    w = a.weight.detach().numpy().copy()
    report = ft.apply(nn.Sequential(a, b))
    assert report.names == ["0.weight"]
    np.testing.assert_allclose(a.weight.detach().numpy(), fire_loop(w, 5), atol=1e-12)
    np.testing.assert_allclose(b.weight.detach().numpy(), fire_loop(w, 5), atol=1e-12)


def test_overlapping_parameters_are_refused_and_nothing_changes():
    torch.manual_seed(0)
    flat = torch.randn(48, dtype=torch.float64)
    a, b = nn.Linear(6, 4, bias=False).double(), nn.Linear(6, 4, bias=False).double()
    a.weight = nn.Parameter(flat[:24].view(4, 6))
    b.weight = nn.Parameter(flat[12:36].view(4, 6))  # rows 2-3 of a are rows 0-1 of b
    before = flat.clone()
    with pytest.raises(ValueError, match=r"0\.weight and 1\.weight: share memory without being the same weight"):
        ft.apply(nn.Sequential(a, b))
    assert torch.equal(flat, before)
    # Side by side in one buffer, without overlap, they are two weights.
    b.weight = nn.Parameter(flat[24:].view(4, 6))
    assert ft.apply(nn.Sequential(a, b)).names == ["0.weight", "1.weight"]


def test_linear_head_tied_to_embedding_is_projected_once_under_the_head_name():
    model = seeded(Transformer)
    model.head.weight = model.embed.weight
    w = model.embed.weight.detach().numpy().copy()
    report = ft.apply(model)
    assert report.names.count("head.weight") == 1
    np.testing.assert_allclose(model.embed.weight.detach().numpy(), fire_loop(w, 5), atol=1e-12)


# --- split and layouts ---------------------------------------------------------------


def test_split_with_block_sizes_for_grouped_query_attention():
    torch.manual_seed(0)
    qkv = nn.Linear(8, 16, bias=False).double()  # q: 8 rows, k and v: 4 rows each
    w = qkv.weight.detach().numpy().copy()
    report = ft.apply(qkv, split={"weight": (8, 4, 4)})
    assert report.names == ["weight[0]", "weight[1]", "weight[2]"]
    want = np.concatenate([fire_loop(b, 5) for b in (w[:8], w[8:12], w[12:])])
    np.testing.assert_allclose(qkv.weight.detach().numpy(), want, atol=1e-12)


@pytest.mark.parametrize(
    "split, message",
    [({"attn.c_attn": 5}, "5 equal blocks"), ({"attn.c_attn": (12, 12)}, "sum to 24"), ({"nothere": 3}, "matches no weight")],
)
def test_bad_split_is_a_clear_error(split, message):
    model = seeded(GPTBlock)
    with pytest.raises(ValueError, match=message):
        ft.apply(model, split=split)


def test_layouts_cover_a_conv1d_stored_in_out_with_split():
    torch.manual_seed(0)
    model = nn.Module()
    model.c_attn = HFConv1D(4, 12).double()
    w = model.c_attn.weight.detach().numpy().copy()  # (in, out)
    report = ft.apply(model, layouts={"*.weight": "io"}, split={"c_attn": 3})
    assert report.names == [f"c_attn.weight[{j}]" for j in range(3)]
    want = np.concatenate([fire_loop(b, 5) for b in np.split(w.T, 3)]).T
    np.testing.assert_allclose(model.c_attn.weight.detach().numpy(), want, atol=1e-12)


def test_layouts_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no parameter"):
        ft.apply(nn.Linear(3, 3), layouts={"*.kernel": "io"})


# --- real-model details --------------------------------------------------------------


def test_parameters_keep_identity_storage_grad_flag_and_mode():
    model = seeded(TinyResNet)
    model.eval()
    model.layer1.train()
    model.fc.weight.requires_grad_(False)
    before = {k: (id(p), p.data_ptr(), p.requires_grad, p.dtype) for k, p in model.named_parameters()}
    modes = {k: m.training for k, m in model.named_modules()}
    assert "fc.weight" in ft.apply(model, frozen=True).names
    assert {k: (id(p), p.data_ptr(), p.requires_grad, p.dtype) for k, p in model.named_parameters()} == before
    assert {k: m.training for k, m in model.named_modules()} == modes


def test_optimizer_state_is_dropped_for_exactly_the_projected_parameters():
    model = seeded(TinyResNet)
    opt = trained_adam(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    kept = {k: (p, {n: v.clone() for n, v in opt.state[p].items()}) for k, p in model.named_parameters() if not k.startswith("layer2")}
    ft.apply(model, include="layer2", optimizer=opt)
    for k, p in model.named_parameters():
        if k in ("layer2.0.conv1.weight", "layer2.0.conv2.weight", "layer2.0.down.0.weight"):
            assert p not in opt.state or not opt.state[p], k
        elif k in kept:
            assert set(opt.state[p]) == set(kept[k][1]) and all(torch.equal(opt.state[p][n], v) for n, v in kept[k][1].items())
        else:  # layer2's norms: not projected, state kept
            assert opt.state[p], k
    # and the optimizer keeps working, restarting the dropped state
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).square().mean().backward()
    opt.step()
    assert int(opt.state[model.layer2[0].conv1.weight]["step"]) == 1
    assert int(opt.state[model.stem.weight]["step"]) == 2


def test_reset_optimizer_state_alone_for_sgd_momentum():
    model = seeded(TinyResNet)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).square().mean().backward()
    opt.step()
    assert ft.reset_optimizer_state(opt, [model.fc.weight, model.stem.weight]) == 2
    assert model.fc.weight not in opt.state and model.stem.weight not in opt.state
    assert opt.state[model.fc.bias]["momentum_buffer"] is not None


def test_reset_optimizer_state_rejects_non_optimizers():
    with pytest.raises(TypeError, match="Optimizer"):
        ft.reset_optimizer_state(object(), [])


# torch.compile imports torch.utils.mkldnn, which uses torch.jit.script_method (deprecated in torch itself)
@pytest.mark.filterwarnings("ignore:.torch.jit.script_method. is deprecated:DeprecationWarning")
@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["compile", "DataParallel"])
def test_wrappers_are_unwrapped(wrap):
    model = seeded(TinyResNet)
    expected = expected_state(model, 5)
    report = ft.apply(wrap(model))
    assert report.names[0] == "stem.weight"
    assert_state(model, expected)


DDP_SCRIPT = r"""
import sys, tempfile, torch, torch.distributed as dist
from torch import nn
import fire_core.torch as ft
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
report = ft.apply(nn.parallel.DistributedDataParallel(model))
print(",".join(report.names))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_distributed_data_parallel_wrapper_is_unwrapped():
    out = subprocess.run([sys.executable, "-c", DDP_SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0.weight,1.weight"


def test_weight_norm_parametrization_is_written_through():
    torch.manual_seed(0)
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(6, 4).double())
    w = lin.weight.detach().numpy().copy()
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.randn(3, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    w = lin.weight.detach().numpy().copy()
    report = ft.apply(lin, optimizer=opt)
    assert report.names == ["weight"]
    np.testing.assert_allclose(lin.weight.detach().numpy(), fire_loop(w, 5), atol=1e-12)
    originals = lin.parametrizations.weight
    assert originals.original0 not in opt.state and originals.original1 not in opt.state
    assert opt.state[lin.bias]


class Doubled(nn.Module):
    def forward(self, x):
        return 2 * x

    def right_inverse(self, x):
        return x / 2


class Absolute(nn.Module):  # not surjective: FIRE's result has negative entries
    def forward(self, x):
        return x.abs()

    def right_inverse(self, x):
        return x.abs()


class NoInverse(nn.Module):
    def forward(self, x):
        return x


def test_custom_parametrization_with_right_inverse_is_written_through():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5).double()
    nn.utils.parametrize.register_parametrization(lin, "weight", Doubled())
    w = lin.weight.detach().numpy().copy()
    ft.apply(lin)
    np.testing.assert_allclose(lin.weight.detach().numpy(), fire_loop(w, 5), atol=1e-12)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda lin: nn.utils.parametrizations.spectral_norm(lin), "spectral_norm"),
        (lambda lin: nn.utils.spectral_norm(lin), "spectral_norm"),
        (lambda lin: nn.utils.parametrize.register_parametrization(lin, "weight", NoInverse()), "right_inverse"),
        (lambda lin: nn.utils.parametrize.register_parametrization(lin, "weight", Absolute()), "does not reproduce"),
    ],
    ids=["spectral_norm", "spectral_norm_hook", "no_right_inverse", "not_surjective"],
)
def test_unsupported_parametrizations_are_refused_and_nothing_changes(make, message):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)).double()
    make(model[1])
    opt = trained_adam(model, torch.randn(3, 5, dtype=torch.float64))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=message) as err:
        ft.apply(model, optimizer=opt)
    assert "1.weight" in str(err.value)
    assert_same(before, snapshot(model, opt))


def test_an_excluded_spectral_norm_layer_is_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)).double()
    nn.utils.parametrizations.spectral_norm(model[1])
    u = model[1].parametrizations.weight[0]._u.clone()
    w = model[0].weight.detach().numpy().copy()
    assert ft.apply(model, exclude="1").names == ["0.weight"]
    np.testing.assert_allclose(model[0].weight.detach().numpy(), fire_loop(w, 5), atol=1e-12)
    assert torch.equal(model[1].parametrizations.weight[0]._u, u)


def test_hook_weight_norm_is_refused_with_the_alternative_named():
    lin = nn.Linear(4, 4)
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(lin)
    with pytest.raises(ValueError, match="parametrizations.weight_norm"):
        ft.apply(nn.Sequential(lin))


def test_lazy_module_is_refused_until_materialized():
    model = nn.Sequential(nn.LazyLinear(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="0.weight.*lazy"):
        ft.apply(model)
    model(torch.randn(2, 3))
    assert ft.apply(model).names == ["0.weight", "1.weight"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32_and_written_back(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(6, 5)).to(dtype)
    old = {k: p.detach().float().numpy().astype(np.float64) for k, p in model.named_parameters()}
    report = ft.apply(model)
    assert all(p.dtype == dtype for p in model.parameters())
    for name, transposed in (("0.weight", False), ("1.weight", False)):
        want = torch.from_numpy(fire_loop(old[name], 5, transposed)).to(dtype)
        got = dict(model.named_parameters())[name].detach()
        # float32 math, then one rounding to the weight's dtype: at most one ulp apart
        assert torch.allclose(got.float(), want.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6), name
    assert report["1.weight"]["sfe"] > 0


def test_float32_matches_float64_reference_to_float32_precision():
    model = seeded(TinyResNet, dtype=torch.float32)
    expected = expected_state(model.double(), 5)
    model.float()
    ft.apply(model)
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v.double().numpy(), expected[k], rtol=0, atol=2e-6, err_msg=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weights_stay_on_their_device():
    model = seeded(TinyResNet, dtype=torch.float32)
    expected = expected_state(model.double(), 5)
    model = model.float().cuda()
    ptrs = [p.data_ptr() for p in model.parameters()]
    ft.apply(model)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(p.is_cuda for p in model.parameters())
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v.double().cpu().numpy(), expected[k], rtol=0, atol=2e-5, err_msg=k)


# --- atomicity and errors ------------------------------------------------------------


@pytest.mark.parametrize("bad", ["layer2.0.conv2.weight", "fc.weight", "stem.weight"])
def test_nan_weight_raises_naming_it_and_changes_nothing(bad):
    model = seeded(TinyResNet)
    opt = trained_adam(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with torch.no_grad():
        dict(model.named_parameters())[bad].view(-1)[3] = float("nan")
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"{bad}.*NaN"):
        ft.apply(model, optimizer=opt)
    assert_same(before, snapshot(model, opt))


def test_a_failure_midway_says_which_weights_were_already_written(monkeypatch):
    """Out of memory after some writes: the error carries a note naming them; the rest is untouched."""
    import fire_core.plan as plan

    model = seeded(TinyResNet)
    opt = trained_adam(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    before = dict(snapshot_params(model))
    real, calls = plan.polar, []

    def polar_then_oom(x, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory (simulated)")
        return real(x, *args, **kw)

    monkeypatch.setattr(plan, "polar", polar_then_oom)
    with pytest.raises(MemoryError) as info:
        ft.apply(model, optimizer=opt)
    note = " ".join(getattr(info.value, "__notes__", []))
    assert "stopped after writing" in note and "optimizer state are unchanged" in note
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and f"after writing {len(changed)} of" in note
    assert any(n in note for n in changed)
    assert all(state for state in opt.state.values())  # the optimizer was not reset


def snapshot_params(model: nn.Module):
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


def test_nan_in_a_plain_weight_leaves_parametrized_ones_unwritten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)).double()
    nn.utils.parametrizations.weight_norm(model[0])
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="1.weight"):
        ft.apply(model)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(method="newton"), ValueError, "unknown method"),
        (dict(scale="big"), ValueError, "unknown scale"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(include=[3]), TypeError, "glob strings"),
        (dict(split={"fc": 0}), ValueError, "at least 1"),
        (dict(split={"fc": "qkv"}), TypeError, "block count"),
        (dict(optimizer=object()), TypeError, "Optimizer"),
    ],
)
def test_bad_options_are_clear_errors_and_change_nothing(kwargs, error, message):
    model = seeded(TinyResNet)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        ft.apply(model, **kwargs)
    assert_same(before, snapshot(model))


def test_apply_rejects_a_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        ft.apply({"w": torch.zeros(2, 2)})


def test_importing_fire_core_torch_is_the_only_way_torch_gets_imported():
    code = "import sys, fire_core; assert 'torch' not in sys.modules; import fire_core.torch; assert 'torch' in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stderr


def test_hf_conv1d_is_recognised_without_importing_transformers():
    code = (
        "import sys, torch, fire_core.torch as ft\n"
        "Conv1D = type('Conv1D', (torch.nn.Module,), {'__module__': 'transformers.pytorch_utils'})\n"
        "m = Conv1D(); m.nf, m.nx = 6, 4; m.weight = torch.nn.Parameter(torch.randn(4, 6))\n"
        "assert ft.apply(m).rows[0]['layout'] == 'io'\n"
        "assert 'transformers' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stderr


def test_reinit_of_one_weight_matches_apply():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3).double()
    want = fire_core.reinit(conv.weight.detach().clone(), "oihw", steps=7)
    ft.apply(conv, 7)
    torch.testing.assert_close(conv.weight.detach(), want, rtol=0, atol=1e-15)  # float64, separate buffers



def test_report_false_projects_the_same_and_measures_nothing():
    a, b = seeded(TinyResNet), seeded(TinyResNet)
    ft.apply(a)
    report = ft.apply(b, report=False)
    assert len(report) == 0 and report.applied
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15, msg=k)  # float64: the same math on other buffers


def test_dry_run_without_report_is_refused():
    with pytest.raises(ValueError, match="dry_run"):
        ft.apply(nn.Linear(2, 2), dry_run=True, report=False)


FSDP2_SCRIPT = r"""
import sys, tempfile, numpy as np, torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn

def run(rank, path, out):
    dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard
    import fire_core.torch as ft
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Conv1d(8, 4, 3)).double()
    old = [model[0].weight.detach().numpy().copy(), model[1].weight.detach().numpy().copy()]
    for m in model:
        fully_shard(m)
    fully_shard(model)
    before = [(p.placements, p.to_local().data_ptr(), tuple(p.to_local().shape)) for p in model.parameters()]
    report = ft.apply(model)
    after = [(p.placements, p.to_local().data_ptr(), tuple(p.to_local().shape)) for p in model.parameters()]
    full = [model[0].weight.full_tensor().detach().numpy(), model[1].weight.full_tensor().detach().numpy()]
    np.save(f"{out}-{rank}.npy", np.array([before == after, report.names == ["0.weight", "1.weight"]]))
    np.savez(f"{out}-{rank}.npz", old0=old[0], old1=old[1], new0=full[0], new1=full[1])
    dist.barrier()  # no rank tears gloo down while the other still talks
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(tempfile.mktemp(), sys.argv[1]), nprocs=2)
"""


@pytest.mark.slow
def test_fsdp2_sharded_weights_are_projected_whole_and_stay_sharded(tmp_path):
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "r")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in range(2):
        assert np.load(tmp_path / f"r-{rank}.npy").all()  # same placements, local storage, shapes; names
        got = np.load(tmp_path / f"r-{rank}.npz")
        np.testing.assert_allclose(got["new0"], fire_loop(got["old0"], 5), rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["new1"], fire_loop(got["old1"], 5), rtol=0, atol=1e-12)
