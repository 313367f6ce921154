r"""Solve the pipeline stage-cut problem exactly: pick a formulation, build it, solve it, read it.

The problem (`solvers.pipeline_problem`): cut L layers, in order, into S contiguous non-empty
stages (stage s on rank rank(s)) and give every layer one option (e.g. a checkpoint policy), to

    min  step_s = b * sum_s T_s  +  (m - b) * max_r sum_(s on r) T_s
    s.t. sum_(s on r) memory_s <= memory_budget_bytes     for every rank r

with T_s and memory_s the stage times and bytes of the cost model there. Two exact ILPs of it
share their objective and rows over ranks (`solvers.pipeline_ranks`):

    "layers"  `solvers.pipeline_layers`: x[l,s], o[l,k], w[l,s,k], c[l,s] per layer; the
              reference model.
    "runs"    `solvers.pipeline_runs`: counts per (stage, run of identical layers, option) and
              where each stage ends, plus valid rank_bound rows; the same plans and optimum,
              without the equal-cost copies that make deep stacks of equal blocks slow to prove.

With one option a layer and no memory budget, only the cut is left, and an exact DP over the
ranks finds it (`solvers.pipeline_dp`, for one stage a rank and the two placements of two),
milliseconds where the ILPs took seconds; `formulation="auto"` uses it where it applies.

Before either ILP, `solve_pipeline` solves the relaxation with every layer on its fastest option and
no memory rows (`_fastest_unbounded`): the step never falls when an option gets slower, so when
that plan fits the budget it is the optimum, and when none of its plans is below the caller's
cutoff, none of the problem's is. Where memory does not bind, that small model is proven many
times sooner (`_solve_relaxed`).

`solve_pipeline(formulation="auto")` takes "runs" when two adjacent layers are identical and
"layers" otherwise. The three steps are `build_pipeline_ilp` or `build_pipeline_runs_ilp`,
`run_solver` (`solvers.backend`, shared with the intra-op ILP) and `read_pipeline_solution`;
`solve_pipeline` runs them in order, and calls a HiGHS solve optimal within HiGHS's own tolerance
(`highs_within_tolerance`: the continuous t_max and c leave a residual gap near 1e-7).

When no plan fits, a second ILP of the same formulation (`minimise="peak"`) keeps the cut,
option and pair (or count) families, drops memory[r] and the time rows, and minimises a
continuous `peak` with peak[r]: memory of rank r <= peak; that peak is
`InfeasibleProblem.min_peak_bytes` (both formulations have the same plans, so the same peak).
Times and peaks of the returned plan are recomputed with the cost model, never read off the
solver. `solve_pipeline_brute_force` (`solvers.pipeline_brute_force`) enumerates every plan and
is the reference in tests.
"""

from __future__ import annotations

import dataclasses
import math
import time

from solvers.backend import SolverResult, highs_within_tolerance, pick_solver, run_solver
from solvers.pipeline_dp import solve_cut_dp
from solvers.pipeline_layers import PipelineIlp, build_pipeline_ilp, read_layers_plan
from solvers.pipeline_problem import (
    PipelineProblem,
    PipelineSolution,
    even_plan,
    infeasible_cut_error,
    layer_runs,
    score_stages,
    solution_from_plan,
    stage_costs,
)
from solvers.pipeline_runs import RunsIlp, build_pipeline_runs_ilp, read_runs_plan
from solvers.problem import NoPlanBelowCutoff, NoSolutionFound

__all__ = ["FORMULATIONS", "read_pipeline_solution", "solve_pipeline"]

FORMULATIONS = ("auto", "layers", "runs")


def solve_pipeline(
    problem: PipelineProblem,
    *,
    solver: str = "highs",
    time_limit_s: float | None = None,
    gap: float | None = None,
    msg: bool = False,
    formulation: str = "auto",
    cutoff_s: float | None = None,
) -> PipelineSolution:
    """Cut layers into stages and pick each layer's option, minimising step time (exact ILP).

    Parameters
    ----------
    problem : PipelineProblem
    solver : {"highs", "cbc"}
        HiGHS through highspy (falls back to CBC with a warning when it is missing), or CBC.
    time_limit_s : float, optional
        Wall-clock limit per solve; a solve that stops early returns its best plan with status
        "feasible" and its relative gap.
    gap : float, optional
        Relative MIP gap at which to stop; default 0 (prove optimality).
    msg : bool
        Print the solver's log.
    formulation : {"auto", "layers", "runs"}
        "layers": the per-layer model (`solvers.pipeline_layers`); "runs": the count model over
        runs of identical layers (`solvers.pipeline_runs`), which has the same optimum and proves it
        much faster on deep stacks of equal blocks; "auto" (default) answers the cut alone (one
        option a layer, no budget, also the relaxation) by the DP of `solvers.pipeline_dp`
        where it applies (the solution's `solver` is then "dp"), and otherwise takes "runs" when
        two adjacent layers are identical and "layers" otherwise.
    cutoff_s : float, optional
        A step time the caller already has a plan for. With HiGHS the solve prunes every plan
        not below it: when it proves none is, NoPlanBelowCutoff is raised (often in a fraction
        of the time the optimum's proof takes); a plan below it is returned as without it
        (optimal, or feasible with its gap at the time limit), and found sooner (GPT-3 with
        192 blocks on 32 interleaved stages: proven in 12 s, not in 20 s without); when HiGHS
        stops on a plan at or above it, the plain solve follows. CBC ignores it.

    Returns
    -------
    PipelineSolution
        Times and peaks recomputed from the plan with the cost model (`solvers.pipeline_problem`).

    Raises
    ------
    InfeasibleProblem
        No plan fits `memory_budget_bytes`; `min_peak_bytes` is the smallest max-rank peak.
    NoSolutionFound
        The time limit passed before any plan was found.
    NoPlanBelowCutoff
        (a NoSolutionFound) no plan that fits has a step below `cutoff_s`.
    ValueError
        The problem is invalid, or `solver` or `formulation` is unknown.

    Examples
    --------
    >>> from solvers.pipeline_problem import Layer, LayerOption
    >>> one = (LayerOption(name="none", fwd_s=1.0, bwd_s=2.0, activation_bytes=0.0),)
    >>> p = PipelineProblem(
    ...     layers=tuple(
    ...         Layer(name=n, options=one, state_bytes=0.0, boundary_bytes=0.0) for n in "abcd"
    ...     ),
    ...     num_stages=2, num_microbatches=4, in_flight=(2, 1),
    ... )
    >>> sol = solve_pipeline(p)
    >>> sol.stages, sol.step_time_s, sol.status
    ((('a', 'b'), ('c', 'd')), 30.0, 'optimal')
    """
    start = time.perf_counter()
    problem.validate()
    solver = pick_solver(solver)
    if formulation == "auto":
        plan = solve_cut_dp(problem)
        if plan is not None:
            return _dp_solution(problem, plan, cutoff_s, start)
    relaxed = _fastest_unbounded(problem)
    if relaxed is not None:
        sol = _solve_relaxed(problem, relaxed, solver=solver, time_limit_s=time_limit_s,
                             msg=msg, formulation=formulation, cutoff_s=cutoff_s, start=start)
        if sol is not None:
            return sol
    formulation = _pick_formulation(problem, formulation)
    if solver == "highs":
        sol = _solve_below(problem, formulation, cutoff_s, time_limit_s, gap, msg, start)
        if sol is not None:
            return sol
    ilp = _build(problem, formulation, minimise="time")
    result = highs_within_tolerance(
        ilp, run_solver(ilp, solver=solver, time_limit_s=time_limit_s, gap=gap, msg=msg)
    )
    if result.status == "infeasible":
        raise _min_peak_error(
            problem, formulation, solver=solver, time_limit_s=time_limit_s, msg=msg
        )
    if result.status == "no_solution":
        raise NoSolutionFound(
            f"{solver} found no stage cut within time_limit_s={time_limit_s}; raise the limit"
        )
    return read_pipeline_solution(problem, ilp, result, start=start)


def _dp_solution(problem, plan, cutoff_s, start) -> PipelineSolution:
    """The optimum the DP found, or NoPlanBelowCutoff when it is not below the caller's cutoff
    (as HiGHS proves it)."""
    sol = solution_from_plan(problem, *plan, status="optimal", gap=0.0, solver="dp", start=start)
    if cutoff_s is not None and sol.step_time_s >= cutoff_s:
        raise NoPlanBelowCutoff(f"no stage cut fits with a step below {cutoff_s:.6g} s")
    return sol


def _fastest_unbounded(problem: PipelineProblem) -> PipelineProblem | None:
    """The problem with every layer on its fastest option (least memory among equally fast
    ones) and no memory budget; None when that is the problem itself."""
    if math.isinf(problem.memory_budget_bytes) and all(len(x.options) == 1 for x in problem.layers):
        return None
    fastest = tuple(
        dataclasses.replace(x, options=(min(x.options, key=lambda o: (o.fwd_s + o.bwd_s,
                                                                       o.activation_bytes)),))
        for x in problem.layers)
    return dataclasses.replace(problem, layers=fastest, memory_budget_bytes=math.inf)


def _solve_relaxed(problem, relaxed, *, solver, time_limit_s, msg, formulation, cutoff_s,
                   start) -> PipelineSolution | None:
    """The optimum of `problem` read off its relaxation `relaxed` (`_fastest_unbounded`), or
    None when the relaxation cannot tell.

    Why it is exact: the step b * sum_s T_s + (m - b) * max_r T_rank_r (0 <= b <= m) never
    falls when an option gets slower, so no plan of `problem` beats the relaxation's optimum;
    when that optimum's plan fits the budget it is a plan of `problem`, hence its optimum.
    When memory does not bind, the small model (one option a layer, no memory rows) is proven
    far sooner: Swin-L's 29 layers on 8 stages of one microbatch, 0.2 s against 5-6 s. No
    relaxed plan below the caller's cutoff means no plan of `problem` below it either."""
    try:
        sol = solve_pipeline(relaxed, solver=solver, time_limit_s=time_limit_s, msg=msg,
                             formulation=formulation, cutoff_s=cutoff_s)
    except NoPlanBelowCutoff:  # a NoSolutionFound, but a proof: none of `problem`'s either
        raise
    except NoSolutionFound:
        return None
    if sol.status != "optimal" or max(sol.peak_memory_bytes) > problem.memory_budget_bytes:
        return None
    # its options are `problem`'s own, so its times and peaks are `problem`'s too
    return dataclasses.replace(sol, solve_time_s=time.perf_counter() - start)


# The even plan's step is raised by this much (relative) before it bounds a HiGHS solve, so that
# the solver's tolerances cannot prune the even plan itself, or a plan as fast.
_EVEN_SLACK = 1e-5


def _solve_below(problem, formulation, cutoff_s, time_limit_s, gap, msg, start):
    """HiGHS over the plans below a bound: the caller's cutoff or, when lower, the step of a plan
    in hand (first the even plan, `even_plan`), a hair raised. The bound prunes the tree
    (`objective_bound`) and caps every rank's time in the runs model (`rank_time_cap`), which
    keeps a deep run's counts near its even share: GPT-3 with 192 blocks on 32 interleaved
    stages went from 11 s to under 2 s.

    Returns the optimum (or, at the time limit, the best plan found, "feasible"); raises
    NoPlanBelowCutoff when the caller's cutoff is the bound and no plan is below it. HiGHS may
    stop on a plan at or above the bound, which proves nothing: that plan then bounds a second
    solve, the caller's cutoff set aside. None when that proves nothing either, for the plain
    solve.

    Only on deep stacks (`_is_deep`): elsewhere the plain model solves fast, and the caller's
    cutoff only prunes its tree, as before. Why not everywhere: cuts of equal stage-model step
    can differ on the schedule's timeline (which the search prices them by), and bounding the
    model changes which of them HiGHS returns; on the shallow stacks of the golden plans that
    picked a cut 4% slower on the timeline. Choosing among such ties by the timeline is not
    done yet.
    """
    deep = _is_deep(problem)
    held = even_plan(problem) if deep else None  # (step, stages, options) of a plan that fits
    for _ in range(2 if deep else 1):
        own = held[0] * (1.0 + _EVEN_SLACK) if held is not None else math.inf
        bound = min(own, cutoff_s if cutoff_s is not None else math.inf)
        if math.isinf(bound):
            return None
        ilp = _build(problem, formulation, minimise="time", cutoff_s=bound if deep else None)
        result = highs_within_tolerance(ilp, run_solver(
            ilp, solver="highs", time_limit_s=time_limit_s, gap=gap, msg=msg,
            objective_bound=bound / ilp.seconds_per_unit))
        ours = bound == own  # the plan in hand is below the bound: some plan is
        if result.status in ("infeasible", "no_solution"):
            if not ours:
                if result.status == "infeasible":
                    raise NoPlanBelowCutoff(
                        f"no stage cut fits with a step below {cutoff_s:.6g} s")
                raise NoSolutionFound(f"highs found no stage cut below {cutoff_s:.6g} s within "
                                      f"time_limit_s={time_limit_s}")
            if result.status == "infeasible":
                return None  # contradicts the plan in hand: tolerances; the plain solve decides
            return _held_solution(problem, held, start)
        sol = read_pipeline_solution(problem, ilp, result, start=start)
        proven_s = sol.step_time_s * (1.0 - (sol.gap or 0.0))  # HiGHS's dual bound
        if not ours and sol.status == "optimal" and proven_s >= bound:
            # an optimum at or above the bound (HiGHS may return one from presolve) proves
            # that no plan is below the caller's cutoff
            raise NoPlanBelowCutoff(f"no stage cut fits with a step below {cutoff_s:.6g} s")
        if ours and sol.status != "optimal" and held[0] < sol.step_time_s:
            return _held_solution(problem, held, start)  # stopped early on a slower plan
        if sol.step_time_s < bound:  # the best of the plans below the bound: of all
            return sol
        held = (sol.step_time_s, *_read_plan(problem, ilp))
        cutoff_s = None  # nothing was found below it, and nothing proven: bound by `held` now
    return None


# A run of at least this many identical layers makes a stack deep (`_solve_below`): GPT-3's 96.
_DEEP_RUN = 48


def _is_deep(problem: PipelineProblem) -> bool:
    return max(run.size for run in layer_runs(problem.layers)) >= _DEEP_RUN


def _held_solution(problem, held, start) -> PipelineSolution:
    """A plan in hand that no solve has proven optimal."""
    return solution_from_plan(problem, held[1], held[2], status="feasible", gap=None,
                              solver="highs", start=start)


def _pick_formulation(problem: PipelineProblem, formulation: str) -> str:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if formulation == "auto":
        # Without a repeated layer the runs model is the per-layer model in other clothes, and
        # the per-layer one is the longer-tested reference.
        repeats = len(layer_runs(problem.layers)) < len(problem.layers)
        return "runs" if repeats else "layers"
    return formulation


def _build(problem: PipelineProblem, formulation: str, *, minimise: str,
           cutoff_s: float | None = None) -> PipelineIlp | RunsIlp:
    if formulation == "runs":
        return build_pipeline_runs_ilp(problem, minimise=minimise, cutoff_s=cutoff_s)
    return build_pipeline_ilp(problem, minimise=minimise)


def _min_peak_error(
    problem: PipelineProblem,
    formulation: str,
    *,
    solver: str,
    time_limit_s: float | None,
    msg: bool,
) -> Exception:
    """The InfeasibleProblem to raise, with the smallest max-rank peak from a second ILP.

    Both formulations have the same plans, so their peak ILPs have the same optimum.
    """
    ilp = _build(problem, formulation, minimise="peak")
    result = run_solver(ilp, solver=solver, time_limit_s=time_limit_s, gap=None, msg=msg)
    if result.status in ("infeasible", "no_solution"):  # cannot be infeasible: S <= L
        return NoSolutionFound(
            f"no stage cut fits the memory budget of {problem.memory_budget_bytes:.0f} bytes per "
            f"rank, and {solver} found no plan to report the smallest peak within "
            f"time_limit_s={time_limit_s}"
        )
    stages, options = _read_plan(problem, ilp)
    _, peak_bytes = score_stages(problem, *stage_costs(problem, stages, options))
    return infeasible_cut_error(problem, max(peak_bytes))


def _read_plan(
    problem: PipelineProblem, ilp: PipelineIlp | RunsIlp
) -> tuple[tuple[tuple[int, ...], ...], list[int]]:
    """Stages (layer indices) and option indices from a solved model (either formulation)."""
    if isinstance(ilp, RunsIlp):
        return read_runs_plan(ilp, problem)
    return read_layers_plan(ilp, problem)


def read_pipeline_solution(
    problem: PipelineProblem, ilp: PipelineIlp | RunsIlp, result: SolverResult, *, start: float
) -> PipelineSolution:
    """The PipelineSolution of a solved `ilp`; times and peaks recomputed from the plan."""
    stages, options = _read_plan(problem, ilp)
    return solution_from_plan(
        problem,
        stages,
        options,
        status=result.status,
        gap=result.gap,
        solver=result.solver,
        start=start,
    )
