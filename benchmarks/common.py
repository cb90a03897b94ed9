"""Shared helpers of the benchmark scripts (``benchmarks/bench_*.py``).

Small API, import-light (torch only):

    device_name(device) -> str           GPU name ("NVIDIA H100 80GB HBM3") or the CPU model
    git_commit() -> str                  short commit of the checkout (+ "-dirty"), or "unknown"
    env_record(device) -> dict           gpu, device, commit, torch, cuda, python, time (for JSON lines)
    time_fn(fn, device, warmup=3, iters=20) -> Timing
                                         median/min/max ms; CUDA events around each call on CUDA
                                         (one sync at the end), time.perf_counter on CPU
    copy_bandwidth_gbs(device, nbytes=1 GiB) -> float
                                         measured device-to-device copy bandwidth, GB/s (1e9),
                                         counting the bytes read plus the bytes written
    append_jsonl(name, records) -> Path  append dicts to benchmarks/results/<name>.jsonl
    print_table(rows, columns)           fixed-width table of dicts to stdout

Benchmarks validate their results before timing and never assert on speed.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "Timing", "append_jsonl", "copy_bandwidth_gbs", "device_name", "env_record",
           "git_commit", "print_table", "time_fn"]


@dataclass
class Timing:
    """Wall time of one call, in milliseconds, over ``iters`` timed calls after warm-up."""

    median_ms: float
    min_ms: float
    max_ms: float
    iters: int


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_record(device: str | torch.device) -> dict:
    """Fields every benchmark JSON line carries."""
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": device_name(device),
        "device": torch.device(device).type,
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def time_fn(fn: Callable[[], object], device: str | torch.device, warmup: int = 3, iters: int = 20) -> Timing:
    """Median time of ``fn()`` after ``warmup`` untimed calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        ms = [s.elapsed_time(e) for s, e in events]
    else:
        ms = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(ms), min(ms), max(ms), iters)


def copy_bandwidth_gbs(device: str | torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s: (read + write bytes) / median time of ``dst.copy_(src)``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=iters)
    del src, dst
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def append_jsonl(name: str, records: Iterable[dict], results_dir: Path | None = None) -> Path:
    """Append ``records`` as JSON lines to ``<results_dir or benchmarks/results>/<name>.jsonl``."""
    path = Path(results_dir or RESULTS_DIR) / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=False) + "\n")
    return path


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
