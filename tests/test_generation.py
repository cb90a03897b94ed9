"""KV-cache decoding with classifier-free guidance (mirai/models/generation.py)."""
from __future__ import annotations

import pytest
import torch

from mirai.models.generation import generate, guided_logits, sample_logits
from mirai.models.gpt import build_gpt


def tiny(block_size: int = 16):
    torch.manual_seed(0)
    model = build_gpt("GPT-debug", vocab_size=32, num_classes=10, block_size=block_size)
    torch.nn.init.normal_(model.output.weight, std=0.05)
    return model.eval()


@pytest.mark.parametrize("block_size", [16, 36])
def test_cached_decoding_matches_the_full_forward(block_size):
    model = tiny(block_size)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (3, block_size), generator=g)
    labels = torch.tensor([0, 4, 9])
    full = model(model.prepare_inputs(codes)[0], labels).logits
    tokens, logits = model.generate(labels, forced_tokens=codes, return_logits=True)
    assert torch.equal(tokens, codes)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_cached_prefill_of_several_positions_is_causal():
    model = tiny()
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 2])
    full = model(model.prepare_inputs(codes)[0], labels).logits
    model.setup_caches(2)
    x = model.embed_positions(codes, labels, 0, 10)               # class + x0..x8 in one chunk
    first = model.decode_step(x, 0)
    rest = model.decode_step(model.embed_positions(codes, labels, 10, 16), 10)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


def test_cfg_scale_one_equals_the_conditional_logits():
    model = tiny()
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 7])
    _, plain = generate(model, labels, forced_tokens=codes, return_logits=True)
    _, doubled = generate(model, labels, forced_tokens=codes, return_logits=True, use_cfg=True, cfg_scale=1.0)
    assert model.caches[0].max_batch_size == 4                  # the batch really was doubled
    torch.testing.assert_close(doubled, plain, rtol=1e-5, atol=1e-5)


def test_cfg_guides_with_the_null_class_and_respects_the_interval():
    model = tiny()
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3, 7])
    null = torch.full_like(labels, 10)
    _, cond = generate(model, labels, forced_tokens=codes, return_logits=True)
    _, uncond = generate(model, null, forced_tokens=codes, return_logits=True)
    _, guided = generate(model, labels, forced_tokens=codes, return_logits=True, cfg_scale=3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
    _, half = generate(model, labels, forced_tokens=codes, return_logits=True, cfg_scale=3.0,
                       cfg_interval=(0.0, 0.5))
    torch.testing.assert_close(half[:, :8], guided[:, :8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(half[:, 8:], cond[:, 8:], rtol=1e-5, atol=1e-5)


def test_generate_shapes_reproducibility_and_mode_restore():
    model = tiny()
    model.train()
    labels = torch.tensor([0, 1, 2])
    a = model.generate(labels, cfg_scale=2.0, top_k=8, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(labels, cfg_scale=2.0, top_k=8, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 16) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 32
    assert torch.equal(a, b)
    assert model.training                                        # mode restored
    greedy = model.generate(labels, temperature=0.0)
    assert torch.equal(greedy, model.generate(labels, temperature=0.0))


def test_sample_logits_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    top3 = logits.topk(3, dim=-1).indices
    draws = sample_logits(logits, top_k=3, generator=g)
    assert bool((draws[:, None] == top3).any(-1).all())
    assert torch.equal(sample_logits(logits, top_p=1e-6, generator=g), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))
    # top-p keeps the smallest prefix whose mass reaches p: with p = 0.5 on [0.6, 0.3, 0.1] only token 0
    probs = torch.tensor([[0.6, 0.3, 0.1]]).log().expand(200, 3)
    assert bool((sample_logits(probs, top_p=0.5, generator=g) == 0).all())
    assert set(sample_logits(probs, top_p=0.7, generator=g).tolist()) <= {0, 1}
    torch.testing.assert_close(guided_logits(torch.ones(2), torch.zeros(2), 4.0), torch.full((2,), 4.0))


def test_generate_rejects_bad_arguments():
    model = tiny()
    labels = torch.tensor([0])
    with pytest.raises(ValueError, match="top_p"):
        model.generate(labels, top_p=0.0)
    with pytest.raises(ValueError, match="cfg_interval"):
        model.generate(labels, cfg_interval=(0.6, 0.2))
    with pytest.raises(ValueError, match="cond_idx"):
        model.generate(torch.tensor([11]))
