"""A scored candidate -> the Plan: placements from its intra-op solution (expanded from the
stand-in to every layer), the pipeline section, the data-parallel flavour's placements and mesh,
checkpointing, and everything `simulate` reads in `plan.predicted`; a warning per op that runs
replicated for want of a sharding rule."""

from __future__ import annotations

import math

from autopar import parallelism
from autopar.cluster import Cluster
from autopar.parallelism import DATA, DATA_REPLICAS, PIPELINE
from autopar.plan import SCHEMA_VERSION, Plan
from autopar.planning import op_rules
from autopar.planning.candidate import Candidate
from autopar.planning.intra_op import to_plan
from autopar.planning.layer_costs import sub_cluster
from autopar.planning.profile import TrainingPrecision
from autopar.schedules import get_schedule
from autopar.trace import TracedModel


def candidate_plan(c: Candidate, cluster: Cluster, precision: TrainingPrecision, *,
                   solver: dict) -> Plan:
    """The Plan of a scored candidate, with everything `simulate` needs in `predicted`."""
    costs = c.costs
    sub = sub_cluster(cluster, math.prod(costs.sub_mesh.values()))
    plan = to_plan(costs.traced, sub, costs.decisions, costs.solution,
                   chosen=costs.stand.expand(costs.decisions.strategies, costs.solution.choices))
    if parallelism.get_flavour(c.flavour).hybrid:
        split_dp_axis(plan, c.dp // costs.dp_shard)
    sub_mesh = dict(plan.mesh)
    if c.pp > 1 or c.num_microbatches > 1:  # pp = 1 with microbatches: gradient accumulation
        plan.mesh = {PIPELINE: c.pp, **sub_mesh}
        plan.pipeline = {
            "schedule": c.schedule, "stages_per_rank": c.v, "microbatch_size": c.microbatch_size,
            "num_microbatches": c.num_microbatches,
            "stages": [{"rank": r, "layers": list(st)} for st, r in
                       zip(c.stages, get_schedule(c.schedule).stage_ranks(c.pp, c.v))],
        }
    plan.cluster = cluster.to_dict()
    plan.schema_version = SCHEMA_VERSION
    plan.data_parallel = (c.flavour if parallelism.state_ranks(c.mesh) > 1
                          else parallelism.REPLICATE)
    plan.checkpoint = {k: v for k, v in c.options.items() if v != "none"}
    plan.precision = precision.to_dict()
    if parallelism.get_flavour(plan.data_parallel).shards_state:
        shard_parameters_over_dp(plan, costs.traced, sub_mesh,
                                 hybrid=parallelism.get_flavour(plan.data_parallel).hybrid)
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
        "peak_flops_per_device": cluster.device.peak_flops_for(precision.compute_dtype),
        "world_size": float(cluster.world_size),
        "communication_pp_s": c.p2p_s,
        "communication_dp_s": (sum(costs.sync_s.values())
                               + costs.dp_microbatch_s * c.num_microbatches),
    }
    for axis, secs in costs.comm_s.items():
        if axis != DATA:
            predicted[f"communication_{axis}_s"] = secs * c.num_microbatches
    for k, val in mem.items():
        predicted[f"memory_{k}_bytes"] = val
    plan.predicted = {k: float(v) for k, v in predicted.items()}
    plan.solver = dict(plan.solver, **solver)
    op_rules.warn_fallbacks(plan.fallback_ops)  # once per planning call: this is its plan
    return Plan.from_dict(plan.to_dict())  # validates the assembled plan


def split_dp_axis(plan: Plan, replicas: int) -> None:
    """A hybrid flavour's 2-D data-parallel mesh: "dp" becomes "dp_replicate" (outer, across
    nodes) x "dp" (inner, the shard group). Every placement on dp is repeated on both axes: a
    batch split over dp is split over the two in the same row-major order (rank i * shard + j
    holds the same slice as dp rank i * shard + j did), a partial sum stays a partial sum."""
    axes = list(plan.mesh)
    a = axes.index(DATA)
    mesh = dict(plan.mesh)
    plan.mesh = {}
    for axis in axes:
        if axis == DATA:
            plan.mesh[DATA_REPLICAS] = replicas
            plan.mesh[DATA] = mesh[DATA] // replicas
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


def shard_parameters_over_dp(plan: Plan, traced: TracedModel, sub_mesh: dict[str, int], *,
                             hybrid: bool = False) -> None:
    """A flavour that shards state: each parameter's placement on dp, and on cp unless the
    flavour is hybrid (`parallelism.state_ranks`), becomes S(d) for its first dim that divides
    (the ops still read it replicated there, so the runtime gathers it)."""
    axes = list(sub_mesh)
    group = [b for b, axis in enumerate(axes)
             if axis == DATA or (not hybrid and parallelism.splits(axis, parallelism.SEQUENCE))]
    n = math.prod(sub_mesh[axes[b]] for b in group)
    fqn_to_node = {fqn: node for node, fqn in traced.parameters.items()}
    for fqn, placements in plan.parameters.items():
        shape = traced.node(fqn_to_node[fqn]).meta["val"].shape
        for d, size in enumerate(shape):
            already = math.prod(sub_mesh[axes[b]] for b, p in enumerate(placements)
                                if p == f"S({d})" and b not in group)
            if size % (n * already) == 0:
                for b in group:
                    placements[b] = f"S({d})"
                break
