"""What is loaded is what was saved: content hashes, resume fallback, the ``latest`` pointer, step
cross-checks, run-signature refusals, non-finite weights, a full disk. Each test corrupts, plants or
fakes one fault on a copy of one small Mirai-E run (4 steps, checkpoints at 2 and 4)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import flip, rehash, tokenizer_file

from mirai.checkpoint import CheckpointError, load_gpt, read_latest, verify
from mirai.io.torch_files import load_file

REPO = Path(__file__).resolve().parent.parent
DEBUG_YAML = REPO / "configs" / "debug.yaml"
MIRAI_E = ["train.backend=single", "foresight.mode=ema", "foresight.warmup_epochs=0",
           "ema.decay=0.9", "train.ckpt_every=2", "train.keep_last=5"]


def _cfg(store: Path, out: Path, *extra: str):
    from mirai.config import load_config
    return load_config(DEBUG_YAML, [f"data.codes={store}", f"out_dir={out}", "train.progress=false",
                                    "train.tensorboard=false", *MIRAI_E, *extra])


def _train(store: Path, out: Path, *extra: str):
    from mirai.trainer.run import train
    return train(_cfg(store, out, *extra))


@pytest.fixture(scope="module")
def run_dir(code_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "run"
    _train(code_store, out, "train.max_steps=4")
    return out


@pytest.fixture
def run(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def test_every_file_is_recorded_with_its_hash_finite_flags_and_step(run_dir):
    from mirai.io.torch_files import file_digest
    c = read_latest(run_dir)
    meta = verify(c, content=True)
    assert meta["format"] == "mirai-train-ckpt-v2" and meta["finite"] == {"model": True, "ema": True}
    on_disk = sorted(str(p.relative_to(c)) for p in c.rglob("*") if p.is_file() and p.name != "meta.json")
    assert sorted(meta["files"]) == on_disk
    for rel, entry in meta["files"].items():                   # hashed while written == hashed when read back
        assert entry == {"bytes": (c / rel).stat().st_size, "sha256": file_digest(c / rel)}, rel
    assert load_file(c / "model.pt")["step"] == 4


def test_a_16_byte_flip_is_refused_by_export_sample_and_load_gpt(run, tmp_path, capsys):
    from mirai.commands.export import main as export_main
    from mirai.commands.sample import main as sample_main
    model = ckpt(run, 4) / "model.pt"
    flip(model)
    verify(ckpt(run, 4))                                        # same size: the size check cannot see it
    with pytest.raises(CheckpointError, match=r"model\.pt: content differs from what was saved"):
        verify(ckpt(run, 4), content=True)
    assert export_main(["--run", str(run), "--out", str(tmp_path / "e.pt")]) != 0
    assert f"{model}: content differs" in capsys.readouterr().err and not (tmp_path / "e.pt").exists()
    with pytest.raises(CheckpointError, match=r"model\.pt: content differs"):
        load_gpt(run)
    tok = tokenizer_file(tmp_path)
    rc = sample_main(["--ckpt", str(run), "--tokenizer", str(tok), "--num", "1", "--no-png", "--no-progress",
                      "--out", str(tmp_path / "s")])
    assert rc != 0 and "model.pt: content differs" in capsys.readouterr().err


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(code_store, run, capsys):
    state = ckpt(run, 4) / "engine" / "state.pt"
    flip(state)                                                 # the optimizer state of step 4
    with pytest.warns(RuntimeWarning, match=r"step_00000004: skipped for resuming \(.*step_00000004/engine/state\.pt: "
                                            r"content differs.*\); resuming from .*step_00000002"):
        res = _train(code_store, run, "train.max_steps=6")
    out = capsys.readouterr().out
    assert "steps 2->6" in out and "resumed from" in out and res.step == 6
    assert read_latest(run).name == "step_00000006"
    flip(ckpt(run, 6) / "ema.pt")
    (ckpt(run, 4) / "rank_00000.pt").unlink()
    flip(ckpt(run, 2) / "model.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint verifies: step_00000006: .*ema\.pt.*; "
                                              r"step_00000004: .*rank_00000\.pt: missing.*; step_00000002: .*model\.pt"):
        _train(code_store, run, "train.max_steps=8")


def test_latest_must_name_a_folder_inside_the_runs_checkpoints(code_store, run, run_dir, tmp_path):
    pointer = run / "checkpoints" / "latest"
    outside = read_latest(run_dir)                              # a valid checkpoint, of another folder
    for name in ("../checkpoints/step_00000004", str(outside), "step_00000004/../step_00000002"):
        pointer.write_text(name + "\n")
        with pytest.raises(CheckpointError, match=r"latest: names .* not a checkpoint folder name"):
            read_latest(run)
        with pytest.raises(CheckpointError, match=r"latest: names"):
            _train(code_store, run, "train.max_steps=6")
    link = run / "checkpoints" / "step_00000008"
    link.symlink_to(outside, target_is_directory=True)
    pointer.write_text("step_00000008\n")
    with pytest.raises(CheckpointError, match=r"latest: names 'step_00000008', a link leading out"):
        read_latest(run)
    with pytest.raises(CheckpointError, match=r"a link leading out"):
        _train(code_store, run, "train.max_steps=10")


def test_the_step_is_cross_checked(code_store, run, tmp_path):
    from mirai.checkpoint import export
    shutil.copy(ckpt(run, 2) / "model.pt", ckpt(run, 4) / "model.pt")    # files of two saves mixed
    rehash(ckpt(run, 4), "model.pt")
    with pytest.raises(CheckpointError, match=r"step_00000004/model\.pt: holds the weights of step 2.*records step 4"):
        export(run, tmp_path / "e.pt")
    with pytest.warns(RuntimeWarning, match=r"holds the weights of step 2.*resuming from .*step_00000002"):
        _train(code_store, run, "train.max_steps=6")
    meta_path = ckpt(run, 6) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["step"] = 5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta\.json: records step 5, the folder is step_00000006"):
        read_latest(run)


def test_resume_refuses_a_changed_layout_ema_or_code_store(code_store, run, tmp_path):
    from mirai.data.synthetic import write_synthetic_store
    with pytest.raises(CheckpointError, match=r"heads\.layout: checkpoint '2d', run '1d'"):
        _train(code_store, run, "train.max_steps=6", "foresight.layout=1d")
    with pytest.raises(CheckpointError, match=r"ema\.enabled: checkpoint True, run False"):
        _train(code_store, run, "train.max_steps=6", "foresight.mode=none", "ema.enabled=false")
    meta = json.loads((code_store / "meta.json").read_text())
    other = write_synthetic_store(tmp_path / "other", seed=1, num_images=meta["num_images"],
                                  grid_size=meta["grid_size"], vocab_size=meta["vocab_size"],
                                  num_classes=meta["num_classes"], num_aug=meta["num_aug"],
                                  features_dim=meta["features"]["dim"])
    with pytest.raises(CheckpointError, match=r"data\.codes_fingerprint: checkpoint '\w+', run '\w+'"):
        _train(other, run, "train.max_steps=6")


def test_nonfinite_weights_are_flagged_kept_from_pruning_and_refused(code_store, tmp_path, monkeypatch, capsys):
    """Saves 3, 4 and 5 see NaN weights (as after a divergence): with keep_last=2 the newest finite checkpoint
    (step 2) survives pruning, and export / sample / load_gpt refuse the NaN ones naming file and tensor."""
    from mirai.commands.export import main as export_main
    from mirai.trainer.engine import PlainEngine
    from mirai.trainer.ema_state import EMAState
    saves = {"model": 0, "ema": 0}

    def poisoned(which, real):
        def call(self, *a, **k):
            out = real(self, *a, **k)
            saves[which] += 1
            sd = out[0] if which == "model" else out
            if saves[which] >= 3:
                sd["tok_embeddings.weight"][0, 0] = float("nan")
            return out
        return call
    monkeypatch.setattr(PlainEngine, "full_state_dicts", poisoned("model", PlainEngine.full_state_dicts))
    monkeypatch.setattr(EMAState, "full_state_dict", poisoned("ema", EMAState.full_state_dict))
    run = tmp_path / "run"
    _train(code_store, run, "train.max_steps=5", "train.ckpt_every=1", "train.keep_last=2")
    monkeypatch.undo()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000004", "step_00000005"]
    assert verify(ckpt(run, 2))["finite"] == {"model": True, "ema": True}
    assert verify(ckpt(run, 5))["finite"] == {"model": False, "ema": False}
    assert export_main(["--run", str(run), "--out", str(tmp_path / "e.pt")]) != 0
    err = capsys.readouterr().err
    assert "step_00000005" in err and "tok_embeddings.weight holds 1 NaN/Inf" in err
    with pytest.raises(CheckpointError, match=r"step_00000005 \(ema\): tensor tok_embeddings\.weight holds 1 NaN"):
        load_gpt(run)
    with pytest.raises(CheckpointError, match=r"step_00000005 \(model\): tensor tok_embeddings\.weight"):
        load_gpt(ckpt(run, 5), use_ema=False)
    from mirai.commands.sample import main as sample_main
    tok = tokenizer_file(tmp_path)
    rc = sample_main(["--ckpt", str(run), "--tokenizer", str(tok), "--num", "1", "--no-png", "--no-progress",
                      "--out", str(tmp_path / "s")])
    assert rc != 0 and "tok_embeddings.weight holds 1 NaN/Inf" in capsys.readouterr().err
    assert export_main(["--ckpt", str(ckpt(run, 2)), "--out", str(tmp_path / "good.pt")]) == 0


def test_disk_full_during_a_save_leaves_the_previous_checkpoint_and_the_command_reruns(code_store, tmp_path,
                                                                                       monkeypatch):
    """ENOSPC while ema.pt of step 4 is written (faked: part of the bytes go out, then the write fails)."""
    from mirai.io.torch_files import DiskFullError
    out = tmp_path / "full"
    args = ("train.max_steps=4", "train.ckpt_every=1", "train.keep_last=2")
    real_save = torch.save

    def full_disk_save(obj, f, *a, **k):
        name = str(getattr(f, "name", f))
        if "step_00000004" in name and "ema.pt" in name:
            if hasattr(f, "write"):
                f.write(b"PK\x03\x04" + bytes(1000))
            else:
                Path(f).write_bytes(b"PK\x03\x04" + bytes(1000))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(DiskFullError) as info:
        _train(code_store, out, *args)
    monkeypatch.undo()
    msg = str(info.value)
    ema_bytes = sum(t.numel() * t.element_size() for t in load_file(ckpt(out, 3) / "ema.pt")["ema"].values())
    assert f"{ckpt(out, 4) / 'ema.pt'}: disk full" in msg and f"({info.value.needed} bytes)" in msg
    assert info.value.needed >= ema_bytes
    assert "latest still names step_00000003, which is intact" in msg and "run the same command again" in msg
    assert not [p for p in out.rglob("*.tmp")]                     # partial temporaries removed
    assert not ckpt(out, 4).exists()                                 # and the unfinished checkpoint
    assert read_latest(out).name == "step_00000003"
    verify(ckpt(out, 3), content=True)
    res = _train(code_store, out, *args)                              # the same command, space freed
    assert res.step == 4 and read_latest(out).name == "step_00000004"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_fall_back_to_the_same_checkpoint(code_store, tmp_path):
    """ZeRO-2 on two gloo ranks: a flipped optimizer shard of rank 1 in the newest checkpoint makes both ranks
    resume from the previous one (each rank hashes part of the files; they decide together)."""
    out = tmp_path / "zero2"
    args = [f"data.codes={code_store}", f"out_dir={out}", "train.progress=false", "train.tensorboard=false",
            *MIRAI_E, "train.backend=deepspeed", "train.zero_stage=2", "train.max_steps=4"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch(*extra: str) -> subprocess.CompletedProcess:
        from mirai.trainer.distributed import free_port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "mirai", "train", "--config", str(DEBUG_YAML),
               "--set", *args, *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    launch()
    shard = next((ckpt(out, 4) / "engine").glob("*zero_pp_rank_1_*optim_states.pt"))
    flip(shard)
    proc = launch("train.max_steps=6")
    assert "steps 2->6" in proc.stdout and "resumed from" in proc.stdout
    assert "rank_1_mp_rank_00_optim_states.pt: content differs" in proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and read_latest(out).name == "step_00000006"


def test_a_save_that_fails_after_latest_moved_keeps_its_checkpoint(code_store, tmp_path, monkeypatch):
    """Interrupted while pruning (after `latest` names the new checkpoint): the new checkpoint stays."""
    import mirai.checkpoint.run as run_mod
    out = tmp_path / "run"

    def interrupted(run_dir, keep_last):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_mod, "prune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(code_store, out, "train.max_steps=2")
    monkeypatch.undo()
    assert read_latest(out).name == "step_00000002"
    verify(ckpt(out, 2), content=True)
