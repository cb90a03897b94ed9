"""What updates the weights, outside any engine: the fused AdamW with the model EMA in its pass, and the EMA.

    adamw_ema.py   ``AdamWEMA``: torch.optim.AdamW on the fused ``mirai.ops.adamw_ema_step_`` (optionally
                   updating the model EMA and a bf16 teacher copy in the same pass; ``optim.fuse_ema``)
    model_ema.py   ``ModelEMA``: the fp32 exponential moving average of a model's weights (``ema_update_``)

The trainer's use of both for every engine and ZeRO stage is ``mirai.trainer.ema_state.EMAState``.
"""
from mirai.optim.adamw_ema import AdamWEMA
from mirai.optim.model_ema import ModelEMA

__all__ = ["AdamWEMA", "ModelEMA"]
