"""Optimisation over plain problem objects: intra-op sharding ILP and its brute-force reference.

Imports no torch, so every solver can be tested with hand-built instances.
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

from solvers.brute_force import solve_brute_force
from solvers.intra_op import solve_intra_op
from solvers.pipeline import (
    Layer,
    LayerOption,
    PipelineProblem,
    PipelineSolution,
    evaluate_pipeline,
    solve_pipeline,
    solve_pipeline_brute_force,
)
from solvers.problem import (
    Edge,
    InfeasibleProblem,
    MemoryPoint,
    Node,
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
    "NoSolutionFound",
    "PipelineProblem",
    "PipelineSolution",
    "ShardingProblem",
    "Solution",
    "evaluate",
    "evaluate_pipeline",
    "solve_brute_force",
    "solve_intra_op",
    "solve_pipeline",
    "solve_pipeline_brute_force",
]
