"""The client optimizer every engine steps, its parameter groups and the learning-rate schedule.

One client optimizer is built here so DeepSpeed builds no op: apex ``FusedAdam`` (AdamW mode) when importable on
CUDA, else ``torch.optim.AdamW`` with ``fused=True`` on CUDA / ``foreach=True`` on CPU; with ``optim.fuse_ema``
(plain engine) ``mirai.optim.AdamWEMA``, which also applies the model EMA (``EMAState`` attaches it) and the
gradient clip in its one pass. Two parameter groups: weight decay on parameters with >= 2 dimensions (matrices,
embeddings, stacked head weights), none on norms and biases (the heads' stacked biases included:
``param_groups``). The learning rate is set by the trainer every step (``lr_at``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on >= 2-D parameters (LlamaGen / nanoGPT rule), except those a submodule lists in its
    ``no_weight_decay_params()`` (the foresight heads' stacked [K, H] biases: biases, though 2-D)."""
    exempt = {id(p) for m in module.modules() if hasattr(m, "no_weight_decay_params")
              for p in m.no_weight_decay_params()}
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in exempt else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, optim_cfg, lr: float, device: torch.device,
                    fuse_ema: bool = False) -> torch.optim.Optimizer:
    """The client AdamW (see the module docstring for which implementation)."""
    groups = param_groups(module, optim_cfg.weight_decay)
    kw = dict(lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    if fuse_ema:
        from mirai.optim.adamw_ema import AdamWEMA
        return AdamWEMA(groups, **kw)
    if optim_cfg.fused and device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
            return FusedAdam(groups, adam_w_mode=True, **kw)
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, foreach=True, **kw)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` that keeps this optimizer's implementation options: torch's loader takes
    ``fused`` / ``foreach`` / ``capturable`` from the saved groups, so a state saved by another implementation
    (``optim.fuse_ema`` switched, apex or torch fused) would otherwise change how this one steps."""
    own = {k: optimizer.defaults[k] for k in ("fused", "foreach", "capturable") if k in optimizer.defaults}
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group.update(own)
        if group.get("fused") or group.get("capturable"):   # torch's fused kernel reads `step` on the device
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def lr_at(step: int, optim_cfg, total_steps: int, base_lr: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    warm = optim_cfg.warmup_steps
    if warm > 0 and step < warm:
        return base_lr * (step + 1) / warm
    if optim_cfg.schedule == "const":
        return base_lr
    span = max(1, total_steps - warm)
    p = min(max((step - warm) / span, 0.0), 1.0)
    floor = base_lr * optim_cfg.min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))

