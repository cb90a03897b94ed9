"""Fused foresight loss: K projection-head MLPs + neighbour-table gather + cosine alignment.

``foresight_loss(h, heads, teacher, table, coeffs, backend="auto", *, chunk_tokens=None,
group_heads=None, memory_budget=None) -> (total, per_head)`` computes the same numbers as running ``heads(h)`` and then
``mirai.ops.reference.foresight_cosine_loss`` (see ``foresight_loss_reference``):

    y_k[b, t]   = W3_k silu(W2_k silu(W1_k h[b, t] + b1_k) + b2_k) + b3_k          (head k)
    per_head[k] = mean over (b, t) with table[k, t] >= 0 of -cos(y_k[b, t], teacher[b, table[k, t]])
                  (fp32, norms clamped at eps = 1e-6 as F.normalize does; 0 for a head without targets)
    total       = sum_k coeffs[k] * per_head[k]

Shapes and dtypes: h [B, T, D]; heads any module with ``kind == "mlp"`` and the stacked parameters
w1 [K, H, D], b1 [K, H], w2 [K, H, H], b2 [K, H], w3 [K, C, H], b3 [K, C] (``mirai.foresight.ForesightHeads``;
the op reads the tensors only, and the reference path calls ``heads(h)``);
teacher [B, S, C] (never receives a gradient); table [K, T] int64 with values in [-1, S)
(-1: no target); coeffs [K] (tensor or sequence of floats; no gradient). h is cast to the
parameters' dtype (as ``ForesightHeads.forward`` does); under bf16 autocast, fp32 head parameters are
first cast to bf16 (as autocast does for ``nn.Linear``). Fused kernels take float32 or bfloat16
heads (float64 on the CPU) and a float32/bfloat16 teacher; the loss is fp32 (float64 for
float64 heads). Gradients flow into h and the six head parameters through ``total``;
``per_head`` is returned detached (it is for logging: differentiate ``total``).

Algorithm (csrc/foresight/foresight.cpp has the details): the loss is a leaf, so the op does
the backward through the heads inside its forward, ``group_heads`` heads and ``chunk_tokens``
tokens at a time: layer 1 as one GEMM of width G*H (and its input gradient as one GEMM summing
over the group's heads), layers 2-3 as strided-batched GEMMs, bias + SiLU fused in one pass, a
loss kernel that reads the teacher rows through the table (the gathered targets [K, B, T, C]
never exist) and writes d loss / d y in the same pass, fp32 weight-gradient accumulators for one
group when the tokens take several chunks. The op keeps only dh and the parameter gradients;
the autograd backward scales them by the incoming gradient. On CUDA it does so in place, and
not at all when that gradient is 1 (the usual case), so there a graph through this op can be
back-propagated once: ``retain_graph`` with a second backward raises autograd's
in-place-modification error (on the CPU, and under torch.compile, the scaling is out of place
and repeated backwards work). Peak extra memory is the gradients themselves plus
``plan_bytes`` of the schedule: 3 * chunk * G * H + chunk * G * C workspace elements and, with
several chunks, 4 * G * H * (D + H + C) bytes of accumulators. ``fused_plan`` picks the
schedule with the fewest iterations within ``DEFAULT_MEMORY_BUDGET`` (or ``memory_budget``).
The head parameters are read directly (``heads.forward`` is not called), so an engine that
partitions parameters must gather them for the caller (``Engine.register_external_params``).

Backends: ``"fused"`` uses the CUDA kernels for CUDA tensors and the C++ CPU kernels for CPU
tensors (``mirai._C``) and raises a clear error when they cannot run (the CUDA kernels run on a
device only once they have passed a self-check there against the reference, ``_self_check``); ``"reference"`` runs
the plain PyTorch formulation; ``"auto"`` (default) picks the fused kernels when they can run
and otherwise falls back to the reference, warning once per reason (``mirai._ext.warn_fallback``):
extension missing or built without CUDA, a head kind other than "mlp", an unsupported dtype.

The op is registered as the torch custom op ``mirai::foresight_fused`` (with a fake
implementation and an autograd formula), so ``torch.compile`` traces models that call it.
Table values are range-checked (one host sync) the first time a table tensor is seen and
again only when it is modified in place; keep the table on the device as int64 so the check
is not repeated every step.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import Tensor

from mirai import _ext
from mirai.ops.backends import BACKENDS
from mirai.ops.checks import table_range_error

# Memory budget of the fused op when its schedule is not given: workspace buffers plus fp32
# weight-gradient accumulators, beyond the outputs (the gradients). ``fused_plan`` picks the
# schedule with the fewest (head group, token chunk) iterations within it; at 288 MiB that is all
# heads at once for every shape of the benchmark but GPT-B K = 9 (2 heads at a time over all 8,192 tokens).
DEFAULT_MEMORY_BUDGET = 288 * 2**20

_HEAD_PARAMS = ("w1", "b1", "w2", "b2", "w3", "b3")

# id(table) -> (weakref to it, its _version, S it was checked against): tables already
# range-checked, so the check (a host sync) runs once per table rather than every step.
_CHECKED_TABLES: dict[int, tuple[weakref.ref, int, int]] = {}


def _table_needs_check(table: Tensor, s: int) -> bool:
    entry = _CHECKED_TABLES.get(id(table))
    return entry is None or entry[0]() is not table or entry[1] != table._version or entry[2] != s


def _mark_table_checked(table: Tensor, s: int) -> None:
    if len(_CHECKED_TABLES) > 64:  # drop entries of tables that no longer exist
        for key in [k for k, v in _CHECKED_TABLES.items() if v[0]() is None]:
            del _CHECKED_TABLES[key]
    _CHECKED_TABLES[id(table)] = (weakref.ref(table), table._version, s)


@torch.library.custom_op("mirai::foresight_fused", mutates_args=())
def _foresight_fused(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
                     teacher: Tensor, table: Tensor, coeffs: Tensor, chunk_tokens: int, group_heads: int,
                     need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Raw fused op: (total, per_head, dh, dw1, db1, dw2, db2, dw3, db3), the grads being those of
    total (empty tensors when not need_grad)."""
    C = _ext.ext()
    if C is None:
        raise RuntimeError(f"mirai::foresight_fused: the extension mirai._C is unavailable ({_ext.load_error()})")
    if h.is_cuda:
        if not hasattr(C, "foresight_fused_cuda"):
            raise RuntimeError("mirai::foresight_fused: mirai._C was built without its CUDA kernels")
        fn = C.foresight_fused_cuda
    else:
        fn = C.foresight_fused_cpu
    s = teacher.shape[1] if teacher.dim() == 3 else -1
    check = _table_needs_check(table, s)
    if check and table.numel() > 0 and table.dtype == torch.int64:
        # The range check runs here rather than in C++: a TORCH_CHECK thrown from the CUDA host path
        # after the reduction crashed the process on the H100 test machine (torch 2.11) instead of
        # raising. One reduction + host sync, cached per table object (see _table_needs_check).
        bad = table_range_error(table, s)
        if bad:
            raise RuntimeError(f"foresight_loss: {bad}")
    out = fn(h, w1, b1, w2, b2, w3, b3, teacher, table, coeffs, chunk_tokens, group_heads, need_grad, False)
    if check:
        _mark_table_checked(table, s)
    return tuple(out)


@_foresight_fused.register_fake
def _(h, w1, b1, w2, b2, w3, b3, teacher, table, coeffs, chunk_tokens, group_heads, need_grad):
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    k = w1.shape[0]
    total = h.new_empty((), dtype=acc)
    per_head = h.new_empty((k,), dtype=acc)
    if not need_grad:
        return (total, per_head) + tuple(h.new_empty((0,)) for _ in range(7))
    grads = tuple(torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in (h, w1, b1, w2, b2, w3, b3))
    return (total, per_head) + grads


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])  # dh and the six parameter grads of `total`


def _scale_in_place_ok(g_total: Tensor, grads: tuple[Tensor, ...]) -> bool:
    """Eager CUDA backward on real tensors without create_graph: scale the saved grads in place."""
    return (g_total.is_cuda and not torch.is_grad_enabled() and _ext.has_op("foresight_scale_")
            and all(type(t) is torch.Tensor and not torch._is_functional_tensor(t) for t in (g_total,) + grads))


def _backward(ctx, g_total, g_per_head, *unused):
    # per_head is detached by foresight_loss; only total's gradient reaches the inputs.
    if g_total is None:
        return (None,) * 13
    grads = ctx.saved_tensors
    if _scale_in_place_ok(g_total, grads):
        # In place, and nothing is touched when g_total == 1. The saved grads are thereby
        # modified, so a second backward through the same graph (retain_graph) raises autograd's
        # in-place-modification error instead of returning wrong gradients.
        _ext.ext().foresight_scale_(list(grads), g_total)
        for t in grads:  # the kernel writes through raw pointers: tell autograd the saved tensors changed
            torch.autograd.graph.increment_version(t)
    else:  # traced (torch.compile), create_graph, or no extension: out of place
        grads = tuple(g * g_total for g in grads)
    return tuple(grads) + (None,) * 6  # teacher, table, coeffs, chunk_tokens, group_heads, need_grad


_foresight_fused.register_autograd(_backward, setup_context=_setup_context)


def _fused_unavailable(h: Tensor, heads, teacher: Tensor) -> str | None:
    """Why the fused kernels cannot run these inputs, or None when they can."""
    if getattr(heads, "kind", "mlp") != "mlp":
        return f"head kind {heads.kind!r} has no fused kernel (only 'mlp')"
    if not _ext.available():
        return f"the extension mirai._C is unavailable ({_ext.load_error()})"
    dev = h.device.type
    if dev == "cuda" and not _ext.has_op("foresight_fused_cuda"):
        return "mirai._C was built without its CUDA kernels"
    if dev not in ("cuda", "cpu"):
        return f"no fused kernel for device type {dev!r}"
    dt = heads.w1.dtype
    ok = (torch.float32, torch.bfloat16) + ((torch.float64,) if dev == "cpu" else ())
    if dt not in ok or teacher.dtype not in ok:
        return f"dtypes heads={dt}, teacher={teacher.dtype} have no fused kernel on {dev} (supported: {ok})"
    if dev == "cuda":
        return _self_check(str(h.device)) or None
    return None


@torch.compiler.assume_constant_result  # under torch.compile evaluated once, not traced
def _self_check(device: str) -> str:
    """Why the fused kernels must not run on `device` ("" when they may): ``_check_kernels``, run once
    per device and remembered (``mirai._ext.self_checked``); ``foresight_loss`` then warns and falls back."""
    return _ext.self_checked("foresight_loss", device, lambda: _check_kernels(device))


def _check_kernels(device: str) -> str:
    """The fused op on `device` against the reference, in fp32 (TF32 off), on a small case with a
    masked target row, all heads at once and one head at a time over three chunks: "" when the loss
    and every gradient agree, else why not. The caller's RNG state, autocast and grad mode are left
    as they were."""
    from mirai.ops.reference import foresight_loss_reference

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        heads = _StackedMLPHeads(32, 48, 3, hidden=64).to(device)
    h = torch.randn(2, 16, 32, generator=gen).to(device)
    teacher = torch.randn(2, 16, 48, generator=gen).to(device)
    table = torch.randint(0, 16, (3, 16), generator=gen)
    table[1, 3:9] = -1
    table, coeffs = table.to(device), torch.tensor([1.0, 2.0, 0.5], device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
            def run(**kw) -> list[Tensor]:
                hh = h.clone().requires_grad_(True)
                heads.zero_grad(set_to_none=True)
                total, per_head = (foresight_loss(hh, heads, teacher, table, coeffs, backend="fused", **kw) if kw
                                   else foresight_loss_reference(hh, heads, teacher, table, coeffs))
                total.backward()
                return [total.detach(), per_head.detach(), hh.grad] + [getattr(heads, n).grad for n in _HEAD_PARAMS]

            want = run()
            names = ["total", "per_head", "h"] + [f"grad {n}" for n in _HEAD_PARAMS]
            for groups, chunk in ((3, 32), (1, 12)):
                for name, got, ref in zip(names, run(group_heads=groups, chunk_tokens=chunk), want):
                    err = (got.double() - ref.double()).abs().max().item()
                    if not err <= 1e-4 * ref.double().abs().max().item() + 1e-6:
                        return (f"its self-check on {device} disagreed with the reference ({groups} heads x "
                                f"{chunk} tokens, {name}: max error {err:.1e})")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return ""


class _StackedMLPHeads(torch.nn.Module):
    """K MLP heads in the stacked layout the op reads (``mirai.foresight.ForesightHeads``'s, with its default
    init: N(0, 0.02) weights, zero biases), for the self-check; forward: ``mlp_heads_reference``."""

    kind = "mlp"

    def __init__(self, in_dim: int, out_dim: int, k: int, hidden: int):
        super().__init__()
        shapes = {"w1": (k, hidden, in_dim), "b1": (k, hidden), "w2": (k, hidden, hidden), "b2": (k, hidden),
                  "w3": (k, out_dim, hidden), "b3": (k, out_dim)}
        for name in _HEAD_PARAMS:
            setattr(self, name, torch.nn.Parameter(torch.empty(shapes[name])))
        with torch.no_grad():
            for w, b in ((self.w1, self.b1), (self.w2, self.b2), (self.w3, self.b3)):
                w.normal_(0.0, 0.02)
                b.zero_()

    def forward(self, h: Tensor) -> Tensor:
        from mirai.ops.reference import mlp_heads_reference
        return mlp_heads_reference(h, *(getattr(self, n) for n in _HEAD_PARAMS))


def plan_bytes(n_tokens: int, k: int, hidden: int, in_dim: int, out_dim: int, elem_bytes: int,
               group_heads: int, chunk_tokens: int) -> int:
    """Extra memory of a fused-op schedule beyond its outputs: the workspace (3 buffers of
    [chunk, G*hidden] and one of [chunk, G*out_dim], `elem_bytes` each) plus, when the tokens
    take more than one chunk, the fp32 weight-gradient accumulators of one group of G heads."""
    g = max(1, min(group_heads, k))
    chunk = max(1, min(chunk_tokens, n_tokens))
    workspace = chunk * g * (3 * hidden + out_dim) * elem_bytes
    accumulators = 0 if chunk >= n_tokens else 4 * g * hidden * (in_dim + hidden + out_dim)
    return workspace + accumulators


def fused_plan(n_tokens: int, k: int, hidden: int, in_dim: int, out_dim: int, elem_bytes: int,
               budget_bytes: int = DEFAULT_MEMORY_BUDGET, group_heads: int | None = None) -> tuple[int, int]:
    """(group_heads, chunk_tokens) of the fused op: the fewest iterations ceil(K/G) * ceil(N/chunk)
    whose ``plan_bytes`` fit the budget (ties: more heads per group, then fewer chunks); chunks are
    equal splits of the tokens rounded up to 64. With `group_heads` given only that G is considered.
    Nothing fits: the smallest schedule (one head, or the given G, and 64 tokens)."""
    n = max(1, n_tokens)
    best: tuple[int, int, int, int] | None = None  # (iterations, -G, n_chunks, chunk)
    candidates = range(k, 0, -1) if group_heads is None else [max(1, min(int(group_heads), k))]
    for g in candidates:
        groups = _ceil_div(k, g)
        for chunk in _chunk_sizes(n):
            n_chunks = _ceil_div(n, chunk)
            key = (groups * n_chunks, -g, n_chunks, chunk)
            if best is not None and key >= best:
                break  # smaller chunks only cost more iterations from here
            if plan_bytes(n, k, hidden, in_dim, out_dim, elem_bytes, g, chunk) <= budget_bytes:
                best = key
                break
    if best is None:
        return candidates[-1], min(n, 64)
    return -best[1], best[3]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _chunk_sizes(n: int):
    """The distinct chunk sizes of n tokens, largest first: equal splits into 1, 2, ... parts, each
    rounded up to a multiple of 64 (at most n), down to the first that is 64 or less."""
    prev = None
    for parts in range(1, n + 1):
        chunk = min(n, _ceil_div(_ceil_div(n, parts), 64) * 64)
        if chunk != prev:
            yield chunk
            prev = chunk
        if chunk <= 64:
            return


_PLANS: dict[tuple, tuple[int, int]] = {}


@torch.compiler.assume_constant_result  # under torch.compile (static shapes) evaluated once, not traced
def _cached_plan(*key) -> tuple[int, int]:
    """``fused_plan(*key)``, remembered: the op asks for the same shapes every step."""
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = fused_plan(*key)
    return plan


def foresight_loss(h: Tensor, heads, teacher: Tensor, table: Tensor, coeffs: Tensor | Sequence[float],
                   backend: str = "auto", *, chunk_tokens: int | None = None, group_heads: int | None = None,
                   memory_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """(total, per_head[K]) of the foresight alignment loss; see the module docstring.

    backend: "auto" | "fused" | "reference". The fused op's schedule (it trades memory for GEMM
    size and does not change the result beyond rounding): ``group_heads`` heads at a time over
    ``chunk_tokens`` tokens at a time. Not given: ``fused_plan`` within ``memory_budget`` bytes
    (default ``DEFAULT_MEMORY_BUDGET``; ``plan_bytes`` says what a schedule takes); only
    ``chunk_tokens`` given: all heads at once; only ``group_heads`` given: the fewest chunks
    within the budget.
    """
    if backend not in BACKENDS:
        raise ValueError(f"foresight_loss: backend must be one of {BACKENDS}, got {backend!r}")
    for name, v in (("chunk_tokens", chunk_tokens), ("group_heads", group_heads), ("memory_budget", memory_budget)):
        if v is not None and int(v) < 1:
            raise ValueError(f"foresight_loss: {name} must be >= 1, got {v}")
    if backend == "reference":
        return _reference(h, heads, teacher, table, coeffs)
    reason = _fused_unavailable(h, heads, teacher)
    if reason is not None:
        if backend == "fused":
            raise RuntimeError(f"foresight_loss(backend='fused'): {reason}")
        _ext.warn_fallback("foresight_loss", reason)
        return _reference(h, heads, teacher, table, coeffs)
    params = [getattr(heads, name) for name in _HEAD_PARAMS]
    dev = h.device.type
    if (params[0].dtype == torch.float32 and torch.is_autocast_enabled(dev)
            and torch.get_autocast_dtype(dev) == torch.bfloat16):
        # under bf16 autocast, as nn.Linear would: the heads run in bf16 (the kernels' fast path), in the
        # same chunks as bf16 heads; the fp32 parameters receive their gradients through the cast
        params = [p.to(torch.bfloat16) for p in params]
    k = params[0].shape[0] if params[0].dim() == 3 else 1
    if chunk_tokens is not None:
        chunk = int(chunk_tokens)
        groups = int(group_heads) if group_heads is not None else k
    elif h.dim() == 3 and params[0].dim() == 3 and params[4].dim() == 3:
        groups, chunk = _cached_plan(h.shape[0] * h.shape[1], k, params[0].shape[1], params[0].shape[2],
                                   params[4].shape[1], params[0].element_size(),
                                   int(memory_budget) if memory_budget is not None else DEFAULT_MEMORY_BUDGET,
                                   int(group_heads) if group_heads is not None else None)
    else:
        groups, chunk = k, 1  # malformed shapes: the op's checks raise a message naming the tensor
    for name, t in [("teacher", teacher), ("table", table)] + list(zip(_HEAD_PARAMS, params)):
        if t.device != h.device:
            raise ValueError(f"foresight_loss: all tensors must be on h's device ({h.device}), "
                             f"but {name} is on {t.device}")
    x = h.to(params[0].dtype)
    coeffs_t = torch.as_tensor(coeffs, dtype=torch.float32, device=h.device)
    if table.dtype != torch.int64 and not table.is_floating_point():
        table = table.long()
    need_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    out = _foresight_fused(x, *params, teacher.detach(), table, coeffs_t.detach(), chunk, groups, need_grad)
    total, per_head = out[0], out[1]
    return total, per_head.detach()


def _reference(h, heads, teacher, table, coeffs):
    from mirai.ops.reference import foresight_loss_reference

    return foresight_loss_reference(h, heads, teacher, table, coeffs)
