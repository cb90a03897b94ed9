"""CPU smoke tests of the benchmark scripts (their GPU numbers are in docs/performance.md, never asserted here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mirai import _ext

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def needs_op(op: str):
    """Skip a benchmark that validates and times mirai._C's `op` when the extension lacks it."""
    return pytest.mark.skipif(not _ext.has_op(op), reason=f"mirai._C lacks {op} ({_ext.load_error()})")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bench_step_times_a_point_and_skips_one_past_its_timeout():
    common = [str(BENCH / "bench_step.py"), "--device", "cpu", "--backend", "single", "--modes", "none",
              "--warmup", "1", "--steps", "2", "--no-save"]
    ok = _run(*common, "--variant=--fuse-ema")
    assert ok.returncode == 0, ok.stderr[-2000:]
    for label in ("GPT-debug none micro 4:", "GPT-debug none micro 4 [--fuse-ema]:"):   # point, then A/B
        line = next(ln for ln in ok.stdout.splitlines() if ln.startswith(label))
        assert float(line.split(",")[1].split()[0]) > 0                 # images/s
    slow = _run(*common, "--point-timeout", "0.01")
    assert slow.returncode == 1 and "TIMED OUT after" in slow.stderr
    bad = _run(*common, "--variant=--fuse-emma")
    assert bad.returncode == 2 and "--fuse-emma is not a flag" in bad.stderr


def test_bench_step_record_says_what_ran():
    """One point's JSON record names its variant, the settings the variant changed and the kernels' state."""
    point = json.dumps({"model": "GPT-debug", "mode": "ema", "micro": 4, "variant": "--fuse-ema"})
    out = _run(str(BENCH / "bench_step.py"), "--point", point, "--device", "cpu", "--backend", "single",
               "--warmup", "1", "--steps", "1", "--fuse-ema")
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_STEP_RESULT "))
                     .split(" ", 1)[1])
    assert rec["variant"] == "--fuse-ema" and rec["fuse_ema"] is True and rec["mode"] == "ema"
    assert set(rec["kernels"]) == {"self_checks", "fallbacks"}
    assert rec["kernels"]["self_checks"] == {}          # self-checks are for CUDA kernels; this ran on the CPU
    assert all(":" in f for f in rec["kernels"]["fallbacks"])


@needs_op("foresight_fused_cpu")
def test_bench_foresight_validates_then_times_on_cpu(tmp_path):
    out = _run(str(BENCH / "bench_foresight.py"), "--device", "cpu", "--small", "--providers", "reference,fused",
               "--modes", "full", "--warmup", "1", "--iters", "2", "--results-dir", str(tmp_path),
               "--plans", "auto,1x16,2x40,budget=0.05")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("validation OK") == 4                                  # every schedule checked first
    recs = [json.loads(ln) for ln in (tmp_path / "foresight.jsonl").read_text().splitlines()]
    assert {r["provider"].split("@")[0] for r in recs} == {"reference", "fused"}   # fused@<G>x<M>
    fused = [r for r in recs if r["provider"].startswith("fused")]
    assert {(r["group_heads"], r["chunk_tokens"]) for r in fused} >= {(3, 72), (1, 16), (2, 40)}
    assert all(r["plan_mb"] > 0 for r in fused)
    assert all(r["ms"] > 0 for r in recs)


def test_bench_rope_checks_every_formulation_on_cpu():
    out = _run(str(BENCH / "bench_rope.py"), "--device", "cpu", "--small", "--iters", "2", "--layouts", "bhtd",
               "--no-save")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("small ")]
    assert {r[1] for r in rows} == {"flip", "unbind", "complex", "bits"}     # each validated, then timed
    assert all(float(r[4]) > 0 for r in rows)


def test_bench_optim_validates_then_times_on_cpu(tmp_path):
    out = _run(str(BENCH / "bench_optim.py"), "--small", "--warmup", "1", "--iters", "2",
               "--results-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "validation (GPT-debug): fused op matches torch_fused+ema" in out.stdout
    recs = [json.loads(ln) for ln in (tmp_path / "optim.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in recs} == {"torch_fused+ema", "fused", "AdamWEMA"}
    assert all(r["ms"] > 0 and r["gbps"] > 0 and r["model"] == "GPT-debug" for r in recs)
    assert {r["provider"]: r["bytes_per_param"] for r in recs} == {"torch_fused+ema": 46, "fused": 38, "AdamWEMA": 38}


@needs_op("ce_softmax_grad_")
def test_bench_linear_ce_validates_then_times_on_cpu(tmp_path):
    out = _run(str(BENCH / "bench_linear_ce.py"), "--small", "--device", "cpu", "--warmup", "1", "--iters", "2",
               "--results-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[small] row pass: loss rel err" in out.stdout and "[small] whole op: loss/dh/dw" in out.stdout
    recs = [json.loads(ln) for ln in (tmp_path / "linear_ce.jsonl").read_text().splitlines()]
    assert {(r["level"], r["provider"]) for r in recs} == {(lv, p) for lv in ("row pass", "fwd+bwd")
                                                          for p in ("fused", "reference")}
    assert all(r["level"] == "row pass" or r["ms"] > 0 for r in recs)


def test_bench_checkpoint_io_validates_then_measures(tmp_path):
    out = _run(str(BENCH / "bench_checkpoint_io.py"), "--mib", "4", "--repeats", "1", "--results-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(ln) for ln in (tmp_path / "checkpoint_io.jsonl").read_text().splitlines()]
    assert {"save_file", "torch.save + fsync + file_digest", "sha256 in memory"} <= {r["case"] for r in recs}
    assert all(r["bytes"] == 4 * 2 ** 20 and r["user_s"] >= 0 for r in recs)


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_host_times_each_engine_on_two_ranks(tmp_path):
    """The host-cost benchmark's smoke mode: 2 ranks, GPT-debug, single / DDP / ZeRO-2 through the trainer's
    step, a record per engine with its timing, its overhead over the single process and its counts."""
    out = _run(str(BENCH / "bench_host.py"), "--smoke", "--results-dir", str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = {r["variant"]: r for r in map(json.loads, (tmp_path / "host.jsonl").read_text().splitlines())}
    assert {v: (r["backend"], r["zero_stage"]) for v, r in recs.items()} == {
        "single": ("single", None), "ddp": ("ddp", None), "zero2": ("deepspeed", 2)}
    assert all(r["cpu_ms"] > 0 and r["wall_ms"] > 0 and r["world"] == 2 and r["cpu"] and r["torch"]
               for r in recs.values())
    assert recs["single"]["cpu_overhead_ms"] == 0 and recs["single"]["ops_overhead"] == 0
    # the gradient all-reduce and the engines' per-parameter work are counted; the plain engine's step is their floor
    assert 0 < recs["ddp"]["ops_overhead"] < recs["zero2"]["ops_overhead"]
    assert recs["zero2"]["param_tensors"] == recs["single"]["param_tensors"] == 24     # GPT-debug + Mirai-E heads
