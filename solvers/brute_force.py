"""Exact intra-op sharding by enumeration: the reference the ILP is tested against.

Every combination of strategies is scored with `evaluate` (tied nodes move together, so a tie
group counts once). Among the combinations that fit the memory budget the cheapest wins; ties in
cost go to the first combination in lexicographic order of the tie groups' representatives, so the
result is deterministic. Only for tiny problems: the work is the product of the strategy counts.
"""

from __future__ import annotations

import itertools
import math
import time

from solvers.problem import (
    ShardingProblem,
    Solution,
    evaluate,
    infeasible_error,
    tie_groups,
)

__all__ = ["solve_brute_force"]


def solve_brute_force(problem: ShardingProblem, *, max_combinations: int = 1_000_000) -> Solution:
    """Solve `problem` exactly by trying every combination of strategies.

    Parameters
    ----------
    problem : ShardingProblem
    max_combinations : int
        Refuse (ValueError) problems with more combinations than this.

    Returns
    -------
    Solution
        With status "optimal", gap 0.0 and solver "brute_force".

    Raises
    ------
    InfeasibleProblem
        No combination fits the memory budget; `min_peak_bytes` is the smallest peak among the
        combinations that avoid forbidden (inf) costs, or inf if there are none.
    ValueError
        The problem is invalid, or has more than `max_combinations` combinations.

    Examples
    --------
    >>> from solvers.problem import MemoryPoint, Node
    >>> p = ShardingProblem(
    ...     nodes=(Node(name="a", costs_s=(1.0, 2.0), memory_bytes=(8.0, 4.0)),),
    ...     memory_points=(MemoryPoint(name="a", live=("a",)),),
    ...     memory_budget_bytes=6.0,
    ... )
    >>> solve_brute_force(p).choices  # the cheaper strategy does not fit
    {'a': 1}
    """
    start = time.perf_counter()
    problem.validate()
    rep_of = tie_groups(problem)
    reps = list(dict.fromkeys(rep_of[node.name] for node in problem.nodes))
    counts = [problem.node(rep).num_strategies for rep in reps]
    total = math.prod(counts)
    if total > max_combinations:
        raise ValueError(
            f"brute force would try {total} combinations (> max_combinations="
            f"{max_combinations}); use solve_intra_op for problems this size"
        )
    best: tuple[float, float, dict[str, int]] | None = None
    min_peak_bytes = math.inf
    for combo in itertools.product(*(range(n) for n in counts)):
        by_rep = dict(zip(reps, combo))
        choices = {node.name: by_rep[rep_of[node.name]] for node in problem.nodes}
        objective_s, peak_bytes = evaluate(problem, choices)
        if math.isinf(objective_s):
            continue
        min_peak_bytes = min(min_peak_bytes, peak_bytes)
        if peak_bytes <= problem.memory_budget_bytes and (best is None or objective_s < best[0]):
            best = (objective_s, peak_bytes, choices)
    if best is None:
        raise infeasible_error(min_peak_bytes, problem.memory_budget_bytes)
    objective_s, peak_bytes, choices = best
    return Solution(
        choices=choices,
        objective_s=objective_s,
        peak_memory_bytes=peak_bytes,
        status="optimal",
        gap=0.0,
        solver="brute_force",
        solve_time_s=time.perf_counter() - start,
    )
