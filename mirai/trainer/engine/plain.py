"""Single process or torch DDP: fp32 weights, bf16 through autocast, the clip inside a fused optimizer."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mirai.io.torch_files import load_file, save_file
from mirai.trainer.distributed import Runtime
from mirai.trainer.engine.base import Engine
from mirai.trainer.engine.module import TrainModule
from mirai.trainer.engine.optimizer import load_optimizer_state

DDP_BUCKET_MB = 500                  # DDP all-reduce bucket (torch's default: 25 MB); see PlainEngine


class PlainEngine(Engine):
    """Single process or torch DDP; bf16 through autocast with fp32 weights."""

    def __init__(self, module: TrainModule, optimizer, runtime: Runtime, accum: int, grad_clip: float,
                 precision: str):
        super().__init__(module, optimizer, runtime, accum)
        self.grad_clip = float(grad_clip)
        self.autocast = precision == "bf16"
        self.wrapped: nn.Module = module
        if runtime.backend == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            # The module's buffers (RoPE and neighbour tables) are constants, identical on every rank: no
            # broadcast of them before each forward. The gradients are views of the all-reduce buckets: no copy
            # back after the reduction and no second copy in memory. Buckets of DDP_BUCKET_MB instead of 25 MB:
            # each costs a collective call and, under torch.compile, a graph split (dynamo cuts the compiled
            # graph at DDP's bucket boundaries); 500 MB keeps GPT-B in one bucket and GPT-XXL in 12.
            self.wrapped = DDP(module, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True,
                               bucket_cap_mb=DDP_BUCKET_MB)
        self._micro = 0
        self._norm: torch.Tensor | None = None
        self._params = [p for p in module.parameters() if p.requires_grad]
        # torch's fused Adam/AdamW divide every gradient by ``optimizer.grad_scale`` (a device tensor) inside
        # their one kernel (the hook GradScaler uses); handing them 1 / clip_coef there clips the gradients
        # without the separate read-modify-write pass over all of them that clip_grad_norm_ makes
        from mirai.optim.adamw_ema import AdamWEMA       # it reads the same attribute, and does not write the grads back
        self.clip_in_optimizer = ((type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
                                   and bool(optimizer.defaults.get("fused")))
                                  or isinstance(optimizer, AdamWEMA))

    def micro_step(self, *args):
        boundary = (self._micro + 1) % self.accum == 0
        # DDP all-reduces the gradients only in the backward of an accumulation window's last micro-batch:
        # no_sync covers the forward and the backward of the others, and is left whatever they raise
        sync = self.wrapped.no_sync() if self.runtime.backend == "ddp" and not boundary else nullcontext()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        with sync:
            with autocast:
                loss, ntp, per_head = self.wrapped(*args)
            (loss / self.accum).backward()
        self._step()
        return loss, ntp, per_head

    def _step(self) -> None:
        self._micro += 1
        if self._micro % self.accum:
            return
        if self.clip_in_optimizer:
            grads = [p.grad for p in self._params if p.grad is not None]
            self._norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if self.grad_clip > 0:     # clip_grad_norm_'s factor min(1, clip / (norm + 1e-6)), inverted
                self.optimizer.grad_scale = (self._norm + 1e-6).div(self.grad_clip).clamp(min=1.0)
        else:
            clip = self.grad_clip if self.grad_clip > 0 else float("inf")
            self._norm = torch.nn.utils.clip_grad_norm_(self._params, clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self) -> float | None:
        return None if self._norm is None else float(self._norm)

    def grad_norm_held(self) -> torch.Tensor | None:
        return self._norm

    def save(self, folder: Path) -> dict[str, dict[str, Any]]:
        if not self.runtime.is_main:
            return {}
        path = folder / "engine" / "state.pt"
        return {str(path): save_file({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                                     path)}

    def load(self, folder: Path) -> None:
        from mirai.io.state_dicts import load_state
        path = folder / "engine" / "state.pt"
        state = load_file(path)
        load_state(self.module, state["module"], str(path))
        load_optimizer_state(self.optimizer, state["optimizer"])

    def full_state_dicts(self):
        if not self.runtime.is_main:
            return {}, None
        cpu = lambda m: {k: v.detach().float().cpu().clone() for k, v in m.state_dict().items()}  # noqa: E731
        return cpu(self.module.gpt), (cpu(self.module.objective) if self.module.objective is not None else None)

