"""From a traced graph to a Plan: strategies, costs and memory as a ShardingProblem, solved.

    build_problem   per decision node: strategies, seconds and bytes per strategy; per edge a
                    resharding-seconds matrix; memory points from forward liveness; ties between
                    repeated layers
    to_plan         a solution's choices -> placements keyed by parameter FQNs and node names

(`solvers.solve_intra_op` solves the problem; `layer_costs.solve_layers` calls it.)

A *decision node* is a placeholder (parameter, buffer, input) or an op; `getitem` nodes only pick
one output of a multi-output op and take no decision of their own.

Step time is modelled as the sum of every op's forward+backward time and every collective, with
no overlap (a conservative serial model); backward communication is mirrored from forward.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.distributed.tensor import Partial, Replicate, Shard

import solvers
from autopar import dtensor, parallelism
from autopar.cluster import Cluster
from autopar.errors import MeshError
from autopar.layers import POST, PRE, assign_layers, decision_nodes
from autopar.parallelism import BATCH, SEQUENCE
from autopar.plan import SCHEMA_VERSION, OpSharding, Plan, placement_to_str
from autopar.planning import context_parallel, cost, expert_rows, sequence_parallel
from autopar.planning.profile import (
    OpProfile,
    TrainingPrecision,
    parameter_state_bytes,
)
from autopar.planning.strategies import (
    Placements,
    Strategy,
    node_strategies,
    output_vals,
    placement_options,
    shard_factor,
    tensor_inputs,
    work_factor,
)
from autopar.trace import TracedModel, is_getitem


@dataclass
class Decisions:
    """The planning problem for one mesh, with what is needed to read its solution back."""

    mesh: dict[str, int]
    strategies: dict[str, list[Strategy]]  # decision node name -> its strategies
    problem: solvers.ShardingProblem
    compute_s: dict[str, list[float]] = field(default_factory=dict)


def source_of(arg: fx.Node) -> tuple[fx.Node, int]:
    """(decision node, output index) that produces the value `arg` stands for."""
    if is_getitem(arg):
        return arg.args[0], arg.args[1]
    return arg, 0


def build_problem(
    traced: TracedModel,
    profiles: dict[str, OpProfile],
    cluster: Cluster,
    mesh: dict[str, int],
    *,
    precision: TrainingPrecision,
    memory_budget_bytes: float,
    share_layers: bool = True,
    param_grad_sync: bool = True,
    sequence_axis: str | None = None,
) -> Decisions:
    """The intra-op ShardingProblem on `mesh` (no "pp" axis).

    `param_grad_sync=False` leaves out the data-parallel all-reduce of parameter gradients
    (a replicated parameter feeding an op whose output is split over "dp"): the pipeline search
    (`autopar.planning.search`) charges it once per step, after gradient accumulation, by flavour.
    `sequence_axis`: a mesh axis on which the residual stream's ops may also take their
    inputs split along the sequence (`autopar.planning.sequence_parallel`).
    """
    shape = tuple(mesh.values())
    pmesh = dtensor.planning_mesh(shape, tuple(mesh), "cpu")
    links = cluster.axis_links(shape)
    gm = traced.graph_module
    grads = _with_gradients(gm)
    free = _batch_free(traced)
    strategies: dict[str, list[Strategy]] = {}
    nodes, compute = [], {}
    stream = set(sequence_parallel.stream_nodes(traced)) if sequence_axis else set()
    held, expert_axes = _experts_held(traced, mesh)
    grouped, rows = expert_rows.chain(gm, held) if expert_axes else (set(), set())
    seq_index = list(mesh).index(sequence_axis) if sequence_axis else None
    for n in decision_nodes(gm):
        if n.op == "placeholder":
            sts = [Strategy((), (pl,), "input") for pl in _placeholder_options(n, traced, mesh)]
        else:
            options = [output_options(a, strategies) for a in tensor_inputs(n)]
            if n.name in stream:
                options = [sequence_parallel.with_sequence_split(o, _val(a), seq_index)
                           for o, a in zip(options, tensor_inputs(n))]
            sts = node_strategies(n, pmesh, options)
            if n.name in grouped:
                sts = expert_rows.only_expert_axes(sts, expert_axes)
            elif n.name in rows:
                sts = expert_rows.with_partial_rows(sts, expert_axes)
        strategies[n.name] = sts
        skip = _dp_axes(mesh) if not param_grad_sync and n.op != "placeholder" else ()
        secs = [_node_time_s(n, s, profiles, cluster, shape, links, skip, grads, free)
                for s in sts]
        compute[n.name] = secs
        mem = [_node_memory_bytes(n, s, traced, profiles, shape, precision) for s in sts]
        nodes.append(solvers.Node(name=n.name, costs_s=tuple(secs), memory_bytes=tuple(mem)))
    edges = _edges(gm, strategies, shape, links, (held, expert_axes, grouped | rows))
    problem = solvers.ShardingProblem(
        nodes=tuple(nodes),
        edges=tuple(edges),
        memory_points=_memory_points(gm, traced, profiles),
        memory_budget_bytes=memory_budget_bytes,
        ties=_layer_ties(gm, traced, strategies) if share_layers else (),
    )
    return Decisions(mesh, strategies, problem, compute)


def _placeholder_options(n: fx.Node, traced: TracedModel, mesh: dict[str, int]) -> list[Placements]:
    shape = tuple(mesh.values())
    if not n.users:  # e.g. the second name of a tied weight: export reads it through the first
        return [(Replicate(),) * len(shape)]
    options = placement_options(_val(n).shape, shape)
    is_param = n.name in traced.parameters or n.name in traced.buffers
    experts = n.name in traced.experts
    for a, axis in enumerate(mesh):
        # an axis that splits the batch takes inputs split on dim 0 and parameters whole (the
        # data-parallel flavour shards them afterwards), except that one that splits experts
        # takes stacked experts split on their expert dim; on one that splits ops, the solver
        # decides freely for parameters, and inputs arrive whole (splitting the batch is dp's)
        if parallelism.splits(axis, BATCH):
            wanted = Shard(0) if not is_param or (experts and parallelism.splits_experts(axis)) \
                else Replicate()
        elif parallelism.splits(axis, SEQUENCE):
            # one that splits the sequence takes inputs split on dim 1 (B, T, ...), all else whole
            wanted = Shard(1) if not is_param and _val(n).ndim >= 2 else Replicate()
        elif not is_param:
            wanted = Replicate()
        else:
            continue
        options = [pl for pl in options if pl[a] == wanted]
    if not options:
        v = _val(n)
        if experts:
            raise MeshError(
                f"the {v.shape[0]} experts of '{traced.parameters[n.name]}' cannot be split "
                f"over mesh {mesh}: ep (and tp, if it also splits dim 0) must divide "
                f"{v.shape[0]}. Use an ep that divides the expert count.")
        cp = parallelism.sequence_ranks(mesh)
        if cp > 1 and not is_param and v.ndim >= 2 and v.shape[1] % cp:
            raise MeshError(
                f"input '{n.name}' of shape {tuple(v.shape)} cannot be split along its sequence "
                f"(dim 1, {v.shape[1]}) over cp={cp}: use a cp that divides the sequence length.")
        raise MeshError(
            f"input '{n.name}' of shape {tuple(v.shape)} cannot be split over the data-parallel "
            f"axes of mesh {mesh}: its batch dimension {v.shape[0] if v.ndim else 1} must divide "
            f"by {parallelism.batch_ranks(mesh)}. Use a batch that divides, or a smaller dp "
            "(x ep)."
        )
    return options


def _val(n: fx.Node):
    return output_vals(n)[0]


def output_options(arg: fx.Node, strategies) -> list[Placements]:
    src, k = source_of(arg)
    return list(dict.fromkeys(s.outputs[k] for s in strategies[src.name] if s.outputs[k]))


def _dp_axes(mesh: dict[str, int]) -> tuple[int, ...]:
    return tuple(a for a, axis in enumerate(mesh) if parallelism.splits(axis, BATCH))


def op_compute_s(n: fx.Node, prof: OpProfile, device, split: float,
                 attention=None) -> float:
    """Forward + backward compute of op `n` with its work split `split` ways, in the op's own
    output dtype: the compute part of an ILP node's cost (the search's bound uses it too).
    `attention`: the shape an attention op is priced at, if not its profile's."""
    val = _val(n)
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    flops = (prof.fwd_flops + prof.bwd_flops) / split
    moved = (prof.fwd_bytes + prof.bwd_bytes) / split
    return (cost.compute_time_s(flops, moved, device, dtype, op=str(n.target),
                                attention=attention or prof.attention)
            if flops or moved else 0.0)


def _batch_free(traced: TracedModel) -> set[str]:
    """Names of the values computed without the batch: from parameters, buffers and constants
    only, not from the model's inputs (GPT's position embedding, T5's position biases)."""
    gm = traced.graph_module
    batched = set(traced.inputs)
    for n in gm.graph.nodes:
        if n.op == "call_function" and any(a.name in batched for a in n.all_input_nodes):
            batched.add(n.name)
    return {n.name for n in gm.graph.nodes if n.name not in batched}


def _with_gradients(gm: fx.GraphModule) -> set[str]:
    """Names of the values training computes a gradient for: placeholders whose traced value
    requires grad (parameters; not buffers, token ids or images), and every floating-point
    value computed from one."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor) and v.requires_grad:
                out.add(n.name)
        elif n.op == "call_function" and any(a.name in out for a in n.all_input_nodes):
            if any(isinstance(v, torch.Tensor) and v.dtype.is_floating_point
                   for v in output_vals(n)):
                out.add(n.name)
    return out


def _node_time_s(n, s: Strategy, profiles, cluster: Cluster, shape, links, skip_axes=(),
                 grads=None, free=frozenset()) -> float:
    """Forward + backward compute of an op on its local shard, plus the gradient all-reduces
    its strategy implies (a replicated input feeding a sharded output gets a partial gradient;
    none for an input without a gradient, such as RoPE's tables, when `grads` names those
    with one). On `skip_axes` (dp, whose parameter gradients the data-parallel flavour reduces
    once per step) none for a value computed from parameters without the batch (`free`: a
    parameter itself, through a transpose or a cast, GPT's position embedding, T5's position
    biases): its partial gradient flows back into the parameter's, which the flavour reduces.
    Seen on the runtime: no per-microbatch all-reduce of GPT's position embedding over dp
    (tests/runtime/test_batch_free_gradients.py); but the replay runtime does all-reduce T5's
    decoder position bias (1, heads, target, target) in each microbatch, where the eager one
    and T5's encoder bias do not, so T5's decoder is priced a little low."""
    if n.op == "placeholder":
        return 0.0
    seconds = op_compute_s(n, profiles[n.name], cluster.device,
                           work_factor(s, shape) * context_parallel.work_share(n, s, shape),
                           attention=context_parallel.priced_attention(n, profiles[n.name], s))
    seconds += context_parallel.exchange_s(n, s, shape, links)
    out = s.outputs[0]
    # attention with its queries split along the sequence takes keys and values whole,
    # gathered from sequence-split values: their gradients go back reduce-scattered
    gathered = (1, 2) if context_parallel.splits_queries(n, s) else ()
    for slot, (arg, pl) in enumerate(zip(tensor_inputs(n), s.inputs)):
        v = arg.meta["val"]
        if out is None or not v.dtype.is_floating_point or (grads is not None
                                                            and arg.name not in grads):
            continue
        local_bytes = v.numel() * v.element_size() / shard_factor(pl, shape)
        for a, (p_in, p_out) in enumerate(zip(pl, out)):
            if arg.name in free and a in skip_axes:
                continue
            if isinstance(p_in, Replicate) and isinstance(p_out, Shard):
                kind = "reduce_scatter" if slot in gathered else "all_reduce"
                seconds += cost.collective_time_s(kind, local_bytes, shape[a], links[a])
    return seconds


def _node_memory_bytes(n, s: Strategy, traced, profiles, shape, precision) -> float:
    """Bytes one device holds for this node: parameter state, or saved activations / output."""
    val = _val(n)
    if n.op == "placeholder":
        if n.name in traced.parameters:
            state = parameter_state_bytes(val.numel(), precision)
            return sum(state.values()) / shard_factor(s.outputs[0], shape)
        if n.name in traced.buffers:
            return val.numel() * val.element_size() / shard_factor(s.outputs[0], shape)
        return val.numel() * val.element_size() / shard_factor(s.outputs[0], shape)
    prof = profiles[n.name]
    held = max(prof.saved_bytes, prof.output_bytes)
    return held / shard_factor(s.outputs[0], shape)


def _experts_held(traced: TracedModel, mesh: dict[str, int]) -> tuple[set[str], tuple[int, ...]]:
    """(the values that are a stacked expert weight, as it is or through ops that only reshape
    or cast it, the mesh axes that split experts): on those axes such a value stays where it is,
    with the rank that owns its experts; the tokens travel to it (all-to-all). Gathering the
    experts instead would be expert data parallelism, not expert parallelism."""
    axes = tuple(a for a, axis in enumerate(mesh)
                 if parallelism.splits_experts(axis) and mesh[axis] > 1)
    if not axes or not traced.experts:
        return set(), ()
    held = set(traced.experts)
    for n in traced.graph_module.graph.nodes:
        ins = tensor_inputs(n) if n.op == "call_function" else []
        if (len(ins) == 1 and ins[0].name in held and not is_getitem(n)
                and isinstance(n.meta.get("val"), torch.Tensor)
                and n.meta["val"].numel() == ins[0].meta["val"].numel()):
            held.add(n.name)
    return held, axes


def _edges(gm, strategies, shape, links, experts=(set(), (), set())) -> list[solvers.Edge]:
    held, expert_axes, partial_rows = experts
    edges = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or is_getitem(n):
            continue
        for slot, arg in enumerate(tensor_inputs(n)):
            src, k = source_of(arg)
            price = _edge_pricer(arg.meta["val"], shape, links)
            stays = expert_axes if src.name in held else ()
            rows = n.name in partial_rows  # expert_rows.forbids can refuse an entry
            # an entry depends only on the two placements, and many strategies share them:
            # priced once per distinct pair, then spread over the matrix
            outs, out_of = _distinct(si.outputs[k] for si in strategies[src.name])
            ins, in_of = _distinct(dj.inputs[slot] for dj in strategies[n.name])
            table = [[math.inf if any(o[a] != i[a] for a in stays)
                      or rows and expert_rows.forbids(n.name, o, i, partial_rows, expert_axes)
                      else price(o, i) for i in ins] for o in outs]
            matrix = tuple(tuple(table[r][c] for c in in_of) for r in out_of)
            if stays and not any(all(o[a] == i[a] for a in stays) for o in outs for i in ins):
                raise MeshError(
                    f"expert parallelism cannot split the experts that reach {n.name} "
                    f"({n.target}): the op has no sharding that takes them split over ep as they "
                    "are held (each rank its own experts), so they would have to be gathered. "
                    "Use ep=1 (data parallelism with ZeRO-3 shards the experts too), or compute "
                    "the experts with batched matmuls (torch.bmm / einsum) over their stacked "
                    "weights or with grouped matmuls (a transformers model: leave "
                    "config._experts_implementation at its default, or set \"grouped_mm\").")
            if any(any(c > 0 for c in row) for row in matrix) or len(matrix) > 1:
                edges.append(solvers.Edge(src=src.name, dst=n.name, costs_s=matrix))
    return _merge_parallel_edges(edges)


def _distinct(placements) -> tuple[list, list[int]]:
    """The distinct placements, in order of first appearance, and each item's index among them."""
    index: dict = {}
    of = [index.setdefault(p, len(index)) for p in placements]
    return list(index), of


def _edge_pricer(val, shape, links):
    """`price(src, dst)`: resharding a value like `val` from src to dst in forward, plus its
    mirror in backward: the gradient goes back from dst to src, with Partial turned into
    Replicate (DTensor's backward of a redistribute). What does not depend on the placements
    is read once per edge, not once per entry of its matrix."""
    fixed = (tuple(val.shape), val.element_size(), val.dtype.is_floating_point, tuple(shape),
             tuple(links))

    def price(src: Placements, dst: Placements) -> float:
        if src == dst:
            return 0.0
        return _both_ways_s(tuple(src), tuple(dst), *fixed)
    return price


# The same pairs recur on every copy of a block, every microbatch size's tied nodes and every
# mesh of one shape in a search: one price per question, not one per edge entry.
@functools.lru_cache(maxsize=1 << 18)
def _both_ways_s(src, dst, size, item, floating, shape, links) -> float:
    if any(isinstance(d, Partial) and d != s for s, d in zip(src, dst)):
        # Into a Partial only from Replicate and only as a sum (compile.to_partial does it
        # locally: one rank keeps the value, the others hold zeros); other pairs are not run.
        if not all(d == s or (d == Partial("sum") and isinstance(s, Replicate))
                   for s, d in zip(src, dst)):
            return math.inf
    fwd = cost.reshard_time_s(src, dst, size, item, shape, links)
    if not floating:
        return fwd
    unpartial = lambda pl: tuple(Replicate() if isinstance(p, Partial) else p for p in pl)  # noqa: E731
    return fwd + cost.reshard_time_s(unpartial(dst), unpartial(src), size, item, shape, links)


def _merge_parallel_edges(edges):
    """One edge per (src, dst) pair: an op reading a tensor twice pays both reshardings."""
    merged: dict[tuple[str, str], solvers.Edge] = {}
    for e in edges:
        key = (e.src, e.dst)
        if key in merged:
            old = merged[key].costs_s
            summed = tuple(tuple(a + b for a, b in zip(r1, r2)) for r1, r2 in zip(old, e.costs_s))
            merged[key] = solvers.Edge(src=e.src, dst=e.dst, costs_s=summed)
        else:
            merged[key] = e
    return list(merged.values())


def _memory_points(gm, traced: TracedModel, profiles) -> tuple[solvers.MemoryPoint, ...]:
    """Live sets over the forward pass: parameter state always; an activation from the op that
    makes it until its last forward use, or to the end of forward if backward saved it.
    Only maximal live sets are kept (a subset can never be the peak).

    Each activation is live over an interval of op positions, so one sweep finds them: the set
    at an op holds the op's own output, which no earlier set holds, so no set is inside an
    earlier one; and a set inside a later one is inside the next one too (every interval
    through both covers what lies between). A set is maximal exactly when some activation in
    it dies before the next op. (Was a comparison of every pair of sets: 16M set tests for
    one Switch Transformer graph.)"""
    order = decision_nodes(gm)
    index = {n.name: i for i, n in enumerate(order)}
    ops = [n for n in order if n.op == "call_function"]
    end = {n.name: index[n.name] for n in ops}  # the last position where it is live
    for n in ops:
        for arg in tensor_inputs(n):
            src, _ = source_of(arg)
            if src.name in end:
                end[src.name] = max(end[src.name], index[n.name])
    for n in ops:
        if profiles[n.name].saved_bytes > 0:  # held for backward: live to the end of forward
            end[n.name] = len(order)
    ending: dict[int, list[str]] = {}  # position -> the ops last live there
    for name, e in end.items():
        ending.setdefault(e, []).append(name)
    always = tuple(n.name for n in order if n.op == "placeholder")
    live: dict[str, None] = {}  # in op order: each op joins at its own position
    points = []
    for k, n in enumerate(ops):
        live[n.name] = None
        upto = index[ops[k + 1].name] if k + 1 < len(ops) else len(order) + 1
        dying = [m for e in range(index[n.name], upto) for m in ending.get(e, ())]
        if dying:
            points.append(solvers.MemoryPoint(name=n.name, live=always + tuple(live)))
            for m in dying:
                del live[m]
    return tuple(points)


def _layer_ties(gm, traced: TracedModel, strategies) -> tuple[tuple[str, ...], ...]:
    """Tie the i-th decision of every repeated layer of the same shape (blocks, and the layers
    between them), so depth adds no variables. Position i is tied only across layers where its
    strategy list is the same (the first block reads the embedding, not a block, so some of its
    early choices may differ)."""
    layer = assign_layers(traced)
    blocks: dict[str, list[fx.Node]] = {}
    for n in decision_nodes(gm):
        if layer[n.name] not in (PRE, POST):
            blocks.setdefault(layer[n.name], []).append(n)
    by_shape: dict[tuple, list[list[fx.Node]]] = {}
    for b, members in blocks.items():
        template = re.sub(r"\.\d+$", ".*", b)
        sig = (template, tuple(_node_signature(m) for m in members))
        by_shape.setdefault(sig, []).append(members)
    ties = []
    for groups in by_shape.values():
        for position in zip(*groups):
            same: dict[tuple, list[str]] = {}
            for m in position:
                same.setdefault(tuple(strategies[m.name]), []).append(m.name)
            ties.extend(tuple(names) for names in same.values() if len(names) > 1)
    return tuple(ties)


def _node_signature(n: fx.Node) -> tuple:
    v = _val(n)
    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
    return (n.op, str(n.target) if n.op != "placeholder" else "", shape)


def to_plan(traced: TracedModel, cluster: Cluster, decisions: Decisions, solution,
            chosen: dict[str, Strategy] | None = None) -> Plan:
    """The Plan of a solution; `chosen` (every decision node of `traced` -> its strategy)
    when the solution was found on a stand-in graph (`autopar.planning.stand_in`)."""
    if chosen is None:
        chosen = {name: decisions.strategies[name][i] for name, i in solution.choices.items()}
    strs = lambda pl: [placement_to_str(p) for p in pl]  # noqa: E731
    parameters = {fqn: strs(chosen[node].outputs[0]) for node, fqn in traced.parameters.items()}
    inputs = {name: strs(chosen[name].outputs[0]) for name in traced.inputs}
    ops, fallback_ops = {}, {}
    for name, s in chosen.items():
        if s.rule == "input":
            continue
        # no sharding rule (strategies.node_strategies); checks that make nothing (export's
        # _assert_tensor_metadata, no users) run wherever they are and are not worth a warning
        if s.rule == "replicate" and traced.node(name).users:
            op = str(traced.node(name).target)
            fallback_ops[op] = fallback_ops.get(op, 0) + 1
        ops[name] = OpSharding(
            inputs=[strs(pl) for pl in s.inputs],
            outputs=[strs(pl) if pl is not None else [] for pl in s.outputs],
            rule=s.rule,
        )
    compute_s = sum(decisions.compute_s[n][i] for n, i in solution.choices.items())
    return Plan(
        schema_version=SCHEMA_VERSION,
        model=traced.model_name,
        graph_fingerprint=traced.fingerprint,
        cluster=cluster.to_dict(),
        mesh=dict(decisions.mesh),
        parameters=parameters,
        inputs=inputs,
        ops=ops,
        predicted={
            "step_time_s": solution.objective_s,
            "ops_s": compute_s,
            "resharding_s": solution.objective_s - compute_s,
            "peak_memory_bytes": solution.peak_memory_bytes,
        },
        solver={
            "name": solution.solver,
            "status": solution.status,
            "gap": solution.gap,
            "objective_s": solution.objective_s,
        },
        made_with={"torch": torch.__version__},
        fallback_ops=fallback_ops,
    )
