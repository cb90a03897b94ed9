"""Pieces of sharded parameters reassembled: ``FullGather`` (planned once, reused every step) writes into its
targets what it yields, each rank's piece in place and zeros elsewhere, across bucket boundaries, empty and
padded pieces, and after the pieces change in place.
One process here (each element has one holder); tests/test_ema_fp32_master.py runs both under ZeRO-1/2/3."""
from __future__ import annotations

import pytest
import torch

from mirai.trainer.shards import FullGather, Shard


def _pieces():
    g = torch.Generator().manual_seed(0)
    shards = [Shard((3, 4), 0, 12), Shard((5,), 2, 3), Shard((2, 2), 0, 0), Shard((7,), 1, 6), Shard((1,), 0, 1)]
    # local tensors: the piece plus padding (the last element of the (5,) piece and of the (7,) piece are padding)
    locals_ = [torch.randn(12, generator=g), torch.randn(4, generator=g), torch.empty(0),
               torch.randn(7, generator=g), torch.randn(1, generator=g)]
    return locals_, shards


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bucket", [1, 8, 1 << 20])
def test_full_gather_writes_and_yields_each_ranks_pieces(dtype, bucket):
    locals_, shards = _pieces()
    targets = [torch.full(s.shape, 7.0, dtype=dtype) for s in shards]
    gather = FullGather(locals_, shards, dtype, bucket_numel=bucket)
    for round_ in range(2):                                  # the plan is reused; the pieces change in place
        gather.into(targets)
        expected = [t.clone() for t in gather.tensors()]
        for got, want, shard in zip(targets, expected, shards):
            assert got.shape == shard.shape and got.dtype == dtype
            assert torch.equal(got, want)
            flat = got.reshape(-1)                           # this rank's elements, zeros where another holds them
            assert torch.equal(flat[shard.start:shard.start + shard.length],
                               locals_[shards.index(shard)][:shard.length].to(dtype))
            assert not flat[:shard.start].any() and not flat[shard.start + shard.length:].any()
        for t in locals_:
            t.mul_(-2.0)


def test_full_gather_refuses_a_target_list_of_another_length():
    locals_, shards = _pieces()
    gather = FullGather(locals_, shards, torch.float32)
    with pytest.raises(ValueError, match="FullGather.into: 4 targets for 5 shards"):
        gather.into([torch.zeros(s.shape) for s in shards[:4]])
