"""Report: what a FIRE call did to each weight, as rows and as a readable table."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Report"]

# (key, header, format) of the table columns, in order.
_COLUMNS = (
    ("name", "name", "{}"),
    ("shape", "shape", "{}"),
    ("layout", "layout", "{}"),
    ("scale", "scale", "{:.4g}"),
    ("sfe", "SFE", "{:.4g}"),
    ("dfi_before", "DfI before", "{:.4g}"),
    ("dfi_after", "DfI after", "{:.4g}"),
    ("iso_after", "DfI/n after", "{:.3g}"),
    ("drift", "drift", "{:.3g}"),  # shown only when the rows have it (a probe with per-layer drift)
)


SKIPPED_SHOWN = 6  # names per reason in str(report); Report.skipped has them all


@dataclass
class Report:
    """Per-weight results of one FIRE call.

    ``rows`` holds one dict per projected weight with ``name``, ``shape``,
    ``layout``, ``taps`` (matrices in the weight), ``n`` (the smaller matrix
    side), ``stack`` (independent layers the weight holds: 1, or the size of
    its stack axes), ``scale`` (the factor applied; for ``"norm"`` on a
    stacked weight, its first layer's), ``sfe`` (``||old - new||_F^2`` of
    the weight as written), ``dfi_before`` (DfI of the old matrices divided
    by the reference scale, so a weight already at the FIRE target reads 0)
    and ``dfi_after`` (DfI of the projected matrices before scaling: how close
    the projection came to isometry). DfI is summed over a weight's taps;
    divide by ``taps * n`` for a per-direction figure (``iso_after``).

    Both numbers describe the weight as stored, after the cast to its dtype:
    ``new`` in ``sfe`` is the written weight, and ``dfi_after`` is measured
    on the written matrices divided by the factor applied (for float32 and
    float64 weights that is the projection itself). So a bfloat16 weight
    shows its rounding: an exact ``svd`` factor written in bfloat16 has DfI
    after 1e-4 (32 x 64) to 1e-3 (256 x 256), not the float32 projection's
    1e-11 to 1e-9. Both are computed in float32 or float64, whatever the
    weight's dtype.

    ``drift`` (None unless a probe was given): the relative change of the
    model's outputs on the probe, ``||f_after(x) - f_before(x)||_F /
    ||f_before(x)||_F`` (:func:`fire_core.metrics.drift`), the function-level
    counterpart of SFE. Adapters that measure it per layer add a ``drift``
    key to the rows: the same ratio for the output of the module owning the
    weight. A weight known under several names (tied) is one row, named by
    its first name, with the others in an ``aliases`` key.

    ``skipped``: one dict per weight of two or more dimensions that was *not*
    projected, with ``name``, ``shape`` and ``reason`` (an embedding, a norm,
    frozen, excluded by a pattern, ...): nothing is left alone in silence.
    ``str(report)`` lists them under the table, grouped by reason. ``notes``
    are further lines printed under the table (selection notes, normalization
    statistics that went stale).
    """

    method: str
    steps: int
    scale: object
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    applied: bool = True
    drift: float | None = None
    skipped: list[dict] = field(default_factory=list)
    measured: bool = True  # False for report=False: weights written, no row measured
    projected: int | None = None  # weights written (or, in a dry run, that would be); None: one per row

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            for row in self.rows:
                if row["name"] == key:
                    return row
            raise KeyError(key)
        return self.rows[key]

    @property
    def names(self) -> list[str]:
        return [row["name"] for row in self.rows]

    def skip(self, name: str, shape, reason: str, aliases=()) -> None:
        """Record a weight left alone, and why (``aliases``: its other names, when tied)."""
        entry = {"name": name, "shape": tuple(int(d) for d in shape), "reason": reason}
        if aliases:
            entry["aliases"] = list(aliases)
        self.skipped.append(entry)

    def metrics(self, prefix: str = "fire/") -> dict[str, float]:
        """The numbers a training integration logs at a firing, one convention for all of them.

        ``weights`` (projected) and ``skipped`` always; ``sfe``,
        ``dfi_before`` and ``dfi_after`` (totals over the rows) only when the
        call measured them (not with ``report=False``, where they would read
        0 while the weights moved); ``drift`` when a probe was given.
        """
        out = {"weights": float(len(self.rows) if self.projected is None else self.projected),
               "skipped": float(len(self.skipped))}
        if self.measured:
            out.update({key: self.total(key) for key in ("sfe", "dfi_before", "dfi_after")})
        if self.drift is not None:
            out["drift"] = float(self.drift)
        return {prefix + key: value for key, value in out.items()}

    def total(self, key: str) -> float:
        """Sum of a numeric column over all rows."""
        return float(sum(row[key] for row in self.rows))

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "steps": self.steps,
            "scale": self.scale,
            "applied": self.applied,
            "drift": self.drift,
            "rows": [dict(row, shape=list(row["shape"])) for row in self.rows],
            "skipped": [dict(s, shape=list(s["shape"])) for s in self.skipped],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        per_layer = any("drift" in row for row in self.rows)
        columns = [c for c in _COLUMNS if per_layer or c[0] != "drift"]
        cells = [[h for _, h, _ in columns]]
        for row in self.rows:
            r = dict(row, shape="x".join(map(str, row["shape"])), iso_after=row["dfi_after"] / (row["taps"] * row["n"]))
            if row.get("aliases"):
                r["name"] = f"{row['name']} (= {', '.join(row['aliases'])})"
            cells.append(["-" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in columns])
        widths = [max(len(line[k]) for line in cells) for k in range(len(columns))]
        lines = []
        for j, line in enumerate(cells):
            text = "  ".join(c.ljust(w) if k < 3 else c.rjust(w) for k, (c, w) in enumerate(zip(line, widths)))
            lines.append(text.rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        verb = "projected" if self.applied else "would project (dry run)"
        steps = "" if self.method == "svd" else f", steps={self.steps}"
        lines.append(
            f"FIRE method={self.method}{steps}, scale={self.scale!r}: {verb} {len(self.rows)} weights, "
            f"total SFE {self.total('sfe'):.4g}"
        )
        if self.drift is not None:
            lines.append(f"function drift on the probe: {self.drift:.4g} (||f_after(x) - f_before(x)|| / ||f_before(x)||)")
        lines.extend(self.skipped_lines())
        lines.extend(self.notes)
        return "\n".join(lines)

    def skipped_lines(self) -> list[str]:
        """The weights left alone, one line per reason: ``left alone (reason): a (3x4), b (8x8)``."""
        by_reason: dict[str, list[str]] = {}
        for s in self.skipped:
            also = f" (= {', '.join(s['aliases'])})" if s.get("aliases") else ""
            by_reason.setdefault(s["reason"], []).append(f"{s['name']}{also} ({'x'.join(map(str, s['shape']))})")
        lines = []
        for reason, names in by_reason.items():
            shown = ", ".join(names[:SKIPPED_SHOWN]) + (
                f" and {len(names) - SKIPPED_SHOWN} more (Report.skipped lists all)" if len(names) > SKIPPED_SHOWN else ""
            )
            lines.append(f"left alone ({reason}): {shown}")
        return lines

    def _repr_markdown_(self) -> str:  # notebooks
        return "```\n" + str(self) + "\n```"
