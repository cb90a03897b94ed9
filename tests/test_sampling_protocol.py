"""The sampling protocol of LlamaGen's sample_c2i_ddp.py: random labels (the default) with its per-rank seeding,
the multinomial draw's random numbers, the CFG rule (guidance for scale > 1 only), and what is recorded."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mirai.data.images import to_uint8
from mirai.models.generation import generate, sample_logits, sampling_probs
from mirai.models.gpt import build_gpt
from mirai.models.vq import PatchKMeansTokenizer
from mirai.commands.sample import build_parser, main
from mirai.sampling import DEFAULT_LABELS, LABEL_PROTOCOLS, sample


def _gpt(block_size: int = 16, vocab: int = 32, num_classes: int = 5):
    torch.manual_seed(0)
    m = build_gpt("GPT-debug", vocab_size=vocab, block_size=block_size, num_classes=num_classes)
    with torch.no_grad():
        m.output.weight.normal_(0, 0.5)
    return m.eval()


def _tokenizer(vocab: int = 32):
    torch.manual_seed(1)
    return PatchKMeansTokenizer.fit(torch.rand(8, 3, 16, 16) * 2 - 1, codebook_size=vocab, patch=4, iters=2)


def test_sample_logits_draws_what_torch_multinomial_draws():
    """LlamaGen samples with torch.multinomial(probs, 1): the same generator state gives the same tokens,
    and the generator ends in the same state (the next draws agree too)."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    for kw in (dict(), dict(temperature=0.7, top_k=10), dict(top_p=0.8)):
        ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        probs = sampling_probs(logits, **kw)
        for _ in range(3):
            want = torch.multinomial(probs, 1, generator=theirs).squeeze(1)
            assert torch.equal(sample_logits(logits, generator=ours, **kw), want), kw
        assert torch.equal(ours.get_state(), theirs.get_state())


def _llamagen_reference(model, tok, *, num, batch_size, world, seed, cfg_scale, num_classes):
    """LlamaGen's sample_c2i_ddp.py loop, transcribed: per rank torch.manual_seed(seed * world + rank); per round
    c = torch.randint(0, num_classes, (n,)) then generate() on the global generator; image index
    i * world + rank + round * n * world; the first num images kept."""
    per_round = batch_size * world
    rounds = -(-num // per_round)
    images, labels = {}, {}
    for rank in range(world):
        torch.manual_seed(seed * world + rank)
        for k in range(rounds):
            c = torch.randint(0, num_classes, (batch_size,))
            codes = generate(model, c, cfg_scale=cfg_scale)                         # global RNG, like multinomial
            arr = to_uint8(tok.decode_code(codes, (4, 4)).float())
            for i in range(batch_size):
                index = i * world + rank + k * per_round
                images[index], labels[index] = arr[i], int(c[i])
    return np.stack([images[i] for i in range(num)]), np.array([labels[i] for i in range(num)])


@pytest.mark.parametrize("world", [1, 2])
def test_random_labels_follow_llamagen_seeding_per_rank(tmp_path, world):
    model, tok = _gpt(), _tokenizer()
    kw = dict(num=7, batch_size=2, cfg_scale=1.5, seed=3, png=False, progress=False, grid=0)
    out = tmp_path / "run"
    (out / ".shards").mkdir(parents=True)                                           # rank 0 makes it under torchrun
    for rank in reversed(range(world)):                                             # rank 0 last: it gathers
        sample(model, tok, out=out, rank=rank, world=world, **kw)
    with np.load(out / "samples.npz") as z:
        arr, labels, settings = z["arr_0"], z["arr_1"], json.loads(str(z["sample_settings"]))
    want_arr, want_labels = _llamagen_reference(model, tok, num=7, batch_size=2, world=world, seed=3,
                                                cfg_scale=1.5, num_classes=5)
    assert np.array_equal(labels, want_labels) and np.array_equal(arr, want_arr)
    assert settings["labels"] == DEFAULT_LABELS == "random" and settings["world_size"] == world
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["labels"] == "random" and stats["seed"] == 3
    # deterministic: the same run again gives the same file
    again = tmp_path / "again"
    (again / ".shards").mkdir(parents=True)
    for rank in reversed(range(world)):
        sample(model, tok, out=again, rank=rank, world=world, **kw)
    assert np.array_equal(np.load(again / "samples.npz")["arr_0"], arr)


def test_random_labels_draw_from_the_given_classes_and_balanced_cycles_them(tmp_path):
    model, tok = _gpt(), _tokenizer()
    kw = dict(num=12, batch_size=4, cfg_scale=1.0, seed=0, png=False, progress=False, grid=0, classes=[1, 3])
    sample(model, tok, out=tmp_path / "r", **kw)
    sample(model, tok, out=tmp_path / "b", labels="balanced", **kw)
    random_labels = np.load(tmp_path / "r" / "samples.npz")["arr_1"]
    assert set(random_labels.tolist()) == {1, 3}
    assert not np.array_equal(random_labels, np.array([1, 3] * 6))
    with np.load(tmp_path / "b" / "samples.npz") as z:
        assert z["arr_1"].tolist() == [1, 3] * 6
        assert json.loads(str(z["sample_settings"]))["labels"] == "balanced"
    with pytest.raises(ValueError, match="--labels"):
        sample(model, tok, out=tmp_path / "x", labels="uniform", **kw)


def test_cli_labels_flag_default_and_help():
    p = build_parser()
    assert p.parse_args(["--ckpt", "c", "--vq", "v", "--out", "o"]).labels == "random"
    assert p.parse_args(["--ckpt", "c", "--vq", "v", "--out", "o", "--labels", "balanced"]).labels == "balanced"
    text = " ".join(p.format_help().split())
    assert "--labels" in text and "published" in text and "default random" in text.lower()
    assert set(LABEL_PROTOCOLS) == {"random", "balanced"}


# ------------------------------------------------------------------ classifier-free guidance rule

def test_guidance_runs_only_above_scale_one_and_lower_scales_are_refused(tmp_path, capsys):
    model = _gpt()
    labels = torch.tensor([1, 2])
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    generate(model, labels, forced_tokens=codes, cfg_scale=1.0)
    assert model.caches[0].max_batch_size == 2                        # scale 1: no null-class half
    generate(model, labels, forced_tokens=codes, cfg_scale=1.01)
    assert model.caches[0].max_batch_size == 4                        # scale > 1: guided
    for bad in (0.5, 0.0, float("nan")):
        with pytest.raises(ValueError, match="cfg_scale=.* must be >= 1"):
            generate(model, labels, cfg_scale=bad)
    rc = main(["--ckpt", str(tmp_path / "none.pt"), "--vq", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o"),
               "--cfg-scale", "0.5", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--cfg-scale 0.5" in err and ">= 1" in err
