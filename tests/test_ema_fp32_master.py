"""The model EMA averages the fp32 MASTER weights under DeepSpeed bf16 (ZeRO-0/1/2/3, 2 ranks, gloo), and
the Mirai-E teacher follows it.

Under DeepSpeed bf16 the module's parameters are bf16 roundings of the optimizer's fp32 masters; the
released code and LlamaGen average fp32 weights. One 2-rank torchrun launch (the harness of
tests/test_distributed.py; this file is also its worker) runs two optimizer steps of Mirai-E per stage and
records, on rank 0 after construction and after each step: the consolidated fp32 masters
(``engine.full_state_dicts``), the consolidated EMA (``EMAState.full_state_dict``) and the teacher's
weights. The test process then computes the single-process fp32 EMA of those masters,
``ema_0 = master_0, ema_t = d * ema_{t-1} + (1 - d) * master_t``, and compares.

Tolerance: the run and the reference apply the same fp32 formula to the same fp32 numbers; the fused
kernel's fma may differ from the separate multiply-add by one rounding per step, so two steps stay
within 2 ulp (rtol 2.4e-7) and ``rtol=1e-6, atol=1e-9`` holds. Averaging the bf16 parameters instead
(the code before) is off by (1 - d) * |w| * 2^-9, about 4e-6 for |w| = 0.02 and d = 0.9, far outside it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import DEBUG_YAML, REPO, _free_port, _overrides

DECAY = 0.9
STEPS = 2
# stage -> foresight.target_dtype of its teacher: both teacher dtypes under sharded and whole masters
JOBS = {0: "fp32", 1: "fp32", 2: "bf16", 3: "bf16"}
COMMON = ["train.backend=deepspeed", "train.precision=bf16", "model.token_dropout_p=0", "model.resid_dropout_p=0",
          "model.ffn_dropout_p=0", "model.class_dropout_prob=0", f"ema.decay={DECAY}", "optim.warmup_steps=0",
          "foresight.mode=ema", "foresight.warmup_epochs=0"]


@pytest.fixture(scope="module")
def recorded(code_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32_master")
    jobs = [{"stage": stage, "out": str(root / f"z{stage}.pt"),
             "overrides": _overrides(code_store, root / f"z{stage}", [*COMMON, f"train.zero_stage={stage}",
                                                                      f"foresight.target_dtype={dtype}"])}
            for stage, dtype in JOBS.items()]
    job_file = root / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", str(job_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return {stage: torch.load(root / f"z{stage}.pt", weights_only=True) for stage in JOBS}


@pytest.mark.distributed
@pytest.mark.parametrize("stage", list(JOBS))
def test_ema_of_fp32_masters_equals_the_single_process_fp32_ema(recorded, stage):
    rec = recorded[stage]
    masters, emas, teachers = rec["masters"], rec["ema"], rec["teacher"]
    assert len(masters) == len(emas) == STEPS + 1
    ref = {n: t.clone() for n, t in masters[0].items()}                  # EMA at step 0 = the masters
    for step in range(STEPS + 1):
        if step:
            ref = {n: ref[n].mul(DECAY).add(masters[step][n], alpha=1 - DECAY) for n in ref}
            w = masters[step]["layers.0.attention.wqkv.weight"]
            assert not torch.equal(w, w.bfloat16().float())             # masters carry more than bf16 holds
        assert emas[step].keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(emas[step][n], ref[n], rtol=1e-6, atol=1e-9,
                                       msg=f"ZeRO-{stage} step {step} {n}")
        dtype = torch.float32 if JOBS[stage] == "fp32" else torch.bfloat16
        for n, t in teachers[step].items():                              # teacher = EMA in its own dtype
            assert t.dtype == dtype and torch.equal(t, emas[step][n].to(dtype)), f"ZeRO-{stage} step {step} {n}"
    assert rec["sharded"] == (stage >= 1)
    if stage >= 1:      # each rank holds only its pieces of the EMA (about half of it with 2 ranks)
        full = sum(t.numel() for t in emas[0].values())
        assert all(n < full for n in rec["shadow_numel_per_rank"]) and sum(rec["shadow_numel_per_rank"]) >= full


def _worker(job_file: str) -> None:
    from mirai.config import load_config, validate
    from mirai.trainer.run import build_run
    from mirai.launcher import launcher_env
    from mirai.trainer.distributed import teardown
    for job in json.loads(Path(job_file).read_text()):
        cfg = load_config(DEBUG_YAML, job["overrides"])
        validate(cfg, world_size=launcher_env()[1])
        run = build_run(cfg)
        run.loader.start(0)
        batches = iter(run.loader)
        rec = {"masters": [], "ema": [], "teacher": [], "sharded": run.ema_state.sharded}

        def snapshot() -> None:
            masters, _ = run.engine.full_state_dicts()                     # collective
            ema = run.ema_state.full_state_dict()                          # collective when sharded
            rec["masters"].append(masters)
            rec["ema"].append(ema)
            rec["teacher"].append({n: p.detach().cpu().clone() for n, p in run.source.module.named_parameters()})

        snapshot()
        for step in range(STEPS):
            run.runner.run(step, 0, [next(batches) for _ in range(run.accum)])
            snapshot()
        counts = [None] * run.runtime.world_size
        torch.distributed.all_gather_object(counts, sum(t.numel() for t in run.ema_state.shadow.values()))
        rec["shadow_numel_per_rank"] = counts
        if run.runtime.is_main:
            torch.save(rec, job["out"])
        run.runtime.barrier()
    teardown()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--worker") + 1])
