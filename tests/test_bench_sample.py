"""CPU smoke test of benchmarks/bench_sample.py (its GPU numbers go to docs/sampling.md, never asserted here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sample.py"


@pytest.mark.slow
def test_bench_sample_validates_then_times_every_variant_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--small", "--compile-backend", "eager",
                          "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "sample.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in recs] == ["eager", "static", "compile"]
    for r in recs:
        assert r["validated"] is True and r["model"] == "GPT-debug" and r["batch"] == 4
        assert r["tokens_img_s"] > 0 and r["e2e_img_s"] > 0 and r["tokens_per_image"] == 16
        assert {"gpu", "torch", "commit"} <= r.keys()
    assert "validated on 2 images" in out.stdout
