"""LlamaGen's class-conditional GPT family (c2i), with hidden states of any layer in one pass.

Same hyper-parameters and state-dict key names as LlamaGen's ``autoregressive/models/gpt.py``, so its
released c2i checkpoints load with ``strict=True``:
``tok_embeddings.weight``, ``cls_embedding.embedding_table.weight`` (num_classes + 1 rows, the last is
the null class for classifier-free guidance; always present, even with class_dropout_prob = 0), ``layers.{i}.attention.wqkv.weight`` (fused q, k, v, no
bias), ``layers.{i}.attention.wo.weight``, ``layers.{i}.feed_forward.{w1,w3,w2}.weight`` (SwiGLU,
hidden = find_multiple(int(2 * 4 * dim / 3), 256)), ``layers.{i}.attention_norm.weight``,
``layers.{i}.ffn_norm.weight``, ``norm.weight``, ``output.weight``. The 2D RoPE table (rope.py) is a
non-persistent float32 buffer, so like LlamaGen's plain ``freqs_cis`` attribute it is not in the state
dict; it stays float32 when the module is cast to bf16.

Sequence layout: ``[class, x0, ..., x_{N-2}]`` (T = block_size = N positions, N = grid_size**2 tokens
in raster order); position t predicts x_t. ``forward`` (the only training entry point) returns a
``GPTOutput`` in train and eval mode alike:

  logits        [B, T, V] in the output layer's dtype (bf16 under autocast), or None when
                ``return_logits=False`` or when ``upto_layer`` is set.
  loss          mean cross-entropy over ``targets [B, T]`` computed in float32 (ignore_index -100), or None.
                Plain path (``return_logits=True``): ``F.cross_entropy(logits.float())``. Fused path
                (targets with ``return_logits=False``, what the trainer's ``train.fused_ce`` asks for):
                ``output(final_hidden, targets)`` runs the chunked linear + cross-entropy of
                mirai/ops/linear_ce.py (its row pass: the ``ce_backend`` the model was built with), same
                value and gradients without the [B, T, V] fp32 logits.
  hidden        {l: [B, T, dim]} residual stream after block l (1-based) for l in ``hidden_layers``;
                with ``upto_layer=l`` it always holds l.
  final_hidden  [B, T, dim] after the final RMSNorm, before ``output``; None with ``upto_layer``.

Class-label dropout (to the null class, probability ``class_dropout_prob``), token / residual / FFN /
attention dropout and drop-path apply only in training mode; ``drop_labels`` (bool [B]) forces a given
drop mask in any mode (so a teacher can see the same dropped labels as the student). ``forward``
mutates no module state. Sampling (KV cache, CFG, top-k / top-p) lives in generation.py and uses the
separate cached path ``setup_caches`` / ``embed_positions`` / ``decode_step``.

Layout helpers shared with PAR (par.py), so a trainer needs no model-specific code:
``prepare_inputs(codes [B, N] raster) -> (idx, targets)``, ``position_to_cell(which)`` (grid cell that
each sequence position predicts / holds), ``sequence_to_raster(x)``, ``group_ids()`` (attention groups).

Speed hooks for the trainer: every block is a self-contained ``TransformerBlock`` (``block(x, rope,
attn_mask)``) so it can be compiled alone (``model.layers[i].compile()``), and
``enable_activation_checkpointing()`` recomputes blocks in the backward pass. RMSNorm uses apex's fused
kernel when apex is importable (``norm_impl="auto"``) and ``F.rms_norm`` (float32 math inside)
otherwise. Blocks compile with ``fullgraph=True`` (no graph breaks; tested), and the fused loss is a
registered custom op, so a whole-model ``torch.compile`` also traces without breaks.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mirai.models.attention import ATTN_BACKENDS, Attention, KVCache, StaticKVCache
from mirai.models.rope import rope_2d_table
from mirai.ops.linear_ce import linear_cross_entropy

NORM_IMPLS = ("auto", "torch", "apex")


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class GPTConfig:
    """Architecture and regularisation of a LlamaGen c2i GPT (defaults: GPT-B at 256 px)."""

    dim: int = 768                      # model width
    n_layer: int = 12                   # number of transformer blocks
    n_head: int = 12                    # attention heads (head_dim = dim // n_head, divisible by 4)
    n_kv_head: int | None = None        # key/value heads for grouped-query attention (None = n_head)
    multiple_of: int = 256              # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # optional scale of the SwiGLU hidden size before rounding
    rope_base: float = 10000.0          # RoPE frequency base
    norm_eps: float = 1e-5              # RMSNorm epsilon
    initializer_range: float = 0.02     # std of the normal init of every Linear / Embedding but `output`
    token_dropout_p: float = 0.1        # dropout on the input embeddings (class + tokens)
    attn_dropout_p: float = 0.0         # dropout on attention probabilities
    resid_dropout_p: float = 0.1        # dropout after the attention output projection
    ffn_dropout_p: float = 0.1          # dropout after the SwiGLU output projection
    drop_path_rate: float = 0.0         # stochastic depth, linearly increasing over blocks up to this
    num_classes: int = 1000             # class labels; label `num_classes` is the null (unconditional) class
    class_dropout_prob: float = 0.1     # training-time probability of replacing a label by the null class
    vocab_size: int = 16384             # VQ codebook size
    cls_token_num: int = 1              # class-condition tokens in front of the image tokens (c2i: 1)
    block_size: int = 256               # image tokens per image = grid_size**2 = sequence length T
    attn_backend: str = "sdpa"          # "sdpa" or "flash_attn" (see attention.py)
    norm_impl: str = "auto"             # RMSNorm kernel: "auto" (apex if importable), "torch" or "apex"
    fused_ce_chunk_size: int = 2048     # tokens per chunk of the fused loss (memory ~ chunk * V * 8 bytes)

    def __post_init__(self) -> None:
        g = math.isqrt(self.block_size)
        if g * g != self.block_size:
            raise ValueError(f"GPTConfig.block_size={self.block_size} must be a square (grid_size**2)")
        for name in ("dim", "n_layer", "n_head", "num_classes", "vocab_size", "fused_ce_chunk_size"):
            if getattr(self, name) < (2 if name == "vocab_size" else 1):
                raise ValueError(f"GPTConfig.{name} must be >= {2 if name == 'vocab_size' else 1}, "
                                 f"got {getattr(self, name)}")
        if self.dim % self.n_head != 0:
            raise ValueError(f"GPTConfig.dim={self.dim} must be divisible by n_head={self.n_head}")
        if self.head_dim % 4 != 0:
            raise ValueError(f"GPTConfig.dim={self.dim}: head_dim = dim // n_head = {self.head_dim} must be "
                             "divisible by 4 for 2D RoPE")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig.n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.cls_token_num != 1:
            raise ValueError(f"GPTConfig.cls_token_num={self.cls_token_num}: class-conditional models use "
                             "exactly 1 class token")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"GPTConfig.attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.norm_impl not in NORM_IMPLS:
            raise ValueError(f"GPTConfig.norm_impl must be one of {NORM_IMPLS}, got {self.norm_impl!r}")
        for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p",
                     "drop_path_rate", "class_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"GPTConfig.{name}={p} must be in [0, 1)")

    @property
    def grid_size(self) -> int:
        """Side of the square token grid (16 at 256 px, 24 at 384 px)."""
        return math.isqrt(self.block_size)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)


@dataclass
class GPTOutput:
    """What ``Transformer.forward`` returns (see the module docstring for shapes)."""

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    final_hidden: torch.Tensor | None = None


# --------------------------------------------------------------------------- layers


def _apex_rms_norm() -> Callable | None:
    try:
        return importlib.import_module("apex.normalization.fused_layer_norm").fused_rms_norm_affine
    except (ImportError, AttributeError):
        return None


class RMSNorm(nn.Module):
    """RMSNorm ``x / sqrt(mean(x^2) + eps) * weight`` computed in float32, cast back to x's dtype before
    the weight (LlamaGen's formula). ``impl="apex"`` (or "auto" with apex importable) uses apex's fused CUDA
    kernel for CUDA inputs whose dtype equals the weight's, except inside torch.compile."""

    def __init__(self, dim: int, eps: float = 1e-5, impl: str = "auto"):
        super().__init__()
        if impl not in NORM_IMPLS:
            raise ValueError(f"RMSNorm impl must be one of {NORM_IMPLS}, got {impl!r}")
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))
        self._apex_fn = _apex_rms_norm() if impl in ("auto", "apex") else None
        if impl == "apex" and self._apex_fn is None:
            raise ImportError("GPTConfig.norm_impl='apex' needs NVIDIA apex with its fused layer-norm "
                              "extension; install apex or set model.norm_impl=torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._apex_fn is not None and x.is_cuda and x.dtype == self.weight.dtype
                and not torch.compiler.is_compiling()):        # under torch.compile inductor fuses the torch path
            return self._apex_fn(x, self.weight, (self.dim,), self.eps)
        # F.rms_norm upcasts bf16/fp16 to float32 internally and casts the result back (same values as
        # rms_norm(x.float()).type_as(x), without the explicit fp32 copy or saving it for backward);
        # type_as is a no-op except under an autocast that runs rms_norm in fp32.
        return F.rms_norm(x, (self.dim,), eps=self.eps).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)`` followed by dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class OutputHead(nn.Linear):
    """The output layer ``[V, dim]`` (no bias): ``head(h)`` gives logits ``[..., V]``; ``head(h, targets)``
    gives the mean cross-entropy (fp32) by the fused chunked op, without the logits. The loss goes
    through this module's ``__call__`` so that per-module parameter gathering (an engine's partitioned-parameter hooks)
    sees the weight. State-dict name unchanged (``output.weight``)."""

    def __init__(self, dim: int, vocab_size: int, chunk_size: int = 2048, ce_backend: str = "auto"):
        super().__init__(dim, vocab_size, bias=False)
        self.chunk_size = chunk_size
        self.ce_backend = ce_backend       # linear_cross_entropy's row-pass backend (train.ce_backend)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(x, self.weight)                                               # [..., V]
        x2 = x.reshape(-1, x.shape[-1])                                                   # [N, D]
        dtype = x2.dtype
        if torch.is_autocast_enabled(x2.device.type):                 # as nn.Linear would run under autocast
            dtype = torch.get_autocast_dtype(x2.device.type)
        return linear_cross_entropy(x2.to(dtype), self.weight.to(dtype), targets.reshape(-1),  # [N]
                                    chunk_size=self.chunk_size, backend=self.ce_backend)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep) / keep


class TransformerBlock(nn.Module):
    """Pre-norm block ``h = x + attn(norm(x)); out = h + ffn(norm(h))`` (self-contained: compile per block)."""

    def __init__(self, config: GPTConfig, drop_path: float = 0.0):
        super().__init__()
        self.attention = Attention(config.dim, config.n_head, config.n_kv_head, config.attn_dropout_p,
                                   config.resid_dropout_p, config.attn_backend)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, config.norm_impl)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, config.norm_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: KVCache | StaticKVCache | None = None, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, attn_mask, cache, start_pos))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    """Class-label embedding with a null class (row ``num_classes``) for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop(self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Labels with the null class where ``drop_mask`` (bool [B]) is True (random when None)."""
        if drop_mask is None:
            drop_mask = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop_mask.to(labels.device), torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``labels [B]`` -> ``[B, 1, dim]``."""
        if drop_mask is not None or (train and self.dropout_prob > 0):
            labels = self.drop(labels, drop_mask)
        return self.embedding_table(labels).unsqueeze(1)


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """LlamaGen c2i GPT. See the module docstring for the forward contract."""

    def __init__(self, config: GPTConfig, ce_backend: str = "auto"):
        """``ce_backend``: the fused loss's row pass (``mirai.ops.linear_ce``: "auto", "kernel" or "torch"); how the
        loss runs, not what the model is, so not a GPTConfig field (checkpoints do not record it)."""
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        n = config.n_layer
        rates = [config.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        self.layers = nn.ModuleList(TransformerBlock(config, r) for r in rates)
        self.norm = RMSNorm(config.dim, config.norm_eps, config.norm_impl)
        self.output = OutputHead(config.dim, config.vocab_size, config.fused_ce_chunk_size, ce_backend)
        # RoPE (cos, sin) table [1 + N, head_dim/2, 2]; float32, not in the state dict (see _apply)
        self.register_buffer("freqs_cis", self._rope_table(), persistent=False)
        self.activation_checkpointing = False
        self._caches: list[KVCache] | None = None
        self.initialize_weights()

    # ---- construction helpers
    def _rope_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        c = self.config
        return rope_2d_table(c.grid_size, c.head_dim, c.rope_base, c.cls_token_num, device=device)

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.bfloat16() go through here: rebuild the RoPE table in float32 on the new device
        # so a bf16 model never rotates with bf16-rounded angles.
        super()._apply(fn, recurse)
        self.freqs_cis = self._rope_table(device=self.freqs_cis.device)
        return self

    def initialize_weights(self) -> None:
        """N(0, initializer_range) for every Linear and Embedding, zeros for ``output``; norms at 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.zeros_(self.output.weight)

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass (training with grad only)."""
        self.activation_checkpointing = bool(enabled)

    # ---- sequence layout (PAR overrides these)
    @property
    def seq_len(self) -> int:
        """Sequence positions T of a full image (= block_size = number of predicted tokens)."""
        return self.config.block_size

    def prepare_inputs(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raster codes ``[B, N]`` -> (``idx [B, N-1]`` for forward, ``targets [B, N]``)."""
        self._check_codes(codes)
        return codes[:, :-1], codes

    def position_to_cell(self, which: str = "target", device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [T] (on ``device``, default CPU): grid cell (raster index) of the token each sequence
        position predicts (``which="target"``) or holds as input (``which="input"``; -1 for the class token)."""
        t = torch.arange(self.seq_len, device=device)
        if which == "target":
            return t
        if which == "input":
            return t - 1
        raise ValueError(f"position_to_cell: which must be 'target' or 'input', got {which!r}")

    def sequence_to_raster(self, x: torch.Tensor) -> torch.Tensor:
        """Reorder dim 1 from sequence (prediction) order to raster order (identity for GPT)."""
        return x

    def group_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [T] (default CPU), non-decreasing: attention group of each position; position i
        sees position j iff gid[j] <= gid[i] (GPT: every position is its own group, i.e. causal)."""
        return torch.arange(self.seq_len, device=device)

    def _rope_rows(self, start: int, length: int) -> torch.Tensor:
        return self.freqs_cis[start:start + length]                    # [length, hd/2, 2]

    def rope_at(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE rows of the input positions ``positions [S]`` (a device LongTensor): ``[S, hd/2, 2]``."""
        return self.freqs_cis[positions]

    def _train_mask(self, T: int) -> torch.Tensor | None:
        return None                                                    # causal

    def _embed_tokens(self, idx: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        """Class embedding ``cond [B, 1, D]`` + tokens -> inputs ``[B, T, D]`` (before dropout)."""
        if idx is None:
            return cond
        if idx.dim() != 2 or idx.shape[1] > self.seq_len - 1:
            raise ValueError(f"idx must be [B, <= {self.seq_len - 1}] image tokens, got {tuple(idx.shape)}")
        return torch.cat([cond, self.tok_embeddings(idx)], dim=1)

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 2 or codes.shape[1] != self.config.block_size:
            raise ValueError(f"codes must be [B, {self.config.block_size}] raster tokens, got {tuple(codes.shape)}")

    # ---- training / scoring forward
    def forward(self, idx: torch.Tensor | None, cond_idx: torch.Tensor, *, targets: torch.Tensor | None = None,
                hidden_layers: Iterable[int] = (), upto_layer: int | None = None, return_logits: bool = True,
                drop_labels: torch.Tensor | None = None) -> GPTOutput:
        n_layer = self.config.n_layer
        if cond_idx is None or cond_idx.dim() != 1:
            raise ValueError(f"cond_idx must be a LongTensor [B] of class labels, got "
                             f"{None if cond_idx is None else tuple(cond_idx.shape)}")
        if upto_layer is not None and not 1 <= upto_layer <= n_layer:
            raise ValueError(f"upto_layer={upto_layer} must be in 1..{n_layer}")
        last = n_layer if upto_layer is None else upto_layer
        wanted = set(int(l) for l in hidden_layers)
        bad = sorted(l for l in wanted if not 1 <= l <= last)
        if bad:
            raise ValueError(f"hidden_layers {bad} out of range 1..{last} (1-based block counts"
                             f"{'' if upto_layer is None else f', upto_layer={upto_layer}'})")
        if upto_layer is not None and targets is not None:
            raise ValueError("targets with upto_layer: the truncated pass has no logits, hence no loss")
        fused = targets is not None and not return_logits

        cond = self.cls_embedding(cond_idx, train=self.training, drop_mask=drop_labels)   # [B, 1, D]
        h = self.tok_dropout(self._embed_tokens(idx, cond))                                 # [B, T, D]
        T = h.shape[1]
        rope = self._rope_rows(0, T)
        mask = self._train_mask(T)
        use_ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()

        hidden: dict[int, torch.Tensor] = {}
        for i in range(last):
            block = self.layers[i]
            if use_ckpt:
                h = checkpoint(block, h, rope, mask, use_reentrant=False)
            else:
                h = block(h, rope, mask)
            if i + 1 in wanted:
                hidden[i + 1] = h
        if upto_layer is not None:
            hidden[upto_layer] = h
            return GPTOutput(logits=None, loss=None, hidden=hidden, final_hidden=None)

        h = self.norm(h)
        if targets is not None and targets.shape != h.shape[:2]:
            raise ValueError(f"targets {tuple(targets.shape)} must match the logits' [B, T] = "
                             f"{tuple(h.shape[:2])}")
        if fused:                                        # chunked linear + CE: no logits
            return GPTOutput(logits=None, loss=self.output(h, targets), hidden=hidden, final_hidden=h)
        logits = self.output(h) if return_logits else None                                # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return GPTOutput(logits=logits, loss=loss, hidden=hidden, final_hidden=h)

    # ---- cached decoding (used by generation.py; never by forward)
    def setup_caches(self, max_batch_size: int, max_seq_length: int | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Allocate one KV cache per block (plain state, not in the state dict)."""
        c = self.config
        ref = self.output.weight
        max_seq_length = self.seq_len if max_seq_length is None else max_seq_length
        self._caches = [KVCache(max_batch_size, max_seq_length, c.n_kv_head or c.n_head, c.head_dim,
                                dtype or ref.dtype, device or ref.device) for _ in self.layers]

    def clear_caches(self) -> None:
        self._caches = None

    @property
    def caches(self) -> list[KVCache] | None:
        return self._caches

    def embed_positions(self, seq_tokens: torch.Tensor | None, cond_idx: torch.Tensor, start: int,
                        end: int) -> torch.Tensor:
        """Inputs of positions ``[start, end)`` for decoding, no dropout: ``[B, end-start, D]``.

        ``seq_tokens [B, >= end-1]`` holds the tokens in sequence (prediction) order; only entries
        before ``start`` are read. ``cond_idx [B]`` labels (the null class for the unconditional half).
        """
        return self.embed_at(seq_tokens, cond_idx, torch.arange(start, end, device=cond_idx.device))

    def embed_at(self, seq_tokens: torch.Tensor | None, cond_idx: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """Inputs of the positions ``positions [S]`` (a device LongTensor; fixed shapes, nothing read on the
        host, so a compiled decoding step can call it): ``[B, S, D]``; see ``embed_positions``."""
        cls = self.cls_embedding.embedding_table(cond_idx).unsqueeze(1)                   # [B, 1, D]
        if seq_tokens is None:
            seq_tokens = torch.zeros(cond_idx.shape[0], 1, dtype=torch.long, device=cond_idx.device)
        src = (positions - 1).clamp(min=0, max=seq_tokens.shape[1] - 1)                   # [S]
        tok = self.tok_embeddings(seq_tokens[:, src])                                     # [B, S, D]
        return torch.where((positions == 0)[None, :, None], cls.to(tok.dtype), tok)

    def decode_schedule(self) -> list[tuple[int, int]]:
        """Position ranges ``[start, end)`` decoded per step (one token per step for GPT)."""
        return [(p, p + 1) for p in range(self.seq_len)]

    def decode_step(self, x: torch.Tensor, start_pos: int | torch.Tensor,
                    caches: list[KVCache] | list[StaticKVCache] | None = None) -> torch.Tensor:
        """Run inputs ``x [B, S, D]`` at positions ``[start_pos, start_pos+S)`` through the cached model
        (``caches``, default the model's own from ``setup_caches``); returns float32 logits ``[B, S, V]``.

        With ``StaticKVCache`` caches ``start_pos`` is the positions ``[S]`` as a device LongTensor: the step
        then attends to the whole cache under the mask ``gid[j] <= gid[position]`` (fixed shapes, no host
        read: the form ``mirai.models.static_decode`` compiles)."""
        caches = self._caches if caches is None else caches
        if caches is None:
            raise RuntimeError("decode_step needs KV caches: call model.setup_caches(...) first")
        S = x.shape[1]
        if isinstance(start_pos, torch.Tensor):
            gid = self.group_ids(device=x.device)                                         # [T]
            mask = gid[None, :] <= gid[start_pos][:, None]                                # [S, T]
            rope = self.rope_at(start_pos)
        else:
            gid = self.group_ids()                                                        # [T] on CPU
            rows = gid[start_pos:start_pos + S, None]                                     # [S, 1]
            mask = gid[None, :start_pos + S] <= rows                                      # [S, start+S]
            mask = None if bool(mask.all()) else mask.to(x.device)
            rope = self._rope_rows(start_pos, S)
        h = x
        for block, cache in zip(self.layers, caches):
            h = block(h, rope, mask, cache, start_pos)
        return self.output(self.norm(h)).float()

    @torch.no_grad()
    def generate(self, cond_idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Sample raster token grids ``[B, N]`` for labels ``cond_idx [B]``; see generation.generate."""
        from mirai.models.generation import generate
        return generate(self, cond_idx, **kwargs)


# --------------------------------------------------------------------------- registry

_ARCHS: dict[str, dict] = {
    "GPT-debug": dict(n_layer=2, n_head=4, dim=64),
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),       # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),      # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),     # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),    # 1.4B
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),     # 3.1B
}


#: GPTConfig fields older versions recorded in checkpoints and exports, ignored when such a config is read:
#: fused_ce (the fused loss is chosen per call, ``return_logits=False``; the trainer's switch is train.fused_ce)
RETIRED_FIELDS = ("fused_ce",)


def registered_config(cls: type, archs: dict[str, dict], kind: str, name: str, overrides: dict):
    """``cls`` (a config dataclass) of the model ``name`` in the registry ``archs`` with field overrides;
    unknown names and fields raise errors that list the known ones (``kind``: "GPT", "PAR")."""
    if name not in archs:
        raise KeyError(f"unknown {kind} model {name!r}; known: {sorted(archs)}")
    names = {f.name for f in fields(cls)}
    overrides = {k: v for k, v in overrides.items() if k not in RETIRED_FIELDS}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown} for model {name!r}; fields: {sorted(names)}")
    return cls(**{**archs[name], **overrides})


def gpt_config(name: str, **overrides) -> GPTConfig:
    """The GPTConfig of a registered model with field overrides (no module is built)."""
    return registered_config(GPTConfig, _ARCHS, "GPT", name, overrides)


def _factory(name: str) -> Callable[..., Transformer]:
    def build(ce_backend: str = "auto", **overrides) -> Transformer:
        return Transformer(gpt_config(name, **overrides), ce_backend=ce_backend)
    build.__name__ = name.replace("-", "_")
    build.__doc__ = f"{name}: {_ARCHS[name]} plus GPTConfig overrides."
    return build


GPT_models: dict[str, Callable[..., Transformer]] = {name: _factory(name) for name in _ARCHS}


def build_gpt(name: str, ce_backend: str = "auto", **overrides) -> Transformer:
    """Build a registered model: GPT-* here, PAR-* from mirai.models.par (same forward contract).
    ``ce_backend``: the fused loss's row pass (see ``Transformer``); ``overrides``: config fields."""
    if name in GPT_models:
        return GPT_models[name](ce_backend=ce_backend, **overrides)
    from mirai.models.par import PAR_models          # imported here: par.py builds on this module
    if name in PAR_models:
        return PAR_models[name](ce_backend=ce_backend, **overrides)
    raise KeyError(f"unknown model {name!r}; known: {sorted(GPT_models) + sorted(PAR_models)}")
