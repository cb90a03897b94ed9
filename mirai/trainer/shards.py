"""Pieces of parameters held by one rank (sharded fp32 masters) and the collective that reassembles them.

A ``Shard`` says which elements of a parameter a rank's local tensor holds: the first ``length``
elements of the flattened local tensor are the parameter's flattened elements ``[start, start + length)``;
elements of the local tensor past ``length`` are padding (a partition may pad the last rank's piece).
Every element of a parameter is held by exactly one rank. Which pieces a rank holds is the engine's to
say (``Engine.ema_shards``; DeepSpeed's layouts per stage: ``DeepSpeedEngine._fp32_masters``).

``FullGather(locals, shards, dtype)`` reassembles the full tensors (``shards[i].shape``, in ``dtype``) in
order: each rank writes its pieces into a zero-filled bucket of at most ``BUCKET_NUMEL`` elements and one
all-reduce (sum) per bucket completes them. The sum is exact in any dtype, every element having exactly
one non-zero contribution. It is a collective: every rank calls it with the same shapes in the same order.
Planned once (one bucket-sized buffer and its copy lists), it serves pieces gathered again and again (the
Mirai-E teacher, refreshed from the sharded EMA every step: ``into(targets)``, two multi-tensor copies and one
all-reduce per bucket, no Python per parameter) as well as a one-off read (``tensors()``, a checkpoint's EMA).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: elements per all-reduce bucket (128 MiB of bf16 / 256 MiB of fp32)
BUCKET_NUMEL = 1 << 26


@dataclass(frozen=True)
class Shard:
    """This rank's piece of one parameter (see the module docstring)."""

    shape: tuple[int, ...]
    start: int
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def take(self, full: torch.Tensor, local: torch.Tensor) -> None:
        """Copy this rank's piece of ``full`` (the whole parameter) into ``local`` (zeros past ``length``)."""
        if tuple(full.shape) != tuple(self.shape):
            raise ValueError(f"Shard.take: full tensor has shape {tuple(full.shape)}, the parameter {self.shape}")
        flat = local.view(-1)
        flat[self.length:].zero_()
        flat[:self.length].copy_(full.reshape(-1)[self.start:self.start + self.length])


def _buckets(shards: Sequence[Shard], bucket_numel: int) -> list[tuple[int, int, int]]:
    """(first, end, elements) of each bucket: consecutive shards of at most `bucket_numel` elements in all (one
    larger shard alone)."""
    out, i = [], 0
    while i < len(shards):
        j, total = i, 0
        while j < len(shards) and (j == i or total + shards[j].numel <= bucket_numel):
            total += shards[j].numel
            j += 1
        out.append((i, j, total))
        i = j
    return out


def _reduces() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FullGather:
    """The full tensors of `shards` from every rank's pieces `locals_`, planned once (see the module docstring).

    ``into(targets)`` writes them into ``targets`` (shaped ``shards[i].shape``, any float dtype); ``tensors()``
    yields them. ``locals_`` are read at every call, so they must stay the same tensors (updated in place)."""

    def __init__(self, locals_: Sequence[torch.Tensor], shards: Sequence[Shard], dtype: torch.dtype,
                 bucket_numel: int = BUCKET_NUMEL):
        if len(locals_) != len(shards):
            raise ValueError(f"FullGather: {len(locals_)} local tensors for {len(shards)} shards")
        self.buckets = _buckets(shards, bucket_numel)
        device = locals_[0].device if locals_ else torch.device("cpu")
        self.buffer = torch.empty(max((t for _, _, t in self.buckets), default=0), dtype=dtype, device=device)
        self.copy_in: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []   # per bucket: (buffer slices, pieces)
        self.views: list[list[torch.Tensor]] = []                                 # per bucket: full-shaped views
        for i, j, _ in self.buckets:
            dst, src, views, offset = [], [], [], 0
            for local, shard in zip(locals_[i:j], shards[i:j]):
                if shard.length:
                    lo = offset + shard.start
                    dst.append(self.buffer[lo:lo + shard.length])
                    src.append(local.view(-1)[:shard.length])
                views.append(self.buffer[offset:offset + shard.numel].view(shard.shape))
                offset += shard.numel
            self.copy_in.append((dst, src))
            self.views.append(views)

    def _fill(self, b: int) -> torch.Tensor:
        """Bucket `b` completed in the buffer (collective); its full-shaped views are ``self.views[b]``."""
        total = self.buckets[b][2]
        bucket = self.buffer[:total]                                              # [elements of the bucket]
        bucket.zero_()
        dst, src = self.copy_in[b]
        if dst:
            torch._foreach_copy_(dst, src)
        if _reduces():
            dist.all_reduce(bucket)
        return bucket

    def into(self, targets: Sequence[torch.Tensor]) -> None:
        """Write the full tensors into ``targets`` (collective)."""
        if len(targets) != sum(j - i for i, j, _ in self.buckets):
            raise ValueError(f"FullGather.into: {len(targets)} targets for "
                             f"{sum(j - i for i, j, _ in self.buckets)} shards")
        for b, (i, j, _) in enumerate(self.buckets):
            self._fill(b)
            torch._foreach_copy_(list(targets[i:j]), self.views[b])

    def tensors(self) -> Iterator[torch.Tensor]:
        """The full tensors in order (collective: iterate to the end on every rank). Each is a view of the shared
        buffer, valid until the iteration moves past its bucket: copy what you keep."""
        for b in range(len(self.buckets)):
            self._fill(b)
            yield from self.views[b]
