"""Cost model: every number below is worked out by hand from the formulas in autopar/planning/cost.py."""

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.cluster import Cluster, DeviceSpec, Link
from autopar.errors import ClusterSpecError
from autopar.planning.cost import (
    collective_time_s,
    compute_time_s,
    host_time_s,
    reshard_time_s,
    sharded_numel,
)

GB = 1e9
LINK = Link(bandwidth_bytes_per_s=1 * GB, latency_s=1e-5)
FREE = Link(bandwidth_bytes_per_s=1 * GB, latency_s=0.0)  # bandwidth term only
# A 2x4 mesh on 2 nodes of 4: axis 0 crosses nodes, axis 1 stays in one.
INTER = Link(bandwidth_bytes_per_s=1e8, latency_s=1e-5)
INTRA = Link(bandwidth_bytes_per_s=1e9, latency_s=1e-6)
DEVICE = DeviceSpec(name="toy", memory_bytes=10**9, hbm_bandwidth_bytes_per_s=1e12,
                    peak_flops={"bfloat16": 100e12, "float32": 10e12})
approx = pytest.approx


class TestComputeTime:
    def test_compute_bound(self):
        # 1e12 FLOPs / 100e12 = 0.01 s > 1e9 bytes / 1e12 = 0.001 s
        assert compute_time_s(1e12, 1e9, DEVICE, torch.bfloat16) == approx(0.01)

    def test_memory_bound(self):
        # 1e9 / 100e12 = 1e-5 s < 1e12 / 1e12 = 1 s
        assert compute_time_s(1e9, 1e12, DEVICE, "bfloat16") == approx(1.0)

    def test_dtype_picks_peak(self):
        assert compute_time_s(1e12, 0, DEVICE, torch.float32) == approx(0.1)

    def test_no_flops_needs_no_peak(self):
        assert compute_time_s(0, 2e12, DEVICE, torch.int64) == approx(2.0)

    def test_missing_dtype_names_field(self):
        with pytest.raises(ClusterSpecError, match=r"device\.peak_flops\.float64"):
            compute_time_s(1.0, 0, DEVICE, torch.float64)


class TestCalibratedComputeTime:
    CAL = DeviceSpec(name="toy", memory_bytes=10**9, hbm_bandwidth_bytes_per_s=1e12,
                     peak_flops={"bfloat16": 100e12},
                     calibration={"matmul": 0.5, "memory": 0.25, "kernel_s": 1e-4,
                                  "ops": {"aten.gelu.default": 0.1},
                                  "host_s_per_op": {"replay": 2e-5, "eager": 4e-4}})

    def test_classes_scale_their_peak(self):
        assert compute_time_s(1e12, 1e9, self.CAL, "bfloat16") == approx(0.01 / 0.5)
        assert compute_time_s(1e9, 1e12, self.CAL, "bfloat16") == approx(1.0 / 0.25)

    def test_a_measured_op_uses_its_own_fraction(self):
        assert compute_time_s(0, 1e12, self.CAL, "bfloat16", op="aten.gelu.default") == \
            approx(1.0 / 0.1)

    def test_no_op_is_faster_than_the_floor(self):
        assert compute_time_s(1.0, 1.0, self.CAL, "bfloat16") == approx(1e-4)
        assert compute_time_s(0, 0, self.CAL, "bfloat16") == 0.0  # a view: nothing runs

    def test_host_time_per_runtime(self):
        assert host_time_s(100, self.CAL) == approx(2e-3)
        assert host_time_s(100, self.CAL, "eager") == approx(4e-2)
        assert host_time_s(100, DEVICE) == 0.0  # uncalibrated: a free host

    def test_a_fraction_above_one_is_refused(self):
        with pytest.raises(ClusterSpecError, match=r"calibration\.matmul"):
            DeviceSpec(name="toy", memory_bytes=1, hbm_bandwidth_bytes_per_s=1.0,
                       peak_flops={"bfloat16": 1.0}, calibration={"matmul": 1.5})


class TestCollectiveTime:
    B = 4 * GB

    def test_all_reduce(self):
        # 2*3/4 * 4 GB / 1 GB/s = 6 s, + 2*3 * 10 us
        assert collective_time_s("all_reduce", self.B, 4, LINK) == approx(6 + 6e-5)

    @pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter", "all_to_all"])
    def test_one_pass(self, kind):
        # 3/4 * 4 GB / 1 GB/s = 3 s, + 3 * 10 us
        assert collective_time_s(kind, self.B, 4, LINK) == approx(3 + 3e-5)

    def test_two_ranks(self):
        # 2*1/2 * 1 GB / 1 GB/s = 1 s, + 2 * 10 us
        assert collective_time_s("all_reduce", 1 * GB, 2, LINK) == approx(1 + 2e-5)

    @pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
    def test_group_of_one_is_free(self, kind):
        assert collective_time_s(kind, self.B, 1, LINK) == 0.0

    def test_a_tensor_in_a_bucket_pays_its_share_of_the_latency(self):
        # a quarter of a 4 GB bucket: 3/4 * 1 GB / 1 GB/s, + a quarter of 3 * 10 us
        assert collective_time_s("all_gather", 1 * GB, 4, LINK, bucket_bytes=4 * GB) == approx(
            0.75 + 0.75e-5)
        # a tensor larger than the bucket travels alone
        assert collective_time_s("all_gather", 8 * GB, 4, LINK, bucket_bytes=4 * GB) == approx(
            collective_time_s("all_gather", 8 * GB, 4, LINK))

    def test_unknown_kind(self):
        with pytest.raises(ValueError, match="broadcast"):
            collective_time_s("broadcast", self.B, 4, LINK)


class TestShardedNumel:
    def test_replicate_and_partial_hold_everything(self):
        assert sharded_numel((8, 6), (Replicate(), Partial()), (2, 4)) == 48

    def test_shard_each_axis(self):
        assert sharded_numel((8, 6), (Shard(0), Shard(1)), (2, 3)) == 4 * 2

    def test_same_dim_on_two_axes_uneven(self):
        # 10 rows -> ceil(10/2) = 5 -> ceil(5/2) = 3
        assert sharded_numel((10, 4), (Shard(0), Shard(0)), (2, 2)) == 12

    def test_negative_dim(self):
        assert sharded_numel((8, 6), (Shard(-1),), (4,)) == 8 * 2

    def test_wrong_length(self):
        with pytest.raises(ValueError, match="one per axis"):
            sharded_numel((8,), (Shard(0),), (2, 2))


class TestReshard1D:
    # (1024, 1024) float32 on 4 ranks: B = 4 MiB
    B = 1024 * 1024 * 4

    def cost(self, src, dst):
        return reshard_time_s((src,), (dst,), (1024, 1024), 4, (4,), (FREE,))

    def test_same_is_free(self):
        assert self.cost(Shard(0), Shard(0)) == 0.0

    def test_partial_to_replicate(self):
        assert self.cost(Partial(), Replicate()) == approx(2 * 3 / 4 * self.B / GB)

    def test_partial_to_shard(self):
        assert self.cost(Partial(), Shard(1)) == approx(3 / 4 * self.B / GB)

    def test_shard_to_replicate(self):
        assert self.cost(Shard(0), Replicate()) == approx(3 / 4 * self.B / GB)

    def test_shard_to_shard(self):
        # all_to_all of the local quarter: 3/4 * B/4
        assert self.cost(Shard(0), Shard(1)) == approx(3 / 4 * self.B / 4 / GB)

    def test_shard_to_partial(self):
        assert self.cost(Shard(1), Partial()) == approx(3 / 4 * self.B / GB)

    @pytest.mark.parametrize("dst", [Shard(0), Partial()])
    def test_from_replicate_is_local(self, dst):
        assert self.cost(Replicate(), dst) == 0.0

    def test_latency_counted(self):
        t = reshard_time_s((Shard(0),), (Replicate(),), (1024, 1024), 4, (4,), (LINK,))
        assert t == approx(3 / 4 * self.B / GB + 3 * 1e-5)


class TestReshard2D:
    """A 2x4 mesh over 2 nodes of 4: axis 0 inter-node (INTER), axis 1 intra-node (INTRA)."""

    MESH = (2, 4)

    def cost(self, src, dst, shape=(64, 32), itemsize=2):
        links = Cluster.preset("cpu", nodes=2, devices_per_node=4).axis_links(self.MESH)
        assert links[0].latency_s > links[1].latency_s  # inter, intra: the rule on the cpu preset
        return reshard_time_s(src, dst, shape, itemsize, self.MESH, (INTER, INTRA))

    def test_two_dims_to_replicate(self):
        # axis 0: others (R, S1) -> 64x8 x2 B = 1024 B; all_gather n=2 on INTER
        # axis 1: others (R, R) -> 4096 B; all_gather n=4 on INTRA
        expect = (1 / 2 * 1024 / 1e8 + 1e-5) + (3 / 4 * 4096 / 1e9 + 3e-6)
        assert self.cost((Shard(0), Shard(1)), (Replicate(), Replicate())) == approx(expect)

    def test_same_dim_on_both_axes(self):
        # shape (6, 32) bf16. axis 0: others (R, S0) -> ceil(6/4)=2 rows x 32 x 2 B = 128 B
        # axis 1: others (R, R) -> 6 x 32 x 2 = 384 B
        expect = (1 / 2 * 128 / 1e8 + 1e-5) + (3 / 4 * 384 / 1e9 + 3e-6)
        got = self.cost((Shard(0), Shard(0)), (Replicate(), Replicate()), shape=(6, 32))
        assert got == approx(expect)

    def test_partial_both_axes(self):
        # axis 0 P->R: all_reduce of 4096 B over 2 on INTER; axis 1 P->S0: reduce_scatter on INTRA
        expect = (2 * 1 / 2 * 4096 / 1e8 + 2 * 1e-5) + (3 / 4 * 4096 / 1e9 + 3e-6)
        assert self.cost((Partial(), Partial()), (Replicate(), Shard(0))) == approx(expect)

    def test_shard_to_shard_then_local_slice(self):
        # axis 0 S0->S1: all_to_all(4096 / 2) on INTER; axis 1 R->S0: free
        expect = 1 / 2 * 2048 / 1e8 + 1e-5
        assert self.cost((Shard(0), Replicate()), (Shard(1), Shard(0))) == approx(expect)

    def test_bytes_seen_after_earlier_axes_change(self):
        # axis 0 R->S0 first (free), so axis 1's all_gather moves only half: 32x32x2 = 2048 B
        expect = 3 / 4 * 2048 / 1e9 + 3e-6
        assert self.cost((Replicate(), Shard(1)), (Shard(0), Replicate())) == approx(expect)

    def test_mismatched_lengths(self):
        with pytest.raises(ValueError, match="one entry per mesh axis"):
            reshard_time_s((Shard(0),), (Replicate(), Replicate()), (4,), 4, self.MESH,
                           (INTER, INTRA))
