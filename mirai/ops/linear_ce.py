"""Fused linear + cross-entropy over a large vocabulary, without materialising the full logits.

``linear_cross_entropy(hidden [N, D], weight [V, D], targets [N], ignore_index=-100, chunk_size=2048)``
returns ``mean_{i: targets[i] != ignore_index} CE(hidden[i] @ weight.T, targets[i])`` as a 0-dim tensor
in the accumulation dtype (float32 for bf16 / fp16 / fp32 inputs, float64 for float64 inputs). It is
the same function as ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)``,
except that a batch with no valid target gives loss 0 and zero gradients (not NaN).

Algorithm (one pass over the N tokens in chunks of ``chunk_size`` rows, all inside the forward):
  per chunk c of rows [s, e), C = e - s:
    z    = hidden[s:e] @ weight.T                  [C, V] in the input dtype (a bf16 GEMM accumulates
                                                   in fp32 and rounds its output once, like nn.Linear)
    loss += sum_rows( -log_softmax(z)[row, t_row] * w_row )    w_row = valid_row / max(n_valid, 1)
    g    = (softmax(z) - onehot(t)) * w_row        [C, V] the gradient of the mean loss w.r.t. z,
                                                   in the input dtype (as autograd gives for a bf16
                                                   Linear followed by .float()), written over z
         the row statistics (max, sum of exp -> log-sum-exp) in fp32: ``mirai._C.ce_softmax_grad_``
         (csrc/ce/: one read of z for the statistics, one read + write for g; the default on CUDA
         once it has passed a self-check against PyTorch on the device (``_self_check``), and on
         the CPU with ``backend="fused"``), or, with ``backend="reference"``, on the CPU by
         default, or without the extension, log_softmax(dtype=fp32) + exp_ + scatter_add_ + a
         scaling cast (five passes over [C, V] and an fp32 copy of it)
    dhidden[s:e] = g @ weight                      [C, D] input dtype
    dweight_acc += g.T @ hidden[s:e]               [V, D] acc dtype (per-chunk GEMM on input-dtype
                                                   operands with an fp32 result on CUDA; on CPU the
                                                   chunk product is rounded to the input dtype first;
                                                   the first chunk's product is the accumulator)
  The backward only scales the saved ``dhidden`` / ``dweight_acc`` by the incoming scalar gradient
  (in fp32) and casts them to the dtypes of ``hidden`` / ``weight``. Nothing of size N x V is kept.
  When no gradient is needed (``torch.no_grad``, or neither input requires grad) the gradient work
  is skipped; when only one input requires grad, only its GEMM runs.

Shapes / dtypes: ``hidden`` and ``weight`` are floating tensors of the same dtype on the same device
(bf16 on GPU in training), ``targets`` int64 [N] with values in [0, V) or ``ignore_index``
(out-of-range targets fail in the gather, as in F.cross_entropy). The loss is the accumulation dtype.
The op runs with autocast disabled: under autocast the caller casts both inputs first (the GPT's
``OutputHead`` casts to the autocast dtype, as nn.Linear would). No host synchronisation.

Memory bound (beyond the inputs): saved for backward ``dhidden`` N*D (input dtype) + ``dweight_acc``
V*D (fp32); transient per chunk C*V*2 bytes for bf16 inputs with the kernel (z, then g in place;
C*V*(2 + 4 + 2) with the torch pass: z, logp/exp in place, g) + V*D*4 (the chunk's dweight
product). For N = 8192, V = 16384, D = 768, C = 2048: 12.6 MB + 50 MB saved, ~120 MB transient
with the kernel (~320 MB with the torch pass), against the unfused path's N*V*4 = 512 MB of fp32
log-probs saved for the backward plus ~768 MB transient (bf16 logits, their fp32 copy) at the end of
the forward, and N*V*(4 + 4 + 2) bytes of gradients in its backward.

torch.compile: the computation is registered as the custom op ``mirai::linear_cross_entropy``
(``torch.library.custom_op`` with a fake implementation and an autograd formula), so compiled code
that calls ``linear_cross_entropy`` sees one opaque node (no graph break, no tracing of the chunk loop).
Its extra outputs (the saved gradients) are internal; use the Python wrapper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mirai.ops.backends import BACKENDS      # "fused": the mirai._C row pass; "reference": PyTorch's

DEFAULT_CHUNK_SIZE = 2048


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"linear_cross_entropy: hidden must be [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight must be [V, D={hidden.shape[1]}], got shape "
                         f"{tuple(weight.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: targets must be [N={hidden.shape[0]}], got shape "
                         f"{tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be int64/int32, got {targets.dtype}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must "
                         "be floating tensors of the same dtype")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"linear_cross_entropy: hidden ({hidden.device}), weight ({weight.device}) and "
                         f"targets ({targets.device}) must be on the same device")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")




def row_pass_torch(z: torch.Tensor, targets: torch.Tensor, row_w: torch.Tensor, need_grad: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row pass in plain PyTorch: (row losses -log_softmax(z)[t] * w [C] in the accumulation dtype,
    gradient (softmax(z) - onehot(t)) * w [C, V] in z's dtype, or None without need_grad), for logits
    z [C, V], targets [C] int64 in [0, V) and row weights [C] in the accumulation dtype. What
    ``mirai._C.ce_softmax_grad_`` computes in one kernel (log_softmax to fp32, exp_, scatter_add_, a
    scaling cast: five passes over [C, V] and an fp32 copy of it)."""
    logp = torch.log_softmax(z, dim=-1, dtype=_acc_dtype(z.dtype))           # [C, V] acc dtype
    row_loss = -logp.gather(1, targets[:, None])[:, 0] * row_w                # [C]
    if not need_grad:
        return row_loss, None
    g = logp.exp_()                                                           # softmax, in place
    g.scatter_add_(1, targets[:, None], torch.full_like(targets[:, None], -1, dtype=g.dtype))  # - onehot(target)
    if g.dtype == z.dtype:
        return row_loss, g.mul_(row_w[:, None])                               # [C, V]
    return row_loss, torch.mul(g, row_w[:, None], out=torch.empty_like(g, dtype=z.dtype))  # scaled + cast


def row_pass_reference(z: torch.Tensor, targets: torch.Tensor, row_w: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row losses, gradient over z) of the row pass in float64: what the kernel is checked against."""
    logp = torch.log_softmax(z.double(), dim=-1)
    loss = -logp.gather(1, targets[:, None])[:, 0] * row_w.double()
    grad = (logp.exp() - F.one_hot(targets, z.shape[1]).double()) * row_w.double()[:, None]
    return loss, grad


def _self_check(device: str) -> str:
    """Why the row-pass kernel must not run on `device` ("" when it may): ``_check_kernel``, run once per
    device and remembered (``mirai._ext.self_checked``); the op then warns and runs the PyTorch pass."""
    from mirai import _ext
    return _ext.self_checked("linear_cross_entropy", device, lambda: _check_kernel(device))


def _check_kernel(device: str) -> str:
    """The row-pass kernel on `device` against ``row_pass_reference``, each of its four variants (bf16 and fp32
    logits, 16,384 codes on the vectorised path and 1,001 on the one-element path): "" when they agree, else why
    not."""
    from mirai import _ext
    gen = torch.Generator().manual_seed(0)
    for v, dtype in ((16384, torch.bfloat16), (1001, torch.float32),
                     (16384, torch.float32), (1001, torch.bfloat16)):
        z = (torch.randn(6, v, generator=gen) * 3).to(device=device, dtype=dtype)
        t = torch.randint(0, v, (6,), generator=gen).to(device)
        w = torch.rand(6, generator=gen).to(device)
        want_loss, want_grad = row_pass_reference(z, t, w)
        got = z.clone()
        loss = _ext.ext().ce_softmax_grad_(got, t, w, True)
        err_l = ((loss.double() - want_loss).abs().max() / want_loss.abs().max()).item()
        err_g = ((got.double() - want_grad).abs().max() / want_grad.abs().max()).item()
        if not (err_l <= 1e-5 and err_g <= (2.0 ** -7 if dtype == torch.bfloat16 else 1e-5)):
            return (f"its self-check on {device} disagreed with PyTorch ({dtype}, V = {v}: loss error "
                    f"{err_l:.1e}, gradient error {err_g:.1e})")
    return ""


@torch.compiler.assume_constant_result  # evaluated (not traced) when a compiled model calls the op
def _kernel_unavailable(device_type: str, dtype_name: str) -> str:
    """Why ``mirai._C.ce_softmax_grad_`` cannot run the row pass for inputs of this device type and
    dtype ("float32", "bfloat16", ...), or "" when it can."""
    from mirai import _ext
    reason = _ext.op_unavailable(_ext.ext(), "ce_softmax_grad_", device_type)
    if reason:
        return reason
    if device_type == "cuda":
        if dtype_name not in ("float32", "bfloat16"):
            return f"no CUDA kernel for {dtype_name} (float32 and bfloat16 only)"
        return _self_check(f"cuda:{torch.cuda.current_device()}")
    if dtype_name not in ("float32", "bfloat16", "float64"):
        return f"no CPU kernel for {dtype_name}"
    return ""


@torch.library.custom_op("mirai::linear_cross_entropy", mutates_args=())
def _linear_ce_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  chunk_size: int, need_dhidden: bool, need_dweight: bool, use_kernel: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [] acc, dhidden [N, D] input dtype or [0], dweight [V, D] acc or [0]); see module docstring."""
    N, D = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    valid = targets != ignore_index                                           # [N] bool
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()    # [N], ignored rows -> 0
    # per-row weight of the mean: valid / max(n_valid, 1) (no host sync; all-ignored -> all zeros)
    row_w = valid.to(acc) / valid.sum().clamp(min=1).to(acc)                  # [N] acc
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    dhidden = hidden.new_empty((N, D) if need_dhidden else (0,))
    dweight = None                                     # [V, D] acc: the first chunk's product, then summed
    with torch.autocast(hidden.device.type, enabled=False):                   # dtypes are the caller's
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            dw_c = _chunk(hidden[s:e], weight, safe_t[s:e], row_w[s:e], loss,
                          dhidden[s:e] if need_dhidden else None, need_dweight, use_kernel)
            if dw_c is not None:
                dweight = dw_c if dweight is None else dweight.add_(dw_c)
    if dweight is None:                                                       # no chunk (N = 0) or not needed
        dweight = torch.zeros((V, D) if need_dweight else (0,), dtype=acc, device=hidden.device)
    return loss, dhidden, dweight


def _chunk(h_c: torch.Tensor, weight: torch.Tensor, t_c: torch.Tensor, rw_c: torch.Tensor, loss: torch.Tensor,
           dh_c: torch.Tensor | None, need_dweight: bool, use_kernel: bool) -> torch.Tensor | None:
    """One chunk of C rows: ``h_c [C, D]``, ``t_c [C]`` (ignored rows hold 0), ``rw_c [C]`` row
    weights. Adds into ``loss`` [], writes ``dh_c [C, D]`` (when given) and returns the chunk's
    ``dweight`` contribution ``[V, D]`` in the loss dtype (when ``need_dweight``)."""
    need_grad = dh_c is not None or need_dweight
    z = h_c @ weight.t()                                                      # [C, V] logits, input dtype
    if use_kernel:
        from mirai import _ext
        row_loss = _ext.ext().ce_softmax_grad_(z, t_c, rw_c, need_grad)        # [C]; z <- d loss / d z
        g = z
    else:
        row_loss, g = row_pass_torch(z, t_c, rw_c, need_grad)
    loss.add_(row_loss.sum())
    if not need_grad:
        return None
    if dh_c is not None:
        torch.mm(g, weight, out=dh_c)                                         # [C, D]
    if not need_dweight:
        return None
    if g.dtype == loss.dtype:
        return g.t() @ h_c                                                    # [V, D]
    if g.is_cuda:
        return torch.mm(g.t(), h_c, out_dtype=loss.dtype)                     # bf16 GEMM, fp32 result
    return (g.t() @ h_c).to(loss.dtype)                                       # CPU: no mm.dtype kernel


@_linear_ce_op.register_fake
def _linear_ce_fake(hidden, weight, targets, ignore_index, chunk_size, need_dhidden, need_dweight, use_kernel):
    acc = _acc_dtype(hidden.dtype)
    N, D = hidden.shape
    V = weight.shape[0]
    return (hidden.new_empty((), dtype=acc),
            hidden.new_empty((N, D) if need_dhidden else (0,)),
            hidden.new_empty((V, D) if need_dweight else (0,), dtype=acc))


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, _targets, _ignore, _chunk_size, need_dhidden, need_dweight, _use_kernel = inputs
    _, dhidden, dweight = output
    ctx.save_for_backward(dhidden, dweight)
    ctx.need = (need_dhidden, need_dweight)
    ctx.dtypes = (hidden.dtype, weight.dtype)


def _backward(ctx, grad_loss, _grad_dhidden, _grad_dweight):
    """Scale the gradients computed in the forward by d(out)/d(loss), in the accumulation dtype."""
    dhidden, dweight = ctx.saved_tensors
    need_dh, need_dw = ctx.need
    h_dtype, w_dtype = ctx.dtypes
    g = grad_loss.to(_acc_dtype(h_dtype))                                     # e.g. 1 / grad-accum steps
    dh = (dhidden.to(g.dtype) * g).to(h_dtype) if need_dh else None           # [N, D]
    dw = (dweight * g).to(w_dtype) if need_dw else None                       # [V, D]
    return dh, dw, None, None, None, None, None, None


_linear_ce_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         backend: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of ``hidden [N, D] @ weight[V, D].T`` against ``targets [N]`` (fp32 scalar for
    bf16/fp32 inputs), computed in row chunks of ``chunk_size`` without the N x V logits; see the module
    docstring. Differentiable w.r.t. ``hidden`` and ``weight``. ``backend``: the row pass in
    ``mirai._C`` ("fused", an error when it cannot run), in plain PyTorch ("reference"), or ("auto") on
    CUDA the kernel when it can run, else PyTorch with one warning, and on the CPU PyTorch."""
    _check_inputs(hidden, weight, targets, chunk_size)
    if backend not in BACKENDS:
        raise ValueError(f"linear_cross_entropy: backend must be one of {BACKENDS}, got {backend!r}")
    use_kernel = False
    # "auto" takes the kernel on CUDA; on the CPU its scalar exp is slower than ATen's vectorised pass, so
    # the CPU kernel (the CUDA kernel's tested twin) runs only when asked for
    if backend == "fused" or (backend == "auto" and hidden.device.type == "cuda"):
        reason = _kernel_unavailable(hidden.device.type, str(hidden.dtype).removeprefix("torch."))
        if reason and backend == "fused":
            raise RuntimeError(f"linear_cross_entropy(backend='fused'): {reason}")
        if reason:
            from mirai import _ext
            _ext.warn_fallback("linear_cross_entropy", reason)
        use_kernel = not reason
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    loss, _, _ = _linear_ce_op(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                               int(ignore_index), int(chunk_size), need_dh, need_dw, use_kernel)
    return loss


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """The unfused formulation (materialises ``[N, V]`` logits): what the fused op is tested against."""
    logits = hidden @ weight.t()                                              # [N, V]
    return F.cross_entropy(logits.to(_acc_dtype(hidden.dtype)), targets, ignore_index=ignore_index)
