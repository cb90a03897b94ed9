"""Checkpoints: training checkpoints (save / verify / resume), export, and ``load_gpt`` for sampling.

Run folder layout (``out_dir``)::

    config.yaml                     resolved config of the run
    metrics.jsonl, tb/              logs
    checkpoints/
      latest                        text: name of the newest COMPLETE checkpoint folder (atomic replace)
      step_00005000/
        engine/                     DeepSpeed's sharded checkpoint (model, optimizer; tag "engine"),
                                    or state.pt {"module", "optimizer"} of the plain / DDP path
        model.pt                    {"model": GPT state dict fp32 (LlamaGen keys), "heads": foresight
                                     objective state dict or None} consolidated from all ranks
        ema.pt                      {"ema": full fp32 EMA state dict (LlamaGen keys), "info": {...}}
        rank_00000.pt ...           per rank: RNG states (python, numpy, torch, cuda), loader position
        meta.json                   written last: step, epoch, world size, model config, and the byte
                                    size of every file above (truncation check)

Saving order: every rank writes its pieces, barrier, rank 0 writes ``meta.json``, then replaces
``latest`` (write ``latest.tmp``, ``os.replace``), then prunes to ``keep_last``. A crash at any point
leaves ``latest`` naming the previous complete checkpoint.

Export (``mirai export``): one file ``{"model": sd, "ema": sd, "model_name", "model_config",
"step", "format"}`` without heads, teachers or optimizer state, that LlamaGen-style sampling code
loads (``checkpoint["model"]``; ``--ema-as-model`` puts the EMA weights under "model").

``load_gpt(path, use_ema=True, device="cpu")`` builds a ``Transformer`` from an exported file, a
run folder, a checkpoint folder, or a LlamaGen-released file (then ``model_name=`` is required).

Every problem (missing, truncated, unreadable file; config that does not match) raises
``CheckpointError`` with the file and the problem in the message.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

FORMAT = "mirai-train-ckpt-v1"
EXPORT_FORMAT = "mirai-export-v1"
LATEST = "latest"
_STRIP_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, unreadable or does not match the run."""


# --------------------------------------------------------------------------- paths
def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{int(step):08d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank_{int(rank):05d}.pt"


# --------------------------------------------------------------------------- file helpers
def save_file(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary name, then atomic rename (a crash never leaves a partial `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_file(path: str | os.PathLike, weights_only: bool = True) -> Any:
    """torch.load on CPU; any failure becomes a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        size = path.stat().st_size
        raise CheckpointError(f"{path}: unreadable or truncated ({size} bytes; {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _file_sizes(folder: Path) -> dict[str, int]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "meta.json" and not p.name.endswith(".tmp"):
            out[str(p.relative_to(folder))] = p.stat().st_size
    return out


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove torch.compile / DDP wrapper prefixes from state-dict keys."""
    out = {}
    for k, v in sd.items():
        for prefix in _STRIP_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out


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


# --------------------------------------------------------------------------- latest pointer
def write_latest(run_dir: str | os.PathLike, ckpt: Path) -> None:
    _write_text_atomic(checkpoints_dir(run_dir) / LATEST, ckpt.name + "\n")


def read_latest(run_dir: str | os.PathLike) -> Path | None:
    """The folder `latest` names (verified), or None when the run has no checkpoint yet."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    ckpt = checkpoints_dir(run_dir) / name
    if not name or not ckpt.is_dir():
        raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint folder")
    verify(ckpt)
    return ckpt


def verify(ckpt: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a complete checkpoint; raises naming the first missing or truncated file."""
    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing; {ckpt} is incomplete (its save was interrupted) "
                              "or is not a mirai training checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for rel, size in meta.get("files", {}).items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {meta_path})")
        actual = p.stat().st_size
        if actual != size:
            raise CheckpointError(f"{p}: truncated or modified: {actual} bytes, {meta_path} recorded {size}")
    return meta


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a run folder, a checkpoints/ folder or a checkpoint folder."""
    path = Path(path)
    if (path / "meta.json").is_file() or path.name.startswith("step_"):
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


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")),
                  key=lambda p: int(p.name.split("_")[1]))


def prune(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (never the one `latest` names)."""
    latest = (checkpoints_dir(run_dir) / LATEST)
    keep_name = latest.read_text().strip() if latest.exists() else None
    complete = [p for p in list_checkpoints(run_dir) if (p / "meta.json").is_file()]
    removed = []
    keep_step = int(keep_name.split("_")[1]) if keep_name else None
    for p in complete[:-keep_last] if keep_last > 0 else complete:
        if p.name != keep_name:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    # incomplete folders older than latest are leftovers of interrupted saves
    for p in list_checkpoints(run_dir):
        if not (p / "meta.json").is_file() and keep_step is not None and int(p.name.split("_")[1]) < keep_step:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# --------------------------------------------------------------------------- training checkpoints
def begin_save(run_dir: str | os.PathLike, step: int, is_main: bool, barrier: Callable[[], None]) -> Path:
    """Create an empty folder for step `step` (clearing a partial one from a crashed earlier save)."""
    ckpt = step_dir(run_dir, step)
    if is_main:
        if ckpt.exists():
            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)
    barrier()
    return ckpt


def finish_save(run_dir: str | os.PathLike, ckpt: Path, meta: dict[str, Any], keep_last: int,
                is_main: bool, barrier: Callable[[], None]) -> None:
    """After every rank wrote its files: meta.json (with sizes), then `latest`, then pruning."""
    barrier()
    if is_main:
        full = {"format": FORMAT, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **meta,
                "files": _file_sizes(ckpt)}
        _write_text_atomic(ckpt / "meta.json", json.dumps(full, indent=2, default=str))
        write_latest(run_dir, ckpt)
        prune(run_dir, keep_last)
    barrier()


def check_compatible(ckpt: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise naming meta.json and each differing field when the run does not match the checkpoint."""
    diffs = []
    for key, want in expected.items():
        have = meta.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            for sub in sorted(set(want) | set(have)):
                if _norm(want.get(sub)) != _norm(have.get(sub)):
                    diffs.append(f"{key}.{sub}: checkpoint {have.get(sub)!r}, run {want.get(sub)!r}")
        elif _norm(have) != _norm(want):
            diffs.append(f"{key}: checkpoint {have!r}, run {want!r}")
    if diffs:
        raise CheckpointError(f"{ckpt / 'meta.json'}: checkpoint does not match this run: " + "; ".join(diffs))


def _norm(v):
    return json.loads(json.dumps(v, default=str))


def save_rank_state(ckpt: Path, rank: int, loader_state: dict[str, Any]) -> None:
    save_file({"rng": rng_state(), "loader": loader_state}, rank_file(ckpt, rank))


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any] | None:
    path = rank_file(ckpt, rank)
    if not path.exists():
        return None
    return load_file(path)


def model_config_dict(model) -> dict[str, Any]:
    cfg = model.config
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


# --------------------------------------------------------------------------- weights for sampling
def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """{"model": sd, "ema": sd | None, "model_name", "model_config", "step", "source"} from an exported
    file, a LlamaGen file, a run folder or a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        ckpt = resolve(path)
        meta = verify(ckpt)
        model = load_file(ckpt / "model.pt")
        ema = load_file(ckpt / "ema.pt") if (ckpt / "ema.pt").is_file() else None
        return {"model": model["model"], "ema": None if ema is None else ema["ema"],
                "model_name": meta.get("model_name"), "model_config": meta.get("model_config"),
                "step": meta.get("step"), "source": str(ckpt)}
    obj = load_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if any(isinstance(v, torch.Tensor) for v in obj.values()):       # bare state dict
        return {"model": obj, "ema": None, "model_name": None, "model_config": None, "step": None,
                "source": str(path)}
    model = obj.get("model", obj.get("module", obj.get("state_dict")))
    ema = obj.get("ema")
    if model is None and ema is None:
        raise CheckpointError(f"{path}: no 'model', 'ema', 'module' or 'state_dict' entry "
                              f"(keys: {sorted(obj)[:10]})")
    return {"model": model, "ema": ema, "model_name": obj.get("model_name"),
            "model_config": obj.get("model_config"), "step": obj.get("step"), "source": str(path)}


def build_model(model_name: str, model_config: dict[str, Any] | None, where: str):
    from mirai.models.gpt import build_gpt
    try:
        with torch.random.fork_rng(devices=[]):
            return build_gpt(model_name, **(model_config or {}))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot build model {model_name!r} from its config ({err})") from err


def state_dict_mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> str | None:
    """What keeps `sd` from loading strictly into a module whose state dict is `own`: missing and
    unexpected keys and shape mismatches, with examples; None when it loads."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
    return "; ".join(parts) or None


def load_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """strict load; mismatches become a CheckpointError listing the keys / shapes."""
    sd = strip_prefixes(sd)
    problem = state_dict_mismatch(model.state_dict(), sd)
    if problem:
        raise CheckpointError(f"{where}: does not match the model: {problem}")
    model.load_state_dict(sd, strict=True)


def load_gpt(path: str | os.PathLike, use_ema: bool = True, device: str | torch.device = "cpu",
             model_name: str | None = None, **overrides):
    """A ``Transformer`` in eval mode with the EMA (default) or raw weights of a checkpoint.

    path: exported file, run folder, checkpoint folder, or a LlamaGen file (give ``model_name``
    and any GPTConfig ``overrides`` such as block_size there). Falls back to the raw weights with a
    warning when the file has no EMA.
    """
    w = read_weights(path)
    name = model_name or w["model_name"]
    if name is None:
        raise CheckpointError(f"{path}: holds no model name (a LlamaGen-released file?): pass model_name=")
    config = dict(w["model_config"] or {})
    config.update(overrides)
    model = build_model(name, config, str(path))
    sd = w["ema"] if use_ema and w["ema"] is not None else w["model"]
    if use_ema and w["ema"] is None:
        import warnings
        warnings.warn(f"{path}: no EMA weights stored; loading the raw model weights", RuntimeWarning, stacklevel=2)
    if sd is None:
        raise CheckpointError(f"{path}: no model weights stored")
    load_state(model, sd, w["source"])
    return model.to(device).eval()


def export(src: str | os.PathLike, out: str | os.PathLike, ema_as_model: bool = False,
           dtype: torch.dtype = torch.float32) -> Path:
    """Write the single-file sampling checkpoint (model + EMA, no heads) of a run / checkpoint."""
    w = read_weights(src)
    if w["model_name"] is None:
        raise CheckpointError(f"{src}: holds no model name; export works on mirai run or checkpoint folders")
    model = build_model(w["model_name"], w["model_config"], w["source"])
    load_state(model, w["model"], w["source"] + " (model)")                  # validates shapes and keys
    if w["ema"] is not None:
        load_state(model, w["ema"], w["source"] + " (ema)")
    to = lambda sd: {k: v.detach().to(dtype).contiguous() for k, v in strip_prefixes(sd).items()}  # noqa: E731
    obj: dict[str, Any] = {"format": EXPORT_FORMAT, "model": to(w["model"]), "model_name": w["model_name"],
                           "model_config": w["model_config"], "step": w["step"]}
    if w["ema"] is not None:
        obj["ema"] = to(w["ema"])
        if ema_as_model:
            obj["model"], obj["raw_model"] = obj["ema"], obj["model"]
    return save_file(obj, out)


# --------------------------------------------------------------------------- trainer entry points
def save_training_checkpoint(run_dir: str | os.PathLike, step: int, *, runtime, engine, ema_state,
                             loader_state: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    """Every rank calls this (collective): engine state, consolidated weights, EMA, rank state, then
    meta.json and the `latest` pointer (rank 0)."""
    ckpt = begin_save(run_dir, step, runtime.is_main, runtime.barrier)
    engine.save(ckpt)                                           # ckpt/engine/...
    gpt_sd, heads_sd = engine.full_state_dicts()                # collective; full on rank 0
    ema_sd = ema_state.full_state_dict() if ema_state is not None else None
    if runtime.is_main:
        save_file({"model": gpt_sd, "heads": heads_sd}, ckpt / "model.pt")
        if ema_sd is not None:
            save_file({"ema": ema_sd, "info": ema_state.info()}, ckpt / "ema.pt")
    save_rank_state(ckpt, runtime.rank, loader_state)
    finish_save(run_dir, ckpt, {"step": int(step), **meta}, keep_last, runtime.is_main, runtime.barrier)
    return ckpt


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
        import warnings
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
