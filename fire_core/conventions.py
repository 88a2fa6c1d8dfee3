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
    ``*.k_proj_weight``, ``*.v_proj_weight`` are ``"oi"``. Skipped: anything
    with fewer than 2 axes (biases, norms, running statistics), names not
    ending in one of those, and **embeddings**: a weight whose owning module
    (the name component before ``weight``) contains ``embed`` in any case, or
    is ``wte`` / ``wpe`` (GPT-2). So ``embed_tokens.weight`` and
    ``embeddings.word_embeddings.weight`` are skipped, but a patch-embedding
    convolution ``patch_embed.proj.weight`` is projected, as the torch adapter
    does for an ``nn.Conv2d``. Exclude other tables (T5's ``shared``) by name.

    A state dict cannot tell ``ConvTranspose2d`` (weight ``(in, out, kh, kw)``)
    from ``Conv2d`` by shape: name them in ``layouts``, e.g.
    ``layouts={"decoder.up*": "iohw"}``. The same goes for weights stored
    transposed, such as Hugging Face GPT-2's ``Conv1D`` (``{"*.c_attn":
    "io", ...}``).

``"flax"`` (names joined by ``/``, or by ``.`` when there is no ``/``)
    As :mod:`fire_core.flax`: leaves named ``kernel`` (a trailing nnx
    ``value`` component is ignored); 2 axes -> ``"io"`` (Dense); 3 axes under
    ``query``, ``key`` or ``value`` of a module that has all of ``query``,
    ``key``, ``value`` and ``out`` -> ``"ioo"``, under its ``out`` ->
    ``"iio"`` (attention, heads merged into one matrix); under a module named
    ``DenseGeneral_*`` / ``LinearGeneral_*`` -> ``"i"`` then ``"o"`` for
    every other axis; otherwise 3, 4, 5 axes -> ``"wio"``, ``"hwio"``,
    ``"dhwio"`` (Conv). ``embedding``, ``scale``, ``bias`` and the rest are
    skipped.

A weight with more than 5 axes that the rules would take has no default
layout: a ValueError asks for ``layouts`` or ``exclude``.

Options, for both conventions:

* ``include`` / ``exclude``: a glob pattern, a list of them, or a callable
  ``f(name) -> bool``. A pattern selects a weight when it matches the
  weight's full name, any of its module prefixes (``layer2`` selects
  ``layer2.0.conv1.weight``; ``*`` also matches the separator) or a block's
  name. Wildcards are ``*`` and ``?``; brackets are literal, so a name
  copied from a report (``attn.in_proj_weight[k]``, ``*.in_proj_weight[k]``)
  selects exactly that block. A callable receives the target name (the
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

A ``layouts`` or ``split`` pattern that matches no weight is a ValueError.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ._array import array_namespace
from .layout import parse_layout
from .plan import reinit_many
from .report import Report

__all__ = [
    "CONVENTIONS", "Target", "targets", "matches", "glob_match", "Patterns", "check_patterns",
    "detect_convention", "is_real_float", "apply_inplace",
]

CONVENTIONS = ("torch", "flax")

_TORCH_CONV = {2: "oi", 3: "oiw", 4: "oihw", 5: "oidhw"}
_TORCH_WEIGHTS = ("weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_weight")
_TORCH_EMBEDDINGS = ("wte", "wpe")
_FLAX_CONV = {2: "io", 3: "wio", 4: "hwio", 5: "dhwio"}
_QKV = ("q", "k", "v")
_ATTENTION = frozenset({"query", "key", "value", "out"})


@dataclass(frozen=True)
class Target:
    """One weight FIRE projects: ``array[index]`` of ``source_key``, in ``layout``.

    ``index`` is None for a whole array, else a tuple of slices selecting a
    block of a fused weight; ``shape`` is the shape of that block.
    """

    name: str
    source_key: str
    index: tuple | None
    layout: str
    shape: tuple[int, ...]


def _separator(name: str, convention: str) -> str:
    return "/" if convention == "flax" and "/" in name else "."


def _candidates(name: str, sep: str, extra: str | None = None) -> list[str]:
    """The full name, each module prefix (``a``, ``a.b``, ...), and ``extra``."""
    parts = name.split(sep)
    out = [sep.join(parts[:k]) for k in range(1, len(parts))] + [name]
    if extra is not None and extra != name:
        out.append(extra)
    return out


def glob_match(name: str, pattern: str) -> bool:
    """``fnmatch`` with ``*`` and ``?`` as wildcards and brackets literal.

    Names in reports carry brackets (``attn.in_proj_weight[k]``, ``c_attn.weight[0]``),
    and a pattern copied from one must select exactly that name, not read
    ``[k]`` as a character class. ``*`` also matches the separator.
    """
    return name == pattern or fnmatch.fnmatchcase(name, pattern.replace("[", "[[]"))


def check_patterns(patterns, what: str):
    """An include/exclude argument as None, a callable or a list of glob strings (TypeError otherwise)."""
    if patterns is None or callable(patterns):
        return patterns
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (bytes, Mapping)) or not isinstance(patterns, Iterable):
        raise TypeError(
            f"{what}: expected a glob pattern, a list of them or a callable, got {type(patterns).__name__} "
            f"{patterns!r}"
        )
    patterns = list(patterns)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what}: expected glob strings or a callable (a glob pattern or a list of them), got {bad!r}")
    return patterns


def matches(patterns, name, sep: str = ".", *, target_name: str | None = None) -> bool:
    """True when a glob in ``patterns`` matches ``name`` or one of its module prefixes.

    ``patterns`` is a pattern, a list of them, or a callable that receives
    ``target_name`` (default ``name``). ``name`` may be a list of names (a
    weight known under several: tied, or seen through a wrapper); any of them
    counts.
    """
    names = [name] if isinstance(name, str) else list(name)
    if callable(patterns):
        return bool(patterns(target_name if target_name is not None else names[0]))
    if isinstance(patterns, str):
        patterns = [patterns]
    cands = [c for n in names for c in _candidates(n, sep, target_name)]
    return any(glob_match(c, p) for p in patterns for c in cands)


class Patterns:
    """A checked include/exclude argument that remembers which of its patterns selected something.

    Every entry point uses one per argument: :meth:`hit` tests a weight
    (under all its names, their module prefixes and its block name) and
    records the patterns that matched; :meth:`check_used` then raises a
    ValueError naming each pattern that matched no weight, with the closest
    names, so a typo never passes in silence. A callable is called by the
    adapter with its own arguments (:attr:`func`) and is not tracked.
    """

    def __init__(self, spec, what: str):
        spec = check_patterns(spec, what)
        self.what = what
        self.func = spec if callable(spec) else None
        self.patterns = [] if spec is None or callable(spec) else spec
        self.used: set[str] = set()

    @property
    def given(self) -> bool:
        return self.func is not None or bool(self.patterns)

    def hit(self, names, sep: str = ".", *, target_name: str | None = None) -> bool:
        """Whether a pattern matches one of ``names`` (a name or a list), a prefix of one, or ``target_name``."""
        names = [names] if isinstance(names, str) else list(names)
        cands = [c for n in names for c in _candidates(n, sep, target_name)]
        found = False
        for p in self.patterns:
            if any(glob_match(c, p) for c in cands):
                self.used.add(p)
                found = True
        return found

    def check_used(self, known, what_known: str = "weight FIRE would project") -> None:
        """ValueError for the patterns that matched nothing, with the closest of ``known`` names."""
        missing = [p for p in self.patterns if p not in self.used]
        if not missing:
            return
        known = list(dict.fromkeys(known))
        lines = []
        for p in missing:
            close = difflib.get_close_matches(p, known, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            lines.append(f"{self.what} pattern {p!r} matches no {what_known}{hint}")
        raise ValueError("; ".join(lines))


def _first_match(mapping: Mapping, name: str, sep: str):
    cands = _candidates(name, sep)
    for pattern, value in mapping.items():
        if any(glob_match(c, pattern) for c in cands):
            return pattern, value
    return None, None


def _default_torch(name: str, shape: tuple[int, ...], siblings=None):
    """(layout, block labels) by the torch rules, or None when not a target."""
    parts = name.split(".")
    leaf, owner = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if leaf not in _TORCH_WEIGHTS or len(shape) < 2:
        return None
    if leaf == "weight":
        if "embed" in owner.lower() or owner in _TORCH_EMBEDDINGS:
            return None
        if len(shape) not in _TORCH_CONV:
            raise ValueError(
                f"{name}: a weight of shape {shape} has no default layout; pass layouts={{{name!r}: ...}} "
                f"or exclude it"
            )
        return _TORCH_CONV[len(shape)], None
    if len(shape) != 2:
        return None
    return "oi", (_QKV if leaf == "in_proj_weight" else None)


def _flax_path(name: str) -> list[str]:
    parts = name.split(_separator(name, "flax"))
    if len(parts) > 1 and parts[-1] == "value" and parts[-2] == "kernel":
        parts = parts[:-1]  # nnx: path/to/kernel/value
    return parts


def _default_flax(name: str, shape: tuple[int, ...], siblings=None):
    parts = _flax_path(name)
    if parts[-1] != "kernel" or len(shape) < 2:
        return None
    owner = parts[-2] if len(parts) > 1 else ""
    ndim = len(shape)
    if ndim == 2:
        return "io", None
    attention = siblings is None or _ATTENTION <= siblings.get(tuple(parts[:-2]), set())
    if ndim == 3 and owner in _ATTENTION and attention:
        return ("iio" if owner == "out" else "ioo"), None
    if owner.startswith(("DenseGeneral_", "LinearGeneral_")):
        return "i" + "o" * (ndim - 1), None
    if ndim not in _FLAX_CONV:
        raise ValueError(
            f"{name}: a kernel of shape {shape} has no default layout; pass layouts={{{name!r}: ...}} or exclude it"
        )
    return _FLAX_CONV[ndim], None


def _split_spec(pattern, spec):
    """A ``split`` value -> ("count", k) or ("sizes", (n1, n2, ...))."""
    if isinstance(spec, bool) or not (
        isinstance(spec, int) or (isinstance(spec, (tuple, list)) and all(isinstance(s, int) for s in spec))
    ):
        raise ValueError(f"split: {pattern!r} must map to a positive number of blocks or a list of sizes, got {spec!r}")
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


def targets(
    named_shapes,
    convention: str = "torch",
    *,
    include=None,
    exclude=None,
    layouts: Mapping[str, str | None] | None = None,
    split: Mapping[str, int] | None = None,
) -> list[Target]:
    """The FIRE targets among flat named arrays, in their order (see the module docstring).

    ``named_shapes`` maps names to shapes (or to anything with ``.shape``), or
    is an iterable of ``(name, shape)`` pairs. The rules read names and
    shapes only: drop non-floating arrays before calling. A ``layouts`` or
    ``split`` pattern that matches no weight, and an ``include`` or
    ``exclude`` pattern that matches no weight the rules would project, are
    a ValueError naming the closest names (a typo would otherwise pass
    silently).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}")
    include, exclude = Patterns(include, "include"), Patterns(exclude, "exclude")
    layouts = dict(layouts or {})
    for pattern, lay in layouts.items():
        if not isinstance(pattern, str) or not (lay is None or isinstance(lay, str)):
            raise TypeError(f"layouts must map glob patterns to layout strings (or None), got {pattern!r}: {lay!r}")
    split = {pattern: _split_spec(pattern, n) for pattern, n in (split or {}).items()}
    rule = _default_torch if convention == "torch" else _default_flax
    items = list(named_shapes.items() if isinstance(named_shapes, Mapping) else named_shapes)
    siblings: dict[tuple, set] = {}
    if convention == "flax":
        for key, _ in items:
            parts = _flax_path(key)
            if len(parts) >= 2:
                siblings.setdefault(tuple(parts[:-2]), set()).add(parts[-2])
    used = set()
    out: list[Target] = []
    known: list[str] = []
    for key, shape in items:
        shape = tuple(int(s) for s in getattr(shape, "shape", shape))
        sep = _separator(key, convention)
        pattern, override = _first_match(layouts, key, sep)
        if pattern is not None:
            found = rule(key, shape, siblings)
            if override is None:  # named to be skipped
                used.add(pattern)
                continue
            if found is None and len(override) != len(shape):
                continue  # a pattern adds a tensor only where its layout fits (`up.*` skips `up.0.bias`)
            if len(override) != len(shape):
                raise ValueError(
                    f"{key}: layouts pattern {pattern!r} gives {override!r}, which does not fit shape {shape}"
                )
            parse_layout(override, shape, key)
            used.add(pattern)
            found = (override, found[1] if found is not None and found[0] == override else None)
        else:
            found = rule(key, shape, siblings)
        if found is None:
            continue
        layout, labels = found
        pattern, spec = _first_match(split, key, sep)
        if pattern is not None:
            used.add(pattern)
            labels = spec
        for t in _blocks(key, shape, layout, labels):
            known += [key, t.name]
            # Both are tested on every target, so each pattern's use is known (a pattern that selects
            # nothing is an error below); a callable receives the target name.
            keep = include.func(t.name) if include.func else (include.hit(key, sep, target_name=t.name)
                                                              if include.patterns else True)
            drop = exclude.func(t.name) if exclude.func else exclude.hit(key, sep, target_name=t.name)
            if keep and not drop:
                out.append(t)
    for what, patterns in (("layouts", layouts), ("split", split)):
        for pattern in patterns:
            if pattern not in used:
                raise ValueError(f"{what} pattern {pattern!r} matches no weight")
    include.check_used(known)
    exclude.check_used(known)
    return out


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
    Non-floating arrays are left alone; a value that ``is_array`` rejects is a
    TypeError. The same array object under two names is projected once,
    under the first.
    """
    if not isinstance(arrays, Mapping):
        raise TypeError(f"expected a mapping of names to arrays, got {type(arrays).__name__}")
    for key, value in arrays.items():
        if not isinstance(key, str):
            raise TypeError(f"array names must be strings, got {key!r}")
        if is_array is not None and not is_array(value):
            raise TypeError(f"{key}: expected {array_kind}, got {type(value).__module__}.{type(value).__qualname__}")
    seen: set[int] = set()
    floats = {}
    for key, value in arrays.items():
        if is_real_float(value) and id(value) not in seen:
            seen.add(id(value))
            floats[key] = value
    chosen = targets(floats, convention, include=include, exclude=exclude, layouts=layouts, split=split)
    if not chosen:
        raise ValueError(
            f"none of the {len(arrays)} arrays is a FIRE target under the {convention!r} convention and the given "
            "include/exclude; nothing written (name the weights with layouts= to add them)"
        )
    by_name = {t.name: t for t in chosen}

    def write(name, new):
        if not dry_run:
            t = by_name[name]
            floats[t.source_key][... if t.index is None else t.index] = new

    weights = [
        (t.name, floats[t.source_key] if t.index is None else floats[t.source_key][t.index], t.layout) for t in chosen
    ]
    report = reinit_many(weights, steps=steps, method=method, scale=scale, write=write, context=context)
    report.applied = not dry_run
    return report
