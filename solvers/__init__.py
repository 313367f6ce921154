"""Optimisation over plain problem objects: the intra-op sharding ILP, the pipeline stage-cut
ILPs, and a brute-force reference for each.

Imports no torch, so every solver can be tested with hand-built instances. Each problem is plain
data with an evaluator; each solver returns choices scored by that evaluator. The names below
(`__all__`) are the public surface; the modules also hold the steps (build, solve, read).

Module map
    problem.py               intra-op sharding problem: Node, Edge, MemoryPoint, ShardingProblem,
                             Solution, evaluate; InfeasibleProblem and NoSolutionFound, which
                             every solver raises
    intra_op.py              intra-op sharding ILP: solve_intra_op, smallest_peak
                             (build_intra_op_ilp, read_solution)
    reduction.py             intra-op problem without memory rows, solved by exact graph
                             reduction (leaves, chain links, parallel edges) down to a core
                             that the ILP solves: solve_intra_op tries it first
    brute_force.py           intra-op reference by enumeration: solve_brute_force
    pipeline_problem.py      stage-cut problem: Layer, LayerOption, PipelineProblem,
                             PipelineSolution; its cost model, evaluate_pipeline (stage_costs,
                             score_stages); runs of identical layers (layer_runs, same_kind)
    pipeline.py              stage-cut solve: solve_pipeline picks a formulation, builds it,
                             solves it, reads the plan (read_pipeline_solution)
    pipeline_dp.py           stage cut without options or memory rows (the relaxation
                             solve_pipeline solves first), by an exact DP over the ranks:
                             solve_cut_dp
    pipeline_layers.py       stage-cut ILP with one variable per layer: build_pipeline_ilp
    pipeline_runs.py         stage-cut ILP over runs of identical layers, with rank bounds:
                             build_pipeline_runs_ilp, fastest_fill
    pipeline_ranks.py        the rows over ranks both stage-cut ILPs share: step-time objective,
                             rank_time, memory, peak
    pipeline_brute_force.py  stage-cut reference by enumeration: solve_pipeline_brute_force
    backend.py               HiGHS (default) / CBC (fallback) for every ILP: pick_solver,
                             run_solver, SolverResult, highs_within_tolerance, pulp_names

Imports run one way: backend.py imports no solvers module; each brute force and ILP imports its
problem module (pipeline_problem.py imports problem.py for the shared errors) and backend.py
(intra_op.py also reduction.py, which imports problem.py only);
the two stage-cut ILPs import pipeline_ranks.py; pipeline.py imports both of them
and pipeline_dp.py (which imports pipeline_problem.py only); this file
imports the public names.
"""

import threading


def _import_on_a_thread_of_its_own(name: str) -> None:
    """pulp keeps, for each solver library it fails to load, the exception and with it the
    traceback (pulp/apis/copt_api.py: `err = e` in a class body), and a traceback holds every
    frame below it on the stack. Imported from inside a function (autopar.plan imports the
    solvers on first use), pulp would keep that function's locals, the user's model among them,
    alive for good. A thread's stack starts at the thread."""
    errors: list[BaseException] = []

    def run():
        try:
            __import__(name)
        except BaseException as e:  # re-raised below, on the importing thread
            errors.append(e)

    t = threading.Thread(target=run, name=f"import {name}")
    t.start()
    t.join()
    if errors:
        raise errors[0]


_import_on_a_thread_of_its_own("pulp")

# After pulp's import above, which must run on a thread of its own.
from solvers.brute_force import solve_brute_force  # noqa: E402
from solvers.intra_op import smallest_peak, solve_intra_op  # noqa: E402
from solvers.pipeline import solve_pipeline  # noqa: E402
from solvers.pipeline_brute_force import solve_pipeline_brute_force  # noqa: E402
from solvers.pipeline_problem import (  # noqa: E402
    Layer,
    LayerOption,
    PipelineProblem,
    PipelineSolution,
    evaluate_pipeline,
)
from solvers.problem import (  # noqa: E402
    Edge,
    InfeasibleProblem,
    MemoryPoint,
    Node,
    NoPlanBelowCutoff,
    NoSolutionFound,
    ShardingProblem,
    Solution,
    evaluate,
)

__all__ = [
    "Edge",
    "InfeasibleProblem",
    "Layer",
    "LayerOption",
    "MemoryPoint",
    "Node",
    "NoPlanBelowCutoff",
    "NoSolutionFound",
    "PipelineProblem",
    "PipelineSolution",
    "ShardingProblem",
    "Solution",
    "evaluate",
    "evaluate_pipeline",
    "smallest_peak",
    "solve_brute_force",
    "solve_intra_op",
    "solve_pipeline",
    "solve_pipeline_brute_force",
]
