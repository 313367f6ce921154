"""Seconds: compute on one device (roofline), the host's time to issue ops, collectives on one
mesh axis (alpha-beta, ring), resharding a tensor between two shardings (a sequence of
collectives, one per mesh axis), and the once-a-step work of training: data-parallel
collectives by flavour, the optimizer step, gradient accumulation.

Every function takes plain numbers plus `DeviceSpec`/`Link` from `autopar.cluster` and returns
seconds. A device with a `calibration` (measured by benchmarks/calibrate_device.py, kept in
autopar/data/devices/) reaches the measured fractions of its peaks and issues ops at the
measured host rate; an uncalibrated one runs at its datasheet peaks with a free host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.distributed.tensor import Partial, Placement, Replicate, Shard

from autopar.cluster import DeviceSpec, Link
from autopar.parallelism import ALL_DP, BUCKET_BYTES, REPLICAS, SHARD_GROUP, DataParallelFlavour
from autopar.planning.profile import Attention, TrainingPrecision

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def compute_time_s(flops: float, bytes_moved: float, device: DeviceSpec,
                   dtype: torch.dtype | str, op: str | None = None,
                   attention: Attention | None = None) -> float:
    """Roofline time of one op: the slower of doing its FLOPs and moving its bytes.

    Williams, Waterman, Patterson, "Roofline: an insightful visual performance model for
    multicore architectures", CACM 52(4), 2009: attainable rate = min(peak, intensity x bandwidth),
    i.e. time = max(flops / peak_flops, bytes / memory_bandwidth).

    A calibrated device (`DeviceSpec.calibration`) reaches only a measured fraction of each
    peak: of its own roofline for an op it measured (`op`, e.g. "aten.native_layer_norm.default"),
    else `matmul` of the peak FLOP/s and `memory` of the bandwidth; and no op takes less than
    `kernel_s`.

    `attention`: the op is scaled-dot-product attention of this shape, and `flops` is a share of
    its forward + backward model FLOPs (all of them, or a split op's part). On a device whose
    calibration has an attention curve, that share of `attention_time_s` is its time.
    """
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"flops and bytes_moved must be >= 0, got {flops}, {bytes_moved}")
    cal = device.calibration
    if attention is not None and cal is not None and cal.attention and flops:
        share = flops / (attention.fwd_flops + attention.bwd_flops)
        whole = (attention_time_s(attention, device, dtype, "forward")
                 + attention_time_s(attention, device, dtype, "backward"))
        return max(share * whole, cal.kernel_s)
    compute_s = flops / device.peak_flops_for(dtype) if flops else 0.0
    memory_s = bytes_moved / device.hbm_bandwidth_bytes_per_s
    if cal is None or not (flops or bytes_moved):
        return max(compute_s, memory_s)
    if op in cal.ops:
        seconds = max(compute_s, memory_s) / cal.ops[op]
    else:
        seconds = max(compute_s / cal.matmul, memory_s / cal.memory)
    return max(seconds, cal.kernel_s)


# FLOPs per multiply-add column of the score matrix, per part, over (query/key head dim, value
# head dim): forward q k^T and p v; backward the scores again, dP = dO v^T, dV = P^T dO,
# dQ = dS k, dK = dS^T q (the counts of torch.utils.flop_counter)
_ATTENTION_MATMULS = {"forward": (2, 2), "backward": (6, 4)}


def attention_kernel_flops(attention: Attention, part: str, tile: int = 1,
                           head_dim_tile: int = 1) -> float:
    """FLOPs the attention kernel does in `part` ("forward" or "backward"): its matmuls on the
    sequences and head dims padded to the kernel's tiles, over the tiles a causal mask leaves
    (flash and cuDNN attention skip the blocks above the diagonal: about half for long
    sequences). Model FLOPs (`Attention.fwd_flops`) count every block of the unpadded shape."""
    a, b = _ATTENTION_MATMULS[part]
    d, dv = (_round_up(x, head_dim_tile) for x in (attention.head_dim, attention.head_dim_v))
    nq, nk = -(-attention.seq_q // tile), -(-attention.seq_k // tile)
    blocks = nq * nk
    if attention.causal:  # query tile i sees key tiles 0..i (the mask is aligned top-left)
        m = min(nq, nk)
        blocks = m * (m + 1) // 2 + (nq - m) * nk
    return float(attention.batch_heads) * blocks * tile * tile * (a * d + b * dv)


def attention_efficiency(attention: Attention, device: DeviceSpec, part: str) -> float:
    """The fraction of the peak FLOP/s the attention kernel reaches on its own FLOPs
    (`attention_kernel_flops`) in `part`: a saturating curve in the key length and the head dim
    (padded to the kernel's tiles), fitted per device by benchmarks/attention_times.py.

        efficiency x S_k / (S_k + seq_half) x D / (D + head_dim_half)

    Each query tile's fixed work (loading it, the softmax's rescaling, writing the output) is
    shared by S_k keys; each score's exponential (the special-function unit, not the tensor
    cores) by D multiply-adds."""
    c = device.calibration.attention
    s_k = _round_up(attention.seq_k, int(c["tile"]))
    d = _round_up(attention.head_dim, int(c["head_dim_tile"]))
    return (c[f"{part}_efficiency"] * s_k / (s_k + c[f"{part}_seq_half"])
            * d / (d + c[f"{part}_head_dim_half"]))


def attention_time_s(attention: Attention, device: DeviceSpec, dtype: torch.dtype | str,
                     part: str) -> float:
    """Seconds of one scaled-dot-product attention call's `part` ("forward" or "backward") on a
    device whose calibration has an attention curve (`Calibration.attention`): the kernel's
    FLOPs at its shape's efficiency, times the fitted factors for a causal mask and for dropout
    (measured against the same shapes without them).

    A mask (`attn_mask`) is priced as none: no masked shape was measured."""
    if part not in _ATTENTION_MATMULS:
        raise ValueError(f"part must be 'forward' or 'backward', got {part!r}")
    c = device.calibration.attention if device.calibration else None
    if not c:
        raise ValueError(f"device {device.name!r} has no attention curve in its calibration; "
                         "run benchmarks/attention_times.py --write-device on it")
    flops = attention_kernel_flops(attention, part, int(c["tile"]), int(c["head_dim_tile"]))
    seconds = flops / (device.peak_flops_for(dtype) * attention_efficiency(attention, device, part))
    if attention.causal:
        seconds *= c[f"{part}_causal"]
    if attention.dropout_p > 0:
        seconds *= c[f"{part}_dropout"]
    return seconds


def _round_up(x: int, step: int) -> int:
    return -(-x // step) * step


def host_time_s(ops: float, device: DeviceSpec, runtime: str = "replay") -> float:
    """The host's time to issue `ops` graph ops (forward + backward) in `runtime`: measured per
    device (`Calibration.host_s_per_op`); 0 for an uncalibrated device."""
    cal = device.calibration
    return ops * cal.host_s_per_op.get(runtime, 0.0) if cal else 0.0


def host_split_s(ops: int, device: DeviceSpec, runtime: str) -> tuple[float, float]:
    """(forward, backward) host time to issue a layer's `ops` in `runtime`: a third forward,
    two thirds backward (backward issues about twice the kernels)."""
    total = host_time_s(ops, device, runtime)
    return total / 3, 2 * total / 3


def collective_time_s(kind: str, bytes_: float, group_size: int, link: Link, *,
                      bucket_bytes: float | None = None) -> float:
    """Time of one ring collective over `group_size` devices joined by `link`.

    `bytes_` is the full (unsharded over this group) tensor for all_reduce, all_gather and
    reduce_scatter, i.e. the buffer each rank ends with or starts with; for all_to_all it is the
    local buffer each rank sends (and receives). With `bucket_bytes`, the tensor travels in one
    collective with others, up to that many bytes (the runtime's buckets): it pays its share of
    that collective's latency, not a whole one.
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective {kind!r}; expected one of {COLLECTIVES}")
    if group_size < 1 or bytes_ < 0:
        raise ValueError(f"group_size must be >= 1 and bytes_ >= 0, got {group_size}, {bytes_}")
    n = group_size
    if n == 1:
        return 0.0
    alpha, bw = link.latency_s, link.bandwidth_bytes_per_s
    if bucket_bytes:
        alpha *= min(1.0, bytes_ / bucket_bytes)
    # Ring algorithms, Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication
    # Operations in MPICH", IJHPCA 19(1), 2005: all_gather / reduce_scatter take n-1 steps of
    # B/n each, (n-1)*alpha + (n-1)/n * B * beta; all_reduce = reduce_scatter + all_gather.
    # The (n-1)/n and 2(n-1)/n factors are NCCL's bus-bandwidth factors (nccl-tests
    # doc/PERFORMANCE.md), so `bw` is the bus bandwidth nccl-tests reports for the link.
    if kind == "all_reduce":
        return 2 * (n - 1) / n * bytes_ / bw + 2 * (n - 1) * alpha
    # all_gather, reduce_scatter; all_to_all: each rank keeps 1/n of its buffer and sends the
    # other (n-1)/n in n-1 pairwise steps (PERFORMANCE.md gives alltoall the same (n-1)/n factor).
    return (n - 1) / n * bytes_ / bw + (n - 1) * alpha


def sharded_numel(shape: Sequence[int], placements: Sequence[Placement],
                  mesh_shape: Sequence[int]) -> int:
    """Elements one device holds (the largest shard: ceil division, axis by axis like DTensor).

    >>> sharded_numel((10, 4), (Shard(0), Shard(0)), (2, 2))  # 10 -> 5 -> 3 rows
    12
    """
    local = _local_shape(shape, placements, mesh_shape)
    return math.prod(local)


def _local_shape(shape, placements, mesh_shape) -> list[int]:
    if len(placements) != len(mesh_shape):
        raise ValueError(f"{len(placements)} placements {tuple(placements)} for a "
                         f"{len(mesh_shape)}-axis mesh {tuple(mesh_shape)}; give one per axis")
    local = list(shape)
    for placement, n in zip(placements, mesh_shape):
        if isinstance(placement, Shard):
            dim = placement.dim % len(local)
            local[dim] = -(-local[dim] // n)  # ceil: DTensor's first shards are the largest
    return local


def reshard_time_s(src: Sequence[Placement], dst: Sequence[Placement], shape: Sequence[int],
                   itemsize: int, mesh_shape: Sequence[int], links: Sequence[Link]) -> float:
    """Time to redistribute a tensor of global `shape` from sharding `src` to `dst`.

    Axis by axis in mesh order, like DTensor's `redistribute`. On an axis `a` of size n whose
    placement changes, B is the tensor's bytes as sharded on the other axes at that moment
    (axes before `a` already at `dst`, after it still at `src`), and the transition costs:

    =====================  ======================  =====================
    from                   to                      collective on axis a
    =====================  ======================  =====================
    Partial                Replicate               all_reduce(B)
    Partial                Shard                   reduce_scatter(B)
    Partial                Partial (other op)      all_reduce(B)
    Shard                  Replicate or Partial    all_gather(B)
    Shard(i)               Shard(j)                all_to_all(B / n)
    Replicate              Shard or Partial        0 (local slice / zeroing)
    =====================  ======================  =====================
    """
    if not len(src) == len(dst) == len(mesh_shape) == len(links):
        raise ValueError(f"src {tuple(src)}, dst {tuple(dst)}, mesh {tuple(mesh_shape)} and "
                         f"{len(links)} links must all have one entry per mesh axis")
    current = list(src)
    total_s = 0.0
    for axis, (n, link) in enumerate(zip(mesh_shape, links)):
        before, after = current[axis], dst[axis]
        if before == after:
            continue
        others = current[:axis] + [Replicate()] + current[axis + 1:]
        bytes_ = itemsize * sharded_numel(shape, others, mesh_shape)
        kind, fraction = _transition(before, after, n)
        if kind is not None:
            total_s += collective_time_s(kind, bytes_ * fraction, n, link)
        current[axis] = after
    return total_s


def _transition(before: Placement, after: Placement, n: int) -> tuple[str | None, float]:
    """(collective, fraction of B it moves) for one axis's change; None when it is local."""
    if isinstance(before, Partial):
        return ("reduce_scatter" if isinstance(after, Shard) else "all_reduce"), 1.0
    if isinstance(before, Shard):
        return ("all_to_all", 1 / n) if isinstance(after, Shard) else ("all_gather", 1.0)
    if isinstance(before, Replicate):
        return None, 0.0
    raise ValueError(f"unknown placement {before!r}; expected Shard, Replicate or Partial")


# -- once a step ----------------------------------------------------------------------------------


def data_parallel_traffic_s(flavour: DataParallelFlavour, local_numel: float,
                            precision: TrainingPrecision, dp: int, shard: int,
                            links: tuple[Link, Link]) -> tuple[float, float, float]:
    """(per step, per microbatch in forward, per microbatch in backward) data-parallel
    collectives of one parameter of `local_numel` elements: the flavour's `collectives`, as the
    runtime issues them (in the runtime's buckets, so each pays a share of a bucket's latency).
    `shard`: the ranks the parameter is sharded over; `links`: (the link across replicas, the
    link within a shard group)."""
    across, within = links
    nbytes = {"gradients": local_numel * precision.grad_bytes,
              "weights": local_numel * precision.compute_bytes,
              "gradient_shard": local_numel * precision.grad_bytes / shard}
    groups = {ALL_DP: (dp, within), SHARD_GROUP: (shard, within), REPLICAS: (dp // shard, across)}
    times: dict[str, list[float]] = {"step": [], "forward": [], "backward": []}
    for c in flavour.collectives:
        size, link = groups[c.over]
        times[c.when].append(collective_time_s(c.kind, nbytes[c.of], size, link,
                                               bucket_bytes=BUCKET_BYTES))
    # summed last to first, as this model always has: a sum's last bit depends on its order,
    # and plans are compared byte for byte (tests/test_golden_plans.py)
    step, forward, backward = (sum(reversed(times[w]), 0.0) for w in ("step", "forward", "backward"))
    return step, forward, backward


def optimizer_step_s(state: dict[str, float], device: DeviceSpec,
                     precision: TrainingPrecision) -> float:
    """The optimizer step of a layer's local state: read parameters, gradients and optimizer
    state, write parameters and optimizer state back (a memory-bound pass). Parameters held
    below fp32 are stepped on fp32 masters (`TrainingPrecision.mixed_bf16`), and torch's
    AdamW steps an fp32 master on an fp32 gradient: the gradient is cast (written) and read
    again in fp32 first. One H200, GPT 1.3B: 18.3 ms of optimizer kernels measured, 13.2 ms
    charged without the cast, 16.7 with it (docs/benchmarks/2026-12-04-single-h200-breakdown/)."""
    moved = 2 * (state["parameters"] + state["optimizer"]) + state["gradients"]
    if precision.param_bytes < 4 and precision.grad_bytes:
        moved += 2 * state["gradients"] * 4 / precision.grad_bytes
    return compute_time_s(0.0, moved, device, "float32")


def gradient_accumulation_s(gradients_bytes: float, microbatches: int,
                            device: DeviceSpec) -> float:
    """Gradient accumulation over `microbatches` (> 1) of a layer's local gradients: autograd
    adds each later microbatch's gradient into .grad (read both, write one), and the runtime
    divides the sum once by the count (read, write). One H200, GPT 6.7B in 4 microbatches:
    28.7 ms of adds and 6.8 ms of divisions a step, which the step's prediction lacked."""
    if microbatches <= 1 or not gradients_bytes:
        return 0.0
    moved = (3 * (microbatches - 1) + 2) * gradients_bytes
    return compute_time_s(0.0, moved, device, "float32")
