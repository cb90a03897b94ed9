"""Reference foresight path: heads, cosine loss vs a direct loop, objective, ablation switches,
gradients into heads and the first l layers only, sampling unaffected by heads."""
import dataclasses
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from mirai.foresight import ForesightConfig, ForesightHeads, ForesightObjective, neighbour_table
from mirai.ops.reference import foresight_cosine_loss, foresight_loss_reference


@dataclasses.dataclass
class TinyCfg:
    """Stand-in for GPTConfig where no GPT is needed."""
    dim: int = 32
    n_layer: int = 6
    block_size: int = 16
    vocab_size: int = 50

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)


def loop_loss(student, teacher, table):
    """Direct python loop: mean over valid (b, t) of -cos, per head; 0 for an empty head."""
    k_, b_, t_, _ = student.shape
    out = []
    for k in range(k_):
        terms = []
        for b in range(b_):
            for t in range(t_):
                r = int(table[k, t])
                if r < 0:
                    continue
                s, g = student[k, b, t].double(), teacher[b, r].double()
                cos = (s @ g) / (max(s.norm().item(), 1e-6) * max(g.norm().item(), 1e-6))
                terms.append(-cos)
        out.append(sum(terms) / len(terms) if terms else torch.tensor(0.0, dtype=torch.float64))
    return torch.stack([torch.as_tensor(x) for x in out])


# ------------------------------------------------------------------ heads

def test_mlp_head_parameter_count_and_stacked_layout():
    h = ForesightHeads(768, 768, k=3)
    assert sum(p.numel() for p in h.parameters()) == 3 * 7_344_896
    shapes = {n: tuple(p.shape) for n, p in h.named_parameters()}
    assert shapes == {"w1": (3, 2048, 768), "b1": (3, 2048), "w2": (3, 2048, 2048), "b2": (3, 2048),
                      "w3": (3, 768, 2048), "b3": (3, 768)}
    assert (h.k, h.in_dim, h.out_dim, h.hidden, h.kind) == (3, 768, 768, 2048, "mlp")
    assert ForesightHeads(768, 768, k=1, init_std=None).w1.abs().max() <= 1 / math.sqrt(768)   # nn.Linear bound


def test_mlp_heads_batched_equal_per_head_linear():
    torch.manual_seed(0)
    heads = ForesightHeads(24, 40, k=4, hidden=48)
    h = torch.randn(2, 9, 24)
    y = heads(h)
    assert y.shape == (4, 2, 9, 40)
    for j in range(4):
        x = F.silu(h @ heads.w1[j].T + heads.b1[j])
        x = F.silu(x @ heads.w2[j].T + heads.b2[j])
        torch.testing.assert_close(y[j], x @ heads.w3[j].T + heads.b3[j], rtol=1e-5, atol=1e-5)


def test_transformer_head_shape_and_causal():
    torch.manual_seed(0)
    heads = ForesightHeads(32, 20, k=2, kind="transformer")
    h = torch.randn(2, 10, 32)
    y = heads(h)
    assert y.shape == (2, 2, 10, 20)
    h2 = h.clone()
    h2[:, 6:] += torch.randn_like(h2[:, 6:])                    # change only positions >= 6
    y2 = heads(h2)
    torch.testing.assert_close(y[:, :, :6], y2[:, :, :6])      # earlier positions never see them
    assert not torch.allclose(y[:, :, 6:], y2[:, :, 6:])


def test_heads_reject_bad_input():
    with pytest.raises(ValueError, match="kind"):
        ForesightHeads(8, 8, 1, kind="rnn")
    with pytest.raises(ValueError, match="k"):
        ForesightHeads(8, 8, 0)
    with pytest.raises(ValueError, match=r"\[B, T, 8\]"):
        ForesightHeads(8, 8, 1, hidden=8)(torch.randn(2, 3, 9))


# ------------------------------------------------------------------ the loss

@pytest.mark.parametrize("layout,source", [("2d", "ema"), ("released", "encoder")])
def test_cosine_loss_matches_loop(layout, source):
    torch.manual_seed(1)
    k, b, t, c = 5, 3, 16, 7
    table = neighbour_table(4, k, layout, source)
    student = torch.randn(k, b, t, c)
    teacher = torch.randn(b, t, c)
    got = foresight_cosine_loss(student, teacher, table)
    assert got.dtype == torch.float32 and got.shape == (k,)
    torch.testing.assert_close(got.double(), loop_loss(student, teacher, table), rtol=1e-5, atol=1e-6)


def test_cosine_loss_masked_head_is_zero_and_bf16_runs_in_fp32():
    torch.manual_seed(2)
    student = torch.randn(2, 2, 5, 4, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    table = torch.tensor([[-1] * 5, [0, 1, 2, -1, 4]])
    loss = foresight_cosine_loss(student, teacher, table)
    assert loss.dtype == torch.float32 and loss[0].item() == 0.0
    torch.testing.assert_close(loss.double(), loop_loss(student.float(), teacher.float(), table), rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(student.grad.float()).all() and student.grad[0].abs().max() == 0
    # perfectly aligned student -> -1
    aligned = teacher.float()[:, table[1].clamp(min=0)].unsqueeze(0) * 3.0
    assert foresight_cosine_loss(aligned, teacher, table[1:]).item() == pytest.approx(-1.0, abs=1e-6)


def test_cosine_loss_zero_vectors_and_teacher_gets_no_grad():
    student = torch.zeros(1, 1, 3, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 4, requires_grad=True)
    loss = foresight_cosine_loss(student, teacher, torch.tensor([[0, 1, 2]]))
    assert loss.item() == 0.0 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()


def test_cosine_loss_bad_shapes_raise():
    s, te = torch.randn(2, 1, 4, 3), torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="table"):
        foresight_cosine_loss(s, te, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="table values"):
        foresight_cosine_loss(s, te, torch.full((2, 4), 4))
    with pytest.raises(ValueError, match="teacher"):
        foresight_cosine_loss(s, torch.randn(1, 4, 5), torch.zeros(2, 4, dtype=torch.long))


def head_alone(heads, j: int, h: torch.Tensor) -> torch.Tensor:
    """MLP head j alone, written with plain per-head linear algebra: [B, T, D] -> [B, T, C]."""
    x = F.silu(F.linear(h, heads.w1[j], heads.b1[j]))
    x = F.silu(F.linear(x, heads.w2[j], heads.b2[j]))
    return F.linear(x, heads.w3[j], heads.b3[j])


def test_loss_reference_total_and_grad_vs_loop():
    torch.manual_seed(3)
    heads = ForesightHeads(12, 6, k=3, hidden=16).double()
    h = torch.randn(2, 16, 12, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 16, 6, dtype=torch.float64)
    table = neighbour_table(4, 3, "2d", "ema")
    coeffs = [2.0, 1.0, 0.5]
    total, per_head = foresight_loss_reference(h, heads, teacher, table, coeffs)
    ref_per = loop_loss(torch.stack([head_alone(heads, j, h) for j in range(3)]), teacher, table)
    torch.testing.assert_close(per_head.double(), ref_per, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), sum(c * p for c, p in zip(coeffs, ref_per)), rtol=1e-5, atol=1e-6)
    total.backward()
    assert h.grad is not None and heads.w1.grad.abs().sum() > 0


# ------------------------------------------------------------------ objective and ablation switches

def _objective_loss(cfg, model_cfg=TinyCfg(), seed=0):
    torch.manual_seed(seed)
    obj = ForesightObjective(cfg, model_cfg)
    b, t = 2, model_cfg.block_size
    h = torch.randn(b, t, model_cfg.dim, requires_grad=True)
    teacher = torch.randn(b, t, obj.cfg.head_out)
    tokens = torch.randint(0, model_cfg.vocab_size, (b, t))
    total, per_head = obj(h, teacher, [2.0] * obj.k, tokens=tokens)
    return obj, h, total, per_head


@pytest.mark.parametrize("overrides", [
    dict(mode="ema"),                                     # Mirai-E defaults: K=3, 2d
    dict(mode="ema", layout="1d"),
    dict(mode="ema", layout="released", k=9),
    dict(mode="ema", k=1), dict(mode="ema", k=16),
    dict(mode="ema", head_kind="transformer"),
    dict(mode="ema", head_init_std=0.02),
    dict(mode="encoder", head_out=24, use_precomputed_features=True),   # Mirai-I, K=1
    dict(mode="ema", injection="output", k=2),            # multi-token prediction ablation
    dict(mode="ema", injection="output", layout="1d", k=3),
])
def test_every_ablation_switch_gives_finite_loss_with_gradient(overrides):
    cfg = ForesightConfig(backend="reference", head_hidden=64, **overrides)
    obj, h, total, per_head = _objective_loss(cfg)
    assert per_head.shape == (obj.k,) and torch.isfinite(per_head).all() and torch.isfinite(total)
    total.backward()
    assert h.grad is not None
    if cfg.injection == "internal":                       # MTP heads start at zero (like LlamaGen's output)
        assert h.grad.abs().sum() > 0
    grads = [p.grad for p in obj.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert "table" not in obj.state_dict()                # non-persistent buffer


def test_objective_matches_reference_and_table():
    cfg = ForesightConfig(mode="ema", backend="reference", layout="released", k=4, head_hidden=64)
    obj, h, total, per_head = _objective_loss(cfg)
    assert torch.equal(obj.table, neighbour_table(4, 4, "released", "ema"))
    teacher = torch.randn(2, 16, obj.cfg.head_out)
    t1, p1 = obj(h, teacher, [1.0, 2.0, 3.0, 4.0])
    t2, p2 = foresight_loss_reference(h, obj.heads, teacher, obj.table, [1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(t1, t2)


@pytest.mark.skipif(importlib.util.find_spec("mirai.ops.foresight") is None, reason="fused op not available")
def test_objective_fused_backend_matches_reference():
    cfgs = [ForesightConfig(mode="ema", k=3, head_hidden=48, backend=b) for b in ("auto", "reference")]
    results = []
    for cfg in cfgs:
        torch.manual_seed(5)
        obj = ForesightObjective(cfg, TinyCfg())
        h = torch.randn(2, 16, 32, requires_grad=True)
        total, per_head = obj(h, torch.randn(2, 16, 32), [2.0, 1.0, 0.5])
        total.backward()
        results.append((total.detach(), per_head.detach(), h.grad, obj.heads.w1.grad))
    assert cfgs[0].backend == "auto"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_mtp_loss_is_cross_entropy_on_neighbour_tokens():
    cfg = ForesightConfig(mode="ema", injection="output", layout="1d", k=2, backend="reference")
    obj = ForesightObjective(cfg, TinyCfg())
    torch.manual_seed(4)
    with torch.no_grad():
        obj.mtp_weight.normal_()
    h = torch.randn(2, 16, 32)
    tokens = torch.randint(0, 50, (2, 16))
    _, per_head = obj(h, None, [1.0, 1.0], tokens=tokens)
    for j in range(2):                                    # head j predicts x_{t+j+1} at position t
        n = 16 - (j + 1)
        logits = h[:, :n] @ obj.mtp_weight[j].T
        ref = F.cross_entropy(logits.reshape(-1, 50), tokens[:, j + 1:].reshape(-1))
        torch.testing.assert_close(per_head[j], ref, rtol=1e-5, atol=1e-5)
    assert not obj.needs_teacher and obj.hidden_layers == ()


def test_warmup_gates_the_term_but_keeps_heads_in_graph():
    cfg = ForesightConfig(mode="ema", backend="reference", warmup_epochs=2)
    obj = ForesightObjective(cfg, TinyCfg())
    coeffs = obj.coefficients(step=10, total_steps=100, epoch=1)
    assert coeffs == [0.0, 0.0, 0.0] and not obj.active(coeffs)
    h = torch.randn(2, 16, 32, requires_grad=True)
    total, per_head = obj(h, None, coeffs)               # no teacher needed during warm-up
    assert total.item() == 0.0 and per_head.tolist() == [0.0, 0.0, 0.0]
    total.backward()
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in obj.parameters())
    on = obj.coefficients(step=20, total_steps=100, epoch=2)
    assert on == [2.0, 2.0, 2.0] and obj.active(on)


def test_objective_requires_teacher_and_enabled_mode():
    with pytest.raises(ValueError, match="mode"):
        ForesightObjective(ForesightConfig(mode="none"), TinyCfg())
    obj = ForesightObjective(ForesightConfig(mode="ema", backend="reference"), TinyCfg())
    with pytest.raises(ValueError, match="teacher"):
        obj(torch.randn(1, 16, 32), None, [1.0, 1.0, 1.0])


# ------------------------------------------------------------------ with the real GPT

needs_gpt = pytest.mark.skipif(importlib.util.find_spec("mirai.models.gpt") is None,
                               reason="mirai.models.gpt not available")


def _tiny_gpt(**kw):
    from mirai.models import gpt
    torch.manual_seed(0)
    return gpt.build_gpt("GPT-debug", vocab_size=64, num_classes=10, block_size=16, n_layer=4, **kw)


@needs_gpt
def test_gradients_flow_into_heads_and_first_l_layers_only():
    from mirai.foresight import EMATeacher
    model = _tiny_gpt()
    cfg = ForesightConfig(mode="ema", layer=2, backend="reference", head_hidden=64)
    obj = ForesightObjective(cfg, model.config)
    teacher = EMATeacher(model, obj.cfg.teacher_layer)
    codes = torch.randint(0, 64, (3, 16))
    labels = torch.randint(0, 10, (3,))
    idx, _ = model.prepare_inputs(codes)
    out = model(idx, labels, hidden_layers=obj.hidden_layers)
    total, per_head = obj(obj.select_hidden(out), teacher.targets(idx, labels), [2.0, 2.0, 2.0])
    assert torch.isfinite(total)
    total.backward()
    for name, p in model.named_parameters():
        g = p.grad
        flows = g is not None and g.abs().sum() > 0
        in_first = name.startswith(("layers.0.", "layers.1.", "tok_embeddings", "cls_embedding"))
        assert flows == in_first, name
    assert all(p.grad is not None for p in obj.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


@needs_gpt
def test_sampling_identical_with_and_without_heads():
    model = _tiny_gpt()
    labels = torch.tensor([1, 2])
    keys_before = set(model.state_dict())
    g = torch.Generator().manual_seed(7)
    plain = model.generate(labels, cfg_scale=2.0, generator=g)
    # attach heads the way the trainer does: a wrapper module holding the GPT and the objective
    wrapper = torch.nn.ModuleDict(dict(model=model, foresight=ForesightObjective(
        ForesightConfig(mode="ema", layer=2, backend="reference", head_hidden=64), model.config)))
    out = wrapper["model"](model.prepare_inputs(torch.randint(0, 64, (2, 16)))[0], labels,
                           hidden_layers=wrapper["foresight"].hidden_layers)
    wrapper["foresight"](wrapper["foresight"].select_hidden(out), torch.randn(2, 16, 64), [1.0] * 3)
    assert set(model.state_dict()) == keys_before       # heads are not part of the GPT
    g = torch.Generator().manual_seed(7)
    with_heads = wrapper["model"].generate(labels, cfg_scale=2.0, generator=g)
    assert torch.equal(plain, with_heads)


@needs_gpt
def test_par_model_uses_its_position_to_cell_mapping():
    from mirai.foresight import EMATeacher
    from mirai.models.gpt import build_gpt
    torch.manual_seed(0)
    par = build_gpt("PAR-debug", vocab_size=64, num_classes=10, block_size=16)
    inp, tgt = par.position_to_cell("input"), par.position_to_cell("target")
    obj = ForesightObjective(ForesightConfig(mode="ema", layer=1, backend="reference", head_hidden=32),
                             par.config, input_cells=inp, output_cells=tgt)
    assert torch.equal(obj.table, neighbour_table(4, 3, "2d", "ema", input_cells=inp))
    held = inp >= 0
    assert torch.equal(obj.table[0, held], torch.nonzero(held).flatten())   # offset (0,0): the same position
    teacher = EMATeacher(par, 1)
    assert "transition_tokens" in teacher.teacher_names                     # subclass parameters come along
    idx, targets = par.prepare_inputs(torch.randint(0, 64, (2, 16)))
    labels = torch.tensor([1, 2])
    out = par(idx, labels, targets=targets, hidden_layers=obj.hidden_layers)
    total, per_head = obj(obj.select_hidden(out), teacher.targets(idx, labels), [1.0] * 3)
    assert torch.isfinite(total) and per_head.shape == (3,)
