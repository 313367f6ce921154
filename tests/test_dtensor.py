"""autopar/dtensor.py and dtensor_speedups.py: the adapter's own arithmetic against DTensor's."""

import random

import pytest
from torch.distributed.tensor.placement_types import _StridedShard, _StridedShardOffsetMode

from autopar import dtensor, dtensor_speedups


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
        assert dtensor_speedups._strided_local_size(size, split, k, rank) == want, \
            (size, split, k, rank)


def test_the_arithmetic_is_used_only_while_propagating():
    original = _StridedShard.local_shard_size_and_offset
    with dtensor_speedups._strided_sizes_by_arithmetic():
        assert _StridedShard.local_shard_size_and_offset is not original
        # offsets are still DTensor's
        size, offsets = _StridedShard(0, split_factor=2).local_shard_size_and_offset(
            8, 2, 1, _StridedShardOffsetMode.ALL)
        assert (size, offsets) == (4, [2, 3, 6, 7])
    assert _StridedShard.local_shard_size_and_offset is original
    with pytest.raises(RuntimeError), dtensor_speedups._strided_sizes_by_arithmetic():
        raise RuntimeError  # restored on errors too
    assert _StridedShard.local_shard_size_and_offset is original


def _specs(placement_sets):
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    mesh = dtensor.planning_mesh((2, 2, 2), ("a", "b", "c"))
    return [DTensorSpec(mesh, tuple(pl)) for pl in placement_sets]


def test_kept_shard_orders_equal_dtensors_and_bad_orders_still_raise():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, ShardOrderEntry
    options = [Replicate(), Shard(0), Shard(1), Partial()]
    sets = [(a, b, c) for a in options for b in options for c in options]
    want = [s.shard_order for s in _specs(sets)]
    original = (DTensorSpec.__dict__["compute_default_shard_order"],
                DTensorSpec.__dict__["_verify_shard_order"])
    with dtensor_speedups._shard_orders_kept():
        for _ in range(2):  # computed, then kept
            assert [s.shard_order for s in _specs(sets)] == want
        mesh = dtensor.planning_mesh((2, 2, 2), ("a", "b", "c"))
        wrong = (ShardOrderEntry(tensor_dim=1, mesh_dims=(0,)),)
        for _ in range(2):  # a mismatch is never kept as verified
            with pytest.raises(AssertionError):
                DTensorSpec(mesh, (Shard(0), Replicate(), Replicate()), shard_order=wrong)
    assert (DTensorSpec.__dict__["compute_default_shard_order"],
            DTensorSpec.__dict__["_verify_shard_order"]) == original


def test_kept_redistribute_costs_equal_dtensors():
    import torch
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._collective_utils import redistribute_cost
    from torch.distributed.tensor._dtensor_spec import TensorMeta
    from torch.distributed.tensor._ops import utils
    options = [Replicate(), Shard(0), Shard(1), Partial()]
    sets = [(a, b, c) for a in options for b in options for c in options]
    specs = _specs(sets)
    for s, shape in zip(specs, [(8, 16), (16, 8), (4, 4)] * len(specs)):
        s.tensor_meta = TensorMeta(torch.Size(shape), (shape[1], 1), torch.float32)
    pairs = [(x, y) for x in specs[::7] for y in specs[::5]
             if x.tensor_meta.shape == y.tensor_meta.shape]
    want = [redistribute_cost(x, y) for x, y in pairs]
    with dtensor_speedups._redistribute_costs_kept():
        for _ in range(2):
            assert [utils.redistribute_cost(x, y) for x, y in pairs] == want
    assert utils.redistribute_cost is redistribute_cost
