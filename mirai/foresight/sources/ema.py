"""Mode "ema" (Mirai-E): the EMA teacher, a ``ForesightSource`` (``sources/protocol.py``).

* ``EMATeacher``: the first ``layer`` blocks (+ embeddings) of the AR model itself,
  a separate module in eval mode (no dropout, no class dropout) with requires_grad False, run on
  the same tokens under no_grad and bf16 autocast: ``targets(idx, cond_idx) -> [B, T, D]`` (S = T,
  the teacher's own sequence positions; ``neighbour_table(source="ema")`` indexes it). Its weights
  and targets are in the ``foresight.target_dtype`` (fp32 by default, or bf16).
  Online mode: its parameters carry the same names as the model's (``tok_embeddings.weight``,
  ``layers.0.attention.wqkv.weight``, ...), so ``mirai.optim.ModelEMA.attach_teacher(teacher.module,
  prefix_map)`` keeps them equal to the EMA (fp32: they share the EMA's storage; bf16: the fused
  EMA pass writes them): the teacher at step t+1 is the EMA after step t, with no state-dict copies.
  It starts as a copy of the model's weights (EMA at step 0).
  Static mode (``static_ckpt``): frozen weights read once from a checkpoint (its EMA weights, else
  the raw ones; any source ``mirai.checkpoint.read_weights`` reads: a run or checkpoint folder, an
  exported file, a LlamaGen / Mirai-Code training file, a bare state dict; weights-only loading, NaN /
  Inf refused); never attach it to the EMA.
``targets_for(batch, model)`` runs it on ``model.prepare_inputs(batch["codes"])`` and ``batch["labels"]``;
under ``train.compile`` it is compiled like the model (one graph, or block by block); its FLOPs are the
teacher's forward through ``teacher_layer`` blocks plus the heads (``mirai.metrics.flops``, mode "ema").

The teacher is not a module of the DeepSpeed engine: the trainer keeps it outside it, so it is
never cast, partitioned or optimised. Build the EMATeacher from the UNWRAPPED model before the
engine exists (under ZeRO-3 the engine's parameters are partitioned).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from mirai.foresight.sources.protocol import TARGET_DTYPES, ForesightSource, SourceMode
from mirai.foresight.sources.registry import register


class EMATeacher(nn.Module, ForesightSource):
    """Eval-mode, frozen copy of the first ``layer`` blocks (+ embeddings) of a GPT.

    Args:
        model: the (unwrapped) ``mirai.models.gpt.Transformer`` being trained.
        layer: number of blocks of the teacher (its output is the residual stream after block ``layer``).
        static_ckpt: checkpoint file of a static teacher; None = online (weights copied from ``model``).
        dtype: the weights' and the targets' dtype (``foresight.target_dtype``): bf16 or fp32. The pass
            runs under bf16 autocast either way (bf16 matmuls; with fp32 weights the residual stream
            stays fp32, with bf16 weights it is bf16).
    """

    def __init__(self, model: nn.Module, layer: int, static_ckpt: str | Path | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        cfg = model.config
        if not 1 <= layer <= cfg.n_layer:
            raise ValueError(f"foresight.teacher_layer: must lie in 1 .. {cfg.n_layer}, got {layer}")
        self.layer, self.dtype, self.static = int(layer), dtype, static_ckpt is not None
        # Same class, only `layer` blocks. fork_rng: building it must not move the global RNG
        # (a Mirai run and a baseline with one seed see the same data order and dropout masks).
        with torch.random.fork_rng(devices=[]):
            teacher = type(model)(dataclasses.replace(cfg, n_layer=self.layer))
        # Everything the truncated pass reads: embeddings, the first `layer` blocks and any extra
        # parameters of a subclass (PAR's transition tokens); not the final norm and output layer.
        keep = {n for n, _ in teacher.named_parameters() if not n.startswith(("norm.", "output."))}
        if static_ckpt is not None:
            source = _read_checkpoint(Path(static_ckpt))
            where = f"static teacher checkpoint {static_ckpt}"
        else:
            source = {n: p.detach() for n, p in model.named_parameters()}
            where = "the model"
        missing = sorted(keep - set(source))
        if missing:
            raise ValueError(f"{where}: lacks {len(missing)} teacher weights, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, p in teacher.named_parameters():
                if name in keep:
                    src = source[name]
                    if tuple(src.shape) != tuple(p.shape):
                        raise ValueError(f"{where}: {name} has shape {tuple(src.shape)}, the model needs "
                                         f"{tuple(p.shape)} (different model config?)")
                    p.copy_(src)
        # The truncated pass (upto_layer) never reads the final norm or the output layer: drop them so
        # the teacher holds (and the EMA refreshes) only the weights it uses.
        teacher.norm = None
        teacher.output = None
        # Parameters in the target dtype (buffers such as RoPE tables keep their precision); the forward
        # runs under bf16 autocast so mixed dtypes are fine on CPU and CUDA.
        for p in teacher.parameters():
            p.data = p.data.to(dtype)
        teacher.requires_grad_(False)
        device = next(model.parameters()).device
        self.module = teacher.to(device).eval()
        self.teacher_names = sorted(keep)

    def train(self, mode: bool = True) -> "EMATeacher":
        """The teacher stays in eval mode (no dropout, no class dropout) whatever the caller asks."""
        return super().train(False)

    @property
    def dim(self) -> int:
        return int(self.module.config.dim)

    @torch.no_grad()
    def targets(self, idx: torch.Tensor, cond_idx: torch.Tensor,
                drop_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Residual stream after block ``layer`` on the same tokens: [B, T, D] in ``self.dtype``.
        ``drop_labels`` (bool [B], optional) forces the null class where True; by default the teacher
        sees the true labels (eval mode: no class dropout), as in the paper and the released code."""
        with torch.autocast(device_type=cond_idx.device.type, dtype=torch.bfloat16):
            out = self.module(idx, cond_idx, upto_layer=self.layer, drop_labels=drop_labels)
        return out.hidden[self.layer].to(self.dtype)

    forward = targets

    # ------------------------------------------------------------------ ForesightSource

    def targets_for(self, batch: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        idx, _ = model.prepare_inputs(batch["codes"])                  # the model's own input sequence
        return self.targets(idx, batch["labels"])                      # [B, T, D]

    def ema_teacher(self) -> tuple[nn.Module, list[str]] | None:
        return None if self.static else (self.module, self.teacher_names)

    def compile_for_training(self, scope: str) -> None:
        from mirai.models.compile import compile_in_scope
        compile_in_scope(self.module, self.module.layers, scope)

    @classmethod
    def frozen_params(cls, cfg, model) -> int:
        """What the teacher copies of ``model``: its parameters less the final norm and output layer and the
        blocks past the teacher's layer."""
        count = lambda mod: sum(p.numel() for p in mod.parameters())                  # noqa: E731
        tail = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("norm.", "output.")))
        layer = cfg.teacher_layer or cfg.layer
        return count(model) - tail - (model.config.n_layer - layer) * count(model.layers[0])

    def flops(self, gpt_config, cfg):
        from mirai.metrics.flops import training_flops_per_image
        return training_flops_per_image(gpt_config, "ema", k=cfg.k, layer=cfg.teacher_layer or cfg.layer,
                                        head_hidden=cfg.head_hidden, head_out=cfg.head_out)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from mirai.checkpoint import read_weights
    from mirai.io.state_dicts import check_finite, strip_prefixes
    if not path.exists():
        raise FileNotFoundError(f"static teacher checkpoint {path}: no such file")
    w = read_weights(path)
    which = "ema" if w["ema"] is not None else "model"
    sd = w[which]
    if not sd or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"static teacher checkpoint {path}: no state dict found (expected 'ema', 'model' "
                         "or a bare state dict)")
    check_finite(sd, f"static teacher checkpoint {path} ({which})")
    return {k: v for k, v in strip_prefixes(sd).items() if isinstance(v, torch.Tensor)}


def _build(cfg, model: nn.Module, codes: str | None = None) -> EMATeacher:
    ckpt = cfg.static_teacher_ckpt if cfg.teacher == "static" else None
    return EMATeacher(model, cfg.teacher_layer or cfg.layer, static_ckpt=ckpt, dtype=TARGET_DTYPES[cfg.target_dtype])


register(SourceMode("ema", build=_build, default_k=3, default_warmup_epochs=15, table_source="ema",
                    target_width=lambda cfg, model_cfg: int(model_cfg.dim), source_type=lambda cfg: EMATeacher))
