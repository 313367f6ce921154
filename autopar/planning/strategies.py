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
# (size-class signature, mesh shape, device type, placements) -> an answer that holds for every
# node of that class (see `_size_class_signature` and `_size_free`)
_ASKED_BY_CLASS: dict = {}
NORMALISE_SIZES = True  # False: ask DTensor for every exact signature (tests compare the two)

# DTensor rules (`dtensor.rule_name`) whose answers depend on the tensors' sizes only through
# what `_size_class_signature` keeps (and through the bytes that price redistributions, which
# `_size_free` deals with): the op, the non-tensor args, ranks, dtypes, which dims are 0 or 1
# (broadcasting), and whether each size divides by and is at least each shard count the mesh
# can make (DTensor's `is_tensor_shardable`, `is_tensor_evenly_shardable`). Read in torch
# 2.13's source: these strategies come from dims and einsum letters (pointwise ops broadcast by
# rank and size-1 dims; mm/addmm/bmm/baddbmm by "mk,kn->mn" with a bias's size-1 dims; softmax
# and reductions by their dim args, avg needing even shards; layer/rms norm by
# len(normalized_shape); index_select, embedding, SDPA by dims). A release that moves an op to
# another rule renames it, and the op is asked with exact sizes again. Left out, so asked with
# exact sizes: views, reshapes, expand, permute, slice, cat, split, convolution, indexing,
# factories and every other rule; views split and merge dims by their exact sizes, others read
# sizes from their args.
_SIZE_FREE_RULES = frozenset({
    "_pointwise_ops._register_single_dim_pointwise.<locals>.strategy_fn",
    "_matrix_ops.mm_single_dim_strategy",
    "_matrix_ops.addmm_single_dim_strategy",
    "_matrix_ops.bmm_single_dim_strategy",
    "_matrix_ops.baddbmm_single_dim_strategy",
    "_matrix_ops.scaled_dot_product_flash_attention_strategy",
    "_matrix_ops.scaled_dot_product_efficient_attention_strategy",
    "_math_ops.softmax_strategy",
    "_math_ops.linear_reduction_strategy",
    "_math_ops.layer_norm_single_dim_strategy",
    "_math_ops.rms_norm_single_dim_strategy",
    "_tensor_ops._to_copy_single_dim_strategy",
    "_tensor_ops.index_select_single_dim_strategy",
    "_embedding_ops.embedding_strategy",  # its row-wise answers carry the weight's shape in
    #                                       a _MaskPartial: `_size_free` keeps those exact
})


def _size_class_signature(node: fx.Node, mesh_shape) -> str | None:
    """`_signature` with each tensor size replaced by its class on this mesh, for ops whose
    DTensor rule is in `_SIZE_FREE_RULES`; None for every other op (asked with exact sizes).

    A size's class: whether it is 0 or 1 (1 broadcasts), and for every set of the mesh's axes
    (a dim may be split over several), whether the set's device count k divides it and whether
    it is at least k. The sets are listed by axis, not by k, so the class is the same on every
    mesh of the rank where the same sets of axes divide the same sizes: DTensor reads the axes'
    sizes only through these tests (`is_tensor_shardable`, `is_tensor_evenly_shardable`), and
    answers are kept by class and mesh rank. Equalities between sizes are not kept: these
    rules never compare two dims (a valid node's broadcast and contracted dims agree by
    construction). Strides become the order of the dims by stride, which are 0 and whether the
    tensor is contiguous. A norm's normalized_shape, its input's last sizes, becomes its length
    (all that the rule reads).
    """
    if not NORMALISE_SIZES or node.target.name().split("::")[-1].startswith(
            ("_foreach_", "_fused_", "_amp_foreach_")):  # list ops expand per element: exact
        return None
    rule = dtensor.rule_name(node.target)
    if rule not in _SIZE_FREE_RULES:
        return None
    counts = _axis_set_sizes(tuple(mesh_shape))

    def size(s):
        return (s == 0, s == 1, tuple((s % k == 0, s >= k) for k in counts))

    def meta(a):
        if isinstance(a, fx.Node):
            v = a.meta["val"]
            if not isinstance(v, torch.Tensor):
                return ("V", repr(v))
            stride = v.stride()
            order = tuple(sorted(range(v.ndim), key=lambda d: -stride[d]))
            return ("T", tuple(size(int(s)) for s in v.shape), str(v.dtype), order,
                    tuple(st == 0 for st in stride), v.is_contiguous())
        return a
    args = node.args
    if rule in _NORMALIZED_SHAPE_ARG and len(args) > 1:
        args = (*args[:1], ("normalized_shape of length", len(args[1])), *args[2:])
    return repr((str(node.target), tree_map(meta, (args, node.kwargs))))


# Views keep their exact sizes (they split and merge dims by them), but read the mesh only
# through whether each set of axes divides a size (`propagate_shape_and_sharding`: a split
# output dim's size, a sharded dim's local size, by the axes that shard it); answers naming a
# _StridedShard, whose split factor carries sizes, are kept exact by `_size_free`.
_VIEW_RULES = frozenset({"_view_ops.register_op_strategy_map.<locals>.reshape_strategy"})


def _view_signature(node: fx.Node, mesh_shape) -> str | None:
    """For a view: `_signature` (exact sizes) with which sets of the mesh's axes divide each
    size the node names (its inputs' and output's shapes and its shape args), so that meshes of
    one rank share answers where the same sets divide; None for other ops."""
    if not NORMALISE_SIZES or dtensor.rule_name(node.target) not in _VIEW_RULES:
        return None
    counts = _axis_set_sizes(tuple(mesh_shape))
    sizes: list[int] = []

    def collect(a):
        if isinstance(a, fx.Node):
            a = a.meta.get("val")
        if isinstance(a, torch.Tensor):
            sizes.extend(int(x) for x in a.shape)
        elif isinstance(a, (list, tuple)):
            for x in a:
                collect(x)
        elif isinstance(a, int) and not isinstance(a, bool):
            sizes.append(a)
    collect((node.args, list(node.kwargs.values()), output_vals(node)))
    divides = tuple(tuple((s % k == 0, s >= k) for k in counts) for s in dict.fromkeys(sizes))
    return repr((_signature(node), divides))


# the norms' rules read only len(normalized_shape) (arg 1), the input's trailing sizes
_NORMALIZED_SHAPE_ARG = frozenset({"_math_ops.layer_norm_single_dim_strategy",
                                   "_math_ops.rms_norm_single_dim_strategy"})


def _axis_set_sizes(mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The devices of every set of mesh axes (a dim may be split over several), in a fixed
    order of the sets: the i-th entry is the same set of axes on every mesh of this rank, so a
    size's class says which sets of axes can split it, whatever the axes' sizes."""
    axes = range(len(mesh_shape))
    return tuple(math.prod(mesh_shape[a] for a in c) for r in range(1, len(mesh_shape) + 1)
                 for c in itertools.combinations(axes, r))


def _is_plain(p) -> bool:
    return type(p) in (Replicate, Shard) or dtensor.is_plain_partial(p)


def _size_free(placements, answer) -> bool:
    """Whether DTensor's `answer` to `placements` is the same for every size of the class.

    DTensor keeps inputs as they are where a strategy takes them, else redistributes to the
    strategy of least cost, in bytes moved: that choice depends on sizes. A move from fully
    replicated, or no move, costs 0 whatever the sizes, and DTensor then picks among the
    zero-cost strategies in an order set by placements alone (the first, or the one needing no
    move). So an answer is size-free when every input stays or was replicated. A refusal is
    size-free too: whether any strategy exists is the rule's (dims and the size classes) and
    which moves are possible is the placements'. Answers naming placements that carry sizes
    (_MaskPartial, _StridedShard) stay exact."""
    if answer is None:
        return True
    ins, outs = answer
    if not all(_is_plain(p) for pl in (*ins, *(o for o in outs if o is not None)) for p in pl):
        return False
    return all(q == p or all(isinstance(x, Replicate) for x in p)
               for p, q in zip(placements, ins))


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
    by_class = _size_class_signature(node, mesh.shape) or _view_signature(node, mesh.shape)
    # by the mesh's rank, not its shape: the class already says which sets of axes divide
    # each size, all DTensor's rules read of the axes' sizes (so a 2 x 4 mesh answers for 4 x 8)
    by_class = by_class and (by_class, mesh.ndim, mesh.device_type)

    def ask(placements):
        # DTensor answers a question (op, shapes, mesh shape, placements) the same way whatever
        # the mesh's axis names or the other probes: ask each once per process (other meshes of
        # this shape, microbatches of this size and nodes with this signature ask it again).
        # Answers that hold for a whole size class (other microbatch sizes, widths, window
        # counts) are kept by class too, so other sizes do not ask again.
        key = (asked, placements)
        if key not in _ASKED:
            if by_class and (by_class, placements) in _ASKED_BY_CLASS:
                _ASKED[key] = _ASKED_BY_CLASS[by_class, placements]
            else:
                answer = dtensor.ask(node.target, args, kwargs, vals, placements, mesh)
                _ASKED[key] = answer
                if by_class and _size_free(placements, answer):
                    _ASKED_BY_CLASS[by_class, placements] = answer
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
    """Over how many devices an op's work is split: axes on which any operand is sharded, or
    the output partial from inputs that are not (a contraction split), split the work; fully
    replicated axes repeat it, and so do partial inputs (each rank runs the op on its whole
    partial value: a linear op on a partial sum, or a row-wise op on expert rows)."""
    split = 1
    for a, n in enumerate(mesh_shape):
        ins = [pl[a] for pl in strategy.inputs]
        outs = [pl[a] for pl in strategy.outputs if pl is not None]
        if any(isinstance(p, Shard) for p in (*ins, *outs)) or (
                any(isinstance(p, Partial) for p in outs)
                and not any(isinstance(p, Partial) for p in ins)):
            split *= n
    return split
