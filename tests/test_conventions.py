"""fire_core.conventions: which flat named arrays are FIRE targets, in which layout."""

from __future__ import annotations

import numpy as np
import pytest

from fire_core.conventions import (
    Patterns, Target, detect_convention, glob_match, is_real_float, matches, select, targets,
)


def layouts_of(found: list[Target]) -> dict[str, str]:
    return {t.name: t.layout for t in found}


# --------------------------------------------------------------------------- torch rules


@pytest.mark.parametrize(
    "name, shape, layout",
    [
        ("fc.weight", (8, 4), "oi"),
        ("weight", (8, 4), "oi"),  # a bare nn.Linear's state dict
        ("block.conv1d.weight", (8, 4, 3), "oiw"),
        ("layer1.0.conv1.weight", (8, 4, 3, 3), "oihw"),
        ("stem.weight", (8, 4, 3, 3, 3), "oidhw"),
        ("attn.q_proj_weight", (8, 8), "oi"),
        ("attn.k_proj_weight", (8, 5), "oi"),
        ("attn.out_proj.weight", (8, 8), "oi"),
        ("patch_embed.proj.weight", (8, 3, 4, 4), "oihw"),  # a conv inside an embedding module
    ],
)
def test_torch_weights_get_their_layout(name, shape, layout):
    assert layouts_of(targets({name: shape}, "torch")) == {name: layout}


@pytest.mark.parametrize(
    "name, shape",
    [
        ("fc.bias", (8,)),
        ("norm.weight", (8,)),
        ("bn.running_mean", (8,)),
        ("bn.num_batches_tracked", ()),
        ("embed.weight", (100, 8)),
        ("model.embed_tokens.weight", (100, 8)),
        ("embeddings.word_embeddings.weight", (100, 8)),
        ("tok_Embedding.weight", (100, 8)),
        ("transformer.wte.weight", (100, 8)),
        ("transformer.wpe.weight", (64, 8)),
        ("pos_embed", (1, 16, 8)),  # a bare parameter, not a layer weight
        ("cls_token", (1, 1, 8)),
        ("attn.in_proj_bias", (24,)),
    ],
)
def test_torch_non_targets_are_skipped(name, shape):
    assert targets({name: shape}, "torch") == []


@pytest.mark.parametrize("convention, name", [("torch", "odd.weight"), ("flax", "odd/kernel")])
def test_weight_with_six_axes_asks_for_a_layout(convention, name):
    with pytest.raises(ValueError, match=r"odd.*has no default layout.*layouts="):
        targets({name: (2, 2, 2, 2, 2, 2)}, convention)


def test_in_proj_weight_splits_into_q_k_v_row_blocks():
    w = np.arange(24 * 8.0).reshape(24, 8)
    found = targets({"attn.in_proj_weight": w.shape}, "torch")
    assert [t.name for t in found] == ["attn.in_proj_weight[q]", "attn.in_proj_weight[k]", "attn.in_proj_weight[v]"]
    for t, block in zip(found, np.split(w, 3, axis=0)):
        assert t.source_key == "attn.in_proj_weight" and t.layout == "oi" and t.shape == (8, 8)
        np.testing.assert_array_equal(w[t.index], block)


def test_split_option_splits_a_user_fused_layer():
    w = np.arange(12 * 4.0).reshape(12, 4)
    found = targets({"h.0.attn.c_attn.weight": w.shape}, "torch", split={"*.c_attn": 3})
    assert [t.name for t in found] == [f"h.0.attn.c_attn.weight[{k}]" for k in range(3)]
    for t, block in zip(found, np.split(w, 3, axis=0)):
        np.testing.assert_array_equal(w[t.index], block)


def test_split_into_given_sizes():
    w = np.arange(10 * 4.0).reshape(10, 4)
    found = targets({"fused.weight": w.shape}, "torch", split={"fused": (6, 4)})
    assert [t.shape for t in found] == [(6, 4), (4, 4)]
    np.testing.assert_array_equal(w[found[0].index], w[:6])
    np.testing.assert_array_equal(w[found[1].index], w[6:])


def test_split_sizes_must_add_up():
    with pytest.raises(ValueError, match=r"fused\.weight: split sizes \(6, 3\) sum to 9"):
        targets({"fused.weight": (10, 4)}, "torch", split={"fused": (6, 3)})


def test_split_of_one_projects_a_fused_in_proj_whole():
    found = targets({"attn.in_proj_weight": (24, 8)}, "torch", split={"*.in_proj_weight": 1})
    assert found == [Target("attn.in_proj_weight", "attn.in_proj_weight", None, "oi", (24, 8))]


def test_split_follows_the_output_axis_of_the_layout():
    w = np.arange(4 * 6.0).reshape(4, 6)  # a Flax Dense kernel (in, out): output is axis 1
    found = targets({"c_attn/kernel": w.shape}, "flax", split={"c_attn": 3})
    for t, block in zip(found, np.split(w, 3, axis=1)):
        np.testing.assert_array_equal(w[t.index], block)


def test_split_that_does_not_divide_names_the_weight():
    with pytest.raises(ValueError, match=r"fused\.weight.*3 equal blocks"):
        targets({"fused.weight": (10, 4)}, "torch", split={"fused": 3})


@pytest.mark.parametrize("bad", [0, -1, (), (3, 0)])
def test_split_needs_positive_blocks(bad):
    with pytest.raises(ValueError, match="positive"):
        targets({"c_attn.weight": (12, 4)}, "torch", split={"c_attn": bad})


@pytest.mark.parametrize("bad", [1.5, True, "3", (2.0, 1)])
def test_split_of_a_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="positive number of blocks or a list of sizes"):
        targets({"c_attn.weight": (12, 4)}, "torch", split={"c_attn": bad})


def test_layouts_override_marks_transposed_convolutions():
    shapes = {"up.0.weight": (8, 4, 3, 3), "down.0.weight": (8, 4, 3, 3)}
    assert layouts_of(targets(shapes, "torch", layouts={"up.*": "iohw"})) == {
        "up.0.weight": "iohw",
        "down.0.weight": "oihw",
    }


def test_layouts_first_matching_pattern_wins():
    shapes = {"dec.up.weight": (8, 4), "dec.down.weight": (8, 4)}
    found = targets(shapes, "torch", layouts={"dec.up": "io", "dec": "oi"})
    assert layouts_of(found) == {"dec.up.weight": "io", "dec.down.weight": "oi"}


def test_layouts_override_with_wrong_axis_count_names_weight_and_pattern():
    with pytest.raises(ValueError, match=r"up\.0\.weight.*'up\.\*'"):
        targets({"up.0.weight": (8, 4, 3)}, "torch", layouts={"up.*": "iohw"})


def test_layouts_override_with_invalid_letters_names_the_weight():
    with pytest.raises(ValueError, match=r"up\.0\.weight.*'o'"):
        targets({"up.0.weight": (8, 4)}, "torch", layouts={"up.*": "xy"})


def test_layouts_add_a_skipped_tensor_whose_axes_fit():
    shapes = {"up.0.bias": (8,), "up.embed.weight": (10, 8)}
    assert layouts_of(targets(shapes, "torch", layouts={"up.*": "oi"})) == {"up.embed.weight": "oi"}


def test_layouts_none_skips_a_weight():
    shapes = {"head.weight": (2, 4), "fc.weight": (4, 4)}
    assert layouts_of(targets(shapes, "torch", layouts={"head": None})) == {"fc.weight": "oi"}


@pytest.mark.parametrize("option", ["layouts", "split"])
def test_a_pattern_that_matches_nothing_is_an_error(option):
    value = {"layouts": {"decodr.*": "iohw"}, "split": {"*.c_atn": 3}}[option]
    with pytest.raises(ValueError, match=f"{option} pattern '.*' matches no weight"):
        targets({"decoder.0.weight": (8, 4, 3, 3), "c_attn.weight": (12, 4)}, "torch", **{option: value})


def test_include_pattern_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match="include pattern 'layr1' matches no weight"):
        targets({"layer1.weight": (4, 4)}, "torch", include=["layer1", "layr1"])


# --------------------------------------------------------------------------- torch rules: fused, transposed, tied


def blocks_of(found: list[Target]) -> list[tuple]:
    return [(t.name, t.layout, t.shape) for t in found]


@pytest.mark.parametrize(
    "name, shape, layout, labels, axis",
    [
        ("h.0.attn.c_attn.weight", (24, 8), "oi", ("q", "k", "v"), 0),  # nanoGPT nn.Linear(E, 3E)
        ("h.0.attn.c_attn.weight", (8, 24), "io", ("q", "k", "v"), 1),  # Hugging Face GPT-2 Conv1D (in, out)
        ("h.0.crossattention.c_attn.weight", (8, 16), "io", ("k", "v"), 1),  # GPT-2 cross-attention: k, v
        ("blocks.0.attn.qkv.weight", (24, 8), "oi", ("q", "k", "v"), 0),  # timm
        ("layers.0.self_attn.qkv_proj.weight", (24, 8), "oi", ("q", "k", "v"), 0),  # Phi-3, heads == kv_heads
        ("layers.0.mlp.gate_up_proj.weight", (32, 8), "oi", ("gate", "up"), 0),  # Phi-3
    ],
)
def test_recognised_fusions_are_split_by_default(name, shape, layout, labels, axis):
    w = np.arange(float(np.prod(shape))).reshape(shape)
    selection = select({name: shape}, "torch")
    assert [(t.name, t.layout) for t in selection.targets] == [(f"{name}[{b}]", layout) for b in labels]
    for t, block in zip(selection.targets, np.split(w, len(labels), axis=axis)):
        np.testing.assert_array_equal(w[t.index], block)
    assert any("split into their blocks by default" in n and name in n for n in selection.notes)


def test_a_user_split_replaces_the_default_blocks_and_its_note():
    selection = select({"h.0.attn.c_attn.weight": (24, 8)}, "torch", split={"*.c_attn": 1})
    assert blocks_of(selection.targets) == [("h.0.attn.c_attn.weight", "oi", (24, 8))]
    assert selection.notes == []


def test_grouped_query_qkv_proj_is_refused_with_the_split_to_pass():
    # 4 query heads and 1 kv head of size 2: q 8 rows, k and v 2 each, of a width-8 model
    with pytest.raises(ValueError, match=r"qkv_proj\.weight.*\(12, 8\).*grouped-query.*--split '\*\.qkv_proj=Q,K,V'"):
        select({"attn.qkv_proj.weight": (12, 8)}, "torch")


def test_grouped_query_qkv_proj_with_its_sizes_is_split_so():
    found = targets({"attn.qkv_proj.weight": (12, 8)}, "torch", split={"*.qkv_proj": (8, 2, 2)})
    assert blocks_of(found) == [("attn.qkv_proj.weight[0]", "oi", (8, 8)), ("attn.qkv_proj.weight[1]", "oi", (2, 8)),
                                ("attn.qkv_proj.weight[2]", "oi", (2, 8))]


def test_an_unclear_weight_that_is_excluded_is_left_alone_not_refused():
    selection = select({"attn.qkv_proj.weight": (12, 8), "fc.weight": (4, 4)}, "torch", exclude="attn")
    assert names(selection.targets) == ["fc.weight"]
    assert selection.skipped == [{"name": "attn.qkv_proj.weight", "shape": (12, 8),
                                  "reason": "excluded by exclude pattern 'attn'"}]


def test_c_attn_of_an_unknown_shape_is_refused_until_given_a_layout():
    with pytest.raises(ValueError, match=r"c_attn\.weight.*\(10, 4\).*neither nanoGPT's \(3E, E\) nor .*Conv1D"):
        select({"c_attn.weight": (10, 4)}, "torch")
    assert blocks_of(targets({"c_attn.weight": (10, 4)}, "torch", layouts={"c_attn": "oi"})) == [
        ("c_attn.weight", "oi", (10, 4))]


def test_odd_gate_up_proj_is_refused():
    with pytest.raises(ValueError, match=r"gate_up_proj\.weight.*odd number of rows.*--split"):
        select({"mlp.gate_up_proj.weight": (9, 4)}, "torch")


def test_fused_name_with_three_axes_is_refused():
    with pytest.raises(ValueError, match=r"experts\.qkv\.weight: a fused qkv weight with 3 axes"):
        select({"experts.qkv.weight": (4, 24, 8)}, "torch")


GPT2_HF = {  # Hugging Face GPT-2, width 8: Conv1D weights (in, out) with biases of the out length
    "h.0.attn.c_attn.weight": (8, 24), "h.0.attn.c_attn.bias": (24,),
    "h.0.attn.c_proj.weight": (8, 8), "h.0.attn.c_proj.bias": (8,),
    "h.0.mlp.c_fc.weight": (8, 32), "h.0.mlp.c_fc.bias": (32,),
    "h.0.mlp.c_proj.weight": (32, 8), "h.0.mlp.c_proj.bias": (8,),
}


def test_hugging_face_conv1d_weights_are_read_as_in_out():
    found = layouts_of(targets(GPT2_HF, "torch"))
    assert found == {"h.0.attn.c_attn.weight[q]": "io", "h.0.attn.c_attn.weight[k]": "io",
                     "h.0.attn.c_attn.weight[v]": "io", "h.0.attn.c_proj.weight": "io",
                     "h.0.mlp.c_fc.weight": "io", "h.0.mlp.c_proj.weight": "io"}
    assert any("Conv1D" in n and "h.0.mlp.c_fc.weight" in n for n in select(GPT2_HF, "torch").notes)


@pytest.mark.parametrize("evidence", ["bias", "c_attn"])
def test_conv1d_orientation_is_told_by_the_bias_or_by_c_attn(evidence):
    hf = {"h.0.mlp.c_fc.weight": (8, 32)}
    nano = {"h.0.mlp.c_fc.weight": (32, 8)}
    if evidence == "bias":
        hf["h.0.mlp.c_fc.bias"], nano["h.0.mlp.c_fc.bias"] = (32,), (32,)
    else:
        hf["h.0.attn.c_attn.weight"], nano["h.0.attn.c_attn.weight"] = (8, 24), (24, 8)
    assert layouts_of(targets(hf, "torch"))["h.0.mlp.c_fc.weight"] == "io"
    assert layouts_of(targets(nano, "torch"))["h.0.mlp.c_fc.weight"] == "oi"


def test_non_square_c_fc_with_no_evidence_is_refused_with_the_layout_to_pass():
    with pytest.raises(ValueError, match=r"c_fc\.weight.*nothing in the state dict tells.*--layout '\*\.c_fc=io'"):
        select({"mlp.c_fc.weight": (8, 32)}, "torch")


def test_conv1d_evidence_that_disagrees_is_refused():
    shapes = {"attn.c_attn.weight": (24, 8), "mlp.c_fc.weight": (8, 32), "mlp.c_fc.bias": (32,)}
    with pytest.raises(ValueError, match=r"mlp\.c_fc\.weight.*its bias and the model's c_attn disagree"):
        select(shapes, "torch")


def test_square_c_proj_needs_no_evidence():
    assert layouts_of(targets({"attn.c_proj.weight": (8, 8)}, "torch")) == {"attn.c_proj.weight": "oi"}


def test_tied_tensor_is_one_target_under_the_heads_name_with_its_aliases():
    shapes = {"transformer.wte.weight": (64, 8), "h.0.mlp.fc.weight": (32, 8), "lm_head.weight": (64, 8)}
    found = targets(shapes, "torch", tied={"lm_head.weight": "transformer.wte.weight"})
    assert [(t.name, t.aliases) for t in found] == [("h.0.mlp.fc.weight", ()),
                                                     ("lm_head.weight", ("transformer.wte.weight",))]


@pytest.mark.parametrize("pattern", ["transformer.wte", "lm_head", "*.wte.weight"])
def test_excluding_a_tied_tensor_by_any_of_its_names_leaves_it_alone(pattern):
    shapes = {"transformer.wte.weight": (64, 8), "fc.weight": (8, 8), "lm_head.weight": (64, 8)}
    selection = select(shapes, "torch", exclude=pattern, tied={"lm_head.weight": "transformer.wte.weight"})
    assert names(selection.targets) == ["fc.weight"]
    assert selection.skipped == [{
        "name": "lm_head.weight", "shape": (64, 8), "aliases": ["transformer.wte.weight"],
        "reason": f"excluded by exclude pattern {pattern!r}",
    }]


def test_tied_tensor_is_included_by_any_of_its_names():
    shapes = {"transformer.wte.weight": (64, 8), "fc.weight": (8, 8), "lm_head.weight": (64, 8)}
    found = targets(shapes, "torch", include="transformer.wte", tied={"lm_head.weight": "transformer.wte.weight"})
    assert names(found) == ["lm_head.weight"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_patterns_match_names_without_ddp_or_compile_prefixes(prefix):
    shapes = {f"{prefix}fc.weight": (4, 4), f"{prefix}layer1.0.weight": (4, 4)}
    assert names(targets(shapes, "torch", exclude="fc")) == [f"{prefix}layer1.0.weight"]
    assert names(targets(shapes, "torch", layouts={"layer1.0": "io"})) == list(shapes)


def rnn_state(kind, **kw):
    torch = pytest.importorskip("torch")
    module = getattr(torch.nn, kind)(8, 6, **kw)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "kind, kw, gates",
    [("LSTM", dict(num_layers=2, bidirectional=True), "ifgo"), ("GRU", dict(num_layers=2), "rzn"),
     ("RNN", dict(bidirectional=True), None), ("LSTMCell", {}, "ifgo"), ("GRUCell", {}, "rzn"),
     ("RNNCell", {}, None)],
)
def test_recurrent_weights_are_projected_gate_by_gate(kind, kw, gates):
    shapes = rnn_state(kind, **kw)
    found = targets(shapes, "torch")
    weights = [k for k in shapes if k.startswith("weight_")]
    want = [f"{k}[{g}]" for k in weights for g in gates] if gates else weights
    assert sorted(t.name for t in found) == sorted(want)
    assert all(t.layout == "oi" and t.shape[0] == 6 for t in found)  # one gate of hidden size 6 each


def test_lstm_projection_weights_are_whole_and_gates_follow_the_hidden_size():
    shapes = rnn_state("LSTM", proj_size=4)  # weight_hh_l0 (24, 4), weight_hr_l0 (4, 6)
    found = {t.name: t.shape for t in targets(shapes, "torch")}
    assert found["weight_hr_l0"] == (4, 6)
    assert [found[f"weight_hh_l0[{g}]"] for g in "ifgo"] == [(6, 4)] * 4
    assert [found[f"weight_ih_l0[{g}]"] for g in "ifgo"] == [(6, 8)] * 4


def test_a_recurrent_weight_whose_gates_do_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"rnn\.weight_ih_l0: a recurrent weight.*not 1, 3 or 4 gate blocks"):
        select({"rnn.weight_ih_l0": (12, 8), "rnn.weight_hh_l0": (12, 6)}, "torch")


def test_select_lists_every_tensor_it_leaves_alone_with_the_reason():
    arrays = {
        "embed_tokens.weight": np.zeros((10, 4)),
        "pos_embed": np.zeros((1, 5, 4)),
        "cls_token": np.zeros((1, 1, 4)),
        "lstm.weight_ih_l0": np.zeros((16, 4)),
        "quant.weight": np.zeros((4, 4), np.int8),
        "empty.weight": np.zeros((0, 4)),
        "head.weight": np.zeros((2, 4)),
        "fc.weight": np.zeros((4, 4)),
        "fc.bias": np.zeros(4),  # 1-D: not listed
        "bn.num_batches_tracked": np.array(3),
    }
    selection = select(arrays, "torch", exclude="head")
    assert names(selection.targets) == ["fc.weight"]
    no_rule = "no rule for its name (not a layer weight the rules know; layouts= adds it)"
    assert {s["name"]: s["reason"] for s in selection.skipped} == {
        "embed_tokens.weight": "an embedding, by its name",
        "pos_embed": "an embedding, by its name",
        "cls_token": no_rule,
        "lstm.weight_ih_l0": no_rule,
        "quant.weight": "not floating point (int8)",
        "empty.weight": "empty (an axis of length 0)",
        "head.weight": "excluded by exclude pattern 'head'",
    }
    assert all(s["shape"] == arrays[s["name"]].shape for s in selection.skipped)


def test_not_selected_by_include_is_listed():
    selection = select({"a.weight": (4, 4), "b.weight": (4, 4)}, "torch", include="a")
    assert selection.skipped == [{"name": "b.weight", "shape": (4, 4), "reason": "not selected by include"}]


def test_a_layouts_none_is_listed_as_the_reason():
    selection = select({"head.weight": (2, 4), "fc.weight": (4, 4)}, "torch", layouts={"head": None})
    assert selection.skipped == [{"name": "head.weight", "shape": (2, 4),
                                  "reason": "layouts pattern 'head' maps it to None"}]


@pytest.mark.parametrize("kw", [{"layouts": ["fc=oi"]}, {"split": "c_attn=3"}, {"tied": [("a", "b")]},
                                {"convention": 3}, {"split": {3: 2}}])
def test_options_of_a_wrong_type_are_a_type_error(kw):
    with pytest.raises(TypeError):
        select({"fc.weight": (4, 4)}, **kw)


# --------------------------------------------------------------------------- flax rules


@pytest.mark.parametrize(
    "name, shape, layout",
    [
        ("params/Dense_0/kernel", (4, 8), "io"),
        ("params/attn/query/kernel", (16, 2, 8), "ioo"),
        ("params/attn/key/kernel", (16, 2, 8), "ioo"),
        ("params/attn/value/kernel", (16, 2, 8), "ioo"),
        ("params/attn/out/kernel", (2, 8, 16), "iio"),
        ("params/Conv_0/kernel", (3, 4, 8), "wio"),
        ("params/Conv_1/kernel", (3, 3, 4, 8), "hwio"),
        ("params/Conv_2/kernel", (3, 3, 3, 4, 8), "dhwio"),
        ("layers.0.linear.kernel", (4, 8), "io"),  # "."-joined path
        ("layers/0/linear/kernel/value", (4, 8), "io"),  # nnx state path
    ],
)
def test_flax_kernels_get_their_layout(name, shape, layout):
    attention = {f"params/attn/{m}/kernel": (16, 2, 8) for m in ("query", "key", "value")}
    attention["params/attn/out/kernel"] = (2, 8, 16)
    assert layouts_of(targets({**attention, name: shape}, "flax"))[name] == layout


def test_flax_query_kernel_without_attention_siblings_is_refused():
    # (3, 4, 8) under a user-named module: a 1-D conv, a scanned Dense (L, in, out) or a DenseGeneral
    with pytest.raises(ValueError, match=r"params/query/kernel.*no default layout.*layouts="):
        targets({"params/query/kernel": (3, 4, 8)}, "flax")


@pytest.mark.parametrize(
    "bias, layout",
    [((2, 8), "ioo"), ((8,), "iio")],  # features=(2, 8), axis=-1; features=8, axis=(-2, -1)
)
def test_flax_dense_general_auto_name_reads_its_outputs_from_the_bias(bias, layout):
    shapes = {"params/DenseGeneral_0/kernel": (16, 2, 8), "params/DenseGeneral_0/bias": bias}
    assert layouts_of(targets(shapes, "flax")) == {"params/DenseGeneral_0/kernel": layout}


def test_flax_dense_general_without_a_bias_is_refused():
    with pytest.raises(ValueError, match=r"DenseGeneral_0/kernel.*bias"):
        targets({"params/DenseGeneral_0/kernel": (16, 2, 8)}, "flax")


@pytest.mark.parametrize(
    "shapes",
    [
        {"params/ScanBlock_0/Dense_0/kernel": (4, 8, 8)},  # nn.scan over layers
        {"params/VmapCritic_0/Dense_0/kernel": (2, 5, 16)},  # nn.vmap ensemble
        {"params/ScanBlock_0/Conv_0/kernel": (4, 3, 3, 8)},  # a scanned 1-D conv, not a 2-D one
        {"params/Dense_0/kernel": (3, 8, 8)},  # a Dense has 2 axes: stacked by a decorator-style nn.scan
        {"params/Conv_0/kernel": (3, 3, 8, 8), "params/Conv_0/bias": (3, 8)},  # a stacked conv's bias
    ],
)
def test_flax_stacked_kernels_are_refused_by_name(shapes):
    with pytest.raises(ValueError, match=r"no default layout.*stacked"):
        targets(shapes, "flax")


def test_flax_stacked_kernel_takes_a_layout_with_a_stack_axis():
    found = targets({"params/ScanBlock_0/Dense_0/kernel": (4, 8, 16)}, "flax", layouts={"params/ScanBlock_0/*": "Lio"})
    assert layouts_of(found) == {"params/ScanBlock_0/Dense_0/kernel": "Lio"}


@pytest.mark.parametrize(
    "name, shape",
    [
        ("params/Embed_0/embedding", (100, 8)),
        ("params/LayerNorm_0/scale", (8,)),
        ("params/Dense_0/bias", (8,)),
        ("batch_stats/BatchNorm_0/mean", (8,)),
        ("params/Dense_0/weight", (4, 8)),  # torch-style name under the flax convention
    ],
)
def test_flax_non_targets_are_skipped(name, shape):
    assert targets({name: shape}, "flax") == []


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="unknown convention 'keras'"):
        targets({"fc.weight": (2, 2)}, "keras")


# --------------------------------------------------------------------------- selection

SHAPES = {
    "layer1.0.weight": (4, 4),
    "layer2.0.conv.weight": (4, 4, 3, 3),
    "layer2.1.weight": (4, 4),
    "layer20.weight": (4, 4),
    "head.weight": (2, 4),
}


def names(found):
    return [t.name for t in found]


def test_targets_keep_the_input_order():
    assert names(targets(SHAPES)) == list(SHAPES)


def test_targets_accept_pairs_and_arrays():
    pairs = [(k, np.zeros(s)) for k, s in SHAPES.items()]
    assert targets(pairs) == targets(SHAPES)


def test_include_a_module_prefix_selects_everything_under_it():
    assert names(targets(SHAPES, include="layer2")) == ["layer2.0.conv.weight", "layer2.1.weight"]


def test_include_star_crosses_the_separator():
    assert names(targets(SHAPES, include=["*.conv.weight", "head"])) == ["layer2.0.conv.weight", "head.weight"]


def test_exclude_removes_after_include():
    assert names(targets(SHAPES, include="layer2*", exclude=["*.conv"])) == ["layer2.1.weight", "layer20.weight"]


def test_include_can_name_a_block():
    found = targets({"attn.in_proj_weight": (12, 4)}, include="attn.in_proj_weight[k]")
    assert names(found) == ["attn.in_proj_weight[k]"]


def test_callables_receive_the_target_name():
    seen = []
    found = targets({"attn.in_proj_weight": (12, 4)}, include=lambda n: seen.append(n) or True,
                    exclude=lambda n: n.endswith("[k]"))
    assert seen == ["attn.in_proj_weight[q]", "attn.in_proj_weight[k]", "attn.in_proj_weight[v]"]
    assert names(found) == ["attn.in_proj_weight[q]", "attn.in_proj_weight[v]"]


def test_flax_prefixes_use_slashes():
    shapes = {"params/Dense_0/kernel": (4, 8), "params/Dense_1/kernel": (8, 2)}
    assert names(targets(shapes, "flax", exclude="params/Dense_1")) == ["params/Dense_0/kernel"]


def test_non_string_patterns_are_a_type_error():
    with pytest.raises(TypeError, match="glob pattern"):
        targets(SHAPES, include=[3])


def test_a_block_name_copied_from_the_report_selects_exactly_that_block():
    """``[k]`` is literal, not a glob character class (which would match the name ``...in_proj_weightk``)."""
    shapes = {"enc.attn.in_proj_weight": (24, 8)}
    kept = names(targets(shapes, exclude="*.in_proj_weight[k]"))
    assert kept == ["enc.attn.in_proj_weight[q]", "enc.attn.in_proj_weight[v]"]
    assert names(targets(shapes, include="enc.attn.in_proj_weight[v]")) == ["enc.attn.in_proj_weight[v]"]
    assert glob_match("a.in_proj_weight[k]", "*[k]") and glob_match("Dense_1", "Dense_[01]")


@pytest.mark.parametrize("what", ["include", "exclude"])
def test_a_pattern_that_matches_nothing_is_an_error_naming_the_closest(what):
    with pytest.raises(ValueError, match=rf"{what} pattern 'layer1.0.conv' matches no weight.*closest: layer1.0.conv1"):
        targets({"layer1.0.conv1.weight": (8, 4, 3, 3), "fc.weight": (2, 8)}, **{what: "layer1.0.conv"})


@pytest.mark.parametrize("bad", [3, 2.5, b"fc", {"fc": 1}, [["fc"]]])
def test_include_of_a_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="include"):
        targets(SHAPES, include=bad)


def test_patterns_match_any_name_of_a_weight_and_record_which_selected_something():
    p = Patterns(["head", "nothing"], "exclude")
    assert p.hit(["body.fc.weight", "head.weight"])  # a tied weight: its second name's module
    assert not p.hit(["body.out.weight"])
    assert p.used == {"head"}
    with pytest.raises(ValueError, match="exclude pattern 'nothing' matches no weight"):
        p.check_used(["body.fc.weight", "head.weight"])


def test_matches_checks_every_prefix():
    assert matches("a.b", "a.b.c.weight")
    assert not matches("a.b", "a.bc.weight")
    assert matches("net/block", "net/block/kernel", "/")


# --------------------------------------------------------------------------- helpers


def test_detect_convention():
    assert detect_convention(["params/Dense_0/kernel", "params/Dense_0/bias"]) == "flax"
    assert detect_convention(["fc.weight", "fc.bias"]) == "torch"
    assert detect_convention(["step"]) == "torch"


def test_is_real_float():
    assert is_real_float(np.zeros(2, np.float32)) and is_real_float(np.zeros(2, np.float16))
    assert not is_real_float(np.zeros(2, np.int64))
    assert not is_real_float(np.zeros(2, np.complex64))
    assert not is_real_float([1.0, 2.0])


def test_gpt2_conv1d_recipe_from_the_docs():
    """Hugging Face GPT-2 stores (in, out) weights; the documented layouts/split read them right."""
    e = 8
    shapes = {"wte.weight": (50, e), "h.0.attn.c_attn.weight": (e, 3 * e), "h.0.attn.c_attn.bias": (3 * e,),
              "h.0.attn.c_proj.weight": (e, e), "h.0.mlp.c_fc.weight": (e, 4 * e), "h.0.mlp.c_proj.weight": (4 * e, e)}
    found = targets(shapes, "torch", layouts={"*.c_attn": "io", "*.c_proj": "io", "*.c_fc": "io"},
                    split={"*.c_attn": 3})
    assert [(t.name, t.layout, t.shape) for t in found] == [
        ("h.0.attn.c_attn.weight[0]", "io", (e, e)),
        ("h.0.attn.c_attn.weight[1]", "io", (e, e)),
        ("h.0.attn.c_attn.weight[2]", "io", (e, e)),
        ("h.0.attn.c_proj.weight", "io", (e, e)),
        ("h.0.mlp.c_fc.weight", "io", (e, 4 * e)),
        ("h.0.mlp.c_proj.weight", "io", (4 * e, e)),
    ]
    w = np.arange(e * 3 * e).reshape(e, 3 * e)
    np.testing.assert_array_equal(w[found[1].index], w[:, e : 2 * e])
