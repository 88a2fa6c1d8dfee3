"""Report: skipped weights and tied aliases are part of what a user reads."""

from __future__ import annotations

import numpy as np
import pytest

import fire_core
from fire_core.report import SKIPPED_SHOWN, Report


def _report():
    w = np.random.default_rng(0).normal(size=(4, 3))
    return fire_core.reinit_many([("fc.weight", w, "oi")], steps=3, write=lambda *_: None)


def test_skipped_weights_are_listed_by_reason_under_the_table():
    rep = _report()
    rep.skip("emb.weight", (10, 4), "an embedding")
    rep.skip("pos.weight", (8, 4), "an embedding")
    rep.skip("base.weight", (4, 4), "frozen")
    text = str(rep)
    assert "left alone (an embedding): emb.weight (10x4), pos.weight (8x4)" in text
    assert "left alone (frozen): base.weight (4x4)" in text
    assert rep.to_dict()["skipped"][0] == {"name": "emb.weight", "shape": [10, 4], "reason": "an embedding"}


def test_a_long_list_of_skipped_weights_is_cut_in_the_text_but_kept_whole():
    rep = Report(method="fire", steps=5, scale="fire")
    for k in range(SKIPPED_SHOWN + 3):
        rep.skip(f"e{k}.weight", (2, 2), "an embedding")
    assert "and 3 more (Report.skipped lists all)" in str(rep)
    assert len(rep.skipped) == SKIPPED_SHOWN + 3


def test_a_tied_row_shows_all_its_names():
    rep = _report()
    rep.rows[0]["aliases"] = ["head.weight"]
    assert "fc.weight (= head.weight)" in str(rep)


def test_a_tied_skipped_weight_shows_all_its_names():
    rep = _report()
    rep.skip("lm_head.weight", (64, 32), "excluded by a pattern", aliases=["transformer.wte.weight"])
    assert "left alone (excluded by a pattern): lm_head.weight (= transformer.wte.weight) (64x32)" in str(rep)
    assert rep.to_dict()["skipped"][0]["aliases"] == ["transformer.wte.weight"]


# --- the numbers describe the weight as written (item 9 of issue 21) ------------------------------


def _dfi64(mats: np.ndarray) -> float:
    """DfI of a (taps, m, n) float64 stack, summed over taps: the Gram matrix of the smaller side minus I."""
    g = mats.transpose(0, 2, 1) @ mats if mats.shape[-2] >= mats.shape[-1] else mats @ mats.transpose(0, 2, 1)
    return float(((g - np.eye(g.shape[-1])) ** 2).sum())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("method, scale", [("svd", "fire"), ("fire", "fire"), ("svd", "norm"), ("fast", 2.0)])
def test_a_low_precision_weights_report_measures_the_weight_as_stored(dtype, layer, method, scale):
    """SFE and DfI after of a bf16/f16 weight are those of the stored weight (after the cast), in float64.

    DfI after keeps its definition, the projected matrices before the scale: here the stored
    matrices divided by the factor applied. (The model computes in float32: no bf16 matmul.)
    """
    torch = pytest.importorskip("torch")
    import fire_core.torch as ft

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32) if layer == "linear" else torch.nn.Conv2d(8, 12, 3)
    model = model.to(getattr(torch, dtype))
    old = model.weight.detach().double().numpy().copy()
    row = ft.apply(model, method=method, scale=scale).rows[0]
    stored = model.weight.detach().double().numpy()
    mats = stored.reshape(*stored.shape[:2], -1).transpose(2, 0, 1)  # (taps, out, in)
    want = _dfi64(mats / row["scale"])
    assert row["dfi_after"] == pytest.approx(want, rel=2e-3, abs=1e-9)
    assert row["sfe"] == pytest.approx(float(((old - stored) ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("lib", ["numpy", "jax"])
def test_a_float16_arrays_report_measures_the_array_as_written(lib):
    xp = np if lib == "numpy" else pytest.importorskip("jax.numpy")
    w = xp.asarray(np.random.default_rng(0).normal(size=(48, 24)) * 0.1, dtype=xp.float16)
    out = {}
    row = fire_core.reinit_many([("w", w, "oi")], method="svd", write=out.__setitem__).rows[0]
    stored = np.asarray(out["w"], dtype=np.float64)
    assert row["dfi_after"] == pytest.approx(_dfi64(stored[None] / row["scale"]), rel=2e-3)
    assert row["dfi_after"] > 1e-8  # float16 rounding, not the float32 projection's 1e-11
    assert row["sfe"] == pytest.approx(float(((np.asarray(w, dtype=np.float64) - stored) ** 2).sum()), rel=1e-5)


def test_float32_and_float64_reports_are_unchanged_by_measuring_the_stored_weight():
    """Where the weight is stored in the dtype it is computed in, DfI after is the projection's, as before."""
    for dtype in (np.float32, np.float64):
        w = np.random.default_rng(1).normal(size=(40, 20)).astype(dtype)
        out = {}
        row = fire_core.reinit_many([("w", w, "oi")], method="svd", write=out.__setitem__).rows[0]
        stored = np.asarray(out["w"], dtype=np.float64)
        assert row["dfi_after"] == pytest.approx(_dfi64(stored[None] / row["scale"]), rel=0.5, abs=1e-9)


def test_a_float16_flax_report_measures_the_kernel_as_written():
    """fire_core.flax.report measures the trees it is given, so a float16 kernel's numbers are of what was written."""
    jnp = pytest.importorskip("jax.numpy")
    ff = pytest.importorskip("fire_core.flax")
    rng = np.random.default_rng(2)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(24, 40)) * 0.2, dtype=jnp.float16)}}
    new = ff.apply(params, method="svd")
    row = ff.report(params, new)["Dense_0/kernel"]
    stored = np.asarray(new["Dense_0"]["kernel"], dtype=np.float64)  # Flax Dense: (in, out)
    assert row["dfi_after"] == pytest.approx(_dfi64(stored.T[None] / row["scale"]), rel=2e-3)
    assert row["dfi_after"] > 1e-8
    old = np.asarray(params["Dense_0"]["kernel"], dtype=np.float64)
    assert row["sfe"] == pytest.approx(float(((old - stored) ** 2).sum()), rel=1e-5)
