"""benchmarks/bitflip.py: the stream, the hand-written gradient and FIRE on stacked weights, checked independently."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import fire_core

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bf():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bitflip_bench", BENCH / "bitflip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
