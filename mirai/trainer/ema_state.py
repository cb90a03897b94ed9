"""The model EMA and the Mirai-E online teacher, kept outside the engine, for every engine and ZeRO stage.

``EMAState`` wraps ``mirai.optim.ModelEMA`` (fp32 shadows, one fused ``ema_update_`` per step, or, with
``optim.fuse_ema``, inside the optimizer's own pass: ``mirai.optim.AdamWEMA``, plain engine only). It
averages the fp32 MASTER weights (``Engine.ema_params()``), as the released code and LlamaGen do: under
DeepSpeed bf16 the module's parameters are bf16 roundings of the masters, which are never averaged.

* Whole masters on every rank (single process, DDP, DeepSpeed ZeRO-0): full fp32 shadows. The online
  teacher (``EMATeacher.module``, same parameter names) is attached with ``attach_teacher``: a bf16
  teacher is written as ``bf16(EMA)`` in the same fused pass, an fp32 teacher shares the shadows'
  storage. Either way the teacher at step t+1 is the EMA after step t, with no state-dict copies.
* Sharded masters (DeepSpeed ZeRO >= 1: this rank's pieces of its fp32 partitions, as the engine says in
  ``Engine.ema_shards()``): each rank averages its own pieces (shadows are shaped like the pieces) and the
  teacher's full weights are refreshed after every update by ``Engine.full_gather`` (planned once; bucketed
  all-reduces in the teacher's dtype, multi-tensor copies in and out).

``full_state_dict()`` returns the full fp32 EMA keyed by GPT parameter names (LlamaGen keys) on
rank 0 (collective when sharded); ``load_full_state_dict`` takes that form on any stage (keeping
this rank's pieces when sharded), so checkpoints of the EMA do not depend on the world size or stage.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mirai.optim.model_ema import ModelEMA


class EMAState:
    """EMA of the GPT's fp32 masters (+ teacher refresh); see the module docstring."""

    def __init__(self, engine, decay: float, warmup: str = "none", teacher: nn.Module | None = None,
                 teacher_names: list[str] | None = None):
        self.engine = engine
        self.is_main = engine.runtime.is_main
        self.ema = ModelEMA(engine.ema_params(), decay=decay, warmup=warmup)
        self.shards = engine.ema_shards()               # None: whole tensors on every rank
        self.teacher = teacher
        self.teacher_names = list(teacher_names) if teacher_names is not None else (
            [n for n, _ in teacher.named_parameters()] if teacher is not None else [])
        # the teacher's parameters, looked up once (refresh_teacher runs every step when sharded; compiling the
        # teacher or loading a checkpoint copies into these tensors, never replaces them)
        self._teacher_params = dict(teacher.named_parameters()) if teacher is not None else {}
        self._teacher_gather = None                     # sharded: the teacher's FullGather, planned at first use
        if teacher is not None:
            if self.sharded:
                self.refresh_teacher()
            else:
                self.ema.attach_teacher(teacher)
        # an optimizer that applies the EMA in its own pass (optim.fuse_ema: mirai.optim.AdamWEMA)
        self.fused = hasattr(engine.optimizer, "attach_ema") and not self.sharded
        if self.fused:
            engine.optimizer.attach_ema(self.ema.fused_pairs(engine.ema_params()))

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        return self.ema.shadow

    @property
    def sharded(self) -> bool:
        return self.shards is not None

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
        if self.sharded:
            self.refresh_teacher()

    @torch.no_grad()
    def refresh_teacher(self) -> None:
        """Teacher := EMA (rounded to the teacher's dtype): at start and after loading a checkpoint, and after
        every update when sharded (collective then)."""
        if self.teacher is None:
            return
        params = self._teacher_params
        if self.sharded:
            names = self.teacher_names
            if self._teacher_gather is None:
                dtype = params[names[0]].dtype if names else torch.float32
                gather = self.engine.full_gather(names, [self.ema.shadow[n] for n in names], dtype)
                self._teacher_gather = (gather, [params[n] for n in names])
            gather, targets = self._teacher_gather
            gather.into(targets)
            return
        for name in self.teacher_names:
            if params[name].data_ptr() != self.ema.shadow[name].data_ptr():   # an fp32 teacher IS the EMA
                params[name].copy_(self.ema.shadow[name])

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA on CPU, on rank 0 ({} elsewhere); collective when sharded."""
        names = list(self.ema.shadow)
        pieces = [self.ema.shadow[n] for n in names]
        gather = self.engine.full_gather(names, pieces, torch.float32)
        fulls = pieces if gather is None else gather.tensors()
        out: dict[str, torch.Tensor] = {}
        for name, full in zip(names, fulls):
            if self.is_main:
                out[name] = full.detach().float().cpu().clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, sd: dict[str, torch.Tensor], where: str = "ema.pt",
                             num_updates: int | None = None) -> None:
        from mirai.io.torch_files import CheckpointError
        missing = sorted(set(self.ema.shadow) - set(sd))
        unexpected = sorted(set(sd) - set(self.ema.shadow))
        if missing or unexpected:
            raise CheckpointError(f"{where}: EMA keys do not match the model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        for name, shadow in self.ema.shadow.items():
            value = sd[name]
            shape = self.shards[name].shape if self.sharded else tuple(shadow.shape)
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"{where}: {name} has shape {tuple(value.shape)}, model {tuple(shape)}")
            value = value.to(device=shadow.device, dtype=shadow.dtype)
            if self.sharded:
                self.shards[name].take(value, shadow)
            else:
                shadow.copy_(value)
        if num_updates is not None:
            self.ema.num_updates = int(num_updates)
        self.refresh_teacher()

    def info(self) -> dict[str, Any]:
        return {"decay": float(self.ema.decay), "warmup": self.ema.warmup, "num_updates": int(self.ema.num_updates),
                "averages": "fp32 master weights", "sharded": self.sharded}
