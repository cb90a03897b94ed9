"""Fused multi-tensor AdamW step + model-EMA update: ``adamw_ema_step_``.

``adamw_ema_step_(params, grads, exp_avgs, exp_avg_sqs, *, lr, betas, eps, weight_decay, step,
grad_scale=None, ema=None, ema_decay=None, teacher=None)`` does, for every index i and in one
pass over memory (torch.optim.AdamW's formulas, decoupled weight decay, fp32 math):

    g  = grads[i] / grad_scale                       (grad_scale optional; grads[i] is NOT written)
    p  = p * (1 - lr * weight_decay)
    m  = beta1 * m + (1 - beta1) * g                  (exp_avgs[i])
    v  = beta2 * v + (1 - beta2) * g * g              (exp_avg_sqs[i])
    p  = p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps),   bc1 = 1 - beta1**step, bc2 = 1 - beta2**step
    ema[i]     = ema[i] * ema_decay + p * (1 - ema_decay)   (where ema[i] is given; the NEW p)
    teacher[i] = bf16(ema[i])                                (where teacher[i] is given)

Shapes: four (up to six) lists of equal length, per index the same shape (any shape, empty
tensors included). Dtypes: ``params``, ``exp_avgs``, ``exp_avg_sqs`` float32; ``grads`` float32
or bfloat16 (mixed lists are fine); ``ema`` None or a list of float32 tensors / None;
``teacher`` None or a list of bfloat16 tensors / None, only where ``ema`` is given. All tensors
contiguous and on one device. ``grad_scale``: None or a one-element float32 tensor on that device
(read by the kernel: no host sync; the engine's clipping factor max(1, norm / clip), the same
attribute torch's fused AdamW divides by). ``step`` (int >= 1): the step count after
incrementing; the bias corrections are computed here in double. ``ema_decay`` (float in [0, 1])
is required when ``ema`` is given.

Rounding: each operation is rounded once to float32 (the two multiply-adds of the moments and
the final update are fused multiply-adds, division and square root are IEEE), and the CPU and
CUDA kernels share this element math (``csrc/optim/adamw_math.h``), so they agree bit for bit.
Versus ``torch.optim.AdamW`` (which updates ``exp_avg`` with ``lerp_`` and rounds every
intermediate separately) params and moments agree to a few float32 ulps, not bit for bit. The
EMA and teacher are bit-exact with running :func:`mirai.ops.ema_update_` on the updated params.

Backends, chosen by the params' device:
  * ``mirai._C`` CPU kernel (C++, at::parallel_for) for CPU tensors;
  * ``mirai._C`` CUDA kernel for CUDA tensors: one launch for all tensors (device-side table,
    16-byte vector loads where every tensor of an index is 16-byte aligned, scalar tail), used on
    a device once it has passed a self-check there against the foreach formulation
    (``_check_kernel``, run the first time, remembered; a kernel that fails it is never used on
    that device and the fallback below runs, with its warning);
  * fallback (extension missing or without this op, ``MIRAI_DISABLE_EXT=1``, extension built
    without CUDA, other devices): the same formulas with ``torch._foreach_*`` ops, then
    :func:`mirai.ops.ema_update_` (or its foreach fallback) for the EMA part, with one warning
    through :func:`mirai._ext.warn_fallback`. Same numbers within float32 rounding.

Bytes moved per element (fp32 grads): read grad, param, exp_avg, exp_avg_sq, ema (20 B), write
param, exp_avg, exp_avg_sq, ema (16 B), teacher (2 B): 38 B, against 46 B for torch's fused AdamW
with grad_scale (which writes the unscaled grad back) followed by ``ema_update_`` with a teacher.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mirai import _ext
from mirai.ops import ema_update as _ema
from mirai.ops.checks import check_entry

__all__ = ["adamw_ema_step_", "bias_corrections"]

_OP = "adamw_ema_step_"
_LISTS = ("grads", "exp_avgs", "exp_avg_sqs")


def bias_corrections(betas: tuple[float, float], step: int) -> tuple[float, float]:
    """``(1 - beta1**step, 1 - beta2**step)`` in double, as torch.optim.AdamW computes them."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"adamw_ema_step_: step must be an int >= 1 (the count after incrementing), got {step!r}")
    beta1, beta2 = (float(b) for b in betas)
    return 1.0 - beta1 ** step, 1.0 - beta2 ** step


def adamw_ema_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: torch.Tensor | None = None,
    ema: Sequence[torch.Tensor | None] | None = None,
    ema_decay: float | None = None,
    teacher: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """In place AdamW step of ``params`` (and their moments), then their EMA and bf16 teacher copy.

    See the module docstring for the formulas, shapes, dtypes and rounding. Raises
    ``RuntimeError`` (extension) or ``ValueError``/``TypeError`` (fallback) naming the offending
    list, index and constraint when the inputs break one.
    """
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    ema = None if ema is None else list(ema)
    teacher = None if teacher is None else list(teacher)
    if len(betas) != 2:
        raise ValueError(f"adamw_ema_step_: betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = float(betas[0]), float(betas[1])
    bc1, bc2 = bias_corrections((beta1, beta2), step)
    decay = None if ema_decay is None else float(ema_decay)
    C = _ext.ext()
    reason = _fallback_reason(C, lists[0])
    if reason is None:
        C.adamw_ema_step_(*lists, ema, teacher, float(lr), beta1, beta2, float(eps), float(weight_decay),
                          bc1, bc2, grad_scale, decay)
        return
    if lists[0]:  # nothing to warn about for an empty call
        _ext.warn_fallback(_OP, reason)
    _adamw_ema_step_foreach_(*lists, ema, teacher, float(lr), beta1, beta2, float(eps), float(weight_decay),
                             bc1, bc2, grad_scale, decay)


def _fallback_reason(C, params: list[torch.Tensor]) -> str | None:
    """Why the compiled op cannot run these inputs, or None when it can (on CUDA: also its self-check)."""
    device = params[0].device if params else None
    reason = _ext.op_unavailable(C, _OP, device.type if device is not None else None)
    if reason is None and device is not None and device.type == "cuda":
        return _ext.self_checked(_OP, str(device), lambda: _check_kernel(C, str(device))) or None
    return reason


@torch.no_grad()
def _check_kernel(C, device: str) -> str:
    """The kernel on `device` against the foreach formulation on the CPU (odd sizes, a misaligned
    view, fp32 and bf16 grads, grad_scale, EMA and teacher, three steps): "" when params, moments,
    EMA and teacher agree within float32 rounding, else why not. Run once per device and remembered
    (``mirai._ext.self_checked``), so a kernel that computes wrong numbers on some GPU is never used
    there (the op warns and runs the foreach formulation instead)."""
    gen = torch.Generator().manual_seed(0)
    sizes = (4099, 1023, 8)
    base = torch.randn(sum(sizes) + 1, generator=gen)
    params = [base[1:1 + sizes[0]].clone()] + [torch.randn(n, generator=gen) for n in sizes[1:]]
    states = []
    for dev in ("cpu", device):
        store = torch.empty(sizes[0] + 1, device=dev)          # index 0 lives one element into its storage
        p = [store[1:].copy_(params[0])] + [x.to(dev, copy=True) for x in params[1:]]
        m = [torch.zeros_like(x) for x in p]
        v = [torch.zeros_like(x) for x in p]
        e = [x.clone() for x in p]
        t = [x.bfloat16() for x in p]
        states.append((p, m, v, e, t))
    scale = torch.tensor([2.0])
    for step in (1, 2, 3):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        grads[1] = grads[1].bfloat16()
        bc1, bc2 = bias_corrections((0.9, 0.95), step)
        for fn, dev, (p, m, v, e, t) in zip((_adamw_ema_step_foreach_, C.adamw_ema_step_), ("cpu", device), states):
            g = [x.to(dev) for x in grads]
            fn(p, g, m, v, e, t, 1e-3, 0.9, 0.95, 1e-8, 0.05, bc1, bc2, scale.to(dev), 0.99)
    for name, want, got in zip(("params", "exp_avgs", "exp_avg_sqs", "ema", "teacher"), states[0], states[1]):
        for i, (a, b) in enumerate(zip(want, got)):
            a, b = a.double(), b.double().cpu()
            tol = 2.0 ** -7 if name == "teacher" else 1e-5
            if not torch.allclose(b, a, rtol=tol, atol=tol * a.abs().max().item() * 0.1):
                err = (b - a).abs().max().item()
                return (f"its self-check on {device} disagreed with the foreach formulation ({name}[{i}]: "
                        f"max error {err:.1e})")
    return ""


def check_inputs(params, grads, exp_avgs, exp_avg_sqs, ema, teacher, lr, beta1, beta2, eps, weight_decay,
                 grad_scale, ema_decay) -> None:
    """Python version of the extension's checks (used by the fallback), same constraints and wording."""
    n = len(params)
    for name, lst in zip(_LISTS, (grads, exp_avgs, exp_avg_sqs)):
        if len(lst) != n:
            raise ValueError(f"adamw_ema_step_: {name} and params must have the same length, got {len(lst)} and {n}")
    if ema is not None and len(ema) != n:
        raise ValueError(f"adamw_ema_step_: ema and params must have the same length, got {len(ema)} and {n}")
    if teacher is not None:
        if ema is None:
            raise ValueError("adamw_ema_step_: teacher is given but ema is None; the teacher is written from the ema")
        if len(teacher) != n:
            raise ValueError(f"adamw_ema_step_: teacher and params must have the same length, got {len(teacher)} "
                             f"and {n}")
    if ema is not None and any(e is not None for e in ema):
        if ema_decay is None:
            raise ValueError("adamw_ema_step_: ema_decay is required when ema is given")
        if not (math.isfinite(ema_decay) and 0.0 <= ema_decay <= 1.0):
            raise ValueError(f"adamw_ema_step_: ema_decay must be in [0, 1], got {ema_decay}")
    _check_scalars(lr, beta1, beta2, eps, weight_decay)
    if not n:
        return
    device = params[0].device

    def check(t: torch.Tensor, name: str, i: int, dtypes: tuple[torch.dtype, ...]) -> None:
        check_entry(_OP, name, i, t, dtypes, params, "params")

    f32, bf16 = (torch.float32,), (torch.bfloat16,)
    for i in range(n):
        check(params[i], "params", i, f32)
        check(grads[i], "grads", i, (torch.float32, torch.bfloat16))
        check(exp_avgs[i], "exp_avgs", i, f32)
        check(exp_avg_sqs[i], "exp_avg_sqs", i, f32)
        has_ema = ema is not None and ema[i] is not None
        if has_ema:
            check(ema[i], "ema", i, f32)
        if teacher is not None and teacher[i] is not None:
            if not has_ema:
                raise ValueError(f"adamw_ema_step_: teacher[{i}] is given but ema[{i}] is None; the teacher is "
                                 "written from the ema")
            check(teacher[i], "teacher", i, bf16)
    if grad_scale is not None:
        if grad_scale.numel() != 1:
            raise ValueError(f"adamw_ema_step_: grad_scale must have one element, got {grad_scale.numel()} "
                             f"(shape {list(grad_scale.shape)})")
        if grad_scale.dtype != torch.float32:
            raise TypeError(f"adamw_ema_step_: grad_scale must be float32, got {grad_scale.dtype}")
        if grad_scale.device != device:
            raise ValueError(f"adamw_ema_step_: grad_scale is on {grad_scale.device} but params[0] is on {device}; "
                             "it must be on the params' device")


def _check_scalars(lr, beta1, beta2, eps, weight_decay) -> None:
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"adamw_ema_step_: lr must be finite and >= 0, got {lr}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"adamw_ema_step_: {name} must be in [0, 1), got {b}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"adamw_ema_step_: eps must be finite and >= 0, got {eps}")
    if not math.isfinite(weight_decay):
        raise ValueError(f"adamw_ema_step_: weight_decay must be finite, got {weight_decay}")


@torch.no_grad()
def _adamw_ema_step_foreach_(params, grads, exp_avgs, exp_avg_sqs, ema, teacher, lr, beta1, beta2, eps,
                             weight_decay, bc1, bc2, grad_scale, ema_decay) -> None:
    """Fallback: the same formulas with torch's foreach ops, then the EMA through ``ema_update_``."""
    check_inputs(params, grads, exp_avgs, exp_avg_sqs, ema, teacher, lr, beta1, beta2, eps, weight_decay,
                 grad_scale, ema_decay)
    if not params:
        return
    g = [x.float() for x in grads]                      # bf16 -> fp32 is exact; fp32 grads are not copied
    if grad_scale is not None:
        g = torch._foreach_div(g, grad_scale.reshape(()))   # new tensors: the grads are not written back
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, g, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bc2))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-(lr / bc1))
    if ema is None:
        return
    idx = [i for i, e in enumerate(ema) if e is not None]
    if not idx:
        return
    e_list, p_list = [ema[i] for i in idx], [params[i] for i in idx]
    t_list = None if teacher is None else [teacher[i] for i in idx]
    if _ema._fallback_reason(_ext.ext(), e_list) is None:
        _ema.ema_update_(e_list, p_list, ema_decay, t_list)
    else:  # its own fallback, without a second warning
        _ema._ema_update_foreach_(e_list, p_list, ema_decay, t_list)
