"""Training logs: tqdm progress bar (rank 0), ``metrics.jsonl`` and optional TensorBoard events.

Nothing here touches the GPU between log steps: the step loop accumulates losses in device tensors
(``LossMeter``) and only ``LossMeter.read()`` on a log step synchronises (one all-reduce of one small
tensor across ranks, one copy to the host). The meter also keeps, on the device, the first optimizer
step whose loss (any micro-batch, any head) or gradient norm was not finite (``end_step``: five
element-wise kernels per step, no read); ``first_bad_step()`` (log steps and before each checkpoint:
one more small all-reduce) reports it, the same on every rank.

``metrics.jsonl`` holds each step once: a resumed run first drops the lines of steps after the step it
resumed from (logged by a run killed before its next checkpoint; an atomic rewrite), and TensorBoard
events past it are purged the same way.

A ``metrics.jsonl`` line (one per log step, rank 0)::

    {"step", "epoch", "loss", "ntp_loss", "foresight_loss" (sum_k lambda_k L_k),
     "head_loss": [L_1 .. L_K], "lambdas": [..], "lr", "grad_norm" (global, before clipping; null where
     DeepSpeed does not report it: ZeRO-0 in fp32), "img_per_s_per_gpu", "img_per_s",
     "step_time_s", "tflops_per_gpu", "mfu", "backbone_tflops_per_gpu", "backbone_mfu", "time"}

FLOPs per image come from the run's foresight source (``ForesightSource.flops``, counted by
``mirai.metrics.flops.training_flops_per_image``: backbone fwd+bwd, plus the Mirai-E teacher forward and the
heads; an online encoder is counted too). MFU = achieved FLOP/s per GPU
divided by the peak: ``train.peak_flops``, else ``MIRAI_PEAK_FLOPS``, else by GPU name (H100: the
measured dense bf16 777e12; A100: 312e12); on CPU or unknown GPUs MFU is omitted (null).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

PEAKS = {"H100": 777e12, "H200": 777e12, "A100": 312e12}


def peak_flops(configured: float | None, device: torch.device) -> float | None:
    if configured:
        return float(configured)
    env = os.environ.get("MIRAI_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAKS.items():
        if key in name:
            return value
    return None


def flops_per_image(source, gpt_config, fcfg) -> tuple[float, float]:
    """(total, backbone) training FLOPs per image of this run: its foresight source's count
    (``ForesightSource.flops``) for the model and the resolved foresight config."""
    b = source.flops(gpt_config, fcfg)
    return b.total, b.backbone


NO_BAD_STEP = 2 ** 62      # LossMeter.first_bad while every step was finite


class LossMeter:
    """Device-side sums of the losses since the last log step, and the first non-finite step."""

    def __init__(self, k: int, device: torch.device):
        self.k = k
        self.device = device
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
        self.reset()

    def reset(self) -> None:
        # [loss, ntp, per_head_1..K, count]
        self.sums = torch.zeros(3 + self.k, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, ntp: torch.Tensor, per_head: torch.Tensor) -> None:
        self.sums[0] += loss.detach().float()
        self.sums[1] += ntp.detach().float()
        if self.k:
            self.sums[2:2 + self.k] += per_head.detach().float()
        self.sums[-1] += 1.0

    @torch.no_grad()
    def end_step(self, step: int, grad_norm: torch.Tensor | float | None) -> None:
        """After optimizer step `step` (numbered as logged, from 1): remember it as the first bad step when
        the losses summed since the last read, or this step's gradient norm, are not finite. Device ops only
        (an Inf or NaN in any summand makes the sum non-finite)."""
        total = self.sums[:-1].sum()
        if grad_norm is not None:
            total = total + grad_norm
        self.first_bad = torch.where(torch.isfinite(total), self.first_bad, self.first_bad.clamp(max=step))

    def first_bad_step(self) -> int | None:
        """The first step with a non-finite loss or gradient norm on any rank, or None (syncs; collective)."""
        bad = self.first_bad.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        step = int(bad)
        return None if step == NO_BAD_STEP else step

    def mark_bad(self, step: int, bad: torch.Tensor) -> None:
        """Fold a device flag found outside the step (non-finite weights after step `step`) into the first bad step."""
        self.first_bad = torch.where(bad, self.first_bad.clamp(max=step), self.first_bad)

    def read(self) -> dict[str, Any]:
        """Mean over micro-batches and ranks (syncs; log steps only), then reset."""
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        vals = sums.tolist()
        n = max(vals[-1], 1.0)
        self.reset()
        return {"loss": vals[0] / n, "ntp_loss": vals[1] / n, "head_loss": [v / n for v in vals[2:2 + self.k]]}


def keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the records of steps after `step` from a metrics.jsonl (and a line cut short by a kill), by an
    atomic rewrite when anything is dropped."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


class MetricsLogger:
    """metrics.jsonl + TensorBoard + progress bar on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, start_step: int,
                 tensorboard: bool = True, progress: bool = True):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_steps_up_to(self.path, start_step)
        self._fh = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None
        if progress:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train",
                                unit="step", smoothing=0.1)
            except ImportError:
                self.bar = None

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {**record, "time": time.time()}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        step = int(record["step"])
        if self.tb is not None:
            for key, value in record.items():
                if key in ("step", "time") or value is None:
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{key}/{i + 1}", v, step)
                elif isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.4f}", "img/s": f"{record.get('img_per_s', 0):.0f}"}
            if record.get("mfu") is not None:
                post["mfu"] = f"{100 * record['mfu']:.1f}%"
            self.bar.set_postfix(post, refresh=False)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self._fh.close()
