"""Per-image training FLOPs of the GPT / PAR models, baseline and Mirai (``mirai flops`` prints them; the
trainer logs MFU from them).

How they are counted (``training_flops_per_image``), from the model's actual shapes, per image of
T = block_size positions, a multiply-add = 2 FLOPs:

* backbone (student), forward + backward = 3 x forward, forward =
    per block: 2*T*(dim*(n_head + 2*n_kv_head)*head_dim + dim*dim + 3*dim*ffn_hidden)   (wqkv, wo, SwiGLU)
             + 4*T*T*dim      (q k^T and attention x v, the full T x T square as in the PaLM MFU
                               convention; causal kernels skip about half of it)
    output layer: 2*T*dim*vocab_size.
  Embedding lookups, norms, RoPE, softmax, activations and the loss are not counted.
* Mirai-E (mode ``ema``): + the EMA teacher's forward through the first ``layer`` blocks
  (forward only, no output layer) + K foresight heads forward + backward. Heads are the contract's MLP
  ``in -> hidden -> hidden -> out`` applied at every position: 3 x 2*T*K*(in*hidden + hidden*hidden +
  hidden*out), with out = dim (the teacher's own hidden size).
* Mirai-I (mode ``encoder``): + the heads and out = the encoder's width. The frozen
  encoder's forward (a ViT over grid_size**2 patches + class/register tokens, same counting rule) is
  reported separately and added to the total only with ``count_encoder=True`` (features can be
  precomputed, in which case training does not run the encoder at all).

How close to the paper (GPT-B, T = 256): the paper's 1.70e11 for LlamaGen-B equals 6 * N_params * T
with N_params = 110,888,448 (all parameters, embeddings included, no attention term) = 1.703e11.
The shape count above gives 1.570e11 (-7.8%: it drops the 13.4M embedding parameters, which cost no
matmul, and adds 7.2e9 of attention). Overheads by the shape count: Mirai-I heads (K=1,
768 -> 2048 -> 2048 -> 768) 1.127e10 = +7.2%; Mirai-E (K=3, l=8) 3.382e10 (heads) + 3.060e10 (teacher)
= +41.0%. The same extras in the paper's convention (``FlopsBreakdown.six_nt_*``: 6 N T for heads,
2 N T over the teacher's l blocks, baseline 6 N T): Mirai-I +6.6% (the paper's number), Mirai-E +36.9%
(paper: +38.2%; the paper does not state exactly how it counts the teacher). Nothing here is tuned to
match the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

from mirai.models.gpt import GPTConfig, gpt_config

MODES = ("none", "ema", "encoder")          # the foresight.mode values this counter knows
TITLES = {"none": "baseline", "ema": "Mirai-E", "encoder": "Mirai-I"}     # for tables


@dataclass(frozen=True)
class EncoderShape:
    """A ViT encoder's shape for FLOP counting."""

    dim: int            # token width
    depth: int          # transformer blocks
    mlp_hidden: int     # MLP hidden width (GELU MLP: two matmuls)
    patch: int          # patch size in pixels
    extra_tokens: int   # class token + register tokens


ENCODERS: dict[str, EncoderShape] = {
    "dinov2_vits14": EncoderShape(384, 12, 1536, 14, 1),
    "dinov2_vitb14": EncoderShape(768, 12, 3072, 14, 1),
    "dinov2_vitl14": EncoderShape(1024, 24, 4096, 14, 1),
    "dinov2_vits14_reg": EncoderShape(384, 12, 1536, 14, 5),
    "dinov2_vitb14_reg": EncoderShape(768, 12, 3072, 14, 5),
    "dinov2_vitl14_reg": EncoderShape(1024, 24, 4096, 14, 5),
    "dinov3_vitb16": EncoderShape(768, 12, 3072, 16, 5),
    "mae_vitb16": EncoderShape(768, 12, 3072, 16, 1),
}


@dataclass
class FlopsBreakdown:
    """Training FLOPs per image, by component (see the module docstring)."""

    model: str
    mode: str
    seq_len: int               # T
    backbone: float            # student forward + backward
    teacher: float = 0.0       # EMA teacher forward through `layer` blocks (ema)
    heads: float = 0.0         # foresight heads forward + backward
    encoder: float = 0.0       # encoder forward (encoder; in `total` only when counted)
    encoder_counted: bool = False
    six_nt_backbone: float = 0.0   # paper convention: 6 * N_params * T
    six_nt_extra: float = 0.0      # paper convention for heads (6 N T) + teacher (2 N T) (+ encoder 2 N T)

    @property
    def extra(self) -> float:
        return self.teacher + self.heads + (self.encoder if self.encoder_counted else 0.0)

    @property
    def total(self) -> float:
        return self.backbone + self.extra

    @property
    def overhead(self) -> float:
        """Extra FLOPs relative to the baseline's backbone."""
        return self.extra / self.backbone

    @property
    def six_nt_overhead(self) -> float:
        return self.six_nt_extra / self.six_nt_backbone


def model_config(name: str, **overrides) -> GPTConfig:
    """Config of a registered GPT-* or PAR-* model (no module built)."""
    if name.startswith("PAR-"):
        from mirai.models.par import par_config
        return par_config(name, **overrides)
    return gpt_config(name, **overrides)


def block_matmul_params(config: GPTConfig) -> int:
    """Weights of one block's matmuls (wqkv, wo, w1, w3, w2)."""
    kv_heads = config.n_kv_head or config.n_head
    qkv = config.dim * (config.n_head + 2 * kv_heads) * config.head_dim
    return qkv + config.dim * config.dim + 3 * config.dim * config.ffn_hidden_dim


def transformer_forward_flops(config: GPTConfig, n_blocks: int | None = None, output_layer: bool = True) -> float:
    """Forward FLOPs per image through ``n_blocks`` blocks (default all) and optionally the output layer."""
    T, D = config.block_size, config.dim
    n = config.n_layer if n_blocks is None else n_blocks
    per_block = 2 * T * block_matmul_params(config) + 4 * T * T * D
    out = 2 * T * D * config.vocab_size if output_layer else 0
    return float(n * per_block + out)


def heads_params(in_dim: int, hidden: int, out_dim: int, k: int) -> int:
    """Matmul weights of K MLP heads in -> hidden -> hidden -> out."""
    return k * (in_dim * hidden + hidden * hidden + hidden * out_dim)


def encoder_forward_flops(encoder: str, grid_size: int) -> float:
    """Forward FLOPs of a ViT encoder whose patch grid is ``grid_size x grid_size``."""
    if encoder not in ENCODERS:
        raise KeyError(f"unknown encoder {encoder!r}; known: {sorted(ENCODERS)}")
    e = ENCODERS[encoder]
    tokens = grid_size * grid_size + e.extra_tokens
    per_block = 2 * tokens * (4 * e.dim * e.dim + 2 * e.dim * e.mlp_hidden) + 4 * tokens * tokens * e.dim
    patch_embed = 2 * grid_size * grid_size * (3 * e.patch * e.patch) * e.dim
    return float(e.depth * per_block + patch_embed)


def total_params(config: GPTConfig) -> int:
    """All parameters of the GPT (as counted by the paper's 6 N T)."""
    D = config.dim
    per_block = block_matmul_params(config) + 2 * D
    return config.n_layer * per_block + D + (config.num_classes + 1) * D + 2 * config.vocab_size * D


def training_flops_per_image(config: GPTConfig, mode: str = "none", *, k: int | None = None,
                             layer: int = 8, head_hidden: int = 2048, head_out: int | None = None,
                             encoder: str = "dinov2_vitb14", count_encoder: bool = False,
                             model: str = "") -> FlopsBreakdown:
    """FLOPs of one training image for ``mode`` in none | ema | encoder (see module docstring).

    k: foresight heads (required for ema and encoder; ``mirai.foresight.sources.default_k(mode)`` is the
    trainer's default); layer: the aligned layer l (1-based); head_hidden: heads' hidden width; head_out:
    heads' output width (default: dim for ema, the encoder's width for encoder).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "none" and k is None:
        raise ValueError(f"k: the number of foresight heads is required for mode {mode!r}")
    if not 1 <= layer <= config.n_layer:
        raise ValueError(f"layer={layer} must be in 1..{config.n_layer}")
    T, D = config.block_size, config.dim
    N = total_params(config)
    out = FlopsBreakdown(model=model, mode=mode, seq_len=T, backbone=3 * transformer_forward_flops(config),
                         six_nt_backbone=6.0 * N * T)
    if mode == "none":
        return out
    if mode == "ema":
        out_dim = D if head_out is None else head_out
        out.teacher = transformer_forward_flops(config, n_blocks=layer, output_layer=False)
        teacher_params = layer * (block_matmul_params(config) + 2 * D)
        out.six_nt_extra = 2.0 * teacher_params * T
    else:
        if encoder not in ENCODERS:
            raise KeyError(f"unknown encoder {encoder!r}; known: {sorted(ENCODERS)}")
        out_dim = ENCODERS[encoder].dim if head_out is None else head_out
        out.encoder = encoder_forward_flops(encoder, config.grid_size)
        out.encoder_counted = count_encoder
        if count_encoder:
            e = ENCODERS[encoder]
            enc_params = e.depth * (4 * e.dim * e.dim + 2 * e.dim * e.mlp_hidden)
            out.six_nt_extra += 2.0 * enc_params * (config.grid_size ** 2 + e.extra_tokens)
    hp = heads_params(D, head_hidden, out_dim, k)
    out.heads = 3 * 2.0 * T * hp
    out.six_nt_extra += 6.0 * T * (hp + k * (2 * head_hidden + out_dim))   # biases count as params in 6NT
    return out
