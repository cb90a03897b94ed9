"""Checkpoints: export into a fresh GPT, load_gpt, and clear errors for truncated / mismatched files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mirai.checkpoint import CheckpointError, load_gpt, read_latest, verify

DEBUG_YAML = Path(__file__).resolve().parent.parent / "configs" / "debug.yaml"
MIRAI_E = ["train.backend=single", "foresight.mode=ema", "foresight.warmup_epochs=0",
           "ema.decay=0.9", "train.max_steps=3", "train.ckpt_every=3"]


def _cfg(store: Path, out: Path, *extra: str):
    from mirai.config import load_config
    return load_config(DEBUG_YAML, [f"data.codes={store}", f"out_dir={out}", "train.progress=false",
                                    "train.tensorboard=false", *extra])


@pytest.fixture(scope="module")
def run_dir(code_store, tmp_path_factory) -> Path:
    from mirai.trainer.run import train
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(_cfg(code_store, out, *MIRAI_E))
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


def test_export_loads_into_a_fresh_gpt_strictly(run_dir, tmp_path):
    from mirai.commands.export import main as export_main
    from mirai.models.gpt import build_gpt
    out = tmp_path / "exported.pt"
    assert export_main(["--run", str(run_dir), "--out", str(out)]) == 0
    obj = torch.load(out, map_location="cpu", weights_only=True)
    assert {"model", "ema", "model_name", "model_config"} <= set(obj)
    assert not any("heads" in k or "objective" in k for k in list(obj["model"]) + list(obj["ema"]))
    fresh = build_gpt(obj["model_name"], **obj["model_config"])
    fresh.load_state_dict(obj["model"], strict=True)             # LlamaGen-style loading
    fresh.load_state_dict(obj["ema"], strict=True)
    # EMA and raw weights differ after training, and load_gpt picks the right one from every source
    key = "layers.0.attention.wqkv.weight"
    assert not torch.equal(obj["model"][key], obj["ema"][key])
    for src in (out, run_dir, read_latest(run_dir)):
        assert torch.equal(load_gpt(src).state_dict()[key], obj["ema"][key])
        assert torch.equal(load_gpt(src, use_ema=False).state_dict()[key], obj["model"][key])
    model = load_gpt(out)
    assert not model.training and type(model).__name__ == "Transformer"


def test_truncated_file_is_named(run_copy):
    ckpt = read_latest(run_copy)
    ema = ckpt / "ema.pt"
    data = ema.read_bytes()
    ema.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ema\.pt: truncated"):
        verify(ckpt)
    with pytest.raises(CheckpointError, match=r"ema\.pt"):
        read_latest(run_copy)


def test_truncated_export_and_bad_latest_are_named(run_dir, run_copy, tmp_path):
    from mirai.checkpoint import export
    out = export(run_dir, tmp_path / "e.pt")
    out.write_bytes(out.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"e\.pt: content differs from what was saved"):
        load_gpt(out)                                           # the export's .sha256 beside it
    out.with_name("e.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"e\.pt: unreadable or truncated"):
        load_gpt(out)
    (run_copy / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match=r"latest: names 'step_00000099'"):
        read_latest(run_copy)


def test_mismatched_resume_names_the_field(code_store, run_copy):
    from mirai.trainer.run import train
    with pytest.raises(CheckpointError, match=r"meta\.json: checkpoint does not match this run: heads\.k"):
        train(_cfg(code_store, run_copy, *MIRAI_E, "foresight.k=2"))
    with pytest.raises(CheckpointError, match=r"model_config\.dim: checkpoint 64, run 32"):
        train(_cfg(code_store, run_copy, *MIRAI_E, "model.dim=32", "model.n_head=4", "model.n_layer=2"))
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt: loader seed was 0, this run has 1"):
        train(_cfg(code_store, run_copy, *MIRAI_E, "train.seed=1"))


def test_state_dict_mismatch_names_file_and_keys(run_dir, tmp_path):
    from mirai.checkpoint import export
    out = export(run_dir, tmp_path / "e.pt")
    obj = torch.load(out, weights_only=True)
    obj["model_config"]["n_layer"] = 3                        # claims a deeper model than the weights
    torch.save(obj, out)
    out.with_name("e.pt.sha256").unlink()                      # (edited on purpose: its hash no longer holds)
    with pytest.raises(CheckpointError, match=r"e\.pt: does not match the model: .*missing keys.*layers\.2"):
        load_gpt(out)
    meta = json.loads((read_latest(run_dir) / "meta.json").read_text())
    assert meta["step"] == 3 and meta["model_name"] == "GPT-debug" and "ema.pt" in meta["files"]
