"""benchmarks/stability.py: the methods it runs per architecture, and one tiny run of each network."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "stability.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(_PATH.parent))
    try:
        spec = importlib.util.spec_from_file_location("stability_benchmark", _PATH)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(_PATH.parent))


TINY = dict(epochs1=2, epochs2=2, steps=5, hidden=16, dfi_ratio=100.0, dormant_share=0.3)


def test_variance_is_run_only_where_there_are_conv_taps(bench):
    assert "variance" in bench.methods_for("cnn") and "variance" not in bench.methods_for("mlp")
    assert "norm + update_bn" in bench.methods_for("cnn-bn") and "norm + update_bn" not in bench.methods_for("cnn")


@pytest.mark.parametrize("arch", ["cnn", "mlp", "transformer"])
def test_every_network_classifies_the_digits_images(bench, arch):
    model = bench.make_model(arch, 0, 16)
    assert model(torch.rand(3, 64)).shape == (3, 10)


def test_a_refresh_of_batchnorm_statistics_changes_eval_accuracy_but_not_training(bench):
    # 8 epochs: the running statistics (momentum 0.1) then hold under 1e-8 of their state at the switch,
    # so eval-mode accuracy at the end reflects the trained weights only
    methods = ["none", "fire", "norm", "fire + update_bn", "norm + update_bn"]
    out = bench.run_seed("cnn-bn", 0, dict(TINY, epochs2=8, methods=methods))
    for rule in ("fire", "norm"):
        plain, fresh = out[rule], out[f"{rule} + update_bn"]
        assert plain["drift"] != fresh["drift"]  # eval mode right after: stale vs refreshed statistics
        assert plain["final"] == fresh["final"]  # train-mode BatchNorm uses each batch's statistics
    assert out["none"]["drift"] == 0.0


def test_the_triggered_methods_apply_the_fire_rule_only_when_their_trigger_fires(bench):
    out = bench.run_seed("mlp", 0, dict(TINY, dfi_ratio=1e-9, dormant_share=0.999))
    assert out["FIRE@DfI"]["trigger"]["fired"] and not out["FIRE@dormant"]["trigger"]["fired"]
    assert out["FIRE@DfI"]["curve"] == out["fire"]["curve"] and out["FIRE@DfI"]["drift"] == out["fire"]["drift"]
    assert out["FIRE@dormant"]["curve"] == out["none"]["curve"] and out["FIRE@dormant"]["drift"] == 0.0
    assert out["fire"]["seconds"] > 0 and out["none"]["seconds"] == 0.0


def test_the_transformer_has_activation_modules_for_the_dormant_trigger(bench):
    model = bench.make_model("transformer", 0)
    features = bench.fire_core.torch.activations(model, torch.rand(5, 64))
    assert len(features) == 2 and all(a.shape == (40, 64) for a in features.values())  # 5 x 8 tokens, ff width 64
