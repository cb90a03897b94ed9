"""Training checkpoints: save one (collective), pick the one to resume from, restore it.

``save_training_checkpoint``: engine state, consolidated weights (+ whether they are all finite), EMA,
per-rank RNG / loader state, each file hashed while written; then meta.json and ``latest`` (see
``mirai.checkpoint.run``). A failed save (disk full, any error) removes its temporaries and, in a
one-process run, the incomplete folder; ``latest`` keeps naming the previous checkpoint.

``resume_checkpoint``: the checkpoint ``train.resume`` asks for. For a run folder ("auto": this run's) it
is the newest one that verifies — every file present with its recorded size and SHA-256, the step of
meta.json, of the folder name and of model.pt agreeing — falling back past those that do not with a
warning naming each skipped folder and why. A file refused as unsafe stops the run instead. Every rank
hashes its share of each candidate's files and all ranks decide together, so they pick the same one.

``load_training_checkpoint``: refuses a checkpoint whose recorded run signature (model, heads and
neighbour layout, engine, precision, whether an EMA is kept, the code store's fingerprint) differs from
this run's, naming the field; then restores engine, EMA and this rank's RNG / loader state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirai.checkpoint.run import (LATEST, begin_save, check_stored_step, checkpoints_dir, finish_save,
                                  latest_target, list_checkpoints, rank_file, resolve, step_of, verify)
from mirai.io.state_dicts import first_nonfinite
from mirai.models.gpt import RETIRED_FIELDS
from mirai.io.torch_files import CheckpointError, DiskFullError, UnsafeFileError, load_file, save_file


# --------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np.array(np_state[1], dtype=np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_rank_state(ckpt: Path, rank: int, loader_state: dict[str, Any]) -> dict[str, Any]:
    return save_file({"rng": rng_state(), "loader": loader_state}, rank_file(ckpt, rank))


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any] | None:
    path = rank_file(ckpt, rank)
    if not path.exists():
        return None
    return load_file(path)


def model_config_dict(model) -> dict[str, Any]:
    cfg = model.config
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


# --------------------------------------------------------------------------- run signature
def check_compatible(ckpt: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise naming meta.json and each differing field when the run does not match the checkpoint.
    Fields a checkpoint does not record (written by an older version) are not compared."""
    diffs = []
    for key, want in expected.items():
        if key not in meta:
            continue
        have = meta.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            for sub in sorted(set(want) | set(have)):
                if sub not in have or (key == "model_config" and sub in RETIRED_FIELDS):
                    continue
                if _norm(want.get(sub)) != _norm(have.get(sub)):
                    diffs.append(f"{key}.{sub}: checkpoint {have.get(sub)!r}, run {want.get(sub)!r}")
        elif _norm(have) != _norm(want):
            diffs.append(f"{key}: checkpoint {have!r}, run {want!r}")
    if diffs:
        raise CheckpointError(f"{ckpt / 'meta.json'}: checkpoint does not match this run: " + "; ".join(diffs))


def _norm(v):
    return json.loads(json.dumps(v, default=str))


_STORE_FILES = ("meta.json", "codes.npy", "labels.npy", "features.npy", "files.txt")


def store_fingerprint(root: str | os.PathLike, samples: int = 16, sample_bytes: int = 4096) -> str:
    """A short content fingerprint of a code store: SHA-256 over each data file's name and size and
    ``samples`` evenly spaced ``sample_bytes`` reads of it (meta.json whole). Reads ~0.3 MB whatever the
    store's size; two stores with the same image count but other images or codes differ."""
    h = hashlib.sha256()
    root = Path(root)
    for name in _STORE_FILES:
        p = root / name
        if not p.is_file():
            continue
        size = p.stat().st_size
        h.update(f"{name}:{size}\n".encode())
        with open(p, "rb") as fh:
            if name == "meta.json":
                h.update(fh.read())
                continue
            span = max(size - sample_bytes, 0)
            for i in range(samples):
                fh.seek(span * i // max(samples - 1, 1))
                h.update(fh.read(sample_bytes))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- collectives
def _gather(obj: Any, runtime) -> list[Any]:
    """``obj`` of every rank, on every rank (in rank order)."""
    if not runtime.distributed:
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def _from_main(fn, runtime):
    """``fn()`` computed on rank 0 and handed to every rank; a CheckpointError or OSError it raises is raised
    on all (as a CheckpointError), so no rank waits for an answer that never comes."""
    result, error = None, None
    if runtime.is_main:
        try:
            result = fn()
        except CheckpointError as err:
            error = str(err)
        except OSError as err:
            error = f"{type(err).__name__}: {err}"
    if runtime.distributed:
        import torch.distributed as dist
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise CheckpointError(error)
    return result


# --------------------------------------------------------------------------- save
def save_training_checkpoint(run_dir: str | os.PathLike, step: int, *, runtime, engine, ema_state,
                             loader_state: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    """Every rank calls this (collective): engine state, consolidated weights, EMA, rank state, then
    meta.json and the ``latest`` pointer (rank 0)."""
    ckpt = begin_save(run_dir, step, runtime.is_main, runtime.barrier)
    try:
        written = {_rel(ckpt, p): rec for p, rec in (engine.save(ckpt) or {}).items()}   # ckpt/engine/...
        gpt_sd, heads_sd = engine.full_state_dicts()                # collective; full on rank 0
        ema_sd = ema_state.full_state_dict() if ema_state is not None else None
        finite = None
        if runtime.is_main:
            finite = {"model": first_nonfinite(gpt_sd) is None}
            written["model.pt"] = save_file({"model": gpt_sd, "heads": heads_sd, "step": int(step)}, ckpt / "model.pt")
            if ema_sd is not None:
                finite["ema"] = first_nonfinite(ema_sd) is None
                written["ema.pt"] = save_file({"ema": ema_sd, "info": ema_state.info()}, ckpt / "ema.pt")
        written[rank_file(ckpt, runtime.rank).name] = save_rank_state(ckpt, runtime.rank, loader_state)
        records = {rel: rec for part in _gather(written, runtime) for rel, rec in part.items()}
        finish_save(run_dir, ckpt, {"step": int(step), **meta, "finite": finite}, records, keep_last,
                    runtime.is_main, runtime.barrier)
    except BaseException as err:
        pointer = checkpoints_dir(run_dir) / LATEST
        completed = pointer.is_file() and pointer.read_text().strip() == ckpt.name    # failed after `latest`
        removed = runtime.world_size == 1 and not completed          # nobody else writes here: free the space
        if removed:
            shutil.rmtree(ckpt, ignore_errors=True)
        if isinstance(err, DiskFullError):
            raise DiskFullError(f"{err}. {_save_failed_note(run_dir, ckpt, removed)}",
                                err.path, err.needed, err.free) from err
        raise
    return ckpt


def _rel(ckpt: Path, path: str | os.PathLike) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(ckpt))


def _save_failed_note(run_dir, ckpt: Path, removed: bool) -> str:
    try:
        prev = latest_target(run_dir)
    except CheckpointError:
        prev = None
    if prev is None:
        return (f"Checkpoint {ckpt.name} was not written{' (its folder was removed)' if removed else ''}; the run "
                "has no earlier checkpoint. Free space and run the same command again.")
    try:
        size = sum((e["bytes"] if isinstance(e, dict) else e) for e in verify(prev).get("files", {}).values())
        need = f" (the previous checkpoint takes {size / 2 ** 30:.2f} GiB)"
    except CheckpointError:
        need = ""
    return (f"Checkpoint {ckpt.name} was not written{' (its folder was removed)' if removed else ''}; {LATEST} still "
            f"names {prev.name}, which is intact. Free space{need} and run the same command again: it resumes "
            f"from {prev.name}")


# --------------------------------------------------------------------------- resume
def resume_checkpoint(resume: str, run_dir: str | os.PathLike, runtime) -> Path | None:
    """The checkpoint to resume from for ``train.resume`` (see the module docstring); None: start fresh."""
    if resume == "none":
        return None
    candidates, fallback = _from_main(lambda: _candidates(resume, run_dir), runtime)
    skipped: list[tuple[str, str]] = []
    for name in candidates:
        ckpt = Path(name)
        problems = [p for p in _gather(_problem(ckpt, runtime), runtime) if p is not None]
        unsafe = [why for kind, why in problems if kind == "unsafe"]
        if unsafe:
            raise UnsafeFileError(unsafe[0], [])
        if not problems:
            if skipped and runtime.is_main:
                for path, why in skipped:
                    warnings.warn(f"{path}: skipped for resuming ({why}); resuming from {ckpt}", RuntimeWarning,
                                  stacklevel=2)
            return ckpt
        skipped.append((name, problems[0][1]))
        if not fallback:
            raise CheckpointError(problems[0][1])
    if not skipped:
        return None
    raise CheckpointError(f"{checkpoints_dir(run_dir)}: no checkpoint verifies: "
                          + "; ".join(f"{Path(p).name}: {why}" for p, why in skipped))


def _candidates(resume: str, run_dir) -> tuple[list[str], bool]:
    """(checkpoint folders to try, newest first; whether to fall back past one that does not verify)."""
    path = Path(run_dir if resume == "auto" else resume)
    if resume != "auto":
        if (path / LATEST).is_file() and not checkpoints_dir(path).is_dir():
            path = path.parent                               # the checkpoints/ folder itself
        elif not checkpoints_dir(path).is_dir():
            return [str(resolve(path))], False               # one checkpoint folder: no fallback
    complete = [p for p in list_checkpoints(path) if (p / "meta.json").is_file()]
    named = latest_target(path)                               # raises on a pointer that leads out
    if named is None:
        return [str(p) for p in reversed(complete)], True     # no `latest` yet: a save stopped before it
    older = [p for p in reversed(complete) if step_of(p) < step_of(named)]
    return [str(named)] + [str(p) for p in older], True


def _problem(ckpt: Path, runtime) -> tuple[str, str] | None:
    """Why this rank finds ``ckpt`` unusable: ("bad", reason), ("unsafe", reason) or None."""
    try:
        meta = verify(ckpt, content=True, share=(runtime.rank, runtime.world_size))
        if runtime.is_main and (ckpt / "model.pt").is_file():
            stored = load_file(ckpt / "model.pt", mmap=True)
            check_stored_step(ckpt / "model.pt", stored.get("step") if isinstance(stored, dict) else None, meta)
    except UnsafeFileError as err:
        return "unsafe", str(err)
    except CheckpointError as err:
        return "bad", str(err)
    except OSError as err:                       # e.g. unreadable: reported like the rest, no rank left waiting
        return "bad", f"{type(err).__name__}: {err}"
    return None


def load_training_checkpoint(ckpt: str | os.PathLike, *, runtime, engine, ema_state,
                             expected: dict[str, Any], loader_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore engine, EMA (+ teacher) and this rank's RNG states; returns meta.json.

    ``loader_state``: this run's loader description at the checkpoint's step; its data-order fields
    (seed, number of images, global batch) must equal the saved ones, else the resumed run would
    not see the data an uninterrupted run sees.
    """
    ckpt = Path(ckpt)
    meta = verify(ckpt)
    check_compatible(ckpt, meta, expected)
    engine.load(ckpt)
    if ema_state is not None:
        path = ckpt / "ema.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, but this run keeps an EMA (ema.enabled=true)")
        saved = load_file(path)
        ema_state.load_full_state_dict(saved["ema"], where=str(path),
                                       num_updates=saved.get("info", {}).get("num_updates"))
    state = load_rank_state(ckpt, runtime.rank)
    if state is None:
        warnings.warn(f"{rank_file(ckpt, runtime.rank)}: missing (different world size?); RNG states "
                      "start fresh, so dropout masks differ from an uninterrupted run", RuntimeWarning, stacklevel=2)
    else:
        saved = state.get("loader", {})
        for key in ("seed", "num_images", "global_batch"):
            if loader_state is not None and key in saved and saved[key] != loader_state.get(key):
                raise CheckpointError(f"{rank_file(ckpt, runtime.rank)}: loader {key} was {saved[key]}, this run "
                                      f"has {loader_state.get(key)} (different data or batch size: the data order "
                                      "would not continue)")
        set_rng_state(state["rng"])
    return meta
