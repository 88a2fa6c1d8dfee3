"""State-dict naming conventions: which flat named arrays FIRE projects, and in which layout.

A checkpoint file or a dict of CuPy arrays has names and shapes but no module
types, so the rules here read the names. They are the one place that maps a
flat state dict onto FIRE targets; :mod:`fire_core.cli` and
:mod:`fire_core.cupy` use them. (The torch and Flax adapters see module types
and keep their own rules, which these mirror.)

``"torch"`` (names joined by ``.``)
    ``*.weight`` with 2 axes -> ``"oi"`` (Linear); 3, 4, 5 axes -> ``"oiw"``,
    ``"oihw"``, ``"oidhw"`` (Conv1d/2d/3d). ``*.in_proj_weight`` of
    ``nn.MultiheadAttention`` (``(3E, E)``) is split into three row blocks
    named ``NAME[q]``, ``NAME[k]``, ``NAME[v]``; ``*.q_proj_weight``,
    ``*.k_proj_weight``, ``*.v_proj_weight`` are ``"oi"``.

    Fused weights are split as the reference splits GPT's ``c_attn``, and a
    note in the report names them: ``*.c_attn.weight`` of shape ``(3E, E)``
    (nanoGPT's ``nn.Linear``) into row blocks ``[q]``, ``[k]``, ``[v]``; of
    shape ``(E, 3E)`` (Hugging Face GPT-2's ``Conv1D``, stored ``(in,
    out)``) read as ``"io"`` and split along its columns; ``(E, 2E)`` under
    ``crossattention`` (GPT-2 cross-attention) into ``[k]``, ``[v]``;
    timm's ``*.qkv.weight`` and ``*.qkv_proj.weight`` when their rows are
    exactly 3x their columns; ``*.gate_up_proj.weight`` into ``[gate]``,
    ``[up]`` halves. A ``qkv``/``qkv_proj`` of any other shape is
    grouped-query attention, whose unequal q, k, v sizes a state dict does
    not record: refused, asking for ``split={"*.qkv_proj": (Q, K, V)}``.
    GPT's ``c_fc``, ``c_proj`` and ``q_attn`` are ``(out, in)`` in nanoGPT
    and ``(in, out)`` in Hugging Face's Conv1D: a non-square one is read by
    the evidence in the same state dict (its bias has the length of the
    output axis; a model stores them like its ``c_attn``) and refused when
    there is none or it disagrees (a square one is the same either way).
    Recurrent weights (``weight_ih_l0``, ``weight_hh_l1_reverse``, cells'
    ``weight_ih``/``weight_hh``) are projected gate by gate, the gate count
    told by ``weight_hh``: LSTM ``[i]``, ``[f]``, ``[g]``, ``[o]``; GRU
    ``[r]``, ``[z]``, ``[n]``; RNN whole; an LSTM's ``weight_hr_l0`` whole.

    Left alone, and listed with the reason (:class:`Selection` ``skipped``;
    ``Report.skipped``): **embeddings**, a weight whose owning module (the
    name component before ``weight``) contains ``embed`` in any case, or is
    ``wte`` / ``wpe`` (GPT-2), and parameters named ``*embed*``
    (``pos_embed``); names no rule knows (``cls_token``); tensors that are
    not floating point; empty ones; and whatever ``include`` / ``exclude`` /
    ``layouts=None`` leave out. Tensors of fewer than 2 axes (biases, norms,
    running statistics) are left alone without a listing. So
    ``embed_tokens.weight`` is skipped, but a patch-embedding convolution
    ``patch_embed.proj.weight`` is projected, as the torch adapter does for
    an ``nn.Conv2d``. Exclude other tables (T5's ``shared``) by name.

    One tensor under several names (``tied``: a GPT-2 ``lm_head.weight``
    and ``transformer.wte.weight``) is projected once, under the first of
    its names a rule takes (the head, a Linear, as the reference does),
    with the others as its ``aliases``; a pattern matching any of its names
    selects or excludes it. Patterns also match names without the
    ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.

    A state dict cannot tell ``ConvTranspose2d`` (weight ``(in, out, kh, kw)``)
    from ``Conv2d`` by shape: name them in ``layouts``, e.g.
    ``layouts={"decoder.up*": "iohw"}``.

``"flax"`` (names joined by ``/``, or by ``.`` when there is no ``/``)
    As :mod:`fire_core.flax` without module information: leaves named
    ``kernel`` (a trailing nnx ``value`` component is ignored). A name and a
    shape alone are trusted only where they leave no doubt: 2 axes -> ``"io"``
    (Dense); 3 axes under ``query``, ``key`` or ``value`` of a module that has
    all of ``query``, ``key``, ``value`` and ``out`` -> ``"ioo"``, under its
    ``out`` -> ``"iio"`` (attention, heads merged into one matrix); under
    linen's own auto-names ``Conv_N`` / ``ConvTranspose_N`` -> a tap axis per
    spatial axis, then ``"io"`` (``"wio"``, ``"hwio"``, ``"dhwio"``), if its
    ``bias`` (when there is one) has one axis; under ``DenseGeneral_N`` ->
    ``"i"`` for each leading axis and ``"o"`` for each trailing axis its
    ``bias`` has. Every other kernel of 3 or more axes is refused, with the
    reason: a user-named convolution, layers stacked by ``nn.scan`` /
    ``nn.vmap`` (a scanned Dense is ``(L, in, out)``, 3 axes like a 1-D
    conv), a DenseGeneral contracting several axes and a kernel under an
    ``nn.scan``/``nn.vmap`` module (``ScanBlock_0``, ``VmapCritic_0``) look
    alike by shape; name them in ``layouts`` (or exclude them).
    ``embedding``, ``scale``, ``bias`` and the rest are skipped.

A torch weight with more than 5 axes has no default layout: a ValueError
asks for ``layouts`` or ``exclude`` (as for the Flax kernels above).

Options, for both conventions:

* ``include`` / ``exclude``: a glob pattern, a list of them, or a callable
  ``f(name) -> bool``. A pattern selects a weight when it matches the
  weight's full name, any of its module prefixes (``layer2`` selects
  ``layer2.0.conv1.weight``; ``*`` also matches the separator) or a block's
  name. Patterns are ``fnmatch`` globs whose brackets also match literally,
  so a name copied from a report (``attn.in_proj_weight[k]``,
  ``*.in_proj_weight[k]``) selects exactly that block, and ``Dense_[01]``
  still selects two modules. A callable receives the target name (the
  block's name for a block). An include or exclude pattern that matches no
  weight the rules would project is a ValueError naming the closest names.
* ``layouts``: ``{pattern: layout}``, matched the same way, first match
  wins. It overrides the layout of a weight the rules take (a layout that
  does not fit is a ValueError), adds a tensor the rules skip where the
  layout has as many axes as the tensor (``{"embed.weight": "oi"}`` projects
  an embedding; ``{"up.*": "iohw"}`` does not touch ``up.0.bias``), and
  ``None`` skips what it matches.
* ``split``: ``{pattern: k}`` cuts matching weights into ``k`` equal blocks
  along their output axis, or ``{pattern: (n1, n2, ...)}`` into blocks of
  those sizes, named ``NAME[0]``, ``NAME[1]``, ... (``{"*.c_attn": 3}`` for
  GPT-2-style fused q/k/v; ``{"*.in_proj_weight": 1}`` projects a fused
  ``in_proj_weight`` whole).

A ``layouts`` or ``split`` pattern that matches no weight is a ValueError;
an argument of the wrong type (``include=3``, ``split="c_attn=3"``) is a
TypeError.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import Callable, Iterable, Mapping

from ._array import array_namespace
from .layout import parse_layout
from .name_rules import (
    _SPLIT_NOTE,
    _TORCH_WEIGHTS,
    _default_flax,
    _default_torch,
    _flax_path,
    _FlaxTree,
    _Rule,
    _separator,
    _TorchContext,
    _unwrapped,
    _why_not,
)
from .patterns import Patterns, _first_match, check_patterns, glob_match, matches
from .plan import reinit_many
from .report import Report

__all__ = [
    "CONVENTIONS", "Target", "Selection", "select", "targets", "matches", "glob_match", "Patterns", "check_patterns",
    "detect_convention", "is_real_float", "apply_inplace",
]

CONVENTIONS = ("torch", "flax")


@dataclass(frozen=True)
class Target:
    """One weight FIRE projects: ``array[index]`` of ``source_key``, in ``layout``.

    ``index`` is None for a whole array, else a tuple of slices selecting a
    block of a fused weight; ``shape`` is the shape of that block.
    ``aliases``: the other names of the same tensor (tied weights).
    """

    name: str
    source_key: str
    index: tuple | None
    layout: str
    shape: tuple[int, ...]
    aliases: tuple[str, ...] = ()  # the other names of a tied tensor, projected once under ``name``


def _split_spec(pattern, spec):
    """A ``split`` value -> ("count", k) or ("sizes", (n1, n2, ...))."""
    if not isinstance(pattern, str):
        raise TypeError(f"split must map glob patterns to block counts or sizes, got the key {pattern!r}")
    if isinstance(spec, bool) or not (
        isinstance(spec, int) or (isinstance(spec, (tuple, list)) and all(isinstance(s, int) for s in spec))
    ):
        raise TypeError(f"split: {pattern!r} must map to a positive number of blocks or a list of sizes, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"split: {pattern!r} must map to a positive number of blocks, got {spec!r}")
        return ("count", spec)
    if not spec or any(isinstance(s, bool) or s < 1 for s in spec):
        raise ValueError(f"split: {pattern!r} block sizes must be positive, got {spec!r}")
    return ("sizes", tuple(spec))


def _blocks(key, shape, layout, labels):
    """``shape`` cut along its output axis as ``labels`` says -> Targets."""
    if labels is None or labels == ("count", 1):
        return [Target(key, key, None, layout, shape)]
    if layout.count("o") != 1:
        raise ValueError(f"{key}: cannot split layout {layout!r} (shape {shape}): it needs exactly one 'o' axis")
    axis = layout.index("o")
    total = shape[axis]
    if labels[0] == "sizes":
        sizes, names = labels[1], [str(k) for k in range(len(labels[1]))]
        if sum(sizes) != total:
            raise ValueError(
                f"{key}: split sizes {sizes} sum to {sum(sizes)}, but the output axis of {shape} has {total}"
            )
    else:
        if labels[0] == "count":
            count, names = labels[1], [str(k) for k in range(labels[1])]
        else:  # named equal blocks: MultiheadAttention's q, k, v
            count, names = len(labels), labels
        if total % count:
            raise ValueError(f"{key}: cannot split the output axis of shape {shape} into {count} equal blocks")
        sizes = (total // count,) * count
    out, start = [], 0
    for label, size in zip(names, sizes):
        index = tuple(slice(start, start + size) if a == axis else slice(None) for a in range(len(shape)))
        block_shape = tuple(size if a == axis else s for a, s in enumerate(shape))
        out.append(Target(f"{key}[{label}]", key, index, layout, block_shape))
        start += size
    return out


@dataclass
class Selection:
    """What the naming rules make of a state dict (see :func:`select`).

    ``targets``: the weights to project, in order. ``skipped``: one dict per
    tensor of two or more axes that is not projected, with ``name``,
    ``shape``, ``reason`` (and ``aliases`` when tied), as in
    :attr:`Report.skipped`. ``notes``: what a default rule decided (a fused
    weight split, a transposed storage read as such), for the report.
    """

    targets: list[Target] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def annotate(self, report: Report) -> Report:
        """Add the tied targets' other names to ``report``'s rows, and the skipped tensors and notes to it."""
        aliases = {t.name: list(t.aliases) for t in self.targets if t.aliases}
        for row in report.rows:
            if row["name"] in aliases:
                row["aliases"] = aliases[row["name"]]
        for s in self.skipped:
            report.skip(s["name"], s["shape"], s["reason"], aliases=s.get("aliases", ()))
        report.notes.extend(self.notes)
        return report


def targets(
    named_shapes,
    convention: str = "torch",
    *,
    include=None,
    exclude=None,
    layouts: Mapping[str, str | None] | None = None,
    split: Mapping[str, int] | None = None,
    tied: Mapping[str, str] | None = None,
) -> list[Target]:
    """The FIRE targets among flat named arrays, in their order: :func:`select`'s ``targets``."""
    return select(
        named_shapes, convention, include=include, exclude=exclude, layouts=layouts, split=split, tied=tied
    ).targets


def _mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping (a dict), got {type(value).__name__} {value!r}")
    return dict(value)


def _is_floating(value) -> bool:
    """A bare shape counts as floating; an array by its dtype (bfloat16 and float8 included)."""
    if not hasattr(value, "dtype"):
        return True
    return is_real_float(value) or "float" in str(value.dtype)


def _as_rule(found) -> _Rule | None:
    """A rule's answer as a :class:`_Rule` (the flax rule gives ``(layout, labels)``)."""
    return found if found is None or isinstance(found, _Rule) else _Rule(*found)


def _match_names(names: list[str], convention: str) -> list[str]:
    """The names a pattern is tested against: each name, and it without a DDP/torch.compile prefix."""
    return list(dict.fromkeys([*names, *(_unwrapped(n, convention) for n in names)]))


def select(
    named_shapes,
    convention: str = "torch",
    *,
    include=None,
    exclude=None,
    layouts: Mapping[str, str | None] | None = None,
    split: Mapping[str, int] | None = None,
    tied: Mapping[str, str] | None = None,
) -> Selection:
    """The FIRE targets among flat named arrays, what is left alone and why, and notes (see the module docstring).

    ``named_shapes`` maps names to arrays (or to anything with ``.shape``, or
    to shapes), or is an iterable of ``(name, value)`` pairs. The rules read
    names and shapes; an array that is not floating point is left alone
    (listed in ``skipped`` when it has two or more axes). ``tied`` maps a
    name to the first name of the same tensor (tied weights): the tensor is
    decided once, under the first of its names a rule takes (a GPT-2
    ``lm_head.weight`` tied to ``transformer.wte.weight`` is the head), is
    selected or excluded by a pattern matching any of its names, and its
    target carries the others as ``aliases``. Patterns also match a torch
    name without the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile)
    prefixes.

    Errors, raised before anything is returned: a ``layouts`` or ``split``
    pattern that matches no weight, and an ``include`` or ``exclude`` pattern
    that matches no weight the rules would project, are a ValueError naming
    the closest names (a typo would otherwise pass silently); a selected
    weight the rules cannot read with confidence (an unknown fused shape, a
    GQA ``qkv_proj``, a non-square GPT ``c_fc`` whose storage nothing tells)
    is a ValueError saying which ``layouts``/``split`` settles it; an
    argument of the wrong type is a TypeError.
    """
    if not isinstance(convention, str):
        raise TypeError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
    include, exclude = Patterns(include, "include"), Patterns(exclude, "exclude")
    layouts = _mapping(layouts, "layouts")
    for pattern, lay in layouts.items():
        if not isinstance(pattern, str) or not (lay is None or isinstance(lay, str)):
            raise TypeError(f"layouts must map glob patterns to layout strings (or None), got {pattern!r}: {lay!r}")
    split = {pattern: _split_spec(pattern, n) for pattern, n in _mapping(split, "split").items()}
    tied = _mapping(tied, "tied")
    rule = _default_torch if convention == "torch" else _default_flax
    items = list(named_shapes.items() if isinstance(named_shapes, Mapping) else named_shapes)
    siblings = _FlaxTree(items) if convention == "flax" else {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}  # the non-floating ones
    for key, value in items:
        if not isinstance(key, str):
            raise TypeError(f"names must be strings, got {key!r}")
        shapes[key] = tuple(int(s) for s in getattr(value, "shape", value))
        if not _is_floating(value):
            dtypes[key] = str(value.dtype).replace("torch.", "")
    context = _TorchContext(shapes) if convention == "torch" else siblings
    used = set()

    def rule_for(key):
        """(rule, None, False) for a tensor the rules or a layouts pattern take, else (None, reason, vetoed)."""
        shape, sep = shapes[key], _separator(key, convention)
        if key in dtypes:
            return None, f"not floating point ({dtypes[key]})", False
        pattern, override = _first_match(layouts, _match_names([key], convention), sep)
        if pattern is None:
            found = _as_rule(rule(key, shape, context))
            if found is None:
                return None, _why_not(key, convention), False
        else:
            if override is None:  # named to be skipped
                used.add(pattern)
                return None, f"layouts pattern {pattern!r} maps it to None", True
            try:
                found = _as_rule(rule(key, shape, context))
            except ValueError:  # no default layout: the pattern gives one
                found = None
            if found is None and len(override) != len(shape):
                return None, _why_not(key, convention), False  # a pattern adds a tensor only where its layout fits
            if len(override) != len(shape):
                raise ValueError(
                    f"{key}: layouts pattern {pattern!r} gives {override!r}, which does not fit shape {shape}"
                )
            parse_layout(override, shape, key)
            used.add(pattern)
            same = found is not None and found.layout == override  # keeps the rule's blocks (q, k, v)
            found = _Rule(override, found.labels, found.notes, found.problem) if same else _Rule(override)
        pattern, spec = _first_match(split, _match_names([key], convention), sep)
        if pattern is not None:
            used.add(pattern)
            notes = tuple(n for n in found.notes if not n.startswith(_SPLIT_NOTE[:20]))
            found = _Rule(found.layout, spec, notes, found.problem if found.layout is None else None)
        return found, None, False

    # Tied tensors (one tensor under several names) form one group, decided under the first name a rule
    # takes (a tied GPT-2 head: lm_head.weight, not the embedding's name) and named by all of them.
    decided = {key: rule_for(key) for key in shapes}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        first = tied.get(key, key)
        groups.setdefault(first if first in shapes else key, []).append(key)
    position = {key: k for k, key in enumerate(shapes)}
    plans = []
    for members in groups.values():
        taken = [(m, decided[m][0]) for m in members if decided[m][0] is not None]
        vetoes = [decided[m][1] for m in members if decided[m][2]]
        if taken and not vetoes:
            primary, found, reason = taken[0][0], taken[0][1], None
            layouts_seen = {f.layout for _, f in taken if f.layout is not None}
            if len(layouts_seen) > 1:
                raise ValueError(
                    f"{primary}: one tensor under the names {', '.join(m for m, _ in taken)}, which the rules read "
                    f"in different layouts ({', '.join(sorted(layouts_seen))}); give it one with layouts="
                )
        else:
            primary, found = members[0], None
            reason = vetoes[0] if vetoes else decided[members[0]][1]
        plans.append((position[primary], primary, tuple(m for m in members if m != primary), found, reason))
    plans.sort(key=lambda plan: plan[0])

    def left_out(names, sep, target_name):
        """Why include/exclude leave a target out, or None; both are tested, so each pattern's use is known."""
        keep = include.func(target_name) if include.func else (
            include.hit(names, sep, target_name=target_name) if include.patterns else True)
        drop = exclude.func(target_name) if exclude.func else exclude.hit(names, sep, target_name=target_name)
        if drop:
            if exclude.func:
                return "excluded by the exclude function"
            hit = next(p for p in exclude.patterns if matches([p], names, sep, target_name=target_name))
            return f"excluded by exclude pattern {hit!r}"
        return None if keep else "not selected by include"

    selection = Selection()
    notes: dict[str, list[str]] = {}
    problems: list[tuple[str, str]] = []
    known: list[str] = []

    def skip(name, shape, reason, aliases):
        if len(shape) >= 2:  # a tied tensor's other names go with it (the report prints them)
            entry = {"name": name, "shape": tuple(shape), "reason": reason}
            if aliases:
                entry["aliases"] = list(aliases)
            selection.skipped.append(entry)

    for _, key, aliases, found, reason in plans:
        shape, sep = shapes[key], _separator(key, convention)
        if found is None:
            skip(key, shape, reason, aliases)
            continue
        names = _match_names([key, *aliases], convention)
        known += [key, *aliases]
        if found.problem is not None or 0 in shape:
            why = left_out(names, sep, key)
            if why is not None:
                skip(key, shape, why, aliases)
            elif 0 in shape:
                skip(key, shape, "empty (an axis of length 0)", aliases)
            else:
                problems.append((key, found.problem))
            continue
        for t in _blocks(key, shape, found.layout, found.labels):
            known.append(t.name)
            why = left_out(names, sep, t.name)
            if why is None:
                selection.targets.append(replace(t, aliases=aliases))
                for note in found.notes:
                    notes.setdefault(note, []).append(key)
            else:
                skip(t.name, t.shape, why, aliases)
    for what, patterns in (("layouts", layouts), ("split", split)):
        for pattern in patterns:
            if pattern not in used:
                raise ValueError(f"{what} pattern {pattern!r} matches no weight")
    include.check_used(known)
    exclude.check_used(known)
    if problems:
        key, text = problems[0]
        more = [k for k, _ in problems[1:]]
        if more:
            text += f" ({len(more)} more need the same: {', '.join(more[:3])}{', ...' if len(more) > 3 else ''})"
        raise ValueError(text)
    for text, keys in notes.items():
        keys = list(dict.fromkeys(keys))
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        selection.notes.append(f"note: {text}: {shown}")
    return selection


def detect_convention(names: Iterable[str]) -> str:
    """``"flax"`` when the names have ``kernel`` leaves and no torch weights, else ``"torch"``."""
    names = list(names)
    flax = any(_flax_path(n)[-1] == "kernel" for n in names)
    torch = any(n.split(".")[-1] in _TORCH_WEIGHTS for n in names)
    return "flax" if flax and not torch else "torch"


def is_real_float(x) -> bool:
    """True for a real floating-point array of any array-API library."""
    try:
        return bool(array_namespace(x).isdtype(x.dtype, "real floating"))
    except Exception:  # not an array, or a dtype the namespace does not know (numpy void)
        return False


def apply_inplace(
    arrays,
    steps: int = 5,
    *,
    convention: str = "torch",
    include=None,
    exclude=None,
    method: str = "fire",
    scale="fire",
    layouts=None,
    split=None,
    dry_run: bool = False,
    is_array: Callable[[object], bool] | None = None,
    array_kind: str = "an array",
    context: Callable[[object], object] | None = None,
) -> Report:
    """FIRE on a mapping of names to mutable arrays, written back in place.

    The shared driver of :func:`fire_core.cupy.apply` (and usable on a dict of
    NumPy arrays): targets by :func:`targets`, projected by
    :func:`fire_core.reinit_many`, each result written with
    ``array[...] = new`` (or into its block). ``context(array)`` is entered
    around all work on that array's device (CuPy: make it current, for the
    checks, the math and the writes; see :func:`fire_core.reinit_many`).
    Every weight, on every device, is validated before any is written.
    Non-floating arrays are left alone (listed in ``Report.skipped`` with
    two or more axes, as is every tensor the rules do not take, with its
    reason); a value that ``is_array`` rejects, and an argument of the wrong
    type, is a TypeError. The same array object under two names is one tied
    weight: projected once, under the first of its names a rule takes, its
    row naming the others (``aliases``), and left alone when an ``exclude``
    pattern matches any of its names.
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(f"expected a mapping of names to arrays, got {type(arrays).__name__}")
    _check_options(steps, method, scale, dry_run)
    for key, value in arrays.items():
        if not isinstance(key, str):
            raise TypeError(f"array names must be strings, got {key!r}")
        if is_array is not None and not is_array(value):
            raise TypeError(f"{key}: expected {array_kind}, got {type(value).__module__}.{type(value).__qualname__}")
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    named = {}
    for key, value in arrays.items():
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            named[key] = value
            tied[key] = first.setdefault(id(value), key)
    selection = select(named, convention, include=include, exclude=exclude, layouts=layouts, split=split, tied=tied)
    chosen = selection.targets
    if not chosen:
        alone = "; ".join(f"{s['name']}: {s['reason']}" for s in selection.skipped[:4])
        raise ValueError(
            f"none of the {len(arrays)} arrays is a FIRE target under the {convention!r} convention and the given "
            f"include/exclude; nothing written (name the weights with layouts= to add them)"
            + (f"; left alone: {alone}{' ...' if len(selection.skipped) > 4 else ''}" if alone else "")
        )
    by_name = {t.name: t for t in chosen}

    def write(name, new):
        if not dry_run:
            t = by_name[name]
            named[t.source_key][... if t.index is None else t.index] = new

    weights = [
        (t.name, named[t.source_key] if t.index is None else named[t.source_key][t.index], t.layout) for t in chosen
    ]
    report = reinit_many(weights, steps=steps, method=method, scale=scale, write=write, context=context)
    report.applied = not dry_run
    return selection.annotate(report)


def _check_options(steps, method, scale, dry_run) -> None:
    """TypeErrors for arguments of the wrong type (their values are checked by the core)."""
    if isinstance(steps, bool) or not isinstance(steps, Integral):
        raise TypeError(f"steps must be an integer, got {type(steps).__name__} {steps!r}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a string ('fire', 'fast' or 'svd'), got {type(method).__name__} {method!r}")
    if not (scale is None or isinstance(scale, (str, Real))) or isinstance(scale, bool):
        raise TypeError(f"scale must be a rule name, a number or None, got {type(scale).__name__} {scale!r}")
    if not isinstance(dry_run, bool):
        raise TypeError(f"dry_run must be True or False, got {type(dry_run).__name__} {dry_run!r}")
