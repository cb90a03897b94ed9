"""``ForesightConfig``: every switch of the Mirai method (the ``foresight`` section of a run config).

Fields left at ``None`` take mode-dependent defaults in ``resolve(model_cfg)``, read from the mode's
registration (``mirai.foresight.sources.registry``; ``default_k(mode)`` is the one default K):

================  ===========================  ============================
field             Mirai-E (mode="ema")         Mirai-I (mode="encoder")
================  ===========================  ============================
k                 3                            1
layer             2/3 of depth (8 of 12)       2/3 of depth
head_out          model width                  encoder width (768 for ViT-B)
warmup_epochs     15                           0
================  ===========================  ============================

The paper's Mirai-E additionally uses ``schedule="step", lambdas=2.0, lambda_end=1.0,
switch_frac=0.5`` (2 -> 1 halfway); Mirai-I uses a constant 2.0. ``validate(model_cfg)``
raises ``ValueError`` naming the offending field (``foresight.<field>``).

``model_cfg`` is anything with ``n_layer``, ``dim`` and ``block_size`` attributes (``GPTConfig``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from mirai.foresight.neighbours import LAYOUTS
from mirai.ops.backends import BACKENDS

HEAD_KINDS = ("mlp", "transformer")
SCHEDULES = ("const", "step", "cosine")
INJECTIONS = ("internal", "output")
TEACHERS = ("online", "static")
TARGET_DTYPES = ("bf16", "fp32")
MAX_HEADS = 16          # the documented range of K is 1 .. 16 (the largest the paper studies)


@dataclass
class EncoderConfig:
    """The frozen bidirectional encoder of Mirai-I (``mode="encoder"``)."""

    name: str = "dinov2_vitb14"
    """Encoder short name (dinov2_vits14/vitb14/vitl14/vitg14, dinov2_vitb14_reg/vitl14_reg,
    dinov3_vitb16/vitl16, mae_vitb16/vitl16) or any timm ViT model name."""
    weights: str | None = None
    """Local weights: a state-dict file (.pth/.pt/.bin/.safetensors) or a timm / Hugging Face cache
    folder holding one. Never downloaded. Required unless ``use_precomputed_features``."""
    image_size: int | None = None
    """Encoder input side in pixels; None = patch * grid (224 for patch 14 and a 16x16 grid, 336 for 24x24,
    256 for patch 16). When set it must give a patch grid equal to the token grid."""
    block_causal: int = 0
    """Block size (in patches, raster order) of a block-causal self-attention mask inside the encoder
    (a diagnostic); 0 = the normal bidirectional encoder."""


@dataclass
class ForesightConfig:
    """Mirai foresight alignment: L = L_NTP + sum_k lambda_k(step) * L_k."""

    mode: str = "none"
    """"none" (plain LlamaGen), "ema" (Mirai-E: EMA of the model's own first layers) or
    "encoder" (Mirai-I: frozen bidirectional encoder, or its precomputed features); any mode registered in
    ``mirai.foresight.sources``."""
    k: int | None = None
    """Number of foresight heads K (1 .. 16, the paper's range); None = 3 for ema, 1 for encoder."""
    layer: int | None = None
    """Injection layer l (1-based block count: the residual stream after block l);
    None = round(2/3 of depth): 8 of 12 (GPT-B), 16 of 24, 24 of 36, 32 of 48."""
    teacher_layer: int | None = None
    """Depth of the Mirai-E teacher (first blocks of the EMA); None = same as ``layer``."""
    layout: str = "2d"
    """Neighbour layout: "2d" (nearest forward grid offsets), "1d" (raster order) or "released"
    (the authors' code: raster offsets 0, 1, W, W+1, 2, W+2, 2W+2, 2W+1, 2W, wrap-around)."""
    head_kind: str = "mlp"
    """"mlp" (Linear-SiLU-Linear-SiLU-Linear, the paper's head) or "transformer" (ablation head)."""
    head_hidden: int = 2048
    """Hidden width of the MLP heads."""
    head_out: int | None = None
    """Head output size C; None = the teacher's width (model width for ema, encoder width for encoder)."""
    head_init_std: float | None = 0.02
    """MLP head init: a float = N(0, std) weights and zero biases (default 0.02: the released code, where
    LlamaGen's ``_init_weights`` reaches the projectors' Linears too); None = nn.Linear's default init per
    head (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
    head_bias_decay: bool = False
    """Weight decay on the MLP heads' biases b1, b2, b3. False (default, the released code, whose per-head
    Linear biases are 1-D and so never decayed): none. True: decay them like the weights (they are stacked
    [K, H] tensors, so the ">= 2-D parameters are decayed" rule alone would decay them)."""
    lambdas: float | list[float] = 2.0
    """lambda_k at the start: one float for every head, or a per-head list of length k."""
    lambda_end: float | list[float] | None = None
    """lambda_k at the end for schedule "step"/"cosine" (float or per-head list); None = lambdas."""
    schedule: str = "const"
    """"const", "step" (lambdas -> lambda_end once progress >= switch_frac) or "cosine"
    (lambdas -> lambda_end by a half cosine over training). Progress = step / total_steps."""
    switch_frac: float = 0.5
    """Fraction of training at which schedule "step" switches (the paper's Mirai-E: 0.5)."""
    warmup_epochs: int | None = None
    """No foresight term for the first warmup_epochs epochs (heads still exist and get zero
    gradients); None = 15 for ema, 0 for encoder."""
    injection: str = "internal"
    """"internal": align the hidden state at ``layer`` (Mirai). "output": the multi-token-prediction
    ablation, K extra output heads on the final hidden state with cross-entropy on the future
    tokens at the layout's neighbour offsets (no teacher)."""
    teacher: str = "online"
    """Mirai-E teacher: "online" (the running EMA) or "static" (frozen weights from static_teacher_ckpt)."""
    static_teacher_ckpt: str | None = None
    """Checkpoint file of the static teacher (its "ema" entry, else "model", else a bare state dict)."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The Mirai-I encoder."""
    use_precomputed_features: bool = False
    """Mirai-I: read the encoder's patch features from the code store (the loader then reads them) instead of
    running the encoder online on ``data.images``."""
    target_dtype: str = "fp32"
    """Precision of the targets: "fp32" (default, the released code's numerics) keeps the Mirai-E teacher's and
    the online encoder's weights in fp32 (the online Mirai-E teacher IS the fp32 EMA, no rounded copy), runs
    their pass under bf16 autocast (bf16 matmuls; residual stream, norms and output in fp32) and hands fp32
    targets to the loss; "bf16" stores those weights in bf16, runs the pass in bf16 and hands bf16 targets
    (about 0.65% relative error on the Mirai-E targets; half the teacher memory; docs/numerics.md has the
    measurements). Precomputed features are stored in bf16 either way; this only sets their dtype."""
    backend: str = "auto"
    """Foresight loss backend for MLP heads: "auto" (fused CUDA, then fused CPU, then reference),
    "fused" or "reference" (the plain PyTorch path of ``mirai.ops.reference``)."""

    # ---------------------------------------------------------------- derived values
    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def reads_features(self) -> bool:
        """The run reads the code store's encoder features: its source's ``batch_keys`` name "features"."""
        from mirai.foresight.sources.registry import source_type
        return "features" in source_type(self).batch_keys

    @property
    def source(self) -> str:
        """Neighbour-table source: "ema" (rows are sequence positions) or "encoder" (grid cells), the mode's."""
        return _mode(self.mode).table_source

    def resolve(self, model_cfg) -> "ForesightConfig":
        """A validated copy with every ``None`` default filled in for this model."""
        self.validate(model_cfg)
        n_layer = int(model_cfg.n_layer)
        mode = _mode(self.mode)
        k = self.k if self.k is not None else mode.default_k
        layer = self.layer if self.layer is not None else default_layer(n_layer)
        if self.head_out is not None:
            head_out = self.head_out
        elif self.injection == "internal":
            head_out = mode.target_width(self, model_cfg)
        else:
            head_out = int(model_cfg.dim)
        warm = self.warmup_epochs if self.warmup_epochs is not None else mode.default_warmup_epochs
        return dataclasses.replace(
            self, k=k, layer=layer, teacher_layer=self.teacher_layer or layer, head_out=head_out,
            warmup_epochs=warm, lambdas=per_head(self.lambdas, k, "lambdas"),
            lambda_end=None if self.lambda_end is None else per_head(self.lambda_end, k, "lambda_end"),
            encoder=dataclasses.replace(self.encoder))

    def validate(self, model_cfg=None) -> None:
        """Raise ValueError naming the field on any inconsistent value."""
        def bad(name: str, msg: str):
            raise ValueError(f"foresight.{name}: {msg}")

        def choice(name: str, value, options):
            if value not in options:
                bad(name, f"must be one of {options}, got {value!r}")

        _mode(self.mode)                                  # ValueError "foresight.mode: must be one of ..."
        choice("layout", self.layout, LAYOUTS)
        choice("head_kind", self.head_kind, HEAD_KINDS)
        choice("schedule", self.schedule, SCHEDULES)
        choice("injection", self.injection, INJECTIONS)
        choice("teacher", self.teacher, TEACHERS)
        choice("backend", self.backend, BACKENDS)
        choice("target_dtype", self.target_dtype, TARGET_DTYPES)
        if self.k is not None and (not isinstance(self.k, int) or isinstance(self.k, bool)
                                   or not 1 <= self.k <= MAX_HEADS):
            bad("k", f"must be an int in 1 .. {MAX_HEADS} (number of foresight heads), got {self.k!r}")
        k = self.k if self.k is not None else _mode(self.mode).default_k
        if not isinstance(self.head_hidden, int) or self.head_hidden < 1:
            bad("head_hidden", f"must be a positive int, got {self.head_hidden!r}")
        if self.head_out is not None and (not isinstance(self.head_out, int) or self.head_out < 1):
            bad("head_out", f"must be a positive int or null, got {self.head_out!r}")
        if self.head_init_std is not None and not self.head_init_std > 0:
            bad("head_init_std", f"must be > 0 or null, got {self.head_init_std!r}")
        per_head(self.lambdas, k, "lambdas")
        if self.lambda_end is not None:
            per_head(self.lambda_end, k, "lambda_end")
        if not 0.0 <= float(self.switch_frac) <= 1.0:
            bad("switch_frac", f"must lie in [0, 1], got {self.switch_frac!r}")
        if self.warmup_epochs is not None and (not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0):
            bad("warmup_epochs", f"must be an int >= 0 or null, got {self.warmup_epochs!r}")
        if self.encoder.block_causal < 0:
            bad("encoder.block_causal", f"must be >= 0 (0 = off), got {self.encoder.block_causal!r}")
        if self.mode == "none":
            return
        if self.mode == "ema" and self.injection == "internal" and self.teacher == "static":
            if not self.static_teacher_ckpt:
                bad("static_teacher_ckpt", "teacher='static' needs a checkpoint path")
            if not os.path.isfile(self.static_teacher_ckpt):
                bad("static_teacher_ckpt", f"no such file: {self.static_teacher_ckpt}")
        if self.mode == "encoder" and self.injection == "internal":
            from mirai.foresight.encoders import is_known_encoder
            if not is_known_encoder(self.encoder.name):
                bad("encoder.name", f"unknown encoder {self.encoder.name!r}: use a short name of "
                                    "mirai.foresight.encoders.ENCODERS or a timm ViT model name")
            if not self.use_precomputed_features:
                if not self.encoder.weights:
                    bad("encoder.weights", "Mirai-I runs the encoder online and needs a local weights path "
                                           "(nothing is downloaded); or set use_precomputed_features")
                if not os.path.exists(self.encoder.weights):
                    bad("encoder.weights", f"no such file or folder: {self.encoder.weights}")
        if model_cfg is None:
            return
        n_layer = int(model_cfg.n_layer)
        for name in ("layer", "teacher_layer"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 1 <= v <= n_layer):
                bad(name, f"must lie in 1 .. n_layer = {n_layer} (model depth), got {v!r}")
        grid = math.isqrt(int(model_cfg.block_size))
        if grid * grid != int(model_cfg.block_size):
            bad("layout", f"model block_size {model_cfg.block_size} is not a square token grid")
        if self.mode == "encoder" and self.injection == "internal" and self.encoder.image_size is not None:
            patch = encoder_patch(self.encoder.name)
            if patch is not None and self.encoder.image_size != patch * grid:
                bad("encoder.image_size", f"{self.encoder.image_size} px with patch {patch} gives a "
                                          f"{self.encoder.image_size / patch:g}-wide patch grid, the token grid is "
                                          f"{grid}: use {patch * grid}")


def _mode(name: str):
    """The registration of mode ``name`` (``mirai.foresight.sources.registry``)."""
    from mirai.foresight.sources import source_mode
    return source_mode(name)


def default_layer(n_layer: int) -> int:
    """2/3 of the depth, rounded: 8 of 12, 16 of 24, 24 of 36, 32 of 48."""
    return max(1, round(2 * n_layer / 3))


def per_head(value, k: int, name: str = "lambdas") -> list[float]:
    """A float or a length-k list of finite floats >= 0 -> list of k floats (ValueError naming the field
    otherwise: a negative weight would reward misalignment)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(value):
        value = [value]
    if not (isinstance(value, (list, tuple)) and all(number(v) for v in value)):
        raise ValueError(f"foresight.{name}: must be a float or a list of floats, got {value!r}")
    for v in value:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"foresight.{name}: each weight must be a finite number >= 0, got {v!r}")
    if len(value) == 1:
        return [float(value[0])] * k
    if len(value) == k:
        return [float(v) for v in value]
    raise ValueError(f"foresight.{name}: per-head list has {len(value)} entries, k = {k}")


def encoder_dim(name: str) -> int:
    """Width of a known encoder (the head output size of Mirai-I)."""
    from mirai.foresight.encoders import ENCODERS
    if name not in ENCODERS:
        raise ValueError(f"foresight.head_out: cannot infer the width of encoder {name!r}; set head_out")
    return ENCODERS[name].dim


def encoder_patch(name: str) -> int | None:
    from mirai.foresight.encoders import ENCODERS
    return ENCODERS[name].patch if name in ENCODERS else None
