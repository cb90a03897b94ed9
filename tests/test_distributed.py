"""Two ranks under torchrun + gloo (DS_ACCELERATOR=cpu): ZeRO-0/1/2/3 and torch DDP (also with the fused
AdamW + EMA optimizer) match a single process; DeepSpeed resume.

One launch runs every distributed job (the process group and the deepspeed import are shared):
this file is also the worker script (``python -m torch.distributed.run ... tests/test_distributed.py
--worker jobs.json``), each job being one ``mirai.trainer.run.train`` call. The test process then runs the
same configs as a single plain-PyTorch process and compares per-step losses and the consolidated
fp32 weights, heads and EMA written to the checkpoints.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DEBUG_YAML = REPO / "configs" / "debug.yaml"

# no dropout, so two ranks and one process see the same computation
COMPARE = ["model.token_dropout_p=0", "model.resid_dropout_p=0", "model.ffn_dropout_p=0",
           "model.class_dropout_prob=0", "train.max_steps=2", "train.log_every=1", "train.ckpt_every=2",
           "ema.decay=0.9", "optim.warmup_steps=2"]   # lr changes per step: set_lr reaches every engine
MODES = {
    "none": [],
    "ema": ["foresight.mode=ema", "foresight.warmup_epochs=0"],
    "encoder": ["foresight.mode=encoder", "foresight.use_precomputed_features=true",
                "foresight.head_out=32"],
}
STAGES = (0, 1, 2, 3)
# resume under DeepSpeed (dropout on): 4 steps straight vs 2 + 2
RESUME = ["foresight.mode=ema", "foresight.warmup_epochs=0", "ema.decay=0.9",
          "train.max_steps=4", "train.log_every=1", "train.ckpt_every=2"]


def _overrides(store: Path, out: Path, extra: list[str]) -> list[str]:
    return [f"data.codes={store}", f"out_dir={out}", "train.progress=false", "train.tensorboard=false", *extra]


def _jobs(store: Path, root: Path) -> list[list[str]]:
    jobs = []
    for stage in STAGES:
        for mode, extra in MODES.items():
            jobs.append(_overrides(store, root / f"z{stage}_{mode}", ["train.backend=deepspeed",
                                                                      f"train.zero_stage={stage}", *COMPARE, *extra]))
    for mode, extra in MODES.items():
        jobs.append(_overrides(store, root / f"ddp_{mode}", ["train.backend=ddp", *COMPARE, *extra]))
    jobs.append(_overrides(store, root / "ddp_fused_ema", ["train.backend=ddp", "optim.fuse_ema=true", *COMPARE,
                                                               *MODES["ema"]]))
    for stage in (2, 3):
        common = ["train.backend=deepspeed", f"train.zero_stage={stage}", *RESUME]
        jobs.append(_overrides(store, root / f"resume{stage}_straight", common))
        jobs.append(_overrides(store, root / f"resume{stage}_split", [*common, "train.stop_at=2"]))
        jobs.append(_overrides(store, root / f"resume{stage}_split", common))
    return jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from mirai.checkpoint import read_latest
    from mirai.io.torch_files import load_file
    ckpt = read_latest(run)
    model = load_file(ckpt / "model.pt")
    out = {f"model.{k}": v for k, v in model["model"].items()}
    out.update({f"heads.{k}": v for k, v in (model["heads"] or {}).items()})
    out.update({f"ema.{k}": v for k, v in load_file(ckpt / "ema.pt")["ema"].items()})
    return out


@pytest.fixture(scope="module")
def launched(code_store, tmp_path_factory):
    """Run every distributed job in one 2-rank torchrun launch."""
    root = tmp_path_factory.mktemp("dist")
    job_file = root / "jobs.json"
    job_file.write_text(json.dumps(_jobs(code_store, root)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", str(job_file)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("mode", list(MODES))
def test_zero_stages_and_ddp_match_single_process(launched, code_store, tmp_path, mode):
    """Every 2-rank run of a mode (DeepSpeed ZeRO-0..3; the plain engine under DDP, for Mirai-E also with
    optim.fuse_ema) gives the single process's losses, gradient norms and weights."""
    from mirai.config import load_config
    from mirai.trainer.run import train
    ref_dir = tmp_path / f"single_{mode}"
    train(load_config(DEBUG_YAML, _overrides(code_store, ref_dir, ["train.backend=single", *COMPARE, *MODES[mode]])))
    ref_m, ref_w = _metrics(ref_dir), _weights(ref_dir)
    assert ref_w["model.output.weight"].abs().max() > 0          # the step moved the zero-initialised output
    runs = [(f"z{stage}_{mode}", f"ZeRO-{stage}") for stage in STAGES] + [(f"ddp_{mode}", "DDP")]
    if mode == "ema":
        runs.append(("ddp_fused_ema", "DDP + fuse_ema"))
    for folder, label in runs:
        m, w = _metrics(launched / folder), _weights(launched / folder)
        for step in (1, 2):
            for key in ("loss", "ntp_loss", "head_loss", "grad_norm"):
                if key == "grad_norm" and label == "ZeRO-0":
                    assert m[step][key] is None                  # DeepSpeed reports none at ZeRO-0 in fp32
                    continue
                torch.testing.assert_close(torch.tensor(m[step][key]), torch.tensor(ref_m[step][key]),
                                           rtol=1e-5, atol=1e-6, msg=f"{label} {mode} step {step} {key}")
        assert w.keys() == ref_w.keys()
        for k in w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=2e-6, msg=f"{label} {mode} {k}")


@pytest.mark.distributed
@pytest.mark.parametrize("stage", (2, 3))
def test_resume_under_deepspeed(launched, stage):
    straight, split = launched / f"resume{stage}_straight", launched / f"resume{stage}_split"
    a, b = _metrics(straight), _metrics(split)
    lines = (split / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]     # 1, 2 then resumed 3, 4
    for step in (3, 4):
        for key in ("loss", "ntp_loss", "head_loss", "grad_norm"):
            assert a[step][key] == b[step][key], (stage, step, key)
    wa, wb = _weights(straight), _weights(split)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (stage, k)


def _worker(job_file: str) -> None:
    from mirai.config import load_config, validate
    from mirai.trainer.run import train
    from mirai.launcher import launcher_env
    from mirai.trainer.distributed import teardown
    for overrides in json.loads(Path(job_file).read_text()):
        cfg = load_config(DEBUG_YAML, overrides)
        validate(cfg, world_size=launcher_env()[1])
        train(cfg)
    teardown()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--worker") + 1])
