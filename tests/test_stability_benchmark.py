"""benchmarks/stability.py: the methods it runs per architecture, and one tiny run of each network."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "stability.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(_PATH, "stability_benchmark")


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
    # the real trial ran at the switch and left the network as it was: the row is the fire rule's or none's, exactly
    needed = out[bench.NEEDED]["trigger"]
    without, with_fire = needed["losses"][1]
    assert needed["values"][1] == pytest.approx(with_fire / without) and without > 0
    same_as = "fire" if needed["fired"] else "none"
    assert out[bench.NEEDED]["curve"] == out[same_as]["curve"] and out[bench.NEEDED]["drift"] == out[same_as]["drift"]


def fake_trial(calls, losses):
    """``fire_core.torch.trial`` with its losses chosen; it also runs the real trial for 2 steps with what it got."""
    import fire_core.torch

    real = fire_core.torch.trial  # taken before the test puts this in its place

    def trial(model, batches, probe, **options):
        calls.append((batches, probe, options))
        without, with_fire = real(model, batches, probe, **options)(2)  # the options apply, the inputs feed the model
        assert without > 0 and with_fire > 0
        return lambda k: calls.append(k) or losses

    return trial


@pytest.mark.parametrize("losses, fires", [((2.0, 1.04), True), ((2.0, 1.06), False)])  # ratios 0.52 and 0.53
def test_fire_when_needed_applies_the_fire_rule_iff_the_trial_ratio_is_below_the_threshold(bench, monkeypatch, losses,
                                                                                            fires):
    calls = []
    monkeypatch.setattr(bench.fire_core.torch, "trial", fake_trial(calls, losses))
    out = bench.run_seed("mlp", 1, dict(TINY, methods=["none", "fire", bench.NEEDED]))
    (batches, probe, options), k = calls  # one trial, at the switch (none on the initial network)
    assert k == bench.when_needed()[0].steps
    assert options == {"loss": torch.nn.functional.cross_entropy, "steps": TINY["steps"], "scale": "fire"}
    assert [b[0].shape for b in batches] == [(64, 64)] * 4 and probe[0].shape == (256, 64)
    trigger = out[bench.NEEDED]["trigger"]
    assert trigger["fired"] is fires and trigger["values"][1] == pytest.approx(losses[1] / losses[0])
    assert trigger["losses"] == [None, list(losses)]
    same_as = "fire" if fires else "none"
    assert out[bench.NEEDED]["curve"] == out[same_as]["curve"] and out[bench.NEEDED]["drift"] == out[same_as]["drift"]
    lines = bench.needed_section({"mlp": [out, out]}, dict(TINY, seeds=2))
    assert lines[0] == "## FIRE when needed (`fire_core.schedule.when_needed()`)"
    assert "| setting | metric | FIRE − none | when needed − none | when needed − FIRE | fired | trial cost per check " \
           "| goals |" in lines
    row = next(line for line in lines if line.startswith("| mlp |"))
    assert f"| {2 if fires else 0}/2 seeds |" in row and "never cost:" in row


def test_the_transformers_trial_takes_the_images_as_the_benchmark_feeds_them(bench, monkeypatch):
    calls = []
    monkeypatch.setattr(bench.fire_core.torch, "trial", fake_trial(calls, (1.0, 0.5)))
    out = bench.run_seed("transformer", 0, dict(TINY, epochs1=1, epochs2=1, methods=["fire", bench.NEEDED]))
    assert out[bench.NEEDED]["trigger"]["fired"] and out[bench.NEEDED]["curve"] == out["fire"]["curve"]


def test_the_transformer_has_activation_modules_for_the_dormant_trigger(bench):
    model = bench.make_model("transformer", 0)
    features = bench.fire_core.torch.activations(model, torch.rand(5, 64))
    assert len(features) == 2 and all(a.shape == (40, 64) for a in features.values())  # 5 x 8 tokens, ff width 64
