"""Weights for sampling: read them from any checkpoint users have, build the model, export one file.

``read_weights(path)`` accepts
  * a run folder, a checkpoints/ folder or a checkpoint folder: model.pt / ema.pt, after checking their
    sizes, SHA-256 and step against meta.json;
  * a file written by ``mirai export`` (checked against its ``<file>.sha256`` when one lies beside it);
  * a file of LlamaGen's or the released Mirai training scripts: ``{"model", "ema", "optimizer",
    "scaler", "steps", "epoch", "rng_state", "args": argparse.Namespace}`` (the Namespace is the one
    non-tensor type allowed; the model name and token grid are read from it), or LlamaGen's other
    containers ``{"module": sd}`` (DeepSpeed) and ``{"state_dict": sd}``, or a bare state dict.
Mirai-Code's ``projectors.*`` weights (its foresight heads) are dropped and reported; every other key
must match the model exactly (strict loading, mismatches listed).

``load_gpt`` refuses weights with NaN / Inf entries naming the file and the first such tensor;
``export`` refuses them in either the raw or the EMA weights.

Export (``mirai export``): one file ``{"model": sd, "ema": sd, "model_name", "model_config", "step",
"format"}`` with LlamaGen key names and plain types only, which LlamaGen's ``sample_c2i.py`` reads
(``checkpoint["model"]``, a weights-only load; ``--ema-as-model`` puts the EMA weights under "model"),
plus ``<file>.sha256`` (``sha256sum -c`` format).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from mirai.checkpoint.run import check_stored_step, resolve, verify, verify_content
from mirai.io.state_dicts import check_finite, load_state, strip_prefixes
from mirai.io.torch_files import (HASH, LLAMAGEN_TYPES, CheckpointError, file_digest, load_file, save_file,
                                  write_text_atomic)

EXPORT_FORMAT = "mirai-export-v1"
DROPPED_PREFIXES = ("projectors.",)              # Mirai-Code's foresight heads: not part of the GPT


# --------------------------------------------------------------------------- reading
def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """{"model": sd, "ema": sd | None, "model_name", "model_config", "step", "source", "dropped": [keys]}
    from any of the sources in the module docstring."""
    path = Path(path)
    if path.is_dir():
        return _read_run_checkpoint(resolve(path))
    _check_sidecar(path)
    obj = load_file(path, allowed=LLAMAGEN_TYPES)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):       # bare state dict
        model, ema, name, config, step = obj, None, None, None, None
    else:
        model = next((obj[k] for k in ("model", "module", "state_dict") if isinstance(obj.get(k), dict)), None)
        ema = obj.get("ema") if isinstance(obj.get("ema"), dict) else None
        if model is None and ema is None:
            raise CheckpointError(f"{path}: no 'model', 'ema', 'module' or 'state_dict' entry "
                                  f"(keys: {sorted(map(str, obj))[:10]})")
        name, config = obj.get("model_name"), obj.get("model_config")
        step = obj.get("step", obj.get("steps"))
        args = obj.get("args")
        if name is None and args is not None:                # a LlamaGen / Mirai-Code training file
            name, config = _from_training_args(args)
    model, dropped = _drop_heads(model)
    ema, dropped_ema = _drop_heads(ema)
    return {"model": model, "ema": ema, "model_name": name, "model_config": config, "step": step,
            "source": str(path), "dropped": sorted(set(dropped) | set(dropped_ema))}


def _read_run_checkpoint(ckpt: Path) -> dict[str, Any]:
    meta = verify(ckpt)
    rels = [rel for rel in ("model.pt", "ema.pt") if (ckpt / rel).is_file()]
    verify_content(ckpt, meta, rels)
    model = load_file(ckpt / "model.pt")
    check_stored_step(ckpt / "model.pt", model.get("step"), meta)
    ema = load_file(ckpt / "ema.pt") if "ema.pt" in rels else None
    return {"model": model["model"], "ema": None if ema is None else ema["ema"],
            "model_name": meta.get("model_name"), "model_config": meta.get("model_config"),
            "step": meta.get("step"), "source": str(ckpt), "dropped": []}


def _from_training_args(args) -> tuple[str | None, dict[str, Any]]:
    """Model name and token grid from the ``args`` Namespace of LlamaGen's / Mirai-Code's training scripts."""
    a = vars(args) if hasattr(args, "__dict__") else dict(args) if isinstance(args, dict) else {}
    config: dict[str, Any] = {}
    if a.get("image_size") and a.get("downsample_size"):
        config["block_size"] = (int(a["image_size"]) // int(a["downsample_size"])) ** 2
    for ours, theirs in (("vocab_size", "vocab_size"), ("num_classes", "num_classes"),
                         ("cls_token_num", "cls_token_num")):
        if a.get(theirs) is not None:
            config[ours] = int(a[theirs])
    return a.get("gpt_model"), config


def _drop_heads(sd: dict[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    if sd is None:
        return None, []
    dropped = [k for k in sd if k.startswith(DROPPED_PREFIXES)]
    return {k: v for k, v in sd.items() if not k.startswith(DROPPED_PREFIXES)}, dropped


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + f".{HASH}")


def _check_sidecar(path: Path) -> None:
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        return
    want = side.read_text().split()[0] if side.read_text().split() else ""
    actual = file_digest(path)
    if actual != want:
        raise CheckpointError(f"{path}: content differs from what was saved ({HASH} {actual[:16]}..., {side} "
                              f"records {want[:16]}...): the file was modified or corrupted")


# --------------------------------------------------------------------------- building
def build_model(model_name: str, model_config: dict[str, Any] | None, where: str):
    from mirai.models.gpt import build_gpt
    try:
        with torch.random.fork_rng(devices=[]):
            return build_gpt(model_name, **(model_config or {}))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot build model {model_name!r} from its config ({err})") from err


def load_gpt(path: str | os.PathLike, use_ema: bool = True, device: str | torch.device = "cpu",
             model_name: str | None = None, **overrides):
    """A ``Transformer`` in eval mode with the EMA (default) or raw weights of a checkpoint.

    path: exported file, run folder, checkpoint folder, or a LlamaGen / Mirai-Code file (their model
    name comes from the stored ``args``; else give ``model_name`` and any GPTConfig ``overrides`` such as
    block_size). Falls back to the raw weights with a warning when the file has no EMA.
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
        warnings.warn(f"{path}: no EMA weights stored; loading the raw model weights", RuntimeWarning, stacklevel=2)
    if sd is None:
        raise CheckpointError(f"{path}: no model weights stored")
    if w["dropped"]:
        warnings.warn(f"{path}: dropped {len(w['dropped'])} foresight projector weights ({DROPPED_PREFIXES[0]}*): "
                      "sampling does not use them", RuntimeWarning, stacklevel=2)
    which = "ema" if sd is w["ema"] else "model"
    check_finite(sd, f"{w['source']} ({which})")
    load_state(model, sd, w["source"])
    return model.to(device).eval()


def export(src: str | os.PathLike, out: str | os.PathLike, ema_as_model: bool = False,
           dtype: torch.dtype = torch.float32) -> Path:
    """Write the single-file sampling checkpoint (model + EMA, no heads) of a run / checkpoint, and its
    ``.sha256`` beside it."""
    w = read_weights(src)
    if w["model_name"] is None:
        raise CheckpointError(f"{src}: holds no model name; export works on mirai run or checkpoint folders")
    model = build_model(w["model_name"], w["model_config"], w["source"])
    for which in ("model", "ema"):
        if w[which] is not None:
            check_finite(w[which], f"{w['source']} ({which})")
            load_state(model, w[which], f"{w['source']} ({which})")              # validates shapes and keys
    to = lambda sd: {k: v.detach().to(dtype).contiguous() for k, v in strip_prefixes(sd).items()}  # noqa: E731
    obj: dict[str, Any] = {"format": EXPORT_FORMAT, "model": to(w["model"]), "model_name": w["model_name"],
                           "model_config": w["model_config"], "step": w["step"]}
    if w["ema"] is not None:
        obj["ema"] = to(w["ema"])
        if ema_as_model:
            obj["model"], obj["raw_model"] = obj["ema"], obj["model"]
    out = Path(out)
    record = save_file(obj, out)
    write_text_atomic(_sidecar(out), f"{record[HASH]}  {out.name}\n")
    return out
