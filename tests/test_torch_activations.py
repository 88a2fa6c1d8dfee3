"""fire_core.torch.activations: the features the activation triggers measure, read without a trace."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import fire_core.torch as ft  # noqa: E402


def test_each_activation_module_gives_batch_by_units_equal_to_the_plain_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Tanh())
    x = torch.randn(11, 5)
    got = ft.activations(model, x)
    assert list(got) == ["1", "3"]
    with torch.no_grad():
        h = torch.relu(model[0](x))
        out = torch.tanh(model[2](h))
    torch.testing.assert_close(got["1"], h, rtol=0, atol=0)
    torch.testing.assert_close(got["3"], out, rtol=0, atol=0)


def test_a_conv_map_has_one_unit_per_channel_and_a_sequence_one_per_feature():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GELU())
    x = torch.randn(3, 2, 6, 6)
    a = ft.activations(conv, x)["1"]
    with torch.no_grad():
        maps = nn.functional.gelu(conv[0](x))  # (3, 4, 4, 4)
    assert a.shape == (3 * 4 * 4, 4)
    torch.testing.assert_close(a[:, 2], maps[:, 2].reshape(-1), rtol=0, atol=0)

    seq = nn.Sequential(nn.Linear(6, 8), nn.SiLU())
    tokens = torch.randn(2, 5, 6)
    assert ft.activations(seq, tokens)["1"].shape == (2 * 5, 8)


def test_buffers_and_random_numbers_are_left_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5)).train()
    x = torch.randn(16, 4)
    stats = [b.clone() for b in model.buffers()]
    state = torch.random.get_rng_state()
    first = ft.activations(model, x)
    assert torch.equal(torch.random.get_rng_state(), state)
    for b, old in zip(model.buffers(), stats):
        assert torch.equal(b, old)
    torch.testing.assert_close(ft.activations(model, x)["2"], first["2"], rtol=0, atol=0)


def test_a_custom_forward_runs_the_probe():
    model = nn.ModuleDict({"body": nn.Sequential(nn.Linear(3, 4), nn.ReLU())})
    got = ft.activations(model, torch.ones(2, 3), forward=lambda m, x: m["body"](x))
    assert list(got) == ["body.1"] and got["body.1"].shape == (2, 4)


def test_a_model_without_activation_modules_is_an_error_naming_the_way_out():
    with pytest.raises(ValueError, match="F.relu is not a module.*DfIAbove"):
        ft.activations(nn.Linear(3, 4), torch.ones(2, 3))


def test_attention_layers_are_not_activations_though_torch_defines_them_beside_relu():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=nn.ReLU(), batch_first=True)
    assert list(ft.activation_modules(layer)) == ["activation"]
    a = ft.activations(layer, torch.randn(3, 4, 8))
    assert list(a) == ["activation"] and a["activation"].shape == (3 * 4, 16)
