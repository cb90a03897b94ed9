"""Config: YAML + base inheritance + typed --set overrides, and errors that name the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from mirai.config import Config, ConfigError, load_config, save_config, validate

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted([REPO / "configs" / "debug.yaml", *(REPO / "configs").glob("gpt-*.yaml")])   # the trainer's


def _error(cfg_or_fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        cfg_or_fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    if path.stem == "gpt-b_mirai_e_static_k9":      # needs the user's teacher checkpoint
        assert _error(validate, cfg, world_size=8, check_data=False).startswith("foresight.static_teacher_ckpt:")
        return
    world = max(1, min(8, cfg.train.global_batch // cfg.train.micro_batch))
    validate(cfg, world_size=world, check_data=False)


def test_base_inheritance_and_recipe():
    cfg = load_config(REPO / "configs" / "gpt-xxl_mirai_e.yaml")
    assert cfg.name == "gpt-xxl_mirai_e" and cfg.out_dir is None
    assert cfg.run_dir == Path("runs/gpt-xxl_mirai_e")
    assert cfg.model.name == "GPT-XXL" and cfg.foresight.layer == 32 and cfg.foresight.mode == "ema"
    o = cfg.optim
    assert (o.lr, o.betas, o.weight_decay, o.grad_clip, o.schedule) == (1e-4, (0.9, 0.95), 0.05, 1.0, "const")
    # no ZeRO stage in the shipped configs: train.backend=auto picks the engine by the memory estimate
    assert cfg.train.zero_stage is None and cfg.train.micro_batch == 16 and cfg.train.global_batch == 256
    assert load_config(REPO / "configs" / "gpt-xl_baseline.yaml").optim.schedule == "cosine"
    i = load_config(REPO / "configs" / "gpt-l_mirai_i.yaml")
    assert (i.foresight.k, i.foresight.encoder.name, i.foresight.reads_features) == (1, "dinov2_vitl14", True)
    assert load_config(REPO / "configs" / "gpt-b_mirai_i_384.yaml").model.grid_size == 24


def test_llamagen_s_is_half_of_gpt_b():
    from mirai.config import model_gpt_config
    from mirai.metrics.flops import total_params
    s = total_params(model_gpt_config(load_config(REPO / "configs" / "gpt-s_baseline.yaml").model))
    b = total_params(model_gpt_config(load_config(REPO / "configs" / "gpt-b_baseline.yaml").model))
    assert b == 110_888_448 and s == 58_196_992      # the count stated in the config's comment


def test_typed_overrides():
    cfg = load_config(REPO / "configs" / "gpt-b_mirai_e.yaml", [
        "optim.lr=2e-4", "train.micro_batch=16", "train.compile=false", "train.max_steps=none",
        "foresight.lambdas=[2, 2, 1]", "optim.betas=0.9,0.99", "foresight.encoder.block_causal=4",
        "model.dim=512", "out_dir=/tmp/x"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.micro_batch == 16 and cfg.train.compile is False and cfg.train.max_steps is None
    assert cfg.foresight.lambdas == [2.0, 2.0, 1.0] and cfg.optim.betas == (0.9, 0.99)
    assert cfg.foresight.encoder.block_causal == 4 and cfg.model.dim == 512 and cfg.run_dir == Path("/tmp/x")


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "gpt-l_mirai_i.yaml", ["train.seed=7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("override, field, words", [
    ("train.micro_bach=4", "train.micro_bach", "did you mean 'micro_batch'"),
    ("foresigt.k=3", "foresigt", "did you mean 'foresight'"),
    ("train.micro_batch=abc", "train.micro_batch", "expected int"),
    ("train.compile=maybe", "train.compile", "expected bool"),
    ("train.precision=fp16", "train.precision", "must be one of"),
    ("train.compile_scope=layer", "train.compile_scope", "must be one of"),
    ("optim.betas=0.9", "optim.betas", "expected 2 values"),
    ("train=3", "train", "is a section"),
])
def test_parse_errors_name_the_field(override, field, words):
    msg = _error(load_config, REPO / "configs" / "gpt-b_baseline.yaml", [override])
    assert msg.startswith(field + ":") and words in msg


@pytest.mark.parametrize("overrides, world, field", [
    (["foresight.mode=ema", "foresight.k=0"], 1, "foresight.k"),
    (["foresight.mode=ema", "foresight.layer=13"], 8, "foresight.layer"),
    (["train.zero_stage=4"], 8, "train.zero_stage"),
    (["train.micro_batch=48"], 8, "train.micro_batch"),
    (["train.micro_batch=32"], 3, "train.micro_batch"),
    (["model.name=GPT-Q"], 8, "model.name"),
    (["foresight.mode=encoder", f"foresight.encoder.weights={REPO / 'configs'}"], 8,
     "foresight.use_precomputed_features"),                  # online encoder: no images in a code store
    (["ema.decay=1.0"], 8, "ema.decay"),
    (["train.compile_scope=model", "train.activation_checkpointing=true"], 1, "train.compile_scope"),
])
def test_semantic_errors_name_the_field(overrides, world, field):
    cfg = load_config(REPO / "configs" / "gpt-b_baseline.yaml", overrides)
    msg = _error(validate, cfg, world_size=world, check_data=False)
    assert msg.startswith(field + ":"), msg


@pytest.mark.parametrize("key, field", [("foresight.ema_decay", "ema.decay"),
                                        ("data.features", "foresight.use_precomputed_features")])
def test_a_removed_setting_names_the_one_that_holds_it(tmp_path, key, field):
    """Each setting lives in one field; the old spelling (in a file or --set) is refused naming the new one."""
    with pytest.raises(ConfigError, match=rf"^{key}: removed: .*{field}"):
        load_config(REPO / "configs" / "gpt-b_baseline.yaml", [f"{key}=true" if "features" in key else f"{key}=0.9"])
    section, name = key.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'gpt-b_baseline.yaml'}\n{section}:\n  {name}: true\n")
    with pytest.raises(ConfigError, match=rf"^{key}: removed: .*{field}"):
        load_config(path)


def test_data_errors_name_the_field(debug_cfg, tmp_path):
    assert _error(validate, debug_cfg("data.codes=" + str(tmp_path / "nowhere"))).startswith("data.codes:")
    assert _error(validate, debug_cfg("data.codes=")).startswith("data.codes:")
    assert _error(validate, debug_cfg("model.image_size=128")).startswith("model.image_size:")   # 8x8 vs 4x4 store
    assert _error(validate, debug_cfg("model.vocab_size=32")).startswith("model.vocab_size:")
    msg = _error(validate, debug_cfg("foresight.mode=encoder", "foresight.use_precomputed_features=true"))
    assert msg.startswith("foresight.head_out:") and "32" in msg                            # 768 vs the store's 32
    validate(debug_cfg("foresight.mode=encoder", "foresight.use_precomputed_features=true", "foresight.head_out=32"))


def test_cli_refuses_bad_config_before_any_work(debug_cfg, tmp_path, capsys):
    from mirai.commands.train import main
    out = tmp_path / "never"
    rc = main(["--config", str(REPO / "configs" / "debug.yaml"), "--set", f"out_dir={out}",
               "foresight.mode=ema", "foresight.layer=3"])
    assert rc == 2 and not out.exists()
    assert "foresight.layer" in capsys.readouterr().err


@pytest.mark.parametrize("override, field", [
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.weight_decay=inf", "optim.weight_decay"),
    ("optim.grad_clip=inf", "optim.grad_clip"),
    ("optim.eps=0", "optim.eps"),
    ("optim.eps=-1e-8", "optim.eps"),
    ("foresight.lambdas=-1", "foresight.lambdas"),
    ("foresight.lambdas=[2,-0.5,1]", "foresight.lambdas"),
    ("foresight.lambdas=[2,inf,1]", "foresight.lambdas[1]"),
    ("foresight.lambda_end=-2", "foresight.lambda_end"),
    ("foresight.k=17", "foresight.k"),
    ("foresight.head_init_std=inf", "foresight.head_init_std"),
    ("train.loss_spike_factor=1", "train.loss_spike_factor"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s"),
])
def test_non_finite_and_out_of_range_values_fail_naming_the_field(override, field):
    """inf / nan pass `x > 0` style checks, a negative lambda rewards misalignment, K is documented as 1 .. 16."""
    cfg = load_config(REPO / "configs" / "gpt-b_mirai_e.yaml", [override])
    msg = _error(validate, cfg, world_size=8, check_data=False)
    assert msg.startswith(field + ":"), msg
    validate(load_config(REPO / "configs" / "gpt-b_mirai_e.yaml", ["foresight.k=16", "foresight.lambdas=0"]),
             world_size=8, check_data=False)                      # the edges of the ranges are fine


def test_yaml_duplicate_keys_fail_naming_the_file_and_key(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("base: gpt-b_baseline.yaml\noptim:\n  lr: 1.0e-4\noptim:\n  weight_decay: 0.1\n")
    msg = _error(load_config, top)
    assert msg.startswith(str(top)) and "optim: given twice (lines 2 and 4)" in msg
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  max_steps: 10\n  micro_batch: 4\n  max_steps: 20\n")
    msg = _error(load_config, nested)
    assert msg.startswith(str(nested)) and "train.max_steps: given twice (lines 2 and 4)" in msg


def test_nested_yaml_errors_keep_the_dots(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  max_step: 10\nforesight:\n  encoder:\n    nme: x\n")
    assert _error(load_config, path).startswith("train.max_step: unknown key; did you mean 'max_steps'")
    path.write_text("foresight:\n  encoder:\n    nme: x\n")
    assert _error(load_config, path).startswith("foresight.encoder.nme: unknown key")
    path.write_text("train:\n  micro_batch: lots\n")
    assert _error(load_config, path).startswith("train.micro_batch: expected int")


@pytest.mark.parametrize("override, field", [
    ("model.token_dropout_p=1.5", "model.token_dropout_p"), ("model.n_head=0", "model.n_head"),
    ("model.dim=100", "model.dim"), ("model.vocab_size=1", "model.vocab_size"),
    ("model.num_classes=0", "model.num_classes"), ("model.cls_token_num=2", "model.cls_token_num"),
    ("model.name=PAR-B model.attn_backend=flash_attn", "model.attn_backend"),
    ("model.name=PAR-B model.num_regions=9", "model.num_regions"),
])
def test_the_model_configs_own_checks_name_the_model_field(override, field):
    """One set of model checks (GPTConfig's), reported against the config field that set the value."""
    cfg = load_config(REPO / "configs" / "gpt-b_baseline.yaml", override.split())
    msg = _error(validate, cfg, world_size=1, check_data=False)
    assert msg.startswith(field + ":"), msg


def test_the_model_section_is_the_model_configs_fields():
    """ModelConfig holds GPTConfig / PARConfig fields under their names and defaults (plus the image geometry)."""
    import dataclasses
    from mirai.config.sections import ModelConfig
    from mirai.models.par import PARConfig
    model = {f.name: f.default for f in dataclasses.fields(PARConfig)}
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("name", "image_size", "downsample"):
            continue
        assert f.name in model, f"model.{f.name} is no model-config field"
        assert f.default is None or f.default == model[f.name], f"model.{f.name}: default differs from the model's"
