"""Layers: the unit of pipeline stage cuts, activation checkpointing and deduplication.

The rule, from the module paths export records for every op (`nn_module_stack`):

* A *stack* is a module list (children named 0, 1, 2, ...) whose elements are all of one class
  and run as a chain: each element reads, directly or through ops outside the list, what the
  element before it made. A chained list of several classes is a stack too where no element of
  a stack holds it (a flat list of Swin blocks and patch mergings). GPT's `blocks`, Llama's `model.layers`, T5's `encoder.block` and
  `decoder.block`, Swin's `swin.encoder.layers` (stages) and each stage's `blocks` are stacks;
  T5's `block.3.layer` (self-attention, cross-attention, feed-forward: three classes) is not,
  nor is a list of experts that all read the router's output.
* An op's layer is the innermost stack element that holds it: `blocks.3`, `model.layers.11`,
  `encoder.block.2`, `swin.encoder.layers.0.blocks.1`. Swin's patch merging
  (`swin.encoder.layers.0.downsample`) lies in the stage but in none of its blocks: its layer is
  the stage element itself, `swin.encoder.layers.0`, a layer of its own between two blocks.
* Ops in no stack element are "pre" before the first layer, "post" after the last, and
  "between.<i>" (i = 0, 1, ... in order) where they fall between layers (T5: the encoder's final
  norm, the decoder's embedding and masks); one that falls inside a layer (the same element
  before and after it) joins that layer.
* Layers are contiguous runs of ops, so that a stage is a run of layers: an op whose layer has
  already ended joins the layer running. Placeholders (parameters, inputs) follow their first
  user, getitems their op.

Layers need not form a chain: a T5 decoder block reads the encoder's output, made layers before.
`crossing` lists, for each cut between two layers, every value made before it and read after it
(the values a pipeline stage boundary there carries, as `runtime.pipeline.split_stages` sends).

    assign_layers(traced) -> {node name: layer name}, ops in graph order, then placeholders
    layer_order(assignment) -> ["pre", "blocks.0", ..., "post"]
    crossing(traced) -> per layer of layer_order: the values a cut after it carries
"""

from __future__ import annotations

import re
import weakref

from torch import fx

from autopar.trace import TracedModel, is_getitem, module_stack

PRE, POST, BETWEEN = "pre", "post", "between"

_ELEMENT = re.compile(r"^(.*)\.(\d+)$")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decision_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Placeholders and ops; `getitem` only picks an output of its op and follows it."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "placeholder" or (n.op == "call_function" and not is_getitem(n))
    ]


def assign_layers(traced: TracedModel) -> dict[str, str]:
    """Every decision node's layer, and every getitem's (the module docstring's rule)."""
    return dict(_analysis(traced)[0])


def block_of(n: fx.Node, traced: TracedModel) -> str | None:
    """The stack element (`blocks.3`, `encoder.block.2`) whose layer `n` is in, else None
    (pre, post, between)."""
    layer = _analysis(traced)[0].get(n.name)
    return layer if layer is not None and not is_glue(layer) else None


def is_glue(layer: str) -> bool:
    """Whether `layer` holds ops outside every stack: pre, post, between.<i>."""
    return layer in (PRE, POST) or layer.startswith(BETWEEN + ".")


def layer_order(assignment: dict[str, str]) -> list[str]:
    """Layer names in the order their first op appears (`assign_layers` lists ops first)."""
    return list(dict.fromkeys(assignment.values()))


def crossing(traced: TracedModel) -> list[tuple[str, ...]]:
    """For the cut after each layer (in `layer_order`): the values made in it or before it and
    read after it, in graph order; the last layer's is empty. Values are user inputs and op
    outputs (getitems for multi-output ops); parameters, buffers, the target and what only the
    loss reads (the last stage's loss function has it) are not sent."""
    return list(_analysis(traced)[1])


def decision_users(n: fx.Node) -> list[fx.Node]:
    """The ops reading `n`'s value, through getitems, in graph order."""
    out = []
    for u in n.users:
        if is_getitem(u):
            out.extend(decision_users(u))
        elif u.op == "call_function":
            out.append(u)
    return sorted(out, key=_position)


def _position(n: fx.Node) -> int:
    index = _CACHE.get(n.graph)
    if index is None or n not in index:
        index = {m: i for i, m in enumerate(n.graph.nodes)}
        _CACHE[n.graph] = index
    return index[n]


# ---------------------------------------------------------------------------------------------


def _analysis(traced: TracedModel):
    gm = traced.graph_module
    key = (len(gm.graph.nodes), traced.target, traced.loss_node)
    hit = _CACHE.get(gm)
    if hit is None or hit[0] != key:
        layer = _assign(traced)
        hit = (key, layer, _crossing(traced, layer))
        _CACHE[gm] = hit
    return hit[1], hit[2]


def _assign(traced: TracedModel) -> dict[str, str]:
    gm = traced.graph_module
    ops = [n for n in decision_nodes(gm) if n.op == "call_function"]
    keys = _element_keys(ops)
    keyed = [i for i, k in enumerate(keys) if k is not None]
    nxt: list[str | None] = [None] * len(ops)  # the next op's element key, looking forward
    following = None
    for i in reversed(range(len(ops))):
        nxt[i] = following
        following = keys[i] if keys[i] is not None else following
    layer: dict[str, str] = {}
    ended: set[str] = set()
    current, previous_key, glue = None, None, 0
    for i, n in enumerate(ops):
        k = keys[i]
        if k is None:
            if not keyed or i < keyed[0]:
                k = PRE
            elif i > keyed[-1]:
                k = POST
            elif previous_key is not None and previous_key == nxt[i]:
                k = previous_key  # inside one element
            elif current is not None and is_glue(current):
                k = current
            else:
                k = f"{BETWEEN}.{glue}"
                glue += 1
        else:
            previous_key = k
        if k != current:
            if k in ended:
                k = current  # contiguous layers: a layer that has ended takes no more ops
            else:
                if current is not None:
                    ended.add(current)
                current = k
        layer[n.name] = k
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            users = decision_users(n)
            layer[n.name] = layer[users[0].name] if users else PRE
    for n in gm.graph.nodes:  # getitems follow their op
        if is_getitem(n):
            layer[n.name] = layer[n.args[0].name]
    ordered = [n for n in gm.graph.nodes if n.op != "placeholder"]  # ops first: layer_order
    ordered += [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n.name: layer[n.name] for n in ordered if n.name in layer}


def _element_keys(ops: list[fx.Node]) -> list[str | None]:
    """Per op, the innermost stack element holding it (None: in no stack)."""
    stacks = [module_stack(n) for n in ops]
    kind: dict[str, str] = {}
    for stack in stacks:
        kind.update(stack)
    lists: dict[str, list[str]] = {}  # list FQN -> its elements, in order of first op
    for stack in stacks:
        for fqn, _ in stack:
            m = _ELEMENT.match(fqn)
            if m and fqn not in lists.setdefault(m.group(1), []):
                lists[m.group(1)].append(fqn)
    one_class = {name: elements for name, elements in lists.items()
                 if len({kind[e] for e in elements}) == 1}
    elements = {e for name, es in one_class.items() if _is_chain(ops, stacks, es) for e in es}
    # a list of several classes is a stack only where no stack element holds it: a model's
    # one list of blocks and patch mergings (Swin written flat), not T5's block.3.layer
    elements |= {e for name, es in lists.items() if name not in one_class
                 and not any(name == f or name.startswith(f + ".") for f in elements)
                 and _is_chain(ops, stacks, es) for e in es}
    keys = []
    for stack in stacks:
        inner = [fqn for fqn, _ in stack if fqn in elements]
        keys.append(inner[-1] if inner else None)
    return keys


def _is_chain(ops, stacks, elements: list[str]) -> bool:
    """Whether each element reads what the one before it made, directly or through ops that
    lie in no element of the list."""
    if len(elements) < 2:
        return True
    rank = {e: i for i, e in enumerate(elements)}
    reach: dict[str, int] = {}  # op -> the last element it depends on through outside ops
    fed = set()
    for n, stack in zip(ops, stacks):
        mine = next((rank[f] for f, _ in stack if f in rank), None)
        inputs = [reach.get(a.name, -1) for a in n.all_input_nodes]
        if mine is None:
            reach[n.name] = max(inputs, default=-1)
        else:
            reach[n.name] = mine
            if mine - 1 in inputs:
                fed.add(mine)
        for u in n.users:  # getitems carry their op's reach
            if is_getitem(u):
                reach[u.name] = reach[n.name]
    return fed >= set(range(1, len(elements)))


def _crossing(traced: TracedModel, layer: dict[str, str]) -> tuple[tuple[str, ...], ...]:
    gm = traced.graph_module
    order = layer_order(layer)
    index = {name: i for i, name in enumerate(order)}
    states = set(traced.parameters) | set(traced.buffers)
    loss = {traced.loss_node}
    after = len(order)  # what the loss reads is read "after the last layer"
    spans = []
    for n in gm.graph.nodes:
        if n.name not in layer or n.name in states or n.name == traced.target:
            continue
        if n.op == "placeholder" and n.name not in traced.inputs:
            continue
        if n.op == "call_function" and isinstance(n.meta.get("val"), (tuple, list)):
            continue  # a multi-output op: its getitems are the values
        readers = [after if u.name in loss else index[layer[u.name]] for u in _readers(n)
                   if u.name in layer]
        last = max(readers, default=-1)
        made = 0 if n.op == "placeholder" else index[layer[n.name]]  # inputs enter at 0
        if last > made:
            spans.append((n.name, made, min(last, len(order) - 1)))
    cuts: list[list[str]] = [[] for _ in order]
    for name, made, last in spans:
        for i in range(made, last):
            cuts[i].append(name)
    return tuple(tuple(c) for c in cuts)


def _readers(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if u.op == "call_function"]
