"""The solver backend every ILP here shares: pick HiGHS or CBC, solve a built pulp model, say
what came of it.

pulp is the modelling layer. HiGHS through highspy is the default solver, the CBC that ships with
pulp the fallback: `pick_solver` checks the name and falls back to CBC, with a warning, when
highspy is missing. `run_solver` solves a model in place under an optional wall-clock limit and
relative MIP gap (default 0: prove optimality) and maps what the solver said to one of four
words, `SolverResult.status`:

    optimal      a plan, proven optimal (relative gap <= 1e-9; the gap is reported as 0.0)
    feasible     a plan, not proven optimal (the time limit or the gap option stopped the search);
                 `gap` is the relative gap where the solver says it, else None
    infeasible   proven to have no plan
    no_solution  stopped (time limit) before it found a plan; the model may be feasible

HiGHS answers with its model status and primal solution status (`_highs_result`). CBC answers
through pulp's solution status and its log: `Result - Stopped ...` means it was cut short and
`Objective value:` / `Lower bound:` give the gap (`_cbc_result`); a CBC run that reached the time
limit is never called infeasible, since its preprocessing says so when cut short.
`highs_within_tolerance` lets a caller accept HiGHS's own optimality tolerance instead of 1e-9
(the stage-cut ILPs, whose continuous variables leave a residual gap near 1e-7).

`pulp_names` makes the readable, unique, pulp-safe tokens that name variables and rows, so a
solver log reads `memory(relu_2)`, not `_C17`.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Protocol

import pulp

__all__ = [
    "HIGHS_OPTIMAL_GAP",
    "SOLVERS",
    "BuiltModel",
    "SolverResult",
    "highs_within_tolerance",
    "pick_solver",
    "pulp_names",
    "run_solver",
]

SOLVERS = ("highs", "cbc")
HIGHS_OPTIMAL_GAP = 1e-6  # a kOptimal HiGHS solve with a smaller residual gap is optimal


class BuiltModel(Protocol):
    """A built model (`IntraOpIlp`, `PipelineIlp`, `RunsIlp`): `run_solver` solves its `lp`."""

    lp: pulp.LpProblem


@dataclass(frozen=True)
class SolverResult:
    """What the solver said: 'optimal', 'feasible', 'infeasible' or 'no_solution', and the gap."""

    status: str
    gap: float | None
    solver: str


def pick_solver(solver: str) -> str:
    """`solver` if it is known and available; "cbc" (with a warning) for "highs" without highspy.

    ValueError when `solver` is not one of `SOLVERS`. The warning points at the caller of the
    function that calls this one (`solve_intra_op`, `solve_pipeline`).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "highs" and not pulp.HiGHS(msg=False).available():
        warnings.warn("HiGHS (highspy) is not available; falling back to CBC", stacklevel=3)
        return "cbc"
    return solver


# Objectives are scaled so the largest coefficient is 1, and a plan's coefficients span many
# orders (a layer's collective to one elementwise op): at HiGHS's default tolerances (1e-6 on
# integrality, 1e-7 on primal and dual feasibility) it called plans optimal that were up to
# 1.6e-5 worse than the optimum on GPT-3 1.3B's 64-GPU intra-op ILPs
# (docs/benchmarks/2026-12-05-highs-vs-cbc/).
HIGHS_TOLERANCES = {"mip_feasibility_tolerance": 1e-10, "primal_feasibility_tolerance": 1e-10,
                    "dual_feasibility_tolerance": 1e-10}


def run_solver(
    ilp: BuiltModel, *, solver: str, time_limit_s: float | None, gap: float | None, msg: bool,
    objective_bound: float | None = None,
) -> SolverResult:
    """Solve `ilp.lp` in place with HiGHS (highspy) or CBC; say what came of it.

    `objective_bound` (HiGHS only; in the model's objective units): plans whose objective is not
    below it are pruned, so that "infeasible" then means no plan beats it, a proof HiGHS often
    finds in a fraction of the time of the optimum's (the search's stage cuts against its best
    plan so far)."""
    rel_gap = 0.0 if gap is None else gap
    if solver == "highs":
        bound = {} if objective_bound is None else {"objective_bound": objective_bound}
        backend = pulp.HiGHS(msg=msg, timeLimit=time_limit_s, gapRel=rel_gap, gapAbs=0.0,
                             **HIGHS_TOLERANCES, **bound)
        ilp.lp.solve(backend)
        return _highs_result(ilp.lp)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        with warnings.catch_warnings():
            # pulp 3.3 deprecates its bundled CBC (PULP_CBC_CMD) in favour of a separately
            # installed one, and warns that logPath replaces msg; neither is the caller's doing.
            warnings.simplefilter("ignore")
            backend = pulp.PULP_CBC_CMD(
                msg=False,
                timeLimit=time_limit_s,
                gapRel=rel_gap,
                gapAbs=0.0,
                threads=1,
                logPath=log_path,
            )
            began = time.perf_counter()
            ilp.lp.solve(backend)
            # CBC's preprocessing says "infeasible" when the limit cuts it short: distrust it then.
            hit_limit = time_limit_s is not None and time.perf_counter() - began >= time_limit_s
        with open(log_path) as f:
            log = f.read()
    if msg:
        print(log)
    return _cbc_result(ilp.lp, log, gap, hit_limit=hit_limit)


def _highs_result(lp: pulp.LpProblem) -> SolverResult:
    import highspy  # only once HiGHS has run: without highspy the solver is CBC

    model = lp.solverModel
    status = model.getModelStatus()
    info = model.getInfo()
    if status in (
        highspy.HighsModelStatus.kInfeasible,
        highspy.HighsModelStatus.kUnboundedOrInfeasible,
    ):
        return SolverResult("infeasible", None, "highs")
    if info.primal_solution_status != 2:  # kSolutionStatusFeasible
        return SolverResult("no_solution", None, "highs")
    mip_gap = info.mip_gap if math.isfinite(info.mip_gap) else None
    if status == highspy.HighsModelStatus.kOptimal and (mip_gap is None or mip_gap <= 1e-9):
        return SolverResult("optimal", 0.0, "highs")
    return SolverResult("feasible", mip_gap, "highs")


def _cbc_result(
    lp: pulp.LpProblem, log: str, gap: float | None, *, hit_limit: bool
) -> SolverResult:
    result_line = re.search(r"Result - (.*)", log)
    stopped = hit_limit or (result_line is not None and "Stopped" in result_line.group(1))
    if lp.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        if lp.sol_status == pulp.LpSolutionOptimal and not stopped:
            proven_gap = _cbc_gap(log) if gap else 0.0  # a gap option may stop CBC early
            if proven_gap is not None and proven_gap <= 1e-9:
                return SolverResult("optimal", 0.0, "cbc")
            return SolverResult("feasible", proven_gap, "cbc")
        return SolverResult("feasible", _cbc_gap(log), "cbc")
    if lp.status == pulp.LpStatusInfeasible and not stopped:
        return SolverResult("infeasible", None, "cbc")
    return SolverResult("no_solution", None, "cbc")


def _cbc_gap(log: str) -> float | None:
    """Relative gap from CBC's closing lines `Objective value:` and `Lower bound:`, if printed."""
    objective = re.search(r"Objective value:\s+(\S+)", log)
    bound = re.search(r"Lower bound:\s+(\S+)", log)
    if not (objective and bound):
        return None
    try:
        obj, low = float(objective.group(1)), float(bound.group(1))
    except ValueError:
        return None
    return abs(obj - low) / max(abs(obj), 1e-12)


def highs_within_tolerance(
    ilp: BuiltModel, result: SolverResult, *, tolerance: float = HIGHS_OPTIMAL_GAP
) -> SolverResult:
    """Call a HiGHS solve "optimal" when HiGHS says so with a gap within `tolerance`.

    `run_solver` wants a gap <= 1e-9 for "optimal"; HiGHS, asked for gap 0, prunes nodes whose
    LP bound is within its dual feasibility tolerance (1e-7) of the incumbent and stops at
    kOptimal with a residual gap near 1e-7 (continuous variables such as the stage-cut ILPs'
    t_max make that common). The residual is kept in `gap`. Any other result is returned as is.
    """
    if result.solver != "highs" or result.status != "feasible" or result.gap is None:
        return result
    import highspy  # only for a HiGHS result, which means highspy is there

    if ilp.lp.solverModel.getModelStatus() == highspy.HighsModelStatus.kOptimal:
        if result.gap <= tolerance:
            return SolverResult("optimal", result.gap, "highs")
    return result


def _token(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)[:64]


def pulp_names(names: list[str]) -> list[str]:
    """Readable, unique, pulp-safe tokens for `names`, in order (repeats get `.2`, `.3`, ...).

    Each is the name with every character but letters, digits, `_` and `.` replaced by `_`, cut
    to 64 characters.

    Examples
    --------
    >>> pulp_names(["layers.0/mm", "layers.0[mm]", "a b"])
    ['layers.0_mm', 'layers.0_mm_', 'a_b']
    >>> pulp_names(["x", "x", "x"])
    ['x', 'x.2', 'x.3']
    """
    out: list[str] = []
    used: set[str] = set()
    for name in names:
        tok, k = _token(name), 1
        while tok in used:
            k += 1
            tok = f"{_token(name)}.{k}"
        used.add(tok)
        out.append(tok)
    return out
