r"""Intra-op sharding as an integer linear program (Alpa, OSDI'22, section 4.2).

Each node picks one strategy; each edge pays the resharding cost of the pair its ends picked;
every program point must fit the per-device memory budget. The model, family by family:

Sets
    V: node groups. Tied nodes (`ShardingProblem.ties`) form one group and share one vector, so
    solve time does not grow with the number of repeated layers; an untied node is its own group.
    S_v: the strategies of group v. E: the edges. P: the memory points, L(p) the nodes live at p.
    g(n): the group of node n.

Variables
    s[v,i] in {0,1}        group v takes strategy i.                   (`_add_strategy_vars`)
    e[u,v,i,j] in [0,1]    edge (u,v) uses pair (i,j), only for finite cost pairs. (`_add_edges`)
        Continuous is enough: with s one-hot, row i* of e must sum to 1 and every other row to
        0, and column j* likewise, so e[i*,j*] = 1 and every other entry is 0 -- integral.
        A forbidden pair (cost inf) has no variable, so choosing it leaves row i* unable to sum
        to 1 and is infeasible.

Objective                                                         (`_set_time_objective`)
    min  sum_n sum_i s[g(n),i] * cost_n[i]  +  sum_(u,v) sum_(i,j) e[u,v,i,j] * cost_uv[i,j]
    An edge whose ends are in the same group has no e: it adds cost_uv[i,i] to s[g,i].
    Coefficients are divided by the largest one, so the solver sees numbers in [0, 1].

Constraints
    one_strategy[v]:   sum_i s[v,i] = 1                                (`_add_strategy_vars`)
    forbidden[v][i]:   s[v,i] = 0 where a member's cost_n[i] is inf    (`_add_strategy_vars`;
                       as a variable bound, so it has no row name)
    edge_row[u->v][i]: sum_j e[u,v,i,j] = s[g(u),i]                    (`_add_edges`)
    edge_col[u->v][j]: sum_i e[u,v,i,j] = s[g(v),j]                    (`_add_edges`)
    memory[p]:         sum_(n in L(p)) sum_i s[g(n),i] * mem_n[i] <= budget   (`_add_memory`)

When no choice fits, a second ILP finds the smallest peak (`_set_peak_objective`): the same
strategy and edge families (so forbidden pairs stay forbidden), no memory[p] rows, a continuous
`peak`, rows peak[p]: sum_(n in L(p)) sum_i s[g(n),i] * mem_n[i] <= peak, and objective min peak.
That peak is reported in `InfeasibleProblem.min_peak_bytes`.

Names in brackets above are written with parentheses in the model (pulp rewrites brackets), e.g.
`one_strategy(mm_1)`, `edge_row(mm_1,relu_2)(0)`, `memory(relu_2)`; names are reduced to
letters, digits, `_` and `.` and made unique (`.2`, `.3`; a repeated edge gets `#2`). A memory
point that fits whatever is chosen gets no row.

The three steps are `build_intra_op_ilp`, `run_solver` (`solvers.backend`, shared with the stage-cut
ILPs) and `read_solution`; `solve_intra_op` runs them in order. Before them it tries the problem
without its memory rows (`solvers.reduction`: exact graph reduction, then this ILP on the small
core that is left): that relaxation's optimum is the problem's whenever it fits the budget, and on
a transformer's graph it leaves a core of a few nodes (GPT-3's stand-in: 6 of 78 groups), so most
solves of a search take milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import pulp

from solvers.backend import SolverResult, pick_solver, pulp_names, run_solver
from solvers.problem import (
    InfeasibleProblem,
    Node,
    NoSolutionFound,
    ShardingProblem,
    Solution,
    evaluate,
    infeasible_error,
    tie_groups,
)
from solvers.reduction import solve_without_memory

__all__ = [
    "IntraOpIlp",
    "build_intra_op_ilp",
    "read_solution",
    "smallest_peak",
    "solve_intra_op",
]


@dataclass
class IntraOpIlp:
    """A built pulp model and the maps needed to read its answer."""

    lp: pulp.LpProblem
    group_of: dict[str, str]  # node name -> group representative
    strategy_vars: dict[str, list[pulp.LpVariable]] = field(default_factory=dict)  # rep -> s


def solve_intra_op(
    problem: ShardingProblem,
    *,
    solver: str = "highs",
    time_limit_s: float | None = None,
    gap: float | None = None,
    msg: bool = False,
) -> Solution:
    """Choose one strategy per node minimising time under the memory budget.

    Parameters
    ----------
    problem : ShardingProblem
    solver : {"highs", "cbc"}
        HiGHS through highspy (falls back to CBC with a warning when highspy is missing), or the
        CBC that ships with pulp.
    time_limit_s : float, optional
        Wall-clock limit per solve. A solve that stops early returns its best plan with status
        "feasible" and the relative gap.
    gap : float, optional
        Relative MIP gap at which to stop; default 0 (prove optimality).
    msg : bool
        Print the solver's log.

    Returns
    -------
    Solution
        `objective_s` and `peak_memory_bytes` are recomputed from the choices with `evaluate`.

    Raises
    ------
    InfeasibleProblem
        No choice fits `memory_budget_bytes` (or every choice uses a forbidden pair).
    NoSolutionFound
        The time limit passed before any plan was found.
    ValueError
        The problem is invalid, or `solver` is unknown.

    Examples
    --------
    >>> from solvers.problem import Edge, Node
    >>> p = ShardingProblem(
    ...     nodes=(
    ...         Node(name="a", costs_s=(1.0, 3.0), memory_bytes=(0.0, 0.0)),
    ...         Node(name="b", costs_s=(3.0, 1.0), memory_bytes=(0.0, 0.0)),
    ...     ),
    ...     edges=(Edge(src="a", dst="b", costs_s=((0.0, 5.0), (5.0, 0.0))),),
    ... )
    >>> sol = solve_intra_op(p)
    >>> sol.choices, sol.objective_s, sol.status
    ({'a': 0, 'b': 0}, 4.0, 'optimal')
    """
    start = time.perf_counter()
    problem.validate()
    solver = pick_solver(solver)
    if not problem.nodes:
        return Solution(
            choices={},
            objective_s=0.0,
            peak_memory_bytes=0.0,
            status="optimal",
            gap=0.0,
            solver=solver,
            solve_time_s=time.perf_counter() - start,
        )
    if not gap:  # first without memory rows, by exact reduction: optimal when it fits
        try:
            relaxed = solve_without_memory(
                problem, lambda core: _solve_ilp(core, solver, time_limit_s, gap, msg))
        except (InfeasibleProblem, NoSolutionFound):  # the full ILP says which, and why
            relaxed = None
        if relaxed is not None:
            return dataclasses.replace(relaxed, solver=solver,
                                       solve_time_s=time.perf_counter() - start)
    return _solve_ilp(problem, solver, time_limit_s, gap, msg, start)


def _solve_ilp(problem: ShardingProblem, solver: str, time_limit_s: float | None,
               gap: float | None, msg: bool, start: float | None = None) -> Solution:
    """The ILP of the module docstring, built, solved and read."""
    start = time.perf_counter() if start is None else start
    ilp = build_intra_op_ilp(problem)
    result = run_solver(ilp, solver=solver, time_limit_s=time_limit_s, gap=gap, msg=msg)
    if result.status == "infeasible":
        raise _infeasible(problem, solver=solver, time_limit_s=time_limit_s, msg=msg)
    if result.status == "no_solution":
        raise NoSolutionFound(
            f"{solver} found no sharding within time_limit_s={time_limit_s}; raise the limit"
        )
    return read_solution(problem, ilp, result, solve_time_s=time.perf_counter() - start)


def _infeasible(
    problem: ShardingProblem, *, solver: str, time_limit_s: float | None, msg: bool
) -> Exception:
    """The InfeasibleProblem to raise, with the smallest peak from a second ILP."""
    try:
        min_peak_bytes = smallest_peak(problem, solver=solver, time_limit_s=time_limit_s, msg=msg)
    except (InfeasibleProblem, NoSolutionFound) as e:
        return e
    return infeasible_error(min_peak_bytes, problem.memory_budget_bytes)


def smallest_peak(
    problem: ShardingProblem,
    *,
    solver: str = "highs",
    time_limit_s: float | None = None,
    msg: bool = False,
) -> float:
    """The smallest peak bytes of any sharding, whatever it costs in time (the budget is not
    used): the ILP with `minimise="peak"`. The search asks it directly for the fastest of the
    least-memory shardings, instead of first proving that a budget of 0 does not fit.

    Raises InfeasibleProblem (with min_peak_bytes inf) when every choice uses a forbidden
    strategy or pair, and NoSolutionFound when the time limit passes first.
    """
    problem.validate()
    solver = pick_solver(solver)
    if not problem.nodes:
        return 0.0
    ilp = build_intra_op_ilp(problem, minimise="peak")
    result = run_solver(ilp, solver=solver, time_limit_s=time_limit_s, gap=None, msg=msg)
    if result.status == "infeasible":
        raise infeasible_error(math.inf, problem.memory_budget_bytes)
    if result.status == "no_solution":
        raise NoSolutionFound(
            f"{solver} found no sharding to report the smallest peak within "
            f"time_limit_s={time_limit_s}"
        )
    _, min_peak_bytes = evaluate(problem, _read_choices(ilp))
    return min_peak_bytes


# ---------------------------------------------------------------------------------------------
# Build


def build_intra_op_ilp(problem: ShardingProblem, *, minimise: str = "time") -> IntraOpIlp:
    """Build the pulp model of the module docstring.

    `minimise="time"` gives the sharding ILP (objective: seconds; memory[p] rows). `"peak"` gives
    the smallest-peak ILP (objective: the peak; no budget).
    """
    if minimise not in ("time", "peak"):
        raise ValueError(f"minimise must be 'time' or 'peak', got {minimise!r}")
    lp = pulp.LpProblem(
        "intra_op_sharding" if minimise == "time" else "intra_op_min_peak", pulp.LpMinimize
    )
    ilp = IntraOpIlp(lp=lp, group_of=tie_groups(problem))
    names = [node.name for node in problem.nodes]
    tokens = dict(zip(names, pulp_names(names)))
    _add_strategy_vars(ilp, problem, tokens)
    edge_costs = _add_edges(ilp, problem, tokens)
    if minimise == "time":
        _set_time_objective(ilp, problem, edge_costs)
        _add_memory(ilp, problem)
    else:
        _set_peak_objective(ilp, problem)
    return ilp


def _add_strategy_vars(ilp: IntraOpIlp, problem: ShardingProblem, tokens: dict[str, str]) -> None:
    """s[v,i] binaries, one_strategy[v] rows, and forbidden strategies fixed to 0."""
    forbidden: dict[str, set[int]] = {}
    for node in problem.nodes:
        rep = ilp.group_of[node.name]
        forbidden.setdefault(rep, set()).update(
            i for i, cost in enumerate(node.costs_s) if math.isinf(cost)
        )
    for node in problem.nodes:
        if ilp.group_of[node.name] != node.name:
            continue
        tok = tokens[node.name]
        s = [
            ilp.lp.add_variable(
                f"s({tok},{i})",
                lowBound=0,
                upBound=0 if i in forbidden[node.name] else 1,
                cat=pulp.LpInteger,
            )
            for i in range(node.num_strategies)
        ]
        ilp.strategy_vars[node.name] = s
        ilp.lp += (pulp.lpSum(s) == 1, f"one_strategy({tok})")


def _add_edges(
    ilp: IntraOpIlp, problem: ShardingProblem, tokens: dict[str, str]
) -> dict[pulp.LpVariable, float]:
    """e[u,v,i,j] for finite pairs with edge_row / edge_col rows; returns the edge costs as
    objective coefficients (variable -> seconds; a plain dict, not pulp expressions, which cost
    more to build than the model's rows on large graphs).

    An edge inside one tie group needs no e: its ends share s, so it costs cost[i][i] * s[g,i],
    and a forbidden diagonal entry fixes s[g,i] to 0.
    """
    coefs: dict[pulp.LpVariable, float] = {}
    seen: dict[tuple[str, str], int] = {}
    for edge in problem.edges:
        pair = (edge.src, edge.dst)
        seen[pair] = seen.get(pair, 0) + 1
        tok = f"{tokens[edge.src]},{tokens[edge.dst]}"
        if seen[pair] > 1:
            tok += f"#{seen[pair]}"
        s_src = ilp.strategy_vars[ilp.group_of[edge.src]]
        s_dst = ilp.strategy_vars[ilp.group_of[edge.dst]]
        if s_src is s_dst:
            for i, var in enumerate(s_src):
                cost = edge.costs_s[i][i]
                if math.isinf(cost):
                    var.upBound = 0
                elif cost:
                    coefs[var] = coefs.get(var, 0.0) + cost
            continue
        e = {
            (i, j): ilp.lp.add_variable(f"e({tok},{i},{j})", lowBound=0, upBound=1)
            for i, row in enumerate(edge.costs_s)
            for j, cost in enumerate(row)
            if not math.isinf(cost)
        }
        rows: list[list[pulp.LpVariable]] = [[] for _ in s_src]
        cols: list[list[pulp.LpVariable]] = [[] for _ in s_dst]
        for (i, j), var in e.items():
            rows[i].append(var)
            cols[j].append(var)
            if edge.costs_s[i][j]:
                coefs[var] = edge.costs_s[i][j]
        for i, (row, s) in enumerate(zip(rows, s_src)):
            ilp.lp += (pulp.lpSum(row) == s, f"edge_row({tok})({i})")
        for j, (col, s) in enumerate(zip(cols, s_dst)):
            ilp.lp += (pulp.lpSum(col) == s, f"edge_col({tok})({j})")
    return coefs


def _set_time_objective(
    ilp: IntraOpIlp, problem: ShardingProblem, coefs: dict[pulp.LpVariable, float]
) -> None:
    """min node costs + edge costs (`coefs`, from `_add_edges`), scaled so the largest
    coefficient is 1."""
    coefs = dict(coefs)
    for node in problem.nodes:
        s = ilp.strategy_vars[ilp.group_of[node.name]]
        for cost, var in zip(node.costs_s, s):
            if cost and not math.isinf(cost):
                coefs[var] = coefs.get(var, 0.0) + cost
    scale = max((abs(c) for c in coefs.values()), default=0.0) or 1.0
    ilp.lp.setObjective(pulp.LpAffineExpression({v: c / scale for v, c in coefs.items()}))


def _live_bytes(
    ilp: IntraOpIlp, by_name: dict[str, Node], live: tuple[str, ...]
) -> tuple[pulp.LpAffineExpression, float]:
    """The bytes live at a point as an expression of s, and their largest possible value."""
    terms = []
    most_bytes = 0.0
    for name in live:
        s = ilp.strategy_vars[ilp.group_of[name]]
        memory_bytes = by_name[name].memory_bytes
        terms.extend(mem * var for mem, var in zip(memory_bytes, s) if mem)
        most_bytes += max(memory_bytes)
    return pulp.lpSum(terms), most_bytes


def _memory_scale(problem: ShardingProblem) -> float:
    return max((m for node in problem.nodes for m in node.memory_bytes), default=0.0) or 1.0


def _add_memory(ilp: IntraOpIlp, problem: ShardingProblem) -> None:
    """memory[p] rows, in units of the largest memory_bytes entry (numbers near 1).

    A point that fits whatever is chosen gets no row.
    """
    budget = problem.memory_budget_bytes
    if math.isinf(budget):
        return
    scale = _memory_scale(problem)
    by_name = {node.name: node for node in problem.nodes}
    tokens = pulp_names([point.name for point in problem.memory_points])
    for point, tok in zip(problem.memory_points, tokens):
        live, most_bytes = _live_bytes(ilp, by_name, point.live)
        if most_bytes <= budget:
            continue
        ilp.lp += (live / scale <= budget / scale, f"memory({tok})")


def _set_peak_objective(ilp: IntraOpIlp, problem: ShardingProblem) -> None:
    """peak >= live bytes at every point; min peak (in units of the largest memory entry)."""
    scale = _memory_scale(problem)
    peak = ilp.lp.add_variable("peak", lowBound=0)
    by_name = {node.name: node for node in problem.nodes}
    tokens = pulp_names([point.name for point in problem.memory_points])
    for point, tok in zip(problem.memory_points, tokens):
        live, _ = _live_bytes(ilp, by_name, point.live)
        ilp.lp += (live / scale <= peak, f"peak({tok})")
    ilp.lp.setObjective(pulp.lpSum([peak]))


# ---------------------------------------------------------------------------------------------
# Read


def _read_choices(ilp: IntraOpIlp) -> dict[str, int]:
    by_rep = {}
    for rep, s in ilp.strategy_vars.items():
        values = [var.value() or 0.0 for var in s]
        by_rep[rep] = max(range(len(values)), key=lambda i: values[i])
    return {name: by_rep[rep] for name, rep in ilp.group_of.items()}


def read_solution(
    problem: ShardingProblem, ilp: IntraOpIlp, result: SolverResult, *, solve_time_s: float
) -> Solution:
    """The Solution for a solved `ilp`; cost and peak recomputed exactly with `evaluate`."""
    choices = _read_choices(ilp)
    objective_s, peak_bytes = evaluate(problem, choices)
    return Solution(
        choices=choices,
        objective_s=objective_s,
        peak_memory_bytes=peak_bytes,
        status=result.status,
        gap=result.gap,
        solver=result.solver,
        solve_time_s=solve_time_s,
    )
