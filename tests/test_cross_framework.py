"""The same weights in a torch model and a Flax model give the same FIRE result.

torch stores a Linear weight (out, in) and a Conv2d kernel (out, in, kh, kw);
Flax stores a Dense kernel (in, out) and a Conv kernel (kh, kw, in, out). A
torch MultiheadAttention keeps q, k, v stacked in ``in_proj_weight`` (3E, E);
Flax keeps query/key/value kernels (E, heads, head_dim) and the out kernel
(heads, head_dim, E). Copying the weights across with the matching
transposes and reshapes, both adapters must project the same matrices.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fire_core.flax  # noqa: E402
import fire_core.torch  # noqa: E402

E, HEADS = 16, 4


pytestmark = pytest.mark.usefixtures("x64")  # conftest's: float64 JAX for every test here


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(7, 24)
        self.conv = torch.nn.Conv2d(3, 8, (3, 2))
        self.conv1 = torch.nn.Conv1d(8, 12, 3)
        self.attn = torch.nn.MultiheadAttention(E, HEADS)
        self.fc2 = torch.nn.Linear(24, 40)


INPUT_SHAPES = [(1, 7), (1, 5, 5, 3), (1, 6, 8), (1, 3, E)]  # FlaxNet's x, img, seq, tokens


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, img, seq, tokens):
        nn.Dense(24, name="fc1")(x)
        nn.Conv(8, (3, 2), name="conv")(img)
        nn.Conv(12, (3,), name="conv1")(seq)
        nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(tokens)
        return nn.Dense(40, name="fc2")(jnp.ones((1, 24)))


def torch_to_flax(model: TorchNet, dtype):
    """FlaxNet's params tree holding ``model``'s weights, transposed to Flax's layouts."""
    shapes = jax.eval_shape(
        FlaxNet().init,
        jax.ShapeDtypeStruct((2,), jnp.uint32),
        *(jax.ShapeDtypeStruct(s, jnp.float32) for s in INPUT_SHAPES),
    )["params"]
    t = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    head = E // HEADS
    q, k, v = np.split(t["attn.in_proj_weight"], 3)  # each (E_out, E_in), out = heads * head_dim
    qb, kb, vb = np.split(t["attn.in_proj_bias"], 3)
    params = {
        "fc1": {"kernel": t["fc1.weight"].T, "bias": t["fc1.bias"]},
        "fc2": {"kernel": t["fc2.weight"].T, "bias": t["fc2.bias"]},
        "conv": {"kernel": t["conv.weight"].transpose(2, 3, 1, 0), "bias": t["conv.bias"]},
        "conv1": {"kernel": t["conv1.weight"].transpose(2, 1, 0), "bias": t["conv1.bias"]},
        "attn": {
            name: {"kernel": w.T.reshape(E, HEADS, head), "bias": b.reshape(HEADS, head)}
            for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb))
        },
    }
    params["attn"]["out"] = {
        "kernel": t["attn.out_proj.weight"].T.reshape(HEADS, head, E),
        "bias": t["attn.out_proj.bias"],
    }
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes)
    for a, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shapes)):
        assert a.shape == s.shape
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)


def flax_to_torch_weights(p) -> dict[str, np.ndarray]:
    """The projected Flax kernels back in torch's layouts (the inverse of torch_to_flax)."""
    a = {k: np.asarray(p["attn"][k]["kernel"]) for k in ("query", "key", "value", "out")}
    return {
        "fc1.weight": np.asarray(p["fc1"]["kernel"]).T,
        "fc2.weight": np.asarray(p["fc2"]["kernel"]).T,
        "conv.weight": np.asarray(p["conv"]["kernel"]).transpose(3, 2, 0, 1),
        "conv1.weight": np.asarray(p["conv1"]["kernel"]).transpose(2, 1, 0),
        "attn.in_proj_weight": np.concatenate([a[k].reshape(E, E).T for k in ("query", "key", "value")]),
        "attn.out_proj.weight": a["out"].reshape(E, E).T,
    }


def run_both(method, dtype_torch, dtype_jax, steps=6):
    torch.manual_seed(0)
    model = TorchNet().to(dtype_torch)
    params = torch_to_flax(model, dtype_jax)
    # The convs are user-named: the linen module says what they are (a shape alone cannot).
    model_def = (FlaxNet(), *(jnp.zeros(s, jnp.float32) for s in INPUT_SHAPES))
    new_params = fire_core.flax.apply(params, steps, method=method, model=model_def)
    flax_report = fire_core.flax.report(params, new_params, model=model_def)
    torch_report = fire_core.torch.apply(model, steps, method=method)
    ours = flax_to_torch_weights(new_params)
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items() if k in ours}
    diff = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours)
    return diff, torch_report, flax_report


@pytest.mark.parametrize("method", ["fire", "fast", "svd"])
def test_same_weights_same_projection_float64(method):
    diff, _, _ = run_both(method, torch.float64, jnp.float64)
    assert diff <= 1e-12


def test_same_weights_same_projection_float32():
    diff, _, _ = run_both("fire", torch.float32, jnp.float32)
    assert diff <= 1e-5


def test_same_report_numbers():
    _, rt, rf = run_both("fire", torch.float64, jnp.float64)
    names = {
        "fc1.weight": "fc1/kernel", "fc2.weight": "fc2/kernel", "conv.weight": "conv/kernel",
        "conv1.weight": "conv1/kernel", "attn.in_proj_weight[q]": "attn/query/kernel",
        "attn.in_proj_weight[k]": "attn/key/kernel", "attn.in_proj_weight[v]": "attn/value/kernel",
        "attn.out_proj.weight": "attn/out/kernel",
    }
    assert sorted(rt.names) == sorted(names)
    for row in rt:
        other = rf[names[row["name"]]]
        assert (row["taps"], row["n"]) == (other["taps"], other["n"])
        for key in ("scale", "sfe", "dfi_before", "dfi_after"):
            assert other[key] == pytest.approx(row[key], rel=1e-9, abs=1e-12), (row["name"], key)
