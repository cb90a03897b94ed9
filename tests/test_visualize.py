"""mirai visualize tsne: layer-l token features -> t-SNE colours on the token grid -> PNG."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from mirai.data.format import write_code_store  # noqa: E402
from mirai.models.gpt import build_gpt  # noqa: E402
from mirai.models.vq import PatchKMeansTokenizer  # noqa: E402
from mirai.commands.visualize import main  # noqa: E402
from mirai.figures import token_features, tsne_rgb  # noqa: E402


def _save_gpt(path, seed):
    torch.manual_seed(seed)
    m = build_gpt("GPT-debug", vocab_size=32, block_size=36, num_classes=4)   # 6 x 6 grid
    sd = m.state_dict()
    torch.save({"model": sd, "ema": sd, "model_name": "GPT-debug", "model_config": dataclasses.asdict(m.config)},
               path)
    return m.eval()


def test_token_features_follow_the_grid_and_tsne_colours_are_rgb():
    torch.manual_seed(0)
    m = build_gpt("GPT-debug", vocab_size=32, block_size=16, num_classes=4).eval()
    codes = torch.randint(0, 32, (16,))
    f = token_features(m, codes, label=1, layer=1)
    assert f.shape == (16, m.config.dim)
    out = m(codes[None, :-1], torch.tensor([1]), hidden_layers=(1,), return_logits=False)
    assert torch.equal(f, out.hidden[1][0])                   # GPT: position p is grid cell p
    rgb = tsne_rgb(f, seed=0)
    assert rgb.shape == (16, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert np.array_equal(rgb, tsne_rgb(f, seed=0))           # deterministic for a seed


def test_tsne_cli_writes_a_png_with_both_models(tmp_path):
    _save_gpt(tmp_path / "a.pt", 0)
    _save_gpt(tmp_path / "b.pt", 1)
    rng = np.random.default_rng(0)
    write_code_store(tmp_path / "codes", rng.integers(0, 32, (3, 2, 36)), np.array([0, 3, 1]), grid_size=6,
                     vocab_size=32, num_classes=4, image_size=24)
    tok = PatchKMeansTokenizer.fit(torch.rand(4, 3, 24, 24) * 2 - 1, codebook_size=32, patch=4, iters=2)
    tok_file = tok.save(tmp_path / "tok.pt")
    out = tmp_path / "fig.png"
    rc = main(["tsne", "--ckpt", str(tmp_path / "a.pt"), "--ckpt-b", str(tmp_path / "b.pt"), "--layer", "2",
               "--codes", str(tmp_path / "codes"), "--index", "1", "--tokenizer", str(tok_file), "--out", str(out)])
    assert rc == 0
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 2 * img.size[1]             # three panels side by side
    assert np.asarray(img.convert("RGB")).std() > 10                          # not a blank canvas


def test_tsne_cli_refuses_a_layer_beyond_the_depth(tmp_path, capsys):
    _save_gpt(tmp_path / "a.pt", 0)
    write_code_store(tmp_path / "codes", np.zeros((1, 1, 36), dtype=np.int64), np.array([0]), grid_size=6,
                     vocab_size=32, num_classes=4, image_size=24)
    rc = main(["tsne", "--ckpt", str(tmp_path / "a.pt"), "--layer", "9", "--codes", str(tmp_path / "codes"),
               "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "--layer 9" in capsys.readouterr().err
