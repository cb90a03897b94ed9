"""Mode "encoder" (Mirai-I): a frozen bidirectional encoder's patch features, from one of two sources:

* ``foresight.use_precomputed_features=true``: ``PrecomputedFeatures`` (``sources/features.py``), read from the
  code store ``data.codes`` (checked against its ``meta.json`` once, when built);
* otherwise the encoder run online on each sample's crop: ``mirai.foresight.encoders.EncoderTeacher`` (batch key
  "images", from ``data.images``), compiled as one graph under ``train.compile``.

Both give rows in raster cell order (``table_source`` "encoder"), K = 1 and no warm-up by default, and heads
as wide as the encoder.
"""
from __future__ import annotations

from mirai.foresight.sources.features import PrecomputedFeatures
from mirai.foresight.sources.protocol import TARGET_DTYPES, ForesightSource, SourceMode
from mirai.foresight.sources.registry import register


def encoder_flops(gpt_config, cfg, count_encoder: bool):
    """FLOPs per image of mode "encoder": heads, plus the encoder's forward when ``count_encoder`` (an encoder
    the FLOP counter does not know: the heads only)."""
    from mirai.metrics.flops import training_flops_per_image
    kw = dict(k=cfg.k, layer=cfg.layer, head_hidden=cfg.head_hidden, head_out=cfg.head_out)
    try:
        return training_flops_per_image(gpt_config, "encoder", encoder=cfg.encoder.name,
                                        count_encoder=count_encoder, **kw)
    except KeyError:  # encoder unknown to the FLOP counter: count heads only
        return training_flops_per_image(gpt_config, "encoder", **kw)


def _build(cfg, model, codes: str | None = None) -> ForesightSource:
    grid = model.config.grid_size
    dtype = TARGET_DTYPES[cfg.target_dtype]
    if cfg.use_precomputed_features:
        if codes is None:
            return PrecomputedFeatures(grid, cfg.head_out, cfg.encoder.name, dtype=dtype)
        from mirai.data.format import CodeStore
        return PrecomputedFeatures.from_store(CodeStore(codes), grid, cfg.encoder.name, dtype=dtype)
    from mirai.foresight.encoders import EncoderTeacher
    return EncoderTeacher(cfg.encoder.name, cfg.encoder.weights, grid, image_size=cfg.encoder.image_size,
                          block_causal=cfg.encoder.block_causal, dtype=dtype)


def _width(cfg, model_cfg) -> int:
    from mirai.foresight.config import encoder_dim
    return encoder_dim(cfg.encoder.name)


def _type(cfg) -> type[ForesightSource]:
    if cfg.use_precomputed_features:
        return PrecomputedFeatures
    from mirai.foresight.encoders import EncoderTeacher
    return EncoderTeacher


register(SourceMode("encoder", build=_build, default_k=1, default_warmup_epochs=0, table_source="encoder",
                    target_width=_width, source_type=_type))
