"""Data-parallel gradient reductions in buckets, overlapped with backward (DDP's and FSDP's way).

A gradient that backward leaves Partial(sum) over one mesh axis, where its parameter is
Replicate (all-reduce) or Shard(d) (reduce-scatter, ZeRO), joins a bucket as soon as it is
accumulated. A full bucket is reduced by one collective on the axis's process group, issued
at once and waited for only when the step's gradients are handed over (`settle`): the
reduction runs on the communication stream while the rest of backward computes, and a few
large collectives cost the host far less than one per parameter.

The bucket is laid out as (ranks, elements): row r holds, end to end, the part of each
gradient that rank r keeps (for Shard(d), the d-chunk r; for Replicate, the whole gradient in
every row is not needed, so an all-reduce reads it flat). A reduce-scatter of the flat bucket
then leaves each rank its row: its shards, end to end.

Gradients in any other state (Partial over two axes, a Shard the bucket cannot chunk evenly)
are redistributed by DTensor, one by one, as before.

On CPU (gloo) each bucket is waited for as it is issued: one collective in flight at a time
(see `collective_overlap` for why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from autopar.parallelism import BUCKET_BYTES

_c10d = torch.ops._c10d_functional


@dataclass
class _Bucket:
    axis: int
    kind: str  # "all_reduce" or "reduce_scatter"
    dtype: torch.dtype
    params: list = field(default_factory=list)
    parts: list = field(default_factory=list)  # each gradient as (ranks, elements) or flat
    nbytes: int = 0


@dataclass
class _InFlight:
    params: list
    result: torch.Tensor  # the collective's output (on CUDA, not yet waited for)
    shapes: list  # each parameter's local gradient shape after the reduction


class GradientBuckets:
    """Reduces each parameter's gradient to the parameter's placements, in buckets."""

    def __init__(self, mesh, bucket_bytes: int = BUCKET_BYTES):
        self.mesh = mesh
        self.bucket_bytes = bucket_bytes
        self._filling: _Bucket | None = None
        self._in_flight: list[_InFlight] = []
        self._overlap = mesh.device_type == "cuda"  # several collectives in flight

    def add(self, p) -> None:
        """`p.grad` is complete for this backward: reduce it (in a bucket when it can be)."""
        g = p.grad
        if g is None or tuple(g.placements) == tuple(p.placements):
            return
        route = self._route(p, g)
        if route is None:
            p.grad = g.redistribute(self.mesh, p.placements, async_op=self._overlap)
            return
        axis, kind = route
        b = self._filling
        if b is not None and (b.axis, b.kind, b.dtype) != (axis, kind, g.dtype):
            self._issue()
        if self._filling is None:
            self._filling = _Bucket(axis, kind, g.dtype)
        b = self._filling
        local = g.to_local()
        b.params.append(p)
        b.parts.append(_rows(local, p.placements[axis], self.mesh.size(axis), kind))
        b.nbytes += local.numel() * local.element_size()
        if b.nbytes >= self.bucket_bytes:
            self._issue()

    def settle(self) -> None:
        """Issue the last bucket, wait for every reduction, and set the reduced gradients."""
        self._issue()
        for f in self._in_flight:
            done = _c10d.wait_tensor.default(f.result) if self._overlap else f.result
            offset = 0
            for p, shape in zip(f.params, f.shapes):
                numel = math.prod(shape)
                local = done[offset:offset + numel].view(shape)
                p.grad = DTensor.from_local(local, self.mesh, p.placements, run_check=False,
                                            shape=p.shape, stride=p.stride())
                offset += numel
        self._in_flight.clear()

    def _route(self, p, g):
        """(axis, collective) if the bucket can reduce `g` to `p`'s placements, else None."""
        if not isinstance(g, DTensor) or g.device_mesh != self.mesh:
            return None
        partial = [a for a, pl in enumerate(g.placements) if pl.is_partial()]
        if len(partial) != 1 or g.placements[partial[0]] != Partial("sum"):
            return None
        axis = partial[0]
        others = [a for a in range(self.mesh.ndim) if a != axis]
        if any(g.placements[a] != p.placements[a] for a in others):
            return None
        target, n = p.placements[axis], self.mesh.size(axis)
        if isinstance(target, Replicate):
            return axis, "all_reduce"
        if not isinstance(target, Shard):
            return None
        d = target.dim
        # an even chunk of the local gradient along d, and no other axis splitting d (whose
        # order of splitting would then matter)
        if g.to_local().shape[d] % n or any(
            isinstance(p.placements[a], Shard) and p.placements[a].dim == d for a in others
        ):
            return None
        return axis, "reduce_scatter"

    def _issue(self) -> None:
        b, self._filling = self._filling, None
        if b is None:
            return
        group = self.mesh.get_group(b.axis).group_name
        n = self.mesh.size(b.axis)
        if b.kind == "all_reduce":
            flat = torch.cat(b.parts)
            result = _c10d.all_reduce.default(flat, "sum", group)
            shapes = [tuple(p.grad.to_local().shape) for p in b.params]
        else:
            flat = torch.cat(b.parts, dim=1).view(-1)
            result = _c10d.reduce_scatter_tensor.default(flat, "sum", n, group)
            shapes = [_shard_shape(p.grad.to_local().shape, p.placements[b.axis].dim, n)
                      for p in b.params]
        for p in b.params:
            p.grad = None  # the bucket holds the gradient now; settle() sets the reduced one
        if not self._overlap:
            result = _c10d.wait_tensor.default(result)
        self._in_flight.append(_InFlight(b.params, result, shapes))


def _rows(local: torch.Tensor, target, n: int, kind: str) -> torch.Tensor:
    """`local` as the bucket holds it: flat for an all-reduce; for a reduce-scatter along
    dim d, (n, elements) with row r the d-chunk r, as it will be kept."""
    if kind == "all_reduce":
        return local.reshape(-1)
    d = target.dim
    chunked = local.unflatten(d, (n, local.shape[d] // n))  # ..., n, rows/n, ...
    return chunked.movedim(d, 0).reshape(n, -1)


def _shard_shape(shape, d: int, n: int) -> tuple[int, ...]:
    return tuple(s // n if i == d else s for i, s in enumerate(shape))
