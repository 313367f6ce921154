"""Layers: the unit of pipeline stage cuts, activation checkpointing and deduplication.

A layer is one element of a repeated module list (`blocks.3`, `model.layers.11`); everything the
graph does before the first of them is the layer "pre" (embeddings), everything after the last is
"post" (final norm, head, loss). Parameters belong to the layer of their first user.

    assign_layers(traced) -> {decision node name: layer name}, in graph order
    layer_order(assignment) -> ["pre", "blocks.0", ..., "post"]
"""

from __future__ import annotations

import re

from torch import fx

from autopar.trace import TracedModel, is_getitem, layer_of

PRE, POST = "pre", "post"

_INDEXED = re.compile(r"^(.*?\.\d+)(\.|$)")


def block_of(n: fx.Node, traced: TracedModel) -> str | None:
    """'blocks.3' for anything inside the 4th element of a module list, else None."""
    if n.op == "placeholder":
        fqn = traced.parameters.get(n.name) or traced.buffers.get(n.name)
    else:
        fqn = layer_of(n)
    m = _INDEXED.match(fqn or "")
    return m.group(1) if m else None


def decision_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Placeholders and ops; `getitem` only picks an output of its op and follows it."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "placeholder" or (n.op == "call_function" and not is_getitem(n))
    ]


def assign_layers(traced: TracedModel) -> dict[str, str]:
    """Every decision node's layer. Ops outside any block before the first block are "pre",
    after it "post"; placeholders follow their first user (user inputs included)."""
    gm = traced.graph_module
    ops = [n for n in decision_nodes(gm) if n.op == "call_function"]
    layer: dict[str, str] = {}
    seen_block = False
    for n in ops:
        b = block_of(n, traced)
        if b is not None:
            seen_block = True
            layer[n.name] = b
        else:
            layer[n.name] = POST if seen_block else PRE
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            users = decision_users(n)
            layer[n.name] = layer[users[0].name] if users else PRE
    for n in gm.graph.nodes:  # getitems follow their op
        if is_getitem(n):
            layer[n.name] = layer[n.args[0].name]
    return {n.name: layer[n.name] for n in gm.graph.nodes if n.name in layer}


def decision_users(n: fx.Node) -> list[fx.Node]:
    """The ops reading `n`'s value, through getitems, in graph order."""
    out = []
    for u in n.users:
        if is_getitem(u):
            out.extend(decision_users(u))
        elif u.op == "call_function":
            out.append(u)
    return sorted(out, key=lambda u: _position(u))


def _position(n: fx.Node) -> int:
    i = 0
    for m in n.graph.nodes:
        if m is n:
            return i
        i += 1
    return i


def layer_order(assignment: dict[str, str]) -> list[str]:
    """Layer names in the order their first op appears."""
    return list(dict.fromkeys(assignment.values()))
