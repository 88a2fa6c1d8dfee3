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
import json
import math
import os
import pickletools
import re
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import __version__
from .core import conventions
from .core._array import array_namespace, is_torch_array
from .core.layout import parse_layout, scale_factor, to_matrices
from .core.metrics import dfi
from .core.plan import reinit_many
from .core.polar import METHODS
from .core.report import Report

__all__ = ["main"]

PROG = "fire-core"
FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".pt": "torch", ".pth": "torch", ".bin": "torch",
           ".ckpt": "torch"}
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
    aliases: dict = field(default_factory=dict)  # name -> first name of the same tensor (tied weights)


# What each format is called in messages, and the extension a file of it should carry.
_DESCRIBED = {"safetensors": "a safetensors file", "npz": "a NumPy .npz archive", "torch": "a torch checkpoint"}
_EXTENSION = {"safetensors": ".safetensors", "npz": ".npz", "torch": ".pt"}
_UNREADABLE = {"safetensors": "not a readable safetensors file", "npz": "not a readable .npz archive",
               "torch": "not a readable torch checkpoint"}
_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of torch's legacy (pre-zip) pickle format
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on its JSON header
_INCOMPLETE = "the file is incomplete (an interrupted download, copy or save?)"
_OBJECTS = (
    "holds Python objects ({what}), and fire-core loads only tensors (in dicts, lists and tuples, with numbers "
    "and strings): unpickling objects can run code, so it never does; save the tensors alone, e.g. "
    "torch.save(model.state_dict(), path)"
)


@dataclass
class _Content:
    """What a file is, read from its first bytes (and, for a zip, its directory)."""

    format: str | None  # "safetensors", "npz", "torch", or None when fire-core does not read it
    what: str  # for messages: "a safetensors file", "a Python pickle", ...
    problem: str | None = None  # set when the file is of that format but cannot be read as it is
    legacy: bool = False  # torch's pre-zip pickle format
    protocol: int | None = None  # pickle protocol of a torch file


def _sniff(path: str) -> _Content:
    """The file's format by its content; the extension plays no part.

    safetensors: an 8-byte little-endian header length, then a JSON header;
    its offsets tell how long the file must be. A zip archive (``PK\\x03\\x04``)
    is a torch checkpoint when it has a ``*/data.pkl`` entry and an ``.npz``
    when its entries are ``*.npy`` (a truncated zip has lost its directory,
    which zip keeps at the end: the first entry's name tells the format). A
    pickle whose first object is torch's magic number is a legacy torch
    checkpoint; any other pickle holds Python objects.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if size >= 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if length <= _SAFETENSORS_MAX_HEADER:
            return _sniff_safetensors(path, size, length)
    if head.startswith(_ZIP_MAGIC):
        return _sniff_zip(path, head)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO 2-5: a pickle
        return _sniff_pickle(path, size)
    return _Content(None, "none of the formats fire-core reads (safetensors, .npz, torch zip or legacy torch pickle)")


def _sniff_safetensors(path: str, size: int, length: int) -> _Content:
    found = _Content("safetensors", _DESCRIBED["safetensors"])
    if 8 + length > size:
        found.problem = f"is truncated: its safetensors header says it is {length} bytes, but the file ends first; {_INCOMPLETE}"
        return found
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            found.problem = f"{_UNREADABLE['safetensors']} (its header is not a valid safetensors header: {e})"
            return found
    if 8 + length + end > size:
        found.problem = (
            f"is truncated: its safetensors header describes {8 + length + end} bytes, the file has {size}; "
            f"{_INCOMPLETE}"
        )
    return found


def _sniff_zip(path: str, head: bytes) -> _Content:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            protocol = None
            if pickles:
                with zf.open(pickles[0]) as p:
                    start = p.read(2)
                protocol = start[1] if start[:1] == b"\x80" and len(start) == 2 else None
    except zipfile.BadZipFile:
        # The zip directory is the end of the file: without it the file was cut short (or damaged at its end).
        # The first entry's name, in the local header at the start, still tells what it was.
        (name_length,) = struct.unpack("<H", head[26:28]) if len(head) >= 28 else (0,)
        first = head[30 : 30 + name_length].decode("utf-8", "replace") if len(head) >= 30 + name_length else ""
        fmt = "torch" if first.endswith("/data.pkl") else "npz" if first.endswith(".npy") else None
        what = _DESCRIBED[fmt] if fmt else "a zip archive"
        return _Content(fmt, what, f"is truncated: it starts as {what} (a zip archive) but its end, the zip "
                                   f"directory, is missing; {_INCOMPLETE}")
    if pickles:
        return _Content("torch", _DESCRIBED["torch"], protocol=protocol)
    if all(n.endswith(".npy") for n in names):
        return _Content("npz", _DESCRIBED["npz"])
    return _Content(None, "a zip archive that is neither a torch checkpoint (no */data.pkl) nor an .npz (not all *.npy)")


def _sniff_pickle(path: str, size: int) -> _Content:
    """A legacy torch checkpoint (five pickles, then the storages' bytes) or another pickle."""
    protocol, ops = None, []
    with open(path, "rb") as f:
        try:
            for op, arg, _ in pickletools.genops(f):  # reads opcodes; runs nothing
                ops.append((op.name, arg))
                if op.name == "PROTO":
                    protocol = arg
                if len(ops) >= 3 or op.name == "STOP":
                    break
        except ValueError:
            if f.tell() >= size:  # cut within its first object: too short to say more
                return _Content(None, "a pickle", f"is truncated: it ends within its first pickled object; {_INCOMPLETE}")
    magic = [arg for name, arg in ops if name not in ("PROTO", "FRAME")][:1] == [_TORCH_MAGIC]
    if not magic:
        return _Content(None, "a Python pickle, not a torch checkpoint",
                        _OBJECTS.format(what="a plain Python pickle, not written by torch.save"))
    found = _Content("torch", _DESCRIBED["torch"], legacy=True, protocol=protocol)
    with open(path, "rb") as f:
        try:
            for _ in range(5):  # magic, protocol version, system info, the object, the storage keys
                for _op in pickletools.genops(f):
                    pass
        except ValueError:
            if f.tell() >= size:
                found.problem = f"is truncated: its pickled part ends before it is complete; {_INCOMPLETE}"
    return found


def _check_input(path: str) -> _Content:
    """The file's format by its content, checked against its extension (a CliError if anything is wrong)."""
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory, not a checkpoint file")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, "rb") as f:
            empty = not f.read(1)
        content = _sniff(path)
    except OSError as e:
        raise CliError(f"{path}: cannot read: {e.strerror or e}") from None
    if empty:
        raise CliError(f"{path}: is empty (0 bytes)")
    expected = FORMATS.get(ext)
    if expected is None:
        known = ", ".join(FORMATS)
        what = f" (by its content it is {content.what})" if content.format else ""
        raise CliError(f"{path}: unsupported file type {ext or '(no extension)'!r}{what}; expected one of {known}")
    if content.format is None and content.problem:
        raise CliError(f"{path}: {content.problem}")
    if content.format is None:
        raise CliError(f"{path}: {_UNREADABLE[expected]}: its content is {content.what}")
    if content.format != expected:
        # Refused rather than read in its real format: the output is written in the input's format and must be
        # named for it, and a file whose name lies would go on misleading every other tool that reads it.
        stem = os.path.splitext(os.path.basename(path))[0]
        raise CliError(
            f"{path}: is {content.what} (by its content), not {_DESCRIBED[expected]} as its extension says; "
            f"rename it to {stem}{_EXTENSION[content.format]}"
        )
    if content.problem:
        raise CliError(f"{path}: {content.problem}")
    return content


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load(path: str, content: _Content) -> Checkpoint:
    if content.format == "torch":
        ckpt = _load_torch(path, content)
    else:
        ckpt = {"safetensors": _load_safetensors, "npz": _load_npz}[content.format](path)
    if not ckpt.arrays:
        raise CliError(f"{path}: holds no tensors")
    return ckpt


def _c_order(a: np.ndarray) -> np.ndarray:
    """``a`` in C order, copied only if it is not (``np.ascontiguousarray`` would make a 0-d array 1-d)."""
    return a if a.flags.c_contiguous else a.copy(order="C")


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
            tensors = {k: _c_order(np.asarray(v)) for k, v in tensors.items()}
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


# Top-level keys of a torch checkpoint that hold training state, not weights: copied as they are.
_TRAINING_STATE = ("optim", "lr_sched", "sched", "scaler", "grad_scaler")
_LIGHTNING_KEYS = ("pytorch-lightning_version", "optimizer_states", "loops")


def _torch_load(path: str, content: _Content):
    """``torch.load(weights_only=True)`` with fire-core's own message for each way it can refuse a file."""
    import pickle
    import warnings

    import torch

    if content.protocol is not None and content.protocol >= 4:
        raise CliError(
            f"{path}: was saved with pickle protocol {content.protocol}, which torch.load(weights_only=True) "
            "cannot read; fire-core reads torch files only that way (anything else can run code); re-save it "
            "with torch.save's default protocol (2)"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise CliError(f"{path}: " + _OBJECTS.format(what=found.group(1))) from None
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = found.group(1).strip() if found else _one_line(e)
        raise CliError(f"{path}: not a readable torch checkpoint (weights-only unpickler: {detail})") from None
    except Exception as e:
        if content.legacy and "unexpected EOF" in str(e):  # the storages' bytes after the pickles end early
            raise CliError(f"{path}: is truncated: its tensors' data ends before it is complete; {_INCOMPLETE}") from None
        raise CliError(f"{path}: not a readable torch checkpoint ({_one_line(e)})") from None


def _load_torch(path: str, content: _Content) -> Checkpoint:
    try:
        import torch
    except ImportError:
        raise CliError(f"{path}: reading torch checkpoints needs torch: pip install 'fire-core[torch]'") from None

    obj = _torch_load(path, content)
    if not isinstance(obj, dict):
        raise CliError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    notes = []
    lightning = isinstance(obj.get("state_dict"), dict) and any(k in obj for k in _LIGHTNING_KEYS)
    if lightning:
        # A Lightning checkpoint: the weights are its state_dict, named as LightningModule.state_dict() names them.
        roots = [(obj["state_dict"], ())]
        kept = [k for k in obj if k != "state_dict"]
        notes.append(
            f"note: Lightning checkpoint: projected the weights in 'state_dict'; {', '.join(map(repr, kept))} "
            "copied unchanged"
        )
        state = [k for k in kept if k in ("optimizer_states", "lr_schedulers")]
    else:
        state = [k for k in obj if isinstance(k, str) and k.lower().startswith(_TRAINING_STATE)]
        roots = [({k: v for k, v in obj.items() if k not in state}, ())]
        if state:
            notes.append(f"note: {', '.join(map(repr, state))} copied unchanged")
    if any(isinstance(k, str) and k.lower().startswith("optim") for k in state):
        notes.append(
            "note: the file's optimizer state is now stale for the projected weights (their moments describe the "
            "old weights); resuming from this file restores it: start the projected weights' moments afresh, "
            "e.g. load only the weights into a new optimizer, or use fire_core.torch.apply(model, optimizer=opt) "
            "in training"
        )
    arrays, paths, originals = {}, {}, {}  # the math sees detached tensors; `originals` keeps the kind
    base = ("state_dict",) if lightning else ()

    def walk(node: dict, prefix: tuple) -> None:
        for key, value in node.items():
            where = prefix + (key,)
            if isinstance(value, dict):
                walk(value, where)
            elif isinstance(value, torch.Tensor):
                name = ".".join(str(k) for k in where)
                if name in arrays:
                    raise CliError(f"{path}: two tensors flatten to the same name {name!r}")
                arrays[name], paths[name], originals[name] = value.detach(), base + where, value

    for root, prefix in roots:
        walk(root, prefix)

    def storage_key(t):
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    first, aliases = {}, {}
    for name, t in arrays.items():
        if t.numel():
            aliases[name] = first.setdefault(storage_key(t), name)

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
        by_storage = {storage_key(arrays[n]): tensors[n] for n in arrays if tensors[n] is not arrays[n]}
        for name, where in paths.items():
            node = obj
            for key in where[:-1]:
                node = node[key]
            new = by_storage.get(storage_key(arrays[name]), tensors[name])
            node[where[-1]] = originals[name] if new is arrays[name] else kept_kind(originals[name], new, written)
        # The same container as the input: legacy pickle or zip, and its pickle protocol.
        torch.save(obj, out, _use_new_zipfile_serialization=not content.legacy,
                   pickle_protocol=content.protocol or 2)

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


def _check_extension(out: str, fmt: str) -> None:
    """The output is named for the input's format (known only once the input is read: a CliError, status 1)."""
    ext = os.path.splitext(out)[1].lower()
    if FORMATS.get(ext) != fmt:
        exts = " or ".join(e for e, f in FORMATS.items() if f == fmt)
        raise CliError(f"{out}: the output is written in the input's format; give it the extension {exts}")


def _writable(directory: str) -> str | None:
    """None when a file can be created in ``directory``; else why not (tried, so root and read-only mounts tell)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return e.strerror or _one_line(e)
    return None


def _output_problem(out: str, force: bool, src: str | None = None) -> str | None:
    """What is wrong with writing ``out``, found from the command line and the file system alone; None if nothing."""
    if os.path.isdir(out):
        return "is a directory"
    if os.path.exists(out):
        if src is not None and os.path.exists(src) and os.path.samefile(src, out):
            return "is the input file; fire-core never modifies its input"
        if not force:
            return "exists; pass --force to overwrite it"
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    why = _writable(directory)
    if why is not None:
        return f"cannot write in directory {directory}: {why}"
    return None


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
        from . import demo
    except ModuleNotFoundError as e:
        if e.name in ("fire_core.demo", None):
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
