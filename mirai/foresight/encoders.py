"""Frozen bidirectional encoders for Mirai-I, built with timm from LOCAL weights only.

``ENCODERS`` maps short names to timm model names and facts (width, patch size):

    dinov2_vits14 / vitb14 / vitl14 / vitg14   vit_{small,base,large,giant2}_patch14_dinov2.lvd142m
    dinov2_vitb14_reg / vitl14_reg             vit_{base,large}_patch14_reg4_dinov2.lvd142m
    dinov3_vitb16 / vitl16                     vit_{base,large}_patch16_dinov3.lvd1689m
    mae_vitb16 / vitl16                        vit_{base,large}_patch16_224.mae

Any other timm ViT name works too (width and patch are then read from the model).

``EncoderTeacher(name, weights, grid_size, ...)`` builds the model with ``pretrained=False``
(nothing is ever downloaded) at input size patch * grid so that its patch grid equals the AR
token grid (224 px for patch 14 and 16x16 tokens, 336 for 24x24, 256 for patch 16), then loads
``weights``: a state-dict file (.pth/.pt/.bin/.safetensors; wrapped in "model"/"state_dict" or
not; DINOv2/MAE original key names are converted by timm's own checkpoint filter, which also
resamples the position embedding) or a timm / Hugging Face cache folder holding one.

``targets(images)``: images [B, 3, H, W], uint8 in 0..255 or float in [0, 1] -> bicubic resize to
the encoder input size (fp32) -> the encoder's normalisation (mean/std of its timm pretrained
config: ImageNet's for all of the above) -> frozen encoder under no_grad -> the final-norm patch
tokens [B, T, C] (class and register tokens dropped). ``dtype`` (``foresight.target_dtype``): bf16 =
bf16 weights, a pure bf16 pass and bf16 tokens; fp32 = fp32 weights, a pass under bf16 autocast (bf16
matmuls, fp32 residual stream and norms) and fp32 tokens.

``block_causal = b > 0`` (a diagnostic) restricts every self-attention layer with an
explicit additive mask: patch i (raster order) attends to patch j iff j // b <= i // b; the
prefix tokens (class, registers) count as part of the first block (they see the prefix and the
first block's patches, and every patch sees them), so no information from block m reaches any
token of an earlier block. b >= T is the ordinary bidirectional encoder. The mask is applied by
wrapping each block's attention module (``_MaskedAttention``) after the weights are loaded.
"""
from __future__ import annotations

import inspect
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirai.foresight.sources.protocol import ForesightSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    timm_name: str   # timm model name (with pretrained tag: it selects the normalisation)
    dim: int         # output width C
    patch: int       # patch size in pixels


ENCODERS: dict[str, EncoderSpec] = {
    "dinov2_vits14": EncoderSpec("vit_small_patch14_dinov2.lvd142m", 384, 14),
    "dinov2_vitb14": EncoderSpec("vit_base_patch14_dinov2.lvd142m", 768, 14),
    "dinov2_vitl14": EncoderSpec("vit_large_patch14_dinov2.lvd142m", 1024, 14),
    "dinov2_vitg14": EncoderSpec("vit_giant_patch14_dinov2.lvd142m", 1536, 14),
    "dinov2_vitb14_reg": EncoderSpec("vit_base_patch14_reg4_dinov2.lvd142m", 768, 14),
    "dinov2_vitl14_reg": EncoderSpec("vit_large_patch14_reg4_dinov2.lvd142m", 1024, 14),
    "dinov3_vitb16": EncoderSpec("vit_base_patch16_dinov3.lvd1689m", 768, 16),
    "dinov3_vitl16": EncoderSpec("vit_large_patch16_dinov3.lvd1689m", 1024, 16),
    "mae_vitb16": EncoderSpec("vit_base_patch16_224.mae", 768, 16),
    "mae_vitl16": EncoderSpec("vit_large_patch16_224.mae", 1024, 16),
}

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def is_known_encoder(name: str) -> bool:
    """A short name of ENCODERS, or a model name timm knows (checked offline)."""
    if name in ENCODERS:
        return True
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name.split(".")[0]))


def encoder_input_size(patch: int, grid_size: int, image_size: int | None = None) -> int:
    """Pixel side giving a grid_size x grid_size patch grid; ValueError when image_size cannot."""
    want = patch * grid_size
    if image_size is not None and image_size != want:
        raise ValueError(f"foresight.encoder.image_size: {image_size} px with patch {patch} gives a "
                         f"{image_size / patch:g}-wide patch grid but the token grid is {grid_size}; use {want}")
    return want


def find_weights_file(path: str | Path) -> Path:
    """The weights file at ``path``, or the one inside a timm / Hugging Face cache folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"encoder weights {p}: no such file or folder (weights are never downloaded)")
    for name in _WEIGHT_FILES:                     # HF cache: models--org--name/snapshots/<rev>/model.safetensors
        hits = sorted(p.rglob(name))
        if hits:
            return hits[-1]
    hits = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    if len(hits) == 1:
        return hits[0]
    raise FileNotFoundError(f"encoder weights {p}: folder holds {len(hits)} candidate weight files "
                            f"({[h.name for h in hits[:5]]}); pass the file itself")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a file, unwrapping {"model": ...} / {"state_dict": ...} containers."""
    f = find_weights_file(path)
    if f.suffix == ".safetensors":                   # a tensors-only format
        try:
            from safetensors.torch import load_file
            sd = load_file(str(f), device="cpu")
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"encoder weights {f}: unreadable ({type(err).__name__}: {err})") from err
    else:                                            # weights-only; refused (naming the type) if unsafe
        from mirai.io.torch_files import load_file
        sd = load_file(f)
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"encoder weights {f}: not a state dict of tensors")
    prefixes = ("module.", "backbone.", "encoder.")
    for pre in prefixes:
        if sd and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def block_causal_mask(num_patches: int, num_prefix: int, block: int) -> torch.Tensor:
    """Additive float mask [N, N] (N = num_prefix + num_patches): 0 where attention is allowed,
    -inf elsewhere. Patch i sees patch j iff j // block <= i // block; prefix tokens belong to block 0."""
    n = num_prefix + num_patches
    blk = torch.zeros(n, dtype=torch.long)                               # block id per token
    blk[num_prefix:] = torch.arange(num_patches) // block                # prefix tokens: block 0
    allowed = blk[None, :] <= blk[:, None]                               # [N(query), N(key)]
    mask = torch.zeros(n, n)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask


class _MaskedAttention(nn.Module):
    """Wraps a timm attention module so every call uses a fixed additive attention mask."""

    def __init__(self, inner: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("mask", mask, persistent=False)            # [N, N]
        self._pass_mask = "attn_mask" in inspect.signature(inner.forward).parameters
        if not self._pass_mask and not all(hasattr(inner, a) for a in ("qkv", "proj", "num_heads")):
            raise ValueError(f"block_causal: cannot mask attention module {type(inner).__name__} "
                             "(no attn_mask argument and not a timm qkv Attention)")

    def forward(self, x: torch.Tensor, *args, attn_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        mask = self.mask.to(x.dtype)
        if attn_mask is not None:
            mask = mask + attn_mask
        if self._pass_mask:
            return self.inner(x, *args, attn_mask=mask, **kwargs)
        a = self.inner                                                   # explicit timm Attention math
        b, n, c = x.shape
        qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, c // a.num_heads)   # [B, N, 3, H, C/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # each [B, H, N, C/H]
        q, k = getattr(a, "q_norm", nn.Identity())(q), getattr(a, "k_norm", nn.Identity())(k)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)      # [B, H, N, C/H]
        y = y.transpose(1, 2).reshape(b, n, c)                           # [B, N, C]
        y = getattr(a, "norm", nn.Identity())(y)
        return a.proj_drop(a.proj(y)) if hasattr(a, "proj_drop") else a.proj(y)


class EncoderTeacher(nn.Module, ForesightSource):
    """Frozen timm encoder producing foresight targets [B, T, C]; see the module docstring.

    Args:
        name: short name (``ENCODERS``) or a timm model name.
        weights: local weights file or cache folder (required; None only with ``random_init=True``,
            for tests).
        grid_size: AR token grid side W (T = W * W targets).
        image_size: encoder input side; None = patch * grid_size (checked otherwise).
        block_causal: block size of the block-causal diagnostic mask (0 = off).
        dtype: the weights' and the tokens' dtype: bf16 (default; a pure bf16 pass) or fp32 (a pass
            under bf16 autocast), see the module docstring.
        timm_kwargs: extra ``timm.create_model`` arguments (tests build tiny ViTs this way).
    """

    def __init__(self, name: str, weights: str | Path | None, grid_size: int, image_size: int | None = None,
                 block_causal: int = 0, dtype: torch.dtype = torch.bfloat16, timm_kwargs: dict | None = None,
                 random_init: bool = False):
        super().__init__()
        try:
            import timm
        except ImportError as err:
            raise ImportError("EncoderTeacher needs timm (pip install timm)") from err
        spec = ENCODERS.get(name)
        timm_name = spec.timm_name if spec else name
        if not is_known_encoder(name):
            raise ValueError(f"foresight.encoder.name: unknown encoder {name!r}; known: {sorted(ENCODERS)} "
                             "or a timm model name")
        if weights is None and not random_init:
            raise ValueError(f"foresight.encoder.weights: encoder {name!r} needs a local weights file "
                             "(nothing is downloaded)")
        kwargs = dict(timm_kwargs or {})
        patch = kwargs.get("patch_size", spec.patch if spec else None)
        if patch is None:  # unknown name: read the patch size from a throw-away instance
            probe = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
            patch = int(probe.patch_embed.patch_size[0])
            del probe
        self.input_size = encoder_input_size(int(patch), grid_size, image_size)
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=self.input_size, **kwargs)
        grid = tuple(model.patch_embed.grid_size)
        if grid != (grid_size, grid_size):
            raise ValueError(f"encoder {name!r}: patch grid {grid} at {self.input_size} px does not match the "
                             f"{grid_size}x{grid_size} token grid")
        if weights is not None:
            self.weights_file = find_weights_file(weights)
            _load_into(model, self.weights_file)
        else:
            self.weights_file = None
        self.name, self.grid_size, self.patch = name, grid_size, int(patch)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.dim = int(getattr(model, "num_features", getattr(model, "embed_dim")))
        self.block_causal = int(block_causal)
        self.compute_dtype = dtype
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)
        if self.block_causal < 0:
            raise ValueError(f"foresight.encoder.block_causal: must be >= 0, got {block_causal}")
        if self.block_causal:
            mask = block_causal_mask(grid_size * grid_size, self.num_prefix_tokens, self.block_causal)
            for blk in model.blocks:
                blk.attn = _MaskedAttention(blk.attn, mask)
        model.requires_grad_(False)
        self.model = model.to(dtype).eval()

    def train(self, mode: bool = True) -> "EncoderTeacher":
        """The encoder is frozen: it stays in eval mode whatever the caller asks."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] uint8 0..255 or float 0..1 -> normalised [B, 3, S, S] in the compute dtype."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"EncoderTeacher: images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        return x.to(self.compute_dtype)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised patch tokens [B, T, C] (in the encoder's dtype) of the images."""
        x = self.preprocess(images)
        autocast = (torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
                    if self.compute_dtype == torch.float32 else nullcontext())
        with autocast:
            tokens = self.model.forward_features(x).to(self.compute_dtype)   # [B, P + T, C]
        t = self.grid_size * self.grid_size
        if tokens.shape[1] != self.num_prefix_tokens + t:
            raise RuntimeError(f"encoder {self.name!r} returned {tokens.shape[1]} tokens, expected "
                               f"{self.num_prefix_tokens} prefix + {t} patches")
        return tokens[:, self.num_prefix_tokens:]                        # [B, T, C]

    forward = targets

    # ------------------------------------------------------------------ ForesightSource (mode "encoder", online)
    batch_keys = ("images",)

    def targets_for(self, batch: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        if "images" not in batch:
            raise ValueError(f"foresight source EncoderTeacher: the batch has no 'images' (keys {sorted(batch)}); "
                             "Mirai-I needs foresight.use_precomputed_features or data.images")
        return self(batch["images"])           # through the compiled graph when compiled; [B, T, C] raster cells

    def compile_for_training(self, scope: str) -> None:
        self.compile(dynamic=False)            # one graph, preprocessing included

    def flops(self, gpt_config, cfg):
        from mirai.foresight.sources.encoder import encoder_flops
        return encoder_flops(gpt_config, cfg, count_encoder=True)

    @classmethod
    def frozen_params(cls, cfg, model) -> int:
        """The encoder's parameters (``foresight.encoder.name``: a short name of ``ENCODERS`` or a timm name, the
        timm model built on the meta device); 0 for a name neither knows (building it fails, naming the field)."""
        name = cfg.encoder.name
        if not is_known_encoder(name):
            return 0
        import timm
        timm_name = ENCODERS[name].timm_name if name in ENCODERS else name
        with torch.device("meta"):
            encoder = timm.create_model(timm_name.split(".")[0], pretrained=False, num_classes=0)
        return sum(p.numel() for p in encoder.parameters())


def _load_into(model: nn.Module, weights_file: Path) -> None:
    """Load a state dict into a timm model through timm's own checkpoint filter; clear errors."""
    sd = load_state_dict_file(weights_file)
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            sd = filt(sd, model)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"encoder weights {weights_file}: do not fit {type(model).__name__} "
                             f"({type(err).__name__}: {err})") from err
    ignorable = ("head.", "fc_norm.", "decoder", "mask_token")
    own = model.state_dict()
    bad_shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        k = bad_shape[0]
        raise ValueError(f"encoder weights {weights_file}: {len(bad_shape)} tensors of the wrong shape, e.g. "
                         f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)} (wrong encoder name?)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(ignorable)]
    unexpected = [k for k in unexpected if not k.startswith(ignorable)]
    if missing or unexpected:
        raise ValueError(f"encoder weights {weights_file}: missing keys {missing[:5]} "
                         f"(total {len(missing)}), unexpected keys {unexpected[:5]} (total {len(unexpected)})")
