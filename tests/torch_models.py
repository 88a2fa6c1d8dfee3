"""The torch adapter tests' small models (a ResNet-style CNN, a transformer, a GPT block, ...) and the
reference semantics written as plain loops, which the adapter is tested against."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# --- the reference semantics, written as plain loops ----------------------------------


def ns_loop(m: np.ndarray, steps: int) -> np.ndarray:
    """The reference iteration on one matrix: tall side, Frobenius-normalized, cubic steps."""
    wide = m.shape[1] > m.shape[0]
    x = m.T if wide else m
    x = x / np.linalg.norm(x)
    for _ in range(steps):
        x = 1.5 * x - 0.5 * x @ (x.T @ x)
    return x.T if wide else x


def fire_loop(w: np.ndarray, steps: int, transposed: bool = False) -> np.ndarray:
    """FIRE on one weight (out, in, *taps) -- or (in, out, *taps) if ``transposed`` -- tap by tap."""
    out = np.empty_like(w)
    taps = math.prod(w.shape[2:])
    for tap in np.ndindex(*w.shape[2:]):
        idx = (slice(None), slice(None)) + tap
        m = w[idx].T if transposed else w[idx]
        p = ns_loop(m, steps) * math.sqrt(m.shape[0] / m.shape[1]) / taps
        out[idx] = p.T if transposed else p
    return out


def expected_state(model: nn.Module, steps: int, fused: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Every state-dict entry as the reference would leave it (plain isinstance walk, float64).

    As the reference's language code, a Linear named ``c_attn`` is cut into 3 equal blocks (q, k, v);
    ``fused`` gives other Linears (by name) a block count.
    """
    fused = dict(fused or {})
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rpartition(".")[2] == "c_attn":
            fused.setdefault(name, 3)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        key = f"{name}.weight"
        if isinstance(mod, nn.MultiheadAttention):
            w = state[f"{name}.in_proj_weight"]
            state[f"{name}.in_proj_weight"] = np.concatenate([fire_loop(b, steps) for b in np.split(w, 3)])
        elif isinstance(mod, nn.Linear) and name in fused:
            w = state[key]
            state[key] = np.concatenate([fire_loop(b, steps) for b in np.split(w, fused[name])])
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            state[key] = fire_loop(state[key], steps)
        elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            state[key] = fire_loop(state[key], steps, transposed=True)
    return state


def assert_state(model: nn.Module, expected: dict[str, np.ndarray], atol: float = 1e-12) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k].detach().numpy(), v, rtol=0, atol=atol, err_msg=k)


def snapshot(model: nn.Module, optimizer=None) -> list:
    """Every parameter, buffer, gradient and optimizer-state tensor, as bytes, for exact comparisons."""
    dense = lambda v: v.detach().to_dense().clone() if v.layout != torch.strided else v.detach().clone()  # noqa: E731
    out = [(k, dense(v)) for k, v in model.state_dict(keep_vars=True).items()]
    out += [(f"{k}.grad", p.grad.clone()) for k, p in model.named_parameters() if p.is_leaf and p.grad is not None]
    if optimizer is not None:
        for p, st in optimizer.state.items():
            for k, v in st.items():
                out.append((f"{id(p)}.{k}", v.detach().clone() if torch.is_tensor(v) else v))
    return out


def assert_same(before: list, after: list) -> None:
    assert [k for k, _ in before] == [k for k, _ in after]
    for (k, a), (_, b) in zip(before, after):
        if torch.is_tensor(a):
            assert a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), k
        else:
            assert a == b, k


def seeded(cls, *args, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return cls(*args, **kw).to(dtype)


def trained_adam(model, batch):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(batch).float().square().mean().backward()
    opt.step()
    opt.zero_grad()
    return opt


# --- models --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """conv stem, two stages of basic blocks (one with a 1x1 downsample), linear head."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


class Transformer(nn.Module):
    """Token embedding, two encoder layers (nn.MultiheadAttention inside), tied output head."""

    def __init__(self, vocab: int = 11, d: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        return self.head(self.norm(self.encoder(self.embed(tokens))))


class GPTBlock(nn.Module):
    """A GPT-2 style block with a fused qkv projection ``c_attn`` (an nn.Linear, 3d x d)."""

    def __init__(self, d: int = 12, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.attn.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * d)
        self.mlp.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp.c_proj(torch.relu(self.mlp.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 13, d: int = 12, blocks: int = 2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(GPTBlock(d) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, tokens):
        x = self.wte(tokens)
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


class HFConv1D(nn.Module):
    """Like Hugging Face's GPT-2 ``Conv1D``: a linear layer that stores its weight as (in, out)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.2)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias
