"""Per-image training FLOP counts (mirai/metrics/flops.py) and the mirai flops command."""
from __future__ import annotations

import json

import pytest
import torch

from mirai.commands.flops import main
from mirai.metrics.flops import ENCODERS, model_config, total_params, training_flops_per_image
from mirai.models.gpt import build_gpt


def test_gpt_b_baseline_from_shapes_and_paper_convention():
    config = model_config("GPT-B")
    b = training_flops_per_image(config, "none", model="GPT-B")
    matmul_weights = 12 * (768 * 2304 + 768 * 768 + 3 * 768 * 2048) + 768 * 16384
    attention = 12 * 4 * 256 * 256 * 768
    assert b.backbone == 3 * (2 * 256 * matmul_weights + attention) == 157_034_741_760
    assert b.total == b.backbone and b.overhead == 0.0
    assert b.six_nt_backbone == 6 * 110_888_448 * 256
    assert f"{b.six_nt_backbone:.2e}" == "1.70e+11"                 # the paper's LlamaGen-B number


@pytest.mark.parametrize("name", ["GPT-B", "GPT-XL"])
def test_parameter_formula_matches_the_built_model(name):
    with torch.device("meta"):
        model = build_gpt(name)
    assert total_params(model_config(name)) == sum(p.numel() for p in model.parameters())


def test_mirai_overheads():
    config = model_config("GPT-B")
    base = training_flops_per_image(config, "none")
    e = training_flops_per_image(config, "ema", k=3, layer=8)
    heads_weights = 3 * (768 * 2048 + 2048 * 2048 + 2048 * 768)
    assert e.heads == 3 * 2 * 256 * heads_weights
    per_block = (base.backbone / 3 - 2 * 256 * 768 * 16384) / 12       # forward FLOPs of one block
    assert e.teacher == pytest.approx(8 * per_block)
    assert e.total == base.backbone + e.heads + e.teacher
    assert abs(e.six_nt_overhead - 0.382) < 0.02                      # paper: +38.2%
    i = training_flops_per_image(config, "encoder", k=1, encoder="dinov2_vitb14")
    assert i.heads == e.heads / 3                                     # K = 1, out = 768 = DINOv2-B width
    assert round(i.six_nt_overhead, 3) == 0.066                        # paper: +6.6%
    assert i.total == base.backbone + i.heads                         # encoder not counted by default
    counted = training_flops_per_image(config, "encoder", k=1, count_encoder=True)
    assert counted.total == i.total + i.encoder and i.encoder > 0


def test_grid_size_follows_block_size():
    small = training_flops_per_image(model_config("GPT-B"), "encoder", k=1)
    big = training_flops_per_image(model_config("GPT-B", block_size=576), "encoder", k=1)
    assert big.backbone > 2.25 * small.backbone                        # linear terms x2.25, attention x5.06
    e = ENCODERS["dinov2_vitb14"]
    assert big.encoder > small.encoder * (576 + e.extra_tokens) / (256 + e.extra_tokens)


def test_bad_arguments():
    config = model_config("GPT-B")
    with pytest.raises(ValueError, match="mode"):
        training_flops_per_image(config, "mirai_e")          # the old spelling
    with pytest.raises(ValueError, match="layer"):
        training_flops_per_image(config, "ema", k=3, layer=13)
    with pytest.raises(ValueError, match="^k: "):
        training_flops_per_image(config, "ema")                        # the default K is the trainer's
    with pytest.raises(KeyError, match="encoder"):
        training_flops_per_image(config, "encoder", k=1, encoder="clip")


def test_cli_prints_numbers_and_json(capsys):
    assert main(["--model", "GPT-B", "--mode", "ema", "--k", "3", "--layer", "8"]) == 0
    text = capsys.readouterr().out
    assert "1.570e+11" in text and "overhead +41.0%" in text
    assert main(["--model", "GPT-B", "--mode", "all", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in rows] == ["none", "ema", "encoder"]
    assert rows[0]["total"] == 157_034_741_760
    assert rows[1]["total"] == training_flops_per_image(model_config("GPT-B"), "ema", k=3, layer=8).total
    assert rows[2]["heads"] == training_flops_per_image(model_config("GPT-B"), "encoder", k=1, layer=8).heads
