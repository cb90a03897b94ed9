"""The foresight source interface: a new source is one class plus its registration, and trains through the real
``build_run`` / ``StepRunner`` path; the registry names the field when a mode is unknown; a source is built once."""
from __future__ import annotations

import math

import pytest
import torch

from mirai.config import ConfigError, load_config, validate
from mirai.foresight.sources import ForesightSource, SourceMode, register, unregister
from mirai.metrics.flops import training_flops_per_image

from conftest import DEBUG_YAML, debug_overrides

WIDTH = 8          # the test source's target channels C


class CodeEmbeddingSource(ForesightSource):
    """Test-only source: a fixed random embedding of each grid cell's code, [B, T, WIDTH], raster cells. It also
    asks the loader for the sample indices (a batch key the model does not read) and records what it saw."""

    batch_keys = ("index",)

    def __init__(self, vocab_size: int):
        self.table = torch.randn(vocab_size, WIDTH, generator=torch.Generator().manual_seed(0))
        self.calls, self.keys = 0, set()

    def to(self, device):
        self.table = self.table.to(device)
        return self

    def targets_for(self, batch, model):
        self.calls += 1
        self.keys |= set(batch)
        return self.table[batch["codes"]]                     # [B, T, C]: row t = grid cell t

    def flops(self, gpt_config, cfg):
        b = training_flops_per_image(gpt_config, "none", layer=1)
        b.heads = 0.5 * b.backbone                           # a made-up cost the logs must show
        return b

    @classmethod
    def frozen_params(cls, cfg, model):
        return model.config.vocab_size * WIDTH               # the table, as the memory estimate must count it


BUILT: list[CodeEmbeddingSource] = []


def _build(cfg, model, codes):
    BUILT.append(CodeEmbeddingSource(model.config.vocab_size))
    return BUILT[-1]


@pytest.fixture
def code_embedding_mode():
    register(SourceMode("code_embedding", build=_build, default_k=2, default_warmup_epochs=0,
                        table_source="encoder", target_width=lambda cfg, model_cfg: WIDTH,
                        source_type=lambda cfg: CodeEmbeddingSource))
    BUILT.clear()
    yield
    unregister("code_embedding")


def test_a_test_only_source_trains_through_build_run(code_embedding_mode, code_store, tmp_path):
    from mirai.trainer.run import build_run, train
    cfg = load_config(DEBUG_YAML, debug_overrides(code_store, tmp_path / "run") +
                      ["train.backend=single", "foresight.mode=code_embedding", "train.max_steps=2",
                       "train.log_every=1", "train.ckpt_every=2"])
    validate(cfg)
    res = train(cfg)
    (source,) = BUILT
    assert source.calls == 2 * 2 and {"codes", "labels", "index"} <= source.keys    # 2 steps x 2 micro-batches
    assert len(res.metrics) == 2
    for rec in res.metrics:
        assert len(rec["head_loss"]) == 2 and rec["lambdas"] == [2.0, 2.0]        # K = the mode's default
        assert all(math.isfinite(h) and -1.0 <= h < 1.0 and h != 0.0 for h in rec["head_loss"])
        assert rec["tflops_per_gpu"] == pytest.approx(1.5 * rec["backbone_tflops_per_gpu"])   # the source's FLOPs
    run = build_run(cfg)                                      # the objective: heads of the source's width,
    obj = run.engine.module.objective                         # a neighbour table over grid cells
    assert obj.heads.out_dim == WIDTH and obj.k == 2
    assert bool((obj.table[:, 0] == -1).all())                # "encoder" rows: the class position has no target


def test_an_unknown_mode_names_the_field_and_the_registered_modes(code_embedding_mode, code_store, tmp_path):
    cfg = load_config(DEBUG_YAML, debug_overrides(code_store, tmp_path / "run") + ["foresight.mode=embedding"])
    with pytest.raises(ConfigError, match=r"^foresight.mode: must be one of \(.*'ema'.*'code_embedding'\)"):
        validate(cfg)


def test_precomputed_features_are_built_once(debug_cfg, monkeypatch):
    """Mode encoder with stored features: one PrecomputedFeatures, checked against the store when built."""
    from mirai.foresight.sources import PrecomputedFeatures
    from mirai.trainer.run import build_run
    made = []
    real = PrecomputedFeatures.__init__

    def counting(self, *args, **kwargs):
        made.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(PrecomputedFeatures, "__init__", counting)
    run = build_run(debug_cfg("foresight.mode=encoder", "foresight.use_precomputed_features=true",
                              "foresight.head_out=32"))
    assert made == [run.source] and run.source.dim == 32 and run.source.batch_keys == ("features",)


def test_what_a_run_needs_is_asked_of_the_source_class_before_it_is_built(code_embedding_mode, code_store, tmp_path):
    """The memory estimate counts the frozen parameters the source's class reports, and config validation reads
    the class's batch keys, without building the source (nothing is built, not even on the meta device)."""
    from mirai.foresight.sources import EMATeacher, NoTargets, PrecomputedFeatures, source_type
    from mirai.foresight.encoders import EncoderTeacher
    from mirai.trainer.engine.memory import model_sizes
    cfg = load_config(DEBUG_YAML, debug_overrides(code_store, tmp_path / "run") + ["foresight.mode=code_embedding"])
    sizes = model_sizes(cfg)
    assert BUILT == [] and sizes.teacher_params == cfg.model.vocab_size * WIDTH
    assert not cfg.foresight.reads_features
    f = load_config(DEBUG_YAML, ["foresight.mode=encoder", "foresight.use_precomputed_features=true"]).foresight
    assert source_type(f) is PrecomputedFeatures and f.reads_features
    f = load_config(DEBUG_YAML, ["foresight.mode=encoder", "foresight.encoder.weights=x"]).foresight
    assert source_type(f) is EncoderTeacher and not f.reads_features
    assert source_type(load_config(DEBUG_YAML, ["foresight.mode=ema"]).foresight) is EMATeacher
    assert source_type(load_config(DEBUG_YAML, ["foresight.mode=none"]).foresight) is NoTargets
    assert source_type(load_config(DEBUG_YAML, ["foresight.mode=ema", "foresight.injection=output"]).foresight) \
        is NoTargets


def test_mirai_e_frozen_parameters_are_the_teachers_own():
    """EMATeacher.frozen_params (asked on the meta device) equals the parameter count of a built teacher."""
    from mirai.foresight.config import ForesightConfig
    from mirai.foresight.sources import EMATeacher
    from mirai.models.gpt import build_gpt
    gpt = build_gpt("GPT-debug")
    f = ForesightConfig(mode="ema").resolve(gpt.config)
    built = EMATeacher(gpt, f.teacher_layer or f.layer)
    with torch.device("meta"):
        meta_gpt = build_gpt("GPT-debug")
    assert EMATeacher.frozen_params(f, meta_gpt) == sum(p.numel() for p in built.parameters())
