"""Pipelined plans made by hand for runtime tests: the planner's sharding of one microbatch on
the sub-mesh, its layers cut evenly into pp * v stages on the ranks the schedule places them,
so that the tests check the runtime whatever the planner would choose."""

from __future__ import annotations

import math

from autopar.layers import assign_layers, layer_order
from autopar.plan import Plan
from autopar.planning.assemble import shard_parameters_over_dp
from autopar.schedules import get_schedule
from autopar.trace import TracedModel
from tests.helpers.intra_op_plans import make_plan
from tests.helpers.models import fast_cpu_cluster


def even_pipeline_plan(traced: TracedModel, mb: int, *, pp, sub_mesh, microbatches, schedule,
                       v=1, checkpoint=None, zero=0) -> Plan:
    """`traced` (one microbatch of `mb` samples) planned on `sub_mesh` and cut evenly; with
    zero=3 its parameters sharded over dp."""
    sub_size = math.prod(sub_mesh.values())
    plan = make_plan(traced, fast_cpu_cluster(sub_size), mesh=sub_mesh)
    plan.mesh = {"pp": pp, **sub_mesh}
    plan.cluster = fast_cpu_cluster(pp * sub_size).to_dict()
    layers = layer_order(assign_layers(traced))
    n = pp * v
    cuts = [layers[i * len(layers) // n: (i + 1) * len(layers) // n] for i in range(n)]
    plan.pipeline = {
        "schedule": schedule, "stages_per_rank": v, "microbatch_size": mb,
        "num_microbatches": microbatches,
        "stages": [{"rank": r, "layers": cuts[s]}
                   for s, r in enumerate(get_schedule(schedule).stage_ranks(pp, v))],
    }
    plan.checkpoint = dict(checkpoint or {})
    if zero:
        plan.data_parallel = "zero3"
        shard_parameters_over_dp(plan, traced, sub_mesh)
    return plan
