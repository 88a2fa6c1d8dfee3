"""Report: skipped weights and tied aliases are part of what a user reads."""

from __future__ import annotations

import numpy as np

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
