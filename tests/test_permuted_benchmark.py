"""benchmarks/permuted.py: the label permutations, the trial's data, the when-needed row's decisions, one tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import fire_core.torch  # noqa: E402
from fire_core.demo import digits  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "permuted.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(_PATH, "permuted_benchmark")


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    """One quick run of the MLP (every method), its files in a temporary folder."""
    out = tmp_path_factory.mktemp("permuted")
    assert bench.main(["--quick", "--archs", "mlp", "--jobs", "1", "--out", str(out)]) == 0
    return out


def test_task_0_is_the_true_labels_and_every_task_a_permutation_of_the_classes(bench):
    perms = bench.permutations(3, 7)
    assert len(perms) == 7
    assert perms[0].tolist() == list(range(10))
    for p in perms:
        assert sorted(p.tolist()) == list(range(10))
    assert len({tuple(p.tolist()) for p in perms}) > 2  # random, not all the identity
    assert [p.tolist() for p in bench.permutations(3, 7)] == [p.tolist() for p in perms]  # seeded
    assert [p.tolist() for p in bench.permutations(4, 7)] != [p.tolist() for p in perms]
    x, y, _, _ = digits()
    assert torch.equal(perms[0][y], y)


def test_the_trial_reads_disjoint_batches_and_probe_of_the_new_tasks_training_data(bench):
    x, y, _, _ = digits()
    y_new = bench.permutations(0, 3)[2][y]
    batches, (x_probe, y_probe) = bench.trial_data(0, 2, x, y_new)
    assert [b[0].shape[0] for b in batches] == [64] * bench.TRIAL_BATCHES and x_probe.shape[0] == bench.PROBE
    rows = {tuple(r.tolist()): k for k, r in enumerate(x)}  # an image's row in the training set (digits has duplicates)
    seen = []
    for xb, yb in [*batches, (x_probe, y_probe)]:
        for xi, yi in zip(xb, yb):
            k = rows[tuple(xi.tolist())]
            assert y_new[k] == yi  # the new task's label of that training image
            seen.append(tuple(xi.tolist()))
    assert len(seen) == 4 * 64 + 256
    # the same draw on the images' indices: 512 different training images, none in both the batches and the probe
    index = torch.arange(x.shape[0], dtype=torch.float32)[:, None]
    idx_batches, (idx_probe, _) = bench.trial_data(0, 2, index, y_new)
    looked = torch.cat([b[0] for b in idx_batches]).flatten().tolist()
    probed = idx_probe.flatten().tolist()
    assert len(set(looked)) == 256 and len(set(probed)) == 256 and not set(looked) & set(probed)
    # drawn from their own generator: the global RNG is not read
    state = torch.random.get_rng_state()
    again = bench.trial_data(0, 2, x, y_new)
    assert torch.equal(torch.random.get_rng_state(), state) and torch.equal(again[1][0], x_probe)


def test_the_when_needed_row_fires_exactly_where_the_trial_ratio_is_below_the_threshold(bench, monkeypatch):
    # the trial's ratio (with FIRE / without) at boundaries 1, 2, 3: above, below, just above 0.526
    given = {1: 0.9, 2: 0.3, 3: 0.53}
    seen = []

    def fake_trial(model, batches, probe, **options):
        assert options == {"steps": 10} and len(batches) == 4 and probe[0].shape[0] == 256
        boundary = len(seen) + 1
        seen.append(boundary)
        return lambda k: (1.0, given[boundary])

    monkeypatch.setattr(fire_core.torch, "trial", fake_trial)
    cfg = {"tasks": 4, "epochs": 1, "steps": 10, "methods": ["none", "FIRE", bench.NEEDED]}
    out = bench.run_seed("mlp", 0, cfg)
    row, none, fire = out[bench.NEEDED], out["none"], out["FIRE"]
    assert seen == [1, 2, 3]
    assert row["fired"] == [2] and fire["fired"] == [1, 2, 3] and none["fired"] == []
    assert row["values"][1:] == [0.9, 0.3, 0.53] and row["losses"][1:] == [[1.0, v] for v in (0.9, 0.3, 0.53)]
    assert len(row["check_seconds"]) == 3
    # paired runs: identical until the rule fires (before task 2), different after
    assert row["accs"][:2] == none["accs"][:2]
    assert fire["accs"][0] == none["accs"][0]
    assert row["accs"][2:] != none["accs"][2:]


def test_quick_mode_writes_the_table_with_the_when_needed_section_and_its_numbers(bench, quick):
    md = (quick / "permuted-quick.md").read_text()
    assert "Quick mode" in md
    assert "## FIRE when needed (`fire_core.schedule.when_needed()`)" in md
    assert ("| setting | metric | FIRE − none | when needed − none | when needed − FIRE | fired "
            "| trial cost per check | goals |") in md
    for m in bench.METHODS:
        assert f"| {m} |" in md
    assert "never cost:" in md and "Trial ratio" in md and "FIRE@dormant" in md
    assert (quick / "permuted-quick.png").stat().st_size > 1000
    saved = json.loads((quick / "permuted-quick.json").read_text())
    assert saved["cfg"]["quick"] is True and saved["cfg"]["tasks"] == 2
    runs = saved["results"]["mlp"]
    assert len(runs) == 2
    for r in runs:
        for m in bench.METHODS:
            assert len(r[m]["accs"]) == 2
            assert r[m]["accs"][0] == r["none"]["accs"][0]  # nothing differs before the first boundary
        assert len(r[bench.NEEDED]["values"]) == 2 and r["FIRE"]["fired"] == [1]


def test_replot_redraws_the_table_and_plot_from_the_json(bench, quick):
    md, png = quick / "permuted-quick.md", quick / "permuted-quick.png"
    before = md.read_text()
    md.unlink()
    png.unlink()
    assert bench.main(["--replot", str(quick / "permuted-quick.json")]) == 0
    assert md.read_text() == before and png.stat().st_size > 1000


def test_unknown_names_and_a_missing_baseline_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--archs", "resnet"])
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--methods", "FIRE"])
