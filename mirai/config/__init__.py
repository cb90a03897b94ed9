"""Training configuration: typed nested dataclasses, YAML files, dotted ``--set`` overrides, validation.

    cfg = load_config("configs/gpt-b_mirai_e.yaml", ["train.micro_batch=16", "foresight.k=9"])
    validate(cfg, world_size=8)          # raises ConfigError naming the field, before any work
    save_config(cfg, run_dir / "config.yaml")

    sections.py     the dataclasses (Config and its sections), one docstring line per field
    loading.py      YAML files with ``base:`` inheritance, ``--set`` overrides, typed conversion, save_config
    validation.py   cross-field checks against the model and the data

The foresight section is ``mirai.foresight.config.ForesightConfig`` (owned by the foresight code); this
package nests it and validates it together with the model it is attached to.
"""
from mirai.config.loading import CONFIG_DIR, ConfigError, load_config, parse_overrides, read_yaml, save_config
from mirai.config.sections import Config, DataConfig, EMAConfig, ModelConfig, OptimConfig, TrainConfig
from mirai.config.validation import (model_gpt_config, validate, validate_data, validate_foresight,
                                     validate_regions)

__all__ = [
    "CONFIG_DIR", "Config", "ConfigError", "DataConfig", "EMAConfig", "ModelConfig", "OptimConfig", "TrainConfig",
    "load_config", "model_gpt_config", "parse_overrides", "read_yaml", "save_config", "validate", "validate_data",
    "validate_foresight", "validate_regions",
]
