"""The trained module: the GPT plus the foresight objective, the only module an engine wraps.

Its forward takes a batch of codes and labels, the teacher targets computed outside (no grad, in
``foresight.target_dtype``; None for the baseline, during warm-up, and for the output-injection ablation) and
the per-head coefficients (host floats while they are all zero, else a [K] fp32 device tensor), and returns three
tensors: ``loss`` (NTP + sum_k lambda_k L_k, the one that is back-propagated), ``ntp`` and ``per_head [K]`` (both
detached, for logging). The EMA, the Mirai-E teacher and the frozen encoder are NOT in it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class TrainModule(nn.Module):
    """GPT + foresight objective; see the module docstring for the forward contract."""

    def __init__(self, gpt: nn.Module, objective: nn.Module | None = None, fused_ce: bool = True):
        super().__init__()
        self.gpt = gpt
        self.objective = objective
        self.fused_ce = bool(fused_ce)      # train.fused_ce: loss via the chunked linear + CE (no logits)

    @property
    def k(self) -> int:
        return int(self.objective.k) if self.objective is not None else 0

    def forward(self, codes: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None,
                coeffs: Sequence[float] | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes int64 [B, T], labels int64 [B], teacher [B, S, C] or None, coeffs K floats or [K] tensor."""
        idx, targets = self.gpt.prepare_inputs(codes)                           # [B, T-1], [B, T]
        obj = self.objective
        hidden_layers = obj.hidden_layers if obj is not None else ()
        out = self.gpt(idx, labels, targets=targets, hidden_layers=hidden_layers, return_logits=not self.fused_ce)
        ntp = out.loss                                                          # fp32 scalar
        if obj is None:
            return ntp, ntp.detach(), ntp.new_zeros(0)
        total, per_head = obj(obj.select_hidden(out), teacher, coeffs, tokens=targets)
        return ntp + total, ntp.detach(), per_head.detach()

