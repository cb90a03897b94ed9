"""Fused in-place multi-tensor EMA update: ``ema_update_``.

``ema_update_(ema, params, decay, teacher=None)`` does, for every index i,

    ema[i]     <- ema[i] * decay + params[i] * (1 - decay)     (in place)
    teacher[i] <- ema[i].to(torch.bfloat16)                    (same pass, optional)

Shapes: two (three) lists of equal length; ``params[i]`` and ``teacher[i]`` have
``ema[i]``'s shape (any shape, including empty tensors). Dtypes: ``ema`` float32;
``params`` float32 or bfloat16 (mixed lists are fine); ``teacher`` None, or a list
whose entries are bfloat16 tensors or None (no teacher for that index). All tensors
contiguous and on one device. ``decay``: a Python float in [0, 1], or a
one-element float32/float64 tensor on the ema's device (the CUDA kernel reads it
itself, so a schedule kept on the GPU costs no host sync).

Rounding (bit-exact with :func:`ema_update_reference_`, i.e. with
``ema.mul_(decay).add_(param, alpha=1 - decay)``): ``d = float32(decay)``,
``a = float32(1 - decay)`` with the difference taken in double as Python does,
``ema' = fma(param, a, round(ema * d))`` -- the fused multiply-add is what ATen's
``add_`` with ``alpha`` compiles to on CUDA and in its AVX2/AVX-512 CPU kernels.
(On a CPU whose ATen runs the non-vectorised ``default`` kernels, ATen rounds
``alpha * param`` separately, so the reference can differ in the last bit.)
The teacher copy rounds to nearest even, like ``Tensor.to(torch.bfloat16)``.

Backends, chosen by the ema's device:
  * ``mirai._C`` CPU kernel (C++, at::parallel_for) for CPU tensors;
  * ``mirai._C`` CUDA kernel for CUDA tensors: one launch for all tensors
    (device-side table of pointers and sizes, 16-byte vector loads where the
    tensor is 16-byte aligned, scalar tail);
  * fallback (extension missing, ``MIRAI_DISABLE_EXT=1``, extension built
    without CUDA, other devices): ``torch._foreach_mul_`` / ``_foreach_add_`` /
    ``_foreach_copy_``, with one warning through :func:`mirai._ext.warn_fallback`.
    It gives the same numbers (it is the reference, batched); a tensor ``decay`` is
    read with ``.item()`` there (one host sync).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mirai import _ext
from mirai.ops.checks import check_entry

__all__ = ["ema_update_", "ema_update_reference_"]

_OP = "ema_update_"


def ema_update_(
    ema: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float | torch.Tensor,
    teacher: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """In place ``ema[i] = ema[i]*decay + params[i]*(1-decay)``; optionally ``teacher[i] = bf16(ema[i])``.

    See the module docstring for shapes, dtypes and rounding. Raises ``RuntimeError``
    (extension) or ``ValueError``/``TypeError`` (fallback) naming the offending list and
    index when the inputs break a constraint.
    """
    ema = list(ema)
    params = list(params)
    teacher = None if teacher is None else list(teacher)
    decay_tensor = decay if isinstance(decay, torch.Tensor) else None
    C = _ext.ext()
    reason = _fallback_reason(C, ema)
    if reason is None:
        if decay_tensor is not None:
            C.ema_update_(ema, params, teacher, 0.0, decay_tensor)
        else:
            C.ema_update_(ema, params, teacher, float(decay), None)
        return
    if ema:  # nothing to warn about for an empty call
        _ext.warn_fallback(_OP, reason)
    _ema_update_foreach_(ema, params, decay, teacher)


def _fallback_reason(C, ema: list[torch.Tensor]) -> str | None:
    """Why the compiled op cannot run these inputs, or None when it can."""
    return _ext.op_unavailable(C, _OP, ema[0].device.type if ema else None)


def check_inputs(
    ema: list[torch.Tensor],
    params: list[torch.Tensor],
    teacher: list[torch.Tensor | None] | None,
    decay: float | torch.Tensor,
) -> None:
    """Python version of the extension's checks (used by the fallback), same constraints and wording."""
    if len(ema) != len(params):
        raise ValueError(f"ema_update_: ema and params must have the same length, got {len(ema)} and {len(params)}")
    if teacher is not None and len(teacher) != len(ema):
        raise ValueError(f"ema_update_: teacher and ema must have the same length, got {len(teacher)} and {len(ema)}")
    if not ema:
        return
    for i, (e, p) in enumerate(zip(ema, params)):
        check_entry(_OP, "ema", i, e, (torch.float32,), ema, "ema")        # ema is the reference list itself
        check_entry(_OP, "params", i, p, (torch.float32, torch.bfloat16), ema, "ema")
        if teacher is not None and teacher[i] is not None:
            check_entry(_OP, "teacher", i, teacher[i], (torch.bfloat16,), ema, "ema")
    if isinstance(decay, torch.Tensor):
        if decay.numel() != 1:
            raise ValueError(f"ema_update_: decay tensor must have one element, got {decay.numel()}")
        if decay.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"ema_update_: decay tensor must be float32 or float64, got {decay.dtype}")
    elif not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")


@torch.no_grad()
def _ema_update_foreach_(
    ema: list[torch.Tensor],
    params: list[torch.Tensor],
    decay: float | torch.Tensor,
    teacher: list[torch.Tensor | None] | None,
) -> None:
    """Fallback: the reference formula with torch's foreach ops (a few launches per dtype group)."""
    check_inputs(ema, params, teacher, decay)
    if not ema:
        return
    d = float(decay.item()) if isinstance(decay, torch.Tensor) else float(decay)
    torch._foreach_mul_(ema, d)
    # foreach ops need one dtype per list: group by the params' dtype.
    for dtype in (torch.float32, torch.bfloat16):
        idx = [i for i, p in enumerate(params) if p.dtype == dtype]
        if idx:
            torch._foreach_add_([ema[i] for i in idx], [params[i] for i in idx], alpha=1.0 - d)
    if teacher is not None:
        pairs = [(t, e) for t, e in zip(teacher, ema) if t is not None]
        if pairs:
            torch._foreach_copy_([t for t, _ in pairs], [e for _, e in pairs])


@torch.no_grad()
def ema_update_reference_(
    ema: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float,
    teacher: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """The PyTorch formula every backend is tested against (one tensor at a time):
    ``e.mul_(decay).add_(p.float(), alpha=1 - decay)``, then ``t.copy_(e)`` (bf16 round-to-nearest-even)."""
    for i, (e, p) in enumerate(zip(ema, params)):
        e.mul_(decay).add_(p.float(), alpha=1.0 - decay)
        if teacher is not None and teacher[i] is not None:
            teacher[i].copy_(e)
