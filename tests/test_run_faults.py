"""Every fault ends a run cleanly: divergence (never a checkpoint of a non-finite state), SIGTERM / Ctrl-C (a
checkpoint, exit 75), a second trainer on one run folder (refused at once), metrics after a kill and resume (each
step once), a hung rank (the collective times out, named), a dead launcher (its ranks stop, no orphans).

The process tests run the real command, ``python -m mirai train`` on configs/debug.yaml and the synthetic store,
in subprocesses; the divergence tests call ``mirai.commands.train.main`` in this process."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mirai.checkpoint import read_latest
from mirai.io.torch_files import load_file
from mirai.trainer.stop import EXIT_COLLECTIVE, EXIT_DIVERGED, EXIT_LOCKED, EXIT_STOPPED

from conftest import DEBUG_YAML, REPO, debug_overrides

LONG = ["train.max_steps=100000", "train.log_every=1", "train.ckpt_every=100000"]   # runs until stopped


# --------------------------------------------------------------------------- helpers
def _main(store: Path, out: Path, *extra: str) -> int:
    from mirai.commands.train import main
    return main(["--config", str(DEBUG_YAML), "--set", *debug_overrides(store, out), *extra])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **extra}


def _start(store: Path, out: Path, *extra: str, log: Path, env: dict[str, str] | None = None,
           launcher: list[str] | None = None) -> subprocess.Popen:
    cmd = [*(launcher or [sys.executable, "-m"]), "mirai", "train", "--config", str(DEBUG_YAML),
           "--set", *debug_overrides(store, out), *extra]
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)        # its own process group, as under a scheduler


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}" + (f"\n{log.read_text()[-3000:]}" if log else ""))


def _finite(ckpt: Path) -> bool:
    weights = load_file(ckpt / "model.pt")["model"]
    return all(torch.isfinite(v).all() for v in weights.values())


# --------------------------------------------------------------------------- divergence
def test_lr_1e30_stops_with_the_last_finite_checkpoint_kept(code_store, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _main(code_store, out, "optim.lr=1e30", "train.ckpt_every=1", "train.log_every=5")
    err = capsys.readouterr().err
    assert rc == EXIT_DIVERGED, err
    assert "training diverged: the loss, gradient norm or weights became non-finite at step 2" in err
    latest = read_latest(out)
    assert latest.name == "step_00000001" and _finite(latest)     # step 1's weights are huge but finite
    assert f"the last good checkpoint is {latest}" in err and "Traceback" not in err
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step_00000001"]


def test_lr_1e3_is_stopped_by_the_loss_spike_stop(code_store, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _main(code_store, out, "optim.lr=1e3", "train.log_every=1", "train.ckpt_every=1",
               "train.loss_spike_factor=3")
    err = capsys.readouterr().err
    assert rc == EXIT_DIVERGED and "loss spike: the NTP loss" in err, err
    bad = _steps(out)[-1]                                          # the spiking step is logged, not saved
    assert read_latest(out).name == f"step_{bad - 1:08d}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["ntp_loss"] > 3 * min(math.log(64), *(r["ntp_loss"] for r in records[:-1]))


def test_nan_teacher_features_stop_at_the_exact_step(code_store, tmp_path, capsys, monkeypatch):
    """NaN targets reaching the step (here: injected at the 4th step) are found at the next log / checkpoint
    check, which names the exact step, and nothing from then on is saved."""
    from mirai.foresight.sources import PrecomputedFeatures
    real, calls = PrecomputedFeatures.targets, []

    def poisoned(self, features):
        calls.append(1)
        out = real(self, features)
        return out * float("nan") if len(calls) == 7 else out        # micro-batch 7 = step 4 (2 per step)

    monkeypatch.setattr(PrecomputedFeatures, "targets", poisoned)
    out = tmp_path / "run"
    rc = _main(code_store, out, "foresight.mode=encoder", "foresight.use_precomputed_features=true", "foresight.head_out=32", "train.log_every=5", "train.ckpt_every=3")
    err = capsys.readouterr().err
    assert rc == EXIT_DIVERGED and "non-finite at step 4 (found at the check after step 5; steps up to 3" in err
    assert read_latest(out).name == "step_00000003" and _finite(read_latest(out))


def test_nan_in_the_optimizer_state_is_never_saved(code_store, tmp_path, capsys, monkeypatch):
    """A corrupted optimizer state makes the weights NaN while that step's loss and gradient norm are still
    finite: the weights check before the checkpoint refuses it."""
    out = tmp_path / "run"
    base = ["train.max_steps=6", "train.ckpt_every=1", "train.log_every=10"]
    assert _main(code_store, out, *base, "train.stop_at=2") == 0
    from mirai.trainer.engine import plain as engine_mod      # PlainEngine.load reads it from there
    real = engine_mod.load_optimizer_state

    def corrupt(optimizer, state):
        real(optimizer, state)
        next(iter(optimizer.state.values()))["exp_avg_sq"].fill_(float("nan"))

    monkeypatch.setattr(engine_mod, "load_optimizer_state", corrupt)
    assert _main(code_store, out, *base) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "weights became non-finite at step 3" in err and "steps up to 2 were checked finite" in err
    assert read_latest(out).name == "step_00000002" and _finite(read_latest(out))


# --------------------------------------------------------------------------- signals, lock, metrics
@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, 2), (signal.SIGINT, 0)], ids=["sigterm", "sigint"])
def test_signal_finishes_the_step_writes_a_checkpoint_and_resumes(code_store, tmp_path, sig, workers):
    """SIGTERM (to the whole process group, as a scheduler does: the loader workers get it too) or Ctrl-C: the
    step finishes, a checkpoint is written, exit 75 with "resume with the same command", no traceback; the same
    command then continues from that step."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(code_store, out, *LONG, f"data.num_workers={workers}", log=log)
    try:
        _wait_for(lambda: len(_steps(out)) >= 3, 60, "three logged steps", proc, log)
        os.killpg(proc.pid, sig) if sig == signal.SIGTERM else proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == EXIT_STOPPED, text
    assert "resume with the same command" in text and "Traceback" not in text
    stopped = _steps(out)[-1]
    assert read_latest(out).name == f"step_{stopped:08d}"            # the step it finished, not a ckpt_every one
    assert _main(code_store, out, f"train.max_steps=100000", "train.log_every=1",
                 f"train.stop_at={stopped + 2}", f"data.num_workers={workers}") == 0
    assert _steps(out) == list(range(1, stopped + 3))


def test_metrics_hold_each_step_once_after_a_kill_and_resume(code_store, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(code_store, out, "train.max_steps=100000", "train.log_every=1", "train.ckpt_every=3", log=log)
    try:
        while True:                     # freeze it when steps past its latest checkpoint are logged, then kill it
            _wait_for(lambda: len(_steps(out)) >= 4, 60, "four logged steps", proc, log)
            proc.send_signal(signal.SIGSTOP)
            latest = read_latest(out)
            if latest is not None and max(_steps(out)) > int(latest.name.split("_")[1]):
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.03)
        proc.kill()                                                  # SIGKILL: no chance to clean up
        proc.wait()
    finally:
        proc.kill()
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 99, "loss": 1.')                          # a line cut short by the kill
    killed_at, resumed_from = max(_steps(out)), int(read_latest(out).name.split("_")[1])
    assert killed_at > resumed_from
    assert _main(code_store, out, "train.max_steps=100000", "train.log_every=1", "train.ckpt_every=3",
                 f"train.stop_at={killed_at + 2}") == 0
    assert _steps(out) == list(range(1, killed_at + 3))


def test_a_second_trainer_on_the_same_run_folder_is_refused(code_store, tmp_path, capsys):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    first = _start(code_store, out, *LONG, log=log)
    try:
        _wait_for(lambda: len(_steps(out)) >= 1, 60, "the first trainer to start", first, log)
        t0 = time.monotonic()
        assert _main(code_store, out, *LONG, "train.stop_at=3") == EXIT_LOCKED     # (without the lock: trains)
        assert time.monotonic() - t0 < 30                        # at once (this includes building nothing)
        err = capsys.readouterr().err
        assert "another trainer is using this run folder" in err
        assert f"host {socket.gethostname()}, pid {first.pid}, started " in err
        first.kill()                                             # kill -9: the OS releases the lock
        first.wait()
    finally:
        first.kill()
    latest = _steps(out)[-1]
    assert _main(code_store, out, *LONG, f"train.stop_at={latest + 1}") == 0


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    from mirai.trainer.runlock import RunLock, RunLocked
    with RunLock(tmp_path / "run") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "run"):                                # released on exit
        pass


# --------------------------------------------------------------------------- several ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _two_ranks(store: Path, tmp_path: Path, *extra: str) -> tuple[Path, list[subprocess.Popen], list[Path]]:
    """Two ranks of one job as torchrun starts them (RANK, WORLD_SIZE, ... in the environment), DDP over gloo."""
    out, port = tmp_path / "run", str(_free_port())
    procs, logs = [], []
    for rank in (0, 1):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        logs.append(tmp_path / f"rank{rank}.txt")
        procs.append(_start(store, out, *LONG, "train.backend=ddp", *extra, log=logs[-1], env=env))
    return out, procs, logs


@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(code_store, tmp_path):
    out, procs, logs = _two_ranks(code_store, tmp_path)
    try:
        _wait_for(lambda: len(_steps(out)) >= 3, 90, "both ranks training", procs[0], logs[0])
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    text = logs[0].read_text()
    assert codes == [EXIT_STOPPED, EXIT_STOPPED], text + logs[1].read_text()
    assert "SIGTERM (on at least one rank)" in text and "resume with the same command" in text
    ckpt = read_latest(out)
    assert ckpt.name == f"step_{_steps(out)[-1]:08d}"
    assert all((ckpt / f"rank_{r:05d}.pt").is_file() for r in (0, 1))     # both ranks saved at that step


@pytest.mark.distributed
def test_a_hung_rank_ends_the_job_naming_the_collective(code_store, tmp_path):
    """Rank 1 of two is stopped with SIGSTOP: rank 0 fails after train.collective_timeout_s naming the
    collective, instead of waiting forever."""
    out, procs, logs = _two_ranks(code_store, tmp_path, "train.collective_timeout_s=4")
    try:
        _wait_for(lambda: len(_steps(out)) >= 3, 90, "both ranks training", procs[0], logs[0])
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            rc = procs[0].wait(timeout=90)
        except subprocess.TimeoutExpired:
            rc = None
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    text = logs[0].read_text()
    assert rc == EXIT_COLLECTIVE, f"rc {rc} after {waited:.0f} s\n{text[-3000:]}\n{logs[1].read_text()[-2000:]}"
    assert waited < 60 and "Traceback" not in text, text
    assert "rank 0: " in text and "failed: another rank did not answer within train.collective_timeout_s = 4 s" in text
    assert any(what in text for what in ("(forward, backward with its gradient reduction", "the stop agreement",
                                         "the loss all-reduce", "the divergence check")), text


@pytest.mark.distributed
def test_ranks_stop_when_their_launcher_is_killed(code_store, tmp_path):
    """torchrun killed with SIGKILL leaves its two ranks behind: they notice, agree on a step, write a checkpoint
    and exit instead of training on as orphans."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), "-m"]
    proc = _start(code_store, out, *LONG, "train.backend=ddp", log=log, launcher=torchrun)
    try:
        _wait_for(lambda: len(_steps(out)) >= 3, 120, "both ranks training", proc, log)
        children = [int(p) for t in Path(f"/proc/{proc.pid}/task").iterdir()
                    for p in (t / "children").read_text().split()]
        assert len(children) == 2
        proc.kill()
        proc.wait()
        _wait_for(lambda: not any(_alive(p) for p in children), 60, "the orphaned ranks to exit", None, log)
    finally:
        proc.kill()
        for pid in children if "children" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "the launcher of at least one rank exited" in text and "resume with the same command" in text, text
    assert read_latest(out).name == f"step_{_steps(out)[-1]:08d}"
