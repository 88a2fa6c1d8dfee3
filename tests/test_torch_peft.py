"""fire_core.torch on PEFT models: LoRA adapters are left alone by default, and say why.

Projected on their own, a LoRA layer's factors would each become a scaled
semi-orthogonal matrix: ``lora_B`` (zero at initialization by design) would
get singular values ``sqrt(out / r)``, and the adapter's ``s B A`` would jump
from whatever it learned to spectral norm ``s sqrt(out / in)``. So by default
the factors are named in ``Report.skipped`` with what to do instead (merge,
or reset the adapter); ``adapters="project"`` projects them anyway. Every
model here is built from a config: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

import fire_core  # noqa: E402
import fire_core.torch as ft  # noqa: E402


def lora(model: nn.Module, **config) -> nn.Module:
    """``peft.get_peft_model`` with a LoRA config (r=4, alpha=8 unless given), its lora_B set as if trained."""
    config = {"r": 4, "lora_alpha": 8, **config}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    with torch.no_grad():  # a trained adapter: B no longer zero
        gen = torch.Generator().manual_seed(1)
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    return wrapped


def tiny_bert(**config) -> nn.Module:
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32,
    ))
    return lora(bert.double(), target_modules=["query", "value"], **config)


def tiny_gpt2(**config) -> nn.Module:
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
    ))
    return lora(gpt.double(), target_modules=["c_attn"], fan_in_fan_out=True, **config)


def factors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n and p.ndim >= 2}


def accounted(model: nn.Module, report) -> dict[str, str]:
    """name -> "row" or the skipped reason, for every floating parameter of >= 2 dims; all must be there."""
    seen = {}
    for row in report.rows:
        seen[row["name"].split("[")[0]] = "row"
        for alias in row.get("aliases", ()):
            seen[alias] = "row"
    for s in report.skipped:
        seen.setdefault(s["name"].split("[")[0], s["reason"])
        for alias in s.get("aliases", ()):
            seen.setdefault(alias, s["reason"])
    missing = [n for n, p in model.named_parameters() if p.is_floating_point() and p.ndim >= 2 and n not in seen]
    assert not missing, f"left alone in silence: {missing}"
    return seen


def adapter_delta(layer) -> torch.Tensor:
    """``s B A`` of a LoRA Linear's default adapter, as its output adds it (in the base's (out, in))."""
    b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    return layer.scaling["default"] * (b @ a)


# --- by default: the factors are left alone, each named with the reason ---------------------


@pytest.mark.parametrize("make", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_lora_factors_are_left_alone_by_default_and_named_with_what_to_do(make):
    model = make(modules_to_save=["pooler"] if make is tiny_bert else ["c_fc"])
    lora_params = factors(model)
    assert lora_params, "the config made no LoRA factors"
    old = {n: p.detach().clone() for n, p in lora_params.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    old = {n: p.detach().clone() for n, p in lora_params.items()}
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in lora_params.items()}

    report = ft.apply(model, optimizer=opt)

    for n, p in lora_params.items():
        assert torch.equal(p.detach(), old[n]), n  # bit for bit
        assert p.grad is not None, n  # its gradient is not cleared either
        assert set(opt.state[p]) == set(state[n]) and all(torch.equal(opt.state[p][k], v) for k, v in state[n].items())
    seen = accounted(model, report)
    assert report.rows, "the trainable copy of the saved module is projected"
    for n in lora_params:
        reason = seen[n]
        assert "LoRA" in reason and "merge_and_unload()" in reason and "reset_lora_parameters" in reason, reason
        assert "adapters='project'" in reason, reason
    assert not [n for n in report.names if ".lora_" in n]
    assert "LoRA" in str(report)


def test_a_model_with_only_lora_trainable_selects_nothing_and_says_what_to_do():
    model = tiny_bert()
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"selected no weight.*LoRA.*merge_and_unload"):
        ft.apply(model)
    assert all(torch.equal(p.detach(), old[n]) for n, p in model.named_parameters())


def test_a_lora_embedding_and_conv_are_recognised_too():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.conv = nn.Conv2d(6, 8, 3)
            self.head = nn.Linear(8, 3)

    torch.manual_seed(0)
    model = lora(Net().double(), target_modules=["emb", "conv"], modules_to_save=["head"])
    report = ft.apply(model)
    seen = accounted(model, report)
    names = [n for n in seen if "lora_embedding" in n or ".lora_" in n]
    assert any("lora_embedding_A" in n for n in names) and any("conv.lora_B" in n for n in names)
    assert all("merge_and_unload()" in seen[n] for n in names)
    # the base layers of both are frozen, and their reasons are the table's
    assert "embedding" in seen["base_model.model.emb.base_layer.weight"]
    assert "frozen" in seen["base_model.model.conv.base_layer.weight"]

    projected = ft.apply(model, adapters="project")
    rows = {r["name"]: r for r in projected.rows}
    conv_a = "base_model.model.conv.lora_A.default.weight"
    assert rows[conv_a]["layout"] == "oihw" and rows[conv_a]["taps"] == 9
    assert rows["base_model.model.emb.lora_embedding_A.default"]["layout"] == "oi"


# --- merge first: the merged weight is projected ---------------------------------------------


def test_the_merged_model_projects_the_merged_weight():
    model = tiny_bert()
    query = model.base_model.model.encoder.layer[0].attention.self.query
    merged_w = query.base_layer.weight.detach() + adapter_delta(query).detach()
    merged = model.merge_and_unload()
    assert isinstance(merged.encoder.layer[0].attention.self.query, nn.Linear)
    torch.testing.assert_close(merged.encoder.layer[0].attention.self.query.weight.detach(), merged_w)
    report = ft.apply(merged, frozen=True)  # peft leaves the merged model frozen
    torch.testing.assert_close(
        merged.encoder.layer[0].attention.self.query.weight.detach(), fire_core.reinit(merged_w, "oi"),
        rtol=0, atol=1e-13,
    )
    assert not report.skipped or all("LoRA" not in s["reason"] for s in report.skipped)


def test_the_merged_gpt2_projects_c_attn_as_q_k_v():
    model = tiny_gpt2()
    attn = model.base_model.model.transformer.h[0].attn.c_attn
    merged_w = attn.base_layer.weight.detach() + adapter_delta(attn).detach().T  # Conv1D stores (in, out)
    merged = model.merge_and_unload()
    report = ft.apply(merged, frozen=True)
    want = torch.cat([fire_core.reinit(b.clone(), "io") for b in merged_w.chunk(3, dim=1)], dim=1)
    torch.testing.assert_close(merged.transformer.h[0].attn.c_attn.weight.detach(), want, rtol=0, atol=1e-13)
    assert "transformer.h.0.attn.c_attn.weight[q]" in report.names


# --- frozen=True: the base weight inside the LoRA layer, as the layer it wraps -----------------


def test_frozen_true_projects_the_base_weight_as_the_layer_it_wraps():
    model = tiny_gpt2()
    attn = model.base_model.model.transformer.h[0].attn.c_attn
    base = attn.base_layer.weight.detach().clone()
    old = {n: p.detach().clone() for n, p in factors(model).items()}
    report = ft.apply(model, frozen=True)
    prefix = "base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"
    assert [f"{prefix}[{b}]" for b in "qkv"] == [n for n in report.names if n.startswith(prefix)]
    want = torch.cat([fire_core.reinit(b.clone(), "io") for b in base.chunk(3, dim=1)], dim=1)
    torch.testing.assert_close(attn.base_layer.weight.detach(), want, rtol=0, atol=1e-13)
    assert "merge" in report[f"{prefix}[q]"]["note"]
    # the factors still follow adapters= (left alone)
    assert all(torch.equal(p.detach(), old[n]) for n, p in factors(model).items())


# --- adapters="project": each factor as its own matrix ------------------------------------------


def test_adapters_project_projects_each_factor_as_a_linear_and_says_what_it_does_to_the_adapter():
    model = tiny_bert()
    query = model.base_model.model.encoder.layer[0].attention.self.query
    old = {n: p.detach().clone() for n, p in factors(model).items()}
    report = ft.apply(model, adapters="project")
    for n, p in factors(model).items():
        torch.testing.assert_close(p.detach(), fire_core.reinit(old[n], "oi"), rtol=0, atol=1e-13, msg=n)
        assert report[n]["layout"] == "oi"
    # both factors near-isometries: s B A has spectral norm up to s sqrt(out / in) = 2 (5 steps: a bit under)
    norm = torch.linalg.matrix_norm(adapter_delta(query).detach(), 2).item()
    assert 1.0 < norm <= 2.0 + 1e-9
    assert any("adapters='project'" in line and "s*B*A" in line for line in report.notes)


def test_adapters_project_splits_the_b_factor_of_a_fused_c_attn_into_q_k_v():
    model = tiny_gpt2()
    attn = model.base_model.model.transformer.h[0].attn.c_attn
    b_old = attn.lora_B["default"].weight.detach().clone()  # (3 * 32, r)
    a_old = attn.lora_A["default"].weight.detach().clone()  # (r, 32)
    report = ft.apply(model, adapters="project")
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    assert [f"{prefix}.lora_B.default.weight[{b}]" for b in "qkv"] == [
        n for n in report.names if n.startswith(f"{prefix}.lora_B")
    ]
    want = torch.cat([fire_core.reinit(b.clone(), "oi") for b in b_old.chunk(3, dim=0)])
    torch.testing.assert_close(attn.lora_B["default"].weight.detach(), want, rtol=0, atol=1e-13)
    torch.testing.assert_close(attn.lora_A["default"].weight.detach(), fire_core.reinit(a_old, "oi"), rtol=0, atol=1e-13)


def test_the_adapters_option_is_checked_and_accepted_by_the_integrations():
    with pytest.raises(ValueError, match="adapters"):
        ft.apply(tiny_bert(), adapters="merge")
    with pytest.raises(ValueError, match="adapters"):
        ft.check_options({"adapters": "yes"}, taken={}, who="X")
    assert ft.check_options({"adapters": "project"}, taken={}, who="X") == {"adapters": "project"}
    assert "adapters" in ft.SELECTION_OPTIONS
    chosen = ft.select(tiny_bert(), adapters="project")
    assert all(".lora_" in name for name, _, _ in chosen) and len(chosen) == 8


def test_another_tuners_adapter_weights_are_named_with_the_peft_reason():
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32,
    ))
    model = peft.get_peft_model(bert, peft.LoHaConfig(r=4, alpha=8, target_modules=["query"], modules_to_save=["pooler"]))
    for adapters in ("skip", "project"):
        report = ft.apply(model, adapters=adapters, dry_run=True)
        seen = accounted(model, report)
        hada = [n for n in seen if ".hada_" in n]
        assert hada and all("PEFT" in seen[n] and "merge_and_unload()" in seen[n] for n in hada), seen
