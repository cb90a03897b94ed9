"""Mirai foresight alignment (reference PyTorch path), usable on its own in any AR codebase.

    neighbour_table(grid_size, k, layout="2d", source="ema") -> LongTensor[k, T]   (neighbours.py)
    ForesightHeads(in_dim, out_dim, k, hidden=2048, kind="mlp")                    (heads.py)
    ForesightConfig, EncoderConfig                                                  (config.py)
    coefficients(cfg, step, total_steps, epoch) -> list[float]                      (schedules.py)
    ForesightSource, SourceMode, register, build_source, default_k                  (sources/: the interface and
    EMATeacher, PrecomputedFeatures                                                  the registry by foresight.mode)
    EncoderTeacher, ENCODERS                                                        (encoders.py, timm imported lazily)
    ForesightObjective                                                              (objective.py)

The loss itself: ``mirai.ops.reference.foresight_cosine_loss`` / ``foresight_loss_reference``
(ground truth) and ``mirai.ops.foresight.foresight_loss`` (fused kernel).
"""
from mirai.foresight.config import EncoderConfig, ForesightConfig
from mirai.foresight.encoders import ENCODERS, EncoderTeacher
from mirai.foresight.heads import ForesightHeads
from mirai.foresight.neighbours import neighbour_table, offsets_2d, target_cells
from mirai.foresight.objective import ForesightObjective, mtp_table
from mirai.foresight.schedules import coefficients
from mirai.foresight.sources import (EMATeacher, ForesightSource, PrecomputedFeatures, SourceMode, build_source,
                                     default_k, register)

__all__ = [
    "ENCODERS", "EMATeacher", "EncoderConfig", "EncoderTeacher", "ForesightConfig", "ForesightHeads",
    "ForesightObjective", "ForesightSource", "PrecomputedFeatures", "SourceMode", "build_source", "coefficients",
    "default_k", "mtp_table", "neighbour_table", "offsets_2d", "register", "target_cells",
]
