"""Reference PyTorch implementation of the Mirai foresight loss: the ground truth that the fused
C++/CUDA op (``mirai.ops.foresight.foresight_loss``) is tested against. Kept plain on purpose.

``foresight_cosine_loss(student[K,B,T,C], teacher[B,S,C], table[K,T]) -> Tensor[K]``
    head k's loss = mean over (b, t) with table[k, t] >= 0 of -cos(student[k,b,t], teacher[b, table[k,t]]).
    Computed in fp32 whatever the input dtypes. Table values are range-checked when the table
    lives on the CPU (on a GPU the check would cost a host sync; tables come from
    ``neighbour_table``, which is checked by construction). Norms are clamped at eps = 1e-6
    (F.normalize semantics: x / max(|x|, eps)). A head without any valid position gives 0
    (not NaN). The teacher is a target: no gradient flows into it (it is detached).

``mlp_heads_reference(h[B,T,D], w1, b1, w2, b2, w3, b3) -> Tensor[K,B,T,C]``
    the K stacked MLP heads, head k = W3_k silu(W2_k silu(W1_k x + b1_k) + b2_k) + b3_k, in the parameter
    layout ``mirai.foresight.ForesightHeads`` stores (w1 [K, H, D], b1 [K, H], w2 [K, H, H], b2 [K, H],
    w3 [K, C, H], b3 [K, C]): batched GEMMs over the heads; h is cast to the weights' dtype.

``foresight_loss_reference(h[B,T,D], heads, teacher[B,S,C], table[K,T], coeffs[K]) -> (total, per_head[K])``
    runs ``heads(h)`` (any ``ForesightHeads`` kind) then the cosine loss;
    total = sum_k coeffs[k] * per_head[k] (fp32 scalar). coeffs: a tensor or a sequence of floats.

Memory: this path materialises the gathered targets [K, B, T, C] in fp32 and every head
activation; the fused op avoids both.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mirai.ops.checks import table_range_error

COS_EPS = 1e-6


def check_foresight_shapes(student: torch.Tensor, teacher: torch.Tensor, table: torch.Tensor) -> None:
    """Raise ValueError naming the tensor when shapes, dtypes or table values are inconsistent."""
    if student.dim() != 4:
        raise ValueError(f"student must be [K, B, T, C], got shape {tuple(student.shape)}")
    k, b, t, c = student.shape
    if teacher.dim() != 3 or teacher.shape[0] != b or teacher.shape[2] != c:
        raise ValueError(f"teacher must be [B={b}, S, C={c}], got shape {tuple(teacher.shape)}")
    if table.dim() != 2 or tuple(table.shape) != (k, t):
        raise ValueError(f"table must be [K={k}, T={t}], got shape {tuple(table.shape)}")
    if table.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"table must be an integer tensor (int64/int32), got {table.dtype}")
    if table.device.type == "cpu":  # on a GPU this check would sync the host
        bad = table_range_error(table, teacher.shape[1])
        if bad:
            raise ValueError(bad)


def foresight_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-head mean negative cosine similarity, fp32, Tensor[K] (see the module docstring)."""
    check_foresight_shapes(student, teacher, table)
    k, b, t, c = student.shape
    table = table.to(device=student.device, dtype=torch.long)
    valid = table >= 0                                                   # [K, T]
    rows = table.clamp(min=0)                                            # [K, T] (masked rows read row 0)
    tgt = teacher.detach().float()[:, rows]                              # [B, K, T, C]
    tgt = tgt.permute(1, 0, 2, 3)                                        # [K, B, T, C]
    s_hat = F.normalize(student.float(), dim=-1, eps=COS_EPS)            # [K, B, T, C]
    t_hat = F.normalize(tgt, dim=-1, eps=COS_EPS)                        # [K, B, T, C]
    cos = (s_hat * t_hat).sum(-1)                                        # [K, B, T]
    mask = valid.unsqueeze(1).to(cos.dtype)                              # [K, 1, T]
    count = valid.sum(dim=1).to(cos.dtype) * b                           # [K] valid (b, t) pairs
    return -(cos * mask).sum(dim=(1, 2)) / count.clamp(min=1.0)          # [K]; 0 when count == 0


def mlp_heads_reference(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                        w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """K stacked MLP heads, [B, T, D] -> [K, B, T, C] (see the module docstring)."""
    b, t, d = h.shape
    k = w1.shape[0]
    x = h.reshape(1, b * t, d).to(w1.dtype)                              # [1, N, D]
    x = x.expand(k, b * t, d)                                            # [K, N, D] (stride-0 batch)
    y = F.silu(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))   # [K, N, H]
    y = F.silu(torch.baddbmm(b2.unsqueeze(1), y, w2.transpose(1, 2)))   # [K, N, H]
    y = torch.baddbmm(b3.unsqueeze(1), y, w3.transpose(1, 2))           # [K, N, C]
    return y.view(k, b, t, w3.shape[1])                                  # [K, B, T, C]


def foresight_loss_reference(h: torch.Tensor, heads: torch.nn.Module, teacher: torch.Tensor,
                             table: torch.Tensor, coeffs: torch.Tensor | Sequence[float]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(total fp32 scalar, per_head fp32 [K]) = heads then cosine loss, total = sum coeffs * per_head."""
    student = heads(h)                                                   # [K, B, T, C]
    per_head = foresight_cosine_loss(student, teacher, table)            # [K]
    coeffs = torch.as_tensor(coeffs, dtype=torch.float32, device=per_head.device)
    if coeffs.shape != per_head.shape:
        raise ValueError(f"coeffs must have shape [K={per_head.shape[0]}], got {tuple(coeffs.shape)}")
    return (coeffs * per_head).sum(), per_head
