"""PAR architecture (mirai/models/par.py): token order, group-wise causality, cached group decoding."""
from __future__ import annotations

import pytest
import torch

from mirai.metrics.flops import model_config, training_flops_per_image
from mirai.models.gpt import build_gpt
from mirai.models.par import (PAR_models, PARConfig, PARTransformer, par_cell_to_position, par_group_ids,
                              par_order, par_position_to_cell)


def tiny(block_size: int = 16, num_regions: int = 4, **overrides) -> PARTransformer:
    torch.manual_seed(0)
    model = build_gpt("PAR-debug", vocab_size=32, num_classes=10, block_size=block_size,
                      num_regions=num_regions, **overrides)
    torch.nn.init.normal_(model.output.weight, std=0.05)
    return model.eval()


def test_order_groups_regions_by_in_region_position():
    order = par_order(4, 4)                        # 2x2 regions of 2x2 cells
    assert order.tolist() == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    big = par_order(24, 16)                        # 384 px, PAR-16x: 4x4 regions of 6x6 cells
    assert sorted(big.tolist()) == list(range(576))
    rows, cols = big // 24, big % 24
    groups_r, groups_c = (rows % 6).view(36, 16), (cols % 6).view(36, 16)   # in-region offset per group
    assert bool((groups_r == groups_r[:, :1]).all() and (groups_c == groups_c[:, :1]).all())
    regions = ((rows // 6) * 4 + cols // 6).view(36, 16)
    assert bool((regions == torch.arange(16)).all())                     # regions in raster order


def test_reordering_round_trip_and_cell_maps():
    model = tiny(block_size=36, num_regions=4)
    codes = torch.randint(0, 32, (2, 36), generator=torch.Generator().manual_seed(0))
    idx, targets = model.prepare_inputs(codes)
    assert idx.shape == (2, 32) and torch.equal(idx, targets[:, :32])
    assert torch.equal(model.sequence_to_raster(targets), codes)
    target = model.position_to_cell("target")
    assert torch.equal(codes[:, target], targets)                         # position t predicts cell target[t]
    assert torch.equal(par_cell_to_position(6, 4)[target], torch.arange(36))
    inputs = par_position_to_cell(6, 4, "input")
    assert inputs[0] == -1 and bool((inputs[5:8] == -1).all())            # class and 3 transition tokens
    held = inputs >= 0
    full_inputs = model.embed_positions(targets, torch.tensor([1, 2]), 0, 36)
    torch.testing.assert_close(full_inputs[:, held], model.tok_embeddings(codes[:, inputs[held]]))


def test_no_position_sees_its_own_target():
    for grid, regions in ((4, 4), (8, 16), (24, 4)):
        gid = par_group_ids(grid, regions)
        target, held = par_position_to_cell(grid, regions), par_position_to_cell(grid, regions, "input")
        where_held = {int(c): p for p, c in enumerate(held.tolist()) if c >= 0}
        for t, cell in enumerate(target.tolist()):
            if cell in where_held:                                     # the last group is never an input
                assert gid[where_held[cell]] > gid[t]


def test_group_level_causality_of_the_forward():
    model = tiny(block_size=36)
    codes = torch.randint(0, 32, (2, 36), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 4])
    idx, _ = model.prepare_inputs(codes)
    base = model(idx, labels).logits
    gid = par_group_ids(6, 4)
    n = 4
    for i in (0, 2, 3, 5, 17, 31):                  # idx[:, i] sits at position i+1 (i < n) or i+n
        p = i + 1 if i < n else i + n
        changed = idx.clone()
        changed[:, i] = (changed[:, i] + 1) % 32
        logits = model(changed, labels).logits
        earlier, same = gid < gid[p], gid == gid[p]
        torch.testing.assert_close(logits[:, earlier], base[:, earlier], rtol=0, atol=0)
        assert (logits[:, same] - base[:, same]).abs().amax(dim=-1).min() > 1e-6  # whole group sees it


def test_cached_group_decoding_matches_forward_and_generation_runs():
    model = tiny(block_size=36)
    codes = torch.randint(0, 32, (2, 36), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 9])
    full = model(model.prepare_inputs(codes)[0], labels).logits                # sequence order
    tokens, logits = model.generate(labels, forced_tokens=codes, return_logits=True)
    assert torch.equal(tokens, codes)
    torch.testing.assert_close(logits, model.sequence_to_raster(full), rtol=1e-5, atol=1e-5)
    schedule = model.decode_schedule()
    assert len(schedule) == 4 + 9 - 1 and schedule[4] == (4, 8) and schedule[-1] == (32, 36)
    sample = model.generate(labels, cfg_scale=2.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (2, 36) and int(sample.max()) < 32


def test_hidden_states_contract_and_state_dict():
    model = tiny()
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3))
    idx, targets = model.prepare_inputs(codes)
    out = model(idx, torch.tensor([1, 2]), targets=targets, hidden_layers=(1, 2))
    assert out.logits.shape == (2, 16, 32) and out.hidden[1].shape == (2, 16, 64) and out.loss is not None
    torch.testing.assert_close(model(idx, torch.tensor([1, 2]), upto_layer=1).hidden[1], out.hidden[1])
    gpt = build_gpt("GPT-debug", vocab_size=32, num_classes=10, block_size=16)
    assert set(model.state_dict()) == set(gpt.state_dict()) | {"transition_tokens"}
    missing, unexpected = model.load_state_dict(gpt.state_dict(), strict=False)
    assert missing == ["transition_tokens"] and unexpected == []
    with pytest.raises(ValueError, match="PAR idx"):
        model(codes[:, :15], torch.tensor([1, 2]))


def test_registry_config_errors_and_flops():
    assert {"PAR-debug", "PAR-B", "PAR-L", "PAR-XL", "PAR-XXL", "PAR-3B"} <= set(PAR_models)
    with torch.device("meta"):
        par_b = build_gpt("PAR-B", num_regions=16)
    assert sum(p.numel() for p in par_b.parameters()) == 110_888_448 + 15 * 768
    with pytest.raises(ValueError, match="num_regions"):
        PARConfig(num_regions=3)
    with pytest.raises(ValueError, match="divisible"):
        PARConfig(block_size=36, num_regions=16)
    with pytest.raises(ValueError, match="attn_backend"):
        PARConfig(attn_backend="flash_attn")
    par = training_flops_per_image(model_config("PAR-B"), "ema", k=3)
    gpt = training_flops_per_image(model_config("GPT-B"), "ema", k=3)
    assert par.total == gpt.total
