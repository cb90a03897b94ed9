"""The model EMA and the Mirai-E online teacher, kept outside the engine, for every ZeRO stage.

``EMAState`` wraps ``mirai.ema.ModelEMA`` (fp32 shadows, one fused ``ema_update_`` per step, or, with
``optim.fuse_ema``, inside the optimizer's own pass: ``mirai.optim.AdamWEMA``, plain engine only):

* ZeRO 0/1/2 (and the plain / DDP path): every rank holds full parameters, the EMA averages them
  (bf16 under DeepSpeed bf16, fp32 otherwise) into full fp32 shadows. The online teacher
  (``EMATeacher.module``, bf16, same parameter names) is attached with ``attach_teacher`` so the
  same fused pass writes the new EMA, rounded to bf16, into the teacher: the teacher at step t+1 is
  the EMA after step t, with no state-dict copies.
* ZeRO-3: each rank averages only its own flat partitions ``p.ds_tensor`` (shadows are flat local
  partitions); the teacher's full weights are then refreshed by all-gathering the teacher's EMA
  partitions (one collective per teacher tensor; correctness over speed).

``full_state_dict()`` returns the full fp32 EMA keyed by GPT parameter names (LlamaGen keys) on
rank 0 (collective under ZeRO-3); ``load_full_state_dict`` takes that form on any stage (slicing
this rank's partitions under ZeRO-3), so checkpoints of the EMA do not depend on the world size.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mirai.ema import ModelEMA
from mirai.trainer.distributed import gather_partition, slice_partition


class EMAState:
    """EMA of the GPT (+ teacher refresh); see the module docstring."""

    def __init__(self, engine, decay: float, warmup: str = "none", teacher: nn.Module | None = None,
                 teacher_names: list[str] | None = None):
        self.engine = engine
        self.zero3 = bool(getattr(engine, "zero3", False))
        self.is_main = engine.runtime.is_main
        self.ema = ModelEMA(engine.ema_params(), decay=decay, warmup=warmup)
        self.teacher = teacher
        self.teacher_names = list(teacher_names) if teacher_names is not None else (
            [n for n, _ in teacher.named_parameters()] if teacher is not None else [])
        self._meta = engine.zero3_meta() if self.zero3 else None
        if teacher is not None and not self.zero3:
            self.ema.attach_teacher(teacher)
        # an optimizer that applies the EMA in its own pass (optim.fuse_ema: mirai.optim.AdamWEMA)
        self.fused = hasattr(engine.optimizer, "attach_ema") and not self.zero3
        if self.fused:
            engine.optimizer.attach_ema(self.ema.fused_pairs(engine.ema_params()))

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        return self.ema.shadow

    def before_step(self, step: int) -> None:
        """Before optimizer step `step`: a fused optimizer is handed this step's decay."""
        if self.fused:
            self.engine.optimizer.ema_decay = self.ema.decay_at(step)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (0-based: the number of EMA updates done before this one)."""
        if self.fused:
            if self.engine.optimizer.ema_decay is not None:
                raise RuntimeError(f"EMAState.update: the fused optimizer did not apply the EMA of step {step} "
                                   "(no optimizer step ran since before_step)")
            self.ema.mark_updated(step)
            return
        self.ema.update(self.engine.ema_params(), step=step)
        if self.teacher is not None and self.zero3:
            self._refresh_teacher_zero3()

    @torch.no_grad()
    def _refresh_teacher_zero3(self) -> None:
        params = dict(self.teacher.named_parameters())
        for name in self.teacher_names:
            numel, shape, _ = self._meta[name]
            full = gather_partition(self.ema.shadow[name], numel, shape)          # [P] x world -> shape
            params[name].copy_(full.to(params[name].dtype))

    @torch.no_grad()
    def refresh_teacher(self) -> None:
        """Teacher := bf16(EMA) (after loading a checkpoint)."""
        if self.teacher is None:
            return
        if self.zero3:
            self._refresh_teacher_zero3()
            return
        params = dict(self.teacher.named_parameters())
        for name in self.teacher_names:
            params[name].copy_(self.ema.shadow[name].to(params[name].dtype))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA on CPU, on rank 0 ({} elsewhere); collective under ZeRO-3."""
        out: dict[str, torch.Tensor] = {}
        for name, shadow in self.ema.shadow.items():
            if self.zero3:
                numel, shape, _ = self._meta[name]
                full = gather_partition(shadow, numel, shape)
            else:
                full = shadow
            if self.is_main:
                out[name] = full.detach().float().cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict[str, torch.Tensor], where: str = "ema.pt",
                             num_updates: int | None = None) -> None:
        from mirai.checkpoint import CheckpointError
        missing = sorted(set(self.ema.shadow) - set(sd))
        unexpected = sorted(set(sd) - set(self.ema.shadow))
        if missing or unexpected:
            raise CheckpointError(f"{where}: EMA keys do not match the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        rank = self.engine.runtime.rank
        for name, shadow in self.ema.shadow.items():
            value = sd[name]
            if self.zero3:
                numel, shape, part = self._meta[name]
                if tuple(value.shape) != tuple(shape):
                    raise CheckpointError(f"{where}: {name} has shape {tuple(value.shape)}, model {tuple(shape)}")
                value = slice_partition(value.to(shadow.device), part, rank)
            elif tuple(value.shape) != tuple(shadow.shape):
                raise CheckpointError(f"{where}: {name} has shape {tuple(value.shape)}, model {tuple(shadow.shape)}")
            shadow.copy_(value.to(device=shadow.device, dtype=shadow.dtype))
        if num_updates is not None:
            self.ema.num_updates = int(num_updates)
        self.refresh_teacher()

    def info(self) -> dict[str, Any]:
        return {"decay": float(self.ema.decay), "warmup": self.ema.warmup, "num_updates": int(self.ema.num_updates),
                "zero3_partitions": self.zero3}
