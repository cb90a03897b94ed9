"""Tests of the fused EMA op (mirai.ops.ema_update.ema_update_) and ModelEMA (mirai.optim.model_ema).

CPU tests run in CI (extension kernel when built, the foreach fallback otherwise);
``cuda``-marked tests check the CUDA kernel bit for bit against PyTorch's CUDA ops.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mirai._ext as _ext
from mirai.optim.model_ema import ModelEMA
from mirai.ops.ema_update import ema_update_, ema_update_reference_

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"mirai._C not built: {_ext.load_error()}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# ATen's non-vectorised CPU kernels (capability "DEFAULT") round alpha*param separately instead of
# using an FMA; there the reference may differ from the kernel in the last bit (see mirai/ops/ema.py).
CPU_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal on CUDA and FMA CPUs; within float rounding on ATen's DEFAULT CPU kernels."""
    if a.device.type == "cpu" and not CPU_FMA:
        return torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    return torch.equal(a, b)


def _sizes(n: int, seed: int) -> list[int]:
    """Mixed sizes: 0, 1, around the vector width (8) and the CUDA tile (4096), random, a few large."""
    g = torch.Generator().manual_seed(seed)
    edge = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 4095, 4096, 4097, 8191, 8193, 40_001, 70_000]
    rand = torch.randint(1, 3000, (n - len(edge),), generator=g).tolist()
    return edge + rand


def _make(sizes, param_dtype, device, seed=0, teacher=False, misaligned_every=0):
    """ema (fp32), params and optional teacher lists; every `misaligned_every`-th index is a view
    at an offset of 1 element into a larger buffer (so not 16-byte aligned)."""
    g = torch.Generator().manual_seed(seed)
    ema, params, tch = [], [], []
    for i, n in enumerate(sizes):
        shape = (n,) if i % 3 else ((n // 4, 4) if n % 4 == 0 else (n,))
        off = 1 if misaligned_every and i % misaligned_every == 0 else 0
        e = torch.randn(n + off, generator=g)[off:].view(shape)
        p = torch.randn(n + off, generator=g).to(param_dtype)[off:].view(shape)
        ema.append(e.to(device))
        params.append(p.to(device))
        if teacher:
            tch.append(torch.empty(n + off, dtype=torch.bfloat16)[off:].view(shape).to(device))
    if device != "cpu" and misaligned_every:  # .to(device) re-allocates: rebuild offset views there
        def shift(ts):
            out = []
            for i, t in enumerate(ts):
                if i % misaligned_every == 0:
                    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
                    v = buf[1:].view(t.shape)
                    v.copy_(t)
                    out.append(v)
                else:
                    out.append(t)
            return out
        ema, params = shift(ema), shift(params)
        tch = shift(tch) if teacher else tch
    return ema, params, (tch if teacher else None)


def _assert_equal_lists(out, ref, what):
    bad = [i for i, (a, b) in enumerate(zip(out, ref)) if not torch.equal(a, b)]
    assert not bad, f"{what}: {len(bad)} tensors differ, first index {bad[0]} " \
                    f"(max abs diff {(out[bad[0]].float() - ref[bad[0]].float()).abs().max().item()})"


def _assert_ema_matches(out, ref, params, decay, device):
    if device == "cpu" and not CPU_FMA:
        # Reference without FMA: it may differ by the rounding of alpha*param plus one ulp of the result.
        for o, r, p in zip(out, ref, params):
            bound = 2.0 ** -23 * (abs(1 - decay) * p.float().abs() + 2 * r.abs()) + 1e-45
            assert bool(((o - r).abs() <= bound).all())
        return
    _assert_equal_lists(out, ref, "ema")


def _check_op(device, param_dtype, decay, teacher=False, misaligned_every=0, n=300, seed=0):
    ema, params, tch = _make(_sizes(n, seed), param_dtype, device, seed, teacher, misaligned_every)
    if misaligned_every:
        assert any(e.data_ptr() % 16 for e in ema), "the misaligned views should not be 16-byte aligned"
    ref = [e.clone() for e in ema]
    ema_update_reference_(ref, params, decay)
    ema_update_(ema, params, decay, tch)
    _assert_ema_matches(ema, ref, params, decay, device)
    if teacher:
        _assert_equal_lists(tch, [e.to(torch.bfloat16) for e in ema], "teacher")


# ------------------------------------------------------------------------- op on CPU
def test_cpu_fp32_params_bit_exact_mixed_sizes():
    _check_op("cpu", torch.float32, decay=0.6123)


def test_cpu_bf16_params_and_teacher_bit_exact():
    _check_op("cpu", torch.bfloat16, decay=0.9999, teacher=True)


def test_cpu_misaligned_views_and_multi_dim_shapes():
    _check_op("cpu", torch.bfloat16, decay=0.7, teacher=True, misaligned_every=3, n=120, seed=1)


def test_mixed_param_dtypes_and_partial_teacher():
    ema, p32, _ = _make([5, 17, 4096, 1, 0], torch.float32, "cpu", seed=2)
    _, p16, _ = _make([5, 17, 4096, 1, 0], torch.bfloat16, "cpu", seed=3)
    params = [p32[0], p16[1], p32[2], p16[3], p32[4]]
    teacher = [torch.zeros(5, dtype=torch.bfloat16), None, torch.zeros(4096, dtype=torch.bfloat16), None, None]
    ref = [e.clone() for e in ema]
    ema_update_reference_(ref, params, 0.99)
    ema_update_(ema, params, 0.99, teacher)
    _assert_ema_matches(ema, ref, params, 0.99, "cpu")
    assert torch.equal(teacher[0], ema[0].bfloat16()) and torch.equal(teacher[2], ema[2].bfloat16())


def test_decay_edges_and_tensor_decay():
    ema, params, _ = _make([100, 9], torch.float32, "cpu", seed=4)
    keep = [e.clone() for e in ema]
    ema_update_(ema, params, 1.0)
    _assert_equal_lists(ema, keep, "decay=1 keeps the ema")
    ema_update_(ema, params, 0.0)
    _assert_equal_lists(ema, params, "decay=0 copies the params")
    for dt in (torch.float32, torch.float64):
        a, p, _ = _make([1000, 3], torch.bfloat16, "cpu", seed=5)
        b = [x.clone() for x in a]
        d = torch.tensor(0.9997, dtype=dt)
        ema_update_(a, p, d)
        ema_update_(b, p, d.item())
        _assert_equal_lists(a, b, f"{dt} decay tensor == decay.item()")


def _check_rounding_and_denormals(device):
    # decay 0.5 with param == ema keeps the values: 1 + 2^-8 lies half-way between two bf16 values
    # and must round to the even one (1.0); denormals must not be flushed to zero.
    vals = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.4e38, 1e-40, -3e-39, -0.0,
                         float("inf")], device=device)
    ema = [vals.clone()]
    teacher = [torch.empty(vals.shape, dtype=torch.bfloat16, device=device)]
    ema_update_(ema, [vals.clone()], 0.5, teacher)
    ref = [vals.clone()]
    ema_update_reference_(ref, [vals.clone()], 0.5)
    assert torch.equal(ema[0], ref[0]) and ema[0][4].item() != 0.0
    assert torch.equal(teacher[0], ema[0].to(torch.bfloat16))
    assert teacher[0][0].item() == 1.0 and teacher[0][4].item() != 0.0


def test_bf16_rounding_is_round_to_nearest_even():
    _check_rounding_and_denormals("cpu")


# ------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_with_clear_messages(ext_or_fallback):
    e = [torch.zeros(4), torch.zeros(2, 3)]
    p = [torch.zeros(4), torch.zeros(2, 3)]
    cases = [
        (lambda: ema_update_(e, p[:1], 0.9), "ema and params must have the same length, got 2 and 1"),
        (lambda: ema_update_(e, [p[0], torch.zeros(3, 2)], 0.9), "params[1] has shape [3, 2] but ema[1] has shape [2, 3]"),
        (lambda: ema_update_([e[0].double()], [p[0]], 0.9), "ema[0] must be float32"),
        (lambda: ema_update_(e, [p[0], p[1].half()], 0.9), "params[1] must be float32 or bfloat16"),
        (lambda: ema_update_(e, p, 0.9, [None, torch.zeros(2, 3)]), "teacher[1] must be bfloat16"),
        (lambda: ema_update_(e, p, 0.9, [None]), "teacher and ema must have the same length"),
        (lambda: ema_update_(e, [p[0], torch.zeros(3, 2).t()], 0.9), "params[1] must be contiguous"),
        (lambda: ema_update_(e, [p[0], torch.zeros(2, 3, device="meta")], 0.9), "params[1] is on meta"),
        (lambda: ema_update_(e, p, 1.5), "decay must be in [0, 1], got 1.5"),
        (lambda: ema_update_(e, p, torch.tensor([0.9, 0.9])), "decay tensor must have one element"),
    ]
    for fn, msg in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
            fn()
        assert msg in str(info.value), f"expected {msg!r} in {str(info.value)!r}"


# ------------------------------------------------------------------------- fallback
def test_fallback_same_numbers_and_warns_once(monkeypatch):
    ema, params, tch = _make(_sizes(60, 6), torch.bfloat16, "cpu", 6, teacher=True, misaligned_every=5)
    ema2 = [e.clone() for e in ema]
    tch2 = [t.clone() for t in tch]
    ema_update_(ema, params, 0.9, tch)  # extension (or fallback when not built)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_WARNED", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ema_update_(ema2, params, 0.9, tch2)
        ema_update_([e.clone() for e in ema2], params, 0.9)
    _assert_ema_matches(ema2, ema, params, 0.9, "cpu")
    _assert_equal_lists(tch2, [e.to(torch.bfloat16) for e in ema2], "fallback teacher")
    msgs = [str(w.message) for w in rec if "ema_update_ falls back" in str(w.message)]
    assert len(msgs) == 1, msgs


# ------------------------------------------------------------------------- ModelEMA
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 5))
        self.register_buffer("count", torch.zeros(3))


def _perturb(model, g):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.count += 1


def test_model_ema_equals_formula_after_n_updates_with_warmup():
    torch.manual_seed(0)
    model = _Tiny()
    ema = ModelEMA(model, decay=0.999, warmup="tf", include_buffers=True)
    ref = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for t in range(7):
        _perturb(model, g)
        d = min(0.999, (1 + t) / (10 + t))
        assert ema.decay_at(t) == d
        for n, p in model.named_parameters():
            ref[n].mul_(d).add_(p.detach().float(), alpha=1 - d)
        ema.update(model)
    assert ema.num_updates == 7
    for n in ref:
        assert _same(ema.shadow[n], ref[n]), n
    assert torch.equal(ema.shadow_buffers["count"], torch.full((3,), 7.0))  # copied, not averaged


def test_model_ema_decay_schedules():
    ema = ModelEMA(_Tiny(), decay=0.9999)
    assert ema.decay_at(0) == ema.decay_at(10 ** 6) == 0.9999
    power = ModelEMA(_Tiny(), decay=0.9999, warmup="power")
    assert power.decay_at(0) == 0.0 and 0.9 < power.decay_at(1000) < power.decay_at(10 ** 5) < 0.9999
    with pytest.raises(ValueError, match="unknown warmup 'cosine'"):
        ModelEMA(_Tiny(), warmup="cosine")


def test_model_ema_buffers_not_kept_by_default_and_bf16_params():
    model = _Tiny().to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.5)
    assert not ema.shadow_buffers and all(s.dtype == torch.float32 for s in ema.shadow.values())
    ref = {n: s.clone() for n, s in ema.shadow.items()}
    _perturb(model, torch.Generator().manual_seed(2))
    ema.update(model, step=41)
    assert ema.num_updates == 42
    for n, p in model.named_parameters():
        assert _same(ema.shadow[n], ref[n].mul_(0.5).add_(p.float(), alpha=0.5)), n


def test_attach_teacher_with_prefix_map_is_written_in_the_update():
    model = _Tiny()
    ema = ModelEMA(model, decay=0.9)
    teacher = nn.Module()
    teacher.net = _Tiny().body.to(torch.bfloat16)  # teacher names 'net.0.weight' <- model 'body.0.weight'
    ema.attach_teacher(teacher, prefix_map={"net.": "body."})
    assert torch.equal(teacher.net[0].weight, ema.shadow["body.0.weight"].bfloat16())  # filled at attach
    _perturb(model, torch.Generator().manual_seed(3))
    ema.update(model)
    for tn, tp in teacher.named_parameters():
        assert torch.equal(tp, ema.shadow["body." + tn[len("net."):]].bfloat16()), tn
    bad = nn.Module()
    bad.net = nn.Linear(8, 16).to(torch.bfloat16)
    with pytest.raises(KeyError, match="teacher parameter 'net.weight' maps to 'net.weight'"):
        ema.attach_teacher(bad)
    with pytest.raises(TypeError, match="teacher parameter 'net.0.weight' must be bfloat16 or float32"):
        t16 = nn.Module()
        t16.net = _Tiny().body.half()
        ema.attach_teacher(t16, prefix_map={"net.": "body."})
    with pytest.raises(ValueError, match="'net.weight' has shape \\[16, 8\\] but the EMA of 'body.2.weight'"):
        ema.attach_teacher(bad, prefix_map={"net.": "body.2."})


def test_model_ema_shards_named_pairs():
    # partitioned masters: each rank passes (name, flat local shard); shadows take the shard shapes.
    model = _Tiny()
    shards = [(n, p.detach().reshape(-1)[: max(1, p.numel() // 2)].clone()) for n, p in model.named_parameters()]
    ema = ModelEMA(shards, decay=0.8)
    new = [(n, s + 1) for n, s in shards]
    ema.update(new)
    for (n, s), (_, s1) in zip(shards, new):
        assert _same(ema.shadow[n], s.float().mul_(0.8).add_(s1, alpha=1 - 0.8)), n
    with pytest.raises(ValueError, match="shard-shaped"):
        ema.attach_teacher(_Tiny().to(torch.bfloat16))
    with pytest.raises(KeyError, match="parameter 'emb.weight' has an EMA shadow but is missing"):
        ema.update(new[1:])


def test_model_ema_state_dict_round_trip_copy_to_and_errors():
    model = _Tiny()
    ema = ModelEMA(model, decay=0.9, include_buffers=True)
    _perturb(model, torch.Generator().manual_seed(4))
    ema.update(model)
    state = ema.state_dict()
    other = ModelEMA(_Tiny(), decay=0.9, include_buffers=True)
    other.load_state_dict(state)
    assert other.num_updates == 1
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])
    target = _Tiny()
    other.copy_to(target)
    for n, p in target.named_parameters():
        assert torch.equal(p, ema.shadow[n])
    assert torch.equal(target.count, model.count)

    missing = {**state, "shadow": {k: v for k, v in state["shadow"].items() if k != "emb.weight"}}
    with pytest.raises(KeyError, match="missing key 'emb.weight' in 'shadow'"):
        other.load_state_dict(missing)
    extra = {**state, "shadow": {**state["shadow"], "head.weight": torch.zeros(2)}}
    with pytest.raises(KeyError, match="unexpected key 'head.weight' in 'shadow'"):
        other.load_state_dict(extra)
    wrong = {**state, "shadow": {**state["shadow"], "emb.weight": torch.zeros(11, 9)}}
    with pytest.raises(ValueError, match=r"key 'emb.weight' in 'shadow' has shape \[11, 9\], expected \[11, 8\]"):
        other.load_state_dict(wrong)
    with pytest.raises(KeyError, match="no 'num_updates' entry"):
        other.load_state_dict({"shadow": state["shadow"]})


def test_model_ema_update_error_names_the_parameter():
    model = _Tiny()
    ema = ModelEMA(model)
    pairs = [(n, p if n != "body.0.bias" else torch.zeros(3)) for n, p in model.named_parameters()]
    with pytest.raises((RuntimeError, ValueError), match="is parameter 'body.0.bias'"):
        ema.update(pairs)
    with pytest.raises(KeyError, match="parameter 'x' has no EMA shadow"):
        ema.update(list(model.named_parameters()) + [("x", torch.zeros(1))])


# ------------------------------------------------------------------------- CUDA
def _torch_nofma_mismatches(ema, params, decay):
    """Diagnostic for failures: would PyTorch's reference equal the non-FMA formula instead?"""
    n = 0
    for e, p in zip(ema, params):
        a = e.clone().mul_(decay).add_(p.float(), alpha=1 - decay)
        b = e.clone().mul_(decay) + (p.float() * (1 - decay))
        n += int((a != b).sum())
    return n


@pytest.mark.cuda
@needs_cuda
@needs_ext
def test_cuda_bit_exact_fp32_bf16_teacher_misaligned():
    assert _ext.has_cuda(), "mirai._C was built without its CUDA kernels"
    for dtype, teacher, mis in ((torch.float32, False, 0), (torch.bfloat16, True, 0), (torch.bfloat16, True, 4),
                                (torch.float32, True, 3)):
        ema, params, tch = _make(_sizes(400, 7), dtype, "cuda", 7, teacher, mis)
        if mis:
            assert any(e.data_ptr() % 16 for e in ema)
        orig = [e.clone() for e in ema]
        ref = [e.clone() for e in ema]
        ema_update_reference_(ref, params, 0.6123)
        ema_update_(ema, params, 0.6123, tch)
        bad = [i for i, (a, b) in enumerate(zip(ema, ref)) if not torch.equal(a, b)]
        assert not bad, (f"{dtype} teacher={teacher} misaligned={mis}: {len(bad)} tensors differ; PyTorch's "
                         f"reference differs from the non-FMA formula in "
                         f"{_torch_nofma_mismatches(orig, params, 0.6123)} elements")
        if teacher:
            _assert_equal_lists(tch, [e.to(torch.bfloat16) for e in ema], "cuda teacher")


@pytest.mark.cuda
@needs_cuda
@needs_ext
def test_cuda_matches_cpu_kernel_and_device_decay_tensor():
    ema, params, tch = _make(_sizes(200, 8), torch.bfloat16, "cpu", 8, teacher=True)
    cuda_ema = [e.cuda() for e in ema]
    cuda_tch = [t.cuda() for t in tch]
    cuda_params = [p.cuda() for p in params]
    ema_update_(ema, params, 0.9999, tch)
    ema_update_(cuda_ema, cuda_params, torch.tensor(0.9999, dtype=torch.float64, device="cuda"), cuda_tch)
    _assert_equal_lists([e.cpu() for e in cuda_ema], ema, "cuda vs cpu ema")
    _assert_equal_lists([t.cpu() for t in cuda_tch], tch, "cuda vs cpu teacher")


@pytest.mark.cuda
@needs_cuda
@needs_ext
def test_cuda_rounding_and_denormals_not_flushed():
    _check_rounding_and_denormals("cuda")


@pytest.mark.cuda
@needs_cuda
def test_cuda_model_ema_with_teacher():
    model = _Tiny().cuda().to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.99)
    teacher = _Tiny().cuda().to(torch.bfloat16)
    ema.attach_teacher(teacher)
    ref = {n: s.clone() for n, s in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        ref[n].mul_(0.99).add_(p.float(), alpha=1 - 0.99)
        assert torch.equal(ema.shadow[n], ref[n]), n
    for n, p in teacher.named_parameters():
        assert torch.equal(p, ema.shadow[n].bfloat16()), n
