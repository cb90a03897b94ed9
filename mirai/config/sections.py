"""The sections of a run config: typed dataclasses with one docstring line per field.

    Config            name, out_dir and the sections below (``to_dict()``: plain values, what config.yaml holds)
    ModelConfig       the AR transformer: a registry name plus overrides of its GPTConfig
    ForesightConfig   Mirai's switches (``mirai.foresight.config``, owned by the foresight code)
    DataConfig        the code store and its loader
    OptimConfig       AdamW and the learning-rate schedule
    TrainConfig       batching, length, precision, parallelism, bookkeeping
    EMAConfig         the model EMA

Reading them from YAML and ``--set``: ``mirai.config.loading``; checking them: ``mirai.config.validation``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from mirai.foresight.config import ForesightConfig
from mirai.models.gpt import GPTConfig

#: the model fields' defaults are GPTConfig's (the model section overrides them; GPTConfig checks them)
_GPT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPTConfig)}


@dataclass
class ModelConfig:
    """The AR transformer: a LlamaGen registry entry plus overrides of its GPTConfig. Every field but ``name``,
    ``image_size`` and ``downsample`` is the GPTConfig (PARConfig) field of that name, with its default; the model
    config checks the values (``mirai.config.validation.model_gpt_config`` names the field)."""

    name: str = "GPT-B"
    """Registry name: ``mirai.models.gpt.GPT_models`` (GPT-debug, GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B) or
    ``mirai.models.par.PAR_models`` (PAR-debug, PAR-B, ... : the same blocks in PAR's region-parallel order)."""
    vocab_size: int = _GPT_DEFAULTS["vocab_size"]
    """Codebook size of the VQ tokenizer (LlamaGen VQ-16: 16384)."""
    num_classes: int = _GPT_DEFAULTS["num_classes"]
    """Number of class labels; the embedding table has one more row (the null class used by CFG)."""
    image_size: int = 256
    """Training resolution in pixels; the token grid is image_size // downsample on each side."""
    downsample: int = 16
    """Spatial downsampling factor of the VQ tokenizer (VQ-16: 16)."""
    cls_token_num: int = _GPT_DEFAULTS["cls_token_num"]
    """Number of class-token positions at the start of the sequence (LlamaGen c2i: 1)."""
    token_dropout_p: float = _GPT_DEFAULTS["token_dropout_p"]
    """Dropout on the token embeddings (training only)."""
    attn_dropout_p: float = _GPT_DEFAULTS["attn_dropout_p"]
    """Dropout on attention probabilities (training only)."""
    resid_dropout_p: float = _GPT_DEFAULTS["resid_dropout_p"]
    """Dropout on each block's attention output before the residual add (training only)."""
    ffn_dropout_p: float = _GPT_DEFAULTS["ffn_dropout_p"]
    """Dropout on each block's feed-forward output before the residual add (training only)."""
    drop_path_rate: float = _GPT_DEFAULTS["drop_path_rate"]
    """Stochastic depth rate (LlamaGen: 0)."""
    class_dropout_prob: float = _GPT_DEFAULTS["class_dropout_prob"]
    """Probability that a training label is replaced by the null class (enables CFG)."""
    attn_backend: Literal["sdpa", "flash_attn"] = _GPT_DEFAULTS["attn_backend"]
    """Attention kernel: torch SDPA (FlashAttention-2/cuDNN inside torch) or the flash-attn package."""
    dim: Optional[int] = None
    """Width override (None: the registry's value). Used by the LlamaGen-S configs."""
    n_layer: Optional[int] = None
    """Depth override (None: the registry's value)."""
    n_head: Optional[int] = None
    """Number of attention heads override (None: the registry's value)."""
    num_regions: Optional[int] = None
    """PAR models only (``PAR-*``): number of regions R the token grid is split into, a square whose root
    divides the grid side (4: PAR-4x, 16: PAR-16x). None: the PAR default (4); must stay None for GPT-*."""

    @property
    def grid_size(self) -> int:
        """Token grid side (16 at 256 px, 24 at 384 px with VQ-16)."""
        return self.image_size // self.downsample

    @property
    def block_size(self) -> int:
        """Number of tokens per image (grid_size ** 2)."""
        return self.grid_size ** 2

    def gpt_overrides(self) -> dict[str, Any]:
        """Keyword overrides for ``build_gpt(self.name, **overrides)``: every model-config field set here (None:
        the registry's value) and ``block_size`` from the image geometry."""
        out: dict[str, Any] = {"block_size": self.block_size}
        for f in dataclasses.fields(self):
            if f.name in ("name", "image_size", "downsample"):
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    @property
    def is_par(self) -> bool:
        """A PAR model (``mirai.models.par``: region-parallel token order, group-wise attention)."""
        return self.name.startswith("PAR-")


@dataclass
class DataConfig:
    """Where the pre-extracted codes come from and how they are loaded."""

    codes: str = ""
    """Code store folder written by ``mirai prepare`` (codes.npy, labels.npy, meta.json ...)."""
    images: Optional[str] = None
    """Image folder the store was prepared from (``mirai prepare --images``), for Mirai-I with the encoder
    run online: each sample's crop is re-created from its original file (``files.txt`` paths are relative
    to this folder; absolute ones are used as is) with the store's crop settings, the augmentation index
    selecting the ten-crop / flip variant exactly as ``prepare`` did, and handed to the encoder as uint8.
    None: no images are read (baseline, Mirai-E, precomputed features). The store's encoder features are read
    when ``foresight.use_precomputed_features`` is true (no data field: the foresight source names what it reads)."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0: load in the training process)."""
    pin_memory: bool = True
    """Pin host batches so the host-to-device copy is asynchronous (CUDA only)."""
    prefetch_factor: int = 4
    """Batches prefetched per worker."""


@dataclass
class OptimConfig:
    """AdamW with LLaMA-style decoupled weight decay on matrices only."""

    lr: float = 1e-4
    """Learning rate per 256 images of global batch; the run uses lr * global_batch / 256 (linear scaling)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.05
    """Decoupled weight decay, applied to parameters with >= 2 dimensions only (no norms, no biases)."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    schedule: Literal["const", "cosine"] = "const"
    """Learning-rate schedule after warm-up: constant, or cosine decay to min_lr_ratio * lr at the end."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up from 0 over this many optimizer steps."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule as a fraction of the peak."""
    fused: bool = True
    """Fused optimizer: apex FusedAdam when importable, else torch AdamW(fused=True) on CUDA / foreach on CPU."""
    fuse_ema: bool = False
    """Single-process / DDP engine: the AdamW step, the gradient clip and the model-EMA update (with the
    Mirai-E teacher's bf16 copy) in one pass over memory (mirai.optim.AdamWEMA on mirai._C's kernel, CPU or
    CUDA) instead of torch's AdamW then a separate EMA pass. Ignored under DeepSpeed."""


@dataclass
class TrainConfig:
    """Batching, length, precision, parallelism and bookkeeping of the run."""

    global_batch: int = 256
    """Images per optimizer step over all ranks."""
    micro_batch: int = 32
    """Images per rank per forward pass; gradient accumulation = global_batch / (micro_batch * world size)."""
    epochs: int = 300
    """Training length in epochs (one epoch = len(store) // global_batch steps); ignored when max_steps is set."""
    max_steps: Optional[int] = None
    """Training length in optimizer steps (overrides epochs); schedules use it as their horizon."""
    stop_at: Optional[int] = None
    """Stop (with a checkpoint) at this step without changing the schedules' horizon (time-limited jobs)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16: bf16 weights/activations with fp32 master weights (DeepSpeed) or autocast (plain path); fp32: all fp32."""
    zero_stage: Optional[int] = None
    """DeepSpeed ZeRO stage 0..3 (0: plain data parallel). None: chosen by the memory estimate when DeepSpeed runs
    (mirai.trainer.engine.memory: the lowest of 1, 2, 3 that fits). Set under train.backend=auto, it asks for DeepSpeed at
    that stage."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (saves activation memory)."""
    compile: bool = False
    """torch.compile the model (and the Mirai-E teacher) for training; see compile_scope."""
    compile_scope: Literal["auto", "model", "blocks"] = "auto"
    """What one compiled graph covers. model: the whole training forward (GPT + foresight heads and loss)
    in one graph and its backward in another: fewest launches and no Python between blocks (one H100: a
    GPT-B step 1.6-1.8x, a GPT-XXL step 1.5x faster than blocks), but gradient reductions (DDP / ZeRO) start
    only after the whole backward. blocks: each transformer block compiled alone: reductions overlap the
    backward (worth it on slow interconnects), and the engines that gather parameters per module and
    activation checkpointing work. auto: model, except blocks where the engine or activation checkpointing
    needs them (mirai.trainer.engine.needs_block_compile); 'model' where they are needed is refused."""
    fused_ce: bool = True
    """NTP loss by the model's chunked fused linear + cross-entropy (no [B, T, V] fp32 logits); false:
    logits then F.cross_entropy (same value)."""
    ce_backend: Literal["auto", "fused", "reference"] = "auto"
    """Row pass of the fused linear + cross-entropy (softmax statistics, loss, logit gradient): the mirai._C
    kernel ("fused"), plain PyTorch ("reference"), or "auto": the kernel on CUDA once it has passed its
    self-check on the device, PyTorch on the CPU (the values of ``mirai.ops.backends.BACKENDS``)."""
    check_grad_overflow: bool = False
    """DeepSpeed bf16: test every gradient for inf/NaN before the optimizer step and skip the step when one is
    found. Off by default: bf16 needs no loss scaling, and the check costs several per-parameter reductions and
    launches each step (most of a one-GPU GPT-B step's host time in the H100 profile). The clipped gradient norm is
    computed either way and logged as grad_norm."""
    log_every: int = 50
    """Optimizer steps between log lines (the only steps that synchronise with the host)."""
    ckpt_every: int = 5000
    """Optimizer steps between checkpoints (one is also written at the end)."""
    keep_last: int = 2
    """Number of most recent checkpoints kept (older ones are deleted after a new one is complete)."""
    loss_spike_factor: Optional[float] = None
    """Loss-spike stop: on a log step, stop the run (exit code 4, no checkpoint written from that state) when the
    logged NTP loss exceeds this factor times the lowest reference so far, min(ln(model.vocab_size), every NTP
    loss logged in this run, resumes included). null: off. A factor of 2-3 only fires on a real blow-up; the
    NTP loss is compared (not the total loss, which jumps when a foresight warm-up or lambda schedule switches).
    Non-finite losses and gradient norms always stop the run, whatever this is."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective (gradient all-reduce, loss read, checkpoint barrier, the stop agreement) may wait for
    the other ranks before this rank fails with an error naming it (a rank hung or died); also the limit of the
    process-group set-up. Multi-process runs only."""
    seed: int = 0
    """Seed of parameter init, data order, augmentation choice and dropout."""
    backend: Literal["auto", "deepspeed", "ddp", "single"] = "auto"
    """auto: a single process when there is one rank; on more, DeepSpeed at train.zero_stage when that is set, else
    by the per-rank memory estimate (mirai.trainer.engine.memory): DDP when a full replica fits (fp32 master weights, the
    lowest host cost), else the lowest DeepSpeed ZeRO stage that fits (DDP when deepspeed is not importable).
    The choice and the estimate are printed at start-up. An explicit value is always obeyed."""
    resume: str = "auto"
    """auto: continue from out_dir's latest checkpoint if any; none: start fresh; or a checkpoint folder path."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA when available, else CPU (DS_ACCELERATOR=cpu and gloo under DeepSpeed)."""
    peak_flops: Optional[float] = None
    """Dense bf16 peak FLOP/s per GPU for MFU (None: MIRAI_PEAK_FLOPS, else 777e12 on H100, 312e12 on A100)."""
    tensorboard: bool = True
    """Also write TensorBoard events (when tensorboard is importable)."""
    progress: bool = True
    """Show the tqdm progress bar on rank 0."""

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step: global_batch / (micro_batch * world_size) (validation checks
        that it divides)."""
        return self.global_batch // (self.micro_batch * world_size)


@dataclass
class EMAConfig:
    """The exported EMA of the whole AR model (Mirai-E's online teacher reads the same EMA)."""

    enabled: bool = True
    """Keep an EMA of the model (required by Mirai-E with an online teacher)."""
    decay: float = 0.9999
    """EMA decay tau: ema = tau * ema + (1 - tau) * param after every optimizer step."""
    warmup: str = "none"
    """Decay warm-up of ModelEMA ("none": constant tau)."""


@dataclass
class Config:
    """A whole training run."""

    name: str = "run"
    """Run name (default run folder runs/<name>)."""
    out_dir: Optional[str] = None
    """Run folder: resolved config, checkpoints, metrics.jsonl, TensorBoard events (None: runs/<name>)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The AR model."""
    foresight: ForesightConfig = field(default_factory=ForesightConfig)
    """Mirai foresight alignment (mode none = the LlamaGen baseline)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, batching, precision, parallelism, checkpointing."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the model weights."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def _to_plain(obj) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj
