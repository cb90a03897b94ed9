"""Where a data-parallel command runs: rank, world size and device from the launcher's environment, and its
process group (``mirai prepare`` and ``mirai sample`` under torchrun; the trainer has its own set-up with
backends and timeouts in ``mirai.trainer.distributed``, reading the environment here too).

    rank, world, local = launcher_env()                      # the one reader of the launcher's variables
    rank, world, device = setup_distributed(device_arg)     # creates the process group when world > 1
    barrier()                                                # no-op without a process group
    close_process_group()
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (torchrun and the deepspeed launcher set
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): 0, 1, 0 without one; ``LOCAL_RANK`` unset: the rank (one host)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def local_world_size(world_size: int) -> int:
    """Ranks on this host, which share its memory (torchrun: ``LOCAL_WORLD_SIZE``, the deepspeed launcher:
    ``LOCAL_SIZE``; neither: `world_size`, one host)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))


def under_launcher() -> bool:
    """True when a multi-process launcher started this process (it set ``LOCAL_RANK``)."""
    return "LOCAL_RANK" in os.environ


def setup_distributed(device_arg: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world, device) from the launcher's environment (``launcher_env``); creates the process group
    when world > 1 (nccl on CUDA, gloo on CPU). ``device_arg`` None: cuda:LOCAL_RANK when CUDA is available,
    else cpu."""
    rank, world, local = launcher_env()
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close_process_group() -> None:
    """Destroy the process group ``setup_distributed`` made, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
