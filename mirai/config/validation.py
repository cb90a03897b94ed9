"""Checking a run config before any work: cross-field rules, the model it builds, the data it reads.

    validate(cfg, world_size=8)          # raises ConfigError naming the first offending field

``validate`` checks every section's ranges, that every float is finite, the model registry entry and its
overrides (``model_gpt_config``), PAR's regions, the foresight section against the model
(``validate_foresight``: K, the layer within the depth, the teacher sources) and, unless ``check_data=False``,
the code store (``validate_data``: it exists, is finished, matches the model, every code and label in range).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path

from mirai.config.loading import ConfigError
from mirai.config.sections import Config, ModelConfig


def model_gpt_config(model: ModelConfig):
    """The GPTConfig (or PAR config) of the configured model; no module is built. The model's own checks
    (``GPTConfig`` / ``PARConfig``) are the checks of the model section: their errors become ConfigErrors naming
    the ``model.*`` field (``block_size`` is ``model.image_size`` / ``model.downsample`` squared)."""
    from mirai.models.gpt import GPT_models, gpt_config
    from mirai.models.par import PAR_models
    known = list(GPT_models) + list(PAR_models)
    try:
        if model.name.startswith("PAR-"):
            from mirai.models.par import par_config
            return par_config(model.name, **model.gpt_overrides())
        if model.name in GPT_models:
            return gpt_config(model.name, **model.gpt_overrides())
    except KeyError as err:
        raise ConfigError(f"model.name: {err}") from err
    except ValueError as err:
        raise ConfigError(f"{_model_field(str(err))}: {err}") from err
    except TypeError as err:
        raise ConfigError(f"model: {model.name} does not accept these settings ({err})") from err
    close = difflib.get_close_matches(model.name, known, n=3, cutoff=0.4)
    raise ConfigError(f"model.name: unknown model {model.name!r}; known: {', '.join(known)}"
                      + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))


def _model_field(message: str) -> str:
    """The ``model.*`` field a GPTConfig / PARConfig error message (``GPTConfig.<field>...``) is about."""
    match = re.match(r"(?:GPT|PAR)Config\.(\w+)", message)
    name = match.group(1) if match else ""
    if name == "block_size":
        return "model.image_size"
    return f"model.{name}" if name in {f.name for f in dataclasses.fields(ModelConfig)} else "model"


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {message}")


def _float_fields(obj, prefix: str = ""):
    """(dotted name, value) of every float in a config, list entries included (``foresight.lambdas[1]``)."""
    for f in dataclasses.fields(obj):
        value, where = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{where}.")
        elif isinstance(value, float):
            yield where, value
        elif isinstance(value, (list, tuple)):
            yield from ((f"{where}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float))


def validate(cfg: Config, world_size: int = 1, check_data: bool = True, scan_features: bool = False) -> None:
    """Cross-field checks; raises ConfigError naming the first offending field. ``check_data``: the code store
    too (``validate_data``; ``scan_features``: every stored feature as well, see there)."""
    m, t, o, d, e = cfg.model, cfg.train, cfg.optim, cfg.data, cfg.ema
    _check(bool(cfg.name), "name", "must not be empty")
    for where, value in _float_fields(cfg):                     # inf / nan pass every `x > 0` style check
        _check(math.isfinite(value), where, f"must be a finite number, got {value}")
    # model: the tokenizer geometry here; every other check is the model config's own (model_gpt_config)
    _check(m.downsample >= 1, "model.downsample", f"must be >= 1, got {m.downsample}")
    _check(m.image_size % m.downsample == 0 and m.image_size >= m.downsample, "model.image_size",
           f"{m.image_size} is not a positive multiple of model.downsample={m.downsample}")
    validate_regions(m)
    gpt_config = model_gpt_config(m)
    # train
    _check(t.global_batch >= 1, "train.global_batch", f"must be >= 1, got {t.global_batch}")
    _check(t.micro_batch >= 1, "train.micro_batch", f"must be >= 1, got {t.micro_batch}")
    _check(t.global_batch % (t.micro_batch * world_size) == 0, "train.micro_batch",
           f"micro_batch {t.micro_batch} x world size {world_size} = {t.micro_batch * world_size} "
           f"does not divide train.global_batch {t.global_batch}")
    _check(t.epochs >= 1 or t.max_steps is not None, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    _check(t.stop_at is None or t.stop_at >= 1, "train.stop_at", f"must be >= 1, got {t.stop_at}")
    _check(t.zero_stage is None or 0 <= t.zero_stage <= 3, "train.zero_stage",
           f"must be 0, 1, 2 or 3 (or null: chosen by the memory estimate), got {t.zero_stage}")
    # (the engine refuses 'model' where it gathers parameters per module: mirai.trainer.engine.choose_engine)
    _check(not (t.compile_scope == "model" and t.activation_checkpointing), "train.compile_scope",
           "'model' cannot be combined with train.activation_checkpointing (per-block recompute); use 'blocks' "
           "or 'auto'")
    _check(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _check(t.ckpt_every >= 1, "train.ckpt_every", f"must be >= 1, got {t.ckpt_every}")
    _check(t.keep_last >= 1, "train.keep_last", f"must be >= 1, got {t.keep_last}")
    _check(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", f"must be > 0, got {t.peak_flops}")
    _check(t.loss_spike_factor is None or t.loss_spike_factor > 1, "train.loss_spike_factor",
           f"must be > 1 (e.g. 3.0) or null (off), got {t.loss_spike_factor}")
    _check(t.collective_timeout_s > 0, "train.collective_timeout_s", f"must be > 0, got {t.collective_timeout_s}")
    if t.resume not in ("auto", "none"):
        _check(Path(t.resume).exists(), "train.resume", f"checkpoint folder {t.resume} does not exist")
    # optim
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", f"each must be in [0, 1), got {o.betas}")
    _check(o.eps > 0, "optim.eps", f"must be > 0 (Adam divides by sqrt(v) + eps), got {o.eps}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {o.grad_clip}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    # ema
    _check(0.0 <= e.decay < 1.0, "ema.decay", f"must be in [0, 1), got {e.decay}")
    # data
    _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(d.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {d.prefetch_factor}")
    # foresight
    validate_foresight(cfg, gpt_config)
    if check_data:
        validate_data(cfg, scan_features=scan_features)


def validate_regions(m: ModelConfig) -> None:
    """``model.num_regions`` is for PAR models only (its values are PARConfig's to check)."""
    _check(m.num_regions is None or m.is_par, "model.num_regions", f"only PAR-* models are split into regions; "
           f"{m.name} is not one (use e.g. model.name=PAR-B, or leave num_regions null)")


def validate_foresight(cfg: Config, gpt_config) -> None:
    """Foresight fields against the model (K, layer within depth, teacher sources, data)."""
    f = cfg.foresight
    try:
        f.validate(gpt_config)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not f.enabled:
        return
    if f.mode == "ema" and f.injection == "internal":
        _check(f.head_out is None or f.head_out == gpt_config.dim, "foresight.head_out",
               f"{f.head_out}, but the Mirai-E teacher (the model's own first blocks) outputs the model width "
               f"{gpt_config.dim}; leave it null")
    if f.mode == "ema" and f.injection == "internal" and f.teacher == "online":
        _check(cfg.ema.enabled, "ema.enabled", "Mirai-E's online teacher is the model EMA (decay ema.decay); "
               "it must be enabled")
    from mirai.foresight.sources import source_type
    if "images" in source_type(f).batch_keys:                 # a source that reads each sample's image crop
        _check(cfg.data.images, "foresight.use_precomputed_features",
               "Mirai-I needs either precomputed encoder features (foresight.use_precomputed_features=true, a "
               "store prepared with --encoder) or the images the store was prepared from "
               "(data.images=FOLDER, the encoder then runs online on each sample's crop)")


def validate_data(cfg: Config, scan_features: bool = False) -> None:
    """The code store exists, is finished and matches the model, and every code and label in it is in range
    (a full memory-mapped scan). The features (Mirai-I, foresight.use_precomputed_features) are checked for NaN / Inf per batch
    by the loader, and all at once here with ``scan_features`` (``mirai train --check``): a features file
    can be terabytes."""
    d, m = cfg.data, cfg.model
    _check(bool(d.codes), "data.codes", "no code store folder given (set data.codes=PATH from `mirai prepare`)")
    _check(Path(d.codes).is_dir(), "data.codes", f"folder {d.codes} does not exist (run `mirai prepare` first)")
    from mirai.data.format import CodeStore, CodeStoreError
    try:
        store = CodeStore(d.codes)
    except CodeStoreError as err:
        raise ConfigError(f"data.codes: {err}") from err
    meta = store.meta
    _check(store.grid_size == m.grid_size, "model.image_size",
           f"{m.image_size} px / {m.downsample} gives a {m.grid_size}x{m.grid_size} grid but the store "
           f"{d.codes} holds {store.grid_size}x{store.grid_size} codes")
    _check(int(meta.get("vocab_size", m.vocab_size)) <= m.vocab_size, "model.vocab_size",
           f"{m.vocab_size} is smaller than the store's vocab_size {meta.get('vocab_size')}")
    _check(int(meta.get("num_classes", m.num_classes)) <= m.num_classes, "model.num_classes",
           f"{m.num_classes} is smaller than the store's num_classes {meta.get('num_classes')}")
    try:
        store.check(m.vocab_size, m.num_classes, features=scan_features and cfg.foresight.reads_features)
    except CodeStoreError as err:
        raise ConfigError(f"data.codes: {err}") from None
    _check(len(store) >= cfg.train.global_batch, "train.global_batch",
           f"{cfg.train.global_batch} is larger than the store's {len(store)} images")
    if cfg.foresight.reads_features:
        _check(store.features is not None, "foresight.use_precomputed_features",
               f"true but the store {d.codes} has no features.npy (prepare it with --encoder)")
        feats = meta["features"]
        _check(int(feats["grid_size"]) == m.grid_size, "foresight.use_precomputed_features",
               f"the store's features lie on a {feats['grid_size']}x{feats['grid_size']} patch grid, the token grid "
               f"is {m.grid_size}x{m.grid_size}")
        f = cfg.foresight
        _check(feats.get("name") in (None, "features", f.encoder.name), "foresight.encoder.name",
               f"{f.encoder.name!r} but the store {d.codes} holds features of {feats.get('name')!r}")
        from mirai.foresight.config import encoder_dim
        try:
            width = f.head_out if f.head_out is not None else encoder_dim(f.encoder.name)
        except ValueError:
            width = None
        _check(width is None or width == int(feats["dim"]), "foresight.head_out",
               f"the heads would output {width} channels ({'set' if f.head_out else f'width of {f.encoder.name}'}) "
               f"but the store's features have {feats['dim']}")
        stored = int(meta.get("encoder_block_causal", 0) or 0)
        _check(stored == f.encoder.block_causal, "foresight.encoder.block_causal",
               f"{f.encoder.block_causal} but the store's features were computed with block_causal={stored} "
               f"(prepare them with --encoder-block-causal {f.encoder.block_causal}, or run the encoder "
               "online with data.images)")
    if d.images is not None:
        from mirai.data.store_images import ImageSourceError, StoreImages
        try:
            StoreImages(d.images, store).check()
        except ImageSourceError as err:
            raise ConfigError(str(err)) from err
