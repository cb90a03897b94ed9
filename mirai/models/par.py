"""PAR: parallelized autoregressive generation (Wang et al., 2024) on the LlamaGen GPT blocks.

The G x G token grid is split into R = r x r regions of side s = G / r (R = 4 for PAR-4x, 16 for
PAR-16x). Token order (``par_order``): group 0 = the first token (in-region raster position 0) of every
region, regions in raster order, generated one by one; then group j (j = 1 .. s*s - 1) = the tokens at
in-region position j of all R regions, generated together in one step. Sequence position t predicts
grid cell ``order[t]`` (``par_position_to_cell``), so the N = G*G positions predict every cell once.

Inputs (T = N positions, like GPT; n = R):
    position 0                 class token                          -> predicts order[0]
    positions 1 .. n-1         tokens order[0 .. n-2]               -> order[1 .. n-1]   (sequential)
    position n                 token order[n-1]                     -> order[n]          } transition
    positions n+1 .. 2n-1      learnable transition tokens M1..M_{n-1} -> order[n+1 .. 2n-1] } group
    positions p >= 2n          token order[p - n]                   -> order[p]          (groups 2..)
so the training inputs are ``idx = seq[:, :N - n]`` with ``seq = codes[:, order]`` (``prepare_inputs``).

Attention is block-causal over input groups (``par_group_ids``): each of the first n positions is its
own group, the transition positions n .. 2n-1 form one group, then every n positions form a group;
position i sees position j iff gid[j] <= gid[i]. Every token of a predicted group therefore sees all
earlier groups in full (the "group-wise full attention" of the paper) and nothing of its own group.
Decoding runs one step per input group: n sequential steps, then one step per parallel group
(n + s*s - 1 steps instead of N).

RoPE: each input position gets the 2D RoPE of the grid cell of the token it holds (as in LlamaGen);
the class position gets the zero row; transition token M_i gets the cell of region i's first token
(``order[i]``), the token whose in-region successor it predicts. (The paper does not spell out the
transition tokens' positions; this is this implementation's choice.)

State dict = LlamaGen's GPT keys + ``transition_tokens`` [n - 1, dim] (N(0, 0.02) init), so a LlamaGen
checkpoint loads with ``strict=False`` and only ``transition_tokens`` missing. ``attn_backend`` must be
"sdpa" (the block mask is not expressible with flash-attn's causal flag).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from mirai.models.gpt import _ARCHS, GPTConfig, Transformer, registered_config


@dataclass
class PARConfig(GPTConfig):
    """GPTConfig plus the region split."""

    num_regions: int = 4                # R = r*r regions (4: PAR-4x, 16: PAR-16x); G must be divisible by r

    def __post_init__(self) -> None:
        super().__post_init__()
        r = math.isqrt(self.num_regions)
        if r * r != self.num_regions or self.num_regions < 4:
            raise ValueError(f"PARConfig.num_regions={self.num_regions} must be a square >= 4 (4, 16, ...)")
        if self.grid_size % r != 0:
            raise ValueError(f"PARConfig.num_regions={self.num_regions}: the token grid side {self.grid_size} "
                             f"(block_size {self.block_size}) must be divisible by sqrt(num_regions) = {r}")
        if self.block_size < 2 * self.num_regions:
            raise ValueError(f"PARConfig.num_regions={self.num_regions} needs at least {2 * self.num_regions} "
                             f"tokens, block_size is {self.block_size}")
        if self.attn_backend != "sdpa":
            raise ValueError("PARConfig.attn_backend must be 'sdpa': PAR's block-causal mask is not a "
                             "plain causal mask")


# --------------------------------------------------------------------------- index maps (pure, CPU)


def par_order(grid_size: int, num_regions: int) -> torch.Tensor:
    """LongTensor [N]: raster cell predicted at each sequence position (the PAR token order)."""
    r = math.isqrt(num_regions)
    if r * r != num_regions or grid_size % r != 0:
        raise ValueError(f"num_regions={num_regions} must be a square whose root divides grid_size={grid_size}")
    s = grid_size // r                                        # region side
    j = torch.arange(s * s)                                   # in-region raster position
    q = torch.arange(num_regions)                             # region raster index
    row = (q // r)[None, :] * s + (j // s)[:, None]           # [s*s, R]
    col = (q % r)[None, :] * s + (j % s)[:, None]             # [s*s, R]
    return (row * grid_size + col).reshape(-1)                # [N], group-major


def par_position_to_cell(grid_size: int, num_regions: int, which: str = "target") -> torch.Tensor:
    """LongTensor [N]: grid cell of the token each sequence position predicts (``which="target"``) or
    holds as input (``which="input"``; -1 for the class and transition positions)."""
    order = par_order(grid_size, num_regions)
    if which == "target":
        return order
    if which != "input":
        raise ValueError(f"which must be 'target' or 'input', got {which!r}")
    n, N = num_regions, order.numel()
    cells = torch.full((N,), -1, dtype=torch.long)
    cells[1:n + 1] = order[:n]                                # class at 0, then group 0's tokens
    cells[2 * n:] = order[n:N - n]                            # transition positions n+1..2n-1 stay -1
    return cells


def par_cell_to_position(grid_size: int, num_regions: int) -> torch.Tensor:
    """LongTensor [N]: sequence position that predicts each raster cell (inverse of ``par_order``)."""
    order = par_order(grid_size, num_regions)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return inverse


def par_group_ids(grid_size: int, num_regions: int) -> torch.Tensor:
    """LongTensor [N], non-decreasing: attention group of each input position."""
    n, N = num_regions, grid_size * grid_size
    p = torch.arange(N)
    return torch.where(p < n, p, torch.where(p < 2 * n, torch.full_like(p, n), n + 1 + (p - 2 * n) // n))


def par_rope_index(grid_size: int, num_regions: int) -> torch.Tensor:
    """LongTensor [N]: row of the RoPE table (0 = class, 1 + cell) used by each input position."""
    n, N = num_regions, grid_size * grid_size
    order = par_order(grid_size, num_regions)
    rows = torch.zeros(N, dtype=torch.long)
    rows[1:n + 1] = 1 + order[:n]                             # tokens of group 0
    rows[n + 1:] = 1 + order[1:N - n]                         # transitions (region i's first cell), groups 2..
    return rows


# --------------------------------------------------------------------------- model


class PARTransformer(Transformer):
    """LlamaGen GPT with PAR's token order, transition tokens and block-causal attention."""

    def __init__(self, config: PARConfig, ce_backend: str = "auto"):
        if not isinstance(config, PARConfig):
            raise TypeError(f"PARTransformer needs a PARConfig, got {type(config).__name__}")
        super().__init__(config, ce_backend)
        G, n = config.grid_size, config.num_regions
        self.transition_tokens = nn.Parameter(torch.empty(n - 1, config.dim))
        nn.init.normal_(self.transition_tokens, std=config.initializer_range)
        N = G * G
        p = torch.arange(N)
        order = par_order(G, n)
        # input source of each position: kind 0 class, 1 token (src = index into seq), 2 transition
        kind = torch.where(p == 0, 0, torch.where((p > n) & (p < 2 * n), 2, 1))
        src = torch.where(p <= n, p - 1, p - n)
        src = torch.where(kind == 2, p - n - 1, src).clamp(min=0)
        gid = par_group_ids(G, n)
        for name, value in (("par_order", order), ("par_inverse", par_cell_to_position(G, n)),
                            ("par_kind", kind), ("par_src", src), ("par_rope_index", par_rope_index(G, n)),
                            ("par_gid", gid), ("par_mask", gid[None, :] <= gid[:, None])):
            self.register_buffer(name, value, persistent=False)   # integer/bool: never cast by .to(dtype)

    @property
    def num_regions(self) -> int:
        return self.config.num_regions

    # ---- sequence layout
    def prepare_inputs(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raster codes ``[B, N]`` -> (``idx [B, N - n]``, ``targets [B, N]`` in PAR order)."""
        self._check_codes(codes)
        seq = codes[:, self.par_order]                                    # [B, N] sequence order
        return seq[:, : self.seq_len - self.num_regions], seq

    def position_to_cell(self, which: str = "target", device: torch.device | str | None = None) -> torch.Tensor:
        cells = par_position_to_cell(self.config.grid_size, self.num_regions, which)
        return cells if device is None else cells.to(device)

    def sequence_to_raster(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.par_inverse.to(x.device)]

    def group_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        if device is None:
            return par_group_ids(self.config.grid_size, self.num_regions)  # built on the CPU: no device read
        return self.par_gid.to(device)                                    # the buffer: no host work on its device

    def decode_schedule(self) -> list[tuple[int, int]]:
        n, N = self.num_regions, self.seq_len
        return [(p, p + 1) for p in range(n)] + [(p, p + n) for p in range(n, N, n)]

    def _rope_rows(self, start: int, length: int) -> torch.Tensor:
        return self.freqs_cis[self.par_rope_index[start:start + length]]  # [length, hd/2, 2]

    def rope_at(self, positions: torch.Tensor) -> torch.Tensor:
        return self.freqs_cis[self.par_rope_index[positions]]             # [S, hd/2, 2]

    def _train_mask(self, T: int) -> torch.Tensor | None:
        return self.par_mask[:T, :T]                                      # [T, T] bool, True = attend

    def _inputs(self, tokens: torch.Tensor, cls: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of the positions ``positions [S]`` (device LongTensor): ``tokens [B, >= needed]`` in
        sequence order, ``cls [B, 1, D]`` the class embedding -> ``[B, S, D]``."""
        kind = self.par_kind[positions]                                   # [S]
        src = self.par_src[positions]
        tok_src = torch.where(kind == 1, src, torch.zeros_like(src)).clamp(max=tokens.shape[1] - 1)
        x = self.tok_embeddings(tokens[:, tok_src])                       # [B, S, D]
        trans = self.transition_tokens.to(x.dtype)[torch.where(kind == 2, src, torch.zeros_like(src))]
        x = torch.where((kind == 2)[None, :, None], trans[None], x)
        return torch.where((kind == 0)[None, :, None], cls.to(x.dtype), x)

    def _embed_tokens(self, idx: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        if idx is None:
            return cond
        need = self.seq_len - self.num_regions
        if idx.dim() != 2 or idx.shape[1] != need:
            raise ValueError(f"PAR idx must be [B, {need}] tokens in PAR order (prepare_inputs), "
                             f"got {tuple(idx.shape)}")
        return self._inputs(idx, cond, torch.arange(self.seq_len, device=idx.device))

    def embed_at(self, seq_tokens: torch.Tensor | None, cond_idx: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        cls = self.cls_embedding.embedding_table(cond_idx).unsqueeze(1)  # [B, 1, D]
        if seq_tokens is None:
            seq_tokens = torch.zeros(cond_idx.shape[0], 1, dtype=torch.long, device=cond_idx.device)
        return self._inputs(seq_tokens, cls, positions)


# --------------------------------------------------------------------------- registry

_PAR_ARCHS: dict[str, dict] = {f"PAR-{name[4:]}": arch for name, arch in _ARCHS.items()}


def par_config(name: str, **overrides) -> PARConfig:
    """The PARConfig of a registered model (PAR-debug, PAR-B, PAR-L, PAR-XL, PAR-XXL, PAR-3B)."""
    return registered_config(PARConfig, _PAR_ARCHS, "PAR", name, overrides)


def _factory(name: str) -> Callable[..., PARTransformer]:
    def build(ce_backend: str = "auto", **overrides) -> PARTransformer:
        return PARTransformer(par_config(name, **overrides), ce_backend=ce_backend)
    build.__name__ = name.replace("-", "_")
    build.__doc__ = f"{name}: {_PAR_ARCHS[name]} plus PARConfig overrides (num_regions=4 by default)."
    return build


PAR_models: dict[str, Callable[..., PARTransformer]] = {name: _factory(name) for name in _PAR_ARCHS}
