"""One torch file (a checkpoint, tokenizer or encoder weights): reading it safely, writing it atomically with
its content hash. The bottom of the package: every module that reads or writes a torch file goes through here.

Reading (``load_file``): ``torch.load(weights_only=True)`` and nothing else, for every file a user can
name. Such a load rebuilds tensors, containers and plain values only; a file holding any other Python
object is refused with ``UnsafeFileError`` naming the object's type (loading it with full pickle could run
code), never retried with full unpickling. A known format that needs one more type passes exactly that
type in ``allowed`` (allow-listed with ``torch.serialization.safe_globals`` for this one load):
``LLAMAGEN_TYPES`` for the files of LlamaGen's and the released Mirai training scripts (their ``args``
entry is an ``argparse.Namespace``); DeepSpeed's optimizer files need three DeepSpeed types (see
``mirai.trainer.engine``). A file that is not a readable torch file (truncated, corrupt, not a torch
file at all) raises ``FileLoadError`` "unreadable or truncated". Both errors name the file and are
ValueErrors too, so every command that reports bad input reports them.

Writing (``save_file``): torch.save streams into ``<name>.tmp`` through ``HashingWriter``, which computes
the SHA-256 of the bytes on their way to the disk (no second read), then fsync and an atomic rename; the
result ``{"bytes", "sha256"}`` goes into the checkpoint's meta.json. On any failure the temporary is
removed; running out of space (ENOSPC, EDQUOT) raises ``DiskFullError`` naming the file, the bytes the
state needs and the bytes free. ``file_digest`` computes the same hash by reading a file back (8 MiB
chunks): how a checkpoint is verified. See docs/run-folder.md for the cost of both.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

HASH = "sha256"
CHUNK = 8 << 20                                  # bytes per read when hashing a file
LLAMAGEN_TYPES: tuple[type, ...] = (argparse.Namespace,)
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, unreadable or does not match the run."""


class FileLoadError(CheckpointError, ValueError):
    """A file could not be loaded (missing, unreadable, truncated); the message names it."""


class UnsafeFileError(FileLoadError):
    """A file was refused: it holds Python objects of types a weights-only load does not rebuild."""

    def __init__(self, message: str, types: list[str]):
        super().__init__(message)
        self.types = types


class DiskFullError(CheckpointError):
    """The disk filled up while a file was written; the partial file was removed."""

    def __init__(self, message: str, path: Path, needed: int, free: int | None):
        super().__init__(message)
        self.path, self.needed, self.free = path, needed, free


# --------------------------------------------------------------------------- reading
def load_file(path: str | os.PathLike, allowed: Iterable[type] = (), mmap: bool = False,
              map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with exactly the types ``allowed`` added.

    ``mmap=True`` maps the tensor data instead of reading it (a cheap safety check of a large file).
    Raises FileLoadError (missing, unreadable, truncated) or UnsafeFileError (refused), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileLoadError(f"{path}: missing")
    allowed = list(allowed)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and _is_zip(path))
    except Exception as err:  # noqa: BLE001 - classified and re-raised with the file name
        refusal = _refusal(path, err, allowed)
        if refusal is not None:
            types, why = refusal
            raise UnsafeFileError(f"{path}: refused: {why}; a weights-only load rebuilds only tensors, containers "
                                  "and plain values, and unpickling anything else could run code", types) from err
        raise FileLoadError(f"{path}: unreadable or truncated ({path.stat().st_size} bytes; "
                            f"{type(err).__name__}: {_reason(err)})") from err


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _reason(err: Exception) -> str:
    """The informative line of a torch.load error (torch wraps it in advice about weights_only)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Check the documentation", "Weights only load failed",
                                                        "Please file an issue", "(1)", "(2)"))]
    return (useful or lines or [""])[-1][:300]


_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def _refusal(path: Path, err: Exception, allowed: list[type]) -> tuple[list[str], str] | None:
    """(types, why) when the weights-only unpickler refused the file because it names types it does not
    allow; None when the file is unreadable (not a pickle, truncated, corrupt)."""
    import pickle
    if not (isinstance(err, pickle.UnpicklingError) and str(err).startswith("Weights only load failed")):
        return None
    types: list[str] = []
    if _is_zip(path):                                   # every offending global, read from the pickle alone
        try:
            with torch.serialization.safe_globals(allowed):
                types = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - fall back to the error message
            types = []
    else:                                               # a legacy torch file or a plain pickle
        types = _static_globals(path, allowed)
    types = types or sorted(set(_GLOBAL.findall(str(err))))
    if types:
        return types, f"it holds Python objects of type {', '.join(types)}"
    return None                                         # e.g. not a pickle at all: unreadable


def _static_globals(path: Path, allowed: list[type]) -> list[str]:
    """module.name of the globals a non-zip pickle file references that torch's weights-only loader does not
    allow, found by reading its opcodes (pickletools; nothing is executed)."""
    import pickletools
    safe = set(getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)())
    safe |= {f"{t.__module__}.{t.__qualname__}" for t in allowed}
    found: set[str] = set()
    with open(path, "rb") as fh:
        for _ in range(4):                        # legacy torch files: magic, protocol, sys info, object
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(fh):
                    if op.name in ("GLOBAL", "INST"):
                        found.add(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.add(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # noqa: BLE001 - end of the pickles, or not a pickle
                break
    return sorted(found - safe)


# --------------------------------------------------------------------------- writing
class HashingWriter:
    """File-like sink for torch.save: passes the bytes to ``fh`` and hashes them on the way."""

    def __init__(self, fh):
        self.fh = fh
        self.name = fh.name
        self.digest = hashlib.new(HASH)
        self.size = 0
        self.error: OSError | None = None        # torch may replace a write error by its own

    def write(self, data) -> int:
        try:
            n = self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.digest.update(data)
        self.size += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        self.fh.flush()


def save_file(obj: Any, path: str | os.PathLike) -> dict[str, Any]:
    """torch.save to ``<path>.tmp`` (hashed while written), fsync, atomic rename; ``{"bytes", "sha256"}``.

    A crash never leaves a partial ``path``; any error removes the temporary, and a full disk raises
    DiskFullError naming ``path``, the bytes the state needs and the bytes free.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        with open(tmp, "wb") as fh:
            writer = HashingWriter(fh)
            torch.save(obj, writer)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        full = _full_disk(err, writer.error if writer is not None else None)
        if full is not None:
            raise disk_full(path, state_nbytes(obj)) from full
        raise
    _fsync_dir(path.parent)
    return {"bytes": writer.size, HASH: writer.digest.hexdigest()}


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file through ``<path>.tmp`` + fsync + atomic rename (same error handling)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        full = _full_disk(err, None)
        if full is not None:
            raise disk_full(path, len(text.encode())) from full
        raise
    _fsync_dir(path.parent)


def disk_full(path: Path, needed: int) -> DiskFullError:
    free = free_bytes(path.parent)
    return DiskFullError(f"{path}: disk full while writing it: the state needs about {_human(needed)} "
                         f"({needed} bytes), {_human(free) if free is not None else 'unknown'} free there; the "
                         "partial file was removed", path, needed, free)


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _full_disk(err: BaseException, seen: OSError | None) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind ``err`` (its chain, or what the writer saw), else None."""
    chain, cur = [], err
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if seen is not None:
        chain.append(seen)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _FULL_DISK:
            return e
    return None


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def state_nbytes(obj: Any) -> int:
    """Bytes of the tensor storages in a (nested) state: the size a torch.save of it needs, roughly."""
    seen: set[int] = set()

    def walk(x) -> int:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = storage.data_ptr()
            if key in seen and key != 0:
                return 0
            seen.add(key)
            return storage.nbytes()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0
    return walk(obj)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------- hashing
def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read in 8 MiB chunks."""
    h = hashlib.new(HASH)
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
