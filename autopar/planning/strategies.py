"""Candidate shardings for every node of a traced graph.

A *strategy* of a node is one placement per mesh axis for each tensor input and each output.
They come from three sources, in order:

1. a rule registered with `autopar.register_rule`, or one of ours (`op_rules.RULES`), for ops
   DTensor cannot shard (run on local shards);
2. DTensor's own op rules, asked through `dtensor.propagate`, probing input placements taken
   from the producers' candidate outputs and keeping the placements DTensor settles on;
3. otherwise replicate everything (the op runs whole on every rank): the plan lists those ops
   (`Plan.fallback_ops`) and planning warns once per op (`op_rules.warn_fallbacks`).

Only placements that divide a tensor evenly are kept (DTensor runs uneven shards, but their
cost and memory differ per rank and the planner does not model that yet).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import fx
from torch.distributed.tensor import Partial, Placement, Replicate, Shard
from torch.utils._pytree import tree_map

from autopar import dtensor
from autopar.planning import op_rules
from autopar.trace import tensor_inputs

Placements = tuple[Placement, ...]


@dataclass(frozen=True)
class Strategy:
    """Placements a node takes: per tensor input and per output, one placement per mesh axis."""

    inputs: tuple[Placements, ...]
    outputs: tuple[Placements | None, ...]
    rule: str  # "dtensor", "local" (op_rules' or registered, runs on local shards), "replicate",
    #            "factory", "input"


def output_vals(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val) if isinstance(val, (tuple, list)) else (val,)


def is_even(shape, placements: Placements, mesh_shape) -> bool:
    """Whether every sharded dim divides by the product of the axes sharding it."""
    parts = [1] * len(shape)
    for p, n in zip(placements, mesh_shape):
        if isinstance(p, Shard):
            if p.dim >= len(shape):
                return False
            parts[p.dim] *= n
    return all(size % k == 0 for size, k in zip(shape, parts))


def placement_options(shape, mesh_shape) -> list[Placements]:
    """Every Replicate / Shard(dim) per axis that shards `shape` evenly (inputs, parameters)."""
    per_axis = [Replicate()] + [Shard(d) for d in range(len(shape))]
    return [
        pl
        for pl in itertools.product(per_axis, repeat=len(mesh_shape))
        if is_even(shape, pl, mesh_shape)
    ]


def _allowed(p: Placement | None) -> bool:
    return p is None or type(p) in (Replicate, Shard) or dtensor.is_plain_partial(p)


def _valid(strategy: Strategy, node: fx.Node, mesh_shape) -> bool:
    ins = tensor_inputs(node)
    for arg, pl in zip(ins, strategy.inputs):
        if not all(map(_allowed, pl)) or not is_even(arg.meta["val"].shape, pl, mesh_shape):
            return False
    for val, pl in zip(output_vals(node), strategy.outputs):
        if pl is None:
            continue
        if not isinstance(val, torch.Tensor) or not all(map(_allowed, pl)):
            return False
        if not is_even(val.shape, pl, mesh_shape):
            return False
    return True


def node_strategies(node: fx.Node, mesh, options: list[list[Placements]]) -> list[Strategy]:
    """Strategies of a call_function node, given candidate placements for each tensor input."""
    ndim = mesh.ndim
    mesh_shape = tuple(mesh.shape)
    n_out = len(output_vals(node))
    replicate = (Replicate(),) * ndim
    ins = tensor_inputs(node)
    if not ins:
        return [Strategy((), (replicate,) * n_out, "factory")]
    local = op_rules.rule_strategies(node)
    if local is not None:
        found = [Strategy(i, o, "local") for i, o in op_rules.expand_to_mesh(local, ndim)]
    elif dtensor.has_rule(node.target):
        found = _probe_dtensor(node, mesh, options)
    else:
        found = []
    found = [s for s in found if _valid(s, node, mesh_shape)]
    if not found:
        return [Strategy((replicate,) * len(ins), (replicate,) * n_out, "replicate")]
    return found


def _probe_dtensor(node: fx.Node, mesh, options: list[list[Placements]]) -> list[Strategy]:
    key = (_signature(node), tuple(mesh.shape), tuple(mesh.mesh_dim_names or ()),
           tuple(tuple(o) for o in options))
    return [Strategy(i, o, "dtensor") for i, o in _probe_cached(key, node, mesh, options)]


def _signature(node: fx.Node) -> str:
    """What determines an op's strategies: the op, its non-tensor args, its inputs' metadata."""
    def meta(a):
        if isinstance(a, fx.Node):
            v = a.meta["val"]
            return ("T", tuple(v.shape), str(v.dtype), tuple(v.stride()))
        return a
    return repr((str(node.target), tree_map(meta, (node.args, node.kwargs))))


_PROBE_CACHE: dict = {}
_ASKED: dict = {}  # (signature, mesh shape, device type, placements) -> DTensor's answer


def _probe_cached(key, node, mesh, options):
    if key not in _PROBE_CACHE:
        _PROBE_CACHE[key] = _probe(node, mesh, options)
    return _PROBE_CACHE[key]


def _probe(node: fx.Node, mesh, options: list[list[Placements]]):
    """Ask DTensor about a set of input placements; keep each answer that is a fixed point.

    Probes: all inputs replicated; each input alone taking each of its options (others
    replicated); every input taking the same option (pointwise ops keep a shared sharding);
    then, on meshes of 2+ axes, every axis-wise combination of the answers.
    DTensor answers with the placements it would redistribute to, which is a valid strategy;
    asking again with those confirms it runs without redistribution.
    """
    ins = tensor_inputs(node)
    vals = [a.meta["val"] for a in ins]
    ndim = mesh.ndim
    rep = (Replicate(),) * ndim
    probes = {tuple([rep] * len(ins))}
    for i, opts in enumerate(options):
        for o in opts:
            probes.add(tuple(o if j == i else rep for j in range(len(ins))))
    for o in options[0] if options else ():
        probes.add(tuple(o if o in options[j] else rep for j in range(len(ins))))
    args, kwargs = dtensor.node_args(node)
    asked = (_signature(node), tuple(mesh.shape), mesh.device_type)

    def ask(placements):
        # DTensor answers a question (op, shapes, mesh shape, placements) the same way whatever
        # the mesh's axis names or the other probes: ask each once per process (other meshes of
        # this shape, microbatches of this size and nodes with this signature ask it again)
        key = (asked, placements)
        if key not in _ASKED:
            _ASKED[key] = dtensor.ask(node.target, args, kwargs, vals, placements, mesh)
        return _ASKED[key]

    results = {}
    for probe in sorted(probes, key=repr):
        answer = ask(probe)
        if answer is None:
            continue
        ins_pl, _ = answer
        confirmed = ask(ins_pl)
        if confirmed is not None and tuple(confirmed[0]) == tuple(ins_pl):
            results.setdefault(tuple(ins_pl), confirmed[1])
    for ins_pl in _axis_combinations(list(results), ndim):
        if ins_pl in results:
            continue
        confirmed = ask(ins_pl)
        if confirmed is not None and tuple(confirmed[0]) == ins_pl:
            results[ins_pl] = confirmed[1]
    return list(results.items())


def _axis_combinations(found: list[tuple[Placements, ...]], ndim: int):
    """Input placements that combine, axis by axis, the columns of strategies already found.

    The probes above set one input at a time, so on a 2-D mesh they never ask for, say, the
    batch split over dp while the weight is split over tp. DTensor builds multi-axis strategies
    the same way (the product of one-axis strategies), so every combination of found columns is
    a candidate; the caller keeps those DTensor confirms as fixed points.
    """
    if ndim < 2 or not found:
        return []
    columns = [list(dict.fromkeys(tuple(pl[a] for pl in ins) for ins in found))
               for a in range(ndim)]
    combos = []
    for per_axis in itertools.product(*columns):
        n_in = len(per_axis[0])
        combos.append(tuple(tuple(per_axis[a][i] for a in range(ndim)) for i in range(n_in)))
    return combos


def shard_factor(placements: Placements | None, mesh_shape) -> int:
    """How many pieces a tensor with these placements is cut into (Partial counts as whole)."""
    if placements is None:
        return 1
    return math.prod(n for p, n in zip(placements, mesh_shape) if isinstance(p, Shard))


def work_factor(strategy: Strategy, mesh_shape) -> int:
    """Over how many devices an op's work is split: axes on which any operand is sharded or
    partial split the work; fully replicated axes repeat it."""
    split = 1
    for a, n in enumerate(mesh_shape):
        pls = [pl[a] for pl in (*strategy.inputs, *strategy.outputs) if pl is not None]
        if any(isinstance(p, (Shard, Partial)) for p in pls):
            split *= n
    return split
