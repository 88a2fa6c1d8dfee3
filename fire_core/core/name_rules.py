"""The naming rules: what a flat name and a shape say about a weight (layout, blocks, or why it is left alone).

One rule set per naming convention of :mod:`.conventions`: ``"torch"``
(:func:`_default_torch`: Linear and conv weights, MultiheadAttention's and
GPT's fused q/k/v, recurrent gates, embeddings left alone) and ``"flax"``
(:func:`_default_flax`, :func:`_flax_kernel_rule`, which the Flax adapter
shares). Each answers with a :class:`_Rule`; :func:`.conventions.select`
applies the user's ``layouts``, ``split`` and patterns on top.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

_TORCH_CONV = {2: "oi", 3: "oiw", 4: "oihw", 5: "oidhw"}
_TORCH_WEIGHTS = ("weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_weight")
_TORCH_EMBEDDINGS = ("wte", "wpe")
_TORCH_WRAPPERS = ("module", "_orig_mod")  # name prefixes of DDP/DataParallel and torch.compile state dicts
_FLAX_TAPS = {1: "w", 2: "hw", 3: "dhw"}  # Flax Conv kernels: (*spatial, in, out), spatial axes named so
# linen's own auto-names (class name + "_N"): the only names the Flax rules trust without module information.
_FLAX_AUTO_CONV = re.compile(r"(?:Conv|ConvTranspose)_\d+")
_FLAX_AUTO_DENSE = re.compile(r"Dense_\d+")
_FLAX_AUTO_GENERAL = re.compile(r"DenseGeneral_\d+")
# nn.scan / nn.vmap name the module class they lift "Scan<Class>" / "Vmap<Class>" (nn.remat adds "Checkpoint").
_FLAX_LIFTED = re.compile(r"(?:Checkpoint|Remat|Jit)*(?:Scan|Vmap)[A-Z]\w*_\d+")
_QKV = ("q", "k", "v")
_ATTENTION = frozenset({"query", "key", "value", "out"})
# Fused weights the torch rules split by default (module name -> blocks along the output axis), as the
# reference splits GPT's c_attn: nanoGPT/GPT-2 c_attn, timm's qkv, Phi-3's qkv_proj and gate_up_proj.
_TORCH_FUSED = {"c_attn": _QKV, "qkv": _QKV, "qkv_proj": _QKV, "gate_up_proj": ("gate", "up")}
# Hugging Face GPT-2 keeps these as Conv1D, stored (in, out); nanoGPT names its nn.Linear (out, in) the same.
_TORCH_GPT_LINEAR = ("c_fc", "c_proj", "q_attn")
_UNSURE = "unsure"  # block labels a rule cannot give: split= must


def _separator(name: str, convention: str) -> str:
    return "/" if convention == "flax" and "/" in name else "."


@dataclass(frozen=True)
class _Rule:
    """What the naming rules make of one tensor the rules take.

    ``layout`` None: the rules cannot tell it (``problem`` says why; a
    ``layouts`` pattern settles it). ``labels``: how it is cut along its
    output axis (None: whole; ``_UNSURE``: the rules cannot tell, ``problem``
    says why and a ``split`` pattern settles it). ``notes``: what a default
    decided that the report states (a fused weight split, a transposed
    storage read as such).
    """

    layout: str | None
    labels: object = None
    notes: tuple[str, ...] = ()
    problem: str | None = None


_SPLIT_NOTE = "fused weights split into their blocks by default ({what}; split={{'PAT': 1}}, --split 'PAT=1', keeps one whole)"
_CONV1D_NOTE = (
    "Hugging Face Conv1D weights, stored (in, out), read as 'io' (told by the c_attn shape (E, 3E) and the "
    "biases' lengths)"
)


def _c_attn_rule(parts: list[str], shape: tuple[int, ...]) -> _Rule | None:
    """GPT's fused attention by its shape: nanoGPT's nn.Linear (3E, E), Hugging Face GPT-2's Conv1D (E, 3E)."""
    rows, cols = shape
    if rows == 3 * cols:
        return _Rule("oi", _QKV, (_SPLIT_NOTE.format(what="c_attn as q, k, v"),))
    if cols == 3 * rows:
        return _Rule("io", _QKV, (_SPLIT_NOTE.format(what="c_attn as q, k, v"), _CONV1D_NOTE))
    if cols == 2 * rows and "crossattention" in parts:  # GPT-2 cross-attention: k, v fused, q in q_attn
        return _Rule("io", ("k", "v"), (_SPLIT_NOTE.format(what="cross-attention c_attn as k, v"), _CONV1D_NOTE))
    return None


class _TorchContext:
    """What the whole state dict tells about a name that is ambiguous alone: shapes, and how c_attn is stored."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = shapes
        self.c_attn = set()  # "oi" (nanoGPT nn.Linear), "io" (Hugging Face Conv1D)
        for key, shape in shapes.items():
            parts = key.split(".")
            if len(parts) > 1 and parts[-2:] == ["c_attn", "weight"] and len(shape) == 2:
                rule = _c_attn_rule(parts, shape)
                if rule is not None:
                    self.c_attn.add(rule.layout)


def _gpt_linear_rule(name: str, owner: str, shape: tuple[int, ...], context) -> _Rule:
    """``c_fc`` / ``c_proj`` / ``q_attn``: nanoGPT's nn.Linear (out, in) or Hugging Face GPT-2's Conv1D (in, out).

    A square one reads the same either way (the polar factor of ``W^T`` is
    the transpose of ``W``'s, and the scale is 1). Otherwise the state dict
    must tell: the sibling bias has the length of the output axis, and a
    model stores all of these like its ``c_attn``. No evidence, or evidence
    that disagrees, is a problem, never a guess.
    """
    rows, cols = shape
    votes = set()
    shapes = getattr(context, "shapes", {})
    bias = shapes.get(name[: -len("weight")] + "bias")
    if bias is not None and len(bias) == 1 and rows != cols and bias[0] in (rows, cols):
        votes.add("oi" if bias[0] == rows else "io")
    votes |= getattr(context, "c_attn", set())
    if rows == cols:
        return _Rule(votes.pop() if len(votes) == 1 else "oi")
    if len(votes) == 1:
        layout = votes.pop()
        return _Rule(layout, notes=(_CONV1D_NOTE,) if layout == "io" else ())
    why = "its bias and the model's c_attn disagree" if votes else "nothing in the state dict tells which (no bias, no c_attn)"
    return _Rule(None, problem=(
        f"{name}: a {owner} weight of shape {shape} is (out, in) as in nanoGPT's nn.Linear or (in, out) as in "
        f"Hugging Face GPT-2's Conv1D, and {why}; pass layouts={{'*.{owner}': 'io'}} for Conv1D or 'oi' for "
        f"Linear (on the command line --layout '*.{owner}=io')"
    ))


def _fused_rule(name: str, parts: list[str], owner: str, shape: tuple[int, ...]) -> _Rule:
    """A weight whose module name says it fuses several projections (``_TORCH_FUSED``)."""
    fix = f"layouts= and split= for it (on the command line --layout '*.{owner}=LAYOUT' --split '*.{owner}=N')"
    if len(shape) != 2:
        return _Rule(None, problem=f"{name}: a fused {owner} weight with {len(shape)} axes, where the rules know "
                                   f"a 2-D Linear weight; pass {fix}")
    if owner == "c_attn":
        rule = _c_attn_rule(parts, shape)
        if rule is None:
            return _Rule(None, problem=(
                f"{name}: a fused c_attn weight of shape {shape} is neither nanoGPT's (3E, E) nor Hugging Face "
                f"GPT-2's Conv1D (E, 3E); pass {fix}"
            ))
        return rule
    rows, cols = shape
    labels = _TORCH_FUSED[owner]
    if owner == "gate_up_proj":
        if rows % 2 == 0:
            return _Rule("oi", labels, (_SPLIT_NOTE.format(what="gate_up_proj as gate, up"),))
        return _Rule("oi", _UNSURE, problem=(
            f"{name}: a fused gate_up_proj weight of shape {shape} has an odd number of rows, so it is not two "
            f"equal halves (gate, up); pass the block sizes with split= (--split '*.gate_up_proj=G,U')"
        ))
    if rows == 3 * cols:
        return _Rule("oi", labels, (_SPLIT_NOTE.format(what=f"{owner} as q, k, v"),))
    return _Rule("oi", _UNSURE, problem=(
        f"{name}: a fused {owner} weight of shape {shape} has not 3x as many rows as columns: under "
        f"grouped-query attention q, k and v differ in size, which a state dict does not record; pass the sizes "
        f"with split={{'*.{owner}': (Q, K, V)}} (on the command line --split '*.{owner}=Q,K,V'; Q = heads x "
        f"head_dim, K = V = kv_heads x head_dim), or 1 to project it whole"
    ))


def _default_torch(name: str, shape: tuple[int, ...], siblings=None) -> _Rule | None:
    """The torch rule for one tensor (see the module docstring), or None when the rules do not take it.

    ``siblings``: a :class:`_TorchContext` of the whole state dict, which
    settles Hugging Face GPT-2's transposed Conv1D weights.
    """
    parts = name.split(".")
    leaf, owner = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if leaf.startswith(("weight_ih", "weight_hh", "weight_hr")) and len(shape) == 2:
        return _rnn_rule(name, parts, leaf, shape, siblings)
    if leaf not in _TORCH_WEIGHTS or len(shape) < 2:
        return None
    if leaf == "weight":
        if _embedding_name(owner):
            return None
        if owner in _TORCH_FUSED:
            return _fused_rule(name, parts, owner, shape)
        if owner in _TORCH_GPT_LINEAR and len(shape) == 2:
            return _gpt_linear_rule(name, owner, shape, siblings)
        if len(shape) not in _TORCH_CONV:
            return _Rule(None, problem=(
                f"{name}: a weight of shape {shape} has no default layout; pass layouts={{{name!r}: ...}} "
                f"or exclude it"
            ))
        return _Rule(_TORCH_CONV[len(shape)])
    if len(shape) != 2:
        return None
    return _Rule("oi", _QKV if leaf == "in_proj_weight" else None)


def _rnn_rule(name: str, parts: list[str], leaf: str, shape: tuple[int, ...], context) -> _Rule | None:
    """``nn.RNN``/``LSTM``/``GRU`` (``weight_ih_l0``, ``weight_hh_l1_reverse``, ``weight_hr_l0``) and their cells.

    The gates are stacked along the rows, ``(gates * hidden, ...)``, and the
    hidden weight tells their number: ``weight_hh`` is ``(gates * hidden,
    hidden)``, or ``(4 * hidden, proj)`` next to an LSTM's projection
    ``weight_hr`` ``(proj, hidden)``. 4 gates are an LSTM's (i, f, g, o),
    3 a GRU's (r, z, n), 1 a plain RNN's (whole); each gate block is
    projected on its own, as ``nn.MultiheadAttention``'s q, k, v.
    """
    kind, suffix = leaf[len("weight_"):len("weight_") + 2], leaf[len("weight_ih"):]
    layer = suffix.removeprefix("_l").removesuffix("_reverse")
    if suffix and not (suffix.startswith("_l") and layer.isdigit()):
        return None
    if kind == "hr":  # an LSTM's projection: one matrix
        return _Rule("oi")
    base = ".".join(parts[:-1] + [""])
    shapes = getattr(context, "shapes", {})
    hh, hr = shapes.get(f"{base}weight_hh{suffix}"), shapes.get(f"{base}weight_hr{suffix}")
    if hh is None or len(hh) != 2:
        return None  # no recurrent weight beside it: not an RNN's
    hidden = hr[1] if hr is not None and len(hr) == 2 else hh[1]
    gates = hh[0] // hidden if hidden and hh[0] % hidden == 0 else None
    if gates not in _RNN_GATES or shape[0] != hh[0]:
        return _Rule("oi", _UNSURE, problem=(
            f"{name}: a recurrent weight of shape {shape} beside {base}weight_hh{suffix} {hh} is not 1, 3 or 4 gate "
            f"blocks of the hidden size (RNN, GRU, LSTM); pass split= (--split) with its blocks, or layouts="
        ))
    labels = _RNN_GATES[gates]
    return _Rule("oi", labels, (_GATE_NOTE,) if labels else ())


_RNN_GATES = {4: ("i", "f", "g", "o"), 3: ("r", "z", "n"), 1: None}
_GATE_NOTE = "recurrent weights projected gate by gate (LSTM i, f, g, o; GRU r, z, n)"


def _embedding_name(owner: str) -> bool:
    return "embed" in owner.lower() or owner in _TORCH_EMBEDDINGS


def _why_not(name: str, convention: str) -> str:
    """Why the rules leave a tensor of two or more axes alone, by its name."""
    parts = _flax_path(name) if convention == "flax" else name.split(".")
    leaf, owner = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if "embed" in leaf.lower() or _embedding_name(owner):
        return "an embedding, by its name"
    return "no rule for its name (not a layer weight the rules know; layouts= adds it)"


def _unwrapped(name: str, convention: str) -> str:
    """``name`` without the prefixes DDP/DataParallel (``module.``) and torch.compile (``_orig_mod.``) add."""
    if convention != "torch":
        return name
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in _TORCH_WRAPPERS:
        parts = parts[1:]
    return ".".join(parts)


def _flax_path(name: str) -> list[str]:
    parts = name.split(_separator(name, "flax"))
    if len(parts) > 1 and parts[-1] == "value" and parts[-2] == "kernel":
        parts = parts[:-1]  # nnx: path/to/kernel/value
    return parts


class _FlaxTree:
    """Names and shapes of a whole Flax tree: what the rules read of a kernel's siblings."""

    def __init__(self, items=()):
        self.children: dict[tuple, set] = {}
        self.shapes: dict[tuple, tuple] = {}
        for key, shape in items:
            self.add(_flax_path(key), shape)

    def add(self, parts, shape) -> None:
        parts = tuple(parts)
        self.shapes[parts] = tuple(int(s) for s in getattr(shape, "shape", shape))
        if len(parts) >= 2:
            self.children.setdefault(parts[:-2], set()).add(parts[-2])

    def attention(self, parts) -> bool:
        """Whether the kernel's module is a child of one that has ``query``, ``key``, ``value`` and ``out``."""
        return _ATTENTION <= self.children.get(tuple(parts[:-2]), set())

    def sibling(self, parts, leaf: str):
        """The shape of the leaf ``leaf`` of the kernel's own module, or None."""
        return self.shapes.get(tuple(parts[:-1]) + (leaf,))


def _flax_kernel_rule(parts, shape, tree: _FlaxTree | None = None, stacked: int | None = None):
    """``(layout, None)`` for a kernel the Flax names rules are sure of, else ``(None, why not)``.

    ``parts``: the kernel's path (ending in ``kernel``); ``shape``: its shape
    with ``stacked`` known stack axes already taken out (None: nothing is
    known about stacking). Only Flax's own auto-names and the attention
    structure are trusted (see the module docstring).
    """
    shape = tuple(shape)
    ndim, owner = len(shape), (parts[-2] if len(parts) > 1 else "")
    if ndim == 2:
        return "io", None
    lifted = [p for p in parts[:-1] if _FLAX_LIFTED.fullmatch(p)]
    if stacked is None and lifted:
        return None, (
            f"it is under {lifted[-1]}, a module lifted by nn.scan/nn.vmap, whose stack axes the tree does not "
            f"record (a scanned Dense is (L, in, out), 3 axes like a 1-D conv)"
        )
    bias = tree.sibling(parts, "bias") if tree is not None else None
    bias_axes = None if bias is None else len(bias) - (stacked or 0)
    if ndim == 3 and owner in _ATTENTION and (tree is None or tree.attention(parts)):
        return ("iio" if owner == "out" else "ioo"), None
    if _FLAX_AUTO_CONV.fullmatch(owner):
        if bias_axes not in (None, 1):
            return None, (
                f"a Conv's bias has one axis, but {owner}/bias has shape {bias}: the module holds stacked layers "
                f"(nn.scan/nn.vmap), at axes the tree does not record"
            )
        taps = _FLAX_TAPS.get(ndim - 2) or "".join(c for c in "abcdefghjklmnpqrstuvwxyz")[: ndim - 2]
        return taps + "io", None
    if _FLAX_AUTO_GENERAL.fullmatch(owner):
        if bias_axes is not None and 0 < bias_axes < ndim and tuple(shape[-bias_axes:]) == tuple(bias[-bias_axes:]):
            return "i" * (ndim - bias_axes) + "o" * bias_axes, None
        return None, (
            f"how many of a DenseGeneral's axes are inputs and how many outputs (its axis= and features=) is "
            f"told by its bias, and {owner} has "
            + ("none" if bias is None else f"one of shape {bias}, which does not end its kernel's shape")
        )
    if _FLAX_AUTO_DENSE.fullmatch(owner):
        return None, (
            f"a Dense kernel has 2 axes and this one has {ndim}: it holds stacked layers (nn.scan/nn.vmap), at "
            f"axes the tree does not record"
        )
    return None, (
        f"no rule tells what a {ndim}-axis kernel of a module named {owner!r} is (a convolution, layers stacked "
        f"by nn.scan/nn.vmap and a DenseGeneral look alike by shape; only linen's auto-names Conv_N, "
        f"ConvTranspose_N and DenseGeneral_N are trusted)"
    )


def _default_flax(name: str, shape: tuple[int, ...], siblings=None) -> _Rule | None:
    """The Flax rule for one named array (see the module docstring), or None when the rules do not take it.

    ``siblings``: a :class:`_FlaxTree` of the whole tree (the attention
    structure and the biases the rules read), or None.
    """
    parts = _flax_path(name)
    if parts[-1] != "kernel" or len(shape) < 2:
        return None
    layout, why = _flax_kernel_rule(parts, shape, siblings if isinstance(siblings, _FlaxTree) else None)
    if layout is None:
        return _Rule(None, problem=(
            f"{name}: a kernel of shape {tuple(shape)} has no default layout: {why}; pass layouts={{{name!r}: ...}} "
            f"(uppercase letters are stacked layers: 'Lio' for a scanned Dense) or exclude it"
        ))
    return _Rule(layout)
