"""``ForesightObjective``: the trainable part of Mirai that sits next to the GPT in the trained module.

The trainer wraps ``nn.ModuleDict(model=gpt, foresight=objective)`` (or similar) in the DeepSpeed
engine; the teacher source (``mirai.foresight.sources``) stays outside. Per step:

    coeffs = objective.coefficients(step, total_steps, epoch)         # host floats, no sync
    out = gpt(idx, cond_idx, targets=tokens, hidden_layers=objective.hidden_layers)
    if objective.active(coeffs) and objective.needs_teacher:
        teacher = source.targets_for(batch, gpt)                      # [B, S, C], no grad (sources/)
    total, per_head = objective(objective.select_hidden(out), teacher, coeffs, tokens=tokens)
    loss = out.loss + total

injection "internal" (Mirai): ``hidden`` is the GPT residual stream after block ``layer`` [B, T, D];
``ForesightHeads`` project it to [K, B, T, C] and the negative cosine against ``teacher`` rows picked
by the neighbour table (a non-persistent [K, T] buffer) gives per_head [K]; total = sum coeffs*per_head.
MLP heads go through ``mirai.ops.foresight.foresight_loss`` (fused kernel; backend cfg.backend) when
that module exists, else through the reference ``mirai.ops.reference.foresight_loss_reference``;
transformer heads always use the reference.

injection "output" (multi-token-prediction ablation): ``hidden`` is the GPT's final hidden state
(after the final norm) [B, T, D]; K extra zero-initialised output heads Linear(D, vocab) predict,
at position t (whose next-token target is cell t), the token at the (j+1)-th layout neighbour of
cell t (the layout's neighbour list minus its (0, 0) entry: 1d gives t+1 .. t+K, the classic MTP
targets); cross-entropy, positions without such a cell masked; no teacher.

While every coefficient is 0 (warm-up) the forward skips all work and returns a zero total that is
still connected to every head parameter (zero gradients), so DeepSpeed / DDP see every parameter
used on every step and checkpoints keep one shape.

The fused op reads the stacked head weights directly (not through ``heads.forward``): an engine that
gathers partitioned parameters per module registers them (``Engine.register_external_params``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirai.foresight.config import ForesightConfig
from mirai.foresight.heads import ForesightHeads
from mirai.foresight.neighbours import neighbour_table, target_cells
from mirai.foresight.schedules import coefficients as _coefficients
from mirai.ops.reference import foresight_loss_reference


def mtp_table(grid_size: int, k: int, layout: str = "2d", output_cells: torch.Tensor | None = None) -> torch.Tensor:
    """LongTensor [k, T]: the grid cell whose token MTP head j predicts at position t, or -1.
    Position t predicts cell ``output_cells[t]`` by NTP (default t, raster order); head j predicts
    that cell's (j+1)-th layout neighbour."""
    cells = target_cells(grid_size, k + 1, layout)[1:]                   # [k, T] by cell, offset (0,0) dropped
    if output_cells is None:
        return cells.clone()
    output_cells = torch.as_tensor(output_cells, dtype=torch.long).cpu()  # [T]
    return cells[:, output_cells]                                        # [k, T] by position


def _resolve_fused() -> Callable | None:
    """``mirai.ops.foresight.foresight_loss`` if that module exists (it is optional), else None."""
    try:
        from mirai.ops.foresight import foresight_loss
    except ModuleNotFoundError as err:
        if err.name in ("mirai.ops.foresight",):
            return None
        raise
    return foresight_loss


class ForesightObjective(nn.Module):
    """Heads (or MTP output heads) + neighbour table; ``forward -> (total fp32 scalar, per_head fp32 [K])``.

    Args:
        cfg: the ``foresight`` config (resolved here against ``model_cfg`` if not already).
        model_cfg: the GPT config (``dim``, ``n_layer``, ``block_size``, ``vocab_size``).
        input_cells / output_cells: LongTensor [T], the grid cell each sequence position holds as input
            (-1 for the class token) / predicts; None = raster order (GPT). For PAR pass
            ``model.position_to_cell("input")`` and ``model.position_to_cell("target")``.
    """

    def __init__(self, cfg: ForesightConfig, model_cfg, input_cells: torch.Tensor | None = None,
                 output_cells: torch.Tensor | None = None):
        super().__init__()
        if not cfg.enabled:
            raise ValueError("foresight.mode: ForesightObjective needs mode 'ema' or 'encoder', got 'none'")
        cfg = cfg.resolve(model_cfg)
        self.cfg = cfg
        self.k, self.layer = cfg.k, cfg.layer
        self.injection = cfg.injection
        grid = int(model_cfg.grid_size) if hasattr(model_cfg, "grid_size") else int(round(model_cfg.block_size ** 0.5))
        dim = int(model_cfg.dim)
        if cfg.injection == "internal":
            self.heads = ForesightHeads(dim, cfg.head_out, cfg.k, hidden=cfg.head_hidden, kind=cfg.head_kind,
                                        init_std=cfg.head_init_std, bias_decay=cfg.head_bias_decay)
            table = neighbour_table(grid, cfg.k, cfg.layout, cfg.source, input_cells=input_cells)
            self._fused = _resolve_fused() if (cfg.head_kind == "mlp" and cfg.backend != "reference") else None
        else:
            vocab = int(model_cfg.vocab_size)
            self.mtp_weight = nn.Parameter(torch.zeros(cfg.k, vocab, dim))   # [K, V, D], zero like LlamaGen's output
            table = mtp_table(grid, cfg.k, cfg.layout, output_cells=output_cells)
            self._fused = None
        self.register_buffer("table", table, persistent=False)                 # [K, T]

    # ------------------------------------------------------------------ what the trainer asks
    @property
    def needs_teacher(self) -> bool:
        """True when the loss reads teacher targets (injection "internal"); the MTP ablation reads tokens."""
        return self.injection == "internal"

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """``hidden_layers`` to request from the GPT forward (empty: use ``final_hidden``)."""
        return (self.layer,) if self.injection == "internal" else ()

    def select_hidden(self, gpt_out) -> torch.Tensor:
        """The hidden state this objective consumes from a ``GPTOutput``."""
        return gpt_out.hidden[self.layer] if self.injection == "internal" else gpt_out.final_hidden

    def coefficients(self, step: int, total_steps: int, epoch: int) -> list[float]:
        return _coefficients(self.cfg, step, total_steps, epoch)

    @staticmethod
    def active(coeffs: Sequence[float] | torch.Tensor) -> bool:
        """False while every coefficient is zero (warm-up): no teacher pass is needed then."""
        if isinstance(coeffs, torch.Tensor):
            return True                     # a device tensor cannot be inspected without a sync
        return any(float(c) != 0.0 for c in coeffs)

    # ------------------------------------------------------------------ the loss
    def forward(self, hidden: torch.Tensor, teacher: torch.Tensor | None = None,
                coeffs: Sequence[float] | torch.Tensor | None = None,
                tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, D]; teacher [B, S, C] (internal); coeffs [K] (None = all 1.0);
        tokens [B, T] image tokens x0 .. x_{T-1} (output injection). -> (total, per_head [K])."""
        if coeffs is None:
            coeffs = [1.0] * self.k
        if not isinstance(coeffs, torch.Tensor) and len(coeffs) != self.k:
            raise ValueError(f"coeffs must have K = {self.k} entries, got {len(coeffs)}")
        if not self.active(coeffs):
            zero = sum(p.sum() for p in self.parameters()) * 0.0        # keeps every head in the graph
            return zero.float(), torch.zeros(self.k, device=hidden.device, dtype=torch.float32)
        c = coeffs if isinstance(coeffs, torch.Tensor) else torch.tensor(coeffs, dtype=torch.float32)
        c = c.to(device=hidden.device, dtype=torch.float32, non_blocking=True)   # [K]
        if self.injection == "output":
            return self._mtp_loss(hidden, tokens, c)
        if teacher is None:
            raise ValueError("ForesightObjective: teacher targets [B, S, C] are required (injection 'internal')")
        if self._fused is not None:
            return self._fused(hidden, self.heads, teacher, self.table, c, backend=self.cfg.backend)
        return foresight_loss_reference(hidden, self.heads, teacher, self.table, c)

    def _mtp_loss(self, hidden: torch.Tensor, tokens: torch.Tensor | None, c: torch.Tensor):
        if tokens is None:
            raise ValueError("ForesightObjective: injection 'output' needs tokens [B, T] (x0 .. x_{T-1})")
        b, t, d = hidden.shape
        if tuple(tokens.shape) != (b, t):
            raise ValueError(f"tokens must be [B={b}, T={t}], got {tuple(tokens.shape)}")
        valid = self.table >= 0                                          # [K, T]
        cells = self.table.clamp(min=0)                                  # [K, T]
        per_head = []
        for j in range(self.k):
            logits = F.linear(hidden, self.mtp_weight[j].to(hidden.dtype)).float()    # [B, T, V]
            tgt = tokens[:, cells[j]]                                    # [B, T]
            tgt = torch.where(valid[j].unsqueeze(0), tgt, torch.full_like(tgt, -100))
            ce = F.cross_entropy(logits.reshape(b * t, -1), tgt.reshape(b * t), ignore_index=-100,
                                 reduction="sum")                        # sum over valid (b, t)
            count = valid[j].sum().to(torch.float32) * b
            per_head.append(ce / count.clamp(min=1.0))
        per_head = torch.stack(per_head)                                 # [K]
        return (c * per_head).sum(), per_head
