"""Tests of the fused AdamW + EMA step (mirai.ops.adamw_ema_step.adamw_ema_step_) and AdamWEMA
(mirai.optim.adamw_ema).

CPU tests run everywhere (extension kernel when built, the foreach fallback otherwise);
``cuda``-marked tests compare the CUDA kernel bit for bit with the CPU kernel.

Tolerance against torch.optim.AdamW: ours fuses the moment updates and the final update into
FMAs and computes m = beta1*m + (1-beta1)*g where torch uses lerp_, so params and moments agree
to a few float32 ulps (checked with rtol 1e-6, atol 1e-7), not bit for bit. The EMA and teacher
are checked bit for bit against ema_update_ run on the same updated params.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import mirai._ext as _ext
from mirai.ops.adamw_ema_step import adamw_ema_step_
from mirai.ops.ema_update import ema_update_, ema_update_reference_
from mirai.optim import AdamWEMA

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"mirai._C not built: {_ext.load_error()}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RTOL, ATOL = 1e-6, 1e-7
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
# Curated shapes: empty, one element, odd sizes around the CUDA vector (8) and tile (2048) widths, a 2-D
# weight; index MISALIGNED is built as a view at a 1-element offset (not 16-byte aligned) in every list.
SHAPES = [(0,), (1,), (7,), (1023,), (4099,), (33, 17), (2049,)]
MISALIGNED = 6


def _tensor(shape, dtype=torch.float32, device="cpu", misaligned=False, fill=None, g=None):
    n = torch.Size(shape).numel()
    off = 1 if misaligned else 0
    buf = torch.empty(n + off, dtype=dtype, device=device)
    t = buf[off:].view(shape)
    if fill is None:
        t.copy_(torch.randn(shape, generator=g))
    else:
        t.copy_(fill)
    if misaligned and n:
        assert t.data_ptr() % 16 != 0
    return t


class _State:
    """Lists of one call: params, moments, ema, teacher (index MISALIGNED as offset views)."""

    def __init__(self, shapes=SHAPES, device="cpu", seed=0, ema=True, teacher=True):
        g = torch.Generator().manual_seed(seed)
        mis = [i == MISALIGNED for i in range(len(shapes))]
        self.params = [_tensor(s, device=device, misaligned=m, g=g) for s, m in zip(shapes, mis)]
        self.exp_avgs = [_tensor(s, device=device, misaligned=m, fill=torch.zeros(s)) for s, m in zip(shapes, mis)]
        self.exp_avg_sqs = [_tensor(s, device=device, misaligned=m, fill=torch.zeros(s)) for s, m in zip(shapes, mis)]
        # ema on every index but 2; teacher on every ema'd index but 3
        self.ema = [None if i == 2 or not ema else _tensor(s, device=device, misaligned=m, g=g)
                    for i, (s, m) in enumerate(zip(shapes, mis))] if ema else None
        self.teacher = [None if (e is None or i == 3 or not teacher) else
                        _tensor(s, torch.bfloat16, device, m, fill=torch.zeros(s))
                        for i, (s, m, e) in enumerate(zip(shapes, mis, self.ema))] if (ema and teacher) else None

    def clone(self):
        return copy.deepcopy(self)


def _grads(shapes, step, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [_tensor(s, dtype, device, i == MISALIGNED, fill=(torch.randn(s, generator=g) * 0.3 * scale).to(dtype))
            for i, s in enumerate(shapes)]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _torch_adamw(params, groups_wd):
    """torch.optim.AdamW (foreach=False) over fp32 clones, one group per weight decay."""
    ps = [nn.Parameter(p.detach().clone()) for p in params]
    groups = [{"params": [ps[i] for i in idx], "weight_decay": wd} for wd, idx in groups_wd]
    return ps, torch.optim.AdamW(groups, foreach=False, **HP)


# ----------------------------------------------------------------------------------- op vs torch AdamW
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_op_matches_torch_adamw_two_groups_several_steps(grad_dtype, scaled):
    st = _State(ema=False)
    # group "decay" (weight decay 0.1): the 2-D weight and the large / misaligned ones; "no decay": the rest
    groups_wd = [(0.1, [3, 4, 5, 6]), (0.0, [0, 1, 2])]
    ref_params, opt = _torch_adamw(st.params, groups_wd)
    scale = torch.tensor([2.5]) if scaled else None
    for step in range(1, 6):
        grads = _grads(SHAPES, step, grad_dtype, scale=2.5 if scaled else 1.0)
        before = [x.clone() for x in grads]
        for p, gr in zip(ref_params, grads):
            p.grad = gr.float() / scale if scaled else gr.float()
        opt.step()
        for wd, idx in groups_wd:
            adamw_ema_step_([st.params[i] for i in idx], [grads[i] for i in idx], [st.exp_avgs[i] for i in idx],
                            [st.exp_avg_sqs[i] for i in idx], weight_decay=wd, step=step, grad_scale=scale, **HP)
        assert all(torch.equal(a, b) for a, b in zip(grads, before)), "the grads must not be written back"
        for i, p in enumerate(ref_params):
            s = opt.state[p]
            _close(st.params[i], p.detach(), f"step {step} params[{i}]")
            _close(st.exp_avgs[i], s["exp_avg"], f"step {step} exp_avgs[{i}]")
            _close(st.exp_avg_sqs[i], s["exp_avg_sq"], f"step {step} exp_avg_sqs[{i}]")
    assert st.params[4].abs().sum() > 0 and not torch.equal(st.params[4], _State(ema=False).params[4])


def test_ema_and_teacher_bit_exact_with_ema_update_after_the_step():
    st = _State()
    sep = st.clone()                                   # same step without ema, then a separate ema_update_
    ref_params, opt = _torch_adamw(st.params, [(0.05, list(range(len(SHAPES))))])
    ref_ema = [None if e is None else e.clone() for e in st.ema]
    for step, decay in ((1, 0.9), (2, 0.99), (3, 0.999)):
        grads = _grads(SHAPES, step, torch.bfloat16)
        adamw_ema_step_(st.params, grads, st.exp_avgs, st.exp_avg_sqs, weight_decay=0.05, step=step,
                        ema=st.ema, ema_decay=decay, teacher=st.teacher, **HP)
        adamw_ema_step_(sep.params, grads, sep.exp_avgs, sep.exp_avg_sqs, weight_decay=0.05, step=step, **HP)
        idx = [i for i, e in enumerate(sep.ema) if e is not None]
        ema_update_([sep.ema[i] for i in idx], [sep.params[i] for i in idx], decay, [sep.teacher[i] for i in idx])
        # torch AdamW followed by ema_update_ (params differ from ours by float32 rounding only)
        for p, gr in zip(ref_params, grads):
            p.grad = gr.float()
        opt.step()
        ema_update_([ref_ema[i] for i in idx], [ref_params[i].detach() for i in idx], decay)
        for i in range(len(SHAPES)):
            assert torch.equal(st.params[i], sep.params[i]), f"params[{i}] changed by the ema"
            if st.ema[i] is None:
                continue
            assert torch.equal(st.ema[i], sep.ema[i]), f"step {step} ema[{i}]"
            _close(st.ema[i], ref_ema[i], f"step {step} ema[{i}] vs torch AdamW + ema_update_")
            if st.teacher[i] is not None:
                assert torch.equal(st.teacher[i], sep.teacher[i]), f"step {step} teacher[{i}]"
                assert torch.equal(st.teacher[i], st.ema[i].to(torch.bfloat16)), f"step {step} teacher[{i}]"
    assert st.teacher[4].abs().sum() > 0 and st.ema[2] is None and st.teacher[3] is None


def test_denormals_are_not_flushed_and_empty_call_is_a_no_op():
    p = [torch.tensor([1.0, -2.0, 3e-39, 0.0])]
    g = [torch.tensor([1e-39, -3e-39, 0.0, 1e-30])]            # denormal grads -> denormal exp_avg
    m, v = [torch.zeros(4)], [torch.zeros(4)]
    ref_p, opt = _torch_adamw(p, [(0.0, [0])])
    ref_p[0].grad = g[0].clone()
    opt.step()
    adamw_ema_step_(p, g, m, v, weight_decay=0.0, step=1, **HP)
    assert m[0][0].item() != 0.0 and abs(m[0][0].item()) < 1.18e-38    # a denormal, kept
    _close(m[0], opt.state[ref_p[0]]["exp_avg"], "denormal exp_avg")
    _close(p[0], ref_p[0].detach(), "params")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adamw_ema_step_([], [], [], [], weight_decay=0.1, step=1, **HP)


# ----------------------------------------------------------------------------------- AdamWEMA
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 33), nn.LayerNorm(33), nn.Linear(33, 5))


def _groups(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def _backward(model, step, skip_emb=False):
    g = torch.Generator().manual_seed(step)
    model.zero_grad(set_to_none=True)
    idx = torch.randint(0, 10, (6,), generator=g)
    h = model.emb(idx) if not skip_emb else torch.randn(6, 8, generator=g)
    model.body(h).square().mean().backward()


def _ema_of(model, teacher_names=("body.0.weight", "body.1.bias")):
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = {n: ema[n].to(torch.bfloat16) for n in teacher_names}
    return ema, teacher


def test_adamwema_matches_torch_adamw_plus_separate_ema_pass():
    torch.manual_seed(0)
    model = _Net()
    ref_model, sep_model = copy.deepcopy(model), copy.deepcopy(model)
    opt = AdamWEMA(_groups(model), **HP)
    ref = torch.optim.AdamW(_groups(ref_model), foreach=False, **HP)
    sep = AdamWEMA(_groups(sep_model), **HP)                  # ours without ema + a separate ema pass
    ema, teacher = _ema_of(model)
    ref_ema, _ = _ema_of(model)
    sep_ema, sep_teacher = _ema_of(model)
    names = [n for n, _ in model.named_parameters()]
    opt.attach_ema([(p, ema[n], teacher.get(n)) for n, p in model.named_parameters()])
    for step in range(1, 6):
        skip = step == 3                                     # the embedding gets no grad this step
        for m in (model, ref_model, sep_model):
            _backward(m, step, skip_emb=skip)
        assert (model.emb.weight.grad is None) == skip
        decay = 0.9 + 0.01 * step
        opt.ema_decay = decay
        opt.step()
        assert opt.ema_decay is None, "ema_decay must be cleared by the step that used it"
        ref.step()
        sep.step()
        ref_p = dict(ref_model.named_parameters())
        ema_update_([ref_ema[n] for n in names], [ref_p[n].detach() for n in names], decay)
        sep_p = dict(sep_model.named_parameters())
        ema_update_([sep_ema[n] for n in names], [sep_p[n].detach() for n in names], decay,
                    [sep_teacher.get(n) for n in names])
        for n, p in model.named_parameters():
            _close(p.detach(), ref_p[n].detach(), f"step {step} {n}")
            _close(opt.state[p]["exp_avg"], ref.state[ref_p[n]]["exp_avg"], f"step {step} exp_avg {n}")
            _close(opt.state[p]["exp_avg_sq"], ref.state[ref_p[n]]["exp_avg_sq"], f"step {step} exp_avg_sq {n}")
            _close(ema[n], ref_ema[n], f"step {step} ema {n}")
            assert torch.equal(p, sep_p[n]) and torch.equal(ema[n], sep_ema[n]), f"step {step} {n}"
        for n in teacher:
            assert torch.equal(teacher[n], sep_teacher[n]) and torch.equal(teacher[n], ema[n].bfloat16()), n
    # the skipped step: the embedding's EMA moved towards its unchanged value, its step count did not advance
    assert opt.state[model.emb.weight]["step"].item() == 4.0 and opt.state[model.body[0].weight]["step"].item() == 5.0
    # without ema_decay a step leaves the EMA alone
    before = {n: e.clone() for n, e in ema.items()}
    _backward(model, 9)
    opt.step()
    assert all(torch.equal(before[n], ema[n]) for n in ema)


def test_adamwema_grad_scale_equals_dividing_the_grads_and_leaves_them_alone():
    torch.manual_seed(2)
    model = _Net()
    plain = copy.deepcopy(model)
    opt, ref = AdamWEMA(_groups(model), **HP), AdamWEMA(_groups(plain), **HP)
    for step in (1, 2, 3):
        _backward(model, step)
        _backward(plain, step)
        scale = torch.tensor([1.0 + step])                      # the engine's max(1, norm / clip)
        grads = [p.grad.clone() for p in model.parameters()]
        for p in plain.parameters():
            p.grad.div_(scale)
        opt.grad_scale = scale
        opt.step()
        ref.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads)), "grads were written"
        for a, b in zip(model.parameters(), plain.parameters()):
            assert torch.equal(a, b)
    assert opt.grad_scale is not None                           # kept: the engine sets it every step


def test_adamwema_state_dict_same_format_and_round_trips_both_ways():
    torch.manual_seed(1)
    model = _Net()
    tmodel = copy.deepcopy(model)
    ours = AdamWEMA(_groups(model), **HP)
    theirs = torch.optim.AdamW(_groups(tmodel), **HP)
    for step in (1, 2):
        _backward(model, step)
        _backward(tmodel, step)
        ours.step()
        theirs.step()
    a, b = ours.state_dict(), theirs.state_dict()
    assert [sorted(g) for g in a["param_groups"]] == [sorted(g) for g in b["param_groups"]]
    assert [{k: v for k, v in g.items()} for g in a["param_groups"]] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k, s in a["state"].items():
        assert s.keys() == b["state"][k].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert s["step"].dtype == torch.float32 and s["step"].device.type == "cpu" and s["step"].dim() == 0
        assert s["step"].item() == b["state"][k]["step"].item() == 2.0

    def run(m, opt, steps):
        for step in steps:
            _backward(m, step)
            opt.step()
        return [p.detach().clone() for p in m.parameters()]

    # ours -> torch AdamW -> ours: the state survives the trip exactly, so ours continues bit for bit
    m_torch, m_back = copy.deepcopy(model), copy.deepcopy(model)
    via_torch = torch.optim.AdamW(_groups(m_torch), **HP)
    via_torch.load_state_dict(copy.deepcopy(ours.state_dict()))   # (load_state_dict shares tensors)
    back = AdamWEMA(_groups(m_back), **HP)
    back.load_state_dict(copy.deepcopy(via_torch.state_dict()))
    cont = run(model, ours, (3, 4, 5))
    assert all(torch.equal(x, y) for x, y in zip(cont, run(m_back, back, (3, 4, 5))))
    # ... and torch continuing from our state agrees to float32 rounding
    for x, y in zip(cont, run(m_torch, via_torch, (3, 4, 5))):
        _close(x, y, "torch AdamW continuing from AdamWEMA's state")
    # torch AdamW -> ours: continues like torch
    m_ours = copy.deepcopy(tmodel)
    from_torch = AdamWEMA(_groups(m_ours), **HP)
    from_torch.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for x, y in zip(run(m_ours, from_torch, (3, 4, 5)), run(tmodel, theirs, (3, 4, 5))):
        _close(x, y, "AdamWEMA continuing from torch AdamW's state")
    assert from_torch.state[next(m_ours.parameters())]["step"].item() == 5.0


def test_adamwema_follows_param_groups_added_and_states_loaded_between_steps():
    """AdamWEMA reuses its per-step call lists until something changes: a param group added later, a state
    loaded mid-run and a fresh attach_ema must each be seen by the next step (compared with torch's AdamW)."""
    torch.manual_seed(3)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(t.detach().clone()) for t in a]
    late_a, late_b = torch.nn.Parameter(torch.randn(4)), None
    late_b = torch.nn.Parameter(late_a.detach().clone())
    ours, ref = AdamWEMA([{"params": a}], **HP), torch.optim.AdamW([{"params": b}], foreach=False, **HP)

    def step(k):
        for ps, opt in ((a + ([late_a] if len(ours.param_groups) > 1 else []), ours),
                        (b + ([late_b] if len(ref.param_groups) > 1 else []), ref)):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, 0.1 * (k + i)).sin_()
            opt.step()

    step(1)
    step(2)
    ours.add_param_group({"params": [late_a], "weight_decay": 0.0})
    ref.add_param_group({"params": [late_b], "weight_decay": 0.0})
    step(3)
    assert ours.state[late_a]["step"].item() == 1.0 and ours.state[a[0]]["step"].item() == 3.0
    saved = copy.deepcopy(ours.state_dict())
    step(4)
    ours.load_state_dict(saved)                                   # back to the state after step 3 ...
    ref_state = copy.deepcopy(saved)
    ref.load_state_dict(ref_state)
    for x, y in zip(a + [late_a], b + [late_b]):
        with torch.no_grad():
            y.copy_(x)
    step(4)                                                       # ... and on from there, with the loaded counts
    for x, y in zip(a + [late_a], b + [late_b]):
        _close(x.detach(), y.detach(), "after add_param_group and load_state_dict")
    assert ours.state[late_a]["step"].item() == 2.0 and ours.state[a[1]]["step"].item() == 4.0
    ema = [torch.zeros_like(p) for p in a]                        # attached after five steps: used at once
    ours.attach_ema([(p, e, None) for p, e in zip(a, ema)])
    ours.ema_decay = 0.5
    step(5)
    for p, e in zip(a, ema):
        assert torch.equal(e, (p.detach() * 0.5).to(torch.float32)), "the EMA attached last was not updated"


def test_adamwema_refuses_unsupported_options_and_bad_pairs():
    params = list(_Net().parameters())
    for opt in ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"AdamWEMA: {opt}=True is not supported"):
            AdamWEMA(params, **{opt: True})
    opt = AdamWEMA(params)
    with pytest.raises(ValueError, match="pair 0: the param is not in any param group"):
        opt.attach_ema([(torch.zeros(3), torch.zeros(3), None)])
    with pytest.raises(ValueError, match=r"pair 0: ema must be a contiguous torch.float32 tensor of shape \[10, 8\]"):
        opt.attach_ema([(params[0], torch.zeros(10, 8, dtype=torch.float64), None)])
    with pytest.raises(ValueError, match="pair 0: teacher must be a contiguous torch.bfloat16"):
        opt.attach_ema([(params[0], torch.zeros(10, 8), torch.zeros(10, 8))])
    amsgrad_state = torch.optim.AdamW(params, amsgrad=True).state_dict()
    with pytest.raises(ValueError, match=r"AdamWEMA.load_state_dict: amsgrad=True"):
        opt.load_state_dict(amsgrad_state)


# ----------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_with_clear_messages(ext_or_fallback):
    p = [torch.zeros(4), torch.zeros(2, 3)]

    def z():
        return [torch.zeros(4), torch.zeros(2, 3)]

    def call(params=None, grads=None, m=None, v=None, **kw):
        kw = {"weight_decay": 0.0, "step": 1, **HP, **kw}
        adamw_ema_step_(p if params is None else params, z() if grads is None else grads,
                        z() if m is None else m, z() if v is None else v, **kw)

    cases = [
        (lambda: call(grads=z()[:1]), "grads and params must have the same length, got 1 and 2"),
        (lambda: call(v=z() + [torch.zeros(1)]), "exp_avg_sqs and params must have the same length, got 3 and 2"),
        (lambda: call(ema=[torch.zeros(4)], ema_decay=0.9), "ema and params must have the same length, got 1 and 2"),
        (lambda: call(params=[p[0].double(), p[1]]), "params[0] must be float32"),
        (lambda: call(grads=[torch.zeros(4), torch.zeros(2, 3).half()]), "grads[1] must be float32 or bfloat16"),
        (lambda: call(m=[torch.zeros(4), torch.zeros(2, 3).double()]), "exp_avgs[1] must be float32"),
        (lambda: call(v=[torch.zeros(4), torch.zeros(3, 2)]),
         "exp_avg_sqs[1] has shape [3, 2] but params[1] has shape [2, 3]; shapes must match per index"),
        (lambda: call(grads=[torch.zeros(4), torch.zeros(2, 3, device="meta")]),
         "grads[1] is on meta but params[0] is on cpu; all tensors must be on one device"),
        (lambda: call(m=[torch.zeros(4), torch.zeros(3, 2).t()]), "exp_avgs[1] must be contiguous"),
        (lambda: call(ema=[None, torch.zeros(3, 2).t()], ema_decay=0.9), "ema[1] must be contiguous"),
        (lambda: call(teacher=[None, None]), "teacher is given but ema is None"),
        (lambda: call(ema=[torch.zeros(4), None], teacher=[None, torch.zeros(2, 3, dtype=torch.bfloat16)],
                      ema_decay=0.9), "teacher[1] is given but ema[1] is None"),
        (lambda: call(ema=z(), teacher=[torch.zeros(4), None], ema_decay=0.9), "teacher[0] must be bfloat16"),
        (lambda: call(ema=z()), "ema_decay is required when ema is given"),
        (lambda: call(ema=z(), ema_decay=1.5), "ema_decay must be in [0, 1], got 1.5"),
        (lambda: call(grad_scale=torch.ones(2)), "grad_scale must have one element, got 2"),
        (lambda: call(grad_scale=torch.ones(1, dtype=torch.float64)), "grad_scale must be float32"),
        (lambda: call(grad_scale=torch.ones(1, device="meta")), "grad_scale is on meta but params[0] is on cpu"),
        (lambda: call(betas=(1.0, 0.9)), "beta1 must be in [0, 1), got 1"),
        (lambda: call(lr=-1.0), "lr must be finite and >= 0, got -1"),
        (lambda: call(step=0), "step must be an int >= 1"),
    ]
    for fn, msg in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
            fn()
        assert msg in str(info.value), f"expected {msg!r} in {str(info.value)!r}"
    assert all(torch.equal(x, torch.zeros_like(x)) for x in p), "a refused call must not touch the params"


# ----------------------------------------------------------------------------------- self-check
@needs_ext
def test_self_check_accepts_the_kernel_and_catches_a_wrong_one(monkeypatch):
    from mirai.ops import adamw_ema_step as ops_adamw
    monkeypatch.setattr(_ext, "_SELF_CHECKS", {})
    real = _ext.ext()

    def checked(C):                                         # what the op asks on a CUDA device
        return _ext.self_checked("adamw_ema_step_", "cpu", lambda: ops_adamw._check_kernel(C, "cpu"))

    assert checked(real) == ""                              # the kernel agrees with the foreach formulation

    class NoDecay:                                          # a kernel that forgets the weight decay
        @staticmethod
        def adamw_ema_step_(*args):
            args = list(args)
            args[10] = 0.0
            return real.adamw_ema_step_(*args)

    assert checked(NoDecay) == ""                           # remembered per device: not run again
    monkeypatch.setattr(_ext, "_SELF_CHECKS", {})
    reason = checked(NoDecay)
    assert reason.startswith("its self-check on cpu disagreed")
    assert _ext._SELF_CHECKS == {("adamw_ema_step_", "cpu"): reason}

    class NoImage:                                          # a GPU the extension was not built for
        @staticmethod
        def adamw_ema_step_(*args):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(_ext, "_SELF_CHECKS", {})
    assert checked(NoImage) == ("its self-check on cpu raised RuntimeError: CUDA error: no kernel image is "
                                "available for execution on the device")   # a verdict: the op falls back

    class Interrupted:
        @staticmethod
        def adamw_ema_step_(*args):
            raise KeyboardInterrupt

    monkeypatch.setattr(_ext, "_SELF_CHECKS", {})
    with pytest.raises(KeyboardInterrupt):
        checked(Interrupted)
    assert _ext._SELF_CHECKS == {}                          # not a verdict: asked again next time


# ----------------------------------------------------------------------------------- fallback
def test_fallback_same_numbers_and_warns_once(monkeypatch):
    st = _State(seed=3)
    fb = st.clone()
    scale = torch.tensor([1.5])
    for step in (1, 2):
        grads = _grads(SHAPES, step, torch.bfloat16)
        adamw_ema_step_(st.params, grads, st.exp_avgs, st.exp_avg_sqs, weight_decay=0.1, step=step,
                        grad_scale=scale, ema=st.ema, ema_decay=0.95, teacher=st.teacher, **HP)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_WARNED", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for step in (1, 2):
            grads = _grads(SHAPES, step, torch.bfloat16)
            before = [x.clone() for x in grads]
            ema_in = [None if e is None else e.clone() for e in fb.ema]
            adamw_ema_step_(fb.params, grads, fb.exp_avgs, fb.exp_avg_sqs, weight_decay=0.1, step=step,
                            grad_scale=scale, ema=fb.ema, ema_decay=0.95, teacher=fb.teacher, **HP)
            assert all(torch.equal(a, b) for a, b in zip(grads, before)), "the fallback wrote the grads back"
    msgs = [str(w.message) for w in rec if "falls back" in str(w.message)]
    assert len(msgs) == 1 and "adamw_ema_step_ falls back" in msgs[0], msgs
    for i in range(len(SHAPES)):
        _close(fb.params[i], st.params[i], f"fallback params[{i}]")
        _close(fb.exp_avgs[i], st.exp_avgs[i], f"fallback exp_avgs[{i}]")
        _close(fb.exp_avg_sqs[i], st.exp_avg_sqs[i], f"fallback exp_avg_sqs[{i}]")
        if fb.ema[i] is not None:
            _close(fb.ema[i], st.ema[i], f"fallback ema[{i}]")
            # the fallback's EMA is ema_update_'s formula applied to its own new params
            ref = [ema_in[i]]
            ema_update_reference_(ref, [fb.params[i]], 0.95)
            assert torch.equal(fb.ema[i], ref[0])
        if fb.teacher[i] is not None:
            assert torch.equal(fb.teacher[i], fb.ema[i].bfloat16())


# ----------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@needs_cuda
@needs_ext
class TestCuda:
    """The CUDA kernel against the CPU kernel: the same element math, so equal bit for bit."""

    def _run(self, device, grad_dtype, scaled, steps=3):
        st = _State(device=device, seed=5)
        # denormals and zeros in the params and first grads: not flushed on either device
        st.params[4][:4] = torch.tensor([1e-39, -2e-40, 0.0, -0.0], device=device)
        scale = torch.tensor([3.0], device=device) if scaled else None
        for step in range(1, steps + 1):
            grads = _grads(SHAPES, step, grad_dtype, device)
            grads[4][:4] = torch.tensor([3e-39, 0.0, -1e-40, 5.0], device=device).to(grad_dtype)
            adamw_ema_step_(st.params, grads, st.exp_avgs, st.exp_avg_sqs, weight_decay=0.1, step=step,
                            grad_scale=scale, ema=st.ema, ema_decay=0.99, teacher=st.teacher, **HP)
        return st

    @pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("scaled", [False, True])
    def test_cuda_equals_cpu_bit_for_bit(self, grad_dtype, scaled):
        assert _ext.has_cuda(), "mirai._C was built without its CUDA kernels"
        cpu = self._run("cpu", grad_dtype, scaled)
        gpu = self._run("cuda", grad_dtype, scaled)
        assert gpu.params[MISALIGNED].data_ptr() % 16 != 0
        for name in ("params", "exp_avgs", "exp_avg_sqs", "ema", "teacher"):
            for i, (a, b) in enumerate(zip(getattr(cpu, name), getattr(gpu, name))):
                if a is None:
                    assert b is None
                    continue
                assert torch.equal(a, b.cpu()), (f"{name}[{i}]: max abs diff "
                                                 f"{(a.float() - b.cpu().float()).abs().max().item()}")

    def test_cuda_large_tensors_and_adamwema(self):
        # many tiles per tensor, mixed aligned / misaligned, through the optimizer with the EMA attached
        shapes = [(3, 70_001), (2048 * 5,), (1,), (0,), (513, 7)]
        cpu_ps = [nn.Parameter(torch.randn(s)) for s in shapes]
        gpu_ps = [nn.Parameter(p.detach().cuda()) for p in cpu_ps]
        opts, emas = [], []
        for ps in (cpu_ps, gpu_ps):
            opt = AdamWEMA([{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0}], **HP)
            ema = [p.detach().clone() for p in ps]
            teach = [e.bfloat16() for e in ema]
            opt.attach_ema(list(zip(ps, ema, teach)))
            opts.append(opt)
            emas.append((ema, teach))
        for step in range(1, 4):
            g = torch.Generator().manual_seed(step)
            grads = [torch.randn(s, generator=g) for s in shapes]
            for ps, opt in zip((cpu_ps, gpu_ps), opts):
                for p, gr in zip(ps, grads):
                    p.grad = gr.to(p.device) if not (step == 2 and p.dim() == 2) else None
                opt.grad_scale = torch.tensor(1.25, device=ps[0].device)
                opt.ema_decay = 0.9
                opt.step()
        for a, b in zip(cpu_ps, gpu_ps):
            assert torch.equal(a.detach(), b.detach().cpu())
        for (ea, ta), (eb, tb) in [(emas[0], emas[1])]:
            assert all(torch.equal(x, y.cpu()) for x, y in zip(ea, eb))
            assert all(torch.equal(x, y.cpu()) for x, y in zip(ta, tb))
