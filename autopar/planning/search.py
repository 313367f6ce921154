"""The outer search: mesh pp x dp x tp, microbatch size, schedule, data-parallel flavour and
per-layer checkpointing, with stage cuts solved exactly for each candidate.

    microbatch_inputs   example inputs sliced to one microbatch (what every pipelined plan traces)
    layer_costs         ONE intra-op solve on the dp x tp submesh for one microbatch, split by
                        layer into `solvers.Layer`s (checkpoint options "none" / "full" /
                        "selective")
    evaluate            step time and per-device memory of one cut + options (the only scorer:
                        the search and `manual_plan` both use it)
    search              every candidate; stage cut by `solvers.solve_pipeline`; the fastest plan
                        that fits the memory limit

Cost model of one candidate (all seconds per training step, per device):

    pipeline_s   stage model of solvers.pipeline (Narayanan et al. SC'21): b * sum_s T_s
                 + (m - b) * max_r T_rank_r, T_s = per-microbatch fwd + bwd of the stage's layers
                 (intra-op compute + resharding on the dp x tp submesh) + p2p send of the
                 boundary over the pp link; b = 1 (GPipe, 1F1B), 1/v (interleaved), about
                 1/(3v) for zero bubble (`bubble_weight`). Stage s runs on the rank the schedule
                 puts it (`Schedule.stage_ranks`: s % pp, or ZBV's V). With a split backward a
                 "full" layer recomputes its forward twice (see pipeline_runtime), and
                 "selective" is not offered (`Schedule.checkpoint_problem`).
    dp_sync_s    once per step, after gradient accumulation, max over pp ranks of its layers':
                 replicate: all-reduce of the gradients over dp; plus the optimizer step, a
                 memory-bound pass over the rank's local state (`_update_s`), and with
                 several microbatches the gradient accumulation (`_accumulate_s`). The ZeRO
                 flavours reduce inside each microbatch's traced graphs, so their
                 collectives are in the layer times:
                 forward all-gathers the weights (zero3 and hsdp gather them again in
                 backward), backward reduce-scatters the gradients (ZeRO, Rajbhandari et al.
                 2020, sec. 5; hsdp then all-reduces each shard across the replicas).
                 Serial, although on CUDA the replay runtime overlaps these collectives with
                 compute (autopar/runtime/collective_overlap.py, buckets.py): on 2 H200s this predicted 0.91-1.03
                 of the measured steps (docs/benchmarks/2026-11-29-multigpu-x2-overlap/), so
                 no overlap is assumed.
    step_s       pipeline_s + dp_sync_s (no overlap: a conservative serial model).

Layer times: per microbatch, the slower of the device's time (roofline per op, scaled by the
device's calibration if it has one) and the host's time to issue the layer's ops
(`cost.host_time_s`: the replay runtime's per-op time; the eager runtime's for split
backwards, which run op by op). The host works ahead of the device, so a layer costs whichever
of the two is longer.

Memory per device (rank r): sum over its layers of state bytes (parameters + gradients +
optimizer state, divided over the dp ranks that shard them by zero2, zero3 and hsdp) + in-flight
microbatches x activation bytes (checkpoint "none": what the layer saves for backward, and
under zero2 the weights its forward gathered, as FSDP keeps them without reshard-after-forward;
"full": only the layer's input; "selective": the input and the outputs of the matmuls and
attention, `runner.KEEP_IN_GRAPH`; a checkpointed layer gathers its weights again when it
recomputes) + temporaries (zero3: the gathered parameters of the largest layer, twice for
prefetch).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_map

import solvers
from autopar.cluster import Cluster
from autopar.errors import AutoparError, InfeasibleError, MeshError
from autopar.layers import POST, PRE, assign_layers, decision_users, layer_order
from autopar.plan import PP, SCHEMA_VERSION, Plan
from autopar.planning import cost
from autopar.planning.intra_op import build_problem, format_bytes, to_plan
from autopar.planning.profile import TrainingPrecision, parameter_state_bytes, profile_graph
from autopar.planning.stand_in import StandIn, stand_in
from autopar.planning.strategies import shard_factor, work_factor
from autopar.runtime.collective_overlap import BUCKET_BYTES
from autopar.runtime.layer_runner import KEEP_IN_GRAPH, POLICIES
from autopar.schedules import SCHEDULES, get_schedule
from autopar.trace import TracedModel

# Searched unless the user names one. GPipe is left out: 1F1B's bubble with more memory. The
# zero-bubble schedules are in whenever the installed torch has them (the runtime runs them all).
DEFAULT_SCHEDULES = tuple(name for name in ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble",
                                            "ZBVZeroBubble") if name in SCHEDULES)
FLAVOURS = ("replicate", "zero2", "zero3", "hsdp")
ZERO_FLAVOUR = {0: "replicate", 1: "zero2", 2: "zero2", 3: "zero3"}


def microbatch_inputs(example_inputs, microbatch_size: int):
    """`example_inputs` (and target) with dim 0 of every tensor sliced to `microbatch_size`.

    Pipelined plans are made for the graph of ONE microbatch: the planner, `autoparallelize` and
    the pipeline runtime all trace `microbatch_inputs(example_inputs, plan.pipeline[
    "microbatch_size"])`, so the graph fingerprint matches.
    """
    def cut(x):
        if isinstance(x, torch.Tensor) and x.ndim >= 1:
            if x.shape[0] % microbatch_size:
                raise MeshError(
                    f"a tensor of batch size {x.shape[0]} cannot be cut into microbatches of "
                    f"{microbatch_size}: use a microbatch size that divides {x.shape[0]}"
                )
            return x[:microbatch_size]
        return x

    if isinstance(example_inputs, tuple):
        return tuple(tree_map(cut, a) for a in example_inputs)
    return tree_map(cut, example_inputs)


# ---------------------------------------------------------------------------------------------
# Per-layer costs from one intra-op solve


@dataclass
class LayerCosts:
    """One (dp, tp, microbatch) intra-op solution, split by layer. Per device, per microbatch."""

    traced: TracedModel  # the full graph (layer names, the plan); solved on stand.traced
    stand: StandIn
    sub_mesh: dict[str, int]
    decisions: object
    solution: object
    layers: tuple[solvers.Layer, ...]  # options "none" (and "full", "selective" for blocks)
    sync_s: dict[str, float]  # layer -> dp gradient all-reduce per step (replicate)
    dp_microbatch_s: float  # ZeRO collectives of all layers per microbatch (in the layer times)
    update_s: dict[str, float]  # layer -> optimizer step of its local state, per step
    issued: dict[str, int]  # layer -> graph ops the host issues per microbatch
    param_numel: dict[str, float]  # layer -> parameter elements per device (sharded over tp)
    state: dict[str, dict[str, float]]  # layer -> parameters/gradients/optimizer bytes
    temporaries_bytes: float
    flavour: str
    comm_s: dict[str, float]  # intra-op resharding per microbatch, attributed to axes
    model_flops: float  # forward + backward FLOPs of one microbatch, whole model
    dp_shard: int = 1  # ranks one parameter is sharded over (dp, or hsdp's group in a node)


def _sub_cluster(cluster: Cluster, sub_size: int) -> Cluster:
    """The cluster the dp x tp submesh sees: its inner axes keep their link (intra-node iff they
    fit in a node), as in the full pp x dp x tp mesh where pp is outermost."""
    per_node = min(cluster.devices_per_node, sub_size)
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
                 time_limit_s=None, least_memory=False):
    """The intra-op ILP on the dp x tp submesh, memory left to the stage cut (budget inf); with
    `least_memory`, the fastest of the plans with the smallest intra-op peak (used when the
    fastest sharding fits nowhere). Solved on the stand-in, each node weighted by how many
    nodes of the full graph it stands for."""
    sub = _sub_cluster(cluster, math.prod(sub_mesh.values()))
    decisions = build_problem(
        stand.traced, profiles, sub, sub_mesh, precision=precision,
        memory_budget_bytes=math.inf, param_grad_sync=False,
    )
    decisions.problem = problem = _weighted(decisions.problem, stand)
    if least_memory:
        try:
            solvers.solve_intra_op(dataclasses.replace(problem, memory_budget_bytes=1.0),
                                   solver=solver, time_limit_s=time_limit_s)
        except solvers.InfeasibleProblem as e:
            problem = dataclasses.replace(problem, memory_budget_bytes=e.min_peak_bytes * 1.000001)
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


def layer_costs(stand: StandIn, profiles, cluster, sub_mesh, flavour, *, precision,
                solved, dp_shard: int | None = None) -> LayerCosts:
    """Split a solved intra-op plan into per-layer times and bytes (see module docstring), per
    layer of the full graph. `dp_shard`: hybrid sharding's group size (default `hsdp_shard`)."""
    sub, decisions, solution = solved
    traced = stand.traced
    weight = stand.weight_of
    gm = traced.graph_module
    shape = tuple(sub_mesh.values())
    links = sub.axis_links(shape)
    dp = sub_mesh.get("dp", 1)
    dp_axis = list(sub_mesh).index("dp") if "dp" in sub_mesh else None
    shard = dp  # the ranks that share one copy of the parameters and their state
    if flavour == "hsdp":
        shard = dp_shard or hsdp_shard(sub, dp, sub_mesh.get("tp", 1))
        if shard is None or not 1 < shard < dp or dp % shard:
            raise MeshError(f"hybrid sharding needs dp ({dp}) to span nodes in groups that fit in "
                            f"one node; dp x tp = {dp} x {sub_mesh.get('tp', 1)} does not")
    dp_links = None  # (link across replicas, link within a shard group)
    if flavour == "hsdp":
        dp_links = sub.axis_links((dp // shard, shard, sub.world_size // dp))[:2]
    elif dp_axis is not None:
        dp_links = (links[dp_axis],) * 2
    layer_of = assign_layers(traced)
    order = layer_order(layer_of)
    chosen = {n: decisions.strategies[n][i] for n, i in solution.choices.items()}
    fwd = dict.fromkeys(order, 0.0)
    bwd = dict.fromkeys(order, 0.0)
    act = dict.fromkeys(order, 0.0)
    out_bytes = dict.fromkeys(order, 0.0)
    kept_bytes = dict.fromkeys(order, 0.0)  # outputs selective checkpointing keeps
    kept_fwd = dict.fromkeys(order, 0.0)  # ... and their forward time, not recomputed
    state = {name: {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0} for name in order}
    numel = dict.fromkeys(order, 0.0)
    issued = dict.fromkeys(order, 0)  # graph ops the host issues per microbatch
    sync = dict.fromkeys(order, 0.0)
    dp_fwd = dict.fromkeys(order, 0.0)  # ZeRO collectives in each microbatch's forward
    dp_bwd = dict.fromkeys(order, 0.0)  # ... and in its backward
    gathered = dict.fromkeys(order, 0.0)  # zero2: the gathered weights forward saves
    model_flops = 0.0
    nodes = {n.name: n for n in gm.graph.nodes}
    comm_s = {axis: 0.0 for axis in sub_mesh}
    reshard_axis = "tp" if "tp" in sub_mesh else next(iter(sub_mesh))
    compute_dtype = torch.bfloat16 if precision.compute_bytes == 2 else torch.float32
    for name, s in chosen.items():
        n, layer = nodes[name], layer_of[name]
        i = solution.choices[name]
        if n.op == "placeholder":
            if name in traced.parameters:
                users = {layer_of[u.name] for u in decision_users(n)} or {layer}
                local = n.meta["val"].numel() / shard_factor(_non_dp(s.outputs[0], dp_axis), shape)
                parts = parameter_state_bytes(local, precision)
                for owner in users:  # a tied weight lives on every stage that reads it
                    _add_state(state[owner], parts, flavour, shard)
                    if flavour == "zero2" and shard > 1:
                        gathered[owner] += local * precision.compute_bytes
                    numel[owner] += local
                    if dp > 1:
                        step_s, fwd_s, bwd_s = _dp_traffic(
                            flavour, local, precision, dp, shard, dp_links)
                        sync[owner] += step_s
                        dp_fwd[owner] += fwd_s
                        dp_bwd[owner] += bwd_s
            elif name in traced.inputs:
                act[layer] += _nbytes(n) / shard_factor(s.outputs[0], shape)
            continue
        prof = profiles[name]
        model_flops += (prof.fwd_flops + prof.bwd_flops) * weight(name)
        split = work_factor(s, shape)
        f = cost.compute_time_s(prof.fwd_flops / split, prof.fwd_bytes / split, sub.device,
                                _dtype(n, compute_dtype), op=str(n.target)
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
    for n in gm.graph.nodes:  # every op the host issues (as calibrate_device.py counts them)
        if n.op == "call_function" and n.name in layer_of:
            issued[layer_of[n.name]] += 1
    for e in decisions.problem.edges:  # weighted: one copy of each edge per full layer
        c = e.costs_s[solution.choices[e.src]][solution.choices[e.dst]] / weight(e.dst)
        layer = layer_of[e.dst]
        fwd[layer] += c / 2
        bwd[layer] += c / 2
        comm_s[reshard_axis] += c * weight(e.dst)
    layers = []
    for k, name in enumerate(order):
        f, b = fwd[name] + dp_fwd[name], bwd[name] + dp_bwd[name]
        hf, hb = _host_s(issued[name], sub.device, "replay")
        # ZeRO-2 keeps each microbatch's gathered weights from forward to backward, as it
        # keeps activations; a checkpointed layer gathers them again in its recomputation
        # (zero3 and hsdp gather again in backward anyway: dp_bwd has it)
        options = [solvers.LayerOption(name="none", fwd_s=max(f, hf), bwd_s=max(b, hb),
                                       activation_bytes=act[name] + gathered[name])]
        if name not in (PRE, POST) and k > 0:
            kept = out_bytes[order[k - 1]]  # the layer's input: the previous layer's output
            redo = f if flavour == "zero2" else fwd[name]  # recomputed forward
            options.append(solvers.LayerOption(name="full", fwd_s=max(f, hf),
                                               bwd_s=max(b + redo, hb + hf),
                                               activation_bytes=min(kept, act[name])))
            options.append(solvers.LayerOption(
                name="selective", fwd_s=max(f, hf),
                bwd_s=max(b + redo - kept_fwd[name], hb + hf),
                activation_bytes=min(kept + kept_bytes[name], act[name])))
        for full in stand.represents.get(name, (name,)):
            layers.append(solvers.Layer(
                name=full, options=tuple(options), state_bytes=sum(state[name].values()),
                boundary_bytes=out_bytes[name] if name != order[-1] else 0.0,
            ))
    temporaries = 0.0
    if flavour in ("zero3", "hsdp") and dp > 1:
        temporaries = 2 * max(numel.values()) * precision.compute_bytes
    if dp_axis is not None:
        comm_s["dp"] = 0.0  # dp traffic is the per-step sync, reported separately
    full = lambda per_layer: {f: per_layer[name] for name in order  # noqa: E731
                              for f in stand.represents.get(name, (name,))}
    update = {name: _update_s(state[name], sub.device, precision) for name in order}
    return LayerCosts(
        traced=stand.full, stand=stand, sub_mesh=dict(sub_mesh), decisions=decisions,
        solution=solution, layers=tuple(layers), sync_s=full(sync),
        dp_microbatch_s=sum(sum(full(d).values()) for d in (dp_fwd, dp_bwd)),
        update_s=full(update), issued=full(issued),
        param_numel=full(numel), state=full(state), temporaries_bytes=temporaries,
        flavour=flavour, comm_s=comm_s, model_flops=model_flops, dp_shard=shard,
    )


def _pipeline_stage_s(cluster: Cluster) -> float:
    """The pipeline runtime's own time per stage and microbatch (Calibration.pipeline_stage_s),
    charged with each stage's send: 0 on an uncalibrated device."""
    cal = cluster.device.calibration
    return cal.pipeline_stage_s if cal else 0.0


def _host_s(ops: int, device, runtime: str) -> tuple[float, float]:
    """(forward, backward) host time to issue a layer's `ops` in `runtime`: a third forward,
    two thirds backward (backward issues about twice the kernels)."""
    total = cost.host_time_s(ops, device, runtime)
    return total / 3, 2 * total / 3


def _update_s(state: dict[str, float], device, precision: TrainingPrecision) -> float:
    """The optimizer step of a layer's local state: read parameters, gradients and optimizer
    state, write parameters and optimizer state back (a memory-bound pass). Parameters held
    below fp32 are stepped on fp32 masters (`TrainingPrecision.mixed_bf16`), and torch's
    AdamW steps an fp32 master on an fp32 gradient: the gradient is cast (written) and read
    again in fp32 first. One H200, GPT 1.3B: 18.3 ms of optimizer kernels measured, 13.2 ms
    charged without the cast, 16.7 with it (docs/benchmarks/2026-12-04-single-h200-breakdown/)."""
    moved = 2 * (state["parameters"] + state["optimizer"]) + state["gradients"]
    if precision.param_bytes < 4 and precision.grad_bytes:
        moved += 2 * state["gradients"] * 4 / precision.grad_bytes
    return cost.compute_time_s(0.0, moved, device, "float32")


def _accumulate_s(gradients_bytes: float, microbatches: int, device) -> float:
    """Gradient accumulation over `microbatches` (> 1) of a layer's local gradients: autograd
    adds each later microbatch's gradient into .grad (read both, write one), and the runtime
    divides the sum once by the count (read, write). One H200, GPT 6.7B in 4 microbatches:
    28.7 ms of adds and 6.8 ms of divisions a step, which the step's prediction lacked."""
    if microbatches <= 1 or not gradients_bytes:
        return 0.0
    moved = (3 * (microbatches - 1) + 2) * gradients_bytes
    return cost.compute_time_s(0.0, moved, device, "float32")


def hsdp_shard(cluster: Cluster, dp: int, tp: int) -> int | None:
    """Hybrid sharding's shard group: the dp ranks of one node (devices_per_node / tp), when dp
    spans several nodes in whole groups; None when hybrid sharding does not apply."""
    if cluster.devices_per_node % tp:
        return None
    shard = min(cluster.devices_per_node // tp, dp)
    return shard if 1 < shard < dp and dp % shard == 0 else None


def _dp_traffic(flavour, local_numel, precision, dp, shard, links):
    """(per step, per microbatch in forward, per microbatch in backward) data-parallel
    collectives of one parameter of `local_numel` elements, as the runtime issues them.
    replicate: all-reduce of the accumulated gradient, once per step (GradientBuckets). The
    ZeRO flavours, inside each microbatch's traced graphs: all-gather of the weight in forward
    (zero3 and hsdp again in backward) and reduce-scatter of its gradient in backward (hsdp then
    all-reduces that shard across the replicas). links: (replica axis link, shard axis link)."""
    grad = local_numel * precision.grad_bytes
    weights = local_numel * precision.compute_bytes
    across, within = links

    def time_s(kind, nbytes, n, link):  # in the runtime's buckets: a share of their latency
        return cost.collective_time_s(kind, nbytes, n, link, bucket_bytes=BUCKET_BYTES)

    if flavour == "replicate":
        return time_s("all_reduce", grad, dp, within), 0.0, 0.0
    gather = time_s("all_gather", weights, shard, within)
    scatter = time_s("reduce_scatter", grad, shard, within)
    if flavour == "hsdp":  # each shard is all-reduced across the replicas (other nodes)
        scatter += time_s("all_reduce", grad / shard, dp // shard, across)
    regather = gather if flavour in ("zero3", "hsdp") else 0.0
    return 0.0, gather, regather + scatter


def _add_state(into, parts, flavour, shard):
    """Parameters, gradients and optimizer state of one parameter: divided over its `shard`
    ranks by ZeRO-2, ZeRO-3 and hybrid sharding."""
    div = 1 if flavour == "replicate" else shard
    into["parameters"] += parts["parameters"] / div
    into["gradients"] += parts["gradients"] / div
    into["optimizer"] += parts["optimizer"] / div


def _non_dp(placements, dp_axis):
    if dp_axis is None:
        return placements
    from torch.distributed.tensor import Replicate

    return tuple(Replicate() if a == dp_axis else p for a, p in enumerate(placements))


def _nbytes(n) -> float:
    v = n.meta["val"]
    return float(v.numel() * v.element_size())


def _dtype(n, default):
    v = n.meta.get("val")
    v = v[0] if isinstance(v, (tuple, list)) and v else v
    return v.dtype if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else default


# ---------------------------------------------------------------------------------------------
# Scoring one candidate


@dataclass
class Candidate:
    """One full configuration and what it costs (per device)."""

    pp: int
    dp: int
    tp: int
    microbatch_size: int  # the traced batch (over all dp ranks)
    num_microbatches: int
    schedule: str
    v: int
    flavour: str
    stages: tuple[tuple[str, ...], ...]
    options: dict[str, str]
    costs: LayerCosts = field(repr=False)
    step_time_s: float = math.inf
    pipeline_s: float = 0.0
    dp_sync_s: float = 0.0
    accumulate_s: float = 0.0  # of dp_sync_s: gradient accumulation over the microbatches
    peak_memory_bytes: float = math.inf
    rank_memory: list[dict[str, float]] = field(default_factory=list)
    bubble_fraction: float = 0.0
    p2p_s: float = 0.0
    cut: str = ""  # how the stage cut was found: "ilp-optimal", "ilp-feasible, gap x%", "even"


def bubble_weight(schedule: str, pp: int, m: int, v: int) -> float:
    """b of the stage model b * sum_s T_s + (m - b) * max_r T_rank (solvers.pipeline).

    With equal stages (T_s = t, pp*v of them) the model gives v*t*(m + b*(pp-1)): an idle
    fraction b*(pp-1) / (m + b*(pp-1)). 1F1B and GPipe idle (pp-1)/(m+pp-1), so b = 1;
    interleaved 1F1B (pp-1)/(v*m+pp-1), so b = 1/v. Zero-bubble schedules fill the warm-up and
    cool-down with the weight-grads W of other microbatches, so a hop costs F + I and not
    F + B: a third of the time when F = I = W. Their b is the one whose idle fraction equals
    `Schedule.bubble_fraction` (simulated on torch's actions, F = I = W): 1/(3v) where the
    closed form (pp-1)/(3*v*m+pp-1) holds, larger with few microbatches, where it does not.
    """
    if pp == 1:
        return 1.0
    # every schedule from its simulated bubble, so that interleaved 1F1B with m < pp (torch's
    # short round, a larger bubble than (pp-1)/(v*m+pp-1)) is charged what torch runs too
    f = get_schedule(schedule).bubble_fraction(pp, m, v)
    return min(f * m / ((1.0 - f) * (pp - 1)), float(m))


def pipeline_problem(costs: LayerCosts, cluster: Cluster, pp, m, schedule, v, budget):
    sched = get_schedule(schedule)
    n = pp * v
    in_flight = sched.in_flight(pp, m, v) if pp > 1 else (1,)
    full = (pp, *costs.sub_mesh.values())
    link = cluster.axis_links(full)[0]
    layers = costs.layers
    if sched.split_backward and pp > 1:
        # non-reentrant checkpointing recomputes once per backward call: at I and again at W
        # (stage 0 runs one whole backward and recomputes once; charged twice all the same);
        # and a split backward runs op by op (the eager runtime's host time)
        def split(x, o):
            hf, hb = _host_s(costs.issued[x.name], cluster.device, "eager")
            f, b = max(o.fwd_s, hf), max(o.bwd_s, hb)
            return dataclasses.replace(o, fwd_s=f, bwd_s=b + f if o.name == "full" else b)

        layers = tuple(dataclasses.replace(x, options=tuple(split(x, o) for o in x.options))
                       for x in layers)
    return solvers.PipelineProblem(
        layers=layers, num_stages=n, num_microbatches=m, in_flight=tuple(in_flight),
        stage_of_rank=sched.stage_ranks(pp, v),
        memory_budget_bytes=max(budget - costs.temporaries_bytes, 0.0),
        p2p_s_per_byte=1.0 / link.bandwidth_bytes_per_s if pp > 1 else 0.0,
        p2p_latency_s=link.latency_s + _pipeline_stage_s(cluster) if pp > 1 else 0.0,
        bubble_weight=bubble_weight(schedule, pp, m, v),
    )


def evaluate(c: Candidate, cluster: Cluster) -> Candidate:
    """Fill in c's step time, memory and breakdown from its cut and options (the one scorer)."""
    refused = get_schedule(c.schedule).checkpoint_problem(c.options)
    if refused:
        raise AutoparError(refused)
    problem = pipeline_problem(c.costs, cluster, c.pp, c.num_microbatches, c.schedule, c.v,
                               math.inf)
    pipe_s, _ = solvers.evaluate_pipeline(problem, c.stages, c.options)
    by_name = {layer.name: layer for layer in c.costs.layers}
    ranks = [dict(parameters=0.0, gradients=0.0, optimizer=0.0, activations=0.0,
                  temporaries=c.costs.temporaries_bytes) for _ in range(c.pp)]
    sync = [0.0] * c.pp
    accumulate = [0.0] * c.pp
    for s, members in enumerate(c.stages):
        r = problem.stage_of_rank[s]
        for name in members:
            opt = next(o for o in by_name[name].options if o.name == c.options[name])
            for k, val in c.costs.state[name].items():
                ranks[r][k] += val
            ranks[r]["activations"] += problem.in_flight[s] * opt.activation_bytes
            acc = _accumulate_s(c.costs.state[name]["gradients"], c.num_microbatches,
                                cluster.device)
            sync[r] += c.costs.sync_s[name] + c.costs.update_s[name] + acc
            accumulate[r] += acc
    c.pipeline_s = pipe_s
    worst = max(range(c.pp), key=lambda r: sync[r])
    c.dp_sync_s = sync[worst]
    c.accumulate_s = accumulate[worst]
    c.step_time_s = pipe_s + c.dp_sync_s
    c.rank_memory = ranks
    c.peak_memory_bytes = max(sum(r.values()) for r in ranks)
    c.bubble_fraction = (get_schedule(c.schedule).bubble_fraction(c.pp, c.num_microbatches, c.v)
                         if c.pp > 1 else 0.0)
    c.p2p_s = sum(problem.p2p_latency_s + problem.p2p_s_per_byte * by_name[st[-1]].boundary_bytes
                  for st in c.stages[:-1]) * c.num_microbatches
    return c


def even_stages(order: list[str], n: int) -> tuple[tuple[str, ...], ...]:
    """Layers cut into n contiguous runs of (nearly) equal count, as Megatron does."""
    return tuple(tuple(order[i * len(order) // n:(i + 1) * len(order) // n]) for i in range(n))


# ---------------------------------------------------------------------------------------------
# The search


@dataclass
class SearchSpace:
    meshes: list[dict[str, int]]  # pp x dp x tp (every key present)
    microbatch_sizes: list[int] | None  # per dp rank; None: every divisor of the per-dp batch
    schedules: tuple[str, ...]
    flavours: tuple[str, ...]
    checkpoint: tuple[str, ...] = POLICIES  # options offered to blocks


def candidate_meshes(cluster: Cluster, n_layers: int) -> list[dict[str, int]]:
    """Every pp x dp x tp of the world size, pp at most the number of layers.

    tp across nodes included: its collectives run over the slower inter-node link, yet where
    the work is latency-bound (small layers, many ranks) it still beats the in-node meshes;
    left out, a hand configuration with tp 4 on 2-GPU nodes was 2.2x faster than the plan
    (tests/test_search_grid.py). `search` tries those meshes last."""
    world = cluster.world_size
    out = []
    for tp in _divisors(world):
        for pp in _divisors(world // tp):
            if pp <= n_layers:
                out.append({"pp": pp, "dp": world // tp // pp, "tp": tp})
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def batch_size(example_inputs) -> int:
    flat = [x for x in torch.utils._pytree.tree_leaves(example_inputs)
            if isinstance(x, torch.Tensor) and x.ndim >= 1]
    if not flat:
        raise MeshError("example_inputs hold no tensor with a batch dimension")
    return flat[0].shape[0]


def search(trace_fn, example_inputs, cluster: Cluster, space: SearchSpace, *,
           memory_limit_bytes: float | None = None, precision: TrainingPrecision | None = None,
           solver: str = "highs", time_limit_s: float | None = None, log=None) -> Plan:
    """The fastest plan over `space` that fits; `trace_fn(inputs)` traces one microbatch.

    Two passes. First every (mesh, microbatch) with the fastest intra-op sharding of its dp x tp
    submesh; then, for those whose candidates all went over the memory limit, the sharding of
    least memory, unless a lower bound shows it cannot beat the best plan of the first pass (its
    min-peak ILPs are the slowest solves of a search under a tight limit)."""
    start = time.perf_counter()
    precision = precision or TrainingPrecision()
    budget = memory_limit_bytes if memory_limit_bytes is not None else cluster.device.memory_bytes
    batch = batch_size(example_inputs)
    traces: dict[int, tuple] = {}
    solved: dict[tuple, tuple] = {}
    found = _Found(budget, log)

    def score(stand, profiles, order, pp, dp, tp, mb, m, least):
        """Score the candidates of one intra-op sharding; None if it has none (MeshError)."""
        sub_mesh = {k: v for k, v in (("dp", dp), ("tp", tp)) if v > 1} or {"dp": 1}
        key = (mb, tuple(sub_mesh.items()), least)
        if key not in solved:
            try:
                solved[key] = solve_layers(stand, profiles, cluster, sub_mesh, precision=precision,
                                           solver=solver, time_limit_s=time_limit_s,
                                           least_memory=least)
            except MeshError:
                solved[key] = None
        if solved[key] is None:
            return None
        flavours = space.flavours if dp > 1 else ("replicate",)
        return [found.add(c) for c in _candidates(
            solved[key], stand, profiles, cluster, sub_mesh, flavours, space, pp, dp, tp, mb, m,
            order, budget, solver, time_limit_s, precision, found.best)]

    fallbacks = []
    # tp inside a node first, widest first: such meshes usually win at scale, and an early good
    # plan lets the bound prune the rest (tp across nodes last)
    mesh_order = lambda x: (x["tp"] > cluster.devices_per_node, -x["tp"], x["pp"])  # noqa: E731
    for mesh in sorted(space.meshes, key=mesh_order):
        pp, dp, tp = mesh["pp"], mesh["dp"], mesh["tp"]
        if batch % dp:
            continue
        locals_ = space.microbatch_sizes or _divisors(batch // dp)
        for local in locals_:
            if (batch // dp) % local:
                continue
            mb = local * dp
            m = batch // mb
            if mb not in traces:  # one trace, stand-in and layer order per microbatch size
                stand, profiles = prepare(trace_fn(microbatch_inputs(example_inputs, mb)))
                traces[mb] = (stand, profiles, layer_order(assign_layers(stand.full)))
            stand, profiles, order = traces[mb]
            if pp > len(order):
                continue
            fits = score(stand, profiles, order, pp, dp, tp, mb, m, least=False)
            # all over the limit (not merely pruned by the bound): the fallback may fit
            if fits and not any(fits):
                fallbacks.append((stand, profiles, order, pp, dp, tp, mb, m))
    for stand, profiles, order, pp, dp, tp, mb, m in fallbacks:
        sub_mesh = {k: v for k, v in (("dp", dp), ("tp", tp)) if v > 1} or {"dp": 1}
        fastest = solved[(mb, tuple(sub_mesh.items()), False)]
        if found.best is not None and _least_memory_bound(fastest, pp, m) >= found.best.step_time_s:
            continue
        score(stand, profiles, order, pp, dp, tp, mb, m, least=True)
    best, smallest = found.best, found.smallest
    if best is None:
        if smallest is None:
            raise MeshError(
                f"no mesh, microbatch size and schedule in the search space fits a batch of "
                f"{batch} on {cluster.world_size} devices: check that the batch divides by dp"
            )
        raise InfeasibleError(
            f"no plan fits the memory limit of {format_bytes(budget)} per device: the smallest "
            f"peak found is {format_bytes(smallest[0])} ({smallest[1]}). Raise memory_limit, use "
            "more devices, or shrink the batch.",
            min_peak_bytes=smallest[0], budget_bytes=budget,
        )
    if log:
        log(f"searched {found.tried} candidates in {time.perf_counter() - start:.1f} s")
    return candidate_plan(best, cluster, precision,
                          solver={"candidates": found.tried, "stage_cut": best.cut})


@dataclass
class _Found:
    """The search so far: the fastest candidate that fits, the smallest peak of those that do
    not (for the error when none fits), and how many candidates were scored."""

    budget: float
    log: object = None
    best: Candidate | None = None
    smallest: tuple[float, str] | None = None
    tried: int = 0

    def add(self, c: Candidate) -> bool:
        """Keep `c` if it fits and is the fastest yet; say whether it fits."""
        self.tried += 1
        if c.peak_memory_bytes > self.budget:
            if self.smallest is None or c.peak_memory_bytes < self.smallest[0]:
                self.smallest = (c.peak_memory_bytes, _describe(c))
            return False
        if self.best is None or c.step_time_s < self.best.step_time_s:
            self.best = c
            if self.log:
                self.log(f"best so far: {_describe(c)} step {c.step_time_s:.4g} s")
        return True


def _least_memory_bound(fastest, pp: int, m: int) -> float:
    """A lower bound on the step time of any candidate of the least-memory sharding of a
    (mesh, microbatch), from its fastest sharding's solve. The stage model gives step >=
    b W + (m - b) W / pp >= m W / pp, W one microbatch's work over all layers; W is at least the
    sharding's intra-op objective (checkpointing, ZeRO-3 gathers, p2p and dp sync only add), and
    the least-memory objective is at least the fastest's when that one is proven optimal (no
    bound otherwise: 0)."""
    _, _, solution = fastest
    return m * solution.objective_s / pp if solution.status == "optimal" else 0.0


def _candidates(solved, stand, profiles, cluster, sub_mesh, flavours, space, pp, dp, tp, mb,
                m, order, budget, solver, time_limit_s, precision, best):
    """Scored candidates of one intra-op solution: every flavour x schedule, pruned by bound."""
    for flavour in flavours:
        if flavour == "hsdp" and hsdp_shard(_sub_cluster(cluster, dp * tp), dp, tp) is None:
            continue
        costs = layer_costs(stand, profiles, cluster, sub_mesh, flavour, precision=precision,
                            solved=solved)
        costs.layers = _offered(costs.layers, space.checkpoint)
        # a split backward cannot run selective checkpointing (Schedule.checkpoint_problem)
        split = dataclasses.replace(costs, layers=_offered(
            costs.layers, tuple(p for p in space.checkpoint if p != "selective")))
        for schedule, v in _schedules(space, pp, m, len(order)):
            runnable = split if get_schedule(schedule).split_backward else costs
            if best is not None and _step_bound(runnable, pp, m, schedule, v) >= best.step_time_s:
                continue
            yield _best_cut(runnable, cluster, pp, dp, tp, mb, m, schedule, v, flavour, order,
                            budget, solver, time_limit_s)


def _step_bound(costs: LayerCosts, pp: int, m: int, schedule: str, v: int) -> float:
    """A lower bound on any cut's step time: with W one microbatch's work over all layers
    (fastest options), sum_s T_s >= W and max_r T_rank >= W / pp, so the stage model's
    b * sum_s T_s + (m - b) * max_r T_rank >= b W + (m - b) W / pp; plus the dp sync, whose
    busiest rank holds at least 1/pp of it."""
    work = sum(min(o.fwd_s + o.bwd_s for o in x.options) for x in costs.layers)
    b = bubble_weight(schedule, pp, m, v)
    sync = sum(costs.sync_s.values())
    return b * work + (m - b) * work / pp + sync / pp


def _offered(layers, policies) -> tuple[solvers.Layer, ...]:
    """Each layer with only the checkpoint options the search space allows ("none" always)."""
    return tuple(
        dataclasses.replace(x, options=tuple(o for o in x.options
                                             if o.name == "none" or o.name in policies))
        for x in layers)


def _schedules(space, pp, m, n_layers):
    if pp == 1:
        yield "1F1B", 1
        return
    for name in space.schedules:
        sched = get_schedule(name)
        v = sched.default_v(None)
        if pp * v > n_layers:
            continue
        try:
            sched.check(pp, m, v)
        except ValueError:
            continue
        yield sched.name, v


def _best_cut(costs, cluster, pp, dp, tp, mb, m, schedule, v, flavour, order, budget, solver,
              time_limit_s) -> Candidate:
    """The stage ILP's cut, and the even cut with the cheapest options that fit, scored by
    `evaluate` (which also charges the per-step dp sync the ILP leaves out); the faster wins."""
    base = dict(pp=pp, dp=dp, tp=tp, microbatch_size=mb, num_microbatches=m, schedule=schedule,
                v=v, flavour=flavour, costs=costs)
    found = []
    problem = pipeline_problem(costs, cluster, pp, m, schedule, v, budget)
    if _least_peak_bound(problem) + costs.temporaries_bytes <= budget:
        try:
            sol = solvers.solve_pipeline(problem, solver=solver,
                                         time_limit_s=time_limit_s or STAGE_TIME_LIMIT_S)
            found.append(evaluate(Candidate(stages=sol.stages, options=dict(sol.options),
                                            cut=_cut_status(sol), **base), cluster))
        except solvers.InfeasibleProblem as e:
            found.append(Candidate(stages=(), options={}, peak_memory_bytes=e.min_peak_bytes
                                   + costs.temporaries_bytes, **base))
        except solvers.NoSolutionFound:
            pass  # the even cuts below still stand
    for how in {o.name: None for x in costs.layers for o in x.options}:
        opts = {x.name: how if how in [o.name for o in x.options] else "none"
                for x in costs.layers}
        found.append(evaluate(Candidate(stages=even_stages(order, pp * v), options=opts,
                                        cut="even", **base), cluster))
    fits = [c for c in found if c.stages and c.peak_memory_bytes <= budget]
    if fits:
        return min(fits, key=lambda c: c.step_time_s)
    return min(found, key=lambda c: c.peak_memory_bytes)


# A safety net: with runs of identical layers the stage ILP counts layers per run and proves
# GPT-3-sized cuts in seconds, but a model whose layers all differ gets the per-layer ILP, which
# can take minutes on many stages. Past this limit (when the caller sets none) its best cut so
# far competes with the even cuts, and the plan records that it is not proven optimal.
STAGE_TIME_LIMIT_S = 20.0


def _least_peak_bound(problem: solvers.PipelineProblem) -> float:
    """A lower bound on the busiest rank's memory: every layer's state and its smallest
    activations (at the smallest in-flight count), spread evenly over the ranks."""
    ranks = len(set(problem.stage_of_rank)) if problem.stage_of_rank else problem.num_stages
    total = sum(x.state_bytes + min(problem.in_flight) * min(o.activation_bytes
                                                             for o in x.options)
                for x in problem.layers)
    return total / ranks


def _cut_status(sol) -> str:
    if sol.status == "optimal":
        return "ilp-optimal"
    gap = f", gap {sol.gap:.2%}" if sol.gap is not None else ""
    return f"ilp-feasible{gap}"


def _describe(c: Candidate) -> str:
    return (f"pp={c.pp} dp={c.dp} tp={c.tp}, {c.num_microbatches} x {c.microbatch_size}, "
            f"{c.schedule}, {c.flavour}")


# ---------------------------------------------------------------------------------------------
# Candidate -> Plan


def candidate_plan(c: Candidate, cluster: Cluster, precision: TrainingPrecision, *,
                   solver: dict) -> Plan:
    """The Plan of a scored candidate, with everything `simulate` needs in `predicted`."""
    costs = c.costs
    sub = _sub_cluster(cluster, math.prod(costs.sub_mesh.values()))
    plan = to_plan(costs.traced, sub, costs.decisions, costs.solution,
                   chosen=costs.stand.expand(costs.decisions.strategies, costs.solution.choices))
    if c.flavour == "hsdp":
        split_dp_axis(plan, c.dp // costs.dp_shard)
    sub_mesh = dict(plan.mesh)
    if c.pp > 1 or c.num_microbatches > 1:  # pp = 1 with microbatches: gradient accumulation
        plan.mesh = {PP: c.pp, **sub_mesh}
        plan.pipeline = {
            "schedule": c.schedule, "stages_per_rank": c.v, "microbatch_size": c.microbatch_size,
            "num_microbatches": c.num_microbatches,
            "stages": [{"rank": r, "layers": list(st)} for st, r in
                       zip(c.stages, get_schedule(c.schedule).stage_ranks(c.pp, c.v))],
        }
    plan.cluster = cluster.to_dict()
    plan.schema_version = SCHEMA_VERSION
    plan.data_parallel = c.flavour if c.dp > 1 else "replicate"
    plan.checkpoint = {k: v for k, v in c.options.items() if v != "none"}
    if plan.data_parallel != "replicate":
        _shard_parameters_over_dp(plan, costs.traced, sub_mesh)
    worst = max(range(c.pp), key=lambda r: sum(c.rank_memory[r].values()))
    mem = c.rank_memory[worst]
    batch = c.microbatch_size * c.num_microbatches
    seq = _sequence_length(costs.traced)
    predicted = {
        "step_time_s": c.step_time_s,
        "pipeline_s": c.pipeline_s,
        "dp_sync_s": c.dp_sync_s,
        "gradient_accumulation_s": c.accumulate_s,
        "bubble_fraction": c.bubble_fraction,
        "peak_memory_bytes": c.peak_memory_bytes,
        "flops_per_step": costs.model_flops * c.num_microbatches,
        "samples_per_step": float(batch),
        "tokens_per_step": float(batch * seq) if seq else 0.0,
        "peak_flops_per_device": cluster.device.peak_flops_for(
            "bfloat16" if precision.compute_bytes == 2 else "float32"),
        "world_size": float(cluster.world_size),
        "communication_pp_s": c.p2p_s,
        "communication_dp_s": (sum(costs.sync_s.values())
                               + costs.dp_microbatch_s * c.num_microbatches),
    }
    for axis, secs in costs.comm_s.items():
        if axis != "dp":
            predicted[f"communication_{axis}_s"] = secs * c.num_microbatches
    for k, val in mem.items():
        predicted[f"memory_{k}_bytes"] = val
    plan.predicted = {k: float(v) for k, v in predicted.items()}
    plan.solver = dict(plan.solver, **solver)
    return Plan.from_dict(plan.to_dict())  # validates the assembled plan


def split_dp_axis(plan: Plan, replicas: int) -> None:
    """Hybrid sharding's 2-D data-parallel mesh: "dp" becomes "dp_replicate" (outer, across
    nodes) x "dp" (inner, the shard group). Every placement on dp is repeated on both axes: a
    batch split over dp is split over the two in the same row-major order (rank i * shard + j
    holds the same slice as dp rank i * shard + j did), a partial sum stays a partial sum."""
    axes = list(plan.mesh)
    a = axes.index("dp")
    mesh = dict(plan.mesh)
    plan.mesh = {}
    for axis in axes:
        if axis == "dp":
            plan.mesh["dp_replicate"] = replicas
            plan.mesh["dp"] = mesh["dp"] // replicas
        else:
            plan.mesh[axis] = mesh[axis]
    twice = lambda pl: [*pl[:a], pl[a], *pl[a:]] if pl else pl  # noqa: E731
    plan.parameters = {k: twice(v) for k, v in plan.parameters.items()}
    plan.inputs = {k: twice(v) for k, v in plan.inputs.items()}
    for op in plan.ops.values():
        op.inputs = [twice(p) for p in op.inputs]
        op.outputs = [twice(p) for p in op.outputs]


def _sequence_length(traced: TracedModel) -> int:
    """Dim 1 of the first user input when it has one (B, T, ...), else 0."""
    v = traced.node(traced.inputs[0]).meta["val"]
    return int(v.shape[1]) if v.ndim >= 2 else 0


def _shard_parameters_over_dp(plan: Plan, traced: TracedModel, sub_mesh: dict[str, int]) -> None:
    """ZeRO: each parameter's dp placement becomes S(d) for its first dim that divides (the ops
    still read it replicated over dp, so the runtime gathers it)."""
    axes = list(sub_mesh)
    a, n = axes.index("dp"), sub_mesh["dp"]
    fqn_to_node = {fqn: node for node, fqn in traced.parameters.items()}
    for fqn, placements in plan.parameters.items():
        shape = traced.node(fqn_to_node[fqn]).meta["val"].shape
        for d, size in enumerate(shape):
            already = math.prod(sub_mesh[axes[b]] for b, p in enumerate(placements)
                                if p == f"S({d})" and b != a)
            if size % (n * already) == 0:
                placements[a] = f"S({d})"
                break


def check_schedule(name: str) -> str:
    if name not in SCHEDULES and name.lower() not in {s.lower() for s in SCHEDULES}:
        get_schedule(name)  # raises with the list
    return get_schedule(name).name
