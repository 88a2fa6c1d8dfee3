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

Formats, chosen by the file extension: ``.safetensors`` (bfloat16 tensors
need torch installed, since NumPy has no bfloat16), ``.npz`` (loaded with
``allow_pickle=False``), and torch ``.pt`` / ``.pth`` / ``.bin`` (loaded
with ``torch.load(weights_only=True)``, which refuses any pickle that would
run code). A torch file may nest dicts (``{"model": {...}, "epoch": 3}``):
tensors are named by their keys joined with ``.`` (``model.fc.weight``),
the nesting and every non-tensor value are written back as they were, and
tensors that shared storage (tied weights) still share it.

Which tensors are targets, and in which layout, follows
:mod:`fire_core.conventions` (``--convention torch|flax``; the default
``auto`` picks ``flax`` when the names have ``kernel`` leaves and no torch
weights). Errors are one line on stderr with exit status 1 (2 for usage);
set ``FIRE_CORE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import __version__, conventions
from ._array import array_namespace, is_torch_array
from .layout import parse_layout, scale_factor, to_matrices
from .metrics import dfi
from .plan import reinit_many
from .polar import METHODS

__all__ = ["main"]

PROG = "fire-core"
FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".pt": "torch", ".pth": "torch", ".bin": "torch"}
PLOT_LAYERS = 24  # at most this many small panels in --plot


class CliError(Exception):
    """A problem the user can fix, reported as one line without a traceback."""


# --------------------------------------------------------------------------- files


@dataclass
class Checkpoint:
    """A loaded file: flat named tensors, and how to write a changed copy in the same format."""

    format: str
    arrays: dict  # flat name -> numpy array or torch tensor
    save: Callable[[str, dict], None]  # (path, {name: new tensor}) -> writes all tensors
    notes: list = field(default_factory=list)
    aliases: dict = field(default_factory=dict)  # name -> earlier name of the same tensor (tied weights)


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        known = ", ".join(FORMATS)
        raise CliError(f"{path}: unsupported file type {ext or '(no extension)'!r}; expected one of {known}")
    return FORMATS[ext]


def _check_input(path: str) -> str:
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory, not a checkpoint file")
    fmt = _format_of(path)
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
    except OSError as e:
        raise CliError(f"{path}: cannot read: {e.strerror or e}") from None
    if empty:
        raise CliError(f"{path}: is empty (0 bytes)")
    return fmt


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load(path: str, fmt: str) -> Checkpoint:
    loader = {"safetensors": _load_safetensors, "npz": _load_npz, "torch": _load_torch}[fmt]
    ckpt = loader(path)
    if not ckpt.arrays:
        raise CliError(f"{path}: holds no tensors")
    return ckpt


def _load_safetensors(path: str) -> Checkpoint:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CliError("reading .safetensors needs the safetensors package: pip install 'fire-core[files]'") from None
    try:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
            metadata = f.metadata()
            dtypes = {f.get_slice(k).get_dtype() for k in keys}
    except Exception as e:
        raise CliError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    numpy_ok = not any(d == "BF16" or d.startswith("F8") for d in dtypes)
    if numpy_ok:
        from safetensors.numpy import load_file, save_file
    else:
        try:
            import torch  # noqa: F401  (safetensors.torch needs it)
            from safetensors.torch import load_file, save_file
        except ImportError:
            raise CliError(
                f"{path}: holds bfloat16/float8 tensors, which NumPy cannot hold; "
                "install torch (pip install 'fire-core[torch]') to process it"
            ) from None
    try:
        arrays = load_file(path)
    except Exception as e:
        raise CliError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    arrays = {k: arrays[k] for k in keys}  # the file's order

    def save(out: str, tensors: dict) -> None:
        if numpy_ok:
            tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        else:
            tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, out, metadata=metadata)

    return Checkpoint("safetensors", arrays, save)


def _load_npz(path: str) -> Checkpoint:
    try:
        with zipfile.ZipFile(path) as zf:
            compression = max((info.compress_type for info in zf.infolist()), default=zipfile.ZIP_STORED)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays refused without pickle
        raise CliError(f"{path}: refused: {_one_line(e)}") from None
    except Exception as e:
        raise CliError(f"{path}: not a readable .npz archive ({_one_line(e)})") from None

    def save(out: str, tensors: dict) -> None:
        # What np.savez does, without its keyword clash on a tensor named "file".
        with zipfile.ZipFile(out, "w", compression=compression, allowZip64=True) as zf:
            for name, value in tensors.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)

    return Checkpoint("npz", arrays, save)


def _load_torch(path: str) -> Checkpoint:
    try:
        import torch
    except ImportError:
        raise CliError(f"{path}: reading torch checkpoints needs torch: pip install 'fire-core[torch]'") from None
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise CliError(
                f"{path}: refused: it holds objects other than tensors and plain containers ({found.group(1)}), "
                "and unpickling them could run code; torch.load(weights_only=True) stopped before running any"
            ) from None
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = found.group(1).strip() if found else _one_line(e)
        raise CliError(f"{path}: not a readable torch checkpoint (weights-only unpickler: {detail})") from None
    except Exception as e:
        raise CliError(f"{path}: not a readable torch checkpoint ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise CliError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    arrays, paths, originals = {}, {}, {}  # the math sees detached tensors; `originals` keeps the kind

    def walk(node: dict, prefix: tuple) -> None:
        for key, value in node.items():
            where = prefix + (key,)
            if isinstance(value, dict):
                walk(value, where)
            elif isinstance(value, torch.Tensor):
                name = ".".join(str(k) for k in where)
                if name in arrays:
                    raise CliError(f"{path}: two tensors flatten to the same name {name!r}")
                arrays[name], paths[name], originals[name] = value.detach(), where, value

    walk(obj, ())
    first, aliases = {}, {}
    for name, t in arrays.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in first:
            aliases[name] = first[key]
        first.setdefault(key, name)
    notes = []
    if any(isinstance(k, str) and k.lower().startswith("optim") for k in obj):
        notes.append(
            "note: the file's optimizer state was copied unchanged; the moments of the projected weights are "
            "stale (fire_core.torch.apply(model, optimizer=opt) resets them)"
        )

    def storage_key(t):
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    def kept_kind(old, new, written: dict):
        """``new`` as the kind of tensor ``old`` was (a Parameter, requires_grad), made once per tensor."""
        if not isinstance(old, torch.nn.Parameter) and not old.requires_grad:
            return new
        if id(new) not in written:
            if isinstance(old, torch.nn.Parameter):
                written[id(new)] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                written[id(new)] = new.detach().requires_grad_(old.requires_grad)
        return written[id(new)]

    def save(out: str, tensors: dict) -> None:
        written = {}
        # Tensors that shared storage (tied weights) share the new one.
        by_storage = {storage_key(arrays[n]): (n, tensors[n]) for n in arrays if tensors[n] is not arrays[n]}
        for name, where in paths.items():
            node = obj
            for key in where[:-1]:
                node = node[key]
            owner, new = by_storage.get(storage_key(arrays[name]), (name, tensors[name]))
            if owner != name and tensors[name] is arrays[name]:
                notes.append(f"note: {name} shares storage with {owner} (tied) and was written with it")
            node[where[-1]] = originals[name] if new is arrays[name] else kept_kind(originals[name], new, written)
        torch.save(obj, out)

    return Checkpoint("torch", arrays, save, notes, aliases)


def _atomic_write(out: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``out``, then rename it onto ``out``."""
    directory = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(out) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _check_output(src: str, out: str, fmt: str, force: bool, what: str = "output") -> None:
    if os.path.isdir(out):
        raise CliError(f"{out}: the {what} is a directory")
    if os.path.exists(out):
        if os.path.samefile(src, out):
            raise CliError(f"{out}: the {what} is the input file; fire-core never modifies its input")
        if not force:
            raise CliError(f"{out}: exists; pass --force to overwrite it")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise CliError(f"{out}: directory {directory} does not exist")
    if fmt is not None:
        ext = os.path.splitext(out)[1].lower()
        if FORMATS.get(ext) != fmt:
            exts = " or ".join(e for e, f in FORMATS.items() if f == fmt)
            raise CliError(f"{out}: the {what} is written in the input's format; give it the extension {exts}")


# --------------------------------------------------------------------------- selection


def _parse_scale(text: str):
    if text in ("fire", "variance", "norm"):
        return text
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fire, variance, norm, none or a number, got {text!r}") from None


def _parse_pairs(items, what: str, convert) -> dict:
    out = {}
    for item in items or ():
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern:
            raise CliError(f"{what} {item!r}: expected PATTERN=VALUE")
        try:
            out[pattern] = convert(value)
        except ValueError:
            raise CliError(f"{what} {item!r}: bad value {value!r}") from None
    return out


def _select(ckpt: Checkpoint, args) -> tuple[list, str]:
    floats = {k: v for k, v in ckpt.arrays.items() if conventions.is_real_float(v)}
    # A tied tensor is projected once, under the first of its names that is a target; save() writes it to all.
    convention = args.convention
    if convention == "auto":
        convention = conventions.detect_convention(ckpt.arrays)
    try:
        chosen = conventions.targets(
            {k: tuple(v.shape) for k, v in floats.items()},
            convention,
            include=args.include,
            exclude=args.exclude,
            layouts=_parse_pairs(args.layout, "--layout", str),
            split=_parse_pairs(args.split, "--split", int),
        )
    except (TypeError, ValueError) as e:
        raise CliError(_one_line(e)) from None
    done, unique = set(), []
    for t in chosen:
        block = (ckpt.aliases.get(t.source_key, t.source_key), t.name[len(t.source_key):])  # e.g. "[q]" or ""
        if block not in done:
            done.add(block)
            unique.append(t)
    return unique, convention


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


def _cmd_inspect(args) -> int:
    fmt = _check_input(args.file)
    ckpt = _load(args.file, fmt)
    chosen, convention = _select(ckpt, args)
    print(f"{args.file}: {len(ckpt.arrays)} tensors, {len(chosen)} FIRE targets (convention {convention})")
    if not chosen:
        return 0
    rows = []
    for t in chosen:
        w = _block(ckpt, t)
        s = _spectrum(w, t.layout)
        lay = parse_layout(t.layout, t.shape)
        before = _dfi_to_target(w, t.layout)
        rows.append(
            [
                t.name, "x".join(map(str, t.shape)), t.layout, str(w.dtype).replace("torch.", ""),
                f"{before:.4g}", f"{before / (lay.taps * min(lay.d_out, lay.d_in)):.3g}",
                f"{s[-1]:.3g}", f"{np.median(s):.3g}", f"{s[0]:.3g}",
            ]
        )
    header = ["name", "shape", "layout", "dtype", "DfI", "DfI/n", "s_min", "s_median", "s_max"]
    print(_table(header, rows, left=4))
    print("DfI: deviation from isometry of the weight over its FIRE scale (0 at the FIRE target); "
          "s: singular values over that scale (1 at the target)")
    return 0


def _cmd_project(args) -> int:
    fmt = _check_input(args.file)
    _check_output(args.file, args.output, fmt, args.force)
    if args.plot:
        _check_output(args.file, args.plot, None, args.force, what="plot")
        if not args.plot.lower().endswith(".png"):
            raise CliError(f"{args.plot}: the plot is written as PNG; name it *.png")
        pyplot = _pyplot()
    ckpt = _load(args.file, fmt)
    chosen, convention = _select(ckpt, args)
    if not chosen:
        raise CliError(
            f"{args.file}: none of its {len(ckpt.arrays)} tensors is a FIRE target under the {convention} "
            "convention and the given --include/--exclude; nothing written"
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


def _cmd_demo(argv: list[str]) -> int:
    try:
        from . import demo
    except ModuleNotFoundError as e:
        if e.name in ("fire_core.demo", None):
            raise CliError("this installation of fire_core has no demo (fire_core/demo.py is missing)") from None
        raise CliError(f"the demo needs {e.name}: pip install 'fire-core[demo]'") from None
    result = demo.main(argv)
    return result if isinstance(result, int) else 0


# --------------------------------------------------------------------------- argument parsing


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="FIRE (Frobenius-Isometry REinitialization) on checkpoint files "
        "(.safetensors, .npz, torch .pt/.pth/.bin).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,project,demo}")

    def selection(p):
        p.add_argument("file", help="checkpoint file: .safetensors, .npz, .pt, .pth or .bin")
        p.add_argument("--convention", choices=("auto", *conventions.CONVENTIONS), default="auto",
                       help="naming convention of the tensors (default: auto-detect)")
        p.add_argument("--include", action="append", metavar="PAT",
                       help="glob on tensor names or module prefixes to select (repeatable)")
        p.add_argument("--exclude", action="append", metavar="PAT", help="glob to leave out (repeatable)")
        p.add_argument("--layout", action="append", metavar="PAT=LAYOUT",
                       help="layout for matching weights, e.g. 'decoder.up*=iohw' for ConvTranspose2d (repeatable)")
        p.add_argument("--split", action="append", metavar="PAT=N",
                       help="project a fused weight as N blocks along its output axis, e.g. '*.c_attn=3'")

    p = sub.add_parser("inspect", help="show each FIRE target's distance from isometry; writes nothing")
    selection(p)
    p = sub.add_parser("project", help="write the FIRE-projected checkpoint")
    selection(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file, same format as the input")
    p.add_argument("--steps", type=int, default=5, help="Newton-Schulz steps (default 5, the reference's)")
    p.add_argument("--method", choices=METHODS, default="fire", help="fire (reference), fast or svd")
    p.add_argument("--scale", type=_parse_scale, default="fire",
                   help="fire (default), variance, norm, none or a number")
    p.add_argument("--force", action="store_true", help="overwrite OUT (and the plot) if it exists")
    p.add_argument("--plot", metavar="FILE.png", help="also plot singular values before/after per layer")
    sub.add_parser("demo", help="run the built-in demonstration (fire-core demo --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["demo"]:
            return _cmd_demo(argv[1:])
        args = _parser().parse_args(argv)
        return {"inspect": _cmd_inspect, "project": _cmd_project}[args.command](args)
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
