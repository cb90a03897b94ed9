"""Fused chunked linear + cross-entropy (mirai/ops/linear_ce.py) against F.cross_entropy on full logits."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from mirai import _ext
from mirai.ops.linear_ce import (_linear_ce_op, linear_cross_entropy, linear_cross_entropy_reference,
                                 row_pass_reference, row_pass_torch)

HAS_KERNEL = _ext.has_op("ce_softmax_grad_")
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason=f"mirai._C lacks ce_softmax_grad_ ({_ext.load_error()})")
KERNEL = pytest.param("fused", marks=needs_kernel)              # the backend="fused" case of a parametrized test


def problem(n: int = 37, d: int = 16, v: int = 50, dtype=torch.float64, seed: int = 0, ignore_every: int = 5):
    """hidden [n, d], weight [v, d], targets [n] with every `ignore_every`-th target ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def value_and_grads(fn, hidden, weight, targets):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", [KERNEL, "reference"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_cross_entropy_with_ignore_index_and_a_ragged_last_chunk(dtype, tol, backend):
    hidden, weight, targets = problem(dtype=dtype)                        # N = 37: chunks 8, 8, 8, 8, 5
    ours = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=8, backend=backend),
                           hidden, weight, targets)
    ref = value_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t), hidden, weight, targets)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == dtype
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert torch.count_nonzero(ours[1][::5]) == 0                          # ignored rows get no gradient
    # one chunk bigger than N, and a custom ignore_index
    t7 = torch.where(targets == -100, torch.full_like(targets, 7), targets)
    one = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=7, chunk_size=1000,
                                                               backend=backend), hidden, weight, t7)
    ref7 = value_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t, ignore_index=7), hidden, weight, t7)
    for a, b in zip(one, ref7):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", [KERNEL, "reference"])
def test_bf16_error_is_within_the_pytorch_bf16_error(backend):
    """Against an fp32 reference on the same bf16-rounded inputs: loss error <= 2x and gradient error
    <= 3x the error of PyTorch's own bf16 path (bf16 logits -> .float() -> cross_entropy)."""
    hidden, weight, targets = problem(n=301, d=64, v=1000, dtype=torch.bfloat16, seed=3, ignore_every=7)
    ref = value_and_grads(lambda h, w, t: F.cross_entropy(h @ w.t(), t),
                          hidden.float(), weight.float(), targets)
    torch_bf16 = value_and_grads(lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t), hidden, weight, targets)
    ours = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=64, backend=backend),
                           hidden, weight, targets)
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16

    def err(x, r):                                                        # relative Frobenius error
        return ((x.double() - r.double()).norm() / r.double().norm()).item()

    assert err(ours[0], ref[0]) <= 2 * err(torch_bf16[0], ref[0]) + 1e-7
    for i in (1, 2):
        assert err(ours[i], ref[i]) <= 3 * err(torch_bf16[i], ref[i])
        assert err(ours[i], ref[i]) < 0.02                                # and small in absolute terms


def test_all_ignored_targets_give_zero_loss_and_zero_grads():
    hidden, weight, _ = problem(n=9, dtype=torch.float32)
    targets = torch.full((9,), -100)
    loss, dh, dw = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=4),
                                   hidden, weight, targets)
    assert loss.item() == 0.0
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    assert torch.isfinite(loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


def test_upstream_gradient_scales_and_partial_requires_grad():
    hidden, weight, targets = problem(dtype=torch.float64)
    base = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=8), hidden, weight, targets)
    scaled = value_and_grads(lambda h, w, t: 0.25 * linear_cross_entropy(h, w, t, chunk_size=8) + 1.0,
                             hidden, weight, targets)
    torch.testing.assert_close(scaled[1], 0.25 * base[1])
    torch.testing.assert_close(scaled[2], 0.25 * base[2])
    # only the weight requires grad (frozen features): its gradient is unchanged
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, targets, chunk_size=8).backward()
    torch.testing.assert_close(w.grad, base[2])
    # no grad mode: same value, and no gradient buffers are computed
    with torch.no_grad():
        loss, dh, dw = _linear_ce_op(hidden, weight, targets, -100, 8, False, False, HAS_KERNEL)
        torch.testing.assert_close(loss, base[0])
        assert dh.numel() == 0 and dw.numel() == 0
        assert linear_cross_entropy(hidden, weight.requires_grad_(), targets).requires_grad is False


def test_reference_helper_and_input_errors():
    hidden, weight, targets = problem(dtype=torch.float32)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets),
                               linear_cross_entropy_reference(hidden, weight, targets))
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="same dtype"):
        linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)


def test_custom_op_registration_and_compiled_caller_without_graph_break():
    hidden, weight, targets = problem(dtype=torch.float32)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    torch.library.opcheck(_linear_ce_op, (h, w, targets, -100, 8, True, True, HAS_KERNEL),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

    for backend in ("auto", "fused") if HAS_KERNEL else ("auto",):
        def f(h, w, t, _b=backend):                                       # ops around the fused loss
            return 2.0 * linear_cross_entropy(torch.tanh(h), w, t, chunk_size=8, backend=_b)

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fullgraph: a break would raise
        got = value_and_grads(compiled, hidden, weight, targets)
        want = value_and_grads(f, hidden, weight, targets)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


@needs_kernel
def test_row_pass_kernel_odd_widths_ignored_rows_and_errors():
    C = _ext.ext()
    g = torch.Generator().manual_seed(4)
    for v, dtype, tol in ((1, torch.float32, 1e-6), (1001, torch.float32, 1e-6), (16387, torch.bfloat16, 1e-2),
                          (640, torch.float64, 1e-12)):
        z = (torch.randn(7, v, generator=g) * 3).to(dtype)
        t = torch.randint(0, v, (7,), generator=g)
        w = torch.full((7,), 1 / 5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        w[2] = 0                                                          # an ignored row
        want_loss, want_grad = row_pass_reference(z, t, w)
        zz = z.clone()
        loss = C.ce_softmax_grad_(zz, t, w, False)                        # loss only: z untouched
        assert torch.equal(zz, z)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
        loss = C.ce_softmax_grad_(zz, t, w, True)
        assert loss.dtype == w.dtype and zz.dtype == dtype
        torch.testing.assert_close(zz.double(), want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())
        assert torch.count_nonzero(zz[2]) == 0 and loss[2] == 0
        loss_t, grad_t = row_pass_torch(z, t, w)                          # the PyTorch pass, same contract
        torch.testing.assert_close(loss_t.double(), want_loss, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
        torch.testing.assert_close(grad_t.double(), want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())
        assert grad_t.dtype == dtype and row_pass_torch(z, t, w, need_grad=False)[1] is None
    z, t, w = torch.randn(3, 10), torch.tensor([1, 2, 3]), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, V\) = \[0, 10\)"):
        C.ce_softmax_grad_(z, torch.tensor([1, 10, 3]), w, True)
    with pytest.raises(RuntimeError, match="z must be contiguous"):
        C.ce_softmax_grad_(torch.randn(10, 3).t(), t, w, True)
    with pytest.raises(RuntimeError, match="row_w must be Float for BFloat16 logits"):
        C.ce_softmax_grad_(z.bfloat16(), t, w.double(), True)
    with pytest.raises(RuntimeError, match=r"targets must be \[C\] = \[3\]"):
        C.ce_softmax_grad_(z, t[:2], w, True)
    with pytest.raises(RuntimeError, match="z must be float32 or bfloat16"):
        C.ce_softmax_grad_(z.half(), t, w, True)


@needs_kernel
def test_row_pass_kernel_long_fp32_rows_and_masked_logits():
    """fp32 rows of 16,384 logits: the kernel's gradient stays within 4e-6 of the largest one (its partial sums
    keep the log-sum-exp accurate; one running float32 sum drifts to about 1e-5). -inf logits (a masked code)
    add nothing to the softmax, wherever they are in the row, and get a zero gradient, as in PyTorch."""
    C = _ext.ext()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(32, 16384, generator=g) * 4
    t = torch.randint(0, 16384, (32,), generator=g)
    w = torch.rand(32, generator=g)
    want_loss, want_grad = row_pass_reference(z, t, w)
    zz = z.clone()
    loss = C.ce_softmax_grad_(zz, t, w, True)
    assert ((zz.double() - want_grad).abs().max() / want_grad.abs().max()).item() <= 4e-6
    assert ((loss.double() - want_loss).abs() / want_loss.abs()).max().item() <= 1e-6
    z = torch.randn(3, 40, generator=g)
    z[0, 0] = z[1, 7] = z[1, 8] = z[2, 1:] = float("-inf")                # first, middle, all but the target
    t = torch.tensor([3, 2, 0])
    w = torch.full((3,), 0.5)
    want_loss = F.cross_entropy(z, t, reduction="none") * w
    zz = z.clone()
    loss = C.ce_softmax_grad_(zz, t, w, True)
    torch.testing.assert_close(loss, want_loss)
    assert torch.isfinite(zz).all() and zz[0, 0] == 0 and zz[1, 7] == 0 and (zz[2, 1:] == 0).all()
    torch.testing.assert_close(zz, (torch.softmax(z, -1) - F.one_hot(t, 40)) * w[:, None])


@needs_kernel
def test_self_check_accepts_the_kernel_and_catches_a_wrong_one(monkeypatch):
    import mirai.ops.linear_ce as lce
    monkeypatch.setattr(_ext, "_SELF_CHECKS", {})
    assert lce._self_check("cpu") == ""                                   # the CPU twin agrees with PyTorch

    real = _ext.ext()

    class Wrong:                                                          # a kernel that forgets the weights
        @staticmethod
        def ce_softmax_grad_(z, t, w, need_grad):
            return real.ce_softmax_grad_(z, t, torch.ones_like(w), need_grad)

    monkeypatch.setattr(_ext, "_SELF_CHECKS", {})
    monkeypatch.setattr(_ext, "ext", lambda: Wrong)
    reason = lce._self_check("cpu")
    assert reason.startswith("its self-check on cpu disagreed with PyTorch")
    assert _ext._SELF_CHECKS[("linear_cross_entropy", "cpu")] == reason   # remembered: checked once per device


def test_backend_choice_and_fallback(monkeypatch):
    hidden, weight, targets = problem(dtype=torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_cross_entropy(hidden, weight, targets, backend="cuda")
    import mirai.ops.linear_ce as lce
    monkeypatch.setattr(lce, "_kernel_unavailable", lambda *a: "no kernel here")
    with pytest.raises(RuntimeError, match="backend='fused'.*no kernel here"):
        linear_cross_entropy(hidden, weight, targets, backend="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # CPU + auto: PyTorch, no warning
        got = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(got, linear_cross_entropy(hidden, weight, targets, backend="reference"))
    if torch.cuda.is_available():
        with pytest.warns(RuntimeWarning, match="linear_cross_entropy falls back: no kernel here"):
            linear_cross_entropy(hidden.cuda(), weight.cuda(), targets.cuda())


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_cuda()), reason="needs CUDA and mirai._C's CUDA kernels")
def test_row_pass_cuda_kernel_matches_the_cpu_kernel():
    """Both kernels against the float64 reference: the CUDA kernel's error at most 2x the CPU twin's (plus the
    fast-math exp's 2^-21), on each of its four variants (vectorised or one element at a time, bf16 or fp32)."""
    C = _ext.ext()
    g = torch.Generator().manual_seed(5)
    for v, dtype in ((16384, torch.bfloat16), (1001, torch.bfloat16), (16384, torch.float32), (3, torch.float32)):
        z = (torch.randn(33, v, generator=g) * 4).to(dtype)
        t = torch.randint(0, v, (33,), generator=g)
        w = torch.rand(33, generator=g)
        want_loss, want_grad = row_pass_reference(z, t, w)
        cpu, dev = z.clone(), z.cuda()
        loss_cpu = C.ce_softmax_grad_(cpu, t, w, True)
        loss_dev = C.ce_softmax_grad_(dev, t.cuda(), w.cuda(), True).cpu()

        def err(got, want):
            return ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err(loss_dev, want_loss) <= 2 * err(loss_cpu, want_loss) + 2.0 ** -21, (v, dtype)
        assert err(dev.cpu(), want_grad) <= 2 * err(cpu, want_grad) + 2.0 ** -21, (v, dtype)
    bad = torch.randn(2, 8, device="cuda")
    loss = C.ce_softmax_grad_(bad, torch.tensor([1, 9], device="cuda"), torch.ones(2, device="cuda"), True)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])             # out of range: NaN, not a wild read


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_gpu_is_within_the_pytorch_bf16_error():
    hidden, weight, targets = problem(n=3001, d=256, v=16384, dtype=torch.bfloat16, seed=1, ignore_every=11)
    hidden, weight, targets = hidden.cuda(), weight.cuda(), targets.cuda()
    ref = value_and_grads(lambda h, w, t: F.cross_entropy(h.double() @ w.double().t(), t), hidden, weight, targets)
    torch_bf16 = value_and_grads(lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t), hidden, weight, targets)
    ours = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=1024), hidden, weight, targets)
    plain = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=1024, backend="reference"),
                            hidden, weight, targets)

    def err(x, r):
        return ((x.double() - r.double()).norm() / r.double().norm()).item()

    assert err(ours[0], ref[0]) <= 2 * err(torch_bf16[0], ref[0]) + 1e-7
    for i in (1, 2):
        assert err(ours[i], ref[i]) <= 3 * err(torch_bf16[i], ref[i])
        assert err(plain[i], ref[i]) <= 3 * err(torch_bf16[i], ref[i])    # the plain-PyTorch row pass too
