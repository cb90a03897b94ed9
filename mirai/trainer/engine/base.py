"""The interface every engine implements (the package docstring lists it); the defaults are those of an engine
that partitions nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from mirai.trainer.distributed import Runtime
from mirai.trainer.engine.module import TrainModule
from mirai.trainer.shards import FullGather, Shard


class Engine:
    """Common interface (see the module docstring)."""

    module: TrainModule
    device: torch.device

    def __init__(self, module: TrainModule, optimizer: torch.optim.Optimizer, runtime: Runtime, accum: int):
        self.module = module
        self.optimizer = optimizer
        self.runtime = runtime
        self.device = runtime.device
        self.accum = int(accum)

    # -- per micro-batch
    def micro_step(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch (``TrainModule.forward``'s arguments and result), then the
        optimizer step when this micro-batch ends an accumulation window. Whatever the forward or backward
        raises, the engine's per-micro-batch state (DDP's gradient-sync switch) is left as it was."""
        raise NotImplementedError

    # -- per optimizer step
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float | None:
        raise NotImplementedError

    def grad_norm_held(self) -> torch.Tensor | float | None:
        """The last optimizer step's global gradient norm as the engine holds it (a device tensor, or the value
        DeepSpeed keeps), never read back to the host here; None where there is none."""
        raise NotImplementedError

    # -- state (folder: the checkpoint folder; engines write into folder / "engine")
    def save(self, folder: Path) -> dict[str, dict[str, Any]]:
        """Write the engine state; {path: {"bytes", "sha256"}} of each file this rank wrote."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        raise NotImplementedError

    def full_state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(GPT fp32 state dict, objective fp32 state dict or None) on rank 0 ({} elsewhere). Collective."""
        raise NotImplementedError

    # -- what each rank holds
    def local_params(self) -> list[torch.Tensor]:
        """This rank's pieces of every trained parameter (the whole parameters where nothing is partitioned)."""
        return [p for p in self.module.parameters()]

    def gpt_param_count(self) -> int:
        """Elements of the GPT's parameters, whole (whatever the engine partitions)."""
        return sum(p.numel() for p in self.module.gpt.parameters())

    def register_external_params(self, module: nn.Module) -> None:
        """Declare that `module`'s forward also uses its own parameters without calling the submodules that
        own them (the fused foresight op reads the stacked head weights directly), so an engine that gathers
        partitioned parameters per module gathers them for `module`. Nothing to do where nothing is
        partitioned."""

    # -- what the EMA averages
    def gpt_named_params(self) -> list[tuple[str, nn.Parameter]]:
        """The GPT's (name, parameter) pairs, listed once: the EMA reads them every step, and walking the
        module tree costs more host time than the update itself. No engine replaces a parameter object
        (checkpoint loads copy into them, DeepSpeed re-points their data, compiling wraps the forward)."""
        named = getattr(self, "_gpt_named", None)
        if named is None:
            named = self._gpt_named = list(self.module.gpt.named_parameters())
        return named

    def ema_params(self) -> list[tuple[str, torch.Tensor]]:
        """(GPT parameter name, fp32 master tensor the EMA averages) pairs, in a fixed order: the parameters
        themselves here (fp32; bf16 runs use autocast)."""
        return list(self.gpt_named_params())

    def ema_shards(self) -> dict[str, Shard] | None:
        """None: ``ema_params()`` are whole tensors on every rank. Else GPT parameter name -> ``Shard`` (which
        elements of the parameter this rank's ``ema_params()`` tensor holds)."""
        return None

    def full_gather(self, names: Sequence[str], pieces: Sequence[torch.Tensor], dtype: torch.dtype
                    ) -> FullGather | None:
        """The whole tensors, in ``dtype``, of GPT parameters ``names`` from this rank's ``pieces`` (shaped like
        their ``ema_params()`` tensors): a ``mirai.trainer.shards.FullGather``, planned once, whose ``into`` /
        ``tensors`` are collective (every rank calls them with the same names). None where ``ema_shards()`` is
        None (nothing to gather: the pieces are whole)."""
        shards = self.ema_shards()
        return None if shards is None else FullGather(pieces, [shards[n] for n in names], dtype)

    def train(self) -> None:
        self.module.train()

