"""Single-process training on CPU: exact resume, Mirai-E warm-up, EMA formula, loader determinism."""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mirai import _ext
from mirai.checkpoint import read_latest
from mirai.io.torch_files import load_file

DEBUG_YAML = Path(__file__).resolve().parent.parent / "configs" / "debug.yaml"

# Mirai-E on GPT-debug, dropout on (tests RNG restore), fp32, single process, 8 steps per epoch
MIRAI_E = ["train.backend=single", "foresight.mode=ema", "foresight.warmup_epochs=0",
           "ema.decay=0.9", "train.log_every=1"]


def _cfg(store: Path, out: Path, *extra: str):
    from mirai.config import load_config, validate
    cfg = load_config(DEBUG_YAML, [f"data.codes={store}", f"out_dir={out}", "train.progress=false",
                                   "train.tensorboard=false", *extra])
    validate(cfg)
    return cfg


def _train(store: Path, out: Path, *extra: str):
    from mirai.trainer.run import train
    return train(_cfg(store, out, *extra))


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's model, heads, EMA and engine state, by a flat name."""
    out = {}
    model = load_file(ckpt / "model.pt")
    out.update({f"model.{k}": v for k, v in model["model"].items()})
    out.update({f"heads.{k}": v for k, v in (model["heads"] or {}).items()})
    out.update({f"ema.{k}": v for k, v in load_file(ckpt / "ema.pt")["ema"].items()})
    state = load_file(ckpt / "engine" / "state.pt")
    out.update({f"engine.{k}": v for k, v in state["module"].items()})
    for pid, st in state["optimizer"]["state"].items():
        out.update({f"adam.{pid}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.fixture(scope="module")
def finished_run(code_store, tmp_path_factory):
    """Mirai-E, 6 uninterrupted steps, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = _train(code_store, out, *MIRAI_E, "train.max_steps=6", "train.ckpt_every=3")
    return result


def test_resume_is_bit_identical(finished_run, code_store, tmp_path):
    out = tmp_path / "resumed"
    first = _train(code_store, out, *MIRAI_E, "train.max_steps=6", "train.ckpt_every=3", "train.stop_at=3")
    assert first.step == 3 and read_latest(out).name == "step_00000003"
    # resume in a fresh config (worker processes now: the data order must not depend on them)
    second = _train(code_store, out, *MIRAI_E, "train.max_steps=6", "train.ckpt_every=3", "data.num_workers=2")
    assert [m["step"] for m in second.metrics] == [4, 5, 6]
    ref = {m["step"]: m for m in finished_run.metrics}
    for m in first.metrics + second.metrics:
        for key in ("loss", "ntp_loss", "head_loss", "lambdas", "lr", "grad_norm"):
            assert m[key] == ref[m["step"]][key], (m["step"], key)
    a, b = _tensors(finished_run.checkpoint), _tensors(second.checkpoint)
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics file of the resumed run continues where the first part stopped
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]


def test_warmup_switches_on_after_warmup_epochs(code_store, tmp_path):
    # 64 images / global batch 8 = 8 steps per epoch: steps 1..8 are epoch 0 (warm-up), step 9 is epoch 1
    res = _train(code_store, tmp_path / "warm", "train.backend=single", "foresight.mode=ema",
                 "foresight.warmup_epochs=1", "train.log_every=1",
                 "train.max_steps=10", "train.ckpt_every=100")
    by_step = {m["step"]: m for m in res.metrics}
    for s in range(1, 9):
        assert by_step[s]["lambdas"] == [0.0, 0.0, 0.0] and by_step[s]["head_loss"] == [0.0, 0.0, 0.0]
        assert by_step[s]["loss"] == by_step[s]["ntp_loss"]
    for s in (9, 10):
        assert by_step[s]["epoch"] == 1 and by_step[s]["lambdas"] == [2.0, 2.0, 2.0]
        assert all(h != 0.0 for h in by_step[s]["head_loss"])
        assert by_step[s]["loss"] != by_step[s]["ntp_loss"]


@pytest.mark.parametrize("target_dtype", ["fp32", "bf16"])
def test_ema_follows_the_formula_and_drives_the_teacher(code_store, tmp_path, target_dtype):
    from mirai.trainer.run import build_run
    decay = 0.9
    run = build_run(_cfg(code_store, tmp_path / "ema", "train.backend=single", "foresight.mode=ema",
                         "foresight.warmup_epochs=0", f"ema.decay={decay}",
                         f"foresight.target_dtype={target_dtype}"))
    params = lambda: {n: p.detach().clone() for n, p in run.gpt.named_parameters()}  # noqa: E731
    expected = params()                                          # EMA at step 0 = the initial weights
    run.loader.start(0)
    it = iter(run.loader)
    for step in range(3):
        run.runner.run(step, 0, [next(it) for _ in range(run.accum)])
        now = params()
        expected = {n: decay * expected[n] + (1 - decay) * now[n] for n in now}
        assert not torch.equal(now["layers.0.attention.wqkv.weight"], expected["layers.0.attention.wqkv.weight"])
    for n, e in expected.items():
        torch.testing.assert_close(run.ema_state.shadow[n], e, rtol=1e-6, atol=1e-7, msg=n)
    teacher = dict(run.source.module.named_parameters())
    for n in run.source.teacher_names:
        if target_dtype == "fp32":                              # the fp32 teacher IS the EMA (shared storage)
            assert teacher[n].data_ptr() == run.ema_state.shadow[n].data_ptr(), n
            continue
        assert teacher[n].dtype == torch.bfloat16, n
        assert torch.equal(teacher[n], run.ema_state.shadow[n].to(torch.bfloat16)), n


def test_fused_optimizer_ema_matches_separate_passes(code_store, tmp_path):
    """optim.fuse_ema: AdamW + clip + EMA + teacher copy in one pass give the weights, moments, EMA and teacher
    of torch's AdamW followed by the separate EMA pass (with the clip active)."""
    from mirai.optim import AdamWEMA
    from mirai.trainer.run import build_run
    common = ["train.backend=single", "foresight.mode=ema", "foresight.warmup_epochs=0",
              "ema.decay=0.9", "optim.grad_clip=0.05", "foresight.target_dtype=bf16"]   # bf16: the pass writes it
    runs = {}
    for fused in (False, True):
        run = build_run(_cfg(code_store, tmp_path / f"fused_{fused}", *common, f"optim.fuse_ema={str(fused).lower()}"))
        assert isinstance(run.engine.optimizer, AdamWEMA) == fused
        assert run.ema_state.fused == fused
        run.loader.start(0)
        it = iter(run.loader)
        for step in range(3):
            run.runner.run(step, 0, [next(it) for _ in range(run.accum)])
        assert run.engine.grad_norm() > 0.05          # the clip was active on the last step
        runs[fused] = run
    ref, got = runs[False], runs[True]
    assert got.ema_state.ema.num_updates == ref.ema_state.ema.num_updates == 3
    for (n, a), b in zip(ref.engine.module.named_parameters(), got.engine.module.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    for n, a in ref.ema_state.shadow.items():
        torch.testing.assert_close(got.ema_state.shadow[n], a, rtol=1e-5, atol=1e-6, msg=n)
    sa, sb = ref.engine.optimizer.state_dict()["state"], got.engine.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[pid][key], sa[pid][key], rtol=1e-4, atol=1e-9, msg=f"{pid}.{key}")
    teacher = dict(got.source.module.named_parameters())
    for n in got.source.teacher_names:
        assert torch.equal(teacher[n], got.ema_state.shadow[n].to(torch.bfloat16)), n
    got.ema_state.before_step(3)              # an EMA booked without the optimizer step that applies it
    with pytest.raises(RuntimeError, match="did not apply the EMA of step 3"):
        got.ema_state.update(3)


def test_fused_optimizer_ema_resume_is_bit_identical(code_store, tmp_path):
    extra = [*MIRAI_E, "optim.fuse_ema=true", "train.max_steps=4", "train.ckpt_every=2"]
    whole = _train(code_store, tmp_path / "whole", *extra)
    _train(code_store, tmp_path / "parts", *extra, "train.stop_at=2")
    parts = _train(code_store, tmp_path / "parts", *extra)
    assert [m["step"] for m in parts.metrics] == [3, 4]
    a, b = _tensors(whole.checkpoint), _tensors(parts.checkpoint)
    assert a.keys() == b.keys() and any(k.startswith("adam.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_switching_fuse_ema_keeps_each_optimizer_itself(code_store, tmp_path):
    """A checkpoint of the fused optimizer resumes under torch's AdamW (and the run continues as the fused one
    would, within rounding); the loaded state does not change how the new optimizer steps."""
    base = [*MIRAI_E, "train.max_steps=3", "train.ckpt_every=2"]
    _train(code_store, tmp_path / "switched", *base, "optim.fuse_ema=true", "train.stop_at=2")
    switched = _train(code_store, tmp_path / "switched", *base, "optim.fuse_ema=false")
    whole = _train(code_store, tmp_path / "whole", *base, "optim.fuse_ema=true")
    assert [m["step"] for m in switched.metrics] == [3]
    assert switched.metrics[0]["loss"] == whole.metrics[-1]["loss"]       # same weights after step 2
    groups = load_file(switched.checkpoint / "engine" / "state.pt")["optimizer"]["param_groups"]
    assert all(g["foreach"] is True for g in groups)                     # torch's CPU AdamW, as configured
    a, b = _tensors(whole.checkpoint), _tensors(switched.checkpoint)
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.skipif(not _ext.has_op("ce_softmax_grad_"), reason="mirai._C lacks ce_softmax_grad_")
def test_ce_backend_fused_trains_as_the_reference_pass(code_store, tmp_path, monkeypatch):
    """train.ce_backend=fused (the C++ row pass on the CPU) gives the losses and weights of the PyTorch pass."""
    from mirai.config import ConfigError
    real, calls = _ext.ext(), []

    class Spy:                                                  # counts the row-pass kernel's calls
        def __getattr__(self, name):
            if name == "ce_softmax_grad_":
                calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(_ext, "ext", lambda: Spy())
    runs, used = {}, {}
    for b in ("fused", "reference"):
        calls.clear()
        runs[b] = _train(code_store, tmp_path / b, *MIRAI_E, "train.max_steps=2", "train.ckpt_every=2",
                         f"train.ce_backend={b}")
        used[b] = len(calls)
    assert used["fused"] > 0 and used["reference"] == 0
    for a, b in zip(runs["fused"].metrics, runs["reference"].metrics):
        assert abs(a["ntp_loss"] - b["ntp_loss"]) <= 1e-5 * abs(b["ntp_loss"]), (a["step"], a["ntp_loss"], b["ntp_loss"])
    ta, tb = _tensors(runs["fused"].checkpoint), _tensors(runs["reference"].checkpoint)
    for k in ta:
        if k.startswith("model."):
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6, msg=k)
    with pytest.raises(ConfigError, match="train.ce_backend"):
        _cfg(code_store, tmp_path / "bad", "train.ce_backend=cuda")


def test_loader_shards_cover_the_global_batch_and_resume_mid_epoch(code_store):
    from mirai.data.loader import Shard, TrainLoader

    def micro_batches(shard, start, n, workers=0):
        loader = TrainLoader(str(code_store), shard, seed=3, num_workers=workers)
        loader.start(start)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    single = micro_batches(Shard(0, 1, 4, 2), start=0, n=2 * 10)           # 10 steps of 2 micro-batches
    ranks = [micro_batches(Shard(r, 2, 4, 1), start=0, n=10) for r in range(2)]
    for step in range(10):
        want = sorted(torch.cat([b["index"] * 10 + b["aug"] for b in single[2 * step:2 * step + 2]]).tolist())
        got = sorted(torch.cat([ranks[r][step]["index"] * 10 + ranks[r][step]["aug"] for r in range(2)]).tolist())
        assert want == got
    assert len(set(torch.cat([b["index"] for b in single[:16]]).tolist())) == 64      # epoch 0 = a permutation
    assert not torch.equal(single[0]["index"], single[16]["index"])                   # epoch 1 reshuffled
    resumed = micro_batches(Shard(0, 1, 4, 2), start=7, n=6, workers=2)               # crosses the epoch end
    for a, b in zip(resumed, single[14:20]):
        assert all(torch.equal(a[k], b[k]) for k in ("codes", "labels", "index", "aug"))


def test_crash_during_save_keeps_the_previous_latest(code_store, tmp_path, monkeypatch):
    import mirai.checkpoint.training as ckpt_mod
    from mirai.trainer.run import train
    out = tmp_path / "crash"
    args = ("train.backend=single", "train.max_steps=4", "train.ckpt_every=1", "train.keep_last=2")
    real_save = ckpt_mod.save_file

    def failing_save(obj, path):
        if Path(path).name == "ema.pt" and "step_00000004" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        train(_cfg(code_store, out, *args))
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)
    assert read_latest(out).name == "step_00000003"
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000003"]     # one process: the partial step 4 is removed
    res = train(_cfg(code_store, out, *args))                                        # resumes from step 3
    assert [m["step"] for m in res.metrics] == [4] and read_latest(out).name == "step_00000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_model_scope_compile_matches_eager(code_store, tmp_path):
    """train.compile with compile_scope=model compiles the whole TrainModule (and the Mirai-E teacher) in
    place, not the blocks, and trains to the same losses as eager mode (fp32, dropout off)."""
    from mirai.trainer.run import build_run
    from mirai.trainer.engine import compile_scope
    common = ["train.backend=single", "foresight.mode=ema", "foresight.warmup_epochs=0", "train.max_steps=2",
              "model.token_dropout_p=0", "model.resid_dropout_p=0", "model.ffn_dropout_p=0",
              "model.class_dropout_prob=0", "ema.decay=0.9"]
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        cfg = _cfg(code_store, tmp_path / f"c{compiled}", *common, f"train.compile={str(compiled).lower()}",
                   "train.compile_scope=model")
        run = build_run(cfg)
        if compiled:
            assert compile_scope(cfg, run.runtime) == "model"
            assert run.engine.module._compiled_call_impl is not None           # the whole module
            assert run.source.module._compiled_call_impl is not None           # the teacher
            assert all(b._compiled_call_impl is None for b in run.gpt.layers)  # not per block
            assert "layers.0.attention.wqkv.weight" in run.gpt.state_dict()   # names unchanged
        run.loader.start(0)
        it = iter(run.loader)
        out = []
        for step in range(2):
            run.runner.run(step, 0, [next(it) for _ in range(run.accum)])
            out.append(run.runner.meter.read())
        losses[compiled] = out
    for eager, comp in zip(losses[False], losses[True]):
        assert abs(eager["loss"] - comp["loss"]) <= 1e-4 * abs(eager["loss"]), (eager, comp)
        # the teacher runs in bf16 (eager and compiled round differently): cosines agree to ~1e-4
        assert eager["head_loss"] == pytest.approx(comp["head_loss"], abs=3e-4)
        assert max(abs(x) for x in eager["head_loss"]) > 3e-3                   # not a comparison of zeros


def test_compile_scope_resolution():
    from types import SimpleNamespace as NS

    from mirai.config import TrainConfig
    from mirai.trainer.engine import compile_scope

    def scope(world=1, backend="single", stage=2, ckpt=False, asked="auto"):
        cfg = NS(train=TrainConfig(compile_scope=asked, zero_stage=stage, activation_checkpointing=ckpt))
        return compile_scope(cfg, NS(world_size=world, backend=backend))

    assert scope() == "model"                                       # one process: one graph
    assert scope(backend="deepspeed") == "model"                    # ZeRO-2 on one rank too
    assert scope(world=8, backend="deepspeed") == "model"           # reductions after the backward
    assert scope(world=8, backend="ddp", asked="blocks") == "blocks"  # ... unless asked to overlap them
    assert scope(backend="deepspeed", stage=3) == "blocks"          # ZeRO-3 gathers per module
    assert scope(ckpt=True) == "blocks"                             # per-block recompute
    assert scope(backend="deepspeed", stage=3, asked="model") == "model"  # an explicit choice wins


def test_auto_backend_is_single_process_on_one_rank():
    from mirai.trainer.distributed import resolve_backend
    assert resolve_backend("auto", torch.device("cpu"), 1) == "single"
    with pytest.raises(RuntimeError, match="train.backend: 'single' with WORLD_SIZE=2"):
        resolve_backend("single", torch.device("cpu"), 2)


def test_clip_inside_fused_adamw_matches_clip_grad_norm():
    """The plain engine hands a fused AdamW 1 / clip_coef as its grad_scale instead of scaling the gradients
    itself: each step must match clip_grad_norm_ followed by the same AdamW, from the same state."""
    from mirai.models.gpt import build_gpt
    from mirai.trainer.distributed import Runtime
    from mirai.trainer.engine import PlainEngine, TrainModule, param_groups

    runtime = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="single")
    no_dropout = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.0)
    gpt = lambda: build_gpt("GPT-debug", vocab_size=64, num_classes=10, block_size=16, **no_dropout)  # noqa: E731
    torch.manual_seed(0)
    proto = TrainModule(gpt())

    def engine(fused: bool) -> PlainEngine:
        module = TrainModule(gpt())
        module.load_state_dict(proto.state_dict())
        opt = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-2, fused=fused, foreach=not fused)
        return PlainEngine(module, opt, runtime, accum=1, grad_clip=0.1, precision="fp32")

    folded, separate = engine(True), engine(True)
    assert folded.clip_in_optimizer and not engine(False).clip_in_optimizer   # foreach AdamW: clip_grad_norm_
    separate.clip_in_optimizer = False                                       # the same fused AdamW, clipped first
    codes = torch.randint(0, 64, (3, 16))
    labels = torch.randint(0, 10, (3,))
    for _ in range(3):
        norms = []
        for e in (folded, separate):
            e.micro_step(codes, labels)
            norms.append(e.grad_norm())
        assert norms[0] > 2 * 0.1                      # the clip is active: the factor is below 1/2
        assert norms[0] == pytest.approx(norms[1], rel=1e-6)
        # Adam amplifies last-bit differences of tiny gradients over steps: compare this step's moments and
        # weights (same state in, so they agree to rounding), then continue both from the folded state
        state_a, state_b = folded.optimizer.state, separate.optimizer.state
        for (name, p), q in zip(folded.module.named_parameters(), separate.module.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
            for key in ("exp_avg", "exp_avg_sq"):
                a, b = state_a[p][key], state_b[q][key]
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item(), msg=f"{name} {key}")
        separate.module.load_state_dict(folded.module.state_dict())
        separate.optimizer.load_state_dict(copy.deepcopy(folded.optimizer.state_dict()))  # no shared tensors
    moved = max((p - p0).abs().max().item() for p, p0 in zip(folded.module.parameters(), proto.parameters()))
    assert moved > 1e-3                               # the steps did move the weights


class _HostReadCounter:
    """Records where this project's code reads a tensor value back to the host (``.item()``, ``.tolist()``,
    ``bool(t)``, ``float(t)``, ...): on CUDA each one waits for the device. Reads made inside torch itself are
    not counted: on the CPU its foreach AdamW reads its step counters, which its fused CUDA AdamW does not."""

    METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
    # (file, function) that read CPU-resident bookkeeping by design: AdamWEMA keeps its step counters on the CPU
    # (as torch's non-fused AdamW does) and reads them once per group to bucket params by step count.
    CPU_BOOKKEEPING = {("optim.py", "step")}

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.METHODS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, real))

    def _wrap(self, name, real):
        torch_dir = str(Path(torch.__file__).parent)

        def counted(t, *args, **kwargs):
            caller = sys._getframe(1)
            where = (Path(caller.f_code.co_filename).name, caller.f_code.co_name)
            bookkeeping = where in self.CPU_BOOKKEEPING and t.device.type == "cpu"
            if not caller.f_code.co_filename.startswith(torch_dir) and not bookkeeping:
                self.calls.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return real(t, *args, **kwargs)
        return counted


STEP_MODES = [   # the training steps checked here, on GPT-debug, single process
    pytest.param(("train.backend=single",), id="baseline"),
    pytest.param(MIRAI_E, id="mirai_e"),
    pytest.param((*MIRAI_E, "optim.fuse_ema=true"), id="mirai_e_fused_ema"),
    pytest.param(("train.backend=single", "foresight.mode=encoder", "foresight.head_out=32",
                  "foresight.use_precomputed_features=true"), id="mirai_i_features"),
]


def _run_with_batches(store: Path, out: Path, *extra: str):
    """A built run (not started) and 4 optimizer steps' micro-batches from its loader."""
    from mirai.trainer.run import build_run
    run = build_run(_cfg(store, out, *extra, "train.max_steps=8"))
    run.loader.start(0)
    it = iter(run.loader)
    return run, [[next(it) for _ in range(run.accum)] for _ in range(4)]


@pytest.mark.parametrize("extra", STEP_MODES)
def test_training_step_reads_nothing_back_to_the_host(code_store, tmp_path, monkeypatch, extra):
    """Between log steps the training step never reads a tensor value on the host (no .item(),
    .tolist(), bool(t), float(t), ...), so on a GPU it queues work without waiting. The first two steps may
    (one-time kernel self-checks); steps 3 and 4 must not."""
    run, batches = _run_with_batches(code_store, tmp_path / "run", *extra)
    for step in (0, 1):
        run.runner.run(step, 0, batches[step])
    counter = _HostReadCounter(monkeypatch)
    for step in (2, 3):
        run.runner.run(step, 0, batches[step])
    monkeypatch.undo()
    assert counter.calls == [], f"host reads in the training step: {counter.calls}"
    # the counter itself works: reading the meter on a log step is a host read
    counter = _HostReadCounter(monkeypatch)
    logged = run.runner.meter.read()
    monkeypatch.undo()
    assert counter.calls and logged["loss"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", STEP_MODES)
def test_training_step_on_cuda_never_waits_for_the_gpu(code_store, tmp_path, extra):
    """The same steps on a GPU in bf16 under torch's sync-debug mode "error": any operation that makes the
    host wait for the device (a value read, a pageable copy, nonzero, ...) raises."""
    run, batches = _run_with_batches(code_store, tmp_path / "run", *extra, "train.device=cuda",
                                     "train.precision=bf16", "data.pin_memory=true")
    for step in (0, 1):
        run.runner.run(step, 0, batches[step])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (2, 3):
            run.runner.run(step, 0, batches[step])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    logged = run.runner.meter.read()
    assert logged["loss"] > 0 and all(math.isfinite(v) for v in [logged["loss"], *logged["head_loss"]])
