"""Collectives in a traced graph, rearranged to overlap compute and to cost the host less.

DTensor's trace waits for each collective right where it issues it, one collective per
weight. Replayed as traced, a ZeRO step waits for every weight's gather in forward and every
gradient's reduce-scatter in backward, and pays the host's cost of a collective (launch,
bookkeeping: about 150 µs) a few hundred times. `overlap_collectives` rewrites the forward and
backward graphs as FSDP schedules its own collectives:

    prefetch     a collective reading only graph inputs (a weight's gather) is issued at the
                 top of the graph; a repeated one (a tied weight's) is issued once
    bucket       gathers, and reduce-scatters of gradients the graph returns, go out a bucket
                 at a time (up to BUCKET_BYTES): one collective for many weights
    late waits   each wait moves down to the first op that reads its result, so the transfer
                 runs on the communication stream meanwhile

The values are the same, the collectives the same bytes. Every rank traces the same graph and
rewrites it the same way, so each process group sees its collectives in the same order on every
rank.

Prefetch and late waits leave several collectives in flight at once, which only a device with
its own communication stream (CUDA, NCCL) overlaps with compute. On CPU (gloo) a collective's
wait stays right after it: gloo's worker threads then gain nothing, and with several
collectives in flight an 8-rank pipelined test crashed in gloo ("malloc(): unaligned tcache
chunk detected") in 2 of about 20 runs. Buckets and the single gather of a repeated weight
apply on every device.
"""

from __future__ import annotations

import torch
from torch import fx

from autopar.parallelism import BUCKET_BYTES

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
_GATHER = _c10d.all_gather_into_tensor.default
_SCATTER = _c10d.reduce_scatter_tensor.default
_WAIT = _c10d.wait_tensor.default
_COLLECTIVES = frozenset(
    getattr(_c10d, name).default
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce",
                 "all_to_all_single")
    if hasattr(_c10d, name)
)


def overlap_collectives(gm: fx.GraphModule, *, overlap: bool | None = None) -> None:
    """Rewrite `gm` in place. `overlap`: prefetch and wait late (default: when the graph's
    inputs are on a CUDA device)."""
    graph = gm.graph
    if overlap is None:
        overlap = _on_cuda(graph)
    of_inputs = _once_each(graph)
    if overlap:
        _prefetch(graph, of_inputs)
    _merge_waits(graph)
    _bucket_gathers(graph, [n for n in of_inputs if n.target is _GATHER])
    _bucket_gradient_scatters(graph, overlap)
    if overlap:
        _wait_late(graph)
    graph.lint()
    gm.recompile()


def _on_cuda(graph: fx.Graph) -> bool:
    return any(isinstance(v, torch.Tensor) and v.device.type == "cuda"
               for n in graph.nodes if n.op == "placeholder" for v in [n.meta.get("val")])


def _once_each(graph: fx.Graph) -> list[fx.Node]:
    """The collectives that read only graph inputs, in order, each distinct one once (a later
    copy's readers read the first)."""
    first: dict[tuple, fx.Node] = {}
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in _COLLECTIVES:
            continue
        if not n.all_input_nodes or any(a.op != "placeholder" for a in n.all_input_nodes):
            continue
        key = (n.target, n.args, tuple(sorted(n.kwargs.items())))
        if key in first:
            n.replace_all_uses_with(first[key])
            graph.erase_node(n)
        else:
            first[key] = n
    return list(first.values())


def _prefetch(graph: fx.Graph, collectives: list[fx.Node]) -> None:
    """`collectives` (of graph inputs only) to the top of the graph, in order."""
    anchor = next((n for n in reversed(graph.nodes) if n.op == "placeholder"), None)
    for n in collectives:
        anchor.append(n)
        anchor = n


def _merge_waits(graph: fx.Graph) -> None:
    """One wait per collective: a later wait on the same result reads the first one's."""
    waited: dict[fx.Node, fx.Node] = {}
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is _WAIT:
            src = n.args[0]
            if src in waited:
                n.replace_all_uses_with(waited[src])
                graph.erase_node(n)
            else:
                waited[src] = n


def _wait_late(graph: fx.Graph) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is _WAIT and n.users:
            min(n.users, key=order.__getitem__).prepend(n)


# -- buckets ----------------------------------------------------------------------------------


def _buckets(nodes: list[fx.Node], key_of, bytes_of) -> list[list[fx.Node]]:
    """`nodes` in order, split by key into buckets of at most BUCKET_BYTES (or one node)."""
    done: list[list[fx.Node]] = []
    filling: dict[tuple, list[fx.Node]] = {}
    for n in nodes:
        key = key_of(n)
        if key is None:
            continue
        bucket = filling.setdefault(key, [])
        if bucket and sum(map(bytes_of, bucket + [n])) > BUCKET_BYTES:
            done.append(bucket)
            bucket = filling[key] = []
        bucket.append(n)
    return [b for b in done + list(filling.values()) if len(b) > 1]


def _key(n: fx.Node):
    """What collectives must share to be one: kind, group (and reduce op), dtype; None when
    the input's layout is not the plain one a bucket assumes."""
    val = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    if not isinstance(val, torch.Tensor) or not val.is_contiguous() or val.ndim == 0:
        return None
    return n.target, n.args[1:], val.dtype, val.device


def _input_bytes(n: fx.Node) -> int:
    val = n.args[0].meta["val"]
    return val.numel() * val.element_size()


def _bucket_gathers(graph: fx.Graph, gathers: list[fx.Node]) -> None:
    """A bucket of gathers is one gather of the shards end to end: rank r's part of the
    (ranks, total) result is its shards, so weight i is the columns [offset_i, offset_i +
    numel_i), laid out again as (ranks * rows_i, ...), what its own gather returned."""
    for bucket in _buckets(gathers, _key, lambda n: _input_bytes(n) * n.args[1]):
        ranks, group = bucket[0].args[1], bucket[0].args[2]
        shards = [n.args[0] for n in bucket]
        numels = [s.meta["val"].numel() for s in shards]
        waits = [next(iter(n.users)) for n in bucket]  # one each, after `_merge_waits`
        order = {n: i for i, n in enumerate(graph.nodes)}
        with graph.inserting_before(bucket[0]):
            flat = [graph.call_function(aten.view.default, (s, [-1])) for s in shards]
            joined = graph.call_function(aten.cat.default, (flat,))
            gathered = graph.call_function(_GATHER, (joined, ranks, group))
        with graph.inserting_before(min(waits, key=order.__getitem__)):
            done = graph.call_function(_WAIT, (gathered,))
            rows = graph.call_function(aten.view.default, (done, [ranks, sum(numels)]))
            offset = 0
            for shard, numel, wait in zip(shards, numels, waits):
                shape = list(shard.meta["val"].shape)
                part = graph.call_function(aten.slice.Tensor, (rows, 1, offset, offset + numel))
                # a contiguous copy, as the gather's own result was (a reshape could be a
                # view with the bucket's strides, which a later view cannot read)
                copy = graph.call_function(aten.clone.default, (part,),
                                           {"memory_format": torch.contiguous_format})
                wait.replace_all_uses_with(graph.call_function(
                    aten.view.default, (copy, [ranks * shape[0], *shape[1:]])))
                offset += numel
        _erase(graph, waits + bucket)


def _bucket_gradient_scatters(graph: fx.Graph, overlap: bool) -> None:
    """Reduce-scatters whose results the graph only returns (the weight gradients of ZeRO) go
    out a bucket at a time, issued where the bucket's last gradient is ready (and, without
    `overlap`, waited for there). The bucket is the gradients as (ranks, elements) side by
    side, so rank r's part of the reduced bucket is its shard of each, end to end."""
    out = next(n for n in graph.nodes if n.op == "output")
    scatters = [
        n for n in graph.nodes
        if n.op == "call_function" and n.target is _SCATTER and len(n.users) == 1
        and next(iter(n.users)).target is _WAIT and set(next(iter(n.users)).users) == {out}
    ]
    for bucket in _buckets(scatters, _key, _input_bytes):
        op, ranks, group = bucket[0].args[1:4]
        grads = [n.args[0] for n in bucket]
        numels = [g.meta["val"].numel() // ranks for g in grads]
        waits = [next(iter(n.users)) for n in bucket]
        with graph.inserting_before(bucket[-1]):
            rows = [graph.call_function(aten.view.default, (g, [ranks, -1])) for g in grads]
            joined = graph.call_function(aten.cat.default, (rows, 1))
            flat = graph.call_function(aten.view.default, (joined, [-1]))
            reduced = graph.call_function(_SCATTER, (flat, op, ranks, group))
        with graph.inserting_before(out if overlap else bucket[-1]):
            done = graph.call_function(_WAIT, (reduced,))
            offset = 0
            for g, numel, wait in zip(grads, numels, waits):
                shape = list(g.meta["val"].shape)
                part = graph.call_function(aten.slice.Tensor, (done, 0, offset, offset + numel))
                wait.replace_all_uses_with(graph.call_function(
                    aten.view.default, (part, [shape[0] // ranks, *shape[1:]])))
                offset += numel
        _erase(graph, waits + bucket)


def _erase(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    for n in nodes:
        graph.erase_node(n)
