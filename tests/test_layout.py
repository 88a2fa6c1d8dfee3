"""Layouts, reinit of one layer, and the metrics, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import reference_fire_conv, reference_newton_schulz
from hypothesis import given, settings
from hypothesis import strategies as st

import fire_core
from fire_core.layout import parse_layout

# layout, shape, (taps, d_out, d_in)
LAYOUTS = [
    ("oi", (6, 4), (1, 6, 4)),
    ("oiw", (6, 4, 3), (3, 6, 4)),
    ("oihw", (6, 4, 3, 2), (6, 6, 4)),
    ("oidhw", (6, 4, 2, 3, 2), (12, 6, 4)),
    ("iohw", (4, 6, 3, 3), (9, 6, 4)),
    ("io", (4, 6), (1, 6, 4)),
    ("hwio", (3, 2, 4, 6), (6, 6, 4)),
    ("ioo", (8, 2, 3), (1, 6, 8)),
    ("iio", (2, 3, 8), (1, 8, 6)),
    ("Lio", (3, 4, 6), (3, 6, 4)),  # nn.scan over 3 Dense layers
    ("Ehwio", (2, 3, 2, 4, 6), (12, 6, 4)),  # an ensemble of 2 convs: 6 taps each
    ("LiHoo", (2, 8, 3, 2, 3), (6, 6, 8)),  # two stack axes: 2 x 3 layers
]


@pytest.mark.parametrize(("layout", "shape", "mshape"), LAYOUTS)
def test_to_matrices_shape_and_round_trip(backend, rng, layout, shape, mshape):
    w = backend.asarray(rng.normal(size=shape))
    m = fire_core.to_matrices(w, layout)
    assert tuple(m.shape) == mshape
    back = fire_core.from_matrices(m, layout, shape)
    np.testing.assert_array_equal(backend.to_numpy(back), backend.to_numpy(w))


def test_oihw_matrices_are_the_taps_in_row_major_order(backend, rng):
    w = rng.normal(size=(5, 3, 2, 4))
    m = backend.to_numpy(fire_core.to_matrices(backend.asarray(w), "oihw"))
    for h in range(2):
        for k in range(4):
            np.testing.assert_array_equal(m[h * 4 + k], w[:, :, h, k])


def test_hwio_tap_is_transposed_flax_kernel(backend, rng):
    w = rng.normal(size=(2, 2, 3, 5))  # Flax Conv: (h, w, in, out)
    m = backend.to_numpy(fire_core.to_matrices(backend.asarray(w), "hwio"))
    np.testing.assert_array_equal(m[3], w[1, 1].T)


def test_iohw_tap_is_transposed_conv_transpose_weight(backend, rng):
    w = rng.normal(size=(3, 5, 2, 2))  # torch ConvTranspose2d: (in, out, h, w)
    m = backend.to_numpy(fire_core.to_matrices(backend.asarray(w), "iohw"))
    np.testing.assert_array_equal(m[2], w[:, :, 1, 0].T)


def test_repeated_feature_letters_merge_heads(backend, rng):
    w = rng.normal(size=(8, 2, 3))  # Flax attention query kernel (embed, heads, head_dim)
    m = backend.to_numpy(fire_core.to_matrices(backend.asarray(w), "ioo"))
    np.testing.assert_array_equal(m[0], w.reshape(8, 6).T)


@pytest.mark.parametrize(
    ("layout", "shape", "message"),
    [
        ("oihw", (3, 4), r"names 4 axes but the weight has shape \(3, 4\)"),
        ("ohw", (3, 4, 5), r"needs at least one 'o' and one 'i'"),
        ("oihh", (3, 4, 5, 5), "repeats a tap or stack axis"),
        ("oiLL", (3, 4, 5, 5), "repeats a tap or stack axis"),
        ("OI", (3, 4), "'O' and 'I' are stack axes"),
        ("o1", (3, 4), "string of letters"),
        ("oi", (0, 4), "empty"),
    ],
)
def test_bad_layouts_are_value_errors_naming_the_shape(layout, shape, message):
    with pytest.raises(ValueError, match=message):
        parse_layout(layout, shape)


def test_from_matrices_rejects_wrong_matrix_shape():
    with pytest.raises(ValueError, match=r"expected \(9, 6, 4\)"):
        fire_core.from_matrices(np.zeros((9, 4, 6)), "oihw", (6, 4, 3, 3))


# --- reinit of one layer ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 4), (4, 9), (6, 4, 3), (8, 5, 3, 3), (4, 6, 2, 3, 2)])
def test_reinit_torch_layouts_match_the_per_tap_reference_loop(backend, rng, shape):
    layout = {2: "oi", 3: "oiw", 4: "oihw", 5: "oidhw"}[len(shape)]
    w = rng.normal(size=shape)
    got = backend.to_numpy(fire_core.reinit(backend.asarray(w), layout, steps=5))
    np.testing.assert_allclose(got, reference_fire_conv(w, 5), rtol=0, atol=1e-12)


def test_reinit_flax_conv_equals_torch_conv_on_transposed_weights(backend, rng):
    w = rng.normal(size=(8, 5, 3, 3))  # torch (out, in, h, w)
    flax_w = np.transpose(w, (2, 3, 1, 0))  # (h, w, in, out)
    got = backend.to_numpy(fire_core.reinit(backend.asarray(flax_w), "hwio", steps=7))
    np.testing.assert_allclose(got, np.transpose(reference_fire_conv(w, 7), (2, 3, 1, 0)), atol=1e-12)


def test_reinit_conv_transpose_uses_out_by_in_taps(backend, rng):
    w = rng.normal(size=(4, 6, 3, 3))  # (in, out, h, w)
    torch_view = np.transpose(w, (1, 0, 2, 3))  # (out, in, h, w)
    got = backend.to_numpy(fire_core.reinit(backend.asarray(w), "iohw", steps=5))
    np.testing.assert_allclose(got, np.transpose(reference_fire_conv(torch_view, 5), (1, 0, 2, 3)), atol=1e-12)


def test_reinit_attention_kernel_is_one_matrix(backend, rng):
    w = rng.normal(size=(12, 3, 4))  # (embed, heads, head_dim)
    got = backend.to_numpy(fire_core.reinit(backend.asarray(w), "ioo", steps=5))
    want = (reference_newton_schulz(w.reshape(12, 12).T, 5) * 1.0).T.reshape(12, 3, 4)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_reinit_keeps_dtype_and_does_not_modify_input(backend, rng):
    w = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    x = backend.asarray(w.copy())
    out = fire_core.reinit(x, "oihw")
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(backend.to_numpy(x), w)


@pytest.mark.parametrize(
    ("scale", "factor"),
    [("fire", np.sqrt(8 / 5) / 9), ("variance", np.sqrt(8 / 5) / 3), (None, 1.0), (0.25, 0.25)],
)
def test_reinit_scale_rules(rng, scale, factor):
    w = rng.normal(size=(8, 5, 3, 3))
    got = fire_core.reinit(w, "oihw", steps=5, scale=scale)
    np.testing.assert_allclose(got, reference_fire_conv(w, 5) * (9 / np.sqrt(8 / 5)) * factor, atol=1e-12)


def test_reinit_norm_scale_keeps_the_layer_frobenius_norm(backend, rng):
    w = rng.normal(size=(8, 5, 3, 3)) * 0.3
    got = backend.to_numpy(fire_core.reinit(backend.asarray(w), "oihw", steps=5, scale="norm"))
    np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(w), rtol=1e-12)
    direction = reference_fire_conv(w, 5)
    np.testing.assert_allclose(got / np.linalg.norm(got), direction / np.linalg.norm(direction), atol=1e-12)


@pytest.mark.parametrize("scale", ["unit", True, float("nan"), "FIRE"])
def test_unknown_scale_is_a_value_error(scale):
    with pytest.raises(ValueError, match="unknown scale"):
        fire_core.reinit(np.ones((3, 3)), "oi", scale=scale)


def test_reinit_zero_layer_stays_zero_for_every_scale():
    for scale in ("fire", "variance", "norm", None, 2.0):
        out = fire_core.reinit(np.zeros((4, 3, 3, 3)), "oihw", scale=scale)
        assert np.all(out == 0), scale


# --- metrics ------------------------------------------------------------------------------


def test_sfe_is_the_squared_frobenius_distance(backend, rng):
    a, b = rng.normal(size=(2, 5, 3, 3))
    got = fire_core.sfe(backend.asarray(a), backend.asarray(b))
    assert tuple(got.shape) == ()
    np.testing.assert_allclose(float(got), np.sum((a - b) ** 2), rtol=1e-13)


def test_sfe_rejects_different_shapes():
    with pytest.raises(ValueError, match=r"shapes differ, \(3, 2\) vs \(2, 3\)"):
        fire_core.sfe(np.ones((3, 2)), np.ones((2, 3)))


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (2, 3, 6, 5)])
def test_dfi_uses_the_gram_of_the_smaller_side(backend, rng, shape):
    w = rng.normal(size=shape)
    got = backend.to_numpy(fire_core.dfi(backend.asarray(w)))
    assert got.shape == shape[:-2]
    flat = w.reshape(-1, *shape[-2:])
    want = []
    for m in flat:
        g = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        want.append(np.sum((g - np.eye(g.shape[0])) ** 2))
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-12)


def test_dfi_is_zero_for_semi_orthogonal_matrices(backend, rng):
    q, _ = np.linalg.qr(rng.normal(size=(9, 4)))
    for m in (q, q.T):
        assert float(fire_core.dfi(backend.asarray(m))) < 1e-28


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 8), n=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_dfi_is_the_sum_of_squared_gaps_of_squared_singular_values_plus_zero_cross_terms(m, n, seed):
    w = np.random.default_rng(seed).normal(size=(m, n))
    s = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(float(fire_core.dfi(w)), np.sum((s**2 - 1) ** 2), rtol=1e-10, atol=1e-12)


# --- stacked layers: uppercase axes ---------------------------------------------------


def test_stacked_matrices_are_each_layers_taps_in_order(backend, rng):
    w = rng.normal(size=(3, 2, 2, 4, 5))  # (layers, h, w, in, out)
    m = backend.to_numpy(fire_core.to_matrices(backend.asarray(w), "Lhwio"))
    for layer in range(3):
        for tap in range(4):
            np.testing.assert_array_equal(m[layer * 4 + tap], w[layer, tap // 2, tap % 2].T)


@pytest.mark.parametrize(("layout", "member", "shape", "axis"), [
    ("Lio", "io", (3, 4, 6), 0),
    ("iEo", "io", (4, 2, 6), 1),
    ("Ehwio", "hwio", (2, 3, 3, 4, 6), 0),
    ("Loihw", "oihw", (2, 6, 4, 3, 3), 0),
])
@pytest.mark.parametrize("scale", ["fire", "variance", "norm", None])
def test_a_stacked_weight_is_each_layer_reinitialized_on_its_own(backend, rng, layout, member, shape, axis, scale):
    """Against a per-member loop: the stack is never one layer (no scale over the stack, no shared norm)."""
    w = rng.normal(size=shape) * np.reshape(np.arange(1.0, shape[axis] + 1), [-1 if k == axis else 1 for k in range(len(shape))])
    got = backend.to_numpy(fire_core.reinit(backend.asarray(w), layout, steps=6, scale=scale))
    for k in range(shape[axis]):
        part = np.take(w, k, axis=axis)
        want = backend.to_numpy(fire_core.reinit(backend.asarray(part), member, steps=6, scale=scale))
        np.testing.assert_allclose(np.take(got, k, axis=axis), want, rtol=1e-10, atol=1e-12)


def test_stacked_report_rows_count_every_matrix_and_the_layers(rng):
    w = rng.normal(size=(4, 3, 3, 2, 5))
    rep = fire_core.reinit_many([("conv", w, "Lhwio")], steps=3, write=lambda *_: None)
    row = rep["conv"]
    assert (row["taps"], row["stack"], row["n"]) == (36, 4, 2)
    assert row["scale"] == pytest.approx(np.sqrt(5 / 2) / 9)
    mats = fire_core.to_matrices(w, "Lhwio") / row["scale"]
    assert row["dfi_before"] == pytest.approx(float(np.sum(fire_core.dfi(mats))), rel=1e-10)


def test_uppercase_feature_letters_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="'O' and 'I' are stack axes"):
        parse_layout("OI", (3, 4))
