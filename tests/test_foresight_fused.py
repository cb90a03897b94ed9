"""Tests of the fused foresight loss (mirai.ops.foresight_loss, csrc/foresight) against the
reference PyTorch path (mirai.ops.reference.foresight_loss_reference).

CPU: fp32 agreement (tight), float64 gradcheck of the C++ kernel, bf16 in the flash-attention
style (the fused error against an fp32 reference is at most 2x (forward) / 3x (backward) the
error of the reference run in bf16, plus a small floor), odd shapes, a fully masked head,
token counts that are not a multiple of the chunk, non-contiguous inputs, every neighbour
table layout/source, clear errors on bad inputs, backend selection and the custom-op
registration (torch.library.opcheck, torch.compile). CUDA tests (marked `cuda`) repeat the
comparisons on the GPU kernels.
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch

from mirai import _ext
from mirai.foresight.heads import ForesightHeads
from mirai.foresight.neighbours import LAYOUTS, SOURCES, neighbour_table
from mirai.ops import foresight as fs
from mirai.ops.foresight import foresight_loss
from mirai.ops.reference import foresight_loss_reference

PARAMS = ("w1", "b1", "w2", "b2", "w3", "b3")
HAS_CUDA_KERNEL = torch.cuda.is_available() and _ext.has_op("foresight_fused_cuda")

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"mirai._C unavailable: {_ext.load_error()}")
cuda = pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="needs a CUDA GPU and the CUDA build of mirai._C")

pytestmark = needs_ext


def random_table(k: int, t: int, s: int, gen: torch.Generator, p_masked: float = 0.25) -> torch.Tensor:
    """[K, T] int64 rows in [0, S) with a fraction -1 (no target)."""
    table = torch.randint(0, s, (k, t), generator=gen)
    table[torch.rand(k, t, generator=gen) < p_masked] = -1
    return table


def make_case(b=3, t=10, d=16, hidden=24, c=12, k=3, s=None, seed=0, table=None):
    """fp32 inputs: h [B,T,D], ForesightHeads, teacher [B,S,C], table [K,T], coeffs [K]."""
    gen = torch.Generator().manual_seed(seed)
    s = t if s is None else s
    torch.manual_seed(seed)
    heads = ForesightHeads(d, c, k, hidden=hidden, init_std=None)   # non-zero biases: every bias path is used
    with torch.no_grad():  # bf16-representable values, so fp32/bf16 runs start from the same numbers
        for p in heads.parameters():
            p.copy_(p.bfloat16().float())
    h = torch.randn(b, t, d, generator=gen).bfloat16().float()
    teacher = torch.randn(b, s, c, generator=gen).bfloat16().float()
    if table is None:
        table = random_table(k, t, s, gen)
    coeffs = torch.rand(k, generator=gen) + 0.5
    return h, heads, teacher, table, coeffs


def run(backend, h, heads, teacher, table, coeffs, **kw):
    """Loss and grads of total w.r.t. h and every head parameter."""
    heads.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_(True)
    total, per_head = (foresight_loss_reference(h, heads, teacher, table, coeffs) if backend == "ref"
                       else foresight_loss(h, heads, teacher, table, coeffs, backend=backend, **kw))
    total.backward()
    grads = {"h": h.grad}
    grads.update({n: getattr(heads, n).grad for n in PARAMS})
    return total.detach(), per_head.detach(), grads


def copy_heads(heads, dtype=None, device=None):
    other = ForesightHeads(heads.in_dim, heads.out_dim, heads.k, hidden=heads.hidden)
    other.load_state_dict(heads.state_dict())
    return other.to(device=device, dtype=dtype)


def assert_close_results(a, b, rtol, atol):
    """Loss and grads agree elementwise within atol + rtol * (|b| + max|b|): summation-order
    differences scale with the largest entries of a tensor, not with each entry."""
    pairs = [("total", a[0], b[0]), ("per_head", a[1], b[1])] + [(n, a[2][n], b[2][n]) for n in a[2]]
    for name, x, y in pairs:
        scale = y.double().abs().max().item() if y.numel() else 0.0
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol + rtol * scale, msg=name)


def check_flash_style(case, device, chunk_tokens=None, group_heads=None):
    """bf16 fused vs fp32 reference error <= 2x (fwd) / 3x (bwd) the bf16 reference's error + floor."""
    h, heads, teacher, table, coeffs = case
    h, teacher, table, coeffs = (x.to(device) for x in (h, teacher, table, coeffs))
    ref32 = run("ref", h, copy_heads(heads, device=device), teacher, table, coeffs)
    ref16 = run("ref", h.bfloat16(), copy_heads(heads, torch.bfloat16, device), teacher.bfloat16(), table, coeffs)
    fused = run("fused", h.bfloat16(), copy_heads(heads, torch.bfloat16, device), teacher.bfloat16(), table, coeffs,
                chunk_tokens=chunk_tokens, group_heads=group_heads)

    def err(x, ref):
        return (x.double() - ref.double()).abs().max().item()

    for i, what in ((0, "total"), (1, "per_head")):  # means of cosines: an absolute floor
        floor = 1e-6 + 1e-4 * ref32[i].abs().max().item()
        assert err(fused[i], ref32[i]) <= 2 * err(ref16[i], ref32[i]) + floor, what
    for name, g32 in ref32[2].items():
        floor = 1e-4 * g32.abs().max().item()
        e_fused, e_ref = err(fused[2][name], g32), err(ref16[2][name], g32)
        assert fused[2][name].dtype == torch.bfloat16, name
        assert e_fused <= 3 * e_ref + floor, f"{name}: fused err {e_fused:.3e} vs bf16 reference err {e_ref:.3e}"


# ----------------------------------------------------------------------------- CPU kernel


@pytest.mark.parametrize("chunk_tokens", [None, 7])
def test_fp32_cpu_matches_reference(chunk_tokens):
    case = make_case()  # 30 tokens: one chunk (direct grads) or 5 chunks of 7 (fp32 accumulators)
    fused = run("fused", *case, chunk_tokens=chunk_tokens)
    ref = run("ref", *case)
    assert fused[0].dtype == torch.float32 and fused[1].shape == (3,)
    assert_close_results(fused, ref, rtol=1e-5, atol=1e-6)
    assert ref[2]["w2"].abs().max() > 0  # the comparison is not between zeros


def test_head_group_schedules_match_reference():
    """Heads in groups (the last one short), with and without token chunks, a masked head in a later group."""
    case = make_case(b=3, t=11, d=10, hidden=14, c=21, k=9, s=13, seed=30)
    case[3][6] = -1  # head 6 has no target: third group of (4, 4, 1) / fourth of (2, 2, 2, 2, 1)
    ref = run("ref", *case)
    for groups, chunk in ((1, None), (4, 8), (2, 5), (4, 33), (9, 7)):
        fused = run("fused", *case, group_heads=groups, chunk_tokens=chunk)
        assert_close_results(fused, ref, rtol=1e-5, atol=1e-6)
        assert fused[1][6] == 0 and torch.all(fused[2]["w2"][6] == 0), (groups, chunk)
    assert ref[2]["w1"][8].abs().max() > 0  # the short last group's grads are not left empty


def test_bf16_head_groups_flash_style_cpu():
    check_flash_style(make_case(b=2, t=24, d=32, hidden=48, c=40, k=3, seed=31), "cpu", chunk_tokens=20, group_heads=1)
    check_flash_style(make_case(b=2, t=24, d=32, hidden=48, c=40, k=3, seed=32), "cpu", group_heads=2)


def op_peak_bytes(case, **kw) -> int:
    """Peak CPU memory allocated during the fused call (its outputs included), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    h, heads, teacher, table, coeffs = case
    hh = h.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        foresight_loss(hh, heads, teacher, table, coeffs, backend="fused", **kw)
    cur = peak = 0
    mem = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(mem, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def test_schedule_memory_matches_plan_bytes_cpu():
    """One head at a time: the op allocates its outputs plus what plan_bytes says (within small
    bookkeeping), and a lean schedule allocates several times less than all heads at once."""
    b, t, d, hidden, c, k = 4, 64, 32, 256, 48, 3
    case = make_case(b=b, t=t, d=d, hidden=hidden, c=c, k=k, seed=33)
    outputs = 4 * (sum(p.numel() for p in case[1].parameters()) + case[0].numel())  # fp32 grads of h and heads
    for chunk in (b * t, 64):
        extra = op_peak_bytes(case, group_heads=1, chunk_tokens=chunk) - outputs
        want = fs.plan_bytes(b * t, k, hidden, d, c, 4, 1, chunk)
        assert want <= extra <= 1.02 * want + 32 * 1024, (chunk, extra, want)
    wide = op_peak_bytes(case, group_heads=k, chunk_tokens=b * t) - outputs
    lean = op_peak_bytes(case, group_heads=1, chunk_tokens=64) - outputs
    assert 4 * lean < wide


def test_self_check_accepts_the_kernels_and_catches_a_wrong_one(monkeypatch):
    monkeypatch.setattr(_ext, "_SELF_CHECKS", {})
    state = torch.get_rng_state()
    assert fs._self_check("cpu") == ""                    # the C++ kernels agree with the reference
    assert torch.equal(torch.get_rng_state(), state)      # the caller's random stream is untouched
    real = _ext.ext()

    class Wrong:                                          # a kernel whose dh comes back halved
        @staticmethod
        def foresight_fused_cpu(*args):
            out = real.foresight_fused_cpu(*args)
            if out[2].numel():
                out[2].mul_(0.5)
            return out

    monkeypatch.setattr(_ext, "_SELF_CHECKS", {})
    monkeypatch.setattr(_ext, "ext", lambda: Wrong)
    reason = fs._self_check("cpu")
    assert reason.startswith("its self-check on cpu disagreed with the reference") and ", h:" in reason
    assert _ext._SELF_CHECKS == {("foresight_loss", "cpu"): reason}


def test_fused_plan_budget_and_fewest_iterations():
    # the design shapes (bf16): all heads at once within the default budget, as measured on the H100
    assert fs.fused_plan(8192, 3, 2048, 768, 768, 2) == (3, 4096)      # GPT-B Mirai-E
    assert fs.fused_plan(4096, 3, 2048, 1536, 1536, 2) == (3, 4096)    # GPT-XXL Mirai-E, one chunk
    assert fs.fused_plan(8192, 1, 2048, 768, 768, 2) == (1, 8192)      # GPT-B Mirai-I
    # within 90 MiB GPT-B K = 3 runs one head at a time in two chunks: 86 MB beside 57 MB of grads
    g, m = fs.fused_plan(8192, 3, 2048, 768, 768, 2, 90 * 2**20)
    assert (g, m) == (1, 4096) and fs.plan_bytes(8192, 3, 2048, 768, 768, 2, g, m) <= 90 * 2**20
    assert fs.fused_plan(8192, 3, 2048, 768, 768, 2, 1) == (1, 64)     # nothing fits: the smallest schedule
    assert fs.fused_plan(8192, 3, 2048, 768, 768, 2, 90 * 2**20, group_heads=3)[0] == 3
    # brute force on small cases: no schedule within the budget takes fewer iterations
    for n, k, budget in ((300, 5, 40_000), (1000, 3, 200_000), (77, 9, 10_000)):
        dims = (n, k, 16, 8, 12, 2)
        g, m = fs.fused_plan(*dims, budget)
        iters = -(-k // g) * -(-n // m)
        assert fs.plan_bytes(*dims, g, m) <= budget
        for gg in range(1, k + 1):
            for mm in range(1, n + 1):
                if fs.plan_bytes(*dims, gg, mm) <= budget:
                    assert -(-k // gg) * -(-n // mm) >= iters, (dims, budget, gg, mm)


def test_gradcheck_float64_cpu_kernel():
    h, heads, teacher, table, coeffs = make_case(b=2, t=5, d=4, hidden=6, c=5, k=2, seed=1)
    table[1, 2] = -1
    heads = heads.double()
    teacher = teacher.double()
    params = [getattr(heads, n) for n in PARAMS]
    h = h.double().requires_grad_(True)

    def f(h_, *ps, groups=None):
        view = types.SimpleNamespace(kind="mlp", **dict(zip(PARAMS, ps)))
        return foresight_loss(h_, view, teacher, table, coeffs, backend="fused", chunk_tokens=3,
                              group_heads=groups)[0]

    assert f(h, *params).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (h, *params), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradcheck(lambda *a: f(*a, groups=1), (h, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_bf16_cpu_flash_style():
    check_flash_style(make_case(b=2, t=12, d=32, hidden=48, c=40, k=3, seed=2), "cpu", chunk_tokens=10)


@pytest.mark.parametrize("k", [1, 9])
def test_odd_shapes_masked_head_partial_chunk(k):
    case = make_case(b=3, t=11, d=10, hidden=14, c=123, k=k, s=13, seed=3)
    table = case[3]
    masked = k // 2
    table[masked] = -1  # a head without any target
    fused = run("fused", *case, chunk_tokens=8)  # 33 tokens: chunks of 8 + a partial one
    ref = run("ref", *case)
    assert_close_results(fused, ref, rtol=1e-5, atol=1e-6)
    assert fused[1][masked] == 0
    for n in PARAMS:
        assert torch.all(fused[2][n][masked] == 0), n
    if k > 1:
        assert fused[2]["w1"].abs().sum() > 0


def test_non_contiguous_inputs():
    h, heads, teacher, table, coeffs = make_case(b=2, t=9, d=8, hidden=12, c=10, k=3, seed=4)
    ref = run("ref", h, heads, teacher, table, coeffs)
    h_nc = h.transpose(0, 1).contiguous().transpose(0, 1)               # [B, T, D] with permuted strides
    teacher_nc = torch.cat([teacher, teacher], dim=2)[:, :, ::2]        # strided last dim
    teacher_nc.copy_(teacher)
    table_nc = table.t().contiguous().t()                               # column-major [K, T]
    leaves = {n: getattr(heads, n).detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)
              if getattr(heads, n).dim() == 3 else getattr(heads, n).detach().clone().requires_grad_(True)
              for n in PARAMS}
    assert not h_nc.is_contiguous() and not teacher_nc.is_contiguous() and not leaves["w2"].is_contiguous()
    view = types.SimpleNamespace(kind="mlp", **leaves)
    hh = h_nc.clone().requires_grad_(True)
    total, per_head = foresight_loss(hh, view, teacher_nc, table_nc, coeffs, backend="fused", chunk_tokens=5)
    total.backward()
    torch.testing.assert_close(total, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_head, ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad, ref[2]["h"], rtol=1e-5, atol=1e-6)
    for n in PARAMS:
        torch.testing.assert_close(leaves[n].grad, ref[2][n], rtol=1e-5, atol=1e-6, msg=n)


def test_every_neighbour_table_layout_and_source():
    grid = 4
    for layout in LAYOUTS:
        for source in SOURCES:
            k = 9 if layout == "released" else 3
            table = neighbour_table(grid, k, layout=layout, source=source)
            case = make_case(b=2, t=grid * grid, d=8, hidden=12, c=10, k=k, s=grid * grid, seed=5, table=table)
            fused = run("fused", *case, chunk_tokens=12)
            ref = run("ref", *case)
            assert_close_results(fused, ref, rtol=1e-5, atol=1e-6)


def check_autocast_runs_heads_in_bf16(device):
    """Under bf16 autocast, fp32 heads run as bf16 heads would (same numbers), and the fp32 parameters
    get fp32 gradients equal to the bf16 run's."""
    h, heads, teacher, table, coeffs = make_case(b=2, t=12, d=32, hidden=48, c=40, k=3, seed=4)
    h, teacher, table, coeffs = (x.to(device) for x in (h, teacher, table, coeffs))
    heads32 = copy_heads(heads, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = run("fused", h, heads32, teacher.bfloat16(), table, coeffs)
    want = run("fused", h.bfloat16(), copy_heads(heads, torch.bfloat16, device), teacher.bfloat16(), table, coeffs)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for name in PARAMS:
        assert got[2][name].dtype == torch.float32, name
        torch.testing.assert_close(got[2][name], want[2][name].float(), rtol=0, atol=0, msg=name)
    assert got[2]["w1"].abs().max() > 0


def test_autocast_bf16_runs_fp32_heads_in_bf16():
    check_autocast_runs_heads_in_bf16("cpu")


def test_teacher_dtype_differs_from_heads():
    h, heads, teacher, table, coeffs = make_case(seed=6)
    ref = run("ref", h, heads, teacher.bfloat16(), table, coeffs)
    fused = run("fused", h, heads, teacher.bfloat16(), table, coeffs)
    assert_close_results(fused, ref, rtol=1e-5, atol=1e-6)


def test_no_grad_and_zero_norm_rows():
    h, heads, teacher, table, coeffs = make_case(seed=7)
    teacher[0, 3] = 0  # a zero teacher row: cos clamps to 0 instead of NaN
    with torch.no_grad():
        heads.w3[1].zero_()
        heads.b3[1].zero_()  # head 1 outputs exactly 0: its norm clamp is active
    with torch.no_grad():
        total, per_head = foresight_loss(h, heads, teacher, table, coeffs, backend="fused")
    ref = run("ref", h, heads, teacher, table, coeffs)
    assert not total.requires_grad
    torch.testing.assert_close(total, ref[0], rtol=1e-5, atol=1e-6)
    fused = run("fused", h, heads, teacher, table, coeffs, chunk_tokens=4)
    assert_close_results(fused, ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(fused[2]["w3"]).all()


def test_backward_scales_with_upstream_gradient():
    h, heads, teacher, table, coeffs = make_case(seed=8)
    base = run("fused", h, heads, teacher, table, coeffs)
    hh = h.clone().requires_grad_(True)
    heads.zero_grad(set_to_none=True)
    total, per_head = foresight_loss(hh, heads, teacher, table, coeffs, backend="fused")
    assert not per_head.requires_grad  # logging output; gradients flow through total
    (-2.5 * total).backward()
    torch.testing.assert_close(hh.grad, -2.5 * base[2]["h"])
    torch.testing.assert_close(heads.w2.grad, -2.5 * base[2]["w2"])


def test_second_backward_through_same_graph_cpu():
    h, heads, teacher, table, coeffs = make_case(seed=12)
    hh = h.clone().requires_grad_(True)
    total, _ = foresight_loss(hh, heads, teacher, table, coeffs, backend="fused")
    total.backward(retain_graph=True)
    first = hh.grad.clone()
    total.backward()  # CPU: grads are scaled out of place, a retained graph can be reused
    torch.testing.assert_close(hh.grad, 2 * first)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    h, heads, teacher, table, coeffs = make_case(seed=9)
    s = teacher.shape[1]

    def call(**over):
        args = dict(h=h, heads=heads, teacher=teacher, table=table, coeffs=coeffs)
        args.update(over)
        return foresight_loss(args["h"], args["heads"], args["teacher"], args["table"], args["coeffs"],
                              backend="fused")

    with pytest.raises(RuntimeError, match=r"teacher must have shape \[B, S, C\]"):
        call(teacher=teacher[..., :-1])
    with pytest.raises(RuntimeError, match=r"table must have shape \[K, T\]"):
        call(table=table[:, :-1])
    with pytest.raises(RuntimeError, match=r"h must be \[B, T, D\]"):
        call(h=h[0])
    with pytest.raises(RuntimeError, match=r"coeffs must have shape \[K\]"):
        call(coeffs=coeffs[:2])
    with pytest.raises(RuntimeError, match=r"table must be int64"):
        call(table=table.float())
    bad = table.clone()
    bad[1, 4] = s
    with pytest.raises(RuntimeError, match=r"table values must lie in \[-1, S\)"):
        call(table=bad)
    bad[1, 4] = -2
    with pytest.raises(RuntimeError, match=r"table values must lie in \[-1, S\)"):
        call(table=bad)
    ok = table.clone()
    call(table=ok)            # checked once ...
    ok[0, 0] = s + 3          # ... and again after an in-place change
    with pytest.raises(RuntimeError, match=r"table values must lie"):
        call(table=ok)
    with pytest.raises(ValueError, match=r"but teacher is on meta"):
        call(teacher=teacher.to("meta"))
    raw_args = [h, *[getattr(heads, n).detach() for n in PARAMS], teacher.to("meta"), table, coeffs]
    with pytest.raises(RuntimeError, match=r"every tensor must be on the CPU, but teacher is on meta"):
        _ext.ext().foresight_fused_cpu(*raw_args, 16, 0, True, True)
    with pytest.raises(RuntimeError, match=r"no fused kernel"):
        call(heads=copy_heads(heads, torch.float16), h=h.half())
    view = types.SimpleNamespace(kind="mlp", **{n: getattr(heads, n) for n in PARAMS})
    view.w2 = heads.w2.detach()[:, :, :-1]
    with pytest.raises(RuntimeError, match=r"w2 must have shape \[K, H, H\]"):
        call(heads=view)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        foresight_loss(h, heads, teacher, table, coeffs, backend="triton")


def test_backend_selection_and_fallback(monkeypatch):
    case = make_case(seed=10)
    ref = run("ref", *case)
    assert_close_results(run("reference", *case), ref, rtol=0, atol=0)
    assert_close_results(run("auto", *case), ref, rtol=1e-5, atol=1e-6)

    h, heads, teacher, table, coeffs = case
    tr = ForesightHeads(16, 12, 3, kind="transformer")
    monkeypatch.setattr(_ext, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="head kind 'transformer' has no fused kernel"):
        foresight_loss(h, tr, teacher, table, coeffs)
    with pytest.raises(RuntimeError, match="backend='fused'.*transformer"):
        foresight_loss(h, tr, teacher, table, coeffs, backend="fused")

    monkeypatch.setattr(_ext, "_C", None)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        out = run("auto", *case)
    assert_close_results(out, ref, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per reason only
        run("auto", *case)
    with pytest.raises(RuntimeError, match="backend='fused'.*unavailable"):
        run("fused", *case)


def test_custom_op_registration_and_compile():
    h, heads, teacher, table, coeffs = make_case(b=2, t=6, d=8, hidden=8, c=6, k=2, seed=11)
    args = (h.requires_grad_(True), *[getattr(heads, n) for n in PARAMS], teacher, table, coeffs, 5, 1, True)
    torch.library.opcheck(fs._foresight_fused, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def step(h_):
        total, per_head = foresight_loss(h_, heads, teacher, table, coeffs, backend="fused")
        return total * 2.0, per_head

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    hh = h.detach().clone().requires_grad_(True)
    total, per_head = compiled(hh)
    total.backward()
    ref = run("ref", h, heads, teacher, table, coeffs)
    torch.testing.assert_close(total, 2 * ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad, 2 * ref[2]["h"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- CUDA kernel


@pytest.mark.cuda
@cuda
def test_cuda_fp32_matches_reference():
    case = make_case(b=4, t=64, d=64, hidden=128, c=96, k=3, seed=20)
    dev = [x.cuda() for x in (case[0], case[2], case[3], case[4])]
    heads = copy_heads(case[1], device="cuda")
    ref = run("ref", dev[0], heads, dev[1], dev[2], dev[3])
    for chunk in (None, 100):
        fused = run("fused", dev[0], heads, dev[1], dev[2], dev[3], chunk_tokens=chunk)
        assert fused[2]["w1"].is_cuda
        assert_close_results(fused, ref, rtol=2e-4, atol=2e-5)  # TF32 is off by default; fp32 GEMMs


@pytest.mark.cuda
@cuda
def test_cuda_bf16_flash_style():
    check_flash_style(make_case(b=4, t=64, d=128, hidden=256, c=128, k=3, seed=21), "cuda")
    check_flash_style(make_case(b=4, t=64, d=128, hidden=256, c=128, k=3, seed=22), "cuda", chunk_tokens=96)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("k", [1, 9])
def test_cuda_odd_shapes_masked_head(k):
    case = make_case(b=3, t=37, d=24, hidden=40, c=123, k=k, s=41, seed=23)  # C=123: scalar loads
    case[3][k // 2] = -1
    dev = [x.cuda() for x in (case[0], case[2], case[3], case[4])]
    heads = copy_heads(case[1], device="cuda")
    ref = run("ref", dev[0], heads, dev[1], dev[2], dev[3])
    fused = run("fused", dev[0], heads, dev[1], dev[2], dev[3], chunk_tokens=32)
    assert_close_results(fused, ref, rtol=2e-4, atol=2e-5)
    assert fused[1][k // 2].item() == 0
    check_flash_style(case, "cuda", chunk_tokens=50)


@pytest.mark.cuda
@cuda
def test_cuda_head_group_schedules_and_their_memory():
    b, t, d, hidden, c, k = 4, 64, 64, 256, 96, 3
    case = make_case(b=b, t=t, d=d, hidden=hidden, c=c, k=k, seed=34)
    case[3][1] = -1
    dev = [x.cuda() for x in (case[0], case[2], case[3], case[4])]
    heads = copy_heads(case[1], device="cuda")
    ref = run("ref", dev[0], heads, dev[1], dev[2], dev[3])
    for groups, chunk in ((1, None), (2, 100), (1, 64)):
        fused = run("fused", dev[0], heads, dev[1], dev[2], dev[3], group_heads=groups, chunk_tokens=chunk)
        assert_close_results(fused, ref, rtol=2e-4, atol=2e-5)
    check_flash_style(case, "cuda", chunk_tokens=96, group_heads=1)
    # memory of the call (bf16): its outputs plus plan_bytes, nothing hidden in the GEMM calls
    heads16 = copy_heads(case[1], torch.bfloat16, "cuda")
    h16 = dev[0].bfloat16().requires_grad_(True)
    outputs = 2 * (sum(p.numel() for p in heads16.parameters()) + h16.numel())
    for groups, chunk in ((k, b * t), (k, 96), (1, b * t), (1, 96)):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = foresight_loss(h16, heads16, dev[1].bfloat16(), dev[2], dev[3], backend="fused",
                             group_heads=groups, chunk_tokens=chunk)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - outputs
        want = fs.plan_bytes(b * t, k, hidden, d, c, 2, groups, chunk)
        assert extra <= 1.05 * want + 256 * 1024, (groups, chunk, extra, want)
        del out


@pytest.mark.cuda
@cuda
def test_cuda_tables_teacher_dtype_and_errors():
    grid = 8
    for layout in LAYOUTS:
        for source in SOURCES:
            table = neighbour_table(grid, 3, layout=layout, source=source)
            case = make_case(b=2, t=grid * grid, d=32, hidden=64, c=48, k=3, s=grid * grid, seed=24, table=table)
            dev = [x.cuda() for x in (case[0], case[2], case[3], case[4])]
            heads = copy_heads(case[1], device="cuda")
            ref = run("ref", dev[0], heads, dev[1].bfloat16(), dev[2], dev[3])
            fused = run("fused", dev[0], heads, dev[1].bfloat16(), dev[2], dev[3], chunk_tokens=50)
            assert_close_results(fused, ref, rtol=2e-4, atol=2e-5)
    h, heads, teacher, table, coeffs = make_case(seed=25)
    heads = copy_heads(heads, device="cuda")
    with pytest.raises(ValueError, match="but teacher is on cpu"):
        foresight_loss(h.cuda(), heads, teacher, table.cuda(), coeffs, backend="fused")
    raw_args = [h.cuda(), *[getattr(heads, n).detach() for n in PARAMS], teacher, table.cuda(), coeffs.cuda()]
    with pytest.raises(RuntimeError, match="every tensor must be on the CUDA device of h"):
        _ext.ext().foresight_fused_cuda(*raw_args, 16, 0, True, True)
    bad = table.cuda()
    bad[0, 0] = teacher.shape[1]
    with pytest.raises(RuntimeError, match=r"table values must lie in \[-1, S\)"):
        foresight_loss(h.cuda(), heads, teacher.cuda(), bad, coeffs, backend="fused")


@pytest.mark.cuda
@cuda
def test_cuda_autocast_bf16_runs_fp32_heads_in_bf16():
    check_autocast_runs_heads_in_bf16("cuda")


@cuda
def test_cuda_backward_scaling_in_place():
    h, heads, teacher, table, coeffs = make_case(b=2, t=16, d=32, hidden=64, c=32, k=3, seed=27)
    h, teacher, table, coeffs = h.cuda(), teacher.cuda(), table.cuda(), coeffs.cuda()
    heads = copy_heads(heads, device="cuda")
    base = run("fused", h, heads, teacher, table, coeffs)
    hh = h.clone().requires_grad_(True)
    heads.zero_grad(set_to_none=True)
    total, _ = foresight_loss(hh, heads, teacher, table, coeffs, backend="fused")
    (total * 3.0).backward(retain_graph=True)  # scale != 1: the kernel multiplies
    torch.testing.assert_close(hh.grad, 3.0 * base[2]["h"])
    torch.testing.assert_close(heads.w2.grad, 3.0 * base[2]["w2"])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()  # CUDA scales in place: a second backward is refused, not wrong


@pytest.mark.cuda
@cuda
def test_cuda_torch_compile_inductor():
    h, heads, teacher, table, coeffs = make_case(b=2, t=16, d=32, hidden=64, c=32, k=3, seed=26)
    h, teacher, table, coeffs = h.cuda(), teacher.cuda(), table.cuda(), coeffs.cuda()
    heads = copy_heads(heads, device="cuda")

    def step(h_):
        return foresight_loss(torch.tanh(h_), heads, teacher, table, coeffs, backend="fused")[0]

    compiled = torch.compile(step, fullgraph=True)
    hh = h.clone().requires_grad_(True)
    compiled(hh).backward()
    hr = h.clone().requires_grad_(True)
    heads.zero_grad(set_to_none=True)
    foresight_loss_reference(torch.tanh(hr), heads, teacher, table, coeffs)[0].backward()
    torch.testing.assert_close(hh.grad, hr.grad, rtol=2e-4, atol=2e-5)
