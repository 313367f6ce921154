"""Exact stage cuts by enumeration: the reference the stage-cut ILPs are tested against.

Every plan is tried: each cut of the L layers into S contiguous non-empty stages (a choice of
S-1 cut points among the L-1 gaps) with each choice of one option per layer, C(L-1, S-1) *
prod_l |K_l| plans in all. Each is scored with the cost model of `solvers.pipeline_problem`
(`stage_costs`, `score_stages`). Among the plans whose largest rank memory is within
`memory_budget_bytes` the one with the least step_s wins; equal step times go to the first plan
in enumeration order (cuts in lexicographic order of their cut points, then options in
lexicographic order), so the result is deterministic. When no plan fits, the smallest
max-rank peak over all plans is reported. Only for tiny problems.
"""

from __future__ import annotations

import itertools
import math
import time

from solvers.pipeline_problem import (
    PipelineProblem,
    PipelineSolution,
    infeasible_cut_error,
    score_stages,
    solution_from_plan,
    stage_costs,
)

__all__ = ["solve_pipeline_brute_force"]


def solve_pipeline_brute_force(problem: PipelineProblem) -> PipelineSolution:
    """Try every contiguous cut and every option per layer; keep the fastest plan that fits.

    For small instances (the number of plans is C(L-1, S-1) * prod_l |K_l|). Ties go to the
    first plan in enumeration order. Raises InfeasibleProblem with the smallest peak when nothing
    fits the budget.

    Examples
    --------
    >>> from solvers.pipeline_problem import Layer, LayerOption
    >>> fast = LayerOption(name="none", fwd_s=1.0, bwd_s=2.0, activation_bytes=4.0)
    >>> lean = LayerOption(name="full", fwd_s=1.0, bwd_s=3.0, activation_bytes=1.0)
    >>> a = Layer(name="a", options=(fast, lean), state_bytes=0.0, boundary_bytes=0.0)
    >>> p = PipelineProblem(
    ...     layers=(a,), num_stages=1, num_microbatches=1, in_flight=(1,), memory_budget_bytes=2.0
    ... )
    >>> sol = solve_pipeline_brute_force(p)
    >>> sol.options, sol.step_time_s, sol.peak_memory_bytes
    ({'a': 'full'}, 4.0, (1.0,))
    """
    start = time.perf_counter()
    problem.validate()
    L, S = len(problem.layers), problem.num_stages
    best = None
    min_peak_bytes = math.inf
    all_options = list(itertools.product(*(range(len(layer.options)) for layer in problem.layers)))
    for cuts in itertools.combinations(range(1, L), S - 1):
        bounds = (0, *cuts, L)
        stages = tuple(tuple(range(a, b)) for a, b in zip(bounds, bounds[1:]))
        for options in all_options:
            step_s, peak_bytes = score_stages(problem, *stage_costs(problem, stages, list(options)))
            worst = max(peak_bytes)
            min_peak_bytes = min(min_peak_bytes, worst)
            if worst <= problem.memory_budget_bytes and (best is None or step_s < best[0]):
                best = (step_s, stages, list(options))
    if best is None:
        raise infeasible_cut_error(problem, min_peak_bytes)
    _, stages, options = best
    return solution_from_plan(
        problem, stages, options, gap=0.0, status="optimal", solver="brute_force", start=start
    )
