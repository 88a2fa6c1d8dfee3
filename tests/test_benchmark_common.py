"""benchmarks/common.py: the rules by which every benchmark applies FIRE when needed, and how a row is judged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402

sys.path.pop(0)


def dfi_per_unit(w: np.ndarray) -> float:
    """DfI/n of an (out, in) weight from its singular values: FIRE's target is sqrt(out/in) times an isometry."""
    d_out, d_in = w.shape
    s = np.linalg.svd(w, compute_uv=False) / np.sqrt(d_out / d_in)
    return float(np.sum((s**2 - 1.0) ** 2) / min(d_out, d_in))


def weights(rng, scale_hidden=1.0):
    return [
        ("hidden", scale_hidden * rng.normal(size=(16, 8)) / np.sqrt(3 * 8), "oi"),
        ("head", rng.normal(size=(3, 16)) / np.sqrt(3 * 16), "oi"),
    ]


def test_the_dfi_rule_fires_when_the_largest_layer_value_passes_ratio_times_the_initial_largest():
    rng = np.random.default_rng(0)
    initial = weights(rng)
    base = max(dfi_per_unit(w) for _, w, _ in initial)
    gate = common.WhenNeeded("DfI", dfi_ratio=5.0)
    assert gate.check(0, weights=initial) is None  # the initial network is the baseline
    for where, grow in enumerate((1.2, 2.0, 3.0, 6.0), start=1):
        now = [(n, w * (grow if n == "hidden" else 1.0), lay) for n, w, lay in initial]
        expected = max(dfi_per_unit(w) for _, w, _ in now) > 5.0 * base
        reason = gate.check(where, weights=now)
        assert (reason is not None) is expected, (grow, reason)
    assert gate.fired_at == [where for where, grow in enumerate((1.2, 2.0, 3.0, 6.0), start=1)
                             if max(dfi_per_unit(w * (grow if n == "hidden" else 1.0)) for n, w, _ in initial) > 5 * base]
    assert gate.fired_at  # the grown weights did pass it
    np.testing.assert_allclose(gate.values[0], base, rtol=1e-10)


def test_the_dormant_rule_never_fires_on_the_initial_network_and_reads_the_mean_share():
    dead = np.zeros((50, 10))
    gate = common.WhenNeeded("dormant", dormant_share=0.3)
    assert gate.check(0, features={"a": dead}) is None  # all dormant, but it is the initial network
    alive = np.abs(np.random.default_rng(1).normal(size=(50, 10))) + 0.5
    half = alive.copy()
    half[:, :8] = 0.0
    assert gate.check(1, features={"a": alive, "b": alive}) is None
    assert gate.check(2, features={"a": half, "b": alive}) is not None  # mean of 0.8 and 0
    assert gate.values[1:] == [0.0, pytest.approx(0.4)] and gate.fired_at == [2]


def test_unknown_kind_is_refused_and_fractions_are_plain():
    with pytest.raises(ValueError, match="DfI"):
        common.WhenNeeded("srank")
    assert common.fire_fraction(1.0, 200.0) == 0.005 and np.isnan(common.fire_fraction(1.0, 0.0))


def test_names_keep_the_given_order_and_the_parser_names_what_is_wrong(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="bench")
    common.add_run_options(parser)
    args = parser.parse_args(["--jobs", "3"])
    assert (args.jobs, args.out, args.replot) == (3, common.RESULTS, None)
    assert common.names(parser, "methods", "FIRE,,none", ("none", "FIRE")) == ["FIRE", "none"]
    for text, said in (("none,S&P", "unknown methods ['S&P']"), (",", "no methods given")):
        with pytest.raises(SystemExit):
            common.names(parser, "methods", text, ("none", "FIRE"))
        assert said in capsys.readouterr().err
    assert common.command_line("/x/benchmarks/rl.py", ["--quick"]) == "python benchmarks/rl.py --quick"


def test_write_outputs_hands_results_and_cfg_to_plot_and_markdown(tmp_path, capsys):
    calls = []

    def plot(results, cfg, png):
        calls.append(("plot", results, cfg, png.name))
        png.write_bytes(b"")

    def markdown(results, cfg, md, png, seconds):
        calls.append(("md", results, cfg, png.name, seconds))
        md.write_text("| table |")

    assert common.write_outputs(tmp_path / "run", {"r": 1}, {"c": 2}, 5.0, plot, markdown) == 0
    assert calls == [("plot", {"r": 1}, {"c": 2}, "run.png"), ("md", {"r": 1}, {"c": 2}, "run.png", 5.0)]
    assert "| table |" in capsys.readouterr().out


def test_the_recommended_rule_is_the_library_when_needed_polled_with_a_trial():
    from fire_core.schedule import LOOKAHEAD_RATIO, LOOKAHEAD_STEPS, LookaheadBelow

    gate = common.WhenNeeded("when_needed")
    (trigger,) = gate.schedule.triggers
    assert isinstance(trigger, LookaheadBelow) and trigger.threshold == LOOKAHEAD_RATIO
    asked = []

    def trial(losses):
        return lambda k: asked.append(k) or losses

    assert gate.check(0, lookahead=trial((1.0, 0.1))) is None and asked == []  # the initial network: no trial
    assert gate.check(1, lookahead=trial((1.0, 0.9))) is None
    reason = gate.check(2, lookahead=trial((2.0, 0.5)))
    assert reason is not None and "lookahead" in reason and asked == [LOOKAHEAD_STEPS] * 2
    assert np.isnan(gate.values[0]) and gate.values[1:] == [pytest.approx(0.9), pytest.approx(0.25)]
    assert gate.losses == [None, [1.0, 0.9], [2.0, 0.5]] and gate.fired_at == [2]


def test_goals_judge_both_goals_from_paired_seeds():
    rng = np.random.default_rng(3)
    none = rng.normal(0.5, 0.01, size=8)
    fire = none + 0.05 + rng.normal(0, 0.002, size=8)  # FIRE helps clearly
    g = common.goals(none, fire, fire.copy())
    assert g["fire_helps"] and g["goal1"] and g["goal2"] and g["kept"] == pytest.approx(1.0)
    g = common.goals(none, fire, none + 0.02)  # keeps 40%: goal 1 missed, goal 2 met
    assert g["goal1"] is False and g["goal2"] and 0.3 < g["kept"] < 0.5
    g = common.goals(none, none - 0.05, none - 0.05)  # FIRE costs and the rule fired anyway
    assert g["goal1"] is None and g["fire_hurts"] and g["goal2"] is False
    assert "MISSED" in common.goals_cell(g) and "n/a" in common.goals_cell(g)
    g = common.goals(-none, -fire, -none, higher_is_better=False)  # losses: lower is better
    assert g["fire_helps"] and g["goal1"] is False and g["goal2"]
    d = fire - none
    half = 2.3646242510102993 * d.std(ddof=1) / np.sqrt(8)  # t(7) at 97.5%
    assert g["fire_minus_none"]["low"] == pytest.approx(d.mean() - half)
