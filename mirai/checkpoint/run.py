"""The checkpoints of a run folder: layout, the ``latest`` pointer, meta.json, verification, pruning.

Layout (``out_dir/checkpoints``; the whole run folder is described in docs/run-folder.md)::

    latest                 text: name of the newest COMPLETE checkpoint folder (atomic replace)
    step_00005000/
      engine/              the engine's state: DeepSpeed's files (tag "engine") or state.pt
      model.pt             {"model": GPT fp32 state dict (LlamaGen keys), "heads": objective state dict
                            or None, "step": int}
      ema.pt               {"ema": fp32 EMA state dict, "info": {...}}
      rank_00000.pt ...    per rank: RNG states, loader position
      meta.json            written last: step, config signature, "finite" flags of the model and EMA
                           weights, and {"bytes", "sha256"} of every file above

Saving: every rank writes its files (each hashed while written), barrier, rank 0 writes meta.json
(``finish_save``), replaces ``latest``, then prunes to ``keep_last``. A crash at any point leaves ``latest``
naming the previous complete checkpoint.

``verify(ckpt)`` checks meta.json, that every file it lists is a regular file inside the folder with the
recorded size and, with ``content=True``, the recorded SHA-256 (``share=(rank, world)``: this rank's part
of the files only). ``latest`` must name a ``step_N`` folder directly inside ``checkpoints/`` (no path,
no symlink leading out), and N must be the step meta.json records.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from mirai.io.torch_files import HASH, CheckpointError, file_digest, write_text_atomic

FORMAT = "mirai-train-ckpt-v2"
OLD_FORMATS = ("mirai-train-ckpt-v1",)          # readable; it records sizes only, no content hashes
LATEST = "latest"
_STEP_NAME = re.compile(r"step_(\d+)")


# --------------------------------------------------------------------------- paths
def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{int(step):08d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank_{int(rank):05d}.pt"


def step_of(ckpt: Path) -> int | None:
    """N of a ``step_N`` folder name, else None."""
    m = _STEP_NAME.fullmatch(Path(ckpt).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``step_N`` folders of a run (complete or not), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


# --------------------------------------------------------------------------- latest pointer
def write_latest(run_dir: str | os.PathLike, ckpt: Path) -> None:
    write_text_atomic(checkpoints_dir(run_dir) / LATEST, ckpt.name + "\n")


def latest_target(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest`` names, checked to lie directly inside this run's checkpoints/ (not verified);
    None when the run has no ``latest``."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if step_of(Path(name)) is None or name != Path(name).name:
        raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint folder name (step_N) "
                              f"inside {root}")
    ckpt = root / name
    if not ckpt.is_dir():
        raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint folder")
    if ckpt.is_symlink() or ckpt.resolve().parent != root.resolve():
        raise CheckpointError(f"{pointer}: names {name!r}, a link leading out of {root} "
                              f"(to {ckpt.resolve()}); checkpoints must lie inside the run's own folder")
    return ckpt


def read_latest(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest`` names, verified (sizes), or None when the run has no checkpoint yet."""
    ckpt = latest_target(run_dir)
    if ckpt is not None:
        verify(ckpt)
    return ckpt


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a run folder, a checkpoints/ folder or a checkpoint folder."""
    path = Path(path)
    if (path / "meta.json").is_file() or step_of(path) is not None:
        return path
    for run in (path, path.parent):
        if (checkpoints_dir(run) / LATEST).exists():
            found = read_latest(run)
            if found is not None:
                return found
    if (path / LATEST).exists():
        return read_latest(path.parent)  # type: ignore[return-value]
    raise CheckpointError(f"{path}: no checkpoint here (expected a run folder with checkpoints/latest, "
                          "a checkpoint folder with meta.json, or an exported .pt file)")


# --------------------------------------------------------------------------- meta.json and verification
def read_meta(ckpt: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a complete checkpoint (format checked); raises naming the file."""
    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing; {ckpt} is incomplete (its save was interrupted) "
                              "or is not a mirai training checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *OLD_FORMATS):
        raise CheckpointError(f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    return meta


def verify(ckpt: str | os.PathLike, content: bool = False, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """meta.json of a complete checkpoint whose files are all there with their recorded sizes and, with
    ``content``, their recorded hashes (this rank's share: files i with i % world == rank). Raises
    CheckpointError naming the first file that is missing, truncated or modified."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    meta_path = ckpt / "meta.json"
    named = step_of(ckpt)
    if named is not None and meta.get("step") != named:
        raise CheckpointError(f"{meta_path}: records step {meta.get('step')!r}, the folder is {ckpt.name}")
    files = meta.get("files", {})
    for rel, entry in files.items():
        p = _inside(ckpt, rel, meta_path)
        size = entry["bytes"] if isinstance(entry, dict) else entry
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {meta_path})")
        actual = p.stat().st_size
        if actual != size:
            raise CheckpointError(f"{p}: truncated or modified: {actual} bytes, {meta_path} recorded {size}")
    if content:
        rank, world = share
        verify_content(ckpt, meta, [rel for i, rel in enumerate(sorted(files)) if i % world == rank])
    return meta


def verify_content(ckpt: Path, meta: dict[str, Any], rels: list[str]) -> None:
    """Compare the SHA-256 of the files ``rels`` with meta.json's; raises naming the first that differs."""
    meta_path = ckpt / "meta.json"
    files = meta.get("files", {})
    for rel in rels:
        entry = files.get(rel)
        if entry is None:
            raise CheckpointError(f"{ckpt / rel}: not listed in {meta_path}")
        if not isinstance(entry, dict) or HASH not in entry:
            continue                                        # an older checkpoint: sizes only
        p = _inside(ckpt, rel, meta_path)
        actual = file_digest(p)
        if actual != entry[HASH]:
            raise CheckpointError(f"{p}: content differs from what was saved ({HASH} {actual[:16]}..., "
                                  f"{meta_path} recorded {entry[HASH][:16]}...): the file was modified or "
                                  "corrupted after the save")


def _inside(ckpt: Path, rel: str, meta_path: Path) -> Path:
    """ckpt / rel, refusing names that leave the folder or files that are links."""
    p = ckpt / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or p.is_symlink():
        raise CheckpointError(f"{meta_path}: lists {rel!r}, which is not a regular file inside {ckpt}")
    return p


def check_stored_step(path: Path, stored: Any, meta: dict[str, Any]) -> None:
    """The step a weights file stores must be the step of its meta.json (files of one save)."""
    if stored is not None and stored != meta.get("step"):
        raise CheckpointError(f"{path}: holds the weights of step {stored}, but {path.parent / 'meta.json'} "
                              f"records step {meta.get('step')} (files of different saves mixed)")


def finite_weights(meta: dict[str, Any]) -> bool | None:
    """Whether the checkpoint's model and EMA weights were all finite when saved (None: not recorded)."""
    flags = meta.get("finite")
    if not isinstance(flags, dict):
        return None
    return all(v is not False for v in flags.values())


# --------------------------------------------------------------------------- pruning
def prune(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints up to the one ``latest`` names, never
    that one nor the newest one whose weights were all finite when saved (a divergence never costs the
    last good checkpoint); incomplete folders older than ``latest`` (interrupted saves) go too. Folders
    newer than ``latest`` (a resume that fell back past them) are left until the run overwrites them."""
    latest = checkpoints_dir(run_dir) / LATEST
    keep_name = latest.read_text().strip() if latest.exists() else None
    keep_step = step_of(Path(keep_name)) if keep_name else None
    complete = [p for p in list_checkpoints(run_dir) if (p / "meta.json").is_file()
                and (keep_step is None or step_of(p) <= keep_step)]
    keep = set(p.name for p in complete[-keep_last:]) if keep_last > 0 else set()
    if keep_name:
        keep.add(keep_name)
    for p in reversed(complete):
        try:
            finite = finite_weights(json.loads((p / "meta.json").read_text()))
        except (OSError, ValueError):
            continue
        if finite is not False:                     # True, or not recorded (an older checkpoint)
            keep.add(p.name)
            break
    removed = []
    for p in complete:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in list_checkpoints(run_dir):
        if not (p / "meta.json").is_file() and keep_step is not None and step_of(p) < keep_step:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# --------------------------------------------------------------------------- saving
def begin_save(run_dir: str | os.PathLike, step: int, is_main: bool, barrier: Callable[[], None]) -> Path:
    """Create an empty folder for step ``step`` (clearing a partial one from a crashed earlier save)."""
    ckpt = step_dir(run_dir, step)
    if is_main:
        if ckpt.exists():
            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)
    barrier()
    return ckpt


def manifest(ckpt: Path, written: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file in the folder: the digests computed while the
    files were written, hashed now for files written by others (DeepSpeed's helper scripts)."""
    out = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != "meta.json" and not p.name.endswith(".tmp"):
            rel = str(p.relative_to(ckpt))
            out[rel] = written.get(rel) or {"bytes": p.stat().st_size, HASH: file_digest(p)}
    return out


def finish_save(run_dir: str | os.PathLike, ckpt: Path, meta: dict[str, Any], written: dict[str, dict[str, Any]],
                keep_last: int, is_main: bool, barrier: Callable[[], None]) -> None:
    """After every rank wrote its files: meta.json (sizes, hashes), then ``latest``, then pruning."""
    barrier()
    if is_main:
        full = {"format": FORMAT, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **meta,
                "files": manifest(ckpt, written)}
        write_text_atomic(ckpt / "meta.json", json.dumps(full, indent=2, default=str))
        write_latest(run_dir, ckpt)
        prune(run_dir, keep_last)
    barrier()
