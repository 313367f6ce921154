"""autopar/dtensor.py: the adapter's own arithmetic against DTensor's."""

import random

import pytest
from torch.distributed.tensor.placement_types import _StridedShard, _StridedShardOffsetMode

from autopar import dtensor


def test_strided_local_sizes_equal_dtensors():
    # propagation asks a _StridedShard dim's local size; autopar computes it by arithmetic where
    # DTensor splits an arange of the whole dim (tests/planning/test_strategies.py checks the
    # strategies that come out; this checks the sizes over uneven splits too)
    rng = random.Random(0)
    for _ in range(2000):
        size, split, k = rng.randint(0, 300), rng.randint(1, 9), rng.randint(1, 9)
        rank = rng.randrange(k)
        want, _ = _StridedShard(0, split_factor=split).local_shard_size_and_offset(
            size, k, rank, _StridedShardOffsetMode.NONE)
        assert dtensor._strided_local_size(size, split, k, rank) == want, (size, split, k, rank)


def test_the_arithmetic_is_used_only_while_propagating():
    original = _StridedShard.local_shard_size_and_offset
    with dtensor._strided_sizes_by_arithmetic():
        assert _StridedShard.local_shard_size_and_offset is not original
        # offsets are still DTensor's
        size, offsets = _StridedShard(0, split_factor=2).local_shard_size_and_offset(
            8, 2, 1, _StridedShardOffsetMode.ALL)
        assert (size, offsets) == (4, [2, 3, 6, 7])
    assert _StridedShard.local_shard_size_and_offset is original
    with pytest.raises(RuntimeError), dtensor._strided_sizes_by_arithmetic():
        raise RuntimeError  # restored on errors too
    assert _StridedShard.local_shard_size_and_offset is original
