"""Foresight target sources: where the teacher tensor [B, S, C] of the loss comes from.

One interface (``protocol.py``: ``ForesightSource``, what the trainer asks of a source; ``SourceMode``, what
a ``foresight.mode`` registers) and one registry (``registry.py``), keyed by ``foresight.mode``:

=========  =================================================  ====================================
mode       source (file)                                      batch keys / table rows
=========  =================================================  ====================================
none       ``NoTargets`` (protocol.py; also injection output)  — / —
ema        ``EMATeacher`` (ema.py)                             codes, labels / sequence positions
encoder    ``PrecomputedFeatures`` (features.py) or the        features or images / grid cells
           online ``EncoderTeacher`` (encoder.py)
=========  =================================================  ====================================

A new source is one file: a ``ForesightSource`` and a ``register(SourceMode(...))`` call, imported here (or
by the caller before the config is validated).
"""
from mirai.foresight.sources.protocol import TARGET_DTYPES, ForesightSource, NoTargets, SourceMode
from mirai.foresight.sources.registry import (build_source, default_k, mode_names, register, source_mode, source_type,
                                              unregister)
from mirai.foresight.sources.ema import EMATeacher
from mirai.foresight.sources.features import PrecomputedFeatures
from mirai.foresight.sources import encoder as _encoder  # noqa: F401  (registers mode "encoder")

__all__ = ["TARGET_DTYPES", "EMATeacher", "ForesightSource", "NoTargets", "PrecomputedFeatures", "SourceMode",
           "build_source", "default_k", "mode_names", "register", "source_mode", "source_type", "unregister"]
