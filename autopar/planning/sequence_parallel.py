"""Megatron-LM's sequence parallelism (Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models", 2022, section 4.2.2) as a constraint on the intra-op problem.

Between the tensor-parallel regions of a block (attention, MLP) sit ops that tensor parallelism
leaves whole on every rank: layer norms, dropout, residual adds. Sequence parallelism splits them
along the sequence over the tensor-parallel ranks; the all-reduce after a row-parallel matmul
becomes a reduce-scatter into the sequence split, and the input of a column-parallel matmul is
all-gathered from it. Each rank then holds 1/tp of those ops' activations.

In the intra-op problem it is one more placement: those ops (every op, not a view, whose output
has the shape of a value passed from one layer to the next: the residual stream) are offered
inputs split along dim 1 (the sequence of a (batch, sequence, hidden) value) on tp
(`with_sequence_split`). Its time is about tensor parallelism's (reduce-scatter + all-gather is
an all-reduce; the norms run on 1/tp), so the fastest sharding takes either; what it saves is
memory, which the intra-op solve leaves to the stage cut. Hence `require`, which forbids the
stream's other strategies: hand configurations use it (`autopar.manual_plan(...,
sequence_parallel=True)`), and the search solves it as a second sharding of each tp mesh that
a bound does not rule out (`autopar.planning.search`). Under `require` every stream op
takes Shard(1) on the tensor-parallel axis, where its sharding rules offer that (not the
embedding, whose token ids arrive whole: the stream is split after it, as in Megatron); the
solver then places the collectives around them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.distributed.tensor import Replicate, Shard

from autopar.errors import MeshError
from autopar.layers import crossing, decision_nodes
from autopar.parallelism import TENSOR
from autopar.planning.strategies import output_vals
from autopar.trace import TracedModel

SEQUENCE_DIM = 1  # of a (batch, sequence, hidden) value: every model we trace is batch-first


MODES = ("off", "offer", "require")


def axis(mesh: dict[str, int], mode: str) -> str | None:
    """The axis the stream may (mode "offer") or must ("require") split the sequence over:
    tp where the mesh has it, else None (for "offer"; "require" without tp is an error)."""
    if mode not in MODES:
        raise ValueError(f"sequence_parallel={mode!r}: one of {MODES}")
    if mode == "off":
        return None
    if mesh.get(TENSOR, 1) > 1:
        return TENSOR
    if mode == "require":
        raise MeshError("sequence_parallel=True splits the sequence over the tensor-parallel "
                        "ranks: it needs tp > 1")
    return None


def stream_shapes(traced: TracedModel) -> set[tuple[int, ...]]:
    """The shapes of the 3-D values that cross from one layer to the next (the residual stream:
    (batch, sequence, hidden) in a decoder, also the encoder's output in T5)."""
    gm = traced.graph_module
    by_name = {n.name: n for n in gm.graph.nodes}
    shapes = set()
    for cut in crossing(traced):
        for name in cut:
            val = by_name[name].meta.get("val")
            if isinstance(val, torch.Tensor) and val.ndim == 3 and val.is_floating_point():
                shapes.add(tuple(val.shape))
    return shapes


def stream_nodes(traced: TracedModel, shapes: set | None = None) -> list[str]:
    """The ops sequence parallelism splits along the sequence: not views, first output of a
    residual-stream shape (norms, residual adds, dropout, the embedding's sum). `shapes`:
    `stream_shapes(traced)`, where the caller has it."""
    shapes = stream_shapes(traced) if shapes is None else shapes
    out = []
    for n in decision_nodes(traced.graph_module):
        if n.op != "call_function" or getattr(n.target, "is_view", False):
            continue
        val = output_vals(n)[0]
        if isinstance(val, torch.Tensor) and tuple(val.shape) in shapes:
            out.append(n.name)
    return out


def require(decisions, traced: TracedModel, axis: str):
    """`decisions` (an `intra_op.Decisions`) with every stream node's strategies that do not
    split its output along the sequence on mesh axis `axis` forbidden (cost inf)."""
    mesh = decisions.mesh
    a = list(mesh).index(axis)
    shapes = stream_shapes(traced)
    if bad := sorted(s for s in shapes if s[SEQUENCE_DIM] % mesh[axis]):
        raise MeshError(
            f"sequence parallelism over {axis}={mesh[axis]} splits the sequence, and the "
            f"sequence of {bad[0][SEQUENCE_DIM]} (values of shape {bad[0]}) does not divide by "
            f"{mesh[axis]}: use a sequence length that does, or sequence_parallel=False")
    names = set(stream_nodes(traced, shapes))
    nodes = []
    for node in decisions.problem.nodes:
        if node.name in names:
            keep = [_splits_sequence(s, a) for s in decisions.strategies[node.name]]
            # an op that cannot split its output along the sequence stays free: the embedding,
            # whose token ids arrive whole; as in Megatron, the stream is split after it
            if any(keep):
                node = dataclasses.replace(node, costs_s=tuple(
                    c if k else math.inf for c, k in zip(node.costs_s, keep)))
        nodes.append(node)
    problem = dataclasses.replace(decisions.problem, nodes=tuple(nodes))
    return dataclasses.replace(decisions, problem=problem)


def with_sequence_split(options: list, val, axis_index: int) -> list:
    """A stream op's input's placement options, and for a 3-D input (batch, sequence, ...) each
    of them with the sequence split on mesh axis `axis_index` in place of a whole copy there."""
    if not (isinstance(val, torch.Tensor) and val.ndim == 3):
        return options
    split = [pl[:axis_index] + (Shard(SEQUENCE_DIM),) + pl[axis_index + 1:] for pl in options
             if isinstance(pl[axis_index], Replicate)]
    return list(dict.fromkeys([*options, *split]))


def _splits_sequence(strategy, axis_index: int) -> bool:
    out = strategy.outputs[0]
    return out is not None and out[axis_index] == Shard(SEQUENCE_DIM)
