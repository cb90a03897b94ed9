"""``ForesightSource``: what the trainer asks of a foresight target source, and ``SourceMode``, what a
``foresight.mode`` registers (``mirai.foresight.sources.registry``).

A source is built once per run by its mode's ``build`` and lives OUTSIDE the engine (never cast, partitioned
or optimised). Per micro-batch the step calls ``targets_for(batch, model) -> [B, S, C]`` under no_grad, with
``batch`` holding ``codes`` int64 [B, T], ``labels`` int64 [B] and the extra loader keys the source names in
``batch_keys`` (``features``, ``images``), all on the engine's device; ``model`` is the unwrapped GPT (its
``prepare_inputs`` turns codes into the model's input sequence). Rows S are sequence positions when the mode's
``table_source`` is "ema" and grid cells (raster order) when it is "encoder" (``neighbour_table`` indexes them).

``TARGET_DTYPES`` maps ``foresight.target_dtype`` ("bf16" / "fp32") to the torch dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

TARGET_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ForesightSource:
    """The interface of a target source. A source that is an ``nn.Module`` lists this class AFTER
    ``nn.Module`` (its ``to`` must be the module's)."""

    batch_keys: tuple[str, ...] = ()
    """Loader keys read beyond ``codes`` and ``labels``: "features" (the store's encoder features, [B, Tf, C])
    and / or "images" (uint8 crops [B, 3, S, S] re-created from ``data.images``)."""

    def targets_for(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
        """The targets [B, S, C] of a (device) batch; any float dtype (the step casts to the target dtype)."""
        raise NotImplementedError(f"{type(self).__name__}.targets_for")

    def compile_for_training(self, scope: str) -> None:
        """Called once under ``train.compile`` with the run's compile scope ("model" or "blocks"); default:
        nothing is compiled."""

    def flops(self, gpt_config, cfg) -> Any:
        """Training FLOPs per image of a run with this source: a ``mirai.metrics.flops.FlopsBreakdown`` for the
        model ``gpt_config`` and the resolved ``ForesightConfig`` ``cfg`` (MFU in the logs, ``mirai flops``)."""
        raise NotImplementedError(f"{type(self).__name__}.flops")

    @classmethod
    def frozen_params(cls, cfg, model) -> int:
        """Parameters a source of this class keeps frozen beside the trained model (held in bf16; the engine's
        memory estimate counts them), for the resolved ``ForesightConfig`` ``cfg`` and the GPT ``model``, which
        may live on the meta device: asked before the source is built. Default: none."""
        return 0

    def ema_teacher(self) -> tuple[torch.nn.Module, list[str]] | None:
        """(module, parameter names) the run's EMA keeps equal to itself (Mirai-E's online teacher), or None."""
        return None

    def to(self, device):
        """Move to the engine's device (``nn.Module`` sources: the module's own ``to``)."""
        return self


class NoTargets(ForesightSource):
    """Mode "none" and the output-injection ablation: no teacher; FLOPs of the plain model."""

    def targets_for(self, batch, model):
        raise RuntimeError("foresight: this run has no teacher (mode 'none' or injection 'output')")

    def flops(self, gpt_config, cfg):
        from mirai.metrics.flops import training_flops_per_image
        return training_flops_per_image(gpt_config, "none", layer=1)


@dataclass(frozen=True)
class SourceMode:
    """What one ``foresight.mode`` registers; see ``mirai.foresight.sources.registry``."""

    name: str
    """The ``foresight.mode`` value."""
    build: Callable[..., ForesightSource]
    """``build(cfg, model, codes) -> ForesightSource``: cfg the RESOLVED ForesightConfig (injection "internal"),
    model the unwrapped GPT (on its final device or not), codes the code store folder (``data.codes``)."""
    default_k: int
    """K when ``foresight.k`` is null."""
    default_warmup_epochs: int
    """``foresight.warmup_epochs`` when null."""
    table_source: str
    """Neighbour-table rows of its targets: "ema" (sequence positions) or "encoder" (grid cells)."""
    target_width: Callable[[Any, Any], int]
    """``target_width(cfg, model_cfg) -> C``: the heads' output width when ``foresight.head_out`` is null."""
    source_type: Callable[[Any], type]
    """``source_type(cfg) -> the ForesightSource class build returns for cfg``: what a run will need (its
    ``batch_keys``, its ``frozen_params``) is asked of the class before anything is built."""
