"""A shallow stand-in for a deep model: pre, the first three blocks, post.

Repeated blocks take the same strategy position by position (the planner ties them), so every
block after the first two costs the same: same ops, same shardings, same resharding from the
block before it. The planner therefore solves a graph that keeps blocks 0, 1 and 2, where block 2
stands for blocks 2 .. n-1: its nodes and the edges into it weigh n-2 in the objective. For step
time this is exact (the weighted objective equals the full graph's under the ties); it makes
planning cost independent of depth (GPT-3's 96 blocks solve like 3).

    stand_in(traced) -> StandIn   the shallow graph, node weights, and how to map back

Blocks 0 and 1 are kept apart because block 0 reads the embedding, not a block, and may shard
its first ops differently; block 1 is the first block fed by a block. A stand-in is only made
when every block has the same ops, shapes and wiring (`_signature`); block 2 then stands for
the rest on the assumption that blocks fed by the same kind of block get the same strategy
lists, which `tests/planning/test_stand_in.py` checks for GPT and Llama against the full graph.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from torch import fx

from autopar.layers import block_of, decision_nodes
from autopar.trace import TracedModel, is_getitem

KEPT_BLOCKS = 3  # blocks 0, 1 and 2 (which stands for 2 .. n-1)
MIN_BLOCKS = 5  # shallower models are planned whole


@dataclass
class StandIn:
    """The graph the planner solves, and how it maps back to the full model's graph.

    `traced is full` (weights all 1) when the model is planned whole.
    """

    full: TracedModel
    traced: TracedModel
    weight: dict[str, int] = field(default_factory=dict)  # planned node -> full nodes it counts
    counterpart: dict[str, str] = field(default_factory=dict)  # full node -> planned node
    represents: dict[str, tuple[str, ...]] = field(default_factory=dict)  # layer -> full layers

    @property
    def is_shallow(self) -> bool:
        return self.traced is not self.full

    def weight_of(self, name: str) -> int:
        return self.weight.get(name, 1)

    def expand(self, strategies: dict[str, list], choices: dict[str, int]) -> dict[str, object]:
        """The strategy of every decision node of the full graph, from the planned graph's
        choices (a dropped block's node takes its counterpart's)."""
        chosen = {}
        for n in decision_nodes(self.full.graph_module):
            name = self.counterpart.get(n.name, n.name)
            chosen[n.name] = strategies[name][choices[name]]
        return chosen


def whole(traced: TracedModel) -> StandIn:
    """The identity stand-in: plan the full graph."""
    return StandIn(full=traced, traced=traced)


def stand_in(traced: TracedModel) -> StandIn:
    """The shallow stand-in of `traced`, or `whole(traced)` when its blocks do not all repeat
    (different shapes or ops, fewer than MIN_BLOCKS, or blocks that are not contiguous)."""
    blocks = _blocks(traced)
    if blocks is None or len(blocks) < MIN_BLOCKS:
        return whole(traced)
    names = list(blocks)
    signatures = {_signature(name, members) for name, members in blocks.items()}
    if len(signatures) != 1:
        return whole(traced)
    rep = names[KEPT_BLOCKS - 1]
    dropped = names[KEPT_BLOCKS:]
    counterpart = {}
    for name in dropped:
        for full_node, kept_node in zip(blocks[name], blocks[rep]):
            counterpart[full_node.name] = kept_node.name
    shallow = _cut(traced, counterpart)
    if shallow is None:
        return whole(traced)
    weight = {n.name: len(names) - KEPT_BLOCKS + 1 for n in blocks[rep]}
    represents = {name: (name,) for name in names[:KEPT_BLOCKS - 1]}
    represents[rep] = (rep, *dropped)
    return StandIn(full=traced, traced=shallow, weight=weight, counterpart=counterpart,
                   represents=represents)


def _blocks(traced: TracedModel) -> dict[str, list[fx.Node]] | None:
    """Decision nodes of each block in graph order; None unless the ops run as pre, block after
    block, post (a block's ops interleaved with another's, or ops between blocks)."""
    blocks: dict[str, list[fx.Node]] = {}
    runs: list[str | None] = []
    for n in decision_nodes(traced.graph_module):
        b = block_of(n, traced)
        if n.op == "call_function" and (not runs or runs[-1] != b):
            runs.append(b)
        if b is not None:
            blocks.setdefault(b, []).append(n)
    middle = runs[1:] if runs and runs[0] is None else runs
    middle = middle[:-1] if middle and middle[-1] is None else middle
    if None in middle or len(set(middle)) != len(middle):
        return None
    return blocks


def _signature(name: str, members: list[fx.Node]) -> tuple:
    template = re.sub(r"\.\d+$", ".*", name)
    index = {n.name: i for i, n in enumerate(members)}

    def ref(a):  # where an input comes from: a position in this block, or outside it
        return ("in", index[a.name]) if a.name in index else ("out",)

    return (template, tuple(
        (n.op, str(n.target) if n.op != "placeholder" else "", _shape(n),
         tuple(ref(a) for a in n.all_input_nodes))
        for n in members
    ))


def _shape(n: fx.Node):
    v = n.meta.get("val")
    if isinstance(v, (tuple, list)):
        return tuple(tuple(x.shape) if hasattr(x, "shape") else None for x in v)
    return tuple(v.shape) if hasattr(v, "shape") else None


def _cut(traced: TracedModel, counterpart: dict[str, str]) -> TracedModel | None:
    """A copy of the graph without the dropped blocks: whatever read a dropped node reads its
    counterpart in the kept block instead. None if a dropped node feeds the loss or output.
    Adds the dropped getitems to `counterpart`."""
    gm = copy.deepcopy(traced.graph_module)
    nodes = {n.name: n for n in gm.graph.nodes}
    dropped = set(counterpart)
    # getitems of dropped multi-output ops go with them
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.all_input_nodes and all(
                a.name in dropped for a in n.all_input_nodes) and is_getitem(n):
            dropped.add(n.name)
            counterpart[n.name] = _getitem_counterpart(n, counterpart, nodes)
    if traced.loss_node in dropped or traced.output_node in dropped:
        return None
    for name in dropped:
        node = nodes[name]
        for user in list(node.users):
            if user.name not in dropped:
                user.replace_input_with(node, nodes[counterpart[name]])
    for n in reversed(list(gm.graph.nodes)):
        if n.name in dropped:
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    kept = {n.name for n in gm.graph.nodes}
    return TracedModel(
        graph_module=gm,
        parameters={k: v for k, v in traced.parameters.items() if k in kept},
        buffers={k: v for k, v in traced.buffers.items() if k in kept},
        inputs=list(traced.inputs),
        target=traced.target,
        loss_node=traced.loss_node,
        output_node=traced.output_node,
        model_name=traced.model_name,
        layout=traced.layout,
        constants=traced.constants,
    )


def _getitem_counterpart(n: fx.Node, counterpart: dict[str, str], nodes) -> str:
    """The getitem of the counterpart op that picks the same output."""
    src = nodes[counterpart[n.args[0].name]]
    for u in src.users:
        if is_getitem(u) and u.args[1] == n.args[1]:
            return u.name
    raise ValueError(f"no getitem {n.args[1]} of {src.name} stands for {n.name}")
