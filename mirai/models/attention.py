"""Self-attention of the LlamaGen GPT block, its backends, and the KV cache used for sampling.

Shapes: the block input ``x [B, T, dim]``; ``wqkv`` (no bias) gives q ``[B, T, n_head, hd]`` and
k, v ``[B, T, n_kv_head, hd]`` (hd = dim // n_head); 2D RoPE rotates q and k (see rope.py); the
kernels see ``[B, H, T, hd]`` (sdpa) or ``[B, T, H, hd]`` (flash-attn); ``wo`` maps back to
``[B, T, dim]``.

Backends (``GPTConfig.attn_backend``, fixed when the module is built, never swapped at import):
  * ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (torch picks FlashAttention-2,
    cuDNN or memory-efficient kernels on GPU, a math kernel on CPU).
  * ``"flash_attn"``: ``flash_attn.flash_attn_func`` from the flash-attn package, for the plain causal
    training pass on CUDA fp16/bf16 tensors. Other calls (fp32 or CPU tensors, an explicit mask, the
    KV-cache path) use sdpa, which computes the same function. Asking for it without the package
    installed is an ImportError that names the config field.

Masks: in the training pass ``attn_mask=None`` means causal; otherwise a bool ``[T, T]`` mask with
True = may attend (PAR's block-causal mask). In the cached decoding pass the new chunk of S tokens at
positions ``start_pos .. start_pos+S-1`` attends to the cache ``[0, start_pos+S)``; ``attn_mask=None``
there means "everything" (one token, or one parallel PAR group), else a bool ``[S, start_pos+S]``.

KV cache: ``KVCache`` is plain state owned by the model after an explicit ``setup_caches`` call: it is
never a registered buffer (so never in the state dict) and only the decoding path writes to it.
``StaticKVCache`` is the fixed-shape variant for compiled / CUDA-graphed decoding
(``mirai.models.static_decode``): it always holds the full length and batch, the positions to write
come as a LongTensor ``[S]`` and ``write`` returns the whole cache, so every step has the same shapes
and reads nothing on the host; the caller masks the positions not written yet (``attn_mask [S, T]``).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirai.models.rope import apply_rotary

ATTN_BACKENDS = ("sdpa", "flash_attn")


def resolve_flash_attn() -> Callable:
    """``flash_attn.flash_attn_func``, or an ImportError naming the config field that asked for it."""
    try:
        module = importlib.import_module("flash_attn")
    except ImportError as err:
        raise ImportError(
            "GPTConfig.attn_backend='flash_attn' needs the flash-attn package, which is not importable "
            f"here ({err}); install flash-attn or set model.attn_backend=sdpa") from err
    return module.flash_attn_func


class KVCache:
    """Keys and values of one attention layer for cached decoding.

    k, v: ``[max_batch_size, n_kv_head, max_seq_length, head_dim]`` in ``dtype`` on ``device``.
    """

    def __init__(self, max_batch_size: int, max_seq_length: int, n_kv_head: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (max_batch_size, n_kv_head, max_seq_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_seq_length(self) -> int:
        return self.k.shape[2]

    def write(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, Hkv, S, hd]`` at ``start_pos``; return the cache ``[B, Hkv, start_pos+S, hd]``."""
        B, _, S, _ = k.shape
        end = start_pos + S
        if B > self.max_batch_size or end > self.max_seq_length:
            raise ValueError(f"KV cache holds batch {self.max_batch_size} x {self.max_seq_length} positions; "
                             f"asked to write batch {B} at positions [{start_pos}, {end}): call "
                             "setup_caches with larger max_batch_size / max_seq_length")
        self.k[:B, :, start_pos:end] = k.to(self.k.dtype)
        self.v[:B, :, start_pos:end] = v.to(self.v.dtype)
        return self.k[:B, :, :end], self.v[:B, :, :end]


class StaticKVCache:
    """Full-length keys and values of one attention layer for fixed-shape decoding.

    k, v: ``[batch, n_kv_head, max_seq_length, head_dim]`` in ``dtype`` on ``device``, allocated once.
    """

    def __init__(self, batch: int, max_seq_length: int, n_kv_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        shape = (batch, n_kv_head, max_seq_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [batch, Hkv, S, hd]`` at ``positions [S]``; return the whole cache ``[batch, Hkv, T, hd]``."""
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"StaticKVCache holds batch {self.k.shape[0]}, asked to write batch {k.shape[0]}")
        self.k.index_copy_(2, positions, k.to(self.k.dtype))
        self.v.index_copy_(2, positions, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention with 2D RoPE; LlamaGen parameter names."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, attn_dropout_p: float = 0.0,
                 resid_dropout_p: float = 0.0, backend: str = "sdpa"):
        super().__init__()
        if dim % n_head != 0:
            raise ValueError(f"dim={dim} must be divisible by n_head={n_head}")
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}")
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"GPTConfig.attn_backend must be one of {ATTN_BACKENDS}, got {backend!r}")
        self.dim = dim
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = dim // n_head
        self.backend = backend
        self._flash_fn = resolve_flash_attn() if backend == "flash_attn" else None
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: KVCache | StaticKVCache | None = None, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """``x [B, T, dim]``, ``rope [T, hd/2, 2]`` -> ``[B, T, dim]`` (see the module docstring for masks).
        ``start_pos``: the first position of ``x`` (``KVCache``), or its positions ``[T]`` (``StaticKVCache``)."""
        B, T, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        # q and k are adjacent columns of the fused projection: rotate them in one call
        qk, v = self.wqkv(x).split([self.dim + kv, kv], dim=-1)        # [B, T, dim + kv], [B, T, kv]
        qk = apply_rotary(qk.view(B, T, self.n_head + self.n_kv_head, self.head_dim), rope)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)          # [B, T, H, hd], [B, T, Hkv, hd]
        v = v.view(B, T, self.n_kv_head, self.head_dim)                # [B, T, Hkv, hd]
        dropout_p = self.attn_dropout_p if self.training else 0.0

        if (cache is None and attn_mask is None and self._flash_fn is not None and x.is_cuda
                and q.dtype in (torch.float16, torch.bfloat16)):
            out = self._flash_fn(q, k, v, dropout_p=dropout_p, causal=True)   # [B, T, H, hd]
            return self.resid_dropout(self.wo(out.reshape(B, T, self.dim)))

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))               # [B, H(kv), T, hd]
        if cache is not None:
            k, v = cache.write(start_pos, k, v)                        # [B, Hkv, start_pos+T (static: all), hd]
            is_causal = False                                          # attn_mask None: see everything
        else:
            is_causal = attn_mask is None
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)                        # [B, H, L, hd]
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=dropout_p)      # [B, H, T, hd]
        out = out.transpose(1, 2).reshape(B, T, self.dim)              # [B, T, dim]
        return self.resid_dropout(self.wo(out))
