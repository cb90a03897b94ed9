"""State dicts, whatever file they came from: wrapper prefixes, non-finite entries, strict loading.

    strip_prefixes(sd)               drop torch.compile / DDP wrapper prefixes from the keys
    first_nonfinite(sd)              (name, count) of the first tensor holding NaN / Inf, else None
    check_finite(sd, where)          CheckpointError naming ``where`` and that tensor
    state_dict_mismatch(own, sd)     what keeps ``sd`` from loading strictly (missing / unexpected keys, shapes)
    load_state(model, sd, where)     strict load; a mismatch is a CheckpointError listing it

Used by checkpoints, the tokenizer loader, the static foresight teacher and the engines, so it sits below all of
them (it imports nothing from mirai but the file layer's errors).
"""
from __future__ import annotations

import torch

from mirai.io.torch_files import CheckpointError

_STRIP_PREFIXES = ("_orig_mod.", "module.")


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove torch.compile / DDP wrapper prefixes from state-dict keys."""
    out = {}
    for k, v in sd.items():
        for prefix in _STRIP_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def first_nonfinite(sd: dict[str, torch.Tensor] | None) -> tuple[str, int] | None:
    """(name, count) of the first floating-point tensor holding NaN or Inf entries, else None."""
    for name, t in (sd or {}).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return name, bad
    return None


def check_finite(sd: dict[str, torch.Tensor] | None, where: str) -> None:
    """CheckpointError naming ``where`` and the tensor when ``sd`` holds NaN or Inf entries."""
    bad = first_nonfinite(sd)
    if bad is not None:
        name, count = bad
        raise CheckpointError(f"{where}: tensor {name} holds {count} NaN/Inf values (the run diverged before "
                              "this save); use an earlier checkpoint")


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
