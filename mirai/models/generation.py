"""Sampling from the GPT / PAR models: KV-cache decoding with classifier-free guidance.

``generate(model, cond_idx [B], ...) -> LongTensor [B, N]`` returns token grids in raster order for any
model that exposes the cached-decoding interface of ``mirai.models.gpt.Transformer``:
``seq_len``, ``decode_schedule()`` (position ranges decoded per step: one token per step for GPT, one
whole group per step for PAR), ``embed_positions(seq_tokens, labels, start, end)``,
``decode_step(x, start_pos) -> float32 logits``, ``setup_caches``, ``caches``, ``prepare_inputs`` and
``sequence_to_raster``.

Classifier-free guidance: with guidance on, the batch is doubled as ``[labels; null class]`` (the
unconditional half uses label ``num_classes``), both halves share every sampled token, and the logits
used for sampling are ``u + s * (c - u)`` (c conditional, u unconditional, s = cfg_scale). As in LlamaGen,
guidance is on when ``cfg_scale > 1`` (``use_cfg`` forces it either way); scales below 1 are refused
(``cfg_scale=1`` is plain conditional sampling; unconditional samples come from the null label
``num_classes``). ``cfg_interval=(lo, hi)`` applies guidance only at steps i with ``lo <= i / n_steps < hi``
(fractions of the decoding steps); other steps use the conditional logits.

Sampling (``sample_logits``): temperature (0 = greedy argmax), then top-k (0 = off), then top-p (1 = off)
give the probabilities (``sampling_probs``); the draw is ``argmax(probs / q)`` with ``q ~ Exp(1)`` drawn by
``exponential_`` on a tensor shaped like ``probs`` from the optional ``generator`` (``draw_tokens``). That is
exactly what ``torch.multinomial(probs, 1)`` computes (same random numbers, same result), without its
host-side validity check, and it lets a compiled step take ``q`` as an input (``mirai.models.static_decode``).
"""
from __future__ import annotations

import torch


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``u + s * (c - u)``."""
    return uncond + scale * (cond - uncond)


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Float32 probabilities ``[R, V]`` of ``logits [..., V]`` (rows flattened) after temperature (> 0),
    top-k and top-p filtering."""
    V = logits.shape[-1]
    logits = logits.float().reshape(-1, V) / temperature                      # [R, V]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)           # [R, V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                            # mass of strictly better tokens
        sorted_logits = sorted_logits.masked_fill(mass_before > top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def draw_tokens(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [R, V]`` given ``noise [R, V] ~ Exp(1)``: ``argmax(probs / noise)``."""
    return (probs / noise).argmax(dim=-1)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row of ``logits [..., V]`` -> LongTensor ``[...]`` (see the module docstring)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)                 # [R, V]
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)    # multinomial's own draw
    return draw_tokens(probs, noise).reshape(logits.shape[:-1])


def uses_cfg(cfg_scale: float, use_cfg: bool | None = None) -> bool:
    """Whether guidance runs: ``cfg_scale > 1`` (LlamaGen's rule) unless ``use_cfg`` says otherwise."""
    return cfg_scale > 1.0 if use_cfg is None else bool(use_cfg)


def check_sampling_args(cfg_scale, cfg_interval, temperature, top_k, top_p) -> None:
    """ValueError naming the argument for settings ``generate`` refuses."""
    lo, hi = cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval={cfg_interval} must satisfy 0 <= lo <= hi <= 1 (fractions of the steps)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    if not cfg_scale >= 1.0:
        raise ValueError(f"cfg_scale={cfg_scale} must be >= 1 (1 = no guidance; guidance u + s (c - u) runs for "
                         "s > 1 as in LlamaGen; for unconditional samples use the null label num_classes)")


@torch.no_grad()
def generate(model, cond_idx: torch.Tensor, *, cfg_scale: float = 1.0,
             cfg_interval: tuple[float, float] = (0.0, 1.0), temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, use_cfg: bool | None = None,
             forced_tokens: torch.Tensor | None = None, return_logits: bool = False):
    """Sample ``[B, N]`` raster token grids for class labels ``cond_idx [B]``.

    forced_tokens: optional raster codes ``[B, N]`` fed instead of the samples (teacher forcing), to score
        a given image or to check the cached path against ``forward``.
    return_logits: also return the (guided) float32 logits used at each position, ``[B, N, V]`` in raster
        order; the result is then ``(tokens, logits)``.
    The model runs in eval mode for the call (its mode is restored after); KV caches are (re)allocated
    with ``model.setup_caches`` when missing or too small and kept for the next call.
    """
    check_sampling_args(cfg_scale, cfg_interval, temperature, top_k, top_p)
    if cond_idx.dim() != 1:
        raise ValueError(f"cond_idx must be LongTensor [B], got shape {tuple(cond_idx.shape)}")
    num_classes = model.config.num_classes
    if bool(((cond_idx < 0) | (cond_idx > num_classes)).any()):
        raise ValueError(f"cond_idx labels must be in [0, {num_classes}] ({num_classes} = unconditional)")
    ref = model.output.weight
    cond_idx = cond_idx.to(ref.device)
    B, T = cond_idx.shape[0], model.seq_len
    cfg = uses_cfg(cfg_scale, use_cfg)
    labels = torch.cat([cond_idx, torch.full_like(cond_idx, num_classes)]) if cfg else cond_idx
    Bm = labels.shape[0]                                                          # model batch (2B with CFG)

    caches = model.caches
    if (caches is None or caches[0].max_batch_size < Bm or caches[0].max_seq_length < T
            or caches[0].k.dtype != ref.dtype or caches[0].k.device != ref.device):
        model.setup_caches(Bm, T, dtype=ref.dtype, device=ref.device)

    forced_seq = None
    if forced_tokens is not None:
        forced_seq = model.prepare_inputs(forced_tokens.to(ref.device))[1]         # [B, T] sequence order
    seq = torch.zeros(Bm, T, dtype=torch.long, device=ref.device)                 # tokens, sequence order
    all_logits = None
    schedule = model.decode_schedule()
    n_steps = len(schedule)
    lo, hi = cfg_interval

    was_training = model.training
    model.eval()
    try:
        for i, (start, end) in enumerate(schedule):
            x = model.embed_positions(seq, labels, start, end)                    # [Bm, S, D]
            logits = model.decode_step(x, start)                                  # [Bm, S, V] fp32
            if cfg:
                cond, uncond = logits[:B], logits[B:]
                logits = guided_logits(cond, uncond, cfg_scale) if lo <= i / n_steps < hi else cond
            if return_logits:
                if all_logits is None:
                    all_logits = torch.zeros(B, T, logits.shape[-1], dtype=torch.float32, device=ref.device)
                all_logits[:, start:end] = logits
            if forced_seq is not None:
                tokens = forced_seq[:, start:end]
            else:
                tokens = sample_logits(logits, temperature, top_k, top_p, generator)   # [B, S]
            seq[:B, start:end] = tokens
            if cfg:
                seq[B:, start:end] = tokens
    finally:
        model.train(was_training)

    out = model.sequence_to_raster(seq[:B])                                       # [B, N] raster
    if return_logits:
        return out, model.sequence_to_raster(all_logits)
    return out
