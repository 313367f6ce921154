"""Expert rows: what runs between a mixture-of-experts layer's grouped matmuls under expert
parallelism, without gathering.

transformers computes its experts (Mixtral's, Qwen-MoE's, ...) dropless: every token's routed
rows, sorted by expert, go through grouped matmuls (`op_rules._grouped_mm`), with row-wise ops
between them (Mixtral: split the gate-and-up output, `silu(gate) * up`). How many rows each
expert gets depends on the routing, so no static shape can hold one rank's rows alone. On an
axis that splits the experts, each rank therefore takes every row of its group (the tokens
gathered, as Megatron-Core's all-gather dispatcher does), computes its own experts' rows and
leaves the others zero: a partial sum whose every row is nonzero on one rank only.

Such a value stays partial through ops that compute each output row from the same rows of
their inputs and map zero rows to zero rows (`ROW_WISE`): silu(0) * 0 is 0, and the rows each
rank holds are right. So those ops between two grouped matmuls of the same experts get one
more strategy on each expert axis: every input and output partial, run on local values. The
next grouped matmul reads its own rows only. Only the grouped matmul of split experts makes
such a value, so the partial is taken only from it or from another expert-row op: a partial
made from a whole value (one rank keeps it all) would hold other ranks' rows (`forbids`).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.planning.strategies import Strategy
from autopar.trace import is_getitem, is_grouped_mm, tensor_inputs

aten = torch.ops.aten

# ops whose output rows each depend on the same rows of their inputs and are zero where those
# are: kept partial between grouped matmuls. Add an op here when a model family puts it there.
ROW_WISE = {
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default,
    aten.mul.Tensor, aten.neg.default, aten.clone.default, aten._to_copy.default,
    aten.split_with_sizes.default, aten.split.Tensor,
}


def chain(gm: fx.GraphModule, held: set[str]) -> tuple[set[str], set[str]]:
    """(grouped matmuls of split experts: those whose weight is an expert weight in `held`,
    the row-wise ops fed only by them and by each other)."""
    grouped, rows = set(), set()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        ins = tensor_inputs(n)
        if is_grouped_mm(n.target) and len(ins) > 1 and ins[1].name in held:
            grouped.add(n.name)
        elif ins and (n.target in ROW_WISE or is_getitem(n)) and all(
                (a.args[0].name if is_getitem(a) else a.name) in grouped | rows for a in ins):
            rows.add(n.name)
    return grouped, rows


def with_partial_rows(sts: list[Strategy], axes: tuple[int, ...]) -> list[Strategy]:
    """A row-wise op's strategies, with every input and output partial on one expert axis
    (`axes`) more where they were whole there."""
    more = []
    for s in sts:
        for a in axes:
            if all(isinstance(pl[a], Replicate) for pl in (*s.inputs, *s.outputs) if pl):
                more.append(Strategy(tuple(_partial_on(pl, a) for pl in s.inputs),
                                     tuple(_partial_on(pl, a) if pl else pl for pl in s.outputs),
                                     "local"))
    return sts + [s for s in more if s not in sts]


def only_expert_axes(sts: list[Strategy], axes: tuple[int, ...]) -> list[Strategy]:
    """A grouped matmul's strategies less those taking partial rows on an axis that does not
    split the experts (a partial there is a sum of any kind, not one rank's rows), and those
    splitting the experts again on an axis outside the expert axes' (DTensor nests the splits
    of one dim in mesh order): each rank of an expert axis must own the same experts in every
    grouped matmul of the layer, or the rows one leaves would not be those the next reads."""
    def valid(s):
        x, w = s.inputs[0], s.inputs[1]
        return not any(
            isinstance(w[a], Shard) and w[a].dim == 0
            and ((isinstance(x[a], Partial) and a not in axes) or a < min(axes))
            for a in range(len(w)))
    return [s for s in sts if valid(s)]


def forbids(dst: str, src_pl, dst_pl, expert_rows: set[str], axes: tuple[int, ...]) -> bool:
    """Whether an edge into `dst` (a grouped matmul or an expert-row op) would make partial rows
    on an expert axis out of a value that is not partial there."""
    return dst in expert_rows and any(
        isinstance(dst_pl[a], Partial) and not isinstance(src_pl[a], Partial) for a in axes)


def _partial_on(pl, a):
    return tuple(Partial() if i == a else p for i, p in enumerate(pl))
