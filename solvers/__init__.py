"""Optimisation over plain problem objects: intra-op sharding ILP and its brute-force reference.

Imports no torch, so every solver can be tested with hand-built instances.
"""

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
