"""Fixed-shape decoding (mirai/models/static_decode.py): the same tokens as the eager KV-cache decoder for the
same generator, GPT and PAR, eager, traced as one graph (fullgraph=True), and compiled by inductor on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mirai.models.gpt import build_gpt
from mirai.models.static_decode import StaticDecoder
from mirai.models.vq import PatchKMeansTokenizer
from mirai.sampling import sample

SETTINGS = [
    dict(cfg_scale=2.0, top_k=8, top_p=0.9, cfg_interval=(0.0, 0.7)),     # guided for the first 70% of steps
    dict(cfg_scale=1.0, temperature=0.8),                                 # no guidance: no null-class half
    dict(cfg_scale=3.0, temperature=0.0),                                 # greedy: no random numbers at all
]


def _model(name: str):
    torch.manual_seed(0)
    model = build_gpt(name, vocab_size=32, num_classes=10, block_size=16)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


def _same_tokens(model, decoder, kw, seeds=(3, 4)):
    labels = torch.tensor([1, 4, 7])                                       # 3 of max_batch 4: a padded row
    for seed in seeds:
        want = model.generate(labels, generator=torch.Generator().manual_seed(seed), **kw)
        got = decoder.generate(labels, torch.Generator().manual_seed(seed))
        assert got.shape == want.shape == (3, 16)
        assert torch.equal(got, want), (seed, kw)


@pytest.mark.parametrize("name", ["GPT-debug", "PAR-debug"])
@pytest.mark.parametrize("kw", SETTINGS)
def test_static_steps_give_the_eager_tokens(name, kw):
    model = _model(name)
    decoder = StaticDecoder(model, 4, **kw)
    assert [p.shape for p, _ in decoder.phases] == ([(16, 1)] if name == "GPT-debug" else [(4, 1), (3, 4)])
    _same_tokens(model, decoder, kw)
    assert decoder.caches[0].k.shape[0] == (8 if kw["cfg_scale"] > 1 else 4)


@pytest.mark.parametrize("name", ["GPT-debug", "PAR-debug"])
def test_static_step_traces_as_one_graph(name):
    """fullgraph=True raises on any graph break; backend "eager" checks the trace without code generation."""
    torch._dynamo.reset()
    model = _model(name)
    kw = SETTINGS[0]
    decoder = StaticDecoder(model, 4, compile="eager", **kw)
    _same_tokens(model, decoder, kw, seeds=(5,))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["GPT-debug", "PAR-debug"])
def test_static_step_compiles_with_inductor_and_gives_the_eager_tokens(name):
    """The real thing on the CPU (about 30 s of code generation per graph on a loaded 2-core machine)."""
    torch._dynamo.reset()
    model = _model(name)
    kw = SETTINGS[0]
    decoder = StaticDecoder(model, 4, compile=True, **kw)
    _same_tokens(model, decoder, kw, seeds=(3, 6))


def test_static_decoder_refuses_bad_input():
    model = _model("GPT-debug")
    decoder = StaticDecoder(model, 2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="1 <= n <= 2"):
        decoder.generate(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="labels must be in"):
        decoder.generate(torch.tensor([11]))
    with pytest.raises(ValueError, match="cfg_scale"):
        StaticDecoder(model, 2, cfg_scale=0.5)


@pytest.mark.parametrize("labels", ["balanced", "random"])
def test_sample_with_compile_writes_the_eager_samples(tmp_path, labels):
    model = _model("GPT-debug")
    torch.manual_seed(1)
    tok = PatchKMeansTokenizer.fit(torch.rand(8, 3, 16, 16) * 2 - 1, codebook_size=32, patch=4, iters=2)
    kw = dict(num=7, batch_size=3, cfg_scale=2.0, top_k=8, seed=2, png=False, progress=False, grid=0, labels=labels)
    sample(model, tok, out=tmp_path / "eager", **kw)
    stats = sample(model, tok, out=tmp_path / "static", compile="eager", **kw)      # dynamo trace, no codegen
    assert stats["compile"] == "eager"
    a, b = np.load(tmp_path / "eager" / "samples.npz"), np.load(tmp_path / "static" / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
