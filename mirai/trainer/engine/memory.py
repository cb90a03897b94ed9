"""Per-rank memory estimate of a training run, and the engine ``train.backend=auto`` picks from it.

    sizes = model_sizes(cfg)                                   # parameter counts, from the model built on "meta"
    est = estimate(sizes, cfg, "ddp", world_size=8)            # -> Estimate (bytes per rank, by part)
    choice = choose_engine(cfg, world_size=8, device_memory=80e9)   # -> EngineChoice(backend, zero_stage, ...)
    print(choice.line())

The estimate (bytes per rank; P = trainable parameters, GPT + foresight heads; N = ranks; "/N" where the
engine partitions that part):

* model states, plain engine (single process / DDP; fp32 master weights): 16 B per trainable parameter
  (fp32 weight 4, fp32 gradient 4, AdamW moments 8; DDP's buckets are views of the gradients), plus under
  bf16 autocast 2 B per matmul weight (the bf16 copies autocast casts and the backward keeps).
  DeepSpeed, bf16: bf16 weights 2 (/N at ZeRO-3) + bf16 gradients 2 (/N at ZeRO >= 2) + fp32 master
  weights and moments 12 and the fp32 gradient partition at the step 4 (/N at ZeRO >= 1). DeepSpeed, fp32:
  weights 4 + gradients 4 + moments 8 with the same partitioning.
* EMA: fp32 shadow 4 B per GPT parameter (/N at ZeRO-3); teacher: 2 B per parameter the foresight source keeps
  frozen (``ForesightSource.frozen_params``: Mirai-E's teacher, the online Mirai-I encoder).
* activations of one micro-batch, tokens = micro_batch x block_size, D = width, H = SwiGLU hidden:
  per block and token (34 D + 8 H) bytes under bf16 autocast, (48 D + 16 H) under fp32, plus one D-wide
  mask per active dropout layer (residual, feed-forward) of 2 (bf16) or 4 (fp32) bytes per element: what
  eager PyTorch keeps for the backward, counted with saved-tensor hooks on the CPU (the fp32 residual
  stream and norm outputs, the linears' bf16 inputs, q/k/v and the attention output, SwiGLU's H-wide
  tensors; tests/test_backend_choice.py checks the count). On CUDA a dropout mask is 1 byte per element,
  so the count errs high there by up to 2 D. With activation checkpointing: 4 D per block (its fp32 input)
  plus one block's set. Outside the blocks: 14 D per token, and the fused output layer's fp32 weight
  gradient 4 V D plus one chunk's logits (chunk x V x 8). Foresight heads: the hidden-state gradient and
  the teacher targets (4 D + 2 C per token) plus the fused op's workspace
  (``mirai.ops.foresight.DEFAULT_MEMORY_BUDGET``).
* buffers: DeepSpeed ZeRO-1/2's reduction bucket (reduce_bucket_size elements of the gradient dtype, or
  all gradients if fewer); ZeRO-3's gathered parameters (two blocks in bf16 plus its prefetch bucket).

Against the measured peaks of docs/performance.md (one H100, single-process engine, bf16 autocast, fp32 master weights,
``torch.compile`` model scope): GPT-B at micro 32 is estimated at 7.3 GB (measured 5.7), GPT-XXL at micro
16 at 49.4 GB (measured 38.8), Mirai-E 8.2 and 52.1 GB (measured 6.2 and 40.6): 1.27-1.32x the compiled
peaks, because Inductor recomputes the norms, the SwiGLU product and the dropout masks in the backward
instead of keeping them; without ``train.compile`` the counted tensors are what is kept. The estimate is
meant to err on that side.

The choice (``choose_engine``): the memory a rank may plan for is ``HEADROOM`` (0.9) of the device's
memory (CUDA: the device's total; CPU: physical memory divided among this host's ranks, since they
share it). ``train.backend=auto``: one rank -> the single-process engine; ``train.zero_stage`` set ->
DeepSpeed at that stage (an explicit stage asks for DeepSpeed); else DDP when a full replica fits (fp32
master weights, the lowest host cost: one C++ hook and one bucket copy per parameter, no Python per
parameter), else the lowest ZeRO stage (1, 2, 3) that fits, else ZeRO-3 with a warning in the reason.
``train.backend=deepspeed`` without a stage: the lowest of 1, 2, 3 that fits (ZeRO-0 only when asked for:
its bf16 path costs more host time than ZeRO-1 and saves no memory). An explicit ``train.backend``
(single / ddp / deepspeed) and an explicit stage are always obeyed; the line printed at start-up says what
was chosen and why, with the estimate.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

HEADROOM = 0.9                       # fraction of the device memory a rank plans for (context, fragmentation)
GB = 1e9


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs from the model (``model_sizes``)."""

    params: int              # trainable parameters: GPT + foresight heads
    gpt_params: int          # the GPT's (what the EMA averages)
    matmul_params: int       # weights of the Linear layers (autocast keeps a bf16 copy of each for the backward)
    teacher_params: int      # frozen bf16 teacher: Mirai-E's first blocks + embeddings, or the online encoder
    block_params: int        # one transformer block (ZeRO-3 gathers a block at a time)
    dim: int
    ffn_hidden: int
    n_layer: int
    vocab: int
    seq_len: int             # tokens per image
    head_out: int = 0        # foresight target width C (0: no heads)
    head_chunk: int = 2048   # fused output layer's chunk (rows)
    dropout_masks: int = 2   # dropout layers per block that keep a mask (residual, feed-forward)


@dataclass
class Estimate:
    """Bytes per rank of one engine, by part."""

    engine: str                                  # "plain" | "zero0" .. "zero3"
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        """'33.5 GB (states 8.5, ema 5.6, ...)'; small models in MB; parts under 5% of the unit left out."""
        unit, name = (GB, "GB") if self.total >= 0.1 * GB else (GB / 1024, "MB")
        inner = ", ".join(f"{k} {v / unit:.1f}" for k, v in self.parts.items() if v >= 0.05 * unit)
        return f"{self.total / unit:.1f} {name} ({inner})"


@dataclass
class EngineChoice:
    """What ``choose_engine`` decided: backend, ZeRO stage (DeepSpeed only), the estimate and why."""

    backend: str                                 # "single" | "ddp" | "deepspeed"
    zero_stage: int | None
    estimate: Estimate
    usable: float | None                         # bytes a rank may plan for (None: unknown)
    reason: str

    def line(self) -> str:
        engine = self.backend + (f" ZeRO-{self.zero_stage}" if self.backend == "deepspeed" else "")
        budget = "no device memory figure" if self.usable is None else f"{self.usable / GB:.1f} GB usable per rank"
        return f"engine {engine} ({self.reason}; estimate {self.estimate.describe()} of {budget})"


# --------------------------------------------------------------------------- sizes
def model_sizes(cfg) -> ModelSizes:
    """Parameter counts of the configured model, heads and teacher, built on the meta device (no memory)."""
    from mirai.models.gpt import build_gpt
    with torch.device("meta"):
        gpt = build_gpt(cfg.model.name, **cfg.model.gpt_overrides())
        c = gpt.config
        f = cfg.foresight.resolve(c) if cfg.foresight.enabled else None
        heads = heads_matmul = head_out = teacher = 0
        if f is not None and f.injection == "internal":
            from mirai.foresight.heads import ForesightHeads
            module = ForesightHeads(c.dim, f.head_out, f.k, hidden=f.head_hidden, kind=f.head_kind)
            heads = sum(p.numel() for p in module.parameters())
            heads_matmul = sum(p.numel() for p in module.parameters() if p.dim() >= 2)
            head_out = int(f.head_out)
        elif f is not None:                                   # output injection: K extra output layers [K, V, D]
            heads = heads_matmul = f.k * c.vocab_size * c.dim
    count = lambda mod: sum(p.numel() for p in mod.parameters())                  # noqa: E731
    gpt_params = count(gpt)
    if f is not None:                                         # what the run's foresight source keeps frozen
        from mirai.foresight.sources import source_type
        teacher = source_type(f).frozen_params(f, gpt)
    matmuls = sum(m.weight.numel() for m in gpt.modules() if isinstance(m, torch.nn.Linear))
    return ModelSizes(params=gpt_params + heads, gpt_params=gpt_params,
                      matmul_params=matmuls + heads_matmul, teacher_params=teacher,
                      block_params=count(gpt.layers[0]), dim=c.dim, ffn_hidden=c.ffn_hidden_dim, n_layer=c.n_layer,
                      vocab=c.vocab_size, seq_len=c.block_size, head_out=head_out,
                      head_chunk=c.fused_ce_chunk_size,
                      dropout_masks=int(c.resid_dropout_p > 0) + int(c.ffn_dropout_p > 0))


# --------------------------------------------------------------------------- estimate
def block_activation_bytes(sizes: ModelSizes, bf16: bool) -> float:
    """Bytes one transformer block keeps for its backward, per token (see the module docstring)."""
    D, H = sizes.dim, sizes.ffn_hidden
    return (34 * D + 8 * H + 2 * D * sizes.dropout_masks) if bf16 else (48 * D + 16 * H + 4 * D * sizes.dropout_masks)


def activation_bytes(sizes: ModelSizes, tokens: int, bf16: bool, checkpointing: bool) -> float:
    """What one micro-batch keeps for its backward (see the module docstring)."""
    D = sizes.dim
    per_block = block_activation_bytes(sizes, bf16)
    blocks = sizes.n_layer * (4 * D if checkpointing else per_block) + (per_block if checkpointing else 0)
    outside = 14 * D * tokens + 4 * sizes.vocab * D + sizes.head_chunk * sizes.vocab * 8
    heads = 0.0
    if sizes.head_out:
        from mirai.ops.foresight import DEFAULT_MEMORY_BUDGET
        heads = (4 * D + 2 * sizes.head_out) * tokens + DEFAULT_MEMORY_BUDGET
    return blocks * tokens + outside + heads


def estimate(sizes: ModelSizes, cfg, engine: str, world_size: int) -> Estimate:
    """Bytes per rank of `engine` ("plain" for single / DDP, "zero0" .. "zero3" for DeepSpeed)."""
    t = cfg.train
    bf16 = t.precision == "bf16"
    N = max(1, int(world_size))
    P, parts = sizes.params, {}
    stage = None if engine == "plain" else int(engine[-1])
    if stage is None:
        parts["states"] = 16 * P + (2 * sizes.matmul_params if bf16 else 0)
    else:
        w = 2 if bf16 else 4
        master = (16 if bf16 else 8) * P               # bf16: fp32 master 4 + moments 8 + fp32 grad partition 4
        parts["states"] = (w * P / (N if stage == 3 else 1) + w * P / (N if stage >= 2 else 1)
                           + master / (N if stage >= 1 else 1))
    parts["ema"] = (4 * sizes.gpt_params / (N if stage == 3 else 1)) if cfg.ema.enabled else 0
    parts["teacher"] = 2 * sizes.teacher_params
    tokens = t.micro_batch * sizes.seq_len
    parts["activations"] = activation_bytes(sizes, tokens, bf16, t.activation_checkpointing)
    from mirai.trainer.engine.deepspeed_engine import ZERO3_PREFETCH_BUCKET, ZERO_REDUCE_BUCKET
    buffers = 0.0
    if stage in (1, 2):
        buffers = min(ZERO_REDUCE_BUCKET, P) * (2 if bf16 else 4)
    elif stage == 3:
        buffers = (2 * sizes.block_params + ZERO3_PREFETCH_BUCKET) * (2 if bf16 else 4)
    parts["buffers"] = buffers
    return Estimate(engine, parts)


def device_memory(device: torch.device, local_world_size: int) -> float | None:
    """Bytes of memory one rank has: the CUDA device's total, or on the CPU the host's physical memory
    divided among its ranks; None when it cannot be read."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / max(1, local_world_size)
    except (ValueError, OSError, AttributeError):
        return None


# --------------------------------------------------------------------------- choice
def choose_engine(cfg, world_size: int, device_memory: float | None, sizes: ModelSizes | None = None
                  ) -> EngineChoice:
    """The engine of a run (see the module docstring for the rules). `device_memory` in bytes per rank.
    Raises ``ConfigError`` naming ``train.compile_scope`` when it asks for one graph of the whole model and
    the chosen engine can only run compiled blocks (ZeRO-3)."""
    from mirai.trainer.engine.build import needs_block_compile
    choice = _choose(cfg, world_size, device_memory, sizes)
    t = cfg.train
    if t.compile_scope == "model" and needs_block_compile(t, choice.backend, choice.zero_stage):
        from mirai.config import ConfigError
        by = (f"which this run needs by the memory estimate ({choice.estimate.describe()}); use 'blocks' or "
              "'auto', or set train.backend and train.zero_stage") if t.zero_stage is None else \
             "use 'blocks' or 'auto'"
        raise ConfigError(f"train.compile_scope: 'model' cannot run under DeepSpeed ZeRO-3 (it gathers each "
                          f"module's partitioned parameters around that module's own forward), {by}")
    return choice


def _choose(cfg, world_size: int, device_memory: float | None, sizes: ModelSizes | None) -> EngineChoice:
    t = cfg.train
    sizes = sizes if sizes is not None else model_sizes(cfg)
    usable = None if device_memory is None else HEADROOM * device_memory
    fits = lambda est: usable is None or est.total <= usable                    # noqa: E731
    plain = estimate(sizes, cfg, "plain", world_size)
    zero = {s: estimate(sizes, cfg, f"zero{s}", world_size) for s in range(4)}

    def lowest_zero(why: str) -> EngineChoice:
        stage = next((s for s in (1, 2, 3) if fits(zero[s])), None)
        if stage is None:
            return EngineChoice("deepspeed", 3, zero[3], usable, f"{why}: not even ZeRO-3 fits by the estimate "
                                "(try train.activation_checkpointing=true or a smaller train.micro_batch)")
        return EngineChoice("deepspeed", stage, zero[stage], usable,
                            f"{why}: ZeRO-{stage} is the lowest stage that fits")

    if t.backend in ("single", "ddp"):
        return EngineChoice(t.backend, None, plain, usable, f"train.backend={t.backend}")
    if t.backend == "deepspeed":
        if t.zero_stage is not None:
            return EngineChoice("deepspeed", t.zero_stage, zero[t.zero_stage], usable,
                                f"train.backend=deepspeed, train.zero_stage={t.zero_stage}")
        return lowest_zero("train.backend=deepspeed")
    if world_size == 1:
        return EngineChoice("single", None, plain, usable, "auto: one rank")
    if t.zero_stage is not None:
        return EngineChoice("deepspeed", t.zero_stage, zero[t.zero_stage], usable,
                            f"auto: train.zero_stage={t.zero_stage} asks for DeepSpeed")
    if fits(plain):
        return EngineChoice("ddp", None, plain, usable, "auto: a full replica fits, DDP keeps fp32 master weights "
                            "at the lowest host cost")
    return lowest_zero("auto: a full replica does not fit")


def engine_planner(cfg):
    """The planner ``mirai.trainer.distributed.setup`` takes for this run: ``choose_engine`` with the memory
    of this rank's device."""
    return lambda device, world_size, local_world_size: choose_engine(
        cfg, world_size, device_memory(device, local_world_size))
