"""Ops backed by the fused kernels of ``mirai._C``, each with a PyTorch reference.

- ``foresight_loss(h, heads, teacher, table, coeffs, backend="auto")``: 2D-neighbour gather +
  K projection-head MLPs + cosine alignment loss, fused (``mirai.ops.foresight``).
- ``ema_update_(ema, params, decay, teacher=None)``: in-place multi-tensor EMA (``mirai.ops.ema_update``).
- ``adamw_ema_step_(params, grads, exp_avgs, exp_avg_sqs, *, lr, betas, eps, weight_decay, step, ...)``:
  AdamW step fused with the EMA (and bf16 teacher) update in one pass (``mirai.ops.adamw_ema_step``).
- ``mirai.ops.reference``: the plain PyTorch formulations the fused ops are tested against.

Names resolve lazily (PEP 562) so importing the reference never loads the extension.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"foresight_loss": "mirai.ops.foresight", "ema_update_": "mirai.ops.ema_update",
            "adamw_ema_step_": "mirai.ops.adamw_ema_step"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mirai.ops' has no attribute {name!r}")
