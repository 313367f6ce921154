r"""The rows over ranks that both stage-cut formulations share: step-time objective, memory, peak.

A formulation (`solvers.pipeline_layers`, one variable per layer; `solvers.pipeline_runs`,
counts per run of identical layers) hands over, per stage, its time and its memory as linear
expressions of its own variables; this module turns them into the objective and the per-rank
rows, so both formulations optimise the same cost model (`solvers.pipeline_problem`).

Sets
    S stages s, R ranks r, S_r the stages on rank r (`PipelineProblem.ranks`).
    T_s: seconds of stage s (one microbatch's forward + backward, plus the send after it).
    M_s: bytes held by stage s (state + in-flight activations). Both given by the formulation.

Variables
    t_max >= 0           the largest rank time.                         (`set_step_objective`)
    peak >= 0            the largest rank memory; peak model only.      (`set_peak_objective`)

Objective
    time:  min  b * sum_s T_s  +  (m - b) * t_max                       (`set_step_objective`)
           with b = bubble_weight <= m = num_microbatches, so (m - b) >= 0 presses t_max down to
           max_r sum_(s in S_r) T_s and the optimum is step_s of the cost model. Divided by the
           largest coefficient of the T_s (at least p2p_latency_s), so the solver sees numbers
           in [0, 1].
    peak:  min  peak                                                    (`set_peak_objective`)

Constraints
    rank_time[r]:  sum_(s in S_r) T_s <= t_max                          (`set_step_objective`)
    memory[r]:     sum_(s in S_r) M_s <= budget    (none when the budget is inf) (`add_memory_rows`)
    peak[r]:       sum_(s in S_r) M_s <= peak      (peak model only)    (`set_peak_objective`)
    Memory rows are in units of the largest memory coefficient (state bytes, or the most
    in-flight microbatches times an option's activation bytes).

A formulation's "time" model has rank_time, memory and the time objective; its "peak" model,
solved when nothing fits to report the smallest peak, has peak and the peak objective instead
(`check_minimise` names the two).
"""

from __future__ import annotations

import math

import pulp

from solvers.pipeline_problem import PipelineProblem

__all__ = [
    "add_memory_rows",
    "check_minimise",
    "rank_memory",
    "set_peak_objective",
    "set_step_objective",
]


def check_minimise(minimise: str) -> None:
    """ValueError unless `minimise` is "time" (the stage-cut model) or "peak" (smallest peak)."""
    if minimise not in ("time", "peak"):
        raise ValueError(f"minimise must be 'time' or 'peak', got {minimise!r}")


def set_step_objective(
    lp: pulp.LpProblem, problem: PipelineProblem, times: list[pulp.LpAffineExpression]
) -> float:
    """rank_time[r] rows; min b * sum_s T_s + (m - b) * t_max, scaled to coefficients <= 1.

    `times` are the T_s of either model (per-layer or runs), so both share one objective.
    Returns the scale (seconds per unit) for other rows in seconds.
    """
    scale = max((abs(c) for t in times for c in t.values()), default=0.0) or 1.0
    scale = max(scale, problem.p2p_latency_s)
    t_max = lp.add_variable("t_max", lowBound=0)
    for r in range(problem.num_ranks):
        rank_time = pulp.lpSum(t for t, rank in zip(times, problem.ranks) if rank == r)
        lp += (rank_time / scale <= t_max, f"rank_time({r})")
    w, m = problem.bubble_weight, problem.num_microbatches
    lp.setObjective(w * pulp.lpSum(times) / scale + (m - w) * t_max)
    return scale


def rank_memory(
    problem: PipelineProblem, stage_memory: list[pulp.LpAffineExpression]
) -> list[pulp.LpAffineExpression]:
    """Bytes held by each rank: the sum of M_s over its stages."""
    return [
        pulp.lpSum(mem for mem, rank in zip(stage_memory, problem.ranks) if rank == r)
        for r in range(problem.num_ranks)
    ]


def _memory_scale(problem: PipelineProblem) -> float:
    most = max(problem.in_flight)
    entries = [layer.state_bytes for layer in problem.layers] + [
        most * option.activation_bytes for layer in problem.layers for option in layer.options
    ] + [most * layer.carry_bytes for layer in problem.layers]
    return max(entries) or 1.0


def add_memory_rows(
    lp: pulp.LpProblem, problem: PipelineProblem, memory: list[pulp.LpAffineExpression]
) -> None:
    """memory[r] rows for the per-rank bytes `memory` (`rank_memory`), in units of the largest
    memory coefficient."""
    budget = problem.memory_budget_bytes
    if math.isinf(budget):
        return
    scale = _memory_scale(problem)
    for r, held in enumerate(memory):
        lp += (held / scale <= budget / scale, f"memory({r})")


def set_peak_objective(
    lp: pulp.LpProblem, problem: PipelineProblem, memory: list[pulp.LpAffineExpression]
) -> None:
    """peak[r] rows: memory of rank r <= peak; min peak."""
    scale = _memory_scale(problem)
    peak = lp.add_variable("peak", lowBound=0)
    for r, held in enumerate(memory):
        lp += (held / scale <= peak, f"peak({r})")
    lp.setObjective(pulp.lpSum([peak]))
