"""fire_core.torch: everything that can be known in advance is refused before any weight changes, naming the layer.

Each model has a good layer first (``0``) and the bad one second (``1``), so
a check that ran only while writing would leave layer 0 already changed.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402
from torch_models import assert_same, snapshot, trained_adam  # noqa: E402

import fire_core.torch as ft  # noqa: E402


def two_layers(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).to(dtype)


def assert_refused(model, error, message, **kwargs):
    """``apply`` raises ``error`` matching ``message`` and leaves parameters, gradients and the optimizer as they were."""
    opt = kwargs.get("optimizer")
    before = snapshot(model, opt)
    with pytest.raises(error, match=message):
        ft.apply(model, **kwargs)
    assert_same(before, snapshot(model, opt))


def test_meta_parameters_are_refused_with_the_layer_named():
    model = two_layers()
    model[1].to("meta")
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"1\.weight: is on the meta device.*to_empty"):
        ft.apply(model)
    assert torch.equal(model[0].weight.detach(), before)


def test_excluded_meta_parameters_are_left_alone():
    model = two_layers()
    model[1].to("meta")
    report = ft.apply(model, exclude="1")
    assert report.names == ["0.weight"] and report.skipped[0]["name"] == "1.weight"


def test_inference_tensors_are_refused_before_any_is_written():
    with torch.inference_mode():
        model = two_layers()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"0\.weight: is an inference tensor.*torch.inference_mode"):
        ft.apply(model)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_inference_tensors_are_projected_inside_inference_mode():
    with torch.inference_mode():
        model = two_layers()
        assert ft.apply(model).names == ["0.weight", "1.weight"]


def test_sparse_weight_is_refused():
    model = two_layers()
    model[1].weight = nn.Parameter(model[1].weight.detach().to_sparse())
    assert_refused(model, ValueError, r"1\.weight: is stored torch.sparse_coo.*to_dense")


def test_non_leaf_weight_is_refused():
    model = two_layers()
    model[1]._parameters["weight"] = model[1].weight.detach().clone().requires_grad_() * 2  # computed, not a leaf
    assert_refused(model, ValueError, r"1\.weight: is not a leaf tensor")


def test_expanded_weight_is_refused():
    model = two_layers()
    model[1].weight = nn.Parameter(torch.randn(1, 5, dtype=torch.float64).expand(3, 5))
    assert_refused(model, ValueError, r"1\.weight: its elements share memory \(an expanded view")


def test_complex_weight_is_a_type_error():
    model = nn.Sequential(nn.Linear(4, 5).double(), nn.Linear(5, 3, dtype=torch.complex64))
    assert_refused(model, TypeError, r"1\.weight: FIRE projects real floating-point weights, got torch.complex64")


def test_integer_weight_projected_with_frozen_true_is_a_type_error():
    model = two_layers()
    model[1].weight = nn.Parameter(torch.ones(3, 5, dtype=torch.int64), requires_grad=False)
    assert ft.apply(two_layers(), dry_run=True).names  # and by default it is frozen: left alone
    assert ft.apply(model, dry_run=True).skipped[0]["name"] == "1.weight"
    assert_refused(model, TypeError, r"1\.weight: FIRE projects real floating-point weights, got torch.int64", frozen=True)


def test_pruned_layer_is_refused_with_the_way_out():
    model = two_layers()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    assert_refused(model, ValueError, r"1\.weight: is pruned.*prune.remove")


def test_excluded_pruned_layer_is_listed_once_under_its_weight_name():
    model = two_layers()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    report = ft.apply(model, exclude="1")
    assert report.names == ["0.weight"]
    assert [(s["name"], s["shape"]) for s in report.skipped] == [("1.weight", (3, 5))]


def test_pruning_made_permanent_is_projected():
    model = two_layers()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    prune.remove(model[1], "weight")
    assert ft.apply(model).names == ["0.weight", "1.weight"]


def test_parameters_sharing_memory_with_different_requires_grad_are_refused():
    model = two_layers()
    model.append(nn.Linear(5, 3).double())
    model[2].weight = nn.Parameter(model[1].weight.detach(), requires_grad=False)  # same memory, frozen
    assert_refused(model, ValueError, r"1\.weight and 2\.weight: Parameters viewing the same memory, some frozen")
    report = ft.apply(model, frozen=True)
    assert report["1.weight"]["aliases"] == ["2.weight"]


def test_refusals_come_after_pattern_checks():
    """A typo in exclude is reported as a typo, not as the refusal of the weight it meant to leave out."""
    model = two_layers()
    model[1].to("meta")
    with pytest.raises(ValueError, match="exclude pattern '2' matches no weight"):
        ft.apply(model, exclude="2")


def test_failed_call_leaves_gradients_and_optimizer_state():
    model = two_layers()
    opt = trained_adam(model, torch.randn(3, 4, dtype=torch.float64))
    model(torch.randn(3, 4, dtype=torch.float64)).square().sum().backward()  # gradients present
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    assert_refused(model, ValueError, r"1\.weight.*NaN", optimizer=opt)


def test_check_options_refuses_taken_and_unknown_names_and_bad_values_and_returns_the_selection():
    taken = {"optimizer": "the callback resets the trainer's optimizers"}
    with pytest.raises(TypeError, match=r"X: optimizer= is not an option here: the callback resets"):
        ft.check_options({"optimizer": None}, taken=taken, who="X")
    with pytest.raises(TypeError, match=r"X: unknown option stepz=; fire_core.torch.apply takes steps, "):
        ft.check_options({"stepz": 3}, taken=taken, who="X")
    with pytest.raises(ValueError, match="scale=0 writes a zero weight"):  # reinit's own check, on a 2 x 2 weight
        ft.check_options({"scale": 0}, taken=taken, who="X")
    with pytest.raises(ValueError, match="distributed must be"):
        ft.check_options({"distributed": "shard"}, taken=taken, who="X")
    with pytest.raises(TypeError, match="frozen must be True or False"):
        ft.check_options({"frozen": "yes"}, taken=taken, who="X")
    chosen = ft.check_options({"steps": 10, "exclude": "head", "frozen": True}, taken=taken, who="X")
    assert chosen == {"exclude": "head", "frozen": True}
