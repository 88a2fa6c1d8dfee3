"""fire_core.torch: the names users type select what they name, and nothing is left alone in silence."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch_models import TinyResNet, Transformer, assert_same, fire_loop, seeded, snapshot  # noqa: E402

import fire_core.torch as ft  # noqa: E402
from fire_core.torch._table import _FROZEN  # noqa: E402

LAYER2 = ["layer2.0.conv1.weight", "layer2.0.conv2.weight", "layer2.0.down.0.weight"]


# --- names copied from the report ---------------------------------------------------------


def test_block_pattern_copied_from_the_report_selects_exactly_that_block_in_every_layer():
    model = seeded(Transformer)
    old = {k: v.detach().clone() for k, v in model.state_dict().items()}
    report = ft.apply(model, exclude="*.in_proj_weight[k]")
    assert not any(n.endswith("in_proj_weight[k]") for n in report.names)
    for k in range(2):
        w, before = model.encoder.layers[k].self_attn.in_proj_weight.detach(), old[f"encoder.layers.{k}.self_attn.in_proj_weight"]
        assert torch.equal(w[16:32], before[16:32])  # k rows untouched
        assert not torch.equal(w[:16], before[:16]) and not torch.equal(w[32:], before[32:])
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["encoder.layers.0.self_attn.in_proj_weight[k]"] == "excluded by '*.in_proj_weight[k]'"


# --- names of wrapped models, as their state_dict() shows them ---------------------------


# torch.compile imports torch.utils.mkldnn, which uses torch.jit.script_method (deprecated in torch itself)
@pytest.mark.filterwarnings("ignore:.torch.jit.script_method. is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
    "wrap, pattern",
    [
        (nn.DataParallel, "module.fc"),
        (torch.compile, "_orig_mod.fc"),
        (lambda m: torch.compile(nn.DataParallel(m)), "_orig_mod.module.fc"),
        (lambda m: torch.compile(nn.DataParallel(m)), "module.fc.weight"),
        (nn.DataParallel, "fc"),
    ],
    ids=["DataParallel", "compile", "compile-DataParallel", "compile-DataParallel-inner", "inner-name"],
)
def test_state_dict_names_of_wrapped_models_select_the_weight(wrap, pattern):
    model = seeded(TinyResNet)
    wrapped = wrap(model)
    assert any(pattern in k for k in wrapped.state_dict())  # the name as the user sees it
    w = model.fc.weight.detach().numpy().copy()
    report = ft.apply(wrapped, include=pattern)
    assert report.names == ["fc.weight"]
    np.testing.assert_allclose(model.fc.weight.detach().numpy(), fire_loop(w, 5), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:.torch.jit.script_method. is deprecated:DeprecationWarning")
def test_exclude_with_a_wrapped_name_leaves_the_weight_alone():
    model = seeded(TinyResNet)
    before = model.fc.weight.detach().clone()
    report = ft.apply(nn.DataParallel(model), exclude="module.fc")
    assert "fc.weight" not in report.names and torch.equal(model.fc.weight.detach(), before)


def test_layouts_and_split_patterns_take_wrapped_names_too():
    model = nn.Module()
    model.proj = nn.Linear(4, 12).double()
    w = model.proj.weight.detach().numpy().copy()
    report = ft.apply(nn.DataParallel(model), split={"module.proj": 3}, layouts={"module.proj.weight": "oi"})
    assert report.names == [f"proj.weight[{j}]" for j in range(3)]
    want = np.concatenate([fire_loop(b, 5) for b in np.split(w, 3)])
    np.testing.assert_allclose(model.proj.weight.detach().numpy(), want, rtol=0, atol=1e-12)


# --- patterns that match nothing, and wrong types ------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(include="layer3"), r"include pattern 'layer3' matches no weight"),
        (dict(exclude=["fc", "layer2.0.conv3"]), r"exclude pattern 'layer2.0.conv3' matches no weight.*closest: .*layer2.0.conv"),
        (dict(exclude="bn"), r"exclude pattern 'bn' matches no weight of two or more dimensions"),  # only 1-D norms
        (dict(split={"layer9": 2}), r"split pattern 'layer9' matches no weight"),
        (dict(layouts={"*.kernel": "io"}), r"layouts pattern '\*.kernel' matches no parameter"),
    ],
)
def test_a_pattern_that_matches_nothing_is_an_error_and_changes_nothing(kwargs, message):
    model = seeded(TinyResNet)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        ft.apply(model, **kwargs)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(include=3), "include: expected a glob pattern"),
        (dict(exclude=[b"fc"]), "exclude: expected glob strings"),
        (dict(layouts=["fc.weight"]), "layouts must be a mapping"),
        (dict(layouts={"fc.weight": 2}), "layouts must map glob strings"),
        (dict(split=3), "split must be a mapping"),
        (dict(frozen="yes"), "frozen must be True or False"),
        (dict(optimizer=[object()]), "Optimizer"),
    ],
)
def test_wrong_types_are_a_type_error_and_change_nothing(kwargs, message):
    model = seeded(TinyResNet)
    before = snapshot(model)
    with pytest.raises(TypeError, match=message):
        ft.apply(model, **kwargs)
    assert_same(before, snapshot(model))


def test_a_call_that_selects_no_weight_is_an_error_naming_what_was_left_alone():
    model = seeded(Transformer)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"selected no weight.*embedding .*: embed.weight"):
        ft.apply(model, include="embed")
    assert_same(before, snapshot(model))


def test_a_model_with_no_weights_is_an_error():
    with pytest.raises(ValueError, match="selected no weight.*no weights of two or more dimensions"):
        ft.apply(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))


# --- frozen weights --------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A LoRA layer: the frozen base weight plus trainable low-rank adapters A (r x in) and B (out x r)."""

    def __init__(self, d_in: int, d_out: int, r: int = 2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


def lora_model():
    torch.manual_seed(0)
    return nn.Sequential(LoRALinear(6, 8), nn.ReLU(), LoRALinear(8, 4)).double()


def test_frozen_weights_are_left_alone_and_listed_by_default():
    model = lora_model()
    base = [m.base.weight.detach().clone() for m in (model[0], model[2])]
    adapters = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if "lora" in n}
    report = ft.apply(model)
    assert report.names == ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]
    assert torch.equal(model[0].base.weight.detach(), base[0]) and torch.equal(model[2].base.weight.detach(), base[1])
    for n, p in model.named_parameters():
        if n in adapters:
            np.testing.assert_allclose(p.detach().numpy(), fire_loop(adapters[n], 5), rtol=0, atol=1e-12, err_msg=n)
    assert {s["name"]: s["reason"] for s in report.skipped} == {
        "0.base.weight": _FROZEN, "2.base.weight": _FROZEN,
    }
    assert "frozen=True" in str(report)


def test_frozen_true_projects_frozen_weights_and_keeps_them_frozen():
    model = lora_model()
    w = model[0].base.weight.detach().numpy().copy()
    report = ft.apply(model, frozen=True)
    assert "0.base.weight" in report.names and not report.skipped
    np.testing.assert_allclose(model[0].base.weight.detach().numpy(), fire_loop(w, 5), rtol=0, atol=1e-12)
    assert not model[0].base.weight.requires_grad


def test_a_frozen_model_is_an_error_that_names_frozen_true():
    model = seeded(TinyResNet).requires_grad_(False)
    with pytest.raises(ValueError, match=r"selected no weight.*frozen=True projects it"):
        ft.apply(model)


def test_weights_outside_include_are_listed_as_not_selected():
    model = seeded(TinyResNet)
    report = ft.apply(model, include="layer2", dry_run=True)
    assert report.names == LAYER2
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons == {n: "not selected by include" for n in ("stem.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight", "fc.weight")}


def test_excluded_weights_are_listed_with_the_pattern_that_excluded_them():
    model = seeded(TinyResNet)
    report = ft.apply(model, exclude=["layer1", "fc"], dry_run=True)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons == {"layer1.0.conv1.weight": "excluded by 'layer1'", "layer1.0.conv2.weight": "excluded by 'layer1'", "fc.weight": "excluded by 'fc'"}
    assert "left alone (excluded by 'layer1'): layer1.0.conv1.weight (8x8x3x3), layer1.0.conv2.weight (8x8x3x3)" in str(report)


def test_callable_exclude_is_named_in_the_reason():
    model = seeded(TinyResNet)
    report = ft.apply(model, exclude=lambda name, tensor: tensor.ndim == 4, dry_run=True)
    assert report.names == ["fc.weight"]
    assert {s["reason"] for s in report.skipped} == {"excluded by the exclude callable"}


def test_tied_weight_row_names_all_its_names():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    b.weight = a.weight
    report = ft.apply(nn.Sequential(a, b))
    assert report.names == ["0.weight"] and report["0.weight"]["aliases"] == ["1.weight"]
    assert "0.weight (= 1.weight)" in str(report)


def test_a_shared_module_is_one_weight_with_both_names():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5).double()
    model = nn.Sequential(lin, nn.ReLU(), lin)
    w = lin.weight.detach().numpy().copy()
    report = ft.apply(model)
    assert report.names == ["0.weight"] and report["0.weight"]["aliases"] == ["2.weight"]
    np.testing.assert_allclose(lin.weight.detach().numpy(), fire_loop(w, 5), rtol=0, atol=1e-12)
