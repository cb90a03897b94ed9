"""Checkpoints users already have: files written by LlamaGen's ``train_c2i.py`` and by the released Mirai
training scripts (Mirai-Code ``train_c2i_Mirai_E.py`` / ``_I.py``), built here from tensors with those
scripts' own save-dictionary layouts, open in ``load_gpt``, ``mirai sample`` and the static teacher; and
``mirai export`` output reads the way LlamaGen's ``sample_c2i.py`` reads a checkpoint."""
from __future__ import annotations

import argparse

import pytest
import torch
from checkpoint_helpers import tokenizer_file

from mirai.checkpoint import CheckpointError, load_gpt

CONFIG = dict(vocab_size=64, num_classes=10, block_size=16)       # GPT-debug on a 4x4 grid


def _gpt(seed: int):
    from mirai.models.gpt import build_gpt
    torch.manual_seed(seed)
    model = build_gpt("GPT-debug", **CONFIG)
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)          # zero-initialised: make the weights tell sources apart
    return model


def _args(**extra) -> argparse.Namespace:
    """The training scripts' parsed arguments, stored under "args" (the fields the loader reads and others)."""
    return argparse.Namespace(gpt_model="GPT-debug", gpt_type="c2i", image_size=64, downsample_size=16,
                              vocab_size=64, num_classes=10, cls_token_num=1, ema=True, lr=1e-4,
                              results_dir="results", **extra)


def _optimizer_state(model) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.zeros(1, 15, dtype=torch.long), torch.zeros(1, dtype=torch.long),
          targets=torch.zeros(1, 16, dtype=torch.long)).loss.backward()
    opt.step()
    return opt.state_dict()


def _projectors(dim: int = 64, hidden: int = 32, out: int = 16, heads: int = 3) -> dict[str, torch.Tensor]:
    """Mirai-Code's heads: ``projectors.{k}`` = Linear, SiLU, Linear, SiLU, Linear (build_mlp)."""
    sd = {}
    for k in range(heads):
        for i, (a, b) in zip((0, 2, 4), ((dim, hidden), (hidden, hidden), (hidden, out))):
            sd[f"projectors.{k}.{i}.weight"] = torch.randn(b, a)
            sd[f"projectors.{k}.{i}.bias"] = torch.zeros(b)
    return sd


@pytest.fixture(scope="module")
def models():
    return _gpt(0), _gpt(1)                                  # raw, EMA


@pytest.fixture(scope="module")
def llamagen_file(models, tmp_path_factory):
    """LlamaGen train_c2i.py: {"model", "optimizer", "steps", "args"} (+ "ema" with --ema)."""
    model, ema = models
    path = tmp_path_factory.mktemp("llamagen") / "0005000.pt"
    torch.save({"model": model.state_dict(), "optimizer": _optimizer_state(model), "steps": 5000,
                "args": _args(), "ema": ema.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def mirai_code_file(models, tmp_path_factory):
    """Mirai-Code train_c2i_Mirai_E.py: {"model", "optimizer", "scaler", "steps", "epoch", "rng_state", "args"}
    (+ "ema"); model and EMA state dicts carry the projector heads."""
    model, ema = models
    path = tmp_path_factory.mktemp("mirai_code") / "0005000.pt"
    heads = _projectors()
    torch.save({"model": {**model.state_dict(), **heads}, "optimizer": _optimizer_state(model),
                "scaler": torch.amp.GradScaler("cpu").state_dict(), "steps": 5000, "epoch": 3,
                "rng_state": torch.get_rng_state(), "args": _args(num_heads=3, teacher_depth=1),
                "ema": {**ema.state_dict(), **heads}}, path)
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_llamagen_training_file_loads_ema_or_raw_weights(llamagen_file, models):
    model, ema = models
    assert _same(load_gpt(llamagen_file), ema)                       # model name and grid from its args
    assert _same(load_gpt(llamagen_file, use_ema=False), model)


def test_mirai_code_file_loads_and_reports_the_dropped_projectors(mirai_code_file, models):
    model, ema = models
    with pytest.warns(RuntimeWarning, match=r"dropped 18 foresight projector weights \(projectors\.\*\)"):
        got = load_gpt(mirai_code_file)
    assert _same(got, ema)
    with pytest.warns(RuntimeWarning, match="projector"):
        assert _same(load_gpt(mirai_code_file, use_ema=False), model)


def test_namespace_is_the_only_extra_type_and_only_for_these_files(mirai_code_file):
    from mirai.io.torch_files import UnsafeFileError, load_file
    with pytest.raises(UnsafeFileError, match=r"refused: it holds Python objects of type argparse\.Namespace") as info:
        load_file(mirai_code_file)                                    # e.g. where an engine state is expected
    assert info.value.types == ["argparse.Namespace"]


@pytest.mark.parametrize("container", ["module", "state_dict"])
def test_deepspeed_and_state_dict_containers_load(models, tmp_path, container):
    model, _ = models
    torch.save({container: model.state_dict()}, tmp_path / "w.pt")
    with pytest.warns(RuntimeWarning, match="no EMA"):
        assert _same(load_gpt(tmp_path / "w.pt", model_name="GPT-debug", **CONFIG), model)


def test_other_keys_are_still_checked_strictly(models, tmp_path):
    model, ema = models
    sd = {**ema.state_dict(), "extra_head.weight": torch.zeros(2)}
    torch.save({"model": model.state_dict(), "ema": sd, "args": _args()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt: does not match the model: 1 unexpected keys .*extra_head"):
        load_gpt(tmp_path / "x.pt")
    sd = {k: v for k, v in ema.state_dict().items() if k != "norm.weight"}
    torch.save({"model": model.state_dict(), "ema": sd, "args": _args()}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match=r"y\.pt: does not match the model: 1 missing keys .*norm\.weight"):
        load_gpt(tmp_path / "y.pt")


def test_mirai_sample_runs_on_a_mirai_code_file(mirai_code_file, tmp_path):
    import numpy as np

    from mirai.commands.sample import main
    tok = tokenizer_file(tmp_path)
    rc = main(["--ckpt", str(mirai_code_file), "--tokenizer", str(tok), "--num", "2", "--batch-size", "2",
               "--no-png", "--no-progress", "--grid", "0", "--out", str(tmp_path / "s")])
    assert rc == 0
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["arr_0"].shape == (2, 64, 64, 3)


def test_static_teacher_reads_the_ema_of_a_mirai_code_file(mirai_code_file, models):
    from mirai.foresight.sources import EMATeacher
    _, ema = models
    teacher = EMATeacher(_gpt(2), layer=1, static_ckpt=mirai_code_file)
    want = ema.state_dict()
    for name, p in teacher.module.named_parameters():
        assert torch.equal(p, want[name].to(p.dtype)), name


def test_export_reads_like_llamagens_sampler(mirai_code_file, tmp_path):
    """LlamaGen's sample_c2i.py: ``torch.load(ckpt, map_location="cpu")`` (weights-only by default), then
    "model", else "module" (DeepSpeed), else "state_dict", into a GPT of the same config; Mirai-Code's sampler
    takes "ema" when asked for it."""
    from mirai.checkpoint import export, read_weights
    from mirai.models.gpt import build_gpt
    src = tmp_path / "src.pt"
    w = read_weights(mirai_code_file)
    torch.save({"model": w["model"], "ema": w["ema"], "model_name": "GPT-debug", "model_config": CONFIG, "step": 5},
               src)
    for ema_as_model in (False, True):
        out = export(src, tmp_path / f"export_{ema_as_model}.pt", ema_as_model=ema_as_model)
        checkpoint = torch.load(out, map_location="cpu")
        weights = next(checkpoint[k] for k in ("model", "module", "state_dict") if k in checkpoint)
        gpt = build_gpt("GPT-debug", **CONFIG)
        gpt.load_state_dict(weights, strict=True)
        assert torch.equal(gpt.output.weight, (w["ema"] if ema_as_model else w["model"])["output.weight"])
        gpt.load_state_dict(checkpoint["ema"], strict=True)
