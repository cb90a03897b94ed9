"""Building a run's engine: compile scope, activation checkpointing, the optimizer, the wrapper."""
from __future__ import annotations

import warnings

from mirai.models.compile import compile_in_scope
from mirai.trainer.distributed import Runtime
from mirai.trainer.engine.base import Engine
from mirai.trainer.engine.deepspeed_engine import DeepSpeedEngine, deepspeed_config
from mirai.trainer.engine.module import TrainModule
from mirai.trainer.engine.optimizer import build_optimizer
from mirai.trainer.engine.plain import PlainEngine


def needs_block_compile(train_cfg, backend: str, zero_stage: int | None) -> bool:
    """True when only per-block compile works: under activation checkpointing (each block recomputed in the
    backward) and under ZeRO-3 (DeepSpeed gathers a module's partitioned parameters around its own forward)."""
    return bool(train_cfg.activation_checkpointing) or (backend == "deepspeed" and zero_stage == 3)


def compile_scope(cfg, runtime: Runtime) -> str:
    """``train.compile_scope`` resolved for this run: "model" or "blocks" (see the config field)."""
    t = cfg.train
    if t.compile_scope != "auto":
        return t.compile_scope
    return "blocks" if needs_block_compile(t, runtime.backend, t.zero_stage) else "model"


def build_engine(module: TrainModule, cfg, runtime: Runtime, base_lr: float) -> Engine:
    """Move the module to the device, apply compile / activation checkpointing, wrap it."""
    gpt = module.gpt
    if cfg.train.activation_checkpointing:
        gpt.enable_activation_checkpointing(True)
    if cfg.train.compile:
        compile_in_scope(module, gpt.layers, compile_scope(cfg, runtime))
    module.to(runtime.device)
    if runtime.backend == "deepspeed":
        if cfg.optim.fuse_ema:
            warnings.warn("optim.fuse_ema is ignored under DeepSpeed (its engine owns the optimizer step); the EMA "
                          "runs as its own pass", RuntimeWarning, stacklevel=2)
        optimizer = build_optimizer(module, cfg.optim, base_lr, runtime.device)
        # DeepSpeed's overlap only pays when gradients arrive during the backward (not under whole-model compile)
        overlap = (runtime.device.type == "cuda" and runtime.world_size > 1
                   and not (cfg.train.compile and compile_scope(cfg, runtime) == "model"))
        return DeepSpeedEngine(module, optimizer, runtime,
                               deepspeed_config(cfg, runtime.world_size, overlap),
                               grad_clip=cfg.optim.grad_clip)
    optimizer = build_optimizer(module, cfg.optim, base_lr, runtime.device, fuse_ema=cfg.optim.fuse_ema)
    return PlainEngine(module, optimizer, runtime, cfg.train.grad_accum(runtime.world_size), cfg.optim.grad_clip,
                       cfg.train.precision)
