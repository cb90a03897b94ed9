"""One optimizer step of Mirai training (shared by mirai.trainer.run and benchmarks/bench_step.py).

``StepRunner.run(step, epoch, batches)`` for the ``accum`` micro-batches of optimizer step ``step``:

1. learning rate of this step into the optimizer (host math, no sync);
2. foresight coefficients ``objective.coefficients(step, total_steps, epoch)`` (host floats; all zero
   during the Mirai-E warm-up epochs);
3. per micro-batch: host-to-device copy (non-blocking from pinned memory) of codes, labels and the source's
   ``batch_keys``; the teacher targets outside the engine under no_grad
   (``source.targets_for(batch, model)``, see ``mirai.foresight.sources``), in ``foresight.target_dtype``,
   only while ``objective.active(coeffs)`` and ``objective.needs_teacher``; the engine's micro-step (forward,
   backward, and the optimizer step at the accumulation boundary); losses accumulated in a device-side meter;
4. the EMA update (which also refreshes the online teacher); with ``optim.fuse_ema`` the optimizer
   applies it in its own pass and the EMA state only books it;
5. the divergence flag: ``meter.end_step`` records this step on the device when its losses or the
   gradient norm are not finite.

No ``.item()`` / host sync happens here; the caller reads the meter on log steps only.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mirai.data.loader import to_device
from mirai.foresight.sources import TARGET_DTYPES
from mirai.trainer.engine import Engine, lr_at
from mirai.trainer.logging import LossMeter


_MODEL_KEYS = ("codes", "labels")          # what the engine reads; the source adds its batch_keys


class StepRunner:
    """Holds what a step needs; see the module docstring."""

    def __init__(self, engine: Engine, fcfg, source, ema_state, optim_cfg, base_lr: float, total_steps: int):
        self.engine = engine
        self.fcfg = fcfg                      # resolved ForesightConfig (or the unresolved "none" one)
        self.source = source                  # the ForesightSource (mirai.foresight.sources)
        self.objective = engine.module.objective   # ForesightObjective | None (mode none)
        self.device_keys = _MODEL_KEYS + tuple(source.batch_keys)
        self.ema_state = ema_state            # EMAState | None
        self.optim_cfg = optim_cfg
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.k = engine.module.k
        self.target_dtype = TARGET_DTYPES[fcfg.target_dtype]   # what the loss gets, whatever the source holds
        self.meter = LossMeter(self.k, engine.device)
        self.last_coeffs: list[float] = []
        self.last_lr = 0.0
        self._coeffs_key: tuple[float, ...] | None = None
        self._coeffs_dev: torch.Tensor | None = None

    def coefficients(self, step: int, epoch: int) -> list[float]:
        if self.objective is None:
            return []
        return self.objective.coefficients(step, self.total_steps, epoch)

    def coefficients_on_device(self, coeffs: list[float]) -> torch.Tensor:
        """[K] fp32 on the engine's device, copied from pinned memory only when the values change
        (a pageable host-to-device copy could stall the host behind the GPU queue)."""
        key = tuple(coeffs)
        if key != self._coeffs_key:
            host = torch.tensor(coeffs, dtype=torch.float32)
            if self.engine.device.type == "cuda":
                host = host.pin_memory()
            self._coeffs_dev = host.to(self.engine.device, non_blocking=True)
            self._coeffs_key = key
        return self._coeffs_dev

    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        targets = self._targets(batch)
        return None if targets is None else targets.to(self.target_dtype)

    def _targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.objective is None or not self.objective.needs_teacher:
            return None
        return self.source.targets_for(batch, self.engine.module.gpt)

    def run(self, step: int, epoch: int, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        """Optimizer step `step` (0-based) over its micro-batches."""
        engine = self.engine
        self.last_lr = lr_at(step, self.optim_cfg, self.total_steps, self.base_lr)
        engine.set_lr(self.last_lr)
        coeffs = self.coefficients(step, epoch)
        self.last_coeffs = coeffs
        active = self.objective is not None and self.objective.active(coeffs)
        # while all coefficients are 0 (warm-up) the host list lets the objective skip its work;
        # afterwards a cached device tensor avoids a host-to-device copy per micro-batch
        obj_coeffs = (self.coefficients_on_device(coeffs) if active else coeffs) if coeffs else None
        if self.ema_state is not None:
            self.ema_state.before_step(step)       # a fused optimizer+EMA needs this step's decay
        for batch in batches:
            batch = to_device({k: v for k, v in batch.items() if k in self.device_keys}, engine.device)
            teacher = self.teacher_targets(batch) if active else None
            loss, ntp, per_head = engine.micro_step(batch["codes"], batch["labels"], teacher, obj_coeffs)
            self.meter.add(loss, ntp, per_head)
        if self.ema_state is not None:
            self.ema_state.update(step)
        self.meter.end_step(step + 1, engine.grad_norm_held())      # numbered as logged: step + 1

    def state(self) -> dict[str, Any]:
        return {"lr": self.last_lr, "lambdas": list(self.last_coeffs)}
