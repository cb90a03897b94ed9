"""Fixed-shape KV-cache decoding that compiles as one graph per step size and can run as CUDA graphs.

``StaticDecoder(model, max_batch, cfg_scale=..., ...)`` allocates everything a sampling call needs
once, at full length: one ``StaticKVCache`` per block (``[Bm, Hkv, T, hd]``, Bm = 2 * max_batch with
guidance), the token sequence ``[Bm, T]``, the labels ``[Bm]``, the sampling noise ``[max_batch, S, V]``
and, per phase of the model's ``decode_schedule()`` (runs of steps with the same number S of positions:
GPT one phase of T steps with S = 1; PAR n steps with S = 1, then the parallel groups with S = n), a
table of the positions of each step ``[steps, S]``, a table of whether guidance applies at each step
``[steps]`` (the ``cfg_interval`` rule of ``generation.generate``) and a step counter (a 0-dim device
tensor). One decoding step then reads only those tensors:

    positions = table[counter]                           # [S], a device tensor: no host read
    x = model.embed_at(seq, labels, positions)           # [Bm, S, D]
    logits = model.decode_step(x, positions, caches)     # whole cache, mask gid[j] <= gid[position]
    logits = where(cfg_on[counter], u + s (c - u), c)    # guidance, when built with it
    tokens = argmax(sampling_probs(logits) / noise)      # temperature / top-k / top-p, the Exp(1) draw
    seq[:, positions] = tokens; counter += 1             # in place

so every step of a phase has the same shapes, no data-dependent Python branch and no host
synchronisation: ``torch.compile(fullgraph=True)`` traces it without graph breaks, and on CUDA
(``mode="reduce-overhead"``, the default with ``compile=True``) it is replayed as a CUDA graph, every
tensor it touches being allocated once and marked static (``torch._dynamo.mark_static_address``).
The sampling constants (scale, temperature, top-k, top-p) are fixed per decoder: one set of graphs.

Randomness stays outside the graph: before each sampling step the noise is drawn in place with
``exponential_`` from the caller's generator on exactly the elements ``generation.sample_logits``
draws for the same batch (rows ``[:n]`` of the noise, ``n * S * V`` values), so for the same
generator the decoder consumes the same random numbers as the eager ``generate`` and, its logits
agreeing to float rounding, returns the same tokens (tested on CPU, compiled and not).

``generate(labels [n <= max_batch], generator) -> LongTensor [n, N]`` raster codes, like
``model.generate``. Rows past ``n`` are padding (label 0) and are thrown away.

``compile``: False runs the same fixed-shape step eagerly (already free of host synchronisation);
True compiles it with inductor (``mode`` default "reduce-overhead" on CUDA, i.e. CUDA graphs, and
"default" on CPU); a string names another ``torch.compile`` backend ("eager": dynamo's full-graph
trace without code generation, which the tests use to check for graph breaks quickly).
"""
from __future__ import annotations

import torch

from mirai.models.attention import StaticKVCache
from mirai.models.generation import check_sampling_args, draw_tokens, guided_logits, sampling_probs, uses_cfg


class StaticDecoder:
    """See the module docstring."""

    def __init__(self, model, max_batch: int, *, cfg_scale: float = 1.0,
                 cfg_interval: tuple[float, float] = (0.0, 1.0), temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, use_cfg: bool | None = None, compile: bool | str = False,
                 mode: str | None = None):
        check_sampling_args(cfg_scale, cfg_interval, temperature, top_k, top_p)
        if max_batch < 1:
            raise ValueError(f"StaticDecoder: max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.max_batch = int(max_batch)
        self.cfg = uses_cfg(cfg_scale, use_cfg)
        self.cfg_scale, self.temperature, self.top_k, self.top_p = float(cfg_scale), temperature, top_k, top_p
        c = model.config
        ref = model.output.weight
        device, dtype = ref.device, ref.dtype
        self.device = device
        T, V = model.seq_len, c.vocab_size
        bm = 2 * self.max_batch if self.cfg else self.max_batch
        self.caches = [StaticKVCache(bm, T, c.n_kv_head or c.n_head, c.head_dim, dtype, device) for _ in model.layers]
        self.seq = torch.zeros(bm, T, dtype=torch.long, device=device)            # tokens, sequence order
        self.labels = torch.zeros(bm, dtype=torch.long, device=device)
        if self.cfg:
            self.labels[self.max_batch:] = c.num_classes                          # the null class
        schedule = model.decode_schedule()
        lo, hi = cfg_interval
        self.phases: list[tuple[torch.Tensor, torch.Tensor]] = []                # (positions [steps, S], cfg [steps])
        i = 0
        while i < len(schedule):
            size = schedule[i][1] - schedule[i][0]
            j = i
            while j < len(schedule) and schedule[j][1] - schedule[j][0] == size:
                j += 1
            pos = torch.tensor([list(range(a, b)) for a, b in schedule[i:j]], dtype=torch.long, device=device)
            on = torch.tensor([lo <= k / len(schedule) < hi for k in range(i, j)], dtype=torch.bool, device=device)
            self.phases.append((pos, on))
            i = j
        s_max = max(p.shape[1] for p, _ in self.phases)
        self.noise = torch.ones(self.max_batch * s_max * V, dtype=torch.float32, device=device)
        self.counter = torch.zeros((), dtype=torch.long, device=device)
        self._step_fn = self._step
        if compile:
            for t in [self.seq, self.labels, self.noise, self.counter, *[t for p in self.phases for t in p],
                      *[t for cache in self.caches for t in (cache.k, cache.v)]]:
                torch._dynamo.mark_static_address(t)
            backend = "inductor" if compile is True else str(compile)
            if backend == "inductor":
                mode = mode or ("reduce-overhead" if device.type == "cuda" else "default")
            self._step_fn = torch.compile(self._step, fullgraph=True, dynamic=False, backend=backend, mode=mode)

    @torch.no_grad()
    def _step(self, positions_table: torch.Tensor, cfg_table: torch.Tensor) -> None:
        """One decoding step of a phase (see the module docstring); everything happens in place."""
        model, b = self.model, self.max_batch
        positions = positions_table[self.counter]                                 # [S]
        s = positions.shape[0]
        x = model.embed_at(self.seq, self.labels, positions)                      # [Bm, S, D]
        logits = model.decode_step(x, positions, self.caches)                     # [Bm, S, V] fp32
        if self.cfg:
            cond, uncond = logits[:b], logits[b:]
            logits = torch.where(cfg_table[self.counter], guided_logits(cond, uncond, self.cfg_scale), cond)
        if self.temperature == 0.0:
            tokens = logits.argmax(dim=-1)                                        # [B, S]
        else:
            probs = sampling_probs(logits, self.temperature, self.top_k, self.top_p)   # [B*S, V]
            tokens = draw_tokens(probs, self.noise[:probs.numel()].view_as(probs)).view(b, s)
        if self.cfg:
            tokens = torch.cat([tokens, tokens])                                  # [Bm, S]
        self.seq.index_copy_(1, positions, tokens)
        self.counter.add_(1)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raster codes ``[n, N]`` for class labels ``labels [n]`` (n <= max_batch)."""
        n = labels.shape[0] if labels.dim() == 1 else -1
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"StaticDecoder.generate: labels must be LongTensor [n] with 1 <= n <= "
                             f"{self.max_batch}, got shape {tuple(labels.shape)}")
        num_classes = self.model.config.num_classes
        if bool(((labels < 0) | (labels > num_classes)).any()):
            raise ValueError(f"StaticDecoder.generate: labels must be in [0, {num_classes}] "
                             f"({num_classes} = unconditional)")
        self.labels[:n].copy_(labels)
        self.labels[n:self.max_batch].zero_()
        vocab = self.model.config.vocab_size
        for positions, cfg_on in self.phases:
            self.counter.zero_()
            drawn = self.noise[:n * positions.shape[1] * vocab]                   # what sample_logits draws
            for _ in range(positions.shape[0]):
                if self.temperature != 0.0:
                    drawn.exponential_(1.0, generator=generator)
                self._step_fn(positions, cfg_on)
        return self.model.sequence_to_raster(self.seq[:n]).clone()
