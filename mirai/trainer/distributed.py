"""Process setup: rank / world size from the launcher, device, backend choice, process group.

Launchers: a plain ``mirai train`` (one process), ``torchrun --nproc_per_node N -m mirai train`` and
``deepspeed --num_gpus N --module mirai train`` all set (or, for one process, we set) ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (read by ``mirai.launcher``, as
for every command); the ``--local_rank`` argument the deepspeed launcher passes is accepted and ignored
by the command line (the env wins).

Backend (``train.backend``): ``deepspeed`` (ZeRO 0..3), ``ddp`` (torch DistributedDataParallel) or
``single`` (one process, no wrapper); ``auto`` = single for one process (ZeRO partitions nothing on
one rank, and on one H100 DeepSpeed's per-parameter step bookkeeping made a GPT-B step 2.2x slower
than the plain engine), else what the run's planner chose (``mirai.trainer.engine.choose_engine``: DDP
when a full replica fits, else the lowest ZeRO stage that does; without a planner, DDP), with DDP in
place of DeepSpeed when deepspeed cannot be imported. Without CUDA, DeepSpeed runs with
``DS_ACCELERATOR=cpu`` (set here before deepspeed is imported) and every process group uses gloo.
(Sharded fp32 masters and their reassembly: ``mirai.trainer.shards``.)

Timeouts: every process group gets ``train.collective_timeout_s`` (``setup(timeout_s=...)``; torch's
own default is 10 min for NCCL, 30 for gloo): a collective that waits longer for a hung or dead rank
fails instead of blocking forever (gloo raises on the waiting rank; NCCL's watchdog ends the process),
and ``mirai.trainer.stop.naming_collective`` names it. ``cpu_group`` makes the small gloo group the
stop agreement uses (host-side, so it never waits for the device). ``teardown(barrier=False)`` after
a failed collective skips the final barrier, which would only wait out the timeout again.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mirai.launcher import launcher_env, local_world_size


@dataclass
class Runtime:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str            # "deepspeed" | "ddp" | "single"
    zero_stage: int | None = None   # the ZeRO stage DeepSpeed runs at (None for ddp / single)
    engine_note: str = ""   # the planner's line: what was chosen, why, and the memory estimate

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' requested but torch sees no CUDA device")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def deepspeed_importable(device: torch.device) -> tuple[bool, str]:
    """(importable, reason). Sets DS_ACCELERATOR=cpu first when running without CUDA."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable"
        return False, f"{type(err).__name__}: {err}"
    return True, ""


def resolve_backend(requested: str, device: torch.device, world_size: int, chosen: str | None = None) -> str:
    """The backend to run: `requested` (train.backend), where "auto" takes `chosen` (the planner's pick;
    None: ddp) on more than one rank."""
    if requested == "auto" and world_size == 1:
        return "single"
    if requested == "auto":
        requested = chosen or "ddp"
        if requested == "deepspeed":
            ok, why = deepspeed_importable(device)
            if not ok:
                print(f"mirai train: deepspeed not importable ({why}); using torch DDP (train.backend=ddp), "
                      "ZeRO settings are ignored", flush=True)
                return "ddp"
    if requested == "deepspeed":
        ok, why = deepspeed_importable(device)
        if not ok:
            raise RuntimeError(f"train.backend: 'deepspeed' requested but deepspeed cannot be imported ({why}); "
                               "install it (pip install deepspeed) or set train.backend=ddp / single")
        return "deepspeed"
    if requested == "single" and world_size > 1:
        raise RuntimeError(f"train.backend: 'single' with WORLD_SIZE={world_size}; use ddp or deepspeed "
                           "under a multi-process launcher")
    return requested


def setup(requested_backend: str = "auto", requested_device: str = "auto", timeout_s: float = 1800.0,
          planner=None) -> Runtime:
    """Read the launcher env, pick device and backend, create the process group if needed (collectives
    fail after `timeout_s` seconds without an answer).

    ``planner(device, world_size, local_world_size)`` (optional) returns the engine choice of the run
    (``mirai.trainer.engine.EngineChoice``: ``backend``, ``zero_stage``, ``line()``)."""
    rank, world, local = launcher_env()
    device = pick_device(requested_device, local)
    choice = planner(device, world, local_world_size(world)) if planner is not None else None
    backend = resolve_backend(requested_backend, device, world, chosen=choice.backend if choice else None)
    stage = choice.zero_stage if choice is not None and backend == "deepspeed" else None
    note = "" if choice is None else choice.line() + ("" if backend == choice.backend else f" -> {backend}")
    if backend == "single":
        return Runtime(rank, world, local, device, backend, stage, note)
    if not (dist.is_available() and dist.is_initialized()):
        # one process without a launcher: make a one-member group on a free local port
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
        pg_backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "deepspeed":
            import logging

            import deepspeed
            from deepspeed.utils import logger as ds_logger
            ds_logger.setLevel(logging.WARNING)          # DeepSpeed prints its whole config per rank at INFO
            deepspeed.init_distributed(dist_backend=pg_backend, auto_mpi_discovery=False,
                                       timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(pg_backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return Runtime(rank, world, local, device, backend, stage, note)


def cpu_group(timeout_s: float):
    """A gloo process group over all ranks for small host-side collectives (collective to create); None
    without a process group or with one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def teardown(barrier: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
