"""Per-layer costs of one candidate sharding: ONE intra-op solve on a pipeline stage's mesh for
one microbatch, split by layer into `solvers.Layer`s, each with its checkpoint options.

    prepare        a traced microbatch -> its stand-in (`stand_in`) and op profiles
    solve_layers   the intra-op ILP on the stage mesh (the fastest sharding, or the fastest of
                   least memory)
    layer_costs    the solution split by layer: times, activation and state bytes, options

Layer times: per microbatch, the slower of the device's time (roofline per op, scaled by the
device's calibration if it has one) and the host's time to issue the layer's ops
(`cost.host_time_s`: the replay runtime's per-op time; the eager runtime's for split
backwards, which run op by op). The host works ahead of the device, so a layer costs whichever
of the two is longer. The data-parallel flavour's collectives of each microbatch are part of
its layers' times (`cost.data_parallel_traffic_s`); its once-a-step ones are `sync_s`.

Memory per device: per layer, state bytes (parameters + gradients + optimizer state, divided
over the ranks that shard them when the flavour `shards_state`) and activation bytes per
in-flight microbatch (checkpoint "none": what the layer saves for backward, and the weights its
forward gathered when the flavour shards state without `regathers`, as FSDP keeps them without
reshard-after-forward; "full": only the layer's input; "selective": the input and the outputs of
the matmuls and attention, `parallelism.KEEP_IN_GRAPH`; a checkpointed layer gathers its weights
again when it recomputes) + temporaries (a flavour that `regathers`: the gathered parameters of
the largest layer, twice for prefetch).

Stage boundaries (`boundary_bytes`): a cut after a layer sends every value made up to it and read
after it, as sharded (the layer DAG's cut, `layers.crossing`: with T5, the encoder's output and
the position biases as well as the block's output); of those, what comes from further back than
the layer itself is held per microbatch in flight by the stage after the cut (`carry_bytes`).
The layer's own output is counted where it is made, as it was for a chain of layers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import Replicate

import solvers
from autopar import parallelism
from autopar.cluster import Cluster
from autopar.errors import MeshError
from autopar.layers import POST, PRE, assign_layers, crossing, decision_users, layer_order
from autopar.parallelism import DATA, KEEP_IN_GRAPH, OPS, SEQUENCE
from autopar.planning import context_parallel, cost
from autopar.planning import sequence_parallel as sequence_parallel_
from autopar.planning.intra_op import build_problem
from autopar.planning.profile import parameter_state_bytes, profile_graph
from autopar.planning.stand_in import StandIn, stand_in
from autopar.planning.strategies import shard_factor, work_factor
from autopar.trace import TracedModel, is_getitem


@dataclass
class LayerCosts:
    """One (stage mesh, microbatch) intra-op solution, split by layer. Per device, per
    microbatch."""

    traced: TracedModel  # the full graph (layer names, the plan); solved on stand.traced
    stand: StandIn
    sub_mesh: dict[str, int]
    decisions: object
    solution: object
    layers: tuple[solvers.Layer, ...]  # options "none" (and "full", "selective" for blocks)
    sync_s: dict[str, float]  # layer -> the flavour's data-parallel collectives per step
    dp_microbatch_s: float  # ... and per microbatch, all layers (in the layer times)
    update_s: dict[str, float]  # layer -> optimizer step of its local state, per step
    issued: dict[str, int]  # layer -> graph ops the host issues per microbatch
    param_numel: dict[str, float]  # layer -> parameter elements per device (sharded over ops)
    state: dict[str, dict[str, float]]  # layer -> parameters/gradients/optimizer bytes
    temporaries_bytes: float
    flavour: str  # a name in parallelism.FLAVOURS
    comm_s: dict[str, float]  # intra-op resharding per microbatch, attributed to axes
    model_flops: float  # forward + backward FLOPs of one microbatch, whole model
    dp_shard: int = 1  # ranks one parameter is sharded over (dp, or hsdp's group in a node)
    tied: tuple[Tied, ...] = ()  # weights several layers read, each charged to every reader


@dataclass(frozen=True)
class Tied:
    """A weight several layers read (GPT's embedding and output head): `state` and `sync_s`
    (per device, per step) are in each reader's `state` and `sync_s`, as each stage that reads
    it holds and reduces its own copy; a rank holding several readers holds one copy, which
    `duplicates` says. Only layers that stand for themselves (not blocks the stand-in
    repeats) are tracked; a weight shared between blocks stays charged to each block."""

    readers: tuple[str, ...]  # layer names, in layer order
    state: dict[str, float]  # parameters / gradients / optimizer bytes of one copy
    sync_s: float

    def duplicates(self, layers) -> int:
        """Copies charged beyond one to a rank that holds `layers`."""
        return max(sum(r in layers for r in self.readers) - 1, 0)


def sub_cluster(cluster: Cluster, sub_size: int) -> Cluster:
    """The cluster a pipeline stage's mesh sees: its axes keep their link (intra-node iff they
    fit in a node), as in the full mesh, where pp is outermost.

    Stage s holds ranks s * sub_size ... (s + 1) * sub_size - 1. When sub_size is not a divisor
    or a multiple of a node (60 of 1,920 GPUs, 8 a node), some stages straddle nodes: only
    aligned blocks of gcd(sub_size, devices per node) ranks stay in one node in every stage, so
    the stage sees nodes of that size (its slowest stage's links)."""
    per_node = math.gcd(cluster.devices_per_node, sub_size)
    return Cluster(
        name=cluster.name, device=cluster.device, devices_per_node=per_node,
        nodes=sub_size // per_node, intra_node=cluster.intra_node,
        inter_node=cluster.inter_node, device_type=cluster.device_type,
    )


def prepare(traced: TracedModel) -> tuple[StandIn, dict]:
    """What the search solves for one traced microbatch: its stand-in (see `autopar.planning.stand_in`)
    and the stand-in's op profiles."""
    stand = stand_in(traced)
    return stand, profile_graph(stand.traced.graph_module)


def solve_layers(stand: StandIn, profiles, cluster, sub_mesh, *, precision, solver="highs",
                 time_limit_s=None, least_memory=False, built=None, sequence_parallel="off"):
    """The intra-op ILP on the stage mesh `sub_mesh`, memory left to the stage cut (budget inf); with
    `least_memory`, the fastest of the plans with the smallest intra-op peak (used when the
    fastest sharding fits nowhere). Solved on the stand-in, each node weighted by how many
    nodes of the full graph it stands for. `built`: what an earlier call returned for the same
    stand-in and mesh, whose problem is reused rather than built again. `sequence_parallel`
    (`autopar.planning.sequence_parallel`): "off"; "offer", the residual stream's ops may split
    the sequence over tp (the search); "require", they must (hand configurations)."""
    sub = sub_cluster(cluster, math.prod(sub_mesh.values()))
    seq_axis = sequence_parallel_.axis(sub_mesh, sequence_parallel)
    if built is not None:
        decisions = dataclasses.replace(built[1])  # its own problem below; the rest shared
    else:
        decisions = build_problem(
            stand.traced, profiles, sub, sub_mesh, precision=precision,
            memory_budget_bytes=math.inf, param_grad_sync=False,
            sequence_axis=seq_axis,
        )
        decisions.problem = _weighted(decisions.problem, stand)
    if sequence_parallel == "require":
        decisions = sequence_parallel_.require(decisions, stand.traced, seq_axis)
    problem = decisions.problem
    if least_memory:
        try:
            peak = solvers.smallest_peak(problem, solver=solver, time_limit_s=time_limit_s)
        except solvers.InfeasibleProblem:
            pass  # nothing avoids the forbidden choices: the solve below says so
        else:
            problem = dataclasses.replace(problem, memory_budget_bytes=peak * 1.000001)
            decisions.problem = problem
    solution = solvers.solve_intra_op(problem, solver=solver, time_limit_s=time_limit_s)
    return sub, decisions, solution


def _weighted(problem: solvers.ShardingProblem, stand: StandIn) -> solvers.ShardingProblem:
    """Node costs, and the costs of edges into a node, times the node's weight: the objective
    of the full graph under the ties between blocks."""
    if not stand.is_shallow:
        return problem
    w = stand.weight_of
    nodes = tuple(dataclasses.replace(n, costs_s=tuple(c * w(n.name) for c in n.costs_s))
                  for n in problem.nodes)
    edges = tuple(dataclasses.replace(e, costs_s=tuple(tuple(c * w(e.dst) for c in row)
                                                       for row in e.costs_s))
                  for e in problem.edges)
    return dataclasses.replace(problem, nodes=nodes, edges=edges)


def issued_ops(stand: StandIn, layer_of: dict[str, str]) -> dict[str, int]:
    """Graph ops the host issues per microbatch, per layer of the stand-in (as
    calibrate_device.py counts them): the same whatever the sharding. `layer_of`:
    `assign_layers(stand.full)`."""
    issued: dict[str, int] = {}
    for n in stand.traced.graph_module.graph.nodes:
        if n.op == "call_function" and n.name in layer_of:
            issued[layer_of[n.name]] = issued.get(layer_of[n.name], 0) + 1
    return issued


def layer_costs(stand: StandIn, profiles, cluster, sub_mesh, flavour, *, precision,
                solved, dp_shard: int | None = None) -> LayerCosts:
    """Split a solved intra-op plan into per-layer times and bytes (see module docstring), per
    layer of the full graph. `flavour`: a name in `parallelism.FLAVOURS`; `dp_shard`: a hybrid
    flavour's shard group size (default `hybrid_shard`)."""
    sub, decisions, solution = solved
    kind = parallelism.get_flavour(flavour)
    traced = stand.traced
    weight = stand.weight_of
    gm = traced.graph_module
    shape = tuple(sub_mesh.values())
    links = sub.axis_links(shape)
    groups = _DataGroups.of(sub, sub_mesh, kind, dp_shard)
    dp_axis, group, shard = groups.dp_axis, groups.group, groups.shard
    layer_of = assign_layers(stand.full)  # the stand-in's nodes keep their full-graph layers
    full_order = layer_order(layer_of)
    order = [name for name in full_order if stand.planned_layer(name) == name]
    chosen = {n: decisions.strategies[n][i] for n, i in solution.choices.items()}
    fwd = dict.fromkeys(order, 0.0)
    bwd = dict.fromkeys(order, 0.0)
    act = dict.fromkeys(order, 0.0)
    out_bytes = dict.fromkeys(order, 0.0)
    kept_bytes = dict.fromkeys(order, 0.0)  # outputs selective checkpointing keeps
    kept_fwd = dict.fromkeys(order, 0.0)  # ... and their forward time, not recomputed
    state = {name: {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0} for name in order}
    numel = dict.fromkeys(order, 0.0)
    issued = {name: 0 for name in order} | issued_ops(stand, layer_of)  # per microbatch
    sync = dict.fromkeys(order, 0.0)
    dp_fwd = dict.fromkeys(order, 0.0)  # ZeRO collectives in each microbatch's forward
    dp_bwd = dict.fromkeys(order, 0.0)  # ... and in its backward
    gathered = dict.fromkeys(order, 0.0)  # the gathered weights forward saves (no regather)
    model_flops = 0.0
    tied: list[Tied] = []
    unique = {name for name in order if name not in stand.stands_for.values()}
    nodes = {n.name: n for n in gm.graph.nodes}
    comm_s = {axis: 0.0 for axis in sub_mesh}
    # resharding between op strategies is charged to the first axis that splits ops, else to
    # one that splits experts (its all-to-alls), else to the first
    reshard_axis = next((a for a in sub_mesh if parallelism.splits(a, OPS)),
                        next((a for a in sub_mesh if parallelism.splits_experts(a)),
                             next(iter(sub_mesh))))
    compute_dtype = precision.dtype
    for name, s in chosen.items():
        n, layer = nodes[name], layer_of[name]
        i = solution.choices[name]
        if n.op == "placeholder":
            if name in traced.parameters:
                users = {layer_of[u.name] for u in decision_users(n)} or {layer}
                local = n.meta["val"].numel() / shard_factor(_non_dp(s.outputs[0], dp_axis), shape)
                parts = parameter_state_bytes(local, precision)
                divide = shard if kind.shards_state else 1
                step_s, fwd_s, bwd_s = groups.traffic_s(local, precision)
                step_s += _expert_axes_sync_s(s.outputs[0], sub_mesh, links,
                                              local * precision.grad_bytes / divide,
                                              sequence=not groups.folds_cp)
                for owner in users:  # a tied weight lives on every stage that reads it
                    for part, nbytes in parts.items():
                        state[owner][part] += nbytes / divide
                    if kind.keeps_gathered_weights and shard > 1:
                        gathered[owner] += local * precision.compute_bytes
                    numel[owner] += local
                    sync[owner] += step_s
                    dp_fwd[owner] += fwd_s
                    dp_bwd[owner] += bwd_s
                if len(users) > 1 and all(u in unique for u in users):
                    tied.append(Tied(readers=tuple(sorted(users, key=order.index)),
                                     state={k: v / divide for k, v in parts.items()},
                                     sync_s=step_s))
            elif name in traced.inputs:
                act[layer] += _nbytes(n) / shard_factor(s.outputs[0], shape)
            continue
        prof = profiles[name]
        model_flops += (prof.fwd_flops + prof.bwd_flops) * weight(name)
        split = work_factor(s, shape) * context_parallel.work_share(n, s, shape)
        f = cost.compute_time_s(prof.fwd_flops / split, prof.fwd_bytes / split, sub.device,
                                _dtype(n, compute_dtype), op=str(n.target),
                                # priced as the ILP priced it
                                attention=context_parallel.priced_attention(n, prof, s)
                                ) if prof.fwd_flops or prof.fwd_bytes else 0.0
        total = decisions.compute_s[name][i]
        fwd[layer] += f
        bwd[layer] += max(total - f, 0.0)
        out = s.outputs[0]
        act[layer] += prof.saved_bytes / (shard_factor(out, shape) if out else 1)
        if n.target in KEEP_IN_GRAPH:
            kept_bytes[layer] += prof.output_bytes / (shard_factor(out, shape) if out else 1)
            kept_fwd[layer] += f
        if any(layer_of.get(u.name, layer) != layer for u in decision_users(n)):
            out_bytes[layer] += prof.output_bytes / (shard_factor(out, shape) if out else 1)
    for e in decisions.problem.edges:  # weighted: one copy of each edge per full layer
        c = e.costs_s[solution.choices[e.src]][solution.choices[e.dst]] / weight(e.dst)
        layer = layer_of[e.dst]
        fwd[layer] += c / 2
        bwd[layer] += c / 2
        comm_s[reshard_axis] += c * weight(e.dst)
    options_of = {}
    for k, name in enumerate(order):
        f, b = fwd[name] + dp_fwd[name], bwd[name] + dp_bwd[name]
        hf, hb = cost.host_split_s(issued[name], sub.device, "replay")
        # a flavour that keeps each microbatch's gathered weights from forward to backward
        # holds them as it holds activations; a checkpointed layer gathers them again in its
        # recomputation (a flavour that regathers does so in backward anyway: dp_bwd has it)
        options = [solvers.LayerOption(name="none", fwd_s=max(f, hf), bwd_s=max(b, hb),
                                       activation_bytes=act[name] + gathered[name])]
        if name not in (PRE, POST) and k > 0:
            kept = out_bytes[order[k - 1]]  # the layer's input: the previous layer's output
            redo = fwd[name] if kind.regathers else f  # recomputed forward (and its gathers)
            options.append(solvers.LayerOption(name="full", fwd_s=max(f, hf),
                                               bwd_s=max(b + redo, hb + hf),
                                               activation_bytes=min(kept, act[name])))
            options.append(solvers.LayerOption(
                name="selective", fwd_s=max(f, hf),
                bwd_s=max(b + redo - kept_fwd[name], hb + hf),
                activation_bytes=min(kept + kept_bytes[name], act[name])))
        options_of[name] = tuple(options)
    sent, carried = boundary_bytes(stand, chosen, shape, layer_of)
    layers = tuple(
        solvers.Layer(name=full, options=options_of[stand.planned_layer(full)],
                      state_bytes=sum(state[stand.planned_layer(full)].values()),
                      boundary_bytes=sent[i], carry_bytes=carried[i])
        for i, full in enumerate(full_order))
    temporaries = 0.0
    if kind.regathers and group > 1:
        temporaries = 2 * max(numel.values()) * precision.compute_bytes
    if dp_axis is not None:
        comm_s[DATA] = 0.0  # dp traffic is the per-step sync, reported separately
    full = lambda per_layer: {f: per_layer[stand.planned_layer(f)]  # noqa: E731
                              for f in full_order}
    update = {name: cost.optimizer_step_s(state[name], sub.device, precision) for name in order}
    return LayerCosts(
        traced=stand.full, stand=stand, sub_mesh=dict(sub_mesh), decisions=decisions,
        solution=solution, layers=layers, sync_s=full(sync),
        dp_microbatch_s=sum(sum(full(d).values()) for d in (dp_fwd, dp_bwd)),
        update_s=full(update), issued=full(issued),
        param_numel=full(numel), state=full(state), temporaries_bytes=temporaries,
        flavour=flavour, comm_s=comm_s, model_flops=model_flops, dp_shard=shard,
        tied=tuple(tied),
    )


@dataclass(frozen=True)
class _DataGroups:
    """The ranks a data-parallel flavour reduces and shards each parameter over, on one stage
    mesh, and the links its collectives take."""

    kind: parallelism.DataParallelFlavour
    dp_axis: int | None
    group: int  # the ranks that reduce a parameter's gradient (dp, with cp if `folds_cp`)
    shard: int  # the ranks that share one copy of the parameters and their state
    links: tuple | None  # (link across replicas, link within a shard group)
    folds_cp: bool

    @classmethod
    def of(cls, sub: Cluster, sub_mesh: dict[str, int], kind, dp_shard: int | None = None):
        """MeshError where a hybrid flavour does not apply to the mesh."""
        links = sub.axis_links(tuple(sub_mesh.values()))
        dp = sub_mesh.get(DATA, 1)
        dp_axis = list(sub_mesh).index(DATA) if DATA in sub_mesh else None
        # a flavour that shards state (not a hybrid one) shards it over dp and cp together,
        # and its collectives run on that group: on the link of the outer of the two
        folds_cp = kind.shards_state and not kind.hybrid
        group = parallelism.state_ranks(sub_mesh) if folds_cp else dp
        group_axis = next((i for i, a in enumerate(sub_mesh)
                           if a == DATA or (folds_cp and parallelism.splits(a, SEQUENCE))), None)
        shard = group
        if kind.hybrid:
            if DATA not in sub_mesh:
                raise MeshError("hybrid sharding shards over dp, and this mesh has none")
            inner = parallelism.inner_size(sub_mesh, DATA)
            shard = dp_shard or hybrid_shard(sub, dp, inner)
            if shard is None or not 1 < shard < dp or dp % shard:
                raise MeshError(f"hybrid sharding needs dp ({dp}) to span nodes in groups that "
                                f"fit in one node; dp x the axes inside it = {dp} x {inner} "
                                "does not")
        dp_links = None
        if kind.hybrid:
            dp_links = sub.axis_links((dp // shard, shard, sub.world_size // dp))[:2]
        elif group_axis is not None:
            dp_links = (links[group_axis],) * 2
        return cls(kind, dp_axis, group, shard, dp_links, folds_cp)

    def traffic_s(self, local: float, precision) -> tuple[float, float, float]:
        """(per step, per microbatch forward, per microbatch backward) collectives of one
        parameter of `local` elements (as the ops' sharding leaves it, before dp)."""
        if self.group <= 1:
            return 0.0, 0.0, 0.0
        return cost.data_parallel_traffic_s(self.kind, local, precision, self.group, self.shard,
                                            self.links)


@dataclass(frozen=True)
class StateBound:
    """What any sharding of a stage mesh pays for its parameters under one flavour, at least:
    every parameter as small as the mesh's axes besides dp can make it (its elements over
    their product), whatever the ops' strategies; each charge grows with the bytes."""

    microbatch_s: float  # the flavour's collectives in one microbatch, every layer
    step_s: float  # once a step, every rank together: its sync and the optimizer step
    gradient_bytes: float  # the local gradients every rank together accumulates
    # parameters, gradients and optimizer state every pp rank together holds: the busiest
    # holds at least 1/pp of it, so a mesh whose share is over the memory limit fits nowhere
    state_bytes: float

    def step_bound_s(self, work_s: float, pp: int, m: int, b: float, device,
                     busiest_s: float = 0.0, host_s: float = 0.0) -> float:
        """A lower bound on a candidate's step, given W >= one microbatch's intra-op work over
        all layers and `busiest_s` <= the busiest rank's share of it: the stage model
        b * sum_s T_s + (m - b) * max_r T_rank with sum_s T_s >= W + these collectives and
        max_r T_rank at least the larger of `busiest_s` and 1/pp of that (see
        `search._step_bound`), plus the busiest rank's once-a-step share, at least 1/pp of the
        total (`candidate.evaluate`). The optimizer step and the gradient accumulation charged
        once over all the bytes: each is a memory pass with a floor per layer, so once is no
        more than per layer. `host_s`: at most the host's time to issue one microbatch's ops;
        each layer costs the slower of its device time (collectives included) and its host
        time, so one microbatch costs at least the larger of the two sums."""
        work = max(work_s + self.microbatch_s, host_s)
        once = self.step_s + cost.gradient_accumulation_s(self.gradient_bytes, m, device)
        return b * work + (m - b) * max(work / pp, busiest_s) + once / pp


def state_bound(full: TracedModel, cluster: Cluster, sub_mesh: dict[str, int], flavour: str, *,
                precision) -> StateBound | None:
    """`StateBound` of `flavour` on `sub_mesh` over every parameter of the full graph (each
    once: a tied weight's copies on other ranks only add); None where the flavour does not
    apply to the mesh (hybrid sharding without nodes to span)."""
    sub = sub_cluster(cluster, math.prod(sub_mesh.values()))
    kind = parallelism.get_flavour(flavour)
    try:
        groups = _DataGroups.of(sub, sub_mesh, kind)
    except MeshError:
        return None
    ops_split = math.prod(n for a, n in sub_mesh.items() if a != DATA)
    divide = groups.shard if kind.shards_state else 1
    per_microbatch = per_step = 0.0
    state = {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0}
    for name in full.parameters:
        node = full.node(name)
        if not node.users:
            continue  # read by no op: no layer holds or reduces it
        local = node.meta["val"].numel() / ops_split
        step_s, fwd_s, bwd_s = groups.traffic_s(local, precision)
        per_microbatch += fwd_s + bwd_s
        per_step += step_s
        for part, nbytes in parameter_state_bytes(local, precision).items():
            state[part] += nbytes / divide
    per_step += cost.optimizer_step_s(state, sub.device, precision)
    return StateBound(per_microbatch, per_step, state["gradients"], sum(state.values()))


def _expert_axes_sync_s(placements, sub_mesh: dict[str, int], links, grad_bytes: float,
                        sequence: bool = True) -> float:
    """Once a step: the all-reduce of a parameter's gradient (`grad_bytes` as the data-parallel
    flavour leaves it on each rank) over each axis besides dp that splits the data: one that
    splits experts (ep) on which the parameter is whole, and one that splits the sequence (cp,
    unless `sequence` is False: a flavour that shards state reduces over it with dp).
    Each splits the batch or the sequence as dp splits the batch, so every parameter whole over
    it has a partial gradient there (in buckets, as the runtime reduces them)."""
    return sum(cost.collective_time_s("all_reduce", grad_bytes, n, links[a],
                                      bucket_bytes=parallelism.BUCKET_BYTES)
               for a, (axis, n) in enumerate(sub_mesh.items())
               if n > 1 and (parallelism.splits_experts(axis)
                             or (sequence and parallelism.splits(axis, SEQUENCE)))
               and isinstance(placements[a], Replicate))


def boundary_bytes(stand: StandIn, chosen: dict, mesh_shape, layer_of: dict[str, str]):
    """Per layer of the full graph, bytes per device a stage cut after it carries: every value
    made before the cut and read after it (`layers.crossing`: the layer DAG's cut, not only the
    last layer's output), each as its strategy shards it; and, of those, the bytes the next
    stage holds besides the last layer's own outputs (`solvers.Layer.carry_bytes`: values from
    further back, such as T5's encoder output on every decoder stage, and the batch's inputs
    that later stages read)."""
    full = stand.full
    order = layer_order(layer_of)
    sent, carried = [], []
    for name, values in zip(order, crossing(full)):
        total = carry = 0.0
        for v in values:
            n = full.node(v)
            nbytes = _value_bytes(n, chosen, stand.counterpart, mesh_shape)
            total += nbytes
            if n.op == "placeholder" or layer_of[v] != name:
                carry += nbytes
        sent.append(total)
        carried.append(carry)
    return sent, carried


def _value_bytes(n, chosen, counterpart, mesh_shape) -> float:
    """Bytes per device of value `n` under the chosen strategy of (the counterpart of) its op."""
    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return 0.0
    index = 0
    op = n
    if is_getitem(n):
        op, index = n.args[0], n.args[1]
    s = chosen.get(counterpart.get(op.name, op.name))
    outputs = s.outputs if s is not None else ()
    placements = outputs[index] if index < len(outputs) else (outputs[0] if outputs else None)
    return float(v.numel() * v.element_size()) / shard_factor(placements, mesh_shape)


def hybrid_shard(cluster: Cluster, dp: int, inner: int) -> int | None:
    """A hybrid flavour's shard group: the dp ranks of one node (devices_per_node / inner, the
    devices of the axes inside dp), when dp spans several nodes in whole groups; None when
    hybrid sharding does not apply."""
    if cluster.devices_per_node % inner:
        return None
    shard = min(cluster.devices_per_node // inner, dp)
    return shard if 1 < shard < dp and dp % shard == 0 else None


def _non_dp(placements, dp_axis):
    if dp_axis is None:
        return placements
    return tuple(Replicate() if a == dp_axis else p for a, p in enumerate(placements))


def _nbytes(n) -> float:
    v = n.meta["val"]
    return float(v.numel() * v.element_size())


def _dtype(n, default):
    v = n.meta.get("val")
    v = v[0] if isinstance(v, (tuple, list)) and v else v
    return v.dtype if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else default


