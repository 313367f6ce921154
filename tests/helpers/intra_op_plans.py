"""A plan from the intra-op ILP alone, on one fixed mesh: no stand-in, no pipeline search, no
data-parallel flavour. Runtime tests use it for a quick plan whose placements come straight
from the sharding problem."""

from __future__ import annotations

import solvers
from autopar.cluster import Cluster
from autopar.parallelism import check_world_size
from autopar.plan import Plan
from autopar.planning.intra_op import build_problem, to_plan
from autopar.planning.profile import TrainingPrecision, profile_graph
from autopar.trace import TracedModel


def make_plan(traced: TracedModel, cluster: Cluster, *, mesh: dict[str, int],
              precision: TrainingPrecision | None = None) -> Plan:
    """The fastest sharding of `traced` on `mesh` (no memory limit)."""
    check_world_size(mesh, cluster.world_size)
    decisions = build_problem(
        traced, profile_graph(traced.graph_module), cluster, mesh,
        precision=precision or TrainingPrecision(), memory_budget_bytes=float("inf"),
    )
    solution = solvers.solve_intra_op(decisions.problem)
    return to_plan(traced, cluster, decisions, solution)
