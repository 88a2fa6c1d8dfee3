"""fire_core.diagnostics: srank and dormant units, on every backend, against plain numpy loops."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fire_core.diagnostics import DORMANT_TAU, SRANK_DELTA, dormant_ratio, dormant_scores, srank

# --- independent references -----------------------------------------------------------


def srank_loop(phi: np.ndarray, delta: float = 0.01) -> int:
    """Kumar et al.: walk k up from 1 until the top-k singular values hold (1 - delta) of the sum."""
    s = np.linalg.svd(phi, compute_uv=False)
    total = float(np.sum(s))
    if total == 0.0:
        return 0
    held = 0.0
    for k, value in enumerate(s, start=1):
        held += float(value)
        if held >= (1.0 - delta) * total:
            return k
    return len(s)


def dormant_loop(layers: list[np.ndarray], tau: float) -> float:
    """ReDo's ratio with explicit loops over units: score_i = E|h_i| / (1/H sum_j E|h_j|)."""
    dormant = units = 0
    for h in layers:
        n_units = h.shape[1]
        means = [float(np.mean(np.abs(h[:, i]))) for i in range(n_units)]
        layer = sum(means) / n_units
        for m in means:
            score = m / layer if layer > 0 else 0.0
            dormant += score <= tau
        units += n_units
    return dormant / units


def low_rank(rng, n: int, d: int, singular_values) -> np.ndarray:
    k = len(singular_values)
    u, _ = np.linalg.qr(rng.normal(size=(n, k)))
    v, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return (u * np.asarray(singular_values, dtype=float)) @ v.T


# --- srank ------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    assert SRANK_DELTA == 0.01
    assert DORMANT_TAU == 0.025


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (33, 33), (1, 7)])
def test_srank_matches_loop_on_gaussian(backend, rng, shape):
    phi = rng.normal(size=shape)
    got = int(backend.to_numpy(srank(backend.asarray(phi))))
    assert got == srank_loop(phi)


def test_srank_counts_a_known_spectrum(backend, rng):
    # singular values 10, 5, 1, 0.04: sum 16.04, 99% is 15.8796 -> the top three (16.0) are needed.
    phi = low_rank(rng, 50, 12, [10.0, 5.0, 1.0, 0.04])
    assert srank_loop(phi) == 3
    assert int(backend.to_numpy(srank(backend.asarray(phi)))) == 3


@pytest.mark.parametrize("delta", [0.0, 0.05, 0.3])
def test_srank_follows_delta(backend, rng, delta):
    phi = low_rank(rng, 40, 20, np.geomspace(1.0, 1e-3, 20))
    got = int(backend.to_numpy(srank(backend.asarray(phi), delta)))
    assert got == srank_loop(phi, delta)


def test_srank_of_collapsed_features_is_one(backend, rng):
    phi = np.outer(rng.normal(size=30), rng.normal(size=8))  # every sample the same direction
    assert int(backend.to_numpy(srank(backend.asarray(phi)))) == 1


def test_srank_of_zero_features_is_zero(backend):
    assert int(backend.to_numpy(srank(backend.asarray(np.zeros((10, 4)))))) == 0


def test_srank_batches_over_leading_axes(backend, rng):
    phi = np.stack([low_rank(rng, 20, 10, np.geomspace(1, 10.0**-p, 10)) for p in (1, 2, 4)])
    got = backend.to_numpy(srank(backend.asarray(phi)))
    assert got.shape == (3,)
    assert got.tolist() == [srank_loop(m) for m in phi]


def test_srank_float32_matches_float64_loop(backend, rng):
    phi = rng.normal(size=(48, 24))
    got = int(backend.to_numpy(srank(backend.asarray(phi.astype(np.float32)))))
    assert got == srank_loop(phi)


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros(())])
def test_srank_rejects_non_matrices(bad):
    with pytest.raises(ValueError, match="srank"):
        srank(bad)


@pytest.mark.parametrize("delta", [-0.1, 1.0])
def test_srank_rejects_delta_outside_unit_interval(delta):
    with pytest.raises(ValueError, match="delta"):
        srank(np.ones((3, 3)), delta)


def test_srank_rejects_integer_features():
    with pytest.raises(TypeError, match="srank"):
        srank(np.ones((3, 3), dtype=np.int64))


# --- dormant units -----------------------------------------------------------------------


def relu_layer(rng, batch: int, units: int, dead: int) -> np.ndarray:
    """ReLU activations with ``dead`` units that never fire and a spread of activity elsewhere."""
    h = np.maximum(rng.normal(size=(batch, units)) * rng.uniform(0.01, 2.0, size=units), 0.0)
    h[:, :dead] = 0.0
    return h


@pytest.mark.parametrize("tau", [0.0, 0.025, 0.1, 0.5])
def test_dormant_ratio_matches_loop(backend, rng, tau):
    h = relu_layer(rng, 64, 40, dead=7)
    got = float(backend.to_numpy(dormant_ratio(backend.asarray(h), tau)))
    assert got == pytest.approx(dormant_loop([h], tau), abs=1e-12)


def test_dormant_ratio_tau_zero_counts_silent_units(backend, rng):
    h = relu_layer(rng, 32, 20, dead=5)
    assert float(backend.to_numpy(dormant_ratio(backend.asarray(h), 0.0))) == pytest.approx(5 / 20)


def test_dormant_ratio_pools_units_over_layers(backend, rng):
    layers = [relu_layer(rng, 50, 30, dead=3), relu_layer(rng, 50, 10, dead=6)]
    got = float(backend.to_numpy(dormant_ratio([backend.asarray(h) for h in layers], 0.1)))
    assert got == pytest.approx(dormant_loop(layers, 0.1), abs=1e-12)
    # pooled over units, not the mean of the two layers' ratios
    assert got != pytest.approx(np.mean([dormant_loop([h], 0.1) for h in layers]))


def test_dormant_scores_match_loop_and_average_one(backend, rng):
    h = relu_layer(rng, 40, 12, dead=2)
    got = backend.to_numpy(dormant_scores(backend.asarray(h)))
    means = np.array([np.mean(np.abs(h[:, i])) for i in range(12)])
    np.testing.assert_allclose(got, means / means.mean(), rtol=1e-12)
    assert got.mean() == pytest.approx(1.0)


def test_dormant_scores_use_absolute_values(backend, rng):
    h = rng.normal(size=(30, 6))  # tanh-like signed activations: a mean near 0 is not dormancy
    got = backend.to_numpy(dormant_scores(backend.asarray(h)))
    means = np.abs(h).mean(axis=0)
    np.testing.assert_allclose(got, means / means.mean(), rtol=1e-12)


def test_dormant_scores_treat_conv_channels_as_units(backend, rng):
    h = np.maximum(rng.normal(size=(8, 5, 4, 3)), 0.0)  # torch (N, C, H, W)
    h[:, 2] = 0.0
    got = backend.to_numpy(dormant_scores(backend.asarray(h), axis=1))
    means = np.array([np.mean(h[:, c]) for c in range(5)])
    np.testing.assert_allclose(got, means / means.mean(), rtol=1e-12)
    assert got[2] == 0.0


def test_dormant_ratio_of_silent_layer_is_one(backend):
    assert float(backend.to_numpy(dormant_ratio(backend.asarray(np.zeros((9, 4)))))) == 1.0


def test_dormant_ratio_is_scale_invariant(backend, rng):
    h = relu_layer(rng, 30, 16, dead=4)
    a = float(backend.to_numpy(dormant_ratio(backend.asarray(h), 0.1)))
    b = float(backend.to_numpy(dormant_ratio(backend.asarray(h * 1000.0), 0.1)))
    assert a == b


def test_dormant_ratio_computes_float16_in_float32(rng):
    h = relu_layer(rng, 64, 20, dead=3)
    got = dormant_ratio(h.astype(np.float16), 0.1)
    assert got.dtype == np.float32
    assert float(got) == pytest.approx(dormant_loop([h.astype(np.float16).astype(np.float64)], 0.1))


@pytest.mark.parametrize("bad", [np.zeros(4), np.zeros(())])
def test_dormant_rejects_non_batched_input(bad):
    with pytest.raises(ValueError, match="dormant_scores"):
        dormant_ratio(bad)


def test_dormant_rejects_negative_tau():
    with pytest.raises(ValueError, match="tau"):
        dormant_ratio(np.ones((3, 3)), -0.1)


def test_dormant_rejects_empty_layer_list():
    with pytest.raises(ValueError, match="no activations"):
        dormant_ratio([])


def test_dormant_rejects_axis_out_of_range():
    with pytest.raises(ValueError, match="axis"):
        dormant_scores(np.ones((3, 3)), axis=2)


def test_diagnostics_import_no_framework():
    code = (
        "import sys, fire_core.diagnostics\n"
        "bad = [m for m in ('torch', 'jax', 'cupy', 'flax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_diagnostics_are_part_of_fire_core_metrics():
    import fire_core.diagnostics
    import fire_core.metrics

    for name in ("srank", "dormant_ratio", "dormant_scores"):
        assert getattr(fire_core.metrics, name) is getattr(fire_core.diagnostics, name)
