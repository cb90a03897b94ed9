"""mirai sample: tiny GPT + VQ-debug -> PNGs, grid, ADM-style .npz, stats; rank sharding; errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mirai.models.gpt import build_gpt
from mirai.models.vq import PatchKMeansTokenizer, build_vq
from mirai.commands.sample import main, parse_classes
from mirai.sampling import sample


def _gpt(block_size: int = 9, vocab: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    m = build_gpt("GPT-debug", vocab_size=vocab, block_size=block_size, num_classes=3)
    with torch.no_grad():                       # the output layer is zero-initialised: give it weights
        m.output.weight.normal_(0, 0.5)
    return m.eval()


def _save_gpt(path: Path, model) -> Path:
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "model_name": "GPT-debug",
                "model_config": dataclasses.asdict(model.config)}, path)
    return path


@pytest.fixture()
def ckpts(tmp_path):
    gpt = _save_gpt(tmp_path / "gpt.pt", _gpt())
    torch.manual_seed(1)
    vq = tmp_path / "vq.pt"
    torch.save({"model": build_vq("VQ-debug").state_dict()}, vq)
    return gpt, vq


def test_parse_classes():
    assert parse_classes(None, 4) == [0, 1, 2, 3]
    assert parse_classes("0-2,5", 10) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="--classes"):
        parse_classes("7", 5)


def test_sample_cli_writes_pngs_grid_npz_and_stats(tmp_path, ckpts):
    gpt, vq = ckpts
    out = tmp_path / "out"
    rc = main(["--ckpt", str(gpt), "--vq", str(vq), "--vq-model", "VQ-debug", "--num", "5", "--batch-size", "2",
               "--cfg-scale", "1.5", "--top-k", "10", "--seed", "3", "--out", str(out), "--no-progress",
               "--labels", "balanced"])
    assert rc == 0
    with np.load(out / "samples.npz") as z:
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 48, 48, 3)            # 3x3 grid x 16 px
    assert labels.tolist() == [0, 1, 2, 0, 1]
    assert arr.std() > 0
    pngs = sorted(p.name for p in (out / "images").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000003.png")), arr[3])
    grid = Image.open(out / "grid.png")
    assert grid.format == "PNG" and grid.size == (3 * 50 + 2, 2 * 50 + 2)    # 5 images: 3 columns, 2 rows
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["num"] == 5 and stats["images_per_s"] > 0 and stats["grid_size"] == 3
    assert not (out / ".shards").exists()
    # same seed -> same images
    rc = main(["--ckpt", str(gpt), "--vq", str(vq), "--vq-model", "VQ-debug", "--num", "5", "--batch-size", "2",
               "--cfg-scale", "1.5", "--top-k", "10", "--seed", "3", "--out", str(tmp_path / "again"),
               "--no-png", "--no-progress", "--labels", "balanced"])
    assert rc == 0 and not (tmp_path / "again" / "images").exists()
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npz")["arr_0"], arr)


def test_rank_shards_give_the_same_samples_as_one_process(tmp_path):
    model = _gpt(block_size=16, vocab=32)
    tok = PatchKMeansTokenizer.fit(torch.rand(8, 3, 16, 16) * 2 - 1, codebook_size=32, patch=4, iters=2)
    kw = dict(num=7, batch_size=2, cfg_scale=2.0, seed=5, png=False, progress=False, classes=[2, 0],
              labels="balanced")       # balanced: independent of the world size (random: tests/test_sampling_protocol.py)
    sample(model, tok, out=tmp_path / "one", **kw)
    (tmp_path / "two" / ".shards").mkdir(parents=True)
    sample(model, tok, out=tmp_path / "two", rank=1, world=2, **kw)     # rank 1 first: rank 0 gathers
    sample(model, tok, out=tmp_path / "two", rank=0, world=2, **kw)
    a = np.load(tmp_path / "one" / "samples.npz")
    b = np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (7, 16, 16, 3)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert a["arr_1"].tolist() == [2, 0, 2, 0, 2, 0, 2]


def test_image_size_eval_resizes(tmp_path):
    model = _gpt(block_size=16, vocab=32)
    tok = PatchKMeansTokenizer.fit(torch.rand(8, 3, 16, 16) * 2 - 1, codebook_size=32, patch=4, iters=2)
    sample(model, tok, out=tmp_path / "o", num=2, image_size_eval=8, png=False, progress=False)
    assert np.load(tmp_path / "o" / "samples.npz")["arr_0"].shape == (2, 8, 8, 3)


def test_sample_refuses_mismatched_tokenizer_and_missing_checkpoint(tmp_path, ckpts, capsys):
    gpt, _ = ckpts
    tok = PatchKMeansTokenizer.fit(torch.rand(8, 3, 16, 16) * 2 - 1, codebook_size=16, patch=4, iters=1)
    tok_file = tok.save(tmp_path / "tok16.pt")
    rc = main(["--ckpt", str(gpt), "--tokenizer", str(tok_file), "--num", "1", "--out", str(tmp_path / "x"),
               "--no-progress"])
    assert rc == 2 and "vocab_size" in capsys.readouterr().err
    rc = main(["--ckpt", str(tmp_path / "missing.pt"), "--tokenizer", str(tok_file), "--num", "1",
               "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "missing.pt" in capsys.readouterr().err


def test_384_model_samples_24x24_grids_resized_for_eval(tmp_path):
    model = _gpt(block_size=576, vocab=8)                                     # 24 x 24 tokens
    tok = PatchKMeansTokenizer.fit(torch.rand(2, 3, 32, 32) * 2 - 1, codebook_size=8, patch=16, iters=1)
    stats = sample(model, tok, out=tmp_path / "o", num=1, image_size_eval=256, png=False, progress=False)
    assert stats["grid_size"] == 24 and stats["image_size"] == 384 and stats["image_size_eval"] == 256
    assert np.load(tmp_path / "o" / "samples.npz")["arr_0"].shape == (1, 256, 256, 3)
