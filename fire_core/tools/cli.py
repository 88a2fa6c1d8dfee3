"""The ``fire-core`` command (also ``python -m fire_core``): FIRE on checkpoint files.

``fire-core inspect FILE``
    A table of the FIRE targets in a checkpoint: name, shape, layout, DfI
    relative to the FIRE target (the Report's ``dfi_before``) and the
    smallest, median and largest singular value divided by the layer's
    reference scale (all 1 at the FIRE target). Writes nothing.
``fire-core project FILE -o OUT``
    Writes the projected checkpoint in the input's format and prints the
    Report. Tensors that are not targets, or not floating point, are copied
    bit for bit. Never touches the input; refuses an existing OUT without
    ``--force``; writes a temporary file next to OUT and renames it, so a
    failure leaves no partial output.
``fire-core demo``
    Runs :mod:`fire_core.demo`.
``fire-core check [--bench] [--output FILE.md]``
    The machine check after an install: ``project``, ``reinit`` (Linear,
    conv and attention layouts) and each installed adapter, with the three
    methods, on every backend and device present, in float64, float32 and
    bfloat16, against NumPy float64 (:func:`fire_core.testing.check`).
    Prints the agreement table; exit status 1 when something disagrees
    beyond its tolerance. ``--bench`` adds per device ``project``'s time
    against a bare matmul floor and exact SVD polar; ``--output`` writes it
    all as Markdown with the devices, library versions and TF32 settings.

Formats, told by the file's content (the extension must agree, see below):
``.safetensors`` (bfloat16 tensors need torch installed, since NumPy has no
bfloat16), ``.npz`` (loaded with ``allow_pickle=False``), and torch
``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``, zip or legacy pickle (loaded with
``torch.load(weights_only=True)``, which refuses any pickle that would run
code). A torch file may nest dicts (``{"model": {...}, "epoch": 3}``):
tensors are named by their keys joined with ``.`` (``model.fc.weight``),
the nesting and every non-tensor value are written back as they were, and
tensors that shared storage (tied weights) still share it; top-level
optimizer and scheduler state is copied unchanged (and said to be stale).
A Lightning checkpoint (``state_dict`` beside ``optimizer_states``,
``loops``, ...) has its ``state_dict`` projected, named as the
LightningModule names it, and everything else copied unchanged. The output
has the input's format: a legacy torch file stays legacy, and every tensor
that is not projected is copied bit for bit, shape included.

A file whose extension names another format than its content is refused,
saying what it is (renaming it is the fix: the output is named for its
format, and other tools trust the name). A truncated file says it is; a
pickle holding Python objects gets one message: fire-core loads only
tensors, and never unpickles objects.

Which tensors are targets, and in which layout, follows
:mod:`fire_core.conventions` (``--convention torch|flax``; the default
``auto`` picks ``flax`` when the names have ``kernel`` leaves and no torch
weights). Every tensor of two or more axes that is not projected is listed
under the report with the reason. Errors are one line on stderr with exit
status 1. Options are checked before any work: a bad value (``--steps -3``,
``check --size 0``), an output or plot path that cannot be written (its
folder missing or not writable, an existing file without ``--force``, the
input itself, a directory) or options that do not go together (``check
--size`` without ``--bench``) exit 2 at once with the subcommand's usage
line, as argparse does. Set ``FIRE_CORE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

import numpy as np

from .. import __version__
from ..core import conventions
from ..core._array import array_namespace, is_torch_array
from ..core.layout import parse_layout, scale_factor, to_matrices
from ..core.metrics import dfi
from ..core.plan import reinit_many
from ..core.polar import METHODS
from ..core.report import Report
from ._files import (
    Checkpoint,
    CliError,
    _atomic_write,
    _check_extension,
    _check_input,
    _load,
    _one_line,
    _output_problem,
)

__all__ = ["main"]

PROG = "fire-core"
PLOT_LAYERS = 24  # at most this many small panels in --plot


def _check_options(args, error: Callable[[str], None]) -> None:
    """Every option value and combination, checked before any work: ``error`` (argparse's, exit status 2) if bad.

    What needs the input's content (the output's extension against the input's format) is checked once the
    input is read, before any projection.
    """
    outputs = []  # (option, path)
    if args.command == "project":
        outputs.append(("-o/--output", args.output))
        if args.plot is not None:
            if not args.plot.lower().endswith(".png"):
                error(f"--plot {args.plot}: the plot is written as PNG; name it *.png")
            if os.path.abspath(args.plot) == os.path.abspath(args.output):
                error(f"--plot and -o/--output name the same file ({args.plot})")
            outputs.append(("--plot", args.plot))
    elif args.command == "check":
        if args.size is not None and args.size < 1:
            error(f"--size must be a positive integer, got {args.size}")
        if args.size is not None and not args.bench:
            error("--size sets the matrix size of --bench; pass --bench too")
        if args.force and args.output is None:
            error("--force overwrites the --output file; pass --output too")
        if args.output is not None:
            outputs.append(("--output", args.output))
    for option, path in outputs:
        problem = _output_problem(path, args.force, getattr(args, "file", None))
        if problem is not None:
            error(f"{option} {path}: {problem}")


# --------------------------------------------------------------------------- selection
# Option values are checked by argparse (type=): a bad one exits with status 2 and the usage line.


def _parse_steps(text: str) -> int:
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps (0 or more), got {text!r}") from None
    if steps < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps (0 or more), got {steps}")
    return steps


def _parse_scale(text: str):
    if text in ("fire", "variance", "norm"):
        return text
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected fire, variance, norm, none or a finite number, got {text!r}")
    return value


def _pair(text: str) -> tuple[str, str]:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern or not value:
        raise argparse.ArgumentTypeError(f"expected PATTERN=VALUE, got {text!r}")
    return pattern, value


def _parse_layout(text: str) -> tuple[str, str]:
    pattern, value = _pair(text)
    if not value.isalpha():
        raise argparse.ArgumentTypeError(f"expected PATTERN=LAYOUT with a layout of letters (oi, iohw), got {text!r}")
    return pattern, value


def _parse_split(text: str) -> tuple[str, int | tuple[int, ...]]:
    """``PAT=N`` (N equal blocks) or ``PAT=n1,n2,...`` (blocks of those sizes)."""
    pattern, value = _pair(text)
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected PATTERN=N (N equal blocks) or PATTERN=n1,n2,... (block sizes), all positive, got {text!r}"
        )
    return pattern, (sizes[0] if "," not in value else sizes)


def _select(ckpt: Checkpoint, args) -> tuple[conventions.Selection, str]:
    # A tied tensor is decided once, under the first of its names a rule takes; save() writes it to all.
    convention = args.convention
    if convention == "auto":
        convention = conventions.detect_convention(ckpt.arrays)
    try:
        selection = conventions.select(
            ckpt.arrays,
            convention,
            include=args.include,
            exclude=args.exclude,
            layouts=dict(args.layout or ()),
            split=dict(args.split or ()),
            tied=ckpt.aliases,
        )
    except (TypeError, ValueError) as e:
        raise CliError(_one_line(e)) from None
    return selection, convention


def _block(ckpt: Checkpoint, t):
    a = ckpt.arrays[t.source_key]
    return a if t.index is None else a[t.index]


def _spectrum(w, layout: str) -> np.ndarray:
    """Singular values of each tap's matrix over the reference scale, pooled and sorted (float64)."""
    if is_torch_array(w):
        w = w.detach().to(device="cpu", dtype=sys.modules["torch"].float64).numpy()
    w = np.asarray(w, dtype=np.float64)
    ref = scale_factor("fire", parse_layout(layout, w.shape))
    return np.sort(np.linalg.svd(to_matrices(w, layout) / ref, compute_uv=False).ravel())[::-1]


def _dfi_to_target(w, layout: str) -> float:
    """DfI of the weight's matrices over the reference scale: the Report's ``dfi_before``."""
    if is_torch_array(w):
        w = w.detach().to(device="cpu", dtype=sys.modules["torch"].float64).numpy()
    w = np.asarray(w, dtype=np.float64)
    ref = scale_factor("fire", parse_layout(layout, w.shape))
    return float(np.sum(dfi(to_matrices(w, layout) / ref)))


def _table(header: list[str], rows: list[list[str]], left: int) -> str:
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    lines = []
    for j, r in enumerate([header, *rows]):
        lines.append("  ".join(c.ljust(w) if k < left else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------- commands


def _left_alone(selection: conventions.Selection) -> list[str]:
    """The lines a Report prints for the tensors left alone and the rules' notes."""
    return selection.annotate(Report(method="fire", steps=0, scale="fire")).skipped_lines() + selection.notes


def _cmd_inspect(args) -> int:
    content = _check_input(args.file)
    ckpt = _load(args.file, content)
    selection, convention = _select(ckpt, args)
    chosen = selection.targets
    print(f"{args.file}: {len(ckpt.arrays)} tensors, {len(chosen)} FIRE targets (convention {convention})")
    if chosen:
        rows = []
        for t in chosen:
            w = _block(ckpt, t)
            s = _spectrum(w, t.layout)
            lay = parse_layout(t.layout, t.shape)
            before = _dfi_to_target(w, t.layout)
            name = f"{t.name} (= {', '.join(t.aliases)})" if t.aliases else t.name
            rows.append(
                [
                    name, "x".join(map(str, t.shape)), t.layout, str(w.dtype).replace("torch.", ""),
                    f"{before:.4g}", f"{before / (lay.taps * min(lay.d_out, lay.d_in)):.3g}",
                    f"{s[-1]:.3g}", f"{np.median(s):.3g}", f"{s[0]:.3g}",
                ]
            )
        header = ["name", "shape", "layout", "dtype", "DfI", "DfI/n", "s_min", "s_median", "s_max"]
        print(_table(header, rows, left=4))
        print("DfI: deviation from isometry of the weight over its FIRE scale (0 at the FIRE target); "
              "s: singular values over that scale (1 at the target)")
    for line in _left_alone(selection) + ckpt.notes:
        print(line)
    return 0


def _cmd_project(args) -> int:
    content = _check_input(args.file)
    _check_extension(args.output, content.format)
    if args.plot:
        pyplot = _pyplot()
    ckpt = _load(args.file, content)
    selection, convention = _select(ckpt, args)
    chosen = selection.targets
    if not chosen:
        alone = "; ".join(f"{s['name']}: {s['reason']}" for s in selection.skipped[:3])
        raise CliError(
            f"{args.file}: none of its {len(ckpt.arrays)} tensors is a FIRE target under the {convention} "
            "convention and the given --include/--exclude; nothing written"
            + (f" (left alone: {alone}{'; ...' if len(selection.skipped) > 3 else ''})" if alone else "")
        )
    blocks = {}
    report = reinit_many(
        [(t.name, _block(ckpt, t), t.layout) for t in chosen],
        steps=args.steps, method=args.method, scale=args.scale, write=blocks.__setitem__,
    )
    tensors = dict(ckpt.arrays)
    for t in chosen:
        if t.index is None:
            tensors[t.source_key] = blocks[t.name]
            continue
        if tensors[t.source_key] is ckpt.arrays[t.source_key]:  # first block: start from a copy
            tensors[t.source_key] = array_namespace(ckpt.arrays[t.source_key]).asarray(
                ckpt.arrays[t.source_key], copy=True
            )
        tensors[t.source_key][t.index] = blocks[t.name]
    try:
        _atomic_write(args.output, lambda tmp: ckpt.save(tmp, tensors))
    except OSError as e:
        raise CliError(f"{args.output}: cannot write: {e.strerror or _one_line(e)}") from None
    selection.annotate(report)
    report.notes.extend(ckpt.notes)
    report.notes.append(f"convention {convention}; wrote {args.output}")
    if args.plot:
        _plot(pyplot, args.plot, [(t.name, _block(ckpt, t), blocks[t.name], t.layout) for t in chosen])
        report.notes.append(f"wrote {args.plot}")
    print(report)
    return 0


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install 'fire-core[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _plot(pyplot, path: str, layers: list) -> None:
    """Singular values over the reference scale, before (grey) and after (blue), one panel a layer."""
    shown = layers[:PLOT_LAYERS]
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = pyplot.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, old, new, layout) in zip(axes.flat, shown):
        for w, color, label in ((old, "0.55", "before"), (new, "tab:blue", "after")):
            s = _spectrum(w, layout)
            ax.plot(np.linspace(0, 1, s.size), s, color=color, label=label)
        ax.set_title(name if len(name) <= 40 else "..." + name[-37:], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    more = f" (first {len(shown)} of {len(layers)} layers)" if len(layers) > len(shown) else ""
    fig.suptitle(f"singular values / FIRE scale{more}", fontsize=9)
    fig.supxlabel("rank (normalized)", fontsize=8)
    fig.tight_layout()
    try:
        _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        pyplot.close(fig)


def _cmd_check(args) -> int:
    from . import testing

    result = testing.check()
    print(result)
    sections = ["## Agreement", "", "```text", str(result), "```"]
    if args.bench:
        sizes = {name: args.size for name in testing.BACKENDS} if args.size is not None else None
        table = testing.bench_table(testing.bench(sizes))
        print()
        print(table)
        sections += ["", "## Speed (float32)", "", "```text", table, "```"]
    if args.output:
        env = "\n".join(f"* {line}" for line in testing.environment())
        text = f"# fire-core check\n\n{env}\n\n" + "\n".join(sections) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        try:
            _atomic_write(args.output, write)
        except OSError as e:
            raise CliError(f"{args.output}: cannot write: {e.strerror or _one_line(e)}") from None
    return 0 if result.ok else 1


def _cmd_demo(argv: list[str]) -> int:
    try:
        from .. import demo  # by its public path, fire_core.demo
    except ModuleNotFoundError as e:
        if e.name in ("fire_core.demo", "fire_core.tools.demo", None):
            raise CliError("this installation of fire_core has no demo (fire_core/demo.py is missing)") from None
        raise CliError(f"the demo needs {e.name}: pip install 'fire-core[demo]'") from None
    result = demo.main(argv)
    return result if isinstance(result, int) else 0


# --------------------------------------------------------------------------- argument parsing


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and each subcommand's own (whose ``error`` prints its usage line and exits 2)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="FIRE (Frobenius-Isometry REinitialization) on checkpoint files "
        "(.safetensors, .npz, torch .pt/.pth/.bin, Lightning .ckpt).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,project,check,demo}")

    def selection(p):
        p.add_argument("file", help="checkpoint file: .safetensors, .npz, .pt, .pth, .bin or .ckpt")
        p.add_argument("--convention", choices=("auto", *conventions.CONVENTIONS), default="auto",
                       help="naming convention of the tensors (default: auto-detect)")
        p.add_argument("--include", action="append", metavar="PAT",
                       help="glob on tensor names or module prefixes to select (repeatable)")
        p.add_argument("--exclude", action="append", metavar="PAT", help="glob to leave out (repeatable)")
        p.add_argument("--layout", action="append", metavar="PAT=LAYOUT", type=_parse_layout,
                       help="layout for matching weights, e.g. 'decoder.up*=iohw' for ConvTranspose2d (repeatable)")
        p.add_argument("--split", action="append", metavar="PAT=N|SIZES", type=_parse_split,
                       help="project a fused weight as N equal blocks along its output axis, or as blocks of the "
                            "given sizes: '*.c_attn=3', '*.qkv_proj=3072,1024,1024' (repeatable)")

    subs = {}
    p = subs["inspect"] = sub.add_parser("inspect", help="show each FIRE target's distance from isometry; writes nothing")
    selection(p)
    p = subs["project"] = sub.add_parser("project", help="write the FIRE-projected checkpoint")
    selection(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file, same format as the input")
    p.add_argument("--steps", type=_parse_steps, default=5, help="Newton-Schulz steps (default 5, the reference's)")
    p.add_argument("--method", choices=METHODS, default="fire", help="fire (reference), fast or svd")
    p.add_argument("--scale", type=_parse_scale, default="fire",
                   help="fire (default), variance, norm, none or a number")
    p.add_argument("--force", action="store_true", help="overwrite OUT (and the plot) if it exists")
    p.add_argument("--plot", metavar="FILE.png", help="also plot singular values before/after per layer")
    p = subs["check"] = sub.add_parser("check", help="check that every backend and device here agrees with NumPy float64")
    p.add_argument("--bench", action="store_true", help="also time project against a matmul floor and SVD polar")
    p.add_argument("--size", type=int, metavar="N",
                   help="matrix size for --bench, N >= 1 (default 1024 on CPUs, 4096 on GPUs)")
    p.add_argument("--output", metavar="FILE.md", help="also write the tables, devices, versions and TF32 setting")
    p.add_argument("--force", action="store_true", help="overwrite FILE.md if it exists")
    sub.add_parser("demo", help="run the built-in demonstration (fire-core demo --help)", add_help=False)
    return parser, subs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["demo"]:
            return _cmd_demo(argv[1:])
        parser, subs = _parser()
        args = parser.parse_args(argv)
        _check_options(args, subs[args.command].error)  # before any work: a bad option exits 2 at once
        return {"inspect": _cmd_inspect, "project": _cmd_project, "check": _cmd_check}[args.command](args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bad weight (NaN, dtype) names itself; anything else stays one line
        if os.environ.get("FIRE_CORE_DEBUG"):
            raise
        what = "" if isinstance(e, (ValueError, TypeError)) else f"{type(e).__name__}: "
        print(f"{PROG}: error: {what}{_one_line(e)}", file=sys.stderr)
        return 1
