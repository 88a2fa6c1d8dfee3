"""Include/exclude patterns: globs matched against a weight's names and module prefixes.

Every entry point (the torch, Flax and CuPy adapters, the command, the
state-dict rules of :mod:`.conventions`) selects weights with these: a
pattern selects a weight when it matches the weight's full name, any of its
module prefixes, or a block's name, and a pattern that selects nothing is an
error naming the closest names (:class:`Patterns`).
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Iterable, Mapping


def _candidates(name: str, sep: str, extra: str | None = None) -> list[str]:
    """The full name, each module prefix (``a``, ``a.b``, ...), and ``extra``."""
    parts = name.split(sep)
    out = [sep.join(parts[:k]) for k in range(1, len(parts))] + [name]
    if extra is not None and extra != name:
        out.append(extra)
    return out


def glob_match(name: str, pattern: str) -> bool:
    """``fnmatch`` (``*``, ``?``, ``[seq]``), where brackets also match literally.

    Names in reports carry brackets (``attn.in_proj_weight[k]``,
    ``c_attn.weight[0]``), and a pattern copied from one must select exactly
    that name: read as a character class, ``[k]`` would match only ``...k``.
    So a pattern matches when either reading does: ``*.in_proj_weight[k]``
    selects the k block, ``Dense_[01]`` both modules. ``*`` also matches the
    separator.
    """
    if name == pattern or fnmatch.fnmatchcase(name, pattern):
        return True
    return "[" in pattern and fnmatch.fnmatchcase(name, pattern.replace("[", "[[]"))


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


def check_layouts(layouts) -> dict:
    """``layouts=`` of any adapter: a mapping of glob patterns to layout strings (or None: leave it alone)."""
    if layouts is None:
        return {}
    if not isinstance(layouts, Mapping):
        raise TypeError(f"layouts must be a mapping of glob patterns to layout strings, got {type(layouts).__name__}")
    for pat, lay in layouts.items():
        if not isinstance(pat, str) or not (lay is None or isinstance(lay, str)):
            raise TypeError(f"layouts must map glob strings to layout strings (or None), got {pat!r}: {lay!r}")
    return dict(layouts)


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


def _first_match(mapping: Mapping, names, sep: str):
    """The first (pattern, value) of ``mapping`` whose pattern matches a name (a name or a list) or its prefix."""
    cands = [c for n in ([names] if isinstance(names, str) else names) for c in _candidates(n, sep)]
    for pattern, value in mapping.items():
        if any(glob_match(c, pattern) for c in cands):
            return pattern, value
    return None, None
