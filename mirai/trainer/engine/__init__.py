"""Engines: what runs the trained module's forward, backward and optimizer step on each rank, and owns its
parallelism (DeepSpeed ZeRO 0..3, torch DDP, one process).

    module.py            TrainModule: the GPT + the foresight objective, the only module an engine wraps
    optimizer.py         the client AdamW, its parameter groups, the learning-rate schedule
    base.py              Engine: the interface below
    plain.py             PlainEngine: single process or DDP (fp32 weights, bf16 autocast)
    deepspeed_engine.py  DeepSpeedEngine and its JSON config
    memory.py            the per-rank memory estimate and the engine train.backend=auto picks from it
    build.py             compile scope, activation checkpointing, the optimizer and the wrapper of a run

Engines share one interface (``Engine``): ``micro_step(...)`` once per micro-batch (forward and backward inside
one context, then the optimizer step at the gradient-accumulation boundary), ``set_lr``, ``grad_norm()`` (host
value; log steps only), ``grad_norm_held()`` (the same, as held: no host read), ``save(dir)`` / ``load(dir)`` of
the engine state (``save`` returns {file: {"bytes", "sha256"}} of what this rank wrote; every file goes through
``mirai.io.torch_files.save_file`` / ``load_file``, DeepSpeed's own too), ``full_state_dicts()`` (fp32 master
weights of the GPT and the heads, consolidated on rank 0; collective), ``ema_params()`` (what the EMA averages:
the GPT's fp32 master weights under every engine, as the released code and LlamaGen average fp32 weights, never
the bf16 module parameters DeepSpeed computes with), ``ema_shards()`` (None where ``ema_params()`` are whole
tensors on every rank; under ZeRO-1/2/3 the masters are sharded, each rank handing its own pieces, see
``mirai.trainer.shards``) and ``full_gather`` (whole tensors from those pieces, planned once), ``local_params()``
(this rank's pieces of the parameters), ``gpt_param_count()`` and ``register_external_params(module)``
(parameters a module's forward reads without calling their owners). Partitioned parameters (ZeRO-3) are known to
this package only: every other module asks the engine through these methods.
"""
from mirai.trainer.engine.base import Engine
from mirai.trainer.engine.build import build_engine, compile_scope, needs_block_compile
from mirai.trainer.engine.deepspeed_engine import DeepSpeedEngine, deepspeed_config
from mirai.trainer.engine.memory import EngineChoice, choose_engine, engine_planner
from mirai.trainer.engine.module import TrainModule
from mirai.trainer.engine.optimizer import build_optimizer, load_optimizer_state, lr_at, param_groups
from mirai.trainer.engine.plain import PlainEngine

__all__ = ["DeepSpeedEngine", "Engine", "EngineChoice", "PlainEngine", "TrainModule", "build_engine",
           "build_optimizer", "choose_engine", "compile_scope", "deepspeed_config", "engine_planner",
           "load_optimizer_state", "lr_at", "needs_block_compile", "param_groups"]
