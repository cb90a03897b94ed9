"""One training run, built and run in this process: ``build_run`` and ``train`` (the work of ``mirai train``).

    cfg = load_config("configs/gpt-b_mirai_e.yaml", overrides); validate(cfg)
    result = train(cfg)          # -> TrainResult(run_dir, step, metrics, checkpoint)

One process per GPU (or one CPU process); rank and world size come from the launcher's environment. The run
folder (``out_dir``, default ``runs/<name>``) receives the resolved ``config.yaml``, ``metrics.jsonl``,
TensorBoard events and ``checkpoints/``; an existing run folder with a checkpoint is resumed
(``train.resume=auto``).

Per run (``build_run``): build the model (``model.name``: a LlamaGen GPT-* or a PAR-* model, see
mirai/models/par.py) and the foresight objective (heads; its neighbour table maps each sequence position
back to its grid cell through ``model.position_to_cell``, so PAR's region-parallel order aligns with
2D-grid neighbours), the teacher source OUTSIDE the engine (Mirai-E EMA teacher: the model's own first
blocks on the same model-ordered sequence; Mirai-I: precomputed features, or the frozen encoder run online
on crops re-created from ``data.images``; both in raster cell order), the engine (DeepSpeed ZeRO 0..3, DDP
or single process), the EMA (outside the engine; refreshes the online teacher), the loader. Then
(``train``) the step loop (``mirai.trainer.step.StepRunner``) with logging and checkpoints. See
``mirai/trainer/`` for each part and docs/architecture.md for the path of one step.
"""
from __future__ import annotations

import random
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mirai.config import Config, save_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What ``train`` returns (used by tests and the demo)."""

    run_dir: Path
    step: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None


def heads_signature(fcfg) -> dict[str, Any]:
    if fcfg is None or not fcfg.enabled:
        return {"mode": "none"}
    return {"mode": fcfg.mode, "injection": fcfg.injection, "k": fcfg.k, "layer": fcfg.layer,
            "head_kind": fcfg.head_kind, "head_hidden": fcfg.head_hidden, "head_out": fcfg.head_out,
            "layout": fcfg.layout}


@dataclass
class Run:
    """Everything a training run holds (built by ``build_run``; used by ``train`` and the benchmarks)."""

    cfg: Config
    runtime: Any
    gpt: torch.nn.Module
    fcfg: Any                  # resolved ForesightConfig (mode none: the config as given)
    source: Any                # the ForesightSource (mirai.foresight.sources; NoTargets without a teacher)
    engine: Any
    ema_state: Any
    loader: Any
    runner: Any
    accum: int
    total_steps: int
    base_lr: float
    expected: dict[str, Any]   # what a checkpoint of this run must match (meta.json fields)


def build_run(cfg: Config) -> Run:
    """Process group, model, objective, teacher source (outside the engine), engine, EMA, loader, step runner."""
    from mirai.checkpoint import model_config_dict, store_fingerprint
    from mirai.data.loader import Shard, TrainLoader
    from mirai.foresight.objective import ForesightObjective
    from mirai.foresight.sources import build_source
    from mirai.models.gpt import build_gpt
    from mirai.trainer.distributed import setup
    from mirai.trainer.engine import TrainModule, build_engine, compile_scope, engine_planner
    from mirai.trainer.ema_state import EMAState
    from mirai.trainer.step import StepRunner

    t_cfg = cfg.train
    rt = setup(t_cfg.backend, t_cfg.device, t_cfg.collective_timeout_s, planner=engine_planner(cfg))
    t_cfg.zero_stage = rt.zero_stage        # resolved: what the DeepSpeed config, compile scope and checkpoints read
    seed_everything(t_cfg.seed)
    gpt = build_gpt(cfg.model.name, ce_backend=t_cfg.ce_backend, **cfg.model.gpt_overrides())
    objective = None
    if cfg.foresight.enabled:
        # neighbours are taken on the 2D grid whatever the sequence order (GPT: raster; PAR: region-parallel):
        # the model says which grid cell each sequence position holds as input and predicts
        objective = ForesightObjective(cfg.foresight, gpt.config, input_cells=gpt.position_to_cell("input"),
                                       output_cells=gpt.position_to_cell("target"))
    fcfg = objective.cfg if objective is not None else cfg.foresight
    source = build_source(fcfg, gpt, codes=cfg.data.codes)      # a ForesightSource, built once (NoTargets: none)
    base_lr = cfg.optim.lr * t_cfg.global_batch / 256          # linear scaling: optim.lr is per 256 images
    engine = build_engine(TrainModule(gpt, objective, fused_ce=t_cfg.fused_ce), cfg,
                          rt, base_lr)
    source = source.to(engine.device)
    if t_cfg.compile:                                           # the source too (no grad), like the model
        source.compile_for_training(compile_scope(cfg, rt))
    teacher, teacher_names = source.ema_teacher() or (None, None)     # the online Mirai-E teacher IS the EMA
    ema_state = None
    if cfg.ema.enabled:
        ema_state = EMAState(engine, cfg.ema.decay, cfg.ema.warmup, teacher=teacher, teacher_names=teacher_names)
    seed_everything(t_cfg.seed + 1_000_003 * rt.rank)        # dropout masks differ across ranks

    accum = engine.accum
    shard = Shard(rt.rank, rt.world_size, t_cfg.micro_batch, accum)
    cuda = engine.device.type == "cuda"
    loader = TrainLoader(cfg.data.codes, shard, t_cfg.seed, features="features" in source.batch_keys,
                         num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory and cuda,
                         prefetch_factor=cfg.data.prefetch_factor,
                         images=cfg.data.images if "images" in source.batch_keys else None)
    total_steps = t_cfg.max_steps if t_cfg.max_steps is not None else t_cfg.epochs * loader.steps_per_epoch
    runner = StepRunner(engine, fcfg, source, ema_state, cfg.optim, base_lr, total_steps)
    expected = {"model_name": cfg.model.name, "model_config": model_config_dict(gpt),
                "heads": heads_signature(fcfg), "precision": t_cfg.precision,
                "engine": {"backend": rt.backend,
                           "zero_stage": t_cfg.zero_stage if rt.backend == "deepspeed" else None,
                           # ZeRO >= 1 optimizer shards only load into the same world size
                           "world_size": rt.world_size if rt.backend == "deepspeed" and t_cfg.zero_stage >= 1
                           else None},
                "ema": {"enabled": cfg.ema.enabled},
                "data": {"codes_fingerprint": store_fingerprint(cfg.data.codes)}}
    return Run(cfg, rt, gpt, fcfg, source, engine, ema_state, loader, runner, accum, total_steps, base_lr, expected)


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training described by a validated config in this process. Rank 0 holds the run
    folder's lock throughout (``mirai.trainer.runlock``); early ends raise ``mirai.trainer.stop.RunStop``."""
    from mirai.launcher import launcher_env
    from mirai.trainer.runlock import RunLock
    rank, _, _ = launcher_env()
    with RunLock(cfg.run_dir) if rank == 0 else nullcontext():     # one trainer per run folder
        return _train(cfg)


def _train(cfg: Config) -> TrainResult:
    from mirai.trainer.distributed import cpu_group
    from mirai.trainer.divergence import DivergenceGuard
    from mirai.trainer.logging import MetricsLogger, flops_per_image, peak_flops
    from mirai.trainer.stop import LauncherWatch, StopAgreement, Stopped, StopSignals, naming_collective

    t_cfg = cfg.train
    timeout = t_cfg.collective_timeout_s
    with naming_collective("the set-up (process group, engine, first broadcasts)", timeout):
        run = build_run(cfg)
    rt, engine, loader, runner = run.runtime, run.engine, run.loader, run.runner
    run_dir = cfg.run_dir
    total_steps, accum = run.total_steps, run.accum
    end_step = min(total_steps, t_cfg.stop_at) if t_cfg.stop_at is not None else total_steps
    ckpt, start_step = _resume(run)

    if rt.is_main:                                              # after a successful resume check
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # ---- loop
    logger = MetricsLogger(run_dir, rt.is_main, total_steps, start_step, t_cfg.tensorboard, t_cfg.progress)
    if rt.is_main:
        logger.message(_start_line(run, ckpt, start_step, end_step))
    flops = (*flops_per_image(run.source, run.gpt.config, run.fcfg),
             peak_flops(t_cfg.peak_flops, engine.device))           # (total, backbone) per image, peak FLOP/s
    guard = DivergenceGuard(runner.meter, engine, run.ema_state, t_cfg.loss_spike_factor, cfg.model.vocab_size,
                            start_step, ckpt)
    agreement = StopAgreement(cpu_group(timeout))              # every rank stops after the same step
    launcher = LauncherWatch()
    engine.train()
    loader.start(start_step)
    batches_iter = iter(loader)
    metrics: list[dict[str, Any]] = []
    last_ckpt = None
    t_last, last_log = time.perf_counter(), start_step
    with StopSignals(rt.rank) as signals, closing(loader), closing(logger):
        for step in range(start_step, end_step):
            epoch = loader.epoch_of(step)
            batches = [next(batches_iter) for _ in range(accum)]
            done = step + 1
            with naming_collective(f"step {done} (forward, backward with its gradient reduction, optimizer step)",
                                   timeout):
                runner.run(step, epoch, batches)
            logger.advance()
            with naming_collective(f"the stop agreement after step {done} (all-reduce over gloo)", timeout):
                stop = agreement.poll(signals.received, launcher.gone())     # same on every rank
            if stop:
                loader.close()                  # no more batches: its workers exit cleanly before the checkpoint
            if done % t_cfg.log_every == 0 or done == end_step or stop:
                with naming_collective(f"the loss all-reduce of log step {done}", timeout):
                    losses = runner.meter.read()                        # the one host sync
                record = _log_record(run, done, epoch, losses, done - last_log, time.perf_counter() - t_last, *flops)
                metrics.append(record)
                logger.log(record)
                with naming_collective(f"the divergence check of log step {done}", timeout):
                    guard.check_log(done, losses["ntp_loss"])           # non-finite or spiking: Diverged
                t_last, last_log = time.perf_counter(), done
            if done % t_cfg.ckpt_every == 0 or done == end_step or stop:
                with naming_collective(f"the checkpoint of step {done}", timeout):
                    guard.check_checkpoint(done)                        # never save a non-finite state
                    last_ckpt = _save(run, done)
                guard.last_checkpoint = last_ckpt
                t_last = time.perf_counter()
            if stop and done < end_step:                # at the last step the run has simply finished
                raise Stopped(f"stopped after step {done} of {total_steps}: {stop}. Checkpoint {last_ckpt} is "
                              "written; resume with the same command")
        agreement.close()
    return TrainResult(run_dir=run_dir, step=max(end_step, start_step), metrics=metrics, checkpoint=last_ckpt)


def _resume(run: Run) -> tuple[Path | None, int]:
    """(checkpoint resumed from or None, first step): the newest checkpoint that verifies, restored into the
    engine, the EMA and the loader (see mirai.checkpoint.training)."""
    from mirai.checkpoint import CheckpointError, load_training_checkpoint, resume_checkpoint
    ckpt = resume_checkpoint(run.cfg.train.resume, run.cfg.run_dir, run.runtime)
    if ckpt is None:
        return None, 0
    meta = load_training_checkpoint(ckpt, runtime=run.runtime, engine=run.engine, ema_state=run.ema_state,
                                    expected=run.expected, loader_state=run.loader.state_dict(0))
    start_step = int(meta["step"])
    if start_step > run.total_steps:
        raise CheckpointError(f"{ckpt / 'meta.json'}: step {start_step} is past this run's {run.total_steps} steps")
    return ckpt, start_step


def _start_line(run: Run, ckpt: Path | None, start_step: int, end_step: int) -> str:
    """The run's first log line: model, engine, batching, foresight mode, steps."""
    cfg, t_cfg = run.cfg, run.cfg.train
    n_params = run.engine.gpt_param_count()
    return (f"mirai train: {cfg.name} -> {cfg.run_dir} | {cfg.model.name} "
            f"{n_params / 1e6:.1f}M params | {run.runtime.engine_note} "
            f"| world {run.runtime.world_size} "
            f"| micro {t_cfg.micro_batch} x accum {run.accum} | foresight {run.fcfg.mode} | steps "
            f"{start_step}->{end_step} of {run.total_steps} ({run.loader.steps_per_epoch}/epoch)"
            + (f" | resumed from {ckpt}" if ckpt is not None else ""))


def _log_record(run: Run, done: int, epoch: int, losses: dict[str, Any], steps: int, seconds: float,
                fl_total: float, fl_backbone: float, peak: float | None) -> dict[str, Any]:
    """A metrics.jsonl line for the ``steps`` optimizer steps that took ``seconds`` up to step ``done``."""
    dt = max(seconds, 1e-9)
    img_rank = steps * run.accum * run.cfg.train.micro_batch / dt
    state = run.runner.state()
    return {"step": done, "epoch": epoch, **losses,
            "foresight_loss": sum(lam * h for lam, h in zip(state["lambdas"], losses["head_loss"])),
            "lambdas": state["lambdas"], "lr": state["lr"], "grad_norm": run.engine.grad_norm(),
            "img_per_s_per_gpu": img_rank, "img_per_s": img_rank * run.runtime.world_size,
            "step_time_s": dt / steps, "tflops_per_gpu": img_rank * fl_total / 1e12,
            "mfu": None if peak is None else img_rank * fl_total / peak,
            "backbone_tflops_per_gpu": img_rank * fl_backbone / 1e12,
            "backbone_mfu": None if peak is None else img_rank * fl_backbone / peak}


def _save(run: Run, done: int) -> Path:
    """The training checkpoint of step ``done`` (collective; mirai.checkpoint.training)."""
    from mirai.checkpoint import save_training_checkpoint
    cfg, loader = run.cfg, run.loader
    return save_training_checkpoint(
        cfg.run_dir, done, runtime=run.runtime, engine=run.engine, ema_state=run.ema_state,
        loader_state=loader.state_dict(done), keep_last=cfg.train.keep_last,
        meta={**run.expected, "epoch": loader.epoch_of(done), "total_steps": run.total_steps,
              "world_size": run.runtime.world_size, "name": cfg.name})
