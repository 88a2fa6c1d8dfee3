"""The checkpoint files of the ``fire-core`` command: what a file is, reading it, writing it back safely.

:func:`_check_input` tells a file's format from its first bytes (safetensors,
a NumPy ``.npz``, a torch zip or legacy pickle, a Lightning ``.ckpt``) and
refuses what it cannot read before any work; ``_load_*`` read the tensors
into a :class:`Checkpoint`; :func:`_atomic_write` writes the output through
a temporary file, so an interrupted run leaves no half-written file.
:mod:`.cli` holds the command itself.
"""

from __future__ import annotations

import json
import os
import pickletools
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".pt": "torch", ".pth": "torch", ".bin": "torch",
           ".ckpt": "torch"}


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
