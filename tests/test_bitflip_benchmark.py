"""benchmarks/bitflip.py: the stream, the hand-written gradient and FIRE on stacked weights, checked independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

import fire_core

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bf():
    return load_script(BENCH / "bitflip.py", "bitflip_bench")


M, F, T = 20, 15, 50


def test_stream_flips_one_bit_every_period(bf):
    st = bf.Stream(3, M, F, T, 100, 0.7)
    parts = [st.take(n) for n in (30, 70, 125, 25, 250)]  # chunks that do not line up with T
    x = np.concatenate([p[0] for p in parts])
    assert x.shape == (500, M + 1)
    assert set(np.unique(x)) <= {0.0, 1.0}
    assert np.all(x[:, M] == 1.0)  # the constant bit
    flipping = x[:, :F]
    for t in range(1, 500):
        changed = np.flatnonzero(flipping[t] != flipping[t - 1])
        if t % T:
            assert changed.size == 0, t  # constant within a period
        else:
            assert changed.size == 1, t  # exactly one flipping bit flips at each boundary
            assert (t, int(changed[0])) in st.flips
    assert [t for t, _ in st.flips] == list(range(T, 500, T))
    rest = x[:, F:M]  # fresh random every example: about half ones, changing from example to example
    assert 0.4 < rest.mean() < 0.6
    assert np.mean(np.any(rest[1:] != rest[:-1], axis=1)) > 0.9
    assert np.mean(rest[1:] == rest[:-1]) == pytest.approx(0.5, abs=0.06)


def test_target_equals_a_plain_loop_over_the_ltu_network(bf):
    st = bf.Stream(5, M, F, T, 100, 0.7)
    x, y = st.take(200)
    w, v, _ = st.net
    assert set(np.unique(w)) == {-1.0, 1.0} and set(np.unique(v)) == {-1.0, 1.0}
    for n in range(0, 200, 7):
        total = 0.0
        for i in range(w.shape[0]):
            s = sum(w[i, j] * x[n, j] for j in range(M + 1))
            negatives = sum(1 for j in range(M + 1) if w[i, j] < 0)
            threshold = (M + 1) * 0.7 - negatives
            total += v[i] * (1.0 if s > threshold else 0.0)
        assert y[n] == total


def test_hand_written_gradient_matches_torch_autograd(bf):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    S, K, h, n, lr = 3, 4, 5, M + 1, 0.01
    w1, w2, b2 = bf.init_weights(rng, (S, K), h, n)
    b2 = b2 + rng.normal(size=b2.shape)
    x = rng.integers(0, 2, size=(S, 1, n, 1)).astype(np.float64)
    x[..., M, 0] = 1.0
    y = rng.normal(size=(S, 1, 1, 1)) * 3
    t1, t2, tb = (torch.tensor(a, requires_grad=True) for a in (w1, w2, b2))
    pred = t2 @ torch.relu(t1 @ torch.tensor(x)) + tb
    loss = ((pred - torch.tensor(y)) ** 2).sum()  # independent learners: the sum separates them
    loss.backward()
    new = [a.copy() for a in (w1, w2, b2)]
    e = bf.sgd_step(*new, x, x.swapaxes(-1, -2), y, lr)
    np.testing.assert_allclose(e, (pred - torch.tensor(y)).detach().numpy(), rtol=0, atol=1e-12)
    for before, after, grad in zip((w1, w2, b2), new, (t1.grad, t2.grad, tb.grad)):
        np.testing.assert_allclose(after, before - lr * grad.numpy(), rtol=0, atol=1e-13)
    assert np.any(t1.grad.numpy() == 0) and np.any(t1.grad.numpy() != 0)  # some units inactive, some not


def test_fire_on_stacked_weights_equals_fire_run_by_run(bf):
    rng = np.random.default_rng(1)
    w1, w2, _ = bf.init_weights(rng, (6,), 5, M + 1)
    w1 = w1 * rng.uniform(0.1, 5.0, size=(6, 1, 1))  # runs far from each other and from FIRE's target
    n1, n2 = bf.fire_stacked(w1, w2, 10)
    for r in range(6):
        np.testing.assert_allclose(n1[r], fire_core.reinit(w1[r], "oi", steps=10), rtol=0, atol=1e-14)
        np.testing.assert_allclose(n2[r], fire_core.reinit(w2[r], "oi", steps=10), rtol=0, atol=1e-14)
    # wide 5 x 21 hidden weight: orthogonal rows of norm sqrt(5/21) (10 steps are close on these small matrices)
    gram = n1 @ n1.swapaxes(-1, -2)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(5) * 5 / 21, gram.shape), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(n2, axis=-1), np.sqrt(1 / 5), rtol=1e-6)


def test_stacked_learners_are_independent(bf):
    """A step on the (seeds, methods) stack equals a step of each learner alone."""
    rng = np.random.default_rng(2)
    w1, w2, b2 = bf.init_weights(rng, (2, 3), 5, M + 1)
    x = rng.integers(0, 2, size=(2, 1, M + 1, 1)).astype(np.float64)
    y = rng.normal(size=(2, 1, 1, 1))
    stacked = [a.copy() for a in (w1, w2, b2)]
    bf.sgd_step(*stacked, x, x.swapaxes(-1, -2), y, 0.01)
    for i in range(2):
        for k in range(3):
            alone = [a[i, k].copy() for a in (w1, w2, b2)]
            bf.sgd_step(*alone, x[i, 0], x[i, 0].T, y[i, 0], 0.01)
            for a, b in zip(alone, stacked):
                np.testing.assert_allclose(a, b[i, k], rtol=0, atol=1e-15)


SMALL = dict(m=M, f=F, period=512, examples=3 * 512, bin=512, every=1, fire_steps=10, step_size=0.01, hidden=5,
             target_hidden=100, beta=0.7, snp=[0.6, 0.1])


def test_the_trial_module_is_the_learner_and_its_fire_is_the_fire_rows(bf):
    torch = pytest.importorskip("torch")
    import fire_core.torch

    rng = np.random.default_rng(3)
    w1, w2, b2 = bf.init_weights(rng, (), 5, M + 1)
    w1, b2 = w1 * rng.uniform(0.5, 3.0, size=(5, 1)), b2 + 0.7  # uneven rows, a nonzero output bias
    x = rng.integers(0, 2, size=(40, M + 1)).astype(np.float64)
    module = bf.learner_module(w1, w2, b2)
    out = module(torch.from_numpy(x)).detach().numpy()[:, 0]
    expected = [bf.forward(w1, w2, b2, row[:, None])[2][0, 0] for row in x]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    fire_core.torch.apply(module, steps=10, report=False)  # what the trial applies to its FIRE copy
    n1, n2 = bf.fire_stacked(w1[None], w2[None], 10)
    np.testing.assert_allclose(module[0].weight.detach().numpy(), n1[0], rtol=0, atol=1e-13)
    np.testing.assert_allclose(module[2].weight.detach().numpy(), n2[0], rtol=0, atol=1e-13)
    assert float(module[2].bias.detach()) == 0.7  # the output bias is left alone, as in the FIRE row


@pytest.mark.parametrize("ratio", [0.5, 0.55])
def test_fire_when_needed_fires_at_a_flip_iff_the_trial_ratio_is_below_the_threshold(bf, monkeypatch, ratio):
    import fire_core.torch

    seen = []

    def trial(model, batches, probe, **options):
        seen.append((batches, probe, options))
        return lambda k: (seen.append(k), (2.0, 2.0 * ratio))[1]

    monkeypatch.setattr(fire_core.torch, "trial", trial)
    cfg = dict(SMALL, methods=["none", "FIRE", bf.NEEDED])
    row = bf.run_seed([4], cfg)[0]
    need = row[bf.NEEDED]
    fires = ratio < 0.526
    assert need["fired_at"] == ([512, 1024] if fires else []) and need["fire_calls"] == len(need["fired_at"])
    assert need["trials"] == 2 and np.isnan(need["values"][0]) and need["values"][1:] == pytest.approx([ratio] * 2)
    # firing at every flip is the FIRE row at every flip (--every 1); never firing is none
    np.testing.assert_allclose(need["bins"], row["FIRE" if fires else "none"]["bins"], rtol=1e-9, atol=0)
    # the trial's data: the 512 examples of the stream before the flip, 4 batches of 64 and a probe of 256 held out
    stream = bf.Stream(4, M, F, 512, 100, 0.7)
    for j, t in enumerate((512, 1024)):
        batches, probe, options = seen[2 * j]
        assert seen[2 * j + 1] == 200
        assert options == dict(loss=bf.mse, lr=1e-3, steps=10, report=False)
        assert [b[0].shape for b in batches] == [(64, M + 1)] * 4 and probe[0].shape == (256, M + 1)
        x, y = stream.take(512)
        got = np.concatenate([np.column_stack([b[0].numpy(), b[1].numpy()]) for b in batches + [probe]])
        want = np.column_stack([x, y])
        np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


def test_fire_when_needed_runs_a_real_trial_and_the_table_has_its_section(bf, tmp_path):
    cfg = dict(SMALL, methods=["none", "FIRE", bf.NEEDED], examples=2 * 512, quick=True, jobs=1, command="test")
    runs = bf.run_seed([0, 1], cfg)
    for r in runs:
        need = r[bf.NEEDED]
        (without, with_fire), = need["losses"][1:]
        assert np.isfinite([without, with_fire]).all() and need["values"][1] == pytest.approx(with_fire / without)
        assert (need["fired_at"] == [512]) == (need["values"][1] < 0.526)
    md = tmp_path / "b.md"
    bf.write_markdown({"runs": runs}, cfg, md, tmp_path / "b.png", 1.0)
    lines = md.read_text().splitlines()
    start = lines.index("### FIRE when needed (`fire_core.schedule.when_needed()`)")
    header = ("| setting | metric | FIRE − none | when needed − none | when needed − FIRE | fired | trial cost per check "
              "| goals |")
    row = lines[lines.index(header, start) + 2]
    assert "firings a seed" in row and "/2 seeds fired" in row and "gain kept:" in row and "never cost:" in row
