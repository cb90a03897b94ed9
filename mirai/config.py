"""Training configuration: typed nested dataclasses, YAML files, dotted ``--set`` overrides.

One mechanism for every run::

    cfg = load_config("configs/gpt-b_mirai_e.yaml", ["train.micro_batch=16", "foresight.k=9"])
    validate(cfg, world_size=8)          # raises ConfigError naming the field, before any work

* A YAML file holds a nested mapping whose keys are the dataclass fields below. It may name one
  parent with ``base: other.yaml`` (a path relative to the file): the parent is loaded first
  (recursively) and the child's mapping is merged into it key by key (``name`` and ``out_dir`` are
  never inherited; ``name`` defaults to the file's stem). That is the only inheritance rule.
* ``--set section.field=value`` overrides are applied after the YAML files; each value string is
  parsed with the type of its dataclass field (int, float, bool, str, Optional, tuple/list, Literal
  choices), so ``--set optim.lr=2e-4`` and ``--set foresight.lambdas=[2,2,1]`` both work.
* Unknown keys fail with the closest known names; wrong types and out-of-range values fail with
  the dotted name of the field. ``validate`` then checks cross-field rules (K >= 1, injection layer
  within the model depth, a data folder that exists and matches the model, batch sizes that divide).
* ``save_config`` writes the resolved config (all fields, no ``base``) into the run folder; loading
  that file again gives the same config.

The foresight section is ``mirai.foresight.config.ForesightConfig`` (owned by the foresight code);
this module nests it and validates it together with the model it is attached to.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from mirai.foresight.config import ForesightConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message starts with the field name."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The AR transformer: a LlamaGen registry entry plus overrides of its GPTConfig."""

    name: str = "GPT-B"
    """Registry name: ``mirai.models.gpt.GPT_models`` (GPT-debug, GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B) or
    ``mirai.models.par.PAR_models`` (PAR-debug, PAR-B, ... : the same blocks in PAR's region-parallel order)."""
    vocab_size: int = 16384
    """Codebook size of the VQ tokenizer (LlamaGen VQ-16: 16384)."""
    num_classes: int = 1000
    """Number of class labels; the embedding table has one more row (the null class used by CFG)."""
    image_size: int = 256
    """Training resolution in pixels; the token grid is image_size // downsample on each side."""
    downsample: int = 16
    """Spatial downsampling factor of the VQ tokenizer (VQ-16: 16)."""
    cls_token_num: int = 1
    """Number of class-token positions at the start of the sequence (LlamaGen c2i: 1)."""
    token_dropout_p: float = 0.1
    """Dropout on the token embeddings (training only)."""
    attn_dropout_p: float = 0.0
    """Dropout on attention probabilities (training only)."""
    resid_dropout_p: float = 0.1
    """Dropout on each block's attention output before the residual add (training only)."""
    ffn_dropout_p: float = 0.1
    """Dropout on each block's feed-forward output before the residual add (training only)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate (LlamaGen: 0)."""
    class_dropout_prob: float = 0.1
    """Probability that a training label is replaced by the null class (enables CFG)."""
    attn_backend: Literal["sdpa", "flash_attn"] = "sdpa"
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
        """Keyword overrides for ``build_gpt(self.name, **overrides)``."""
        out: dict[str, Any] = dict(
            vocab_size=self.vocab_size, num_classes=self.num_classes, block_size=self.block_size,
            cls_token_num=self.cls_token_num, token_dropout_p=self.token_dropout_p,
            attn_dropout_p=self.attn_dropout_p, resid_dropout_p=self.resid_dropout_p,
            ffn_dropout_p=self.ffn_dropout_p, drop_path_rate=self.drop_path_rate,
            class_dropout_prob=self.class_dropout_prob, attn_backend=self.attn_backend)
        for key in ("dim", "n_layer", "n_head", "num_regions"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
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
    features: bool = False
    """Read precomputed encoder patch features from the store (Mirai-I without images on disk)."""
    images: Optional[str] = None
    """Image folder the store was prepared from (``mirai prepare --images``), for Mirai-I with the encoder
    run online: each sample's crop is re-created from its original file (``files.txt`` paths are relative
    to this folder; absolute ones are used as is) with the store's crop settings, the augmentation index
    selecting the ten-crop / flip variant exactly as ``prepare`` did, and handed to the encoder as uint8.
    None: no images are read (baseline, Mirai-E, precomputed features)."""
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
    (mirai.trainer.memory: the lowest of 1, 2, 3 that fits). Set under train.backend=auto, it asks for DeepSpeed at
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
    backward (worth it on slow interconnects), and ZeRO-3's per-module gathers and activation
    checkpointing work. auto: model, except blocks under ZeRO-3 or activation checkpointing."""
    fused_ce: bool = True
    """NTP loss by the model's chunked fused linear + cross-entropy (no [B, T, V] fp32 logits); false:
    logits then F.cross_entropy (same value)."""
    ce_backend: Literal["auto", "kernel", "torch"] = "auto"
    """Row pass of the fused linear + cross-entropy (softmax statistics, loss, logit gradient): the mirai._C
    kernel ("kernel"), plain PyTorch ("torch"), or "auto": the kernel on CUDA once it has passed its self-check
    on the device, PyTorch on the CPU."""
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
    by the per-rank memory estimate (mirai.trainer.memory): DDP when a full replica fits (fp32 master weights, the
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

    def needs_block_compile(self, deepspeed: bool) -> bool:
        """True when only per-block compile works: activation checkpointing, or ZeRO-3 under DeepSpeed."""
        return self.activation_checkpointing or (deepspeed and self.zero_stage == 3)


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


# --------------------------------------------------------------------------------------------
# Typed parsing
# --------------------------------------------------------------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


def _coerce(value: Any, tp, where: str, from_string: bool) -> Any:
    """Convert a YAML value (or a --set string) to the field type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return yaml.safe_load(value) if from_string else value
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")
                             and type(None) in args):
            if type(None) in args:
                return None
            raise bad
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, from_string)
            except ConfigError as err:
                errors.append(err)
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, f"{where}.")
    if origin in (tuple, list) or tp in (tuple, list):
        if from_string and isinstance(value, str):
            text = value.strip()
            parsed = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            items = [_coerce(v, a, f"{where}[{i}]", from_string=False) for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{where}[{i}]", from_string=False) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not from_string:
            return str(value)
        raise bad
    if tp is dict or origin is dict:
        if from_string and isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _unknown(cls, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; known keys: {', '.join(names)}"
    return ConfigError(f"{where}: unknown key{hint}")


def _build(cls, mapping: dict[str, Any], prefix: str = ""):
    """Instantiate dataclass `cls` from a (partial) mapping, typed and checked."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise _unknown(cls, key, where)
        kwargs[key] = _coerce(value, hints[key], where, from_string=False)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a section's own __post_init__ check
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def _to_plain(obj) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# YAML files, base inheritance and --set overrides
# --------------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _refuse_duplicate_keys(node, path: tuple[str, ...] = ()) -> None:
    """Raise ConfigError naming the dotted key and its lines when a YAML mapping repeats a key
    (``yaml.safe_load`` would silently keep the last value)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"{'.'.join(path + (key,))}: given twice (lines {seen[key]} and {line}); "
                                      "remove one")
                seen[key] = line
            _refuse_duplicate_keys(value_node, path + ((key,) if key is not None else ()))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path)


def read_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged mapping of a YAML config file and its ``base:`` chain."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: base chain loops ({' -> '.join(map(str, _seen + (path,)))})")
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    try:
        _refuse_duplicate_keys(root)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        parent = read_yaml(path.parent / base, _seen + (path,))
        for own in ("name", "out_dir"):      # a run's identity is never inherited
            parent.pop(own, None)
        data = _merge(parent, data)
    return data


def _set_dotted(mapping: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply `dotted=raw`, parsing raw with the field's type."""
    parts = dotted.split(".")
    cls: Any = Config
    node = mapping
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if not (dataclasses.is_dataclass(cls) and part in {f.name for f in dataclasses.fields(cls)}):
            if dataclasses.is_dataclass(cls):
                raise _unknown(cls, part, where)
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is not a section")
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{where}: is a section; set one of its fields ({where}.<field>=...)")
            node[part] = _coerce(raw, tp, where, from_string=True)
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: expected a section")
            cls = tp


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. train.micro_batch=16)")
        key, value = item.split("=", 1)
        out.append((key.strip(), value))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                mapping: dict[str, Any] | None = None) -> Config:
    """Load a YAML file (or a mapping), apply ``key=value`` overrides, return a typed Config.

    ``name`` defaults to the file's stem when the file does not set it.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        data.setdefault("name", Path(path).stem)
    if mapping is not None:
        data = _merge(data, mapping)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return _build(Config, data)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("# resolved config of this run (mirai train --config this_file reproduces it)\n"
                   + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Validation (before any work)
# --------------------------------------------------------------------------------------------
def model_gpt_config(model: ModelConfig):
    """The GPTConfig (or PAR config) of the configured model; no module is built."""
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
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {model.name} does not accept these settings ({err})") from err
    close = difflib.get_close_matches(model.name, known, n=3, cutoff=0.4)
    raise ConfigError(f"model.name: unknown model {model.name!r}; known: {', '.join(known)}"
                      + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))


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
    # model
    _check(m.vocab_size >= 2, "model.vocab_size", f"must be >= 2, got {m.vocab_size}")
    _check(m.num_classes >= 1, "model.num_classes", f"must be >= 1, got {m.num_classes}")
    _check(m.downsample >= 1, "model.downsample", f"must be >= 1, got {m.downsample}")
    _check(m.image_size % m.downsample == 0 and m.image_size >= m.downsample, "model.image_size",
           f"{m.image_size} is not a positive multiple of model.downsample={m.downsample}")
    for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p",
                 "drop_path_rate", "class_dropout_prob"):
        v = getattr(m, name)
        _check(0.0 <= v < 1.0, f"model.{name}", f"must be in [0, 1), got {v}")
    for name in ("dim", "n_layer", "n_head"):
        v = getattr(m, name)
        _check(v is None or v >= 1, f"model.{name}", f"must be >= 1, got {v}")
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
    _check(not (t.compile_scope == "model" and t.needs_block_compile(deepspeed=t.backend in ("auto", "deepspeed"))),
           "train.compile_scope", "'model' cannot be combined with DeepSpeed ZeRO-3 (per-module parameter "
           "gathers) or activation checkpointing (per-block recompute); use 'blocks' or 'auto'")
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
    """``model.num_regions`` (PAR only): a square >= 4 whose root divides the token grid side."""
    if m.is_par:
        _check(m.attn_backend == "sdpa", "model.attn_backend",
               f"{m.name} needs 'sdpa' (PAR's group-wise attention mask is not a plain causal mask)")
    if m.num_regions is None:
        return
    _check(m.is_par, "model.num_regions", f"only PAR-* models are split into regions; {m.name} is not one "
           "(use e.g. model.name=PAR-B, or leave num_regions null)")
    r = math.isqrt(max(m.num_regions, 0))
    _check(m.num_regions >= 4 and r * r == m.num_regions, "model.num_regions",
           f"must be a square >= 4 (4 for PAR-4x, 16 for PAR-16x), got {m.num_regions}")
    _check(m.grid_size % r == 0, "model.num_regions",
           f"{m.num_regions} regions need the token grid side {m.grid_size} (model.image_size {m.image_size} / "
           f"{m.downsample}) to be divisible by {r}")
    _check(m.block_size >= 2 * m.num_regions, "model.num_regions",
           f"{m.num_regions} regions need at least {2 * m.num_regions} tokens, the grid has {m.block_size}")


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
        _check(cfg.ema.enabled, "ema.enabled", "Mirai-E's online teacher is the model EMA; it must be enabled")
        if f.ema_decay != cfg.ema.decay:
            raise ConfigError(f"foresight.ema_decay: {f.ema_decay} differs from ema.decay {cfg.ema.decay}; the "
                              "Mirai-E teacher is the model EMA, set both to the same value")
    if f.mode == "encoder" and f.injection == "internal":
        _check(f.use_precomputed_features or cfg.data.images, "foresight.use_precomputed_features",
               "Mirai-I needs either precomputed encoder features (foresight.use_precomputed_features=true and "
               "data.features=true, a store prepared with --encoder) or the images the store was prepared from "
               "(data.images=FOLDER, the encoder then runs online on each sample's crop)")
        if f.use_precomputed_features:
            _check(cfg.data.features, "data.features",
                   "must be true when foresight.use_precomputed_features is set (Mirai-I reads the store's features)")


def validate_data(cfg: Config, scan_features: bool = False) -> None:
    """The code store exists, is finished and matches the model, and every code and label in it is in range
    (a full memory-mapped scan). The features (Mirai-I, data.features) are checked for NaN / Inf per batch
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
        store.check(m.vocab_size, m.num_classes, features=scan_features and d.features)
    except CodeStoreError as err:
        raise ConfigError(f"data.codes: {err}") from None
    _check(len(store) >= cfg.train.global_batch, "train.global_batch",
           f"{cfg.train.global_batch} is larger than the store's {len(store)} images")
    if d.features:
        _check(store.features is not None, "data.features",
               f"true but the store {d.codes} has no features.npy (prepare it with --encoder)")
        feats = meta["features"]
        _check(int(feats["grid_size"]) == m.grid_size, "data.features",
               f"the store's features lie on a {feats['grid_size']}x{feats['grid_size']} patch grid, the token grid "
               f"is {m.grid_size}x{m.grid_size}")
        f = cfg.foresight
        if f.mode == "encoder":
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
            if f.use_precomputed_features:
                stored = int(meta.get("encoder_block_causal", 0) or 0)
                _check(stored == f.encoder.block_causal, "foresight.encoder.block_causal",
                       f"{f.encoder.block_causal} but the store's features were computed with block_causal={stored} "
                       f"(prepare them with --encoder-block-causal {f.encoder.block_causal}, or run the encoder "
                       "online with data.images)")
    if d.images is not None:
        from mirai.trainer.crops import ImageSourceError, StoreImages
        try:
            StoreImages(d.images, store).check()
        except ImageSourceError as err:
            raise ConfigError(str(err)) from err
