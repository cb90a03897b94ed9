"""The one registry of foresight sources, keyed by ``foresight.mode``.

    register(SourceMode("mine", build=..., default_k=1, default_warmup_epochs=0, table_source="encoder",
                        target_width=lambda cfg, model_cfg: 64, source_type=lambda cfg: MySource))
    source_mode("ema").default_k                   # 3
    build_source(cfg, model, codes="data/codes")   # the run's ForesightSource (NoTargets for none / output)
    source_type(cfg).batch_keys                    # what it will read, asked before it is built

The built-in modes register themselves when ``mirai.foresight.sources`` is imported: "none", "ema"
(``sources/ema.py``) and "encoder" (``sources/encoder.py``: precomputed features or the online encoder).
"""
from __future__ import annotations

from mirai.foresight.sources.protocol import ForesightSource, NoTargets, SourceMode

_MODES: dict[str, SourceMode] = {}


def register(mode: SourceMode, replace: bool = False) -> SourceMode:
    """Add a mode (ValueError if the name is taken, unless ``replace``)."""
    if mode.table_source not in ("ema", "encoder"):
        raise ValueError(f"foresight source {mode.name!r}: table_source must be 'ema' or 'encoder', "
                         f"got {mode.table_source!r}")
    if mode.name in _MODES and not replace:
        raise ValueError(f"foresight source {mode.name!r} is already registered")
    _MODES[mode.name] = mode
    return mode


def unregister(name: str) -> None:
    """Remove a mode (tests that register their own)."""
    _MODES.pop(name, None)


def mode_names() -> tuple[str, ...]:
    return tuple(_MODES)


def source_mode(name: str) -> SourceMode:
    """The registration of ``foresight.mode`` = name; ValueError naming the field otherwise."""
    if name not in _MODES:
        raise ValueError(f"foresight.mode: must be one of {mode_names()}, got {name!r}")
    return _MODES[name]


def default_k(mode: str) -> int:
    """K of ``mode`` when ``foresight.k`` is null (3 for ema, 1 for encoder)."""
    return source_mode(mode).default_k


def build_source(cfg, model, codes: str | None = None) -> ForesightSource:
    """The target source of a RESOLVED ``ForesightConfig``: its mode's ``build``, or ``NoTargets`` (mode
    "none", or injection "output", which needs no teacher). Built once; move it with ``.to(device)``."""
    if not cfg.enabled or cfg.injection == "output":
        return NoTargets()
    return source_mode(cfg.mode).build(cfg, model, codes)


def source_type(cfg) -> type[ForesightSource]:
    """The class ``build_source`` returns for ``cfg`` (resolved or not), without building it."""
    if not cfg.enabled or cfg.injection == "output":
        return NoTargets
    return source_mode(cfg.mode).source_type(cfg)


def _no_build(cfg, model, codes):
    return NoTargets()


# "none" builds no heads; its default K only sizes the check of foresight.lambdas (as for "ema")
register(SourceMode("none", build=_no_build, default_k=3, default_warmup_epochs=15, table_source="ema",
                    target_width=lambda cfg, model_cfg: int(model_cfg.dim), source_type=lambda cfg: NoTargets))
