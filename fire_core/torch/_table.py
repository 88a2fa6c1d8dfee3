"""What each module type holds: :data:`MODULE_TABLE`, read by the selection and the report's reasons.

One row (:class:`Kind`) per module type: its weights (:class:`Slot`), their
layout, how they split into blocks (RNN gates, fused q/k/v and gate/up
projections, grouped convs), and why a weight is left alone (embeddings,
``nn.Bilinear``, quantized modules, PEFT adapter weights). A new module type
is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from torch import nn
from torch.nn.utils import parametrize

_SPATIAL = {1: "w", 2: "hw", 3: "dhw"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# --- what each module type holds: the table --------------------------------------------


@dataclass(frozen=True)
class Slot:
    """What FIRE does with one weight a module type holds.

    ``layout`` None: the weight is left alone, for ``reason``. Otherwise it is
    projected in ``layout``, as the blocks ``blocks`` (labels) cut along its
    output axis, of ``sizes`` (None: equal blocks), after reading it as the
    shape ``view`` (a grouped conv's groups as a stack axis). ``note`` is
    said in the report row; ``problem`` is raised when the weight is selected
    and no ``split=`` says how to cut it. ``shape``: the shape of a weight
    that is no tensor FIRE can see (a quantized module's packed weight).
    """

    layout: str | None = None
    reason: str | None = None
    blocks: tuple[str, ...] | None = None
    sizes: tuple[int, ...] | None = None
    view: tuple[int, ...] | None = None
    note: str | None = None
    problem: str | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _Where:
    """Where a module sits: its dotted name, its last name component, its parent, and the options that shape it."""

    name: str
    leaf: str
    parent: nn.Module | None
    conv_groups: str
    adapters: str = "skip"


@dataclass(frozen=True)
class Kind:
    """One row of :data:`MODULE_TABLE`: a module type and the weights it holds.

    ``weights`` maps attribute names to slots; a dotted name
    (``"lora_A.default.weight"``) is a weight of one of the module's
    submodules, which the row decides for (a wrapper knows what its parts
    are; the outermost wrapper's word wins).
    """

    name: str  # as the docs say it
    match: object  # a type, a tuple of types, or a predicate on the module
    weights: Callable[[nn.Module, _Where], dict[str, Slot]]  # attribute name (or dotted path) -> Slot

    def matches(self, mod: nn.Module) -> bool:
        if isinstance(self.match, (type, tuple)):
            return isinstance(mod, self.match)
        return bool(self.match(mod))


_EMBEDDING = "embedding (a lookup table, not a map between layers; layouts= projects it)"
_BILINEAR = "nn.Bilinear (its out x in1 x in2 weight is a bilinear form, not one matrix; layouts= projects it)"
_QUANTIZED = (
    "quantized module (its weight is packed integers, which FIRE cannot write; apply FIRE to the float model "
    "before quantizing)"
)
_NO_RULE = "no FIRE rule for a parameter of {kind} (layouts= projects it)"
_FROZEN = "frozen (requires_grad=False, so it cannot re-learn; frozen=True projects it)"
_EMPTY = "empty (a dimension of size 0)"
_NOT_INCLUDED = "not selected by include"
_LAYOUT_NONE = "layouts= maps it to None"
_TIED_HEAD = "an LM head tied to an embedding is projected, as the reference does (exclude either name to keep it)"
_LORA_FACTOR = (
    "a LoRA adapter factor (PEFT): projected on its own it becomes a scaled semi-orthogonal matrix, so the "
    "adapter's s*B*A would jump to spectral norm (alpha/r)*sqrt(out/in) (lora_B starts at zero by design); merge "
    "first (model.merge_and_unload(), then FIRE the merged weight) or reset the adapter "
    "(layer.reset_lora_parameters(adapter_name, True)); adapters='project' projects it"
)
_PEFT_ADAPTER = (
    "a PEFT {tuner} adapter weight: not a layer's weight matrix but a part of the change the adapter adds to one; "
    "merge first (model.merge_and_unload(), then FIRE the merged weight), or layouts= projects it"
)
_PEFT_NO_RULE = (
    "a PEFT {tuner} adapter weight, which adapters='project' does not cover (it projects LoRA's lora_A, lora_B "
    "and lora_embedding_A/B); merge first (model.merge_and_unload(), then FIRE the merged weight), or layouts= "
    "projects it"
)
_LORA_PROJECTED = (
    "LoRA factors projected on their own (adapters='project'): lora_A (r x in) and lora_B (out x r) each become "
    "a scaled near-semi-orthogonal matrix, so the adapter's s*B*A becomes (alpha/r)*sqrt(out/in) times a product "
    "of two partial isometries (spectral norm up to (alpha/r)*sqrt(out/in) for a Linear, 2.0 at r=4, alpha=8 on a "
    "square layer), whatever it was before (0 for a fresh adapter)"
)
_PEFT_BASE = (
    "the base weight inside a PEFT {tuner} layer, projected alone: the adapter's change is still "
    "added to the new weight as it was (merge first, model.merge_and_unload(), to FIRE the merged weight)"
)

_GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n"), "RNN_TANH": None, "RNN_RELU": None}
_CELL_GATES = ((nn.LSTMCell, ("i", "f", "g", "o")), (nn.GRUCell, ("r", "z", "n")), (nn.RNNCell, None))
_FUSED_QKV = ("c_attn", "qkv", "qkv_proj")
_FUSED_GATE_UP = ("gate_up_proj",)
_FUSED_NOTE = (
    "recognised fused projections, split into their blocks as the reference splits c_attn "
    "(split={pattern: 1} projects one whole)"
)


def _attention_weights(mod: nn.MultiheadAttention, where: _Where) -> dict[str, Slot]:
    if mod.in_proj_weight is not None or parametrize.is_parametrized(mod, "in_proj_weight"):
        return {"in_proj_weight": Slot("oi", blocks=("q", "k", "v"))}
    return {a: Slot("oi") for a in ("q_proj_weight", "k_proj_weight", "v_proj_weight")}


def _rnn_weights(mod: nn.RNNBase, where: _Where) -> dict[str, Slot]:
    """Every layer and direction: input and hidden weights per gate block, the projection (proj_size) whole."""
    if mod.mode not in _GATES:
        return {}
    gates = _GATES[mod.mode]
    out = {}
    for attr in mod._flat_weights_names:
        if attr.startswith(("weight_ih", "weight_hh")):
            out[attr] = Slot("oi", blocks=gates)
        elif attr.startswith("weight_hr"):
            out[attr] = Slot("oi")
    return out


def _cell_weights(mod: nn.RNNCellBase, where: _Where) -> dict[str, Slot]:
    gates = next((g for kind, g in _CELL_GATES if isinstance(mod, kind)), None)
    return {"weight_ih": Slot("oi", blocks=gates), "weight_hh": Slot("oi", blocks=gates)}


def _linear_weights(mod: nn.Linear, where: _Where) -> dict[str, Slot]:
    return {"weight": Slot("oi", **_fused(where, mod.out_features, mod.in_features))}


def _is_hf_conv1d(mod: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2), recognised without importing transformers."""
    kind = type(mod)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers") and isinstance(
        getattr(mod, "nf", None), int
    )


def _hf_conv1d_weights(mod: nn.Module, where: _Where) -> dict[str, Slot]:
    """A Linear that stores its weight as (in, out) = (nx, nf): layout ``"io"``."""
    weight = mod._parameters.get("weight")
    shape = None if weight is None else tuple(getattr(weight, "ds_shape", weight.shape))  # ZeRO-3: a placeholder
    d_in = getattr(mod, "nx", None) if weight is None else int(shape[0])
    if not isinstance(d_in, int) or weight is not None and shape != (d_in, mod.nf):
        return {}  # not stored as Conv1D stores it: left to layouts=
    return {"weight": Slot("io", **_fused(where, mod.nf, d_in))}


def _conv_weights(mod: nn.Module, where: _Where) -> dict[str, Slot]:
    """Conv and ConvTranspose: one matrix per tap; a grouped conv's stored matrices, or each group's own."""
    transposed = isinstance(mod, _CONV_T)
    features = ("io" if transposed else "oi") + _SPATIAL[len(mod.kernel_size)]
    groups = mod.groups
    if groups == 1:
        return {"weight": Slot(features)}
    # The stored tap is out x in/groups (conv) or out/groups x in (transposed): every group in one matrix.
    stored = (mod.out_channels // groups, mod.in_channels) if transposed else (mod.out_channels, mod.in_channels // groups)
    depthwise = min(stored) == 1
    if where.conv_groups == "stored":
        note = (
            "depthwise convs: each tap is a single column (or row), which FIRE only normalizes, so DfI after is "
            "0 whatever the steps, not a sign of convergence (conv_groups='each' projects each channel's own)"
            if depthwise
            else "grouped convs: each tap's stored matrix, every group in one, as the reference does "
            "(conv_groups='each' projects each group's own)"
        )
        return {"weight": Slot(features, note=note)}
    weight = mod._parameters.get("weight")
    problem = None
    if weight is not None and hasattr(weight, "placements"):
        problem = (
            f"{where.name}.weight: conv_groups='each' is not supported for a DTensor (sharded) weight; use "
            "conv_groups='stored' or exclude it"
        )
    # (groups, per-group rows, ...): the groups become a stack axis, each projected and scaled on its own.
    first = (mod.in_channels if transposed else mod.out_channels) // groups
    second = (mod.out_channels if transposed else mod.in_channels) // groups
    view = (groups, first, second, *mod.kernel_size)
    if first * second == 1:
        note = (
            "depthwise convs, conv_groups='each': each channel's taps are 1 x 1 matrices, which FIRE sets to "
            "their sign times the scale"
        )
    elif min(first, second) == 1:
        note = (
            "depthwise convs, conv_groups='each': each group's taps are single columns (or rows), which FIRE only "
            "normalizes, so DfI after is 0 whatever the steps"
        )
    else:
        note = (
            "grouped convs, conv_groups='each': each group's (out/groups) x (in/groups) matrices projected and "
            "scaled on their own (stack axis G)"
        )
    return {"weight": Slot("G" + features, view=view, note=note, problem=problem)}


def _is_quantized(mod: nn.Module) -> bool:
    """A torch.ao quantized (static or dynamic) module: its weight is a method returning packed integers."""
    quantized = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")
    return type(mod).__module__.startswith(quantized) and callable(getattr(mod, "weight", None))


def _quantized_weights(mod: nn.Module, where: _Where) -> dict[str, Slot]:
    try:
        shape = tuple(int(d) for d in mod.weight().shape)
    except Exception:  # a module whose packed weight cannot be read back
        shape = ()
    return {"weight": Slot(reason=_QUANTIZED, shape=shape)}


def _left_alone(reason: str):
    return lambda mod, where: {"weight": Slot(reason=reason)}


# --- PEFT tuner layers (LoRA and the others), recognised without importing peft -------------------


def _peft_class(mod: nn.Module, name: str) -> bool:
    """Whether ``mod`` is an instance of peft's class ``name`` (looked up in its type's MRO by name and module)."""
    return any(c.__name__ == name and c.__module__.startswith("peft.") for c in type(mod).__mro__)


def _is_peft_tuner(mod: nn.Module) -> bool:
    """A PEFT tuner layer (``peft.tuners.tuners_utils.BaseTunerLayer``: LoRA, AdaLoRA, LoHa, IA3, ...)."""
    return _peft_class(mod, "BaseTunerLayer")


def _tuner_name(mod: nn.Module) -> str:
    module = type(mod).__module__.split(".")
    return module[2] if len(module) > 2 and module[1] == "tuners" else type(mod).__name__


_LORA_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _peft_weights(mod: nn.Module, where: _Where) -> dict[str, Slot]:
    """A PEFT tuner layer: its base layer as the layer it wraps, its adapter weights as ``adapters=`` says.

    The base layer's weights get the slots its own row gives, read as if it
    sat where the wrapper sits (so GPT-2's ``c_attn`` base is still cut into
    q, k, v); it is frozen, so only ``frozen=True`` projects it. Every adapter
    weight of two or more dimensions (under the layer's
    ``adapter_layer_names``) is left alone by default. With
    ``adapters="project"`` LoRA's factors are projected as the Linear (or
    conv) matrices they are, ``lora_B`` cut into the blocks of a fused base;
    other tuners' weights stay left alone (no rule for them).
    """
    lora = _peft_class(mod, "LoraLayer")
    tuner = "LoRA" if lora else _tuner_name(mod)
    out: dict[str, Slot] = {}
    base = mod._modules.get("base_layer")
    fused = None  # the base's slot with blocks (or an unreadable fused size), which lora_B follows
    base_kind = _kind_of(base) if isinstance(base, nn.Module) else None
    if base_kind is not None:
        for attr, slot in base_kind.weights(base, where).items():
            if slot.layout is not None:
                note = _PEFT_BASE.format(tuner=tuner)
                slot = replace(slot, note=f"{slot.note}; {note}" if slot.note else note)
                if fused is None and (slot.blocks or slot.problem):
                    fused = slot
            out[f"base_layer.{attr}"] = slot
    for attr in getattr(mod, "adapter_layer_names", ()):
        holder = mod._modules.get(attr)
        if holder is None:
            continue
        for pname, p in holder.named_parameters(remove_duplicate=False):
            if isinstance(p, nn.parameter.UninitializedParameter) or not p.is_floating_point() or p.ndim < 2:
                continue  # biases, DoRA's magnitude vectors: not weights FIRE considers
            key = f"{attr}.{pname}"
            if where.adapters == "skip":
                out[key] = Slot(reason=_LORA_FACTOR if lora and attr in _LORA_FACTORS else _PEFT_ADAPTER.format(tuner=tuner))
                continue
            if not (lora and attr in _LORA_FACTORS):
                out[key] = Slot(reason=_PEFT_NO_RULE.format(tuner=tuner))
                continue
            owner_name, _, leaf = pname.rpartition(".")
            owner = holder.get_submodule(owner_name) if owner_name else holder
            slot = Slot("oi")  # a factor held as a bare Parameter (lora_embedding_A/B, AdaLoRA's lora_A/B)
            kind = _kind_of(owner) if owner is not holder else None
            if kind is not None:
                inner = _Where(f"{where.name}.{attr}.{owner_name}", attr, holder, where.conv_groups, where.adapters)
                slot = kind.weights(owner, inner).get(leaf) or Slot(reason=_PEFT_NO_RULE.format(tuner=tuner))
            if slot.layout is None:
                out[key] = slot
                continue
            note = _LORA_PROJECTED
            if attr == "lora_B" and fused is not None and slot.layout == "oi":  # its rows are the base's outputs
                note = f"{note}; lora_B of a fused base cut into the base's blocks"
                slot = Slot("oi", blocks=fused.blocks, sizes=fused.sizes, problem=fused.problem)
            out[key] = replace(slot, note=note)
    return out


#: What each module type holds, first match wins: its weights (attribute names), their layout, how
#: they split into blocks, and why a weight is left alone. Selection reads only this table.
MODULE_TABLE: tuple[Kind, ...] = (
    Kind("PEFT tuner layer (LoRA, AdaLoRA, LoHa, ...)", _is_peft_tuner, _peft_weights),
    Kind("quantized module (torch.ao)", _is_quantized, _quantized_weights),
    Kind("nn.MultiheadAttention", nn.MultiheadAttention, _attention_weights),
    Kind("nn.RNN / nn.LSTM / nn.GRU", nn.RNNBase, _rnn_weights),
    Kind("nn.RNNCell / nn.LSTMCell / nn.GRUCell", nn.RNNCellBase, _cell_weights),
    Kind("nn.Linear", nn.Linear, _linear_weights),
    Kind("transformers Conv1D", _is_hf_conv1d, _hf_conv1d_weights),
    Kind("nn.Conv1d/2d/3d", _CONV, _conv_weights),
    Kind("nn.ConvTranspose1d/2d/3d", _CONV_T, _conv_weights),
    Kind("nn.Embedding / nn.EmbeddingBag", (nn.Embedding, nn.EmbeddingBag), _left_alone(_EMBEDDING)),
    Kind("nn.Bilinear", nn.Bilinear, _left_alone(_BILINEAR)),
)


def _kind_of(mod: nn.Module) -> Kind | None:
    return next((k for k in MODULE_TABLE if k.matches(mod)), None)


# --- fused projections: recognised by name, cut by sizes the module states --------------


def _read(mod: nn.Module | None, *names: str) -> int | None:
    """The first positive int among the module's attributes ``names``, then its ``config``'s."""
    for source in (mod, getattr(mod, "config", None)):
        for n in names:
            value = getattr(source, n, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _fused(where: _Where, d_out: int, d_in: int) -> dict:
    """Slot fields for a fused projection recognised by its name (blocks, sizes, note or problem); {} otherwise."""
    if where.leaf in _FUSED_QKV:
        return _qkv_blocks(where, d_out, d_in)
    if where.leaf in _FUSED_GATE_UP:
        inter = _read(where.parent, "intermediate_size")
        if d_out % 2 == 0 and inter in (None, d_out // 2):
            return dict(blocks=("gate", "up"), note=_FUSED_NOTE)
        return dict(problem=_fused_problem(where, d_out, d_in, "gate/up", f"intermediate_size {inter}"))
    return {}


def _qkv_blocks(where: _Where, d_out: int, d_in: int) -> dict:
    """q, k, v block sizes from the attention module (or its config); equal thirds when nothing says otherwise.

    Grouped-query attention gives k and v ``num_key_value_heads * head_dim``
    rows each, q ``num_heads * head_dim``. A GPT-2 cross-attention
    ``c_attn`` holds only k and v.
    """
    parent = where.parent
    if where.leaf == "c_attn" and getattr(parent, "is_cross_attention", False) is True:
        if d_out % 2 == 0:
            return dict(blocks=("k", "v"), note=_FUSED_NOTE)
        return dict(problem=_fused_problem(where, d_out, d_in, "k/v", "an odd output size"))
    heads = _read(parent, "num_heads", "n_head", "n_heads", "num_attention_heads")
    kv_heads = _read(parent, "num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "n_head_kv")
    head_dim = _read(parent, "head_dim", "head_size")
    if heads and not head_dim:
        embed = _read(parent, "embed_dim", "hidden_size", "n_embd", "dim", "d_model")
        if embed and embed % heads == 0:
            head_dim = embed // heads
    if heads and head_dim:
        q, kv = heads * head_dim, (kv_heads or heads) * head_dim
        if q + 2 * kv == d_out:
            return dict(blocks=("q", "k", "v"), sizes=None if q == kv else (q, kv, kv), note=_FUSED_NOTE)
        why = f"{heads} heads, {kv_heads or heads} key/value heads of {head_dim} give {q} + 2 x {kv} rows, not {d_out}"
        return dict(problem=_fused_problem(where, d_out, d_in, "q/k/v", why))
    if d_out == 3 * d_in:
        return dict(blocks=("q", "k", "v"), note=_FUSED_NOTE)
    why = "no num_heads / num_key_value_heads / head_dim on the module or its config"
    return dict(problem=_fused_problem(where, d_out, d_in, "q/k/v", why))


def _fused_problem(where: _Where, d_out: int, d_in: int, blocks: str, why: str) -> str:
    return (
        f"{where.name}.weight: a fused {blocks} projection ({where.leaf}: {d_out} outputs for {d_in} inputs) whose "
        f"block sizes cannot be read ({why}); pass split={{{where.name!r}: (n1, n2, ...)}} with the sizes of its "
        f"blocks, or split={{{where.name!r}: 1}} to project it whole"
    )
