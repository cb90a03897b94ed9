"""λ schedules of the foresight term: the per-head coefficients at a given step.

``coefficients(cfg, step, total_steps, epoch) -> list[float]`` (length k) is computed on the host
from Python numbers (no device sync). Rules, with progress p = step / total_steps clipped to [0, 1]:

* warm-up gate: every coefficient is 0.0 while ``epoch < cfg.warmup_epochs``;
* ``const``:  λ = start;
* ``step``:   λ = start while p < switch_frac, then end (the paper's Mirai-E: 2 -> 1 at p = 0.5);
* ``cosine``: λ = end + (start - end) * (1 + cos(π p)) / 2, so start at p = 0 and end at p = 1.

start = ``cfg.lambdas`` and end = ``cfg.lambda_end`` (or start when unset), each a float or a
per-head list. ``cfg`` may be resolved or not (``None`` fields take their mode defaults).
"""
from __future__ import annotations

import math

from mirai.foresight.config import ForesightConfig, per_head


def schedule_value(start: float, end: float, kind: str, progress: float, switch_frac: float = 0.5) -> float:
    """One coefficient of schedule ``kind`` at ``progress`` in [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    if kind == "const":
        return float(start)
    if kind == "step":
        return float(start) if p < switch_frac else float(end)
    if kind == "cosine":
        return float(end) + (float(start) - float(end)) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"foresight.schedule: must be one of ('const', 'step', 'cosine'), got {kind!r}")


def warmup_active(cfg: ForesightConfig, epoch: int) -> bool:
    """True while the warm-up gate holds the foresight term at zero."""
    from mirai.foresight.sources import source_mode
    warm = cfg.warmup_epochs if cfg.warmup_epochs is not None else source_mode(cfg.mode).default_warmup_epochs
    return epoch < warm


def coefficients(cfg: ForesightConfig, step: int, total_steps: int, epoch: int) -> list[float]:
    """Per-head λ_k at ``step`` of ``total_steps`` (in epoch ``epoch``); zeros during warm-up."""
    from mirai.foresight.sources import default_k
    k = cfg.k if cfg.k is not None else default_k(cfg.mode)
    if not cfg.enabled:
        return [0.0] * k
    if total_steps <= 0:
        raise ValueError(f"coefficients: total_steps must be positive, got {total_steps}")
    if warmup_active(cfg, epoch):
        return [0.0] * k
    start = per_head(cfg.lambdas, k, "lambdas")
    end = start if cfg.lambda_end is None else per_head(cfg.lambda_end, k, "lambda_end")
    p = step / total_steps
    return [schedule_value(s, e, cfg.schedule, p, cfg.switch_frac) for s, e in zip(start, end)]
