"""VQ tokenizer (LlamaGen names, encode/decode, loading) and the k-means patch tokenizer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mirai.models.vq import (PatchKMeansTokenizer, Tokenizer, VQCheckpointError, VQ_models, build_vq,
                             load_tokenizer, load_vq)


def test_vq16_has_llamagen_state_dict_names_and_size():
    with torch.device("meta"):
        m = build_vq("VQ-16")
    sd = m.state_dict()
    n_params = sum(p.numel() for p in m.parameters())
    assert 71e6 < n_params < 73e6                      # LlamaGen reports 72M for VQ-16
    expected = {
        "quantize.embedding.weight": (16384, 8),
        "quantize.codebook_used": (65536,),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_blocks.0.attn.2.v.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in sd      # no downsampling after the last level
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in sd
    assert m.downsample == 16 and m.grid(384) == 24 and m.grid(256) == 16


def test_registry_and_unknown_name():
    assert {"VQ-16", "VQ-8", "VQ-debug"} <= set(VQ_models)
    with pytest.raises(ValueError, match="VQ-99"):
        build_vq("VQ-99")


def test_encode_decode_shapes_non_square_grid_and_determinism():
    torch.manual_seed(0)
    m = build_vq("VQ-debug").eval()
    x = torch.rand(2, 3, 48, 64) * 2 - 1                # 3 x 4 grid: nothing assumes 16 x 16
    codes = m.encode(x)
    assert codes.shape == (2, 12) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < m.codebook_size
    assert torch.equal(codes, m.encode(x))
    assert m.decode_code(codes, (3, 4)).shape == (2, 3, 48, 64)
    assert m.decode_code(codes, (2, 8, 3, 4)).shape == (2, 3, 48, 64)   # LlamaGen's (B, C, h, w)
    sq = m.encode(x[..., :48])
    assert m.decode_code(sq).shape == (2, 3, 48, 48)
    with pytest.raises(ValueError, match="multiple"):
        m.encode(x[..., :40])
    with pytest.raises(ValueError, match="square"):
        m.decode_code(codes)


def test_codes_are_cosine_nearest_neighbours_of_the_latent():
    torch.manual_seed(1)
    m = build_vq("VQ-debug").eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = m.encode_latent(x)                                 # [B, 8, 2, 2]
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
    emb = F.normalize(m.quantize.embedding.weight, dim=-1)
    want = (flat @ emb.t()).argmax(1).view(3, 4)
    assert torch.equal(m.encode(x), want)


@pytest.mark.parametrize("wrap", ["model", "ema", "raw"])
def test_load_vq_roundtrip(tmp_path, wrap):
    torch.manual_seed(2)
    m = build_vq("VQ-debug").eval()
    sd = m.state_dict()
    obj = sd if wrap == "raw" else {wrap: sd, "steps": 3}
    torch.save(obj, tmp_path / "vq.pt")
    loaded = load_vq(tmp_path / "vq.pt", "VQ-debug")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), m.encode(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_vq_errors_name_the_file(tmp_path):
    with pytest.raises(VQCheckpointError, match="missing.pt"):
        load_vq(tmp_path / "missing.pt", "VQ-debug")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(VQCheckpointError, match="garbage.pt"):
        load_vq(garbage, "VQ-debug")
    other = tmp_path / "gpt.pt"
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(4, 4)}}, other)
    with pytest.raises(VQCheckpointError, match="gpt.pt.*not a VQ tokenizer"):
        load_vq(other, "VQ-debug")
    debug = tmp_path / "debug.pt"
    torch.save({"model": build_vq("VQ-debug").state_dict()}, debug)
    with pytest.raises(VQCheckpointError, match="debug.pt.*does not match VQ-8"):
        load_vq(debug, "VQ-8")


def _patch_images(n: int, patch: int = 4, grid: int = 3, seed: int = 0):
    """Images tiled from 5 fixed random patches: k-means with 5 codes recovers them exactly."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.rand(5, 3, patch, patch, generator=g) * 2 - 1
    idx = torch.randint(5, (n, grid, grid), generator=g)
    imgs = atoms[idx].permute(0, 3, 1, 4, 2, 5).reshape(n, 3, grid * patch, grid * patch)
    return imgs, idx


def test_patch_kmeans_fits_encodes_decodes_and_saves(tmp_path):
    imgs, idx = _patch_images(40)
    tok = PatchKMeansTokenizer.fit(imgs, codebook_size=5, patch=4, iters=10, seed=0)
    assert isinstance(tok, Tokenizer)
    assert tok.codebook_size == 5 and tok.downsample == 4 and tok.grid(12) == 3
    codes = tok.encode(imgs)
    assert codes.shape == (40, 9)
    assert torch.allclose(tok.decode_code(codes), imgs, atol=1e-5)   # every patch is a codeword
    # codes are a relabelling of the generating atoms
    mapping = {}
    for c, a in zip(codes.flatten().tolist(), idx.flatten().tolist()):
        assert mapping.setdefault(c, a) == a
    path = tok.save(tmp_path / "tok.pt")
    again = load_tokenizer(path)
    assert isinstance(again, PatchKMeansTokenizer)
    assert torch.equal(again.encode(imgs), codes)


def test_patch_kmeans_grayscale_reads_rgb_and_decodes_rgb():
    imgs, _ = _patch_images(20)
    gray = imgs.mean(1, keepdim=True)
    tok = PatchKMeansTokenizer.fit(gray, codebook_size=5, patch=4, iters=5)
    rgb = gray.expand(-1, 3, -1, -1)
    codes = tok.encode(rgb)
    out = tok.decode_code(codes)
    assert out.shape == (20, 3, 12, 12)
    assert torch.allclose(out, rgb, atol=1e-5)


def test_load_tokenizer_dispatches_to_vq(tmp_path):
    torch.save({"model": build_vq("VQ-debug").state_dict()}, tmp_path / "vq.pt")
    tok = load_tokenizer(tmp_path / "vq.pt", "VQ-debug")
    assert tok.codebook_size == 64 and tok.downsample == 16
