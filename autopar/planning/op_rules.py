"""Sharding rules of our own, for ops DTensor cannot shard itself.

A rule is written for ONE mesh axis: it lists, per strategy, a placement for every tensor input
and output of the op. `expand_to_mesh` combines them over all axes. Ops with a rule here run on
local shards (like `torch.distributed.tensor.experimental.local_map`): each rank calls the op on
its local tensors and the result is rewrapped with the rule's output placements. So a rule must
only list placements under which the op on local shards computes the right local result.

Adding an op: write a function `node -> list[AxisStrategy]` named after the op (as `_sdpa` is
for scaled_dot_product_attention) and add it to `RULES` under its ATen overload.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import fx
from torch.distributed.tensor import Replicate, Shard

aten = torch.ops.aten

# (placement per tensor input, placement per output) on one mesh axis
AxisStrategy = tuple[tuple, tuple]


def _sdpa(node: fx.Node) -> list[AxisStrategy]:
    """scaled_dot_product_attention(q, k, v, attn_mask=None, ...): q/k/v are (B, H, T, D).

    Batch and heads are independent, so sharding both on dim 0 (batch) or dim 1 (heads) is exact
    on local shards; sequence and head dims are not (softmax and causal masks span them).
    A mask shards with q on a dim where it is not broadcast, else stays replicated.
    """
    q = node.args[0].meta["val"]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    has_mask = isinstance(mask, fx.Node)
    strategies = [((Replicate(),) * (3 + has_mask), (Replicate(),))]
    for dim in (0, 1):
        ins = [Shard(dim)] * 3
        if has_mask:
            m = mask.meta["val"]
            aligned = dim - (q.ndim - m.ndim)  # masks broadcast from the right
            full = aligned >= 0 and m.shape[aligned] == q.shape[dim]
            ins.append(Shard(aligned) if full else Replicate())
        strategies.append((tuple(ins), (Shard(dim),)))
    return strategies


RULES: dict[object, Callable[[fx.Node], list[AxisStrategy]]] = {
    aten.scaled_dot_product_attention.default: _sdpa,
}


def expand_to_mesh(axis_strategies: list[AxisStrategy], ndim: int) -> list[tuple[tuple, tuple]]:
    """All combinations of one-axis strategies over `ndim` mesh axes.

    Returns (per-input placements tuple, per-output placements tuple), each placements tuple
    holding one placement per mesh axis.
    """
    out = []
    for combo in itertools.product(axis_strategies, repeat=ndim):
        n_in, n_out = len(combo[0][0]), len(combo[0][1])
        ins = tuple(tuple(c[0][i] for c in combo) for i in range(n_in))
        outs = tuple(tuple(c[1][i] for c in combo) for i in range(n_out))
        out.append((ins, outs))
    return out
