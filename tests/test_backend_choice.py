"""train.backend=auto chooses the engine by the per-rank memory estimate (mirai.trainer.engine.memory), says why at
start-up, and always obeys an explicit backend or ZeRO stage. Device memory is faked: no GPU needed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mirai.config import ConfigError, load_config
from mirai.trainer.engine.memory import (HEADROOM, block_activation_bytes, choose_engine, device_memory, engine_planner,
                                  model_sizes)

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def shipped(model: str, *overrides: str):
    """The shipped config of a model (GPT-3B has none: GPT-XXL's recipe, micro-batch 16, on the 3B model)."""
    if model == "GPT-3B":
        return load_config(REPO / "configs" / "gpt-xxl_baseline.yaml", ["model.name=GPT-3B", *overrides])
    return load_config(REPO / "configs" / f"{model.lower()}_baseline.yaml", list(overrides))


@pytest.mark.parametrize("model, card_gb, engine", [
    ("GPT-B", 40, ("ddp", None)), ("GPT-B", 80, ("ddp", None)),                # a replica fits anywhere
    ("GPT-XXL", 40, ("deepspeed", 1)), ("GPT-XXL", 80, ("ddp", None)),         # ~49 GB replica
    ("GPT-3B", 40, ("deepspeed", 3)), ("GPT-3B", 80, ("deepspeed", 1)),        # ~88 GB replica
])
def test_auto_picks_ddp_when_a_replica_fits_else_the_lowest_zero_stage(model, card_gb, engine):
    cfg = shipped(model)
    assert cfg.train.backend == "auto" and cfg.train.zero_stage is None            # what users get
    choice = choose_engine(cfg, world_size=8, device_memory=card_gb * GB)
    assert (choice.backend, choice.zero_stage) == engine
    assert choice.estimate.total <= HEADROOM * card_gb * GB                        # the chosen engine fits
    if choice.backend == "deepspeed":                                              # ... and nothing lighter did
        lighter = choose_engine(shipped(model, "train.backend=ddp"), 8, card_gb * GB).estimate
        assert lighter.total > HEADROOM * card_gb * GB
        if choice.zero_stage > 1:
            below = choose_engine(shipped(model, f"train.zero_stage={choice.zero_stage - 1}"), 8, card_gb * GB)
            assert below.estimate.total > HEADROOM * card_gb * GB
    line = choice.line()                                                           # what start-up prints
    assert line.startswith(f"engine {choice.backend}") and f"of {HEADROOM * card_gb:.1f} GB usable" in line


def test_explicit_backend_and_stage_are_obeyed():
    big = 40 * GB
    assert choose_engine(shipped("GPT-3B", "train.backend=ddp"), 8, big).backend == "ddp"    # even if it won't fit
    explicit = choose_engine(shipped("GPT-B", "train.backend=deepspeed", "train.zero_stage=2"), 8, big)
    assert (explicit.backend, explicit.zero_stage) == ("deepspeed", 2)
    asked = choose_engine(shipped("GPT-B", "train.zero_stage=0"), 8, big)      # auto + a stage: DeepSpeed at it
    assert (asked.backend, asked.zero_stage) == ("deepspeed", 0)
    lowest = choose_engine(shipped("GPT-B", "train.backend=deepspeed"), 8, big)   # no stage: lowest that fits
    assert (lowest.backend, lowest.zero_stage) == ("deepspeed", 1)
    one = choose_engine(shipped("GPT-3B"), 1, big)                              # one rank: the plain engine
    assert (one.backend, one.zero_stage) == ("single", None)


def test_without_a_memory_figure_auto_uses_ddp_and_the_cpu_figure_is_shared_ram():
    choice = choose_engine(shipped("GPT-3B"), 8, None)
    assert choice.backend == "ddp" and "no device memory figure" in choice.line()
    ram = device_memory(torch.device("cpu"), 1)
    assert ram is not None and ram > 1e8
    assert device_memory(torch.device("cpu"), 4) == pytest.approx(ram / 4)     # ranks on one host share it


def test_zero3_by_estimate_refuses_the_whole_model_compile_scope():
    with pytest.raises(ConfigError, match="train.compile_scope"):
        choose_engine(shipped("GPT-3B", "train.compile_scope=model"), 8, 40 * GB)
    assert choose_engine(shipped("GPT-3B"), 8, 40 * GB).zero_stage == 3        # compile_scope auto: blocks


def test_an_explicit_zero3_refuses_the_whole_model_compile_scope():
    with pytest.raises(ConfigError, match="train.compile_scope: 'model' cannot run under DeepSpeed ZeRO-3"):
        choose_engine(shipped("GPT-B", "train.compile_scope=model", "train.zero_stage=3"), 8, 80 * GB)
    for backend in ("single", "ddp"):       # the other engines compile the whole model whatever the stage says
        choice = choose_engine(shipped("GPT-B", "train.compile_scope=model", f"train.backend={backend}"), 8, 80 * GB)
        assert choice.backend == backend


def test_model_sizes_match_the_built_modules():
    """The counts the estimate reads (from modules on the meta device) are those of the real GPT, heads and
    Mirai-E teacher."""
    from mirai.foresight.objective import ForesightObjective
    from mirai.foresight.sources import EMATeacher
    from mirai.models.gpt import build_gpt
    cfg = load_config(REPO / "configs" / "debug.yaml", ["foresight.mode=ema", "model.n_layer=3", "foresight.layer=2"])
    sizes = model_sizes(cfg)
    gpt = build_gpt(cfg.model.name, **cfg.model.gpt_overrides())
    objective = ForesightObjective(cfg.foresight, gpt.config, input_cells=gpt.position_to_cell("input"),
                                   output_cells=gpt.position_to_cell("target"))
    count = lambda m: sum(p.numel() for p in m.parameters())                      # noqa: E731
    assert sizes.gpt_params == count(gpt) and sizes.params == count(gpt) + count(objective)
    assert sizes.teacher_params == count(EMATeacher(gpt, 2)) and sizes.block_params == count(gpt.layers[0])
    assert (sizes.dim, sizes.n_layer, sizes.head_out) == (64, 3, 64)


def test_online_encoder_counts_as_teacher_weights(tmp_path):
    """Mirai-I with the encoder run online holds its bf16 weights (DINOv2 ViT-B/14: 86.6M parameters);
    with precomputed features there is no encoder."""
    (tmp_path / "dinov2_vitb14.pth").touch()                   # counted on the meta device, never read
    online = model_sizes(load_config(REPO / "configs" / "gpt-b_mirai_i.yaml",
                                     ["foresight.use_precomputed_features=false",
                                      f"foresight.encoder.weights={tmp_path / 'dinov2_vitb14.pth'}"]))
    assert 86e6 < online.teacher_params < 87.5e6
    assert model_sizes(load_config(REPO / "configs" / "gpt-b_mirai_i.yaml")).teacher_params == 0


def test_activation_checkpointing_shrinks_the_estimate():
    full = choose_engine(shipped("GPT-XXL"), 8, 80 * GB).estimate
    ckpt = choose_engine(shipped("GPT-XXL", "train.activation_checkpointing=true"), 8, 80 * GB).estimate
    assert ckpt.parts["activations"] < full.parts["activations"] / 5 and ckpt.parts["states"] == full.parts["states"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_block_activation_formula_matches_what_autograd_saves(precision, dropout):
    """The per-block term of the estimate against the bytes of every tensor a GPT block saves for its
    backward (saved-tensor hooks; two blocks minus one; the autocast copies of its weights excluded)."""
    from mirai.models.gpt import build_gpt

    def saved(n_layer: int) -> tuple[int, int]:
        torch.manual_seed(0)
        gpt = build_gpt("GPT-B", n_layer=n_layer, dim=128, n_head=4, block_size=64, vocab_size=64, num_classes=10,
                        resid_dropout_p=dropout, ffn_dropout_p=dropout, token_dropout_p=dropout).train()
        params = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
        kept: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        idx, targets = gpt.prepare_inputs(torch.randint(0, 64, (2, 64)))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            gpt(idx, torch.randint(0, 10, (2,)), targets=targets)
        casts = 2 * sum(m.weight.numel() for m in gpt.layers[0].modules() if isinstance(m, torch.nn.Linear))
        return sum(kept.values()), (casts if precision == "bf16" else 0)

    (one, _), (two, casts) = saved(1), saved(2)
    per_token = (two - one - casts) / (2 * 64)
    cfg = load_config(REPO / "configs" / "debug.yaml", ["model.dim=128", "model.n_head=4", "model.image_size=128",
                                                        f"model.resid_dropout_p={dropout}",
                                                        f"model.ffn_dropout_p={dropout}"])
    assert per_token == pytest.approx(block_activation_bytes(model_sizes(cfg), precision == "bf16"), rel=0.01)


def test_start_up_line_names_the_engine_and_the_estimate(debug_cfg, capsys):
    from mirai.trainer.run import train
    train(debug_cfg("train.max_steps=1"))
    out = capsys.readouterr()
    line = next(ln for ln in (out.out + out.err).splitlines() if ln.startswith("mirai train: "))
    assert "| engine single (auto: one rank; estimate " in line and "GB usable per rank)" in line


def test_setup_runs_what_the_planner_chose(monkeypatch):
    """setup() takes the backend and stage from the planner under auto, and from the config otherwise."""
    from mirai.trainer import distributed
    from mirai.trainer.engine import memory
    monkeypatch.setattr(memory, "device_memory", lambda device, local: 40 * GB)
    choice = engine_planner(shipped("GPT-XXL"))(torch.device("cpu"), 8, 8)
    assert (choice.backend, choice.zero_stage) == ("deepspeed", 1)
    assert distributed.resolve_backend("auto", torch.device("cpu"), 8, chosen="ddp") == "ddp"
    assert distributed.resolve_backend("auto", torch.device("cpu"), 8) == "ddp"        # no planner: DDP
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    rt = distributed.setup("auto", "cpu", planner=engine_planner(shipped("GPT-B")))
    assert (rt.backend, rt.zero_stage) == ("single", None) and rt.engine_note.startswith("engine single (auto: one")


_RESUME_OLD_ZERO2 = """
import json, sys
from pathlib import Path
import mirai.trainer.engine.build as engine   # build_engine reads deepspeed_config from here
from mirai.config import load_config
from mirai.trainer.run import train
store, out = sys.argv[1], Path(sys.argv[2])
over = [f"data.codes={store}", f"out_dir={out}", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
        "train.backend=deepspeed", "train.zero_stage=2", "train.max_steps=4", "train.ckpt_every=2"]
own = engine.deepspeed_config
def deepspeed_clips(cfg, world_size, overlap=False):     # the config before the norm moved out of DeepSpeed
    ds = own(cfg, world_size, overlap)
    ds["gradient_clipping"] = float(cfg.optim.grad_clip)
    ds["zero_optimization"].pop("compute_grad_norm")
    return ds
engine.deepspeed_config = deepspeed_clips
train(load_config("configs/debug.yaml", over + ["train.stop_at=2"]))
engine.deepspeed_config = own
result = train(load_config("configs/debug.yaml", over))  # resumes at step 2 under the current config
print("RESUMED", json.dumps([m["grad_norm"] for m in result.metrics]))
"""


@pytest.mark.slow
def test_zero2_resumes_a_checkpoint_written_while_deepspeed_clipped(code_store, tmp_path):
    """A ZeRO-1/2 checkpoint saved when DeepSpeed computed the norm and clipped (its saved clip > 0) loads
    into the engine that now does both itself, which then steps with its own norm."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", _RESUME_OLD_ZERO2, str(code_store), str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    norms = __import__("json").loads(proc.stdout.split("RESUMED ", 1)[1].splitlines()[0])
    assert len(norms) == 2 and all(n is not None and n > 0 for n in norms)          # steps 3 and 4, own norm


def test_the_estimate_of_a_small_model_is_shown_in_megabytes():
    from mirai.trainer.engine.memory import GB, Estimate
    small = Estimate("plain", {"states": 3.2e6, "activations": 1.1e6})
    assert small.describe() == f"{4.3e6 / (GB / 1024):.1f} MB (states {3.2e6 / (GB / 1024):.1f}, " \
                               f"activations {1.1e6 / (GB / 1024):.1f})"
    assert Estimate("plain", {"states": 8.5 * GB, "ema": 0.01 * GB}).describe() == "8.5 GB (states 8.5)"
