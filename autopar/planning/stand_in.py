"""A shallow stand-in for a deep model: every run of identical layers cut to three.

Repeated layers take the same strategy position by position (the planner ties them,
`intra_op._layer_ties`), so in a run of n identical layers every layer after the first two costs
the same: same ops, same shardings, same resharding from what feeds it. The planner therefore
solves a graph that keeps layers 0, 1 and 2 of each run, where layer 2 (the representative)
stands for layers 2 .. n-1: its nodes and the edges into it weigh n-2 in the objective. For step
time this is exact (the weighted objective equals the full graph's under the ties); it makes
planning cost independent of depth (GPT-3's 96 blocks solve like 3, T5's two stacks like 3 + 3).

    stand_in(traced) -> StandIn   the shallow graph, node weights, and how to map back

Runs. Each layer (`autopar.layers`) has a signature: its template (`encoder.block.*`), and per
decision node its op, shape and where each input comes from: a position in the layer, a position
in a layer of a repeated kind (`_kind`: the same template, ops and shapes; the ties make such
positions take one strategy), or one named node (T5's encoder output, read by every decoder
block; Llama's rotary tables). A run is a maximal sequence of units with one signature, a unit
being one layer or a period of two different ones (Switch's dense and MoE blocks, Swin's plain
and shifted-window blocks); the unit before it joins when it has the same kind but other inputs
(T5's encoder block 1 reads the position bias from block 0, the block right before it; later
blocks read it from two or more blocks back). Runs of at least MIN_BLOCKS units are cut: units
0 and 1 are kept apart because unit 0 reads what came before the run and may shard its first
ops differently, and unit 1 is the first fed by a unit; unit 2 stands for the rest, on the
assumption that units fed by the same kind get the same strategy lists, which
`tests/planning/test_stand_in.py` checks for GPT, Llama, T5 and a model of several stacks
against the full graph. What a dropped unit read, its representative reads: the same node, or
the tied node at the same place, so every dropped edge costs what the weighted one does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import fx

from autopar.layers import assign_layers, decision_nodes, layer_order
from autopar.trace import TracedModel, is_getitem

KEPT_BLOCKS = 3  # units 0, 1 and 2 of a run (2 stands for 2 .. n-1)
MIN_BLOCKS = 5  # shorter runs are planned whole
PERIODS = (1, 2)  # layers per unit of a run


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
    stands_for: dict[str, str] = field(default_factory=dict)  # full layer -> planned layer

    @property
    def is_shallow(self) -> bool:
        return self.traced is not self.full

    def weight_of(self, name: str) -> int:
        return self.weight.get(name, 1)

    def planned_layer(self, full_layer: str) -> str:
        """The planned layer whose costs `full_layer` takes (itself, unless dropped)."""
        return self.stands_for.get(full_layer, full_layer)

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
    """The shallow stand-in of `traced`, or `whole(traced)` when no run of identical layers is
    MIN_BLOCKS units long."""
    members = _members(traced)
    names = list(members)
    kinds = [_kind(name, members[name]) for name in names]
    repeated = {k for k in kinds if kinds.count(k) > 1}
    where = {n.name: (kinds[i] if kinds[i] in repeated else None, p)
             for i, name in enumerate(names) for p, n in enumerate(members[name])}
    signatures = [(kinds[i], _inputs(members[name], where)) for i, name in enumerate(names)]
    runs = find_runs(signatures, kinds)
    if not runs:
        return whole(traced)
    counterpart, weight, represents, stands_for = {}, {}, {}, {}
    for first, period, count in runs:
        units = [names[first + u * period:first + (u + 1) * period] for u in range(count)]
        rep = units[KEPT_BLOCKS - 1]
        for unit in units[KEPT_BLOCKS:]:
            for name, kept in zip(unit, rep):
                stands_for[name] = kept
                for full_node, kept_node in zip(members[name], members[kept]):
                    counterpart[full_node.name] = kept_node.name
        for j, kept in enumerate(rep):
            represents[kept] = (kept, *(unit[j] for unit in units[KEPT_BLOCKS:]))
            weight.update({n.name: count - KEPT_BLOCKS + 1 for n in members[kept]})
    shallow = _cut(traced, counterpart)
    if shallow is None:
        return whole(traced)
    return StandIn(full=traced, traced=shallow, weight=weight, counterpart=counterpart,
                   represents=represents, stands_for=stands_for)


def find_runs(signatures: list, kinds: list) -> list[tuple[int, int, int]]:
    """(first layer, period, units) of every run of at least MIN_BLOCKS units: maximal repeats
    of one signature (period 1) or of a pair of different ones (period 2), whichever covers
    more layers, left to right; a run's first unit needs only the kinds of the others (its
    inputs come from before the run)."""
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < len(signatures):
        best = (1, 1)
        for p in PERIODS:
            n = _repeat(signatures, i, p)
            if kinds[i:i + p] == kinds[i + p:i + 2 * p]:
                n = max(n, 1 + _repeat(signatures, i + p, p))
            if n * p > best[0] * best[1]:
                best = (p, n)
        p, n = best
        if n >= MIN_BLOCKS:
            runs.append((i, p, n))
            i += p * n
        else:
            i += 1
    return runs


def _repeat(signatures: list, i: int, p: int) -> int:
    """How many times the unit of p different signatures at layer i repeats from there."""
    unit = signatures[i:i + p]
    if len(unit) < p or any(a == b for a, b in zip(unit, unit[1:])):
        return 0
    n = 1
    while signatures[i + n * p:i + (n + 1) * p] == unit:
        n += 1
    return n


def _members(traced: TracedModel) -> dict[str, list[fx.Node]]:
    """Decision nodes of each layer in graph order, layers in order."""
    layer = assign_layers(traced)
    members: dict[str, list[fx.Node]] = {name: [] for name in layer_order(layer)}
    for n in decision_nodes(traced.graph_module):
        members[layer[n.name]].append(n)
    return members


def _kind(name: str, members: list[fx.Node]) -> tuple:
    """What layers of one kind share: template, ops, shapes, wiring inside the layer (the key
    `intra_op._layer_ties` ties layers by, and the wiring)."""
    template = re.sub(r"\.\d+$", ".*", name)
    index = {n.name: i for i, n in enumerate(members)}

    def inside(a):
        while is_getitem(a):
            a = a.args[0]
        return index.get(a.name)

    return (template, tuple(
        (n.op, str(n.target) if n.op != "placeholder" else "", _shape(n),
         tuple(inside(a) for a in n.all_input_nodes))
        for n in members
    ))


def _inputs(members: list[fx.Node], where: dict) -> tuple:
    """Where each input from outside the layer comes from: a place in a layer of a repeated
    kind (kind, position), or one named node."""
    own = {n.name for n in members}

    def ref(a):
        picks = []
        while is_getitem(a):
            picks.append(a.args[1])
            a = a.args[0]
        if a.name in own:
            return None
        kind, position = where.get(a.name, (None, None))
        return (kind, position, tuple(picks)) if kind is not None else (a.name, tuple(picks))

    return tuple(tuple(ref(a) for a in n.all_input_nodes) for n in members)


def _shape(n: fx.Node):
    v = n.meta.get("val")
    if isinstance(v, (tuple, list)):
        return tuple(tuple(x.shape) if hasattr(x, "shape") else None for x in v)
    return tuple(v.shape) if hasattr(v, "shape") else None


def _cut(traced: TracedModel, counterpart: dict[str, str]) -> TracedModel | None:
    """A copy of the graph without the dropped blocks: whatever read a dropped node reads its
    counterpart in the kept block instead. None if a dropped node feeds the loss or output.
    Adds the dropped getitems to `counterpart`."""
    nodes = {n.name: n for n in traced.graph_module.graph.nodes}
    dropped = set(counterpart)
    # getitems of dropped multi-output ops go with them
    for n in traced.graph_module.graph.nodes:
        if n.op == "call_function" and n.all_input_nodes and all(
                a.name in dropped for a in n.all_input_nodes) and is_getitem(n):
            dropped.add(n.name)
            counterpart[n.name] = _getitem_counterpart(n, counterpart, nodes)
    if traced.loss_node in dropped or traced.output_node in dropped:
        return None
    # a new graph of the kept nodes (copying the whole graph and erasing would copy every
    # dropped block first: seconds on a deep model); whatever read a dropped node reads its
    # counterpart, which comes before it
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for n in traced.graph_module.graph.nodes:
        if n.name not in dropped:
            env[n.name] = graph.node_copy(n, lambda a: env[counterpart.get(a.name, a.name)])
    gm = fx.GraphModule(traced.graph_module, graph)
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
