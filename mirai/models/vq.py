"""Image tokenizers: LlamaGen's VQ-16 (VQGAN-style) tokenizer and a k-means patch tokenizer.

``VQModel`` reproduces the module tree of LlamaGen's ``tokenizer/tokenizer_image/vq_model.py``
(``encoder``, ``decoder``, ``quantize``, ``quant_conv``, ``post_quant_conv`` and every nested
name below them), so LlamaGen's released ``vq_ds16_c2i.pt`` loads with ``strict=True`` through
``load_vq``. Architecture (VQ-16): conv encoder with channel multipliers (1, 1, 2, 2, 4) over
base width 128, two ResNet blocks per level, self-attention at the lowest level, 4 stride-2
downsamplings (16x), z_channels 256 -> 1x1 conv -> 8-dim latent, quantised against a codebook of
16384 l2-normalised 8-dim codes (cosine nearest neighbour); the decoder mirrors it.

API used by the rest of the project (the ``Tokenizer`` protocol):
  ``encode(images [B, 3, H, W] in [-1, 1]) -> LongTensor [B, h*w]`` (row-major token grid),
  ``decode_code(codes [B, h*w], shape=None) -> images [B, 3, H, W]`` (about [-1, 1], unclamped),
  ``codebook_size``, ``downsample`` and ``grid(image_size) -> h`` (h = image_size // downsample;
  never assumed to be 16: 384 px gives 24).

``PatchKMeansTokenizer`` is the demo's tokenizer: a k-means codebook of P x P pixel
patches; encode = nearest codeword per patch, decode = paste the codewords back. It saves to and
loads from a small ``.pt`` file. ``load_tokenizer`` opens either kind of file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirai.io.state_dicts import state_dict_mismatch
from mirai.io.torch_files import LLAMAGEN_TYPES, CheckpointError, UnsafeFileError, load_file

__all__ = [
    "VQConfig", "VQModel", "VQ_models", "build_vq", "load_vq", "VQCheckpointError",
    "Tokenizer", "PatchKMeansTokenizer", "load_tokenizer",
]


# ---------------------------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class Tokenizer(Protocol):
    """What prepare / sample / visualize need from an image tokenizer."""

    codebook_size: int   # number of codes (vocabulary of the AR model)
    downsample: int      # pixels per token side

    def grid(self, image_size: int) -> int:
        """Token grid side for square images of ``image_size`` pixels."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> codes LongTensor [B, (H/ds)*(W/ds)] (row-major)."""

    def decode_code(self, codes: torch.Tensor, shape=None) -> torch.Tensor:
        """codes [B, h*w] -> images [B, 3, h*ds, w*ds] in about [-1, 1]."""


def _grid_of(codes: torch.Tensor, shape) -> tuple[int, int, int]:
    """(B, h, w) of a code batch: ``shape`` is None (square grid), (h, w) or LlamaGen's (B, C, h, w)."""
    if codes.dim() == 1:
        codes = codes[None]
    b, t = codes.shape[0], codes[0].numel()
    if shape is None:
        side = int(round(math.sqrt(t)))
        if side * side != t:
            raise ValueError(f"codes hold {t} tokens per image, not a square grid: pass shape=(h, w)")
        return b, side, side
    shape = tuple(int(s) for s in shape)
    h, w = shape[-2:] if len(shape) == 4 else shape
    if len(shape) == 4:
        b = shape[0]
    if h * w * b != codes.numel():
        raise ValueError(f"codes of shape {tuple(codes.shape)} do not fill a grid of {b} x {h} x {w}")
    return b, h, w


# ---------------------------------------------------------------------------------------------
# VQ model (LlamaGen names)
# ---------------------------------------------------------------------------------------------
@dataclass
class VQConfig:
    codebook_size: int = 16384           # number of codes
    codebook_embed_dim: int = 8          # dimension of each code (latent channels)
    codebook_l2_norm: bool = True        # l2-normalise latents and codes (cosine nearest neighbour)
    codebook_show_usage: bool = True     # keep LlamaGen's `quantize.codebook_used` buffer (in its checkpoints)
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # width multipliers per level (levels-1 downsamplings)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # same for the decoder (upsamplings)
    z_channels: int = 256                # encoder output / decoder input channels
    ch: int = 128                        # base width (multiple of 32: GroupNorm has 32 groups)
    num_res_blocks: int = 2              # ResNet blocks per encoder level (decoder uses one more)
    dropout_p: float = 0.0               # dropout inside ResNet blocks

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v and output projection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C] (one head)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        o = F.scaled_dot_product_attention(q, k, v)           # [B, 1, H*W, C]
        o = o.transpose(-1, -2).reshape(b, c, h, w)            # back to [B, C, H, W]
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding on the right and bottom only (as in taming/LlamaGen)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        mult = tuple(cfg.encoder_ch_mult)
        self.num_resolutions, self.num_res_blocks = len(mult), cfg.num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, cfg.ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        block_in = cfg.ch
        for level, m in enumerate(mult):
            blk = nn.Module()
            blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * m
            for _ in range(cfg.num_res_blocks):
                blk.res.append(ResnetBlock(block_in, block_out, cfg.dropout_p))
                block_in = block_out
                if level == len(mult) - 1:
                    blk.attn.append(AttnBlock(block_in))
            if level != len(mult) - 1:
                blk.downsample = Downsample(block_in)
            self.conv_blocks.append(blk)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout_p), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, cfg.dropout_p)])
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, blk in enumerate(self.conv_blocks):
            for i in range(self.num_res_blocks):
                h = blk.res[i](h)
                if len(blk.attn):
                    h = blk.attn[i](h)
            if level != self.num_resolutions - 1:
                h = blk.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        mult = tuple(cfg.decoder_ch_mult)
        self.num_resolutions, self.num_res_blocks = len(mult), cfg.num_res_blocks
        block_in = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout_p), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, cfg.dropout_p)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(mult))):
            blk = nn.Module()
            blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                blk.res.append(ResnetBlock(block_in, block_out, cfg.dropout_p))
                block_in = block_out
                if level == len(mult) - 1:
                    blk.attn.append(AttnBlock(block_in))
            if level != 0:
                blk.upsample = Upsample(block_in)
            self.conv_blocks.append(blk)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for level, blk in enumerate(self.conv_blocks):
            for i in range(self.num_res_blocks + 1):
                h = blk.res[i](h)
                if len(blk.attn):
                    h = blk.attn[i](h)
            if level != self.num_resolutions - 1:
                h = blk.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup (inference only: no losses, no straight-through estimator)."""

    def __init__(self, n_e: int, e_dim: int, l2_norm: bool, show_usage: bool):
        super().__init__()
        self.n_e, self.e_dim, self.l2_norm = n_e, e_dim, l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if show_usage:
            # LlamaGen's training-time usage ring buffer; kept only so its checkpoints load strictly.
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        """[n_e, e_dim] codes as used for lookup (normalised when l2_norm)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def indices(self, z: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """z [B, e_dim, h, w] -> LongTensor [B, h*w] of nearest codes (row-major)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()   # [B*h*w, e_dim]
        emb = self.codebook().float()
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        e2 = (emb ** 2).sum(1)                                  # [n_e]
        out = []
        for rows in flat.split(chunk):                          # bounded [chunk, n_e] distance block
            d = (rows ** 2).sum(1, keepdim=True) + e2 - 2 * rows @ emb.t()
            out.append(d.argmin(1))
        return torch.cat(out).view(b, h * w)

    def get_codebook_entry(self, indices: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        """codes -> latents [B, e_dim, h, w]."""
        z = self.codebook()[indices.reshape(-1)]               # [B*h*w, e_dim]
        return z.view(b, h, w, self.e_dim).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """LlamaGen's VQ tokenizer (inference: encode to codes, decode codes to images)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim,
                                        config.codebook_l2_norm, config.codebook_show_usage)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def grid(self, image_size: int) -> int:
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not a multiple of the tokenizer's "
                             f"downsampling factor {self.downsample}")
        return image_size // self.downsample

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> pre-quantisation latents [B, e_dim, H/ds, W/ds]."""
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        for side in images.shape[-2:]:
            self.grid(int(side))
        return self.quantize.indices(self.encode_latent(images))

    @torch.no_grad()
    def decode_code(self, codes: torch.Tensor, shape=None) -> torch.Tensor:
        b, h, w = _grid_of(codes, shape)
        if int(codes.max()) >= self.codebook_size or int(codes.min()) < 0:
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        quant = self.quantize.get_codebook_entry(codes.long(), b, h, w)
        return self.decoder(self.post_quant_conv(quant))


def _vq(**defaults) -> Callable[..., VQModel]:
    def build(**overrides) -> VQModel:
        return VQModel(VQConfig(**{**defaults, **overrides}))
    return build


VQ_models: dict[str, Callable[..., VQModel]] = {
    "VQ-16": _vq(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": _vq(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
    # tiny, for tests: still 16x downsampling so grids behave like VQ-16's
    "VQ-debug": _vq(codebook_size=64, ch=32, z_channels=32, num_res_blocks=1,
                    encoder_ch_mult=(1, 1, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1, 1)),
}


def build_vq(name: str = "VQ-16", **overrides) -> VQModel:
    if name not in VQ_models:
        raise ValueError(f"unknown VQ model {name!r}; known: {sorted(VQ_models)}")
    return VQ_models[name](**overrides)


class VQCheckpointError(ValueError):
    """A tokenizer checkpoint is missing, unreadable or does not match the model (names the file)."""


def _torch_load(path: Path):
    """A tokenizer file, loaded weights-only (LlamaGen's training files also hold an ``argparse.Namespace``,
    the one other type allowed). A file holding any other type is refused (UnsafeFileError), never
    unpickled; an unreadable one is a VQCheckpointError."""
    try:
        return load_file(path, allowed=LLAMAGEN_TYPES)
    except UnsafeFileError:
        raise
    except CheckpointError as err:
        raise VQCheckpointError(str(err)) from err


def _state_dict_of(obj, path: Path) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "ema", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise VQCheckpointError(f"{path}: no state dict found (expected a dict with 'model' or 'ema', "
                            f"or a raw state dict)")


def load_vq(path: str | os.PathLike, name: str = "VQ-16", device="cpu", **overrides) -> VQModel:
    """Build ``name`` and load a local checkpoint into it strictly (eval mode, no grad).

    Accepts ``{"model": sd}``, ``{"ema": sd}`` or a raw state dict. The codebook size and code
    dimension are read from the checkpoint (as LlamaGen's --codebook-size/--codebook-embed-dim).
    """
    path = Path(path)
    if not path.is_file():
        raise VQCheckpointError(f"{path}: VQ checkpoint not found")
    return _vq_from_checkpoint(_torch_load(path), path, name, device, overrides)


def _vq_from_checkpoint(obj, path: Path, name: str, device, overrides: dict) -> VQModel:
    sd = _state_dict_of(obj, path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    emb = sd.get("quantize.embedding.weight")
    if emb is None or emb.dim() != 2:
        raise VQCheckpointError(f"{path}: not a VQ tokenizer checkpoint (no quantize.embedding.weight; "
                                f"first keys: {list(sd)[:5]})")
    overrides = {"codebook_size": emb.shape[0], "codebook_embed_dim": emb.shape[1], **overrides}
    overrides.setdefault("codebook_show_usage", "quantize.codebook_used" in sd)
    model = build_vq(name, **overrides)
    problem = state_dict_mismatch(model.state_dict(), sd)
    if problem:
        raise VQCheckpointError(f"{path}: does not match {name}: {problem}")
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# k-means patch tokenizer (demo)
# ---------------------------------------------------------------------------------------------
KMEANS_KIND = "mirai-patch-kmeans-v1"


class PatchKMeansTokenizer(nn.Module):
    """Codebook of P x P pixel patches fitted by k-means; codes are patch indices.

    ``codebook`` buffer: [K, channels * P * P] in [-1, 1] pixel units (channel-major per patch).
    Fitted on 1-channel data it reads 3-channel input as its channel mean and decodes to 3
    identical channels, so the rest of the pipeline always sees RGB.
    """

    def __init__(self, codebook: torch.Tensor, patch: int, channels: int):
        super().__init__()
        if codebook.dim() != 2 or codebook.shape[1] != channels * patch * patch:
            raise ValueError(f"codebook must be [K, {channels}*{patch}*{patch}], got {tuple(codebook.shape)}")
        self.patch, self.channels = int(patch), int(channels)
        self.register_buffer("codebook", codebook.float().contiguous())

    @property
    def codebook_size(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def downsample(self) -> int:
        return self.patch

    def grid(self, image_size: int) -> int:
        if image_size % self.patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {self.patch}")
        return image_size // self.patch

    def _patches(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """images [B, C, H, W] -> patches [B, h*w, C*P*P] (row-major grid), h, w."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got {tuple(images.shape)}")
        if images.shape[1] != self.channels:
            if self.channels == 1:
                images = images.mean(1, keepdim=True)
            else:
                raise ValueError(f"tokenizer fitted on {self.channels} channels, images have {images.shape[1]}")
        b, c, hh, ww = images.shape
        p = self.patch
        h, w = self.grid(hh), self.grid(ww)
        x = images.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)   # [B, h, w, C, P, P]
        return x.reshape(b, h * w, c * p * p), h, w

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x, _, _ = self._patches(images.float())
        b, t, d = x.shape
        return _nearest(x.reshape(b * t, d), self.codebook).view(b, t)

    @torch.no_grad()
    def decode_code(self, codes: torch.Tensor, shape=None) -> torch.Tensor:
        b, h, w = _grid_of(codes, shape)
        if int(codes.max()) >= self.codebook_size or int(codes.min()) < 0:
            raise ValueError(f"codes outside [0, {self.codebook_size})")
        p, c = self.patch, self.channels
        x = self.codebook[codes.reshape(b, h * w).long()]                  # [B, h*w, C*P*P]
        x = x.view(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h * p, w * p)
        return x.expand(b, 3, h * p, w * p).contiguous() if c == 1 else x

    @classmethod
    def fit(cls, images: torch.Tensor, codebook_size: int = 256, patch: int = 4, iters: int = 20,
            seed: int = 0, max_patches: int = 200_000) -> "PatchKMeansTokenizer":
        """k-means (k-means++ init, Lloyd iterations) on the P x P patches of images [N, C, H, W] in [-1, 1]."""
        probe = cls(torch.zeros(1, images.shape[1] * patch * patch), patch, images.shape[1])
        x, _, _ = probe._patches(images.float())
        x = x.reshape(-1, x.shape[-1])                                     # [N*h*w, C*P*P]
        gen = torch.Generator().manual_seed(seed)
        if x.shape[0] > max_patches:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_patches]]
        if x.shape[0] < codebook_size:
            raise ValueError(f"{x.shape[0]} patches cannot fit {codebook_size} codes")
        centers = _kmeans_pp(x, codebook_size, gen)
        for _ in range(iters):
            assign = _nearest(x, centers)
            sums = torch.zeros_like(centers).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=codebook_size).float()
            empty = counts == 0
            centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
            if empty.any():  # re-seed empty clusters at the points farthest from their centre
                diff = x - centers[assign]
                err = torch.einsum("nd,nd->n", diff, diff)
                centers[empty] = x[err.topk(int(empty.sum())).indices]
        return cls(centers, patch, images.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"kind": KMEANS_KIND, "codebook": self.codebook.cpu(), "patch": self.patch,
                    "channels": self.channels}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu") -> "PatchKMeansTokenizer":
        path = Path(path)
        if not path.is_file():
            raise VQCheckpointError(f"{path}: tokenizer file not found")
        obj = _torch_load(path)
        if not isinstance(obj, dict) or obj.get("kind") != KMEANS_KIND:
            raise VQCheckpointError(f"{path}: not a patch k-means tokenizer file (kind {KMEANS_KIND!r})")
        return cls(obj["codebook"], obj["patch"], obj["channels"]).to(device).eval()


def _nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest centre (squared L2) for each row of x [N, D]."""
    c2 = (centers ** 2).sum(1)
    return torch.cat([((r ** 2).sum(1, keepdim=True) + c2 - 2 * r @ centers.t()).argmin(1)
                      for r in x.split(chunk)])


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to squared distance."""
    x2 = (x * x).sum(1)                                       # [N]; |x - c|^2 = |x|^2 - 2 x.c + |c|^2

    def dist2(c: torch.Tensor) -> torch.Tensor:
        return (x2 - 2 * (x @ c) + c.dot(c)).clamp_min(0).double()

    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    picks = [first]
    d2 = dist2(x[first])
    for _ in range(1, k):
        cum = d2.cumsum(0)                                    # inverse-CDF draw (multinomial is slow on CPU)
        if cum[-1] > 0:
            u = torch.rand(1, generator=gen, dtype=torch.float64) * cum[-1]
            i = int(torch.searchsorted(cum, u).clamp_max(len(cum) - 1))
        else:
            i = int(torch.randint(x.shape[0], (1,), generator=gen))
        picks.append(i)
        d2 = torch.minimum(d2, dist2(x[i]))
    return x[picks].clone()


def load_tokenizer(path: str | os.PathLike, vq_model: str = "VQ-16", device="cpu") -> Tokenizer:
    """Open a tokenizer file of either kind: a PatchKMeansTokenizer file or a VQ checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise VQCheckpointError(f"{path}: tokenizer file not found")
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("kind") == KMEANS_KIND:
        return PatchKMeansTokenizer(obj["codebook"], obj["patch"], obj["channels"]).to(device).eval()
    return _vq_from_checkpoint(obj, path, vq_model, device, {})
