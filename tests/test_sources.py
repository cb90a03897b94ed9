"""Foresight target sources: EMA teacher (online / static), timm encoders from local weights
(grid matching, token counts, block-causal diagnostic), precomputed features from the code store."""
import importlib.util

import pytest
import torch

from mirai.foresight import EMATeacher, PrecomputedFeatures
from mirai.foresight.encoders import EncoderTeacher, block_causal_mask

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm not installed")
needs_gpt = pytest.mark.skipif(importlib.util.find_spec("mirai.models.gpt") is None,
                               reason="mirai.models.gpt not available")


# ------------------------------------------------------------------ precomputed features

def test_precomputed_features_from_store(tmp_path):
    from mirai.data.format import CodeStore, write_code_store
    feats = torch.randn(3, 2, 16, 8)
    write_code_store(tmp_path / "s", torch.randint(0, 100, (3, 2, 16)), torch.arange(3), grid_size=4,
                     vocab_size=100, num_classes=3, image_size=64, features=feats, feature_name="dinov2_vitb14")
    store = CodeStore(tmp_path / "s")
    src = PrecomputedFeatures.from_store(store, grid_size=4, name="dinov2_vitb14")
    assert src.dim == 8
    rows = torch.stack([store.get(i, 1)[2] for i in range(3)])            # [B, T, C] bf16
    out = src.targets(rows)
    assert out.shape == (3, 16, 8) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), feats[:, 1].bfloat16().float())
    with pytest.raises(ValueError, match="token grid"):
        PrecomputedFeatures.from_store(store, grid_size=5)
    with pytest.raises(ValueError, match=r"T=16"):
        src.targets(torch.randn(3, 9, 8))


# ------------------------------------------------------------------ EMA teacher

def _tiny_gpt(dim=64, **kw):
    from mirai.models import gpt
    torch.manual_seed(0)
    kw = {"token_dropout_p": 0.5, "resid_dropout_p": 0.5, "ffn_dropout_p": 0.5, "class_dropout_prob": 0.5, **kw}
    return gpt.build_gpt("GPT-debug", vocab_size=64, num_classes=10, block_size=16, n_layer=4, dim=dim, **kw)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2, 15), generator=g), torch.tensor([3, 7])


@needs_gpt
def test_ema_teacher_is_frozen_bf16_eval_copy_of_first_layers():
    model = _tiny_gpt()
    rng = torch.get_rng_state()
    teacher = EMATeacher(model, layer=2)
    assert torch.equal(rng, torch.get_rng_state())                        # building it leaves the RNG alone
    names = {n for n, _ in teacher.module.named_parameters()}
    assert names == set(teacher.teacher_names)
    assert names <= {n for n, _ in model.named_parameters()}              # same names: EMA attaches by name
    assert not any(n.startswith(("layers.2", "layers.3", "norm", "output")) for n in names)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.module.training                                   # stays in eval mode
    idx, labels = _batch()
    a, b = teacher.targets(idx, labels), teacher.targets(idx, labels)
    assert a.shape == (2, 16, 64) and a.dtype == torch.bfloat16
    assert torch.equal(a, b)                                             # no dropout, no class dropout
    model.eval()
    with torch.no_grad():
        ref = model(idx, labels, hidden_layers=(2,)).hidden[2]
    torch.testing.assert_close(a.float(), ref, rtol=5e-2, atol=5e-2)      # bf16 copy of the same weights


@needs_gpt
def test_static_teacher_loads_ema_entry_and_names_bad_files(tmp_path):
    model = _tiny_gpt()
    other = _tiny_gpt()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": other.state_dict(), "step": 5}, path)
    teacher = EMATeacher(model, layer=3, static_ckpt=path)
    assert teacher.static
    torch.testing.assert_close(teacher.module.layers[2].attention.wqkv.weight,
                               other.layers[2].attention.wqkv.weight.bfloat16())
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        EMATeacher(model, layer=2, static_ckpt=tmp_path / "nope.pt")
    wide = _tiny_gpt(dim=128)
    torch.save({"ema": wide.state_dict()}, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="wide.pt.*shape"):
        EMATeacher(model, layer=2, static_ckpt=tmp_path / "wide.pt")
    torch.save({"ema": {"tok_embeddings.weight": model.tok_embeddings.weight}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt.*lacks"):
        EMATeacher(model, layer=2, static_ckpt=tmp_path / "partial.pt")


@needs_gpt
def test_online_teacher_refreshed_by_model_ema():
    ema_mod = pytest.importorskip("mirai.optim.model_ema", reason="mirai.optim.model_ema not available yet")
    model = _tiny_gpt()
    teacher = EMATeacher(model, layer=2)
    ema = ema_mod.ModelEMA(model, decay=0.5)
    ema.attach_teacher(teacher.module)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    w = "layers.1.feed_forward.w1.weight"
    torch.testing.assert_close(dict(teacher.module.named_parameters())[w], ema.shadow[w].bfloat16())


# ------------------------------------------------------------------ timm encoders

TINY = dict(depth=2, embed_dim=32, num_heads=2)


def _save_tiny(tmp_path, timm_name, img_size, fname="enc.pth", **extra):
    import timm
    torch.manual_seed(0)
    m = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=img_size, **TINY, **extra)
    path = tmp_path / fname
    torch.save(m.state_dict(), path)
    return path


@needs_timm
def test_dinov2_grid_matching_token_count_and_pos_embed_resample(tmp_path):
    # weights saved at a 6x6 patch grid (84 px), loaded for a 4x4 token grid (56 px): pos_embed resampled
    w = _save_tiny(tmp_path, "vit_small_patch14_dinov2", 84)
    enc = EncoderTeacher("vit_small_patch14_dinov2.lvd142m", w, grid_size=4, timm_kwargs=TINY)
    assert enc.input_size == 56 and enc.num_prefix_tokens == 1 and enc.dim == 32
    assert enc.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)      # resized to 56 px
    out = enc.targets(img)
    assert out.shape == (2, 16, 32) and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(not p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="image_size"):
        EncoderTeacher("vit_small_patch14_dinov2.lvd142m", w, grid_size=4, image_size=64, timm_kwargs=TINY)


@needs_timm
def test_registers_and_patch16_encoders(tmp_path):
    w = _save_tiny(tmp_path, "vit_small_patch14_reg4_dinov2", 56, "reg.pth")
    enc = EncoderTeacher("vit_small_patch14_reg4_dinov2.lvd142m", w, grid_size=4, timm_kwargs=TINY)
    assert enc.num_prefix_tokens == 5
    assert enc.targets(torch.rand(1, 3, 56, 56)).shape == (1, 16, 32)   # cls + 4 registers dropped
    w16 = _save_tiny(tmp_path, "vit_base_patch16_224", 64, "mae.pth")
    mae = EncoderTeacher("vit_base_patch16_224.mae", w16, grid_size=4, timm_kwargs=TINY)
    assert mae.input_size == 64 and mae.targets(torch.rand(1, 3, 64, 64)).shape == (1, 16, 32)


@needs_timm
def test_weights_errors_and_hf_cache_folder(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        EncoderTeacher("dinov2_vitb14", None, grid_size=4)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        EncoderTeacher("vit_small_patch14_dinov2", tmp_path / "absent.pth", grid_size=4, timm_kwargs=TINY)
    wrong = _save_tiny(tmp_path, "vit_small_patch14_dinov2", 56, "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):                   # a width-32 file into a width-64 model
        EncoderTeacher("vit_small_patch14_dinov2", wrong, grid_size=4,
                       timm_kwargs=dict(TINY, embed_dim=64, num_heads=2))
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56, **TINY)
    snap = tmp_path / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(snap / "model.safetensors"))
    enc = EncoderTeacher("vit_small_patch14_dinov2", tmp_path / "hub", grid_size=4, timm_kwargs=TINY)
    assert enc.weights_file.name == "model.safetensors"
    torch.testing.assert_close(enc.model.cls_token.float(), m.cls_token.bfloat16().float())


def test_block_causal_mask_layout():
    m = block_causal_mask(num_patches=6, num_prefix=1, block=2)
    allowed = (m == 0)
    assert allowed[0].tolist() == [True, True, True, False, False, False, False]   # prefix sees block 0
    assert allowed[:, 0].all()                                                      # every token sees the prefix
    assert allowed[3].tolist() == [True, True, True, True, True, False, False]     # patch 2 (block 1)


@needs_timm
def test_block_causal_encoder_first_block_ignores_later_patches(tmp_path):
    w = _save_tiny(tmp_path, "vit_small_patch14_dinov2", 56)
    kw = dict(timm_kwargs=TINY, dtype=torch.float32)
    full = EncoderTeacher("vit_small_patch14_dinov2", w, grid_size=4, **kw)
    same = EncoderTeacher("vit_small_patch14_dinov2", w, grid_size=4, block_causal=16, **kw)
    rows = EncoderTeacher("vit_small_patch14_dinov2", w, grid_size=4, block_causal=4, **kw)   # one grid row per block
    torch.manual_seed(3)
    img = torch.rand(2, 3, 56, 56)
    img2 = img.clone()
    img2[:, :, 28:] = torch.rand_like(img2[:, :, 28:])                 # change patch rows 2 and 3 only
    torch.testing.assert_close(same.targets(img), full.targets(img), rtol=1e-5, atol=1e-5)   # block = T: full model
    a, b = rows.targets(img), rows.targets(img2)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=1e-5, atol=1e-5)   # blocks 0, 1 never see rows 2, 3
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    fa, fb = full.targets(img), full.targets(img2)
    assert not torch.allclose(fa[:, :8], fb[:, :8])                    # the bidirectional encoder does
    assert not torch.allclose(a, fa)                                   # and the mask changes the output


@needs_timm
def test_original_dinov2_checkpoint_format_with_registers(tmp_path):
    """Facebook's released DINOv2 files (register_tokens, mask_token, class row in pos_embed) load
    through timm's filter and give the same tokens as the timm-format weights."""
    w = _save_tiny(tmp_path, "vit_small_patch14_reg4_dinov2", 56, "timm.pth")
    sd = torch.load(w)
    pos0 = torch.randn(1, 1, 32)
    fb = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    fb.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - pos0, mask_token=torch.zeros(1, 32),
              pos_embed=torch.cat([pos0, sd["pos_embed"]], dim=1))
    torch.save({"model": fb}, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    kw = dict(timm_kwargs=TINY, dtype=torch.float32)
    a = EncoderTeacher("vit_small_patch14_reg4_dinov2", w, grid_size=4, **kw)
    b = EncoderTeacher("vit_small_patch14_reg4_dinov2", tmp_path / "dinov2_vits14_reg4_pretrain.pth", grid_size=4, **kw)
    img = torch.rand(2, 3, 56, 56)
    torch.testing.assert_close(a.targets(img), b.targets(img), rtol=1e-5, atol=1e-5)
