r"""The stage-cut model over runs of identical layers: counts instead of one variable per layer.

A deep model is mostly runs of identical layers (96 equal transformer blocks between an embedding
and a head). Two layers are identical (`same_kind`) when they have the same options, state bytes
and boundary bytes; which of them a stage holds, and which of them is checkpointed, changes
neither time nor memory: only how many does. The per-layer ILP (`solvers.pipeline_layers`) has
one binary per (layer, stage) and per (layer, option), so branch-and-bound wades through the many
equal-cost copies of each plan (it cannot prove optimality for ~100 blocks on 16+ stages); this
model keeps one integer per (stage, run) and per (stage, run, option) and has none of those copies.
Same plans, same optimum; `solve_pipeline(formulation="auto")` uses it when two adjacent layers
are identical.

Sets
    Runs j = 0..J-1 in layer order: n_j adjacent identical layers (the first at index first_j),
    options K_j. Stages s = 0..S-1; a stage's layers are a suffix of one run, whole runs, then a
    prefix of another (or a slice of one run).

Variables (the model object names them `cum`, `end` and `count`)
    C[s,j] in {0..n_j}   layers of run j in stages 0..s, for s < S-1 (C[-1,j] := 0, C[S-1,j] := n_j
                         are constants: every layer is in some stage).
    e[s,j] in {0,1}      the last layer of stage s is in run j, for s < S-1.
    z[s,j,k] in {0..n_j} layers of run j in stage s that run option k.

Constraints
    one_end[s]:     sum_j e[s,j] = 1
    done[s,j]:      C[s,j] >= n_j * E[s,j+1]        with E[s,j] = sum_(j' >= j) e[s,j']
    started[s,j]:   C[s,j] >= e[s,j]
    untouched[s,j]: C[s,j] <= n_j * E[s,j]
        With e[s,j*] = 1 these say C[s,j] = n_j for j < j*, 1 <= C[s,j*] <= n_j*, C[s,j] = 0 for
        j > j*: C[s,.] counts exactly the first P_(s+1) = sum_j C[s,j] layers, and layer
        P_(s+1) - 1, the last of stage s, is in run j*.
    take[s,j]:      sum_k z[s,j,k] = C[s,j] - C[s-1,j]
    non_empty[s]:   sum_(j,k) z[s,j,k] >= 1
        So 0 = P_0 < P_1 < ... < P_S = L: stage s is the layers P_s .. P_(s+1) - 1, and z[s,j,.]
        splits the layers of run j in it among the options.

Every integer solution is a contiguous cut into S non-empty stages with an option per layer
(stage s, run j: the first z[s,j,0] of its layers there run option 0, the next z[s,j,1] option 1,
...), and every cut with options gives one solution (its counts). The two have the same cost:

    T_s      = sum_(j,k) (fwd_s + bwd_s of option k of run j) * z[s,j,k]
               + [s < S-1] * (p2p_latency_s + p2p_s_per_byte * sum_j boundary_bytes_j * e[s,j])
    memory_s = sum_(j,k) (state_bytes_j + in_flight[s] * activation_bytes_(j,k)) * z[s,j,k]
               + [s > 0] * in_flight[s] * sum_j carry_bytes_j * e[s-1,j]

(layers of one run share boundary and carry bytes, so the send after stage s, and what the next
stage holds of it, depend only on the run that ends it).

Objective and rows over ranks (`build_pipeline_runs_ilp`, from `solvers.pipeline_ranks`, the same
as the per-layer model's): t_max >= 0,
    min  b * sum_s T_s  +  (m - b) * t_max
    rank_time[r]:   sum_(s on r) T_s <= t_max
    memory[r]:      sum_(s on r) memory_s <= budget
and with `minimise="peak"` peak[r]: sum_(s on r) memory_s <= peak, min peak, instead.

Bounds: the last layer of stage s is at index P_(s+1) - 1 in s .. L-S+s (every stage before and
after needs a layer), so C[s,j] is bounded by where run j lies against that range and e[s,j] is
fixed to 0 for runs entirely outside it.

Rank bounds (`add_rank_bounds`; time model only): valid rows, satisfied by every plan, that tell
the LP each rank's least time for the number of layers of a run it holds within the memory budget
(`fastest_fill`). Without them a tight budget on interleaved ranks leaves the bound a few
percent under the optimum for many minutes; with them GPT-3's 96 blocks on 8 x 2 stages are
proven in seconds. Their variables and rows:
    h[r,j,q] in {0,1}  rank r holds q layers of run j (q = 0..n_j)
    one_total[r,j], total[r,j], rank_bound[r,j]             (`add_rank_bounds` states them)

Names in brackets are written with parentheses in the model, e.g. `take(block.0,2)`,
`rank_bound(block.0,0)`. `build_pipeline_runs_ilp` builds the whole model; `read_runs_plan` reads
the cut and options of a solved one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pulp

from solvers.backend import pulp_names
from solvers.pipeline_problem import PipelineProblem, Run, layer_runs
from solvers.pipeline_ranks import (
    add_memory_rows,
    check_minimise,
    rank_memory,
    set_peak_objective,
    set_step_objective,
)

__all__ = [
    "RunsIlp",
    "add_rank_bounds",
    "build_pipeline_runs_ilp",
    "build_runs_model",
    "fastest_fill",
    "read_runs_plan",
    "stage_memory",
    "stage_times",
]

# fastest_fill enumerates option counts; past this many combinations a run gets no rank bound.
_MAX_FILL_COMBINATIONS = 2_000_000
# fastest_fill's budget is this much (relative) larger than the problem's, so that float rounding
# can only weaken a rank bound, never cut off a plan that fits.
_BUDGET_SLACK = 1e-9


@dataclass
class RunsIlp:
    """The pulp model and its variables (`lp` is what `run_solver` solves)."""

    lp: pulp.LpProblem
    runs: tuple[Run, ...]
    cum: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)  # C (s, j)
    end: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)  # e (s, j)
    count: dict[tuple[int, int, int], pulp.LpVariable] = field(default_factory=dict)  # z (s, j, k)
    holds: dict[tuple[int, int, int], pulp.LpVariable] = field(default_factory=dict)  # h (r, j, q)
    seconds_per_unit: float = 1.0  # the time objective's scale (`set_step_objective`)


def build_pipeline_runs_ilp(problem: PipelineProblem, *, minimise: str = "time",
                            cutoff_s: float | None = None) -> RunsIlp:
    """Build the runs model with the objective and rows over ranks of `solvers.pipeline_ranks`.

    Same `minimise` choices as `build_pipeline_ilp`, same optimum, far fewer equal-cost copies
    of each plan when layers repeat. With `cutoff_s` (time model only) the model keeps only
    plans that could step faster than it (`rank_time_cap`): the optimum below the cutoff is
    unchanged, and a deep run's counts get bounds set by the cap, not by its length.
    """
    check_minimise(minimise)
    ilp = build_runs_model(pulp.LpProblem(f"pipeline_runs_{minimise}", pulp.LpMinimize), problem)
    memory = rank_memory(problem, stage_memory(ilp, problem))
    if minimise == "time":
        cap = rank_time_cap(problem, cutoff_s)
        if cap is not None:
            _cap_counts(ilp, cap)
        times = stage_times(ilp, problem)
        scale = ilp.seconds_per_unit = set_step_objective(ilp.lp, problem, times)
        add_memory_rows(ilp.lp, problem, memory)
        add_rank_bounds(ilp, problem, times, scale, cap=cap)
    else:
        set_peak_objective(ilp.lp, problem, memory)
    return ilp


def rank_time_cap(problem: PipelineProblem, cutoff_s: float | None) -> float | None:
    """The most seconds any rank can take in a plan whose step is below `cutoff_s` (None when
    there is no cutoff, or no t_max term to bound).

    Every plan has sum_s T_s >= W, the layers' fastest options (the p2p terms only add), so a
    step b * sum_s T_s + (m - b) * t_max below the cutoff needs every rank's time
    <= t_max < (cutoff - b W) / (m - b). The cap is that, a hair larger, so that float rounding
    can only keep a plan, never drop one.
    """
    w, m = problem.bubble_weight, problem.num_microbatches
    if cutoff_s is None or math.isinf(cutoff_s) or m - w <= 0:
        return None
    least_work = sum(min(o.fwd_s + o.bwd_s for o in layer.options) for layer in problem.layers)
    return max(cutoff_s - w * least_work, 0.0) / (m - w) * (1.0 + _BUDGET_SLACK) + 1e-12


def _cap_counts(ilp: RunsIlp, cap: float) -> None:
    """z[s,j,k] <= cap / (fastest seconds of a layer of run j): stage s runs on a rank whose
    time is at most the cap, and each of its layers of run j takes at least that long."""
    for (_, j, _), z in ilp.count.items():
        fastest = min(o.fwd_s + o.bwd_s for o in ilp.runs[j].layer.options)
        if fastest > 0:
            z.upBound = min(z.upBound, math.floor(cap / fastest))


def build_runs_model(lp: pulp.LpProblem, problem: PipelineProblem) -> RunsIlp:
    """Add the cut and count variables and rows of the module docstring to `lp`."""
    ilp = RunsIlp(lp=lp, runs=layer_runs(problem.layers))
    tokens = pulp_names([run.layer.name for run in ilp.runs])
    _add_ends(ilp, problem, tokens)
    _add_counts(ilp, problem, tokens)
    return ilp


def _end_range(problem: PipelineProblem, s: int) -> tuple[int, int]:
    """Smallest and largest index the last layer of stage s can have."""
    return s, len(problem.layers) - problem.num_stages + s


def _add_ends(ilp: RunsIlp, problem: PipelineProblem, tokens: list[str]) -> None:
    """C[s,j] and e[s,j] for s < S-1, with one_end, done, started and untouched rows."""
    J = len(ilp.runs)
    for s in range(problem.num_stages - 1):
        lo, hi = _end_range(problem, s)
        for j, (run, tok) in enumerate(zip(ilp.runs, tokens)):
            last = run.first + run.size - 1
            # C[s,j] = layers of run j among the first P layers, with lo + 1 <= P <= hi + 1.
            low = min(max(lo + 1 - run.first, 0), run.size)
            high = min(max(hi + 1 - run.first, 0), run.size)
            ilp.cum[s, j] = ilp.lp.add_variable(
                f"cum({tok},{s})", lowBound=low, upBound=high, cat=pulp.LpInteger
            )
            can_end = run.first <= hi and last >= lo
            ilp.end[s, j] = ilp.lp.add_variable(
                f"end({tok},{s})", lowBound=0, upBound=1 if can_end else 0, cat=pulp.LpInteger
            )
        ilp.lp += (pulp.lpSum(ilp.end[s, j] for j in range(J)) == 1, f"one_end({s})")
        for j, (run, tok) in enumerate(zip(ilp.runs, tokens)):
            at_or_after = pulp.lpSum(ilp.end[s, i] for i in range(j, J))
            after = pulp.lpSum(ilp.end[s, i] for i in range(j + 1, J))
            cum = ilp.cum[s, j]
            ilp.lp += (cum >= run.size * after, f"done({tok},{s})")
            ilp.lp += (cum >= ilp.end[s, j], f"started({tok},{s})")
            ilp.lp += (cum <= run.size * at_or_after, f"untouched({tok},{s})")


def _cumulative(ilp: RunsIlp, problem: PipelineProblem, s: int, j: int) -> pulp.LpAffineExpression:
    """C[s,j], with the constants C[-1,j] = 0 and C[S-1,j] = n_j."""
    if s < 0:
        return pulp.LpAffineExpression(0)
    if s == problem.num_stages - 1:
        return pulp.LpAffineExpression(ilp.runs[j].size)
    return pulp.LpAffineExpression(ilp.cum[s, j])


def _add_counts(ilp: RunsIlp, problem: PipelineProblem, tokens: list[str]) -> None:
    """z[s,j,k] with take and non_empty rows."""
    for s in range(problem.num_stages):
        for j, (run, tok) in enumerate(zip(ilp.runs, tokens)):
            for k in range(len(run.layer.options)):
                ilp.count[s, j, k] = ilp.lp.add_variable(
                    f"count({tok},{s},{k})", lowBound=0, upBound=run.size, cat=pulp.LpInteger
                )
            taken = _cumulative(ilp, problem, s, j) - _cumulative(ilp, problem, s - 1, j)
            ilp.lp += (_run_count(ilp, s, j) == taken, f"take({tok},{s})")
        everything = pulp.lpSum(_run_count(ilp, s, j) for j in range(len(ilp.runs)))
        ilp.lp += (everything >= 1, f"non_empty({s})")


def _run_count(ilp: RunsIlp, s: int, j: int) -> pulp.LpAffineExpression:
    """Layers of run j in stage s: sum_k z[s,j,k]."""
    return pulp.lpSum(ilp.count[s, j, k] for k in range(len(ilp.runs[j].layer.options)))


def stage_times(ilp: RunsIlp, problem: PipelineProblem) -> list[pulp.LpAffineExpression]:
    """T_s per stage as expressions of z and e."""
    times = []
    for s in range(problem.num_stages):
        terms = [
            (option.fwd_s + option.bwd_s) * ilp.count[s, j, k]
            for j, run in enumerate(ilp.runs)
            for k, option in enumerate(run.layer.options)
            if option.fwd_s + option.bwd_s
        ]
        if s < problem.num_stages - 1:
            per_byte = problem.p2p_s_per_byte
            terms += [
                per_byte * run.layer.boundary_bytes * ilp.end[s, j]
                for j, run in enumerate(ilp.runs)
                if per_byte * run.layer.boundary_bytes
            ]
            times.append(pulp.lpSum(terms) + problem.p2p_latency_s)
        else:
            times.append(pulp.lpSum(terms))
    return times


def stage_memory(ilp: RunsIlp, problem: PipelineProblem) -> list[pulp.LpAffineExpression]:
    """Bytes per stage (state plus in-flight activations and carried bytes) as expressions of
    z and e."""
    memory = []
    for s, flight in enumerate(problem.in_flight):
        terms = [flight * run.layer.carry_bytes * ilp.end[s - 1, j]
                 for j, run in enumerate(ilp.runs)
                 if s > 0 and flight * run.layer.carry_bytes and (s - 1, j) in ilp.end]
        for j, run in enumerate(ilp.runs):
            for k, option in enumerate(run.layer.options):
                per_layer = run.layer.state_bytes + flight * option.activation_bytes
                if per_layer:
                    terms.append(per_layer * ilp.count[s, j, k])
        memory.append(pulp.lpSum(terms))
    return memory


def read_runs_plan(
    ilp: RunsIlp, problem: PipelineProblem
) -> tuple[tuple[tuple[int, ...], ...], list[int]]:
    """Stages (layer indices) and option indices from a solved model.

    Stage s ends after the first P_(s+1) = sum_j C[s,j] layers; in stage s the layers of run j
    take option 0 for the first z[s,j,0] of them, then option 1, ... (values are rounded: the
    solver returns integers up to its tolerance).
    """
    S, L = problem.num_stages, len(problem.layers)
    ends = [
        sum(round(ilp.cum[s, j].value() or 0.0) for j in range(len(ilp.runs))) for s in range(S - 1)
    ]
    bounds = [0, *ends, L]
    stages = tuple(tuple(range(a, b)) for a, b in zip(bounds, bounds[1:]))
    options = [0] * L
    run_of = [j for j, run in enumerate(ilp.runs) for _ in range(run.size)]
    for s, members in enumerate(stages):
        for j, inside in itertools.groupby(members, key=run_of.__getitem__):
            _spread_options(ilp, s, j, list(inside), options)
    return stages, options


def _spread_options(ilp: RunsIlp, s: int, j: int, inside: list[int], options: list[int]) -> None:
    """Give the layers `inside` (run j, stage s, in order) options by the counts z[s,j,.]."""
    K = len(ilp.runs[j].layer.options)
    upto, k = 0, 0
    for t, i in enumerate(inside):
        # Move to the first option whose cumulative count exceeds t; the last option takes any
        # layer the rounded counts leave over.
        while k < K - 1 and t >= upto + round(ilp.count[s, j, k].value() or 0.0):
            upto += round(ilp.count[s, j, k].value() or 0.0)
            k += 1
        options[i] = k


# ---------------------------------------------------------------------------------------------
# Rank bounds: valid inequalities that make the memory-bound cases fast to prove


def add_rank_bounds(
    ilp: RunsIlp, problem: PipelineProblem, times: list[pulp.LpAffineExpression], scale: float,
    *, cap: float | None = None,
) -> None:
    """h[r,j,q] and rank_bound[r,j] rows: rank r's time is at least what its layers of run j need.

    Why: under a tight budget the LP relaxation checkpoints fractions of layers and spreads
    fractions of layers over ranks, so its bound sits a few percent under the optimum, and
    branching on per-stage counts barely lifts it (a rank's time depends on its totals, but
    memory on how they split among its stages: many near-copies of each plan). These rows give
    the LP each rank's exact integer trade-off between how many layers of a run it holds and
    the least time they can take within the budget, and a variable per total to branch on.

    g_(r,j)(q) = `fastest_fill` of run j at f_r, the smallest in-flight count of r's stages: the
    least seconds for q layers of run j within the budget if each held f_r microbatches. A plan
    puts them on stages holding f_s >= f_r and adds r's other layers, which only adds bytes and
    seconds (all are >= 0), so no plan's rank r is faster than g_(r,j)(q) plus the other layers
    at their fastest options.

        one_total[r,j]:  sum_q h[r,j,q] = 1,     h[r,j,q] in {0,1}, q = 0..n_j, fixed to 0 where
                         q layers cannot fit (g = inf)
        total[r,j]:      sum_q q * h[r,j,q] = sum_(s on r, k) z[s,j,k]
        rank_bound[r,j]: sum_(s on r) T_s >= sum_q g_(r,j)(q) * h[r,j,q]
                                           + sum_(i != j, s on r, k) min_k' t_(i,k') * z[s,i,k]

    Every plan satisfies them (with h the indicator of its count), so the optimum is unchanged.
    Added for runs of two or more layers when the budget is finite and g is not already linear
    (when it is, rank_bound follows from the LP and would only add variables).

    With a `cap` on every rank's time (`rank_time_cap`), h[r,j,q] is fixed to 0 where
    g_(r,j)(q) > cap: no plan below the cutoff has rank r hold q layers of run j, so a deep run
    branches over the few counts near its even share, not over all of them.
    """
    if math.isinf(problem.memory_budget_bytes):
        return
    fills: dict[tuple[int, int], list[float] | None] = {}
    tokens = pulp_names([run.layer.name for run in ilp.runs])
    for r in range(problem.num_ranks):
        stages = [s for s, rank in enumerate(problem.ranks) if rank == r]
        f_r = min(problem.in_flight[s] for s in stages)
        rank_time = pulp.lpSum(times[s] for s in stages)
        for j, run in enumerate(ilp.runs):
            if (j, f_r) not in fills:
                fills[j, f_r] = _useful_fill(run, f_r, problem.memory_budget_bytes)
            fill = fills[j, f_r]
            if fill is not None and cap is not None:
                fill = [g if g <= cap else math.inf for g in fill]
            if fill is not None:
                _add_rank_bound(ilp, stages, r, j, fill, rank_time, scale, tokens[j])


def _useful_fill(run: Run, in_flight: int, budget: float) -> list[float] | None:
    """g of `add_rank_bounds` for `run`, or None when its row would add nothing."""
    if run.size < 2:
        return None
    fill = fastest_fill(run, in_flight, budget)
    if fill is None:
        return None
    fastest = min(option.fwd_s + option.bwd_s for option in run.layer.options)
    if all(math.isfinite(g) and g <= q * fastest for q, g in enumerate(fill)):
        return None  # g(q) = q * fastest: implied by the LP's own rows
    return fill


def _add_rank_bound(
    ilp: RunsIlp,
    stages: list[int],
    r: int,
    j: int,
    fill: list[float],
    rank_time: pulp.LpAffineExpression,
    scale: float,
    tok: str,
) -> None:
    """one_total, total and rank_bound rows of rank r and run j (`add_rank_bounds`)."""
    holds = []
    for q, g in enumerate(fill):
        ilp.holds[r, j, q] = ilp.lp.add_variable(
            f"holds({tok},{r},{q})",
            lowBound=0,
            upBound=1 if math.isfinite(g) else 0,
            cat=pulp.LpInteger,
        )
        holds.append(ilp.holds[r, j, q])
    ilp.lp += (pulp.lpSum(holds) == 1, f"one_total({tok},{r})")
    on_rank = pulp.lpSum(_run_count(ilp, s, j) for s in stages)
    ilp.lp += (pulp.lpSum(q * h for q, h in enumerate(holds)) == on_rank, f"total({tok},{r})")
    others = []
    for i, other in enumerate(ilp.runs):
        if i == j:
            continue
        fastest = min(option.fwd_s + option.bwd_s for option in other.layer.options)
        others += [
            fastest * ilp.count[s, i, k]
            for s in stages
            for k in range(len(other.layer.options))
            if fastest
        ]
    least = pulp.lpSum(g * h for g, h in zip(fill, holds) if math.isfinite(g) and g)
    ilp.lp += ((rank_time - pulp.lpSum(others) - least) / scale >= 0, f"rank_bound({tok},{r})")


def fastest_fill(run: Run, in_flight: int, budget: float) -> list[float] | None:
    """Least seconds for q = 0..n layers of `run` on one stage that holds `in_flight`
    microbatches, within `budget` bytes (inf where q layers cannot fit); None when there are too
    many options to enumerate their counts (`_MAX_FILL_COMBINATIONS`).

    Exact: it tries every count of every option but the last two, and for those two takes the
    most layers of the faster one that fit (any fewer is slower, any more does not fit).
    """
    layer = run.layer
    per_layer = sorted(
        (option.fwd_s + option.bwd_s, layer.state_bytes + in_flight * option.activation_bytes)
        for option in layer.options
    )
    front: list[tuple[float, float]] = []  # faster options first, each lighter than the ones before
    for seconds, size in per_layer:
        if not front or size < front[-1][1]:
            front.append((seconds, size))  # an option slower and no lighter is never needed
    if (run.size + 1) ** (len(front) - 1) > _MAX_FILL_COMBINATIONS:
        return None
    room = budget * (1.0 + _BUDGET_SLACK)
    return [_least_time(front, q, room) for q in range(run.size + 1)]


def _least_time(front: list[tuple[float, float]], count: int, room: float) -> float:
    """Least seconds for `count` layers, each one (seconds, bytes) of `front`, in `room` bytes."""
    if len(front) == 1:
        seconds, size = front[0]
        return count * seconds if count * size <= room else math.inf
    if len(front) == 2:
        return _least_time_two(front[0], front[1], count, room)
    seconds, size = front[0]
    best = math.inf
    for n in range(count + 1):
        if n * size > room:
            break
        best = min(best, n * seconds + _least_time(front[1:], count - n, room - n * size))
    return best


def _least_time_two(
    fast: tuple[float, float], light: tuple[float, float], count: int, room: float
) -> float:
    """Least seconds for `count` layers split between a faster, heavier option and a slower,
    lighter one: as many of the faster as fit."""
    (t_fast, m_fast), (t_light, m_light) = fast, light
    spare = room - count * m_light  # bytes left with every layer on the lighter option
    if spare < 0:
        return math.inf
    extra = m_fast - m_light  # > 0: `front` keeps options strictly lighter than the faster ones
    n = count if spare >= count * extra else math.floor(spare / extra)

    def fits(n: int) -> bool:
        return n * m_fast + (count - n) * m_light <= room

    # The division may round either way; step to the exact largest n that fits.
    while n > 0 and not fits(n):
        n -= 1
    while n < count and fits(n + 1):
        n += 1
    return n * t_fast + (count - n) * t_light
