"""LlamaGen GPT family (mirai/models/gpt.py): sizes, state-dict names, forward contract, RoPE, backends."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mirai.models.gpt import GPT_models, GPTConfig, GPTOutput, Transformer, build_gpt, gpt_config
from mirai.models.rope import rope_2d_table

NO_DROPOUT = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, attn_dropout_p=0.0)


def tiny(**overrides) -> Transformer:
    """GPT-debug with a small vocabulary and a random (non-zero) output layer, in eval mode."""
    torch.manual_seed(0)
    kw = dict(vocab_size=32, num_classes=10, block_size=16)
    kw.update(overrides)
    model = build_gpt("GPT-debug", **kw)
    torch.nn.init.normal_(model.output.weight, std=0.02)   # zero-initialised: logits would all be 0
    return model.eval()


def batch(model: Transformer, b: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.config.vocab_size, (b, model.config.block_size), generator=g)
    labels = torch.randint(0, model.config.num_classes, (b,), generator=g)
    return codes, labels


@pytest.mark.parametrize("name, count", [
    ("GPT-B", 110_888_448), ("GPT-L", 342_910_976), ("GPT-XL", 774_699_520),
    ("GPT-XXL", 1_410_972_672), ("GPT-3B", 3_096_659_200)])
def test_parameter_counts_match_llamagen(name, count):
    with torch.device("meta"):
        model = GPT_models[name]()
    assert sum(p.numel() for p in model.parameters()) == count


def test_state_dict_keys_and_shapes_of_gpt_b():
    with torch.device("meta"):
        model = build_gpt("GPT-B")
    sd = model.state_dict()
    expected = {
        "tok_embeddings.weight": (16384, 768),
        "cls_embedding.embedding_table.weight": (1001, 768),
        "norm.weight": (768,),
        "output.weight": (16384, 768),
    }
    for i in range(12):
        expected.update({
            f"layers.{i}.attention.wqkv.weight": (3 * 768, 768),
            f"layers.{i}.attention.wo.weight": (768, 768),
            f"layers.{i}.feed_forward.w1.weight": (2048, 768),
            f"layers.{i}.feed_forward.w3.weight": (2048, 768),
            f"layers.{i}.feed_forward.w2.weight": (768, 2048),
            f"layers.{i}.attention_norm.weight": (768,),
            f"layers.{i}.ffn_norm.weight": (768,),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected   # no freqs_cis, no KV cache


def test_strict_load_roundtrip_and_caches_stay_out_of_state_dict():
    src, dst = tiny(), build_gpt("GPT-debug", vocab_size=32, num_classes=10, block_size=16)
    src.setup_caches(2)
    assert set(src.state_dict()) == set(dst.state_dict())
    dst.load_state_dict(src.state_dict(), strict=True)
    codes, labels = batch(src)
    idx, _ = src.prepare_inputs(codes)
    torch.testing.assert_close(dst.eval()(idx, labels).logits, src(idx, labels).logits, rtol=0, atol=0)


def test_init_output_zero_and_normal_elsewhere():
    torch.manual_seed(0)
    model = build_gpt("GPT-debug", vocab_size=512, num_classes=100)
    assert torch.count_nonzero(model.output.weight) == 0
    w = model.layers[0].feed_forward.w1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_registry_and_config_errors():
    assert set(GPT_models) >= {"GPT-debug", "GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B"}
    with pytest.raises(KeyError, match="GPT-Z"):
        build_gpt("GPT-Z")
    with pytest.raises(TypeError, match="n_layers"):
        gpt_config("GPT-B", n_layers=3)
    with pytest.raises(ValueError, match="block_size"):
        GPTConfig(block_size=200)
    with pytest.raises(ValueError, match="attn_backend"):
        GPTConfig(attn_backend="xformers")
    assert gpt_config("GPT-B", block_size=576).grid_size == 24
    assert gpt_config("GPT-B").ffn_hidden_dim == 2048


def test_forward_shapes_loss_and_sequence_layout():
    model = tiny()
    codes, labels = batch(model)
    idx, targets = model.prepare_inputs(codes)
    assert torch.equal(idx, codes[:, :-1]) and torch.equal(targets, codes)
    out = model(idx, labels, targets=targets)
    assert isinstance(out, GPTOutput)
    assert out.logits.shape == (2, 16, 32) and out.final_hidden.shape == (2, 16, 64)
    expected = F.cross_entropy(out.logits.float().reshape(-1, 32), targets.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out.loss.dtype == torch.float32
    # class-only prefix: one position, predicting x0
    assert model(None, labels).logits.shape == (2, 1, 32)
    with pytest.raises(ValueError, match="targets"):
        model(idx, labels, targets=targets[:, :5])


def test_causality_token_j_only_affects_later_positions():
    model = tiny()
    codes, labels = batch(model)
    idx, _ = model.prepare_inputs(codes)
    base = model(idx, labels).logits
    for j in (0, 6, 14):                       # idx[:, j] = x_j sits at sequence position j + 1
        changed = idx.clone()
        changed[:, j] = (changed[:, j] + 1) % model.config.vocab_size
        logits = model(changed, labels).logits
        torch.testing.assert_close(logits[:, : j + 1], base[:, : j + 1], rtol=0, atol=0)
        assert (logits[:, j + 1] - base[:, j + 1]).abs().max() > 1e-6


def test_hidden_states_and_upto_layer_match_a_manual_pass():
    model = tiny(**NO_DROPOUT)
    model.train()                               # class dropout forced off below via drop_labels
    codes, labels = batch(model)
    idx, _ = model.prepare_inputs(codes)
    keep = torch.zeros(2, dtype=torch.bool)
    out = model(idx, labels, hidden_layers=(1, 2), drop_labels=keep)
    h = torch.cat([model.cls_embedding.embedding_table(labels)[:, None], model.tok_embeddings(idx)], 1)
    rope = model.freqs_cis[: h.shape[1]]
    for l, block in enumerate(model.layers, start=1):
        h = block(h, rope)
        torch.testing.assert_close(out.hidden[l], h)
    torch.testing.assert_close(out.final_hidden, model.norm(h))
    torch.testing.assert_close(out.logits, model.output(model.norm(h)))
    truncated = model(idx, labels, upto_layer=1, drop_labels=keep)
    assert truncated.logits is None and truncated.final_hidden is None and truncated.loss is None
    torch.testing.assert_close(truncated.hidden[1], out.hidden[1])
    no_logits = model(idx, labels, return_logits=False, drop_labels=keep)
    assert no_logits.logits is None
    torch.testing.assert_close(no_logits.final_hidden, out.final_hidden)
    with pytest.raises(ValueError, match="hidden_layers"):
        model(idx, labels, hidden_layers=(3,))
    with pytest.raises(ValueError, match="hidden_layers"):
        model(idx, labels, hidden_layers=(2,), upto_layer=1)


def test_class_dropout_only_in_training_and_forced_mask():
    model = tiny(class_dropout_prob=0.999999, **NO_DROPOUT)
    codes, labels = batch(model, b=4)
    idx, _ = model.prepare_inputs(codes)
    null = torch.full_like(labels, model.config.num_classes)
    eval_cond, eval_null = model(idx, labels).logits, model(idx, null).logits
    assert (eval_cond - eval_null).abs().max() > 1e-6           # eval: labels are kept
    model.train()
    torch.testing.assert_close(model(idx, labels).logits, eval_null)   # train: (almost surely) all dropped
    model.eval()
    mask = torch.tensor([True, False, True, False])
    forced = model(idx, labels, drop_labels=mask).logits
    torch.testing.assert_close(forced[mask], eval_null[mask])
    torch.testing.assert_close(forced[~mask], eval_cond[~mask])


def test_dropouts_apply_in_train_mode_only():
    model = tiny(token_dropout_p=0.5, class_dropout_prob=0.0)
    codes, labels = batch(model)
    idx, _ = model.prepare_inputs(codes)
    torch.testing.assert_close(model(idx, labels).logits, model(idx, labels).logits, rtol=0, atol=0)
    model.train()
    assert (model(idx, labels).logits - model(idx, labels).logits).abs().max() > 1e-6


def test_forward_mutates_no_state():
    model = tiny()
    model.train()
    before = {k: v.clone() for k, v in list(model.state_dict().items()) + list(model.named_buffers())}
    codes, labels = batch(model)
    model(*model.prepare_inputs(codes)[:1], labels, hidden_layers=(1,))
    after = dict(list(model.state_dict().items()) + list(model.named_buffers()))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.caches is None


def test_rope_2d_layout_on_a_24x24_grid():
    model = tiny(block_size=576)
    table = model.freqs_cis
    half = model.config.head_dim // 2
    assert table.shape == (577, half, 2) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0                    # class slot: zero cos and sin
    r, c = 5, 17                                                 # cell (row 5, column 17)
    row = table[1 + r * 24 + c]
    # the first pair of each half has frequency 1: angle = row index, then column index
    torch.testing.assert_close(row[0], torch.tensor([torch.cos(torch.tensor(5.0)), torch.sin(torch.tensor(5.0))]))
    torch.testing.assert_close(row[half // 2], torch.tensor([torch.cos(torch.tensor(17.0)),
                                                             torch.sin(torch.tensor(17.0))]))
    codes, labels = batch(model)
    out = model(model.prepare_inputs(codes)[0], labels, hidden_layers=(1,))
    assert out.logits.shape == (2, 576, 32) and out.hidden[1].shape == (2, 576, 64)


def test_rope_table_stays_float32_when_the_model_is_cast():
    model = tiny().to(torch.bfloat16)
    assert model.output.weight.dtype == torch.bfloat16
    assert model.freqs_cis.dtype == torch.float32
    torch.testing.assert_close(model.freqs_cis, rope_2d_table(4, 16, 10000.0, 1), rtol=0, atol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny(**NO_DROPOUT, class_dropout_prob=0.0)
    model.train()
    codes, labels = batch(model)
    idx, targets = model.prepare_inputs(codes)

    def grads():
        model.zero_grad()
        model(idx, labels, targets=targets).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_activation_checkpointing()
    assert model.activation_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_per_block_compile_keeps_state_dict_names():
    model = tiny()
    keys = set(model.state_dict())
    model.layers[0].compile()                      # in place: no _orig_mod prefix
    assert set(model.state_dict()) == keys


def test_flash_attn_backend_missing_is_a_clear_error():
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ImportError, match="attn_backend"):
        build_gpt("GPT-debug", attn_backend="flash_attn")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_sdpa_forward_on_gpu_matches_fp32_cpu():
    model = tiny(vocab_size=512, block_size=256)
    codes, labels = batch(model, b=4)
    idx, _ = model.prepare_inputs(codes)
    ref = model(idx, labels, hidden_layers=(2,))
    gpu = model.to("cuda", torch.bfloat16)
    out = gpu(idx.cuda(), labels.cuda(), hidden_layers=(2,))
    assert out.logits.dtype == torch.bfloat16
    scale = ref.logits.abs().max()
    assert (out.logits.float().cpu() - ref.logits).abs().max() < 0.05 * scale
    h_scale = ref.hidden[2].abs().max()
    assert (out.hidden[2].float().cpu() - ref.hidden[2]).abs().max() < 0.05 * h_scale


# --------------------------------------------------------------------------- performance paths


def test_fused_ce_gives_the_plain_loss_and_gradients():
    plain = tiny(**NO_DROPOUT, class_dropout_prob=0.0).train()
    fused = tiny(**NO_DROPOUT, class_dropout_prob=0.0, fused_ce_chunk_size=5).train()
    fused.load_state_dict(plain.state_dict())                      # B*T = 32 tokens: ragged last chunk
    codes, labels = batch(plain)
    idx, targets = plain.prepare_inputs(codes)

    def run(model, **kw):
        model.zero_grad()
        out = model(idx, labels, targets=targets, hidden_layers=(1,), **kw)
        out.loss.backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters()}

    ref, ref_grads = run(plain)
    out, grads = run(fused, return_logits=False)
    assert out.logits is None and out.loss.dtype == torch.float32     # fused: no logits
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.hidden[1], ref.hidden[1])
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], msg=k)
    # a chunk as large as all tokens gives the same loss
    out2, grads2 = run(plain, return_logits=False)
    assert out2.logits is None
    torch.testing.assert_close(out2.loss, ref.loss)
    torch.testing.assert_close(grads2["output.weight"], ref_grads["output.weight"])
    # without targets the model returns logits
    assert fused.eval()(idx, labels).logits.shape == (2, 16, 32)
    # under CPU bf16 autocast (the trainer's plain engine) the loss matches the unfused autocast loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_ref = plain.eval()(idx, labels, targets=targets).loss
        auto_fused = fused(idx, labels, targets=targets, return_logits=False).loss
    torch.testing.assert_close(auto_fused, auto_ref, rtol=1e-3, atol=1e-3)


def test_rope_and_rmsnorm_match_their_textbook_formulas():
    from mirai.models.gpt import RMSNorm
    from mirai.models.rope import apply_rotary
    g = torch.Generator().manual_seed(0)
    table = rope_2d_table(4, 16)                                  # [17, 8, 2]
    x = torch.randn(2, 17, 3, 3 * 16, generator=g)[..., 16:32]    # strided view [2, 17, 3, 16]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    want = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).reshape(x.shape)
    torch.testing.assert_close(apply_rotary(x, table), want)
    xb = x.bfloat16()
    got_bf16 = apply_rotary(xb, table)
    assert got_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(got_bf16, apply_rotary(xb.float(), table).bfloat16(), rtol=0, atol=0)

    norm = RMSNorm(16, eps=1e-5, impl="torch")
    torch.nn.init.normal_(norm.weight)
    for xx in (x, xb):
        ref = (xx.float() * torch.rsqrt(xx.float().pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(xx) * norm.weight
        torch.testing.assert_close(norm(xx), ref)


def test_block_compiles_without_graph_breaks_and_matches_eager():
    model = tiny(**NO_DROPOUT, n_kv_head=2).train()               # grouped-query: q/k/v split paths
    block = model.layers[0]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")   # a graph break raises
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=g)
    rope = model.freqs_cis[:16]

    def run(fn):
        block.zero_grad()
        xx = x.clone().requires_grad_()
        out = fn(xx, rope)
        out.square().sum().backward()
        return [out.detach(), xx.grad] + [p.grad.clone() for p in block.parameters()]

    for a, b in zip(run(compiled), run(block)):
        torch.testing.assert_close(a, b)


def test_the_loss_backend_is_given_at_construction_and_retired_config_fields_are_ignored():
    from mirai.models.gpt import build_gpt
    assert build_gpt("GPT-debug", ce_backend="torch").output.ce_backend == "torch"
    assert build_gpt("PAR-debug", ce_backend="kernel").output.ce_backend == "kernel"
    # configs recorded by older versions (checkpoints, exports) carry fused_ce: still buildable
    assert not hasattr(build_gpt("GPT-debug", fused_ce=False).config, "fused_ce")
