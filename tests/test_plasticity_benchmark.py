"""benchmarks/plasticity.py: its baselines follow their published rules, and one tiny run is well formed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from fire_core.demo import accuracy, digits, make_mlp  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "plasticity.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(_PATH, "plasticity_benchmark")


def grown(model, factor=3.0):
    """The network with every parameter scaled up, as if training had grown its weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor).add_(0.05)
    return model


def test_swr_moves_each_weight_norm_a_fraction_lambda_back_to_its_initial_norm(bench):
    model = make_mlp(0, hidden=16)
    initial = [float(np.linalg.norm(m.weight.detach().numpy())) for m in bench.linears(model)]
    hook = bench.SoftWeightRescaling(model, 0.1)
    grown(model)
    norms = [float(np.linalg.norm(m.weight.detach().numpy())) for m in bench.linears(model)]
    hook(model)
    after = [float(np.linalg.norm(m.weight.detach().numpy())) for m in bench.linears(model)]
    np.testing.assert_allclose(after, [0.1 * n0 + 0.9 * n for n0, n in zip(initial, norms)], rtol=1e-5)


def test_swr_keeps_the_network_proportional(bench):
    # Oh et al. 2025, Theorem 1: biases scaled by the cumulative product keep f(x) up to a positive factor.
    model = grown(make_mlp(1, hidden=16)).double()
    hook = bench.SoftWeightRescaling(make_mlp(1, hidden=16), 0.3)
    x = torch.rand(50, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        hook(model)
        after = model(x)
    k = float(torch.sum(after * before) / torch.sum(before * before))  # least-squares factor
    assert 0 < k < 1  # the grown network is scaled down
    torch.testing.assert_close(after, k * before, rtol=1e-9, atol=1e-9 * float(before.abs().max()))


def test_shrink_perturb_blends_toward_the_initial_parameters(bench):
    model = make_mlp(2, hidden=8)
    initial = [p.detach().clone() for p in model.parameters()]
    grown(model)
    trained = [p.detach().clone() for p in model.parameters()]
    bench.shrink_perturb(model, initial, 0.8)
    for p, p0, p1 in zip(model.parameters(), initial, trained):
        torch.testing.assert_close(p.detach(), 0.2 * p1 + 0.8 * p0)


def test_tiny_run_reports_every_method(bench):
    cfg = dict(hidden=8, epochs1=1, epochs2=2, swr_lambda=1e-3, methods=list(bench.METHODS), dfi_ratio=100.0,
               dormant_share=0.3)
    out = bench.run_seed("random-labels", 0, cfg)
    assert set(out) == {"phase1", *bench.METHODS}
    for method in bench.METHODS:
        row = out[method]
        assert len(row["curve"]) == 3 and row["final"] == row["curve"][-1]
        assert 0.0 <= row["dormant_after"] <= 1.0 and 1 <= row["srank_after"] <= 8
    assert out["none"]["sfe"] == 0.0 and out["none"]["dfi"] == pytest.approx(out["phase1"]["dfi"])
    assert out["FIRE-svd"]["dfi"] < 1e-9 < out["FIRE-10"]["dfi"]
    # the real trial ran at the switch, and left the network as it was: the row is FIRE-10's or none's, exactly
    needed = out[bench.NEEDED]["trigger"]
    without, with_fire = needed["losses"][1]
    assert needed["values"][1] == pytest.approx(with_fire / without) and without > 0
    same_as = "FIRE-10" if needed["fired"] else "none"
    assert out[bench.NEEDED]["curve"] == out[same_as]["curve"] and out[bench.NEEDED]["sfe"] == out[same_as]["sfe"]
    # "reset" puts back the network's initialization: right after it, the untrained network's accuracy
    _, _, x_test, y_test = digits()
    assert out["reset"]["curve"][0] == accuracy(make_mlp(0, hidden=8), x_test, y_test)


@pytest.mark.parametrize("threshold, same_as", [(1e-9, "FIRE-10"), (1e12, "none")])
def test_a_triggered_method_is_fire_10_when_it_fires_and_none_when_not(bench, threshold, same_as):
    methods = ["none", "FIRE-10", "FIRE@DfI", "FIRE@dormant"]
    cfg = dict(hidden=8, epochs1=2, epochs2=2, swr_lambda=1e-3, methods=methods, dfi_ratio=threshold,
               dormant_share=min(threshold, 0.0) if same_as == "FIRE-10" else 0.999)
    out = bench.run_seed("random-labels", 0, cfg)
    for m in ("FIRE@DfI", "FIRE@dormant"):
        assert out[m]["trigger"]["fired"] is (same_as == "FIRE-10")
        assert len(out[m]["trigger"]["values"]) == 2  # the initial network, then the switch
        assert out[m]["curve"] == out[same_as]["curve"] and out[m]["sfe"] == out[same_as]["sfe"]
    lines = bench.when_needed_lines([out, out], methods, cfg)
    assert any(line.startswith("FIRE@DfI: fired in " + ("2" if same_as == "FIRE-10" else "0")) for line in lines)


@pytest.mark.parametrize("losses, fires", [((2.0, 1.04), True), ((2.0, 1.06), False)])  # ratios 0.52 and 0.53
def test_fire_when_needed_is_fire_10_iff_the_trial_ratio_is_below_the_threshold(bench, monkeypatch, losses, fires):
    x_train, y_train, _, _ = digits()
    calls = []

    def fake_trial(model, batches, probe, **options):  # the library's trial, its losses chosen
        calls.append((batches, probe, options))
        return lambda k: calls.append(k) or losses

    monkeypatch.setattr(bench.fire_core.torch, "trial", fake_trial)
    methods = ["none", "FIRE-10", bench.NEEDED]
    cfg = dict(hidden=8, epochs1=1, epochs2=1, swr_lambda=1e-3, methods=methods, dfi_ratio=100.0, dormant_share=0.3)
    out = bench.run_seed("random-labels", 3, cfg)
    (batches, probe, options), k = calls  # one trial, at the switch (none on the initial network)
    assert options == {"steps": 10} and k == bench.when_needed()[0].steps
    # 4 batches of 64 and a probe of 256 other examples, all of them phase-2 training data (true labels)
    assert [len(b[0]) for b in batches] == [64] * 4 and len(probe[0]) == 256
    rows = {tuple(x.tolist()): int(y) for x, y in zip(x_train, y_train)}
    drawn = [(x, y) for b in [*batches, probe] for x, y in zip(*b)]
    assert all(rows[tuple(x.tolist())] == int(y) for x, y in drawn)
    assert len({tuple(x.tolist()) for x, _ in drawn}) == len(drawn) == 512
    trigger = out[bench.NEEDED]["trigger"]
    assert trigger["fired"] is fires
    assert np.isnan(trigger["values"][0]) and trigger["values"][1] == pytest.approx(losses[1] / losses[0])
    assert trigger["losses"] == [None, list(losses)]
    same_as = "FIRE-10" if fires else "none"
    assert out[bench.NEEDED]["curve"] == out[same_as]["curve"] and out[bench.NEEDED]["sfe"] == out[same_as]["sfe"]
    lines = bench.needed_section({"random-labels": [out, out]}, dict(cfg, seeds=2))
    assert lines[0] == "## FIRE when needed (`fire_core.schedule.when_needed()`)"
    assert "| setting | metric | FIRE − none | when needed − none | when needed − FIRE | fired | trial cost per check " \
           "| goals |" in lines
    row = next(line for line in lines if line.startswith("| random-labels |"))
    assert f"| {2 if fires else 0}/2 seeds |" in row and "never cost:" in row


def test_the_trial_draws_the_same_data_whatever_else_ran(bench):
    # its own generator: the global RNG neither feeds nor is moved by the draw
    x, y, _, _ = digits()
    torch.manual_seed(0)
    first = bench.trial_data(5, x, y)
    state = torch.random.get_rng_state()
    torch.manual_seed(1)
    again = bench.trial_data(5, x, y)
    torch.testing.assert_close(first[1][0], again[1][0])
    torch.manual_seed(0)
    bench.trial_data(5, x, y)
    assert torch.equal(torch.random.get_rng_state(), state)
