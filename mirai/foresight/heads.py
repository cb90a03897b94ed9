"""Foresight projection heads: K independent heads mapping the AR hidden state to target space.

``ForesightHeads(in_dim, out_dim, k, hidden=2048, kind="mlp")``, forward ``h [B, T, D] ->
[K, B, T, C]`` (D = in_dim, C = out_dim).

kind "mlp" (the paper's head, default): head k computes
``y = W3_k silu(W2_k silu(W1_k x + b1_k) + b2_k) + b3_k``. The K heads' parameters are STACKED
so batched GEMMs use them directly (``mirai.ops.reference.mlp_heads_reference`` is the forward; the fused
kernel in ``mirai.ops.foresight`` reads them too):

    w1 [K, hidden, in_dim]   b1 [K, hidden]
    w2 [K, hidden, hidden]   b2 [K, hidden]
    w3 [K, out_dim, hidden]  b3 [K, out_dim]

Init (``init_std``): 0.02 by default = weights from N(0, 0.02) and zero biases, which is what the
released code did (LlamaGen's ``_init_weights`` applied N(0, 0.02) to every Linear, the projectors
included); ``init_std=None`` = ``nn.Linear``'s init per head (weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in))). For 768 -> 768 with hidden 2048: 7,344,896 parameters per head.

Weight decay: the stacked biases are 2-D, so a ">= 2-D parameters are decayed" rule would decay them,
unlike the released code's 1-D per-head biases. ``no_weight_decay_params()`` names the parameters the
optimizer must not decay whatever their shape (the biases, unless ``bias_decay=True``);
``mirai.trainer.engine.param_groups`` asks every module for it.

kind "transformer" (the paper's ablation head): per head a pre-norm transformer block at width
in_dim (LayerNorm, 4-head self-attention, residual, LayerNorm-MLP with ratio 4 and GELU,
residual) followed by Linear(in_dim, out_dim). The self-attention is CAUSAL over the sequence:
the hidden state at position t' > t has read tokens the targets of position t are made of, so a
bidirectional head would leak the future into the projection. ``hidden`` is unused by this kind
(its MLP width is 4 * in_dim, recorded in ``self.hidden``). No positional encoding is added:
the layer-l hidden states already carry position information from the backbone's RoPE
attention, and the causal mask breaks the permutation symmetry.

Heads are training-only modules: they never sit inside the GPT, so sampling is unaffected.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirai.ops.reference import mlp_heads_reference

HEAD_KINDS = ("mlp", "transformer")


class _CausalBlockHead(nn.Module):
    """One transformer-ablation head: pre-norm causal block at width dim, then Linear to out_dim."""

    def __init__(self, dim: int, out_dim: int, n_heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"transformer head: in_dim {dim} must be divisible by {n_heads} attention heads")
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x))                                    # [B, T, 3D]
        qkv = qkv.view(b, t, 3, self.n_heads, d // self.n_heads)         # [B, T, 3, H, D/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # each [B, H, T, D/H]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)      # [B, H, T, D/H]
        a = a.transpose(1, 2).reshape(b, t, d)                           # [B, T, D]
        x = x + self.proj(a)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.out(x)                                               # [B, T, C]


class ForesightHeads(nn.Module):
    """K projection heads, ``forward(h[B,T,D]) -> [K,B,T,C]``; see the module docstring."""

    def __init__(self, in_dim: int, out_dim: int, k: int, hidden: int = 2048, kind: str = "mlp",
                 init_std: float | None = 0.02, bias_decay: bool = False):
        super().__init__()
        self.bias_decay = bool(bias_decay)
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("k", k), ("hidden", hidden)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ForesightHeads: {name} must be a positive int, got {v!r}")
        self.k, self.in_dim, self.out_dim, self.kind = k, in_dim, out_dim, kind
        if kind == "mlp":
            self.hidden = hidden
            self.w1 = nn.Parameter(torch.empty(k, hidden, in_dim))
            self.b1 = nn.Parameter(torch.empty(k, hidden))
            self.w2 = nn.Parameter(torch.empty(k, hidden, hidden))
            self.b2 = nn.Parameter(torch.empty(k, hidden))
            self.w3 = nn.Parameter(torch.empty(k, out_dim, hidden))
            self.b3 = nn.Parameter(torch.empty(k, out_dim))
            self.reset_parameters(init_std)
        else:
            self.hidden = 4 * in_dim
            self.blocks = nn.ModuleList(_CausalBlockHead(in_dim, out_dim) for _ in range(k))
            if init_std is not None:
                for m in self.blocks.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.normal_(m.weight, std=init_std)
                        nn.init.zeros_(m.bias)

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """Parameters the optimizer must not decay whatever their shape: the stacked MLP biases
        (none with ``bias_decay=True``; the transformer kind's biases are 1-D anyway)."""
        if self.kind != "mlp" or self.bias_decay:
            return []
        return [self.b1, self.b2, self.b3]

    @torch.no_grad()
    def reset_parameters(self, init_std: float | None = 0.02) -> None:
        """N(0, init_std) weights and zero biases (init_std None: nn.Linear's init per head)."""
        if self.kind != "mlp":
            raise RuntimeError("reset_parameters is defined for kind='mlp' only")
        for w, b in ((self.w1, self.b1), (self.w2, self.b2), (self.w3, self.b3)):
            if init_std is not None:
                w.normal_(0.0, init_std)
                b.zero_()
            else:
                bound = 1.0 / math.sqrt(w.shape[-1])   # fan_in; same law as nn.Linear's defaults
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3 or h.shape[-1] != self.in_dim:
            raise ValueError(f"ForesightHeads: h must be [B, T, {self.in_dim}], got {tuple(h.shape)}")
        if self.kind == "transformer":
            return torch.stack([blk(h) for blk in self.blocks])         # [K, B, T, C]
        return mlp_heads_reference(h, self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)   # [K, B, T, C]

    def extra_repr(self) -> str:
        return f"k={self.k}, in_dim={self.in_dim}, out_dim={self.out_dim}, hidden={self.hidden}, kind={self.kind!r}"
