r"""Pipeline stage cuts and per-layer options (checkpointing) as an integer linear program.

Layers, in order, are cut into `S` contiguous non-empty stages; each layer also picks one option
(a way to run it, e.g. checkpoint "none" / "full" / "selective") that trades time for activation
memory. Stage `s` lives on rank `rank(s)` (`PipelineProblem.stage_of_rank`, default `rank(s) = s`;
interleaved schedules put several stages, "virtual stages" or chunks, on one rank).

Cost model (Narayanan et al., SC'21, section 2.2; Alpa, OSDI'22, section 5 eq. 2; DAPPLE, PPoPP'21)
    T_s      = sum_(l in s) (fwd_s + bwd_s of l's option)  +  [s < S-1] * (p2p_latency_s
               + p2p_s_per_byte * boundary_bytes of the last layer of s)
    T_rank_r = sum_(s on r) T_s            (one microbatch's forward+backward on rank r)
    step_s   = m * max_r T_rank_r  +  b * (sum_s T_s - max_r T_rank_r)
             = b * sum_s T_s  +  (m - b) * max_r T_rank_r,
    with b = `bubble_weight` and m = `num_microbatches`. With b = 1 and one stage per rank this
    is the 1F1B / GPipe latency sum_s T_s + (m-1) max_s T_s.
    With v stages per rank, equal stage times t and b = 1/v it is (m + (pp-1)/v) * v*t, the
    interleaved 1F1B time of Narayanan et al. (bubble fraction (pp-1)/(v*m)). b = 0 models a
    schedule without bubble (m * max_r T_rank_r). The send time is charged after every stage but
    the last, even if two consecutive stages share a rank. 0 <= b <= m is required.
    Memory of rank r = sum_(s on r) sum_(l in s) (state_bytes_l + in_flight[s] * activation_bytes
    of l's option): parameters, gradients and optimizer state, plus the activations of the
    microbatches the schedule keeps in flight on that stage at its peak (Piper, NeurIPS'21).

Sets
    L layers l = 0..L-1 (in order), S stages s = 0..S-1, K_l the options of layer l, R ranks,
    S_r the stages of rank r. Layer l can only sit in stages max(0, S-L+l) .. min(l, S-1); the
    other x[l,s] are fixed to 0 by bounds (every stage before and after it needs a layer).

Variables (code indexes layers with `i`, the docstring with `l`)
    x[l,s] in {0,1}      layer l is in stage s.                              (`_add_cut_vars`)
    o[l,k] in {0,1}      layer l runs option k.                              (`_add_option_vars`)
    w[l,s,k] in [0,1]    = x[l,s] * o[l,k], linearised by its row and column sums: with x and o
                         one-hot, row s* and column k* must sum to 1 and all others to 0, so
                         w[l,s*,k*] = 1 and every other entry is 0 -- integral.     (`_add_pairs`)
    c[l,s] >= 0          a cut follows layer l, which ends stage s (s < S-1, l < L-1); only a
                         lower bound, which the objective makes tight.             (`_add_cuts`)
    t_max >= 0           the largest rank time.                             (`_set_objective`)

Objective                                                                  (`_set_objective`)
    min  b * sum_s T_s  +  (m - b) * t_max,   T_s linear in w[l,s,k] and c[l,s] as above,
    scaled so that the largest coefficient is 1.

Constraints
    one_stage[l]:        sum_s x[l,s] = 1                                      (`_add_cut_vars`)
    first_layer:         x[0,0] = 1;   last_layer: x[L-1,S-1] = 1              (`_add_cut_vars`)
    contiguous[l,s]:     x[l+1,s] <= x[l,s] + x[l,s-1]   (x[l,-1] := 0)        (`_add_cut_vars`)
        The stage index sigma(l) = sum_s s*x[l,s] then grows by 0 or 1 from layer to layer, from
        0 to S-1, so stages are contiguous, in order and non-empty.
    one_option[l]:       sum_k o[l,k] = 1                                   (`_add_option_vars`)
    pair_stage[l,s]:     sum_k w[l,s,k] = x[l,s]                                  (`_add_pairs`)
    pair_option[l,k]:    sum_s w[l,s,k] = o[l,k]                                  (`_add_pairs`)
    cut[l,s]:            c[l,s] >= x[l,s] - x[l+1,s]                               (`_add_cuts`)
    same_layer_order[l]: for identical adjacent layers l, l+1 (same options, state, boundary):
                         sum_k k*o[l,k] <= sum_k k*o[l+1,k] + (K-1) * (stage(l+1) - stage(l)),
                         stage(l) = sum_s s*x[l,s]: inside a stage their options are in order.
                         Symmetry breaking only: it removes equal-cost copies of a plan, never
                         the only optimum.                           (`_add_symmetry_breaking`)
    rank_time[r]:        sum_(s in S_r) T_s <= t_max                          (`_set_objective`)
    memory[r]:           sum_(s in S_r) sum_l (state_l * x[l,s]
                             + in_flight[s] * sum_k act_(l,k) * w[l,s,k]) <= budget (`_add_memory`)

When nothing fits, a second ILP (`minimise="peak"`) keeps the cut, option and pair families, drops
memory[r] and the time rows, and minimises a continuous `peak` with peak[r]: memory of r <= peak;
that peak is `InfeasibleProblem.min_peak_bytes`.

Runs of identical layers (the runs model)
    The model above is the reference. Deep models are mostly runs of identical layers (same
    options, state and boundary bytes), where it has one equal-cost copy of a plan per way of
    permuting which identical layer sits where and runs which option; branch-and-bound then
    cannot prove optimality for ~100 blocks on 16+ stages. `solvers.pipeline_runs` has the same
    plans as counts: per stage and run, how many layers and how many per option, plus where each
    stage ends; every integer solution is one contiguous cut and back, with the same T_s and
    memory, and it shares this module's objective, rank_time, memory and peak rows
    (`build_pipeline_runs_ilp`). It adds valid rank_bound rows (each rank's least time for the
    number of layers of a run it holds, within the budget) that make tight-memory interleaved
    cases fast to prove. `solve_pipeline(formulation="auto")` uses it when two adjacent layers
    are identical.

Names in brackets are written with parentheses in the model, e.g. `contiguous(block_3,2)`,
`memory(1)`. The three steps are `build_pipeline_ilp` (or `build_pipeline_runs_ilp`),
`run_solver` (shared with the intra-op ILP) and `read_pipeline_solution`; `solve_pipeline` runs
them in order. `solve_pipeline_brute_force` enumerates every cut and option and is the reference
in tests.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, field

import pulp

from solvers.intra_op import SolverResult, pulp_names, run_solver
from solvers.pipeline_runs import (
    RunsIlp,
    add_rank_bounds,
    build_runs_model,
    layer_runs,
    read_runs_plan,
    same_kind,
)
from solvers.pipeline_runs import stage_memory as runs_stage_memory
from solvers.pipeline_runs import stage_times as runs_stage_times
from solvers.problem import InfeasibleProblem, NoSolutionFound

__all__ = [
    "Layer",
    "LayerOption",
    "PipelineIlp",
    "PipelineProblem",
    "PipelineSolution",
    "build_pipeline_ilp",
    "build_pipeline_runs_ilp",
    "evaluate_pipeline",
    "read_pipeline_solution",
    "solve_pipeline",
    "solve_pipeline_brute_force",
]

SOLVERS = ("highs", "cbc")
FORMULATIONS = ("auto", "layers", "runs")
_GIB = 1024.0**3
_HIGHS_OPTIMAL_GAP = 1e-6  # a kOptimal HiGHS solve with a smaller residual gap is optimal


# ---------------------------------------------------------------------------------------------
# Problem and solution


@dataclass(frozen=True, kw_only=True)
class LayerOption:
    """One way to run a layer, e.g. checkpoint "none", "full" or "selective".

    Attributes
    ----------
    name : str
        Unique within its layer.
    fwd_s, bwd_s : float
        Seconds of one microbatch's forward / backward through the layer on its stage (backward
        includes the recompute of a checkpointed layer).
    activation_bytes : float
        Bytes the layer keeps alive per microbatch in flight (saved for backward).
    """

    name: str
    fwd_s: float
    bwd_s: float
    activation_bytes: float


@dataclass(frozen=True, kw_only=True)
class Layer:
    """The unit of stage cuts.

    Attributes
    ----------
    name : str
        Unique (a module FQN).
    options : tuple of LayerOption
        At least one.
    state_bytes : float
        Parameters + gradients + optimizer state held (per device) by the stage that owns it.
    boundary_bytes : float
        Bytes of the layer's output sent to the next stage when a cut follows it.
    """

    name: str
    options: tuple[LayerOption, ...]
    state_bytes: float
    boundary_bytes: float


@dataclass(frozen=True, kw_only=True)
class PipelineProblem:
    """Layers to cut into `num_stages` contiguous stages, under a per-rank memory budget.

    Attributes
    ----------
    layers : tuple of Layer
        In execution order.
    num_stages : int
        S, pipeline ranks times virtual stages per rank; at most `len(layers)`.
    num_microbatches : int
        m >= 1.
    in_flight : tuple of int
        Per stage: microbatches whose activations the stage holds at its peak (set by the
        schedule: GPipe m for every stage; 1F1B min(S - s, m)).
    stage_of_rank : tuple of int
        Per stage: its rank (interleaved: `s % pp`). Empty (default) means stage s on rank s.
        Ranks are 0..R-1 and each holds at least one stage.
    memory_budget_bytes : float
        Per rank; `inf` (default) means no limit.
    p2p_s_per_byte, p2p_latency_s : float
        A stage that is not the last sends its last layer's `boundary_bytes` to the next stage
        in `p2p_latency_s + p2p_s_per_byte * boundary_bytes` seconds.
    bubble_weight : float
        b in `step = b * sum_s T_s + (m - b) * max_r T_rank` (module docstring): 1 for GPipe and
        1F1B, 1/v for interleaved 1F1B with v stages per rank; 0 <= b <= m.
    """

    layers: tuple[Layer, ...]
    num_stages: int
    num_microbatches: int
    in_flight: tuple[int, ...]
    stage_of_rank: tuple[int, ...] = ()
    memory_budget_bytes: float = math.inf
    p2p_s_per_byte: float = 0.0
    p2p_latency_s: float = 0.0
    bubble_weight: float = 1.0

    @property
    def ranks(self) -> tuple[int, ...]:
        """Rank of every stage (`stage_of_rank`, or 0..S-1 when it is empty)."""
        return self.stage_of_rank or tuple(range(self.num_stages))

    @property
    def num_ranks(self) -> int:
        return max(self.ranks) + 1

    def validate(self) -> None:
        """Raise ValueError naming the first bad layer, option or field."""
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError("layers must be a non-empty tuple of Layer")
        seen: set[str] = set()
        for layer in self.layers:
            _validate_layer(layer)
            if layer.name in seen:
                raise ValueError(f"layer {layer.name!r} appears twice; layer names must be unique")
            seen.add(layer.name)
        S, m = self.num_stages, self.num_microbatches
        if not _is_int(S) or not 1 <= S <= len(self.layers):
            raise ValueError(
                f"num_stages must be an int in 1..{len(self.layers)} (every stage needs a layer), "
                f"got {S!r}; use fewer stages or split layers"
            )
        if not _is_int(m) or m < 1:
            raise ValueError(f"num_microbatches must be an int >= 1, got {m!r}")
        if len(self.in_flight) != S or not all(_is_int(n) and n >= 0 for n in self.in_flight):
            raise ValueError(
                f"in_flight must give {S} ints >= 0 (one per stage), got {self.in_flight!r}"
            )
        _validate_ranks(self.stage_of_rank, S)
        for name in ("memory_budget_bytes", "p2p_s_per_byte", "p2p_latency_s"):
            _check_number(name, getattr(self, name), allow_inf=name == "memory_budget_bytes")
        w = self.bubble_weight
        _check_number("bubble_weight", w, allow_inf=False)
        if w > m:
            raise ValueError(f"bubble_weight must be <= num_microbatches ({m}), got {w!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(where: str, value: object, *, allow_inf: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if value < 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{where} is {value!r}; it must be >= 0 and finite")


def _validate_layer(layer: Layer) -> None:
    if not isinstance(layer.name, str) or not layer.name:
        raise ValueError(f"layer name must be a non-empty string, got {layer.name!r}")
    where = f"layer {layer.name!r}"
    if not isinstance(layer.options, tuple) or not layer.options:
        raise ValueError(f"{where} has no options; give it at least one LayerOption")
    _check_number(f"{where}: state_bytes", layer.state_bytes, allow_inf=False)
    _check_number(f"{where}: boundary_bytes", layer.boundary_bytes, allow_inf=False)
    names = [option.name for option in layer.options]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: option names {names} must be unique")
    for option in layer.options:
        for attr in ("fwd_s", "bwd_s", "activation_bytes"):
            value = getattr(option, attr)
            _check_number(f"{where}, option {option.name!r}: {attr}", value, allow_inf=False)


def _validate_ranks(stage_of_rank: tuple[int, ...], num_stages: int) -> None:
    if not stage_of_rank:
        return
    if len(stage_of_rank) != num_stages or not all(_is_int(r) and r >= 0 for r in stage_of_rank):
        raise ValueError(
            f"stage_of_rank must give {num_stages} ints >= 0 (one rank per stage), "
            f"got {stage_of_rank!r}"
        )
    missing = sorted(set(range(max(stage_of_rank) + 1)) - set(stage_of_rank))
    if missing:
        raise ValueError(
            f"stage_of_rank {stage_of_rank!r} leaves ranks {missing} without a stage; number "
            "ranks 0..R-1 and give each at least one stage"
        )


@dataclass(frozen=True, kw_only=True)
class PipelineSolution:
    """The stages and options chosen, and what they cost.

    Attributes
    ----------
    stages : tuple of tuple of str
        Layer names per stage, in order.
    options : dict of str to str
        Layer name -> chosen option name.
    stage_time_s : tuple of float
        T_s per stage: forward + backward of its layers plus the send after it.
    step_time_s : float
        The objective, recomputed with `evaluate_pipeline`.
    peak_memory_bytes : tuple of float
        Per rank.
    status, gap, solver, solve_time_s
        As in `Solution`: "optimal" or "feasible"; relative gap; "highs", "cbc" or
        "brute_force"; wall-clock seconds.
    """

    stages: tuple[tuple[str, ...], ...]
    options: dict[str, str]
    stage_time_s: tuple[float, ...]
    step_time_s: float
    peak_memory_bytes: tuple[float, ...]
    status: str
    gap: float | None
    solver: str
    solve_time_s: float


# ---------------------------------------------------------------------------------------------
# Evaluate


def _stage_costs(
    problem: PipelineProblem, stages: tuple[tuple[int, ...], ...], options: list[int]
) -> tuple[list[float], list[float]]:
    """Per stage: T_s and memory bytes, for stages as layer indices and options as indices."""
    times_s, memory_bytes = [], []
    last = len(stages) - 1
    for s, members in enumerate(stages):
        t_s = mem_bytes = 0.0
        for i in members:
            layer = problem.layers[i]
            option = layer.options[options[i]]
            t_s += option.fwd_s + option.bwd_s
            mem_bytes += layer.state_bytes + problem.in_flight[s] * option.activation_bytes
        if s < last:
            boundary = problem.layers[members[-1]].boundary_bytes
            t_s += problem.p2p_latency_s + problem.p2p_s_per_byte * boundary
        times_s.append(t_s)
        memory_bytes.append(mem_bytes)
    return times_s, memory_bytes


def _score(
    problem: PipelineProblem, times_s: list[float], memory_bytes: list[float]
) -> tuple[float, tuple[float, ...]]:
    """step_s and per-rank peak from per-stage times and memory."""
    rank_s = [0.0] * problem.num_ranks
    peak_bytes = [0.0] * problem.num_ranks
    for s, r in enumerate(problem.ranks):
        rank_s[r] += times_s[s]
        peak_bytes[r] += memory_bytes[s]
    w, m = problem.bubble_weight, problem.num_microbatches
    return w * sum(times_s) + (m - w) * max(rank_s), tuple(peak_bytes)


def _indices(
    problem: PipelineProblem, stages: tuple[tuple[str, ...], ...], options: dict[str, str]
) -> tuple[tuple[tuple[int, ...], ...], list[int]]:
    """Check a plan names every layer once, in order, in S non-empty stages; return indices."""
    names = [layer.name for layer in problem.layers]
    flat = [name for stage in stages for name in stage]
    if len(stages) != problem.num_stages or any(not stage for stage in stages) or flat != names:
        raise ValueError(
            f"stages must cut the layers {names} in order into {problem.num_stages} non-empty "
            f"contiguous stages, got {stages!r}"
        )
    option_index = []
    for layer in problem.layers:
        option_names = [option.name for option in layer.options]
        if options.get(layer.name) not in option_names:
            raise ValueError(
                f"layer {layer.name!r} needs one of the options {option_names}, got "
                f"{options.get(layer.name)!r}"
            )
        option_index.append(option_names.index(options[layer.name]))
    bounds = itertools.accumulate(len(stage) for stage in stages)
    starts = [0, *bounds]
    return tuple(tuple(range(a, b)) for a, b in zip(starts, starts[1:])), option_index


def evaluate_pipeline(
    problem: PipelineProblem, stages: tuple[tuple[str, ...], ...], options: dict[str, str]
) -> tuple[float, tuple[float, ...]]:
    """Score one plan: `(step_time_s, peak_memory_bytes per rank)` (module docstring's model).

    The budget is not checked here. ValueError if `stages` is not a contiguous cut of the layers
    into `num_stages` stages or `options` misses a layer or names an unknown option.

    Examples
    --------
    >>> one = (LayerOption(name="none", fwd_s=1.0, bwd_s=2.0, activation_bytes=10.0),)
    >>> p = PipelineProblem(
    ...     layers=tuple(
    ...         Layer(name=n, options=one, state_bytes=5.0, boundary_bytes=0.0) for n in "abc"
    ...     ),
    ...     num_stages=2, num_microbatches=4, in_flight=(2, 1),
    ... )
    >>> evaluate_pipeline(p, (("a", "b"), ("c",)), {"a": "none", "b": "none", "c": "none"})
    (27.0, (50.0, 15.0))
    """
    problem.validate()
    by_index, option_index = _indices(problem, tuple(map(tuple, stages)), options)
    return _score(problem, *_stage_costs(problem, by_index, option_index))


# ---------------------------------------------------------------------------------------------
# Brute force


def solve_pipeline_brute_force(problem: PipelineProblem) -> PipelineSolution:
    """Try every contiguous cut and every option per layer; keep the fastest plan that fits.

    For small instances (the number of plans is C(L-1, S-1) * prod_l |K_l|). Ties go to the
    first plan in enumeration order. Raises InfeasibleProblem with the smallest peak when nothing
    fits the budget.
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
            step_s, peak_bytes = _score(problem, *_stage_costs(problem, stages, list(options)))
            worst = max(peak_bytes)
            min_peak_bytes = min(min_peak_bytes, worst)
            if worst <= problem.memory_budget_bytes and (best is None or step_s < best[0]):
                best = (step_s, stages, list(options))
    if best is None:
        raise _infeasible_error(problem, min_peak_bytes)
    _, stages, options = best
    return _make_solution(
        problem, stages, options, gap=0.0, status="optimal", solver="brute_force", start=start
    )


def _make_solution(
    problem: PipelineProblem,
    stages: tuple[tuple[int, ...], ...],
    options: list[int],
    *,
    status: str,
    gap: float | None,
    solver: str,
    start: float,
) -> PipelineSolution:
    times_s, memory_bytes = _stage_costs(problem, stages, options)
    step_s, peak_bytes = _score(problem, times_s, memory_bytes)
    layers = problem.layers
    return PipelineSolution(
        stages=tuple(tuple(layers[i].name for i in members) for members in stages),
        options={layer.name: layer.options[k].name for layer, k in zip(layers, options)},
        stage_time_s=tuple(times_s),
        step_time_s=step_s,
        peak_memory_bytes=peak_bytes,
        status=status,
        gap=gap,
        solver=solver,
        solve_time_s=time.perf_counter() - start,
    )


def _infeasible_error(problem: PipelineProblem, min_peak_bytes: float) -> InfeasibleProblem:
    budget = problem.memory_budget_bytes
    return InfeasibleProblem(
        f"no cut of {len(problem.layers)} layers into {problem.num_stages} stages fits the memory "
        f"budget of {budget / _GIB:.3f} GiB per rank, with any choice of layer options; the "
        f"smallest peak found is {min_peak_bytes / _GIB:.3f} GiB ({min_peak_bytes:.0f} bytes); "
        "raise the budget, use more stages or ranks, fewer microbatches in flight, or allow "
        "checkpointing",
        min_peak_bytes=min_peak_bytes,
        budget_bytes=budget,
    )


# ---------------------------------------------------------------------------------------------
# ILP: solve


def solve_pipeline(
    problem: PipelineProblem,
    *,
    solver: str = "highs",
    time_limit_s: float | None = None,
    gap: float | None = None,
    msg: bool = False,
    formulation: str = "auto",
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
        "layers": the per-layer model of the module docstring; "runs": the count model over runs
        of identical layers (`solvers.pipeline_runs`), which has the same optimum and proves it
        much faster on deep stacks of equal blocks; "auto" (default) takes "runs" when two
        adjacent layers are identical and "layers" otherwise.

    Returns
    -------
    PipelineSolution
        Times and peaks recomputed from the plan with the module docstring's model.

    Raises
    ------
    InfeasibleProblem
        No plan fits `memory_budget_bytes`; `min_peak_bytes` is the smallest max-rank peak.
    NoSolutionFound
        The time limit passed before any plan was found.
    ValueError
        The problem is invalid, or `solver` or `formulation` is unknown.

    Examples
    --------
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
    solver = _pick_solver(solver)
    formulation = _pick_formulation(problem, formulation)
    ilp = _build(problem, formulation, minimise="time")
    result = _tolerant(
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


def _tolerant(ilp: PipelineIlp | RunsIlp, result: SolverResult) -> SolverResult:
    """Call a HiGHS solve "optimal" when HiGHS says so with a gap within its tolerances.

    `run_solver` wants a gap <= 1e-9 for "optimal"; HiGHS, asked for gap 0, prunes nodes whose
    LP bound is within its dual feasibility tolerance (1e-7) of the incumbent and stops at
    kOptimal with a residual gap near 1e-7 (the continuous t_max and c make that common here).
    The residual is kept in `gap`.
    """
    if result.solver != "highs" or result.status != "feasible" or result.gap is None:
        return result
    import highspy

    if ilp.lp.solverModel.getModelStatus() == highspy.HighsModelStatus.kOptimal:
        if result.gap <= _HIGHS_OPTIMAL_GAP:
            return SolverResult("optimal", result.gap, "highs")
    return result


def _pick_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "highs" and not pulp.HiGHS(msg=False).available():
        warnings.warn("HiGHS (highspy) is not available; falling back to CBC", stacklevel=3)
        return "cbc"
    return solver


def _pick_formulation(problem: PipelineProblem, formulation: str) -> str:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if formulation == "auto":
        # Without a repeated layer the runs model is the per-layer model in other clothes, and
        # the per-layer one is the longer-tested reference.
        repeats = len(layer_runs(problem.layers)) < len(problem.layers)
        return "runs" if repeats else "layers"
    return formulation


def _build(problem: PipelineProblem, formulation: str, *, minimise: str) -> PipelineIlp | RunsIlp:
    if formulation == "runs":
        return build_pipeline_runs_ilp(problem, minimise=minimise)
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
    _, peak_bytes = _score(problem, *_stage_costs(problem, stages, options))
    return _infeasible_error(problem, max(peak_bytes))


# ---------------------------------------------------------------------------------------------
# ILP: build


@dataclass
class PipelineIlp:
    """A built pulp model and its variables (`lp` is what `run_solver` solves)."""

    lp: pulp.LpProblem
    x: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)  # (i, s)
    o: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)  # (i, k)
    w: dict[tuple[int, int, int], pulp.LpVariable] = field(default_factory=dict)  # (i, s, k)
    c: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)  # (i, s)


def _check_minimise(minimise: str) -> None:
    if minimise not in ("time", "peak"):
        raise ValueError(f"minimise must be 'time' or 'peak', got {minimise!r}")


def build_pipeline_ilp(problem: PipelineProblem, *, minimise: str = "time") -> PipelineIlp:
    """Build the pulp model of the module docstring.

    `minimise="time"` gives the stage-cut ILP (objective: step seconds; memory[r] rows);
    `"peak"` the smallest-peak ILP (objective: the largest rank's memory; no budget).
    """
    _check_minimise(minimise)
    ilp = PipelineIlp(lp=pulp.LpProblem(f"pipeline_{minimise}", pulp.LpMinimize))
    tokens = pulp_names([layer.name for layer in problem.layers])
    _add_cut_vars(ilp, problem, tokens)
    _add_option_vars(ilp, problem, tokens)
    _add_pairs(ilp, problem, tokens)
    _add_symmetry_breaking(ilp, problem, tokens)
    rank_memory = _rank_memory(problem, _stage_memory(ilp, problem))
    if minimise == "time":
        _add_cuts(ilp, problem, tokens)
        times = [_stage_time(ilp, problem, s) for s in range(problem.num_stages)]
        _set_objective(ilp.lp, problem, times)
        _add_memory(ilp.lp, problem, rank_memory)
    else:
        _set_peak_objective(ilp.lp, problem, rank_memory)
    return ilp


def build_pipeline_runs_ilp(problem: PipelineProblem, *, minimise: str = "time") -> RunsIlp:
    """Build the runs model (`solvers.pipeline_runs`) with this module's objective and rows.

    Same `minimise` choices as `build_pipeline_ilp`, same optimum, far fewer equal-cost copies
    of each plan when layers repeat.
    """
    _check_minimise(minimise)
    ilp = build_runs_model(pulp.LpProblem(f"pipeline_runs_{minimise}", pulp.LpMinimize), problem)
    rank_memory = _rank_memory(problem, runs_stage_memory(ilp, problem))
    if minimise == "time":
        times = runs_stage_times(ilp, problem)
        scale = _set_objective(ilp.lp, problem, times)
        _add_memory(ilp.lp, problem, rank_memory)
        add_rank_bounds(ilp, problem, times, scale)
    else:
        _set_peak_objective(ilp.lp, problem, rank_memory)
    return ilp


def _add_cut_vars(ilp: PipelineIlp, problem: PipelineProblem, tokens: list[str]) -> None:
    """x[i,s] with one_stage, first_layer, last_layer and contiguous rows."""
    L, S = len(problem.layers), problem.num_stages
    for i, tok in enumerate(tokens):
        for s in range(S):
            allowed = max(0, S - L + i) <= s <= min(i, S - 1)
            ilp.x[i, s] = ilp.lp.add_variable(
                f"x({tok},{s})", lowBound=0, upBound=1 if allowed else 0, cat=pulp.LpInteger
            )
        ilp.lp += (pulp.lpSum(ilp.x[i, s] for s in range(S)) == 1, f"one_stage({tok})")
    ilp.lp += (pulp.lpSum([ilp.x[0, 0]]) == 1, "first_layer")
    ilp.lp += (pulp.lpSum([ilp.x[L - 1, S - 1]]) == 1, "last_layer")
    for i in range(L - 1):
        for s in range(S):
            came_from = [ilp.x[i, s]] + ([ilp.x[i, s - 1]] if s else [])
            ilp.lp += (ilp.x[i + 1, s] <= pulp.lpSum(came_from), f"contiguous({tokens[i + 1]},{s})")


def _add_option_vars(ilp: PipelineIlp, problem: PipelineProblem, tokens: list[str]) -> None:
    """o[i,k] with one_option rows."""
    for i, (layer, tok) in enumerate(zip(problem.layers, tokens)):
        for k in range(len(layer.options)):
            ilp.o[i, k] = ilp.lp.add_variable(
                f"o({tok},{k})", lowBound=0, upBound=1, cat=pulp.LpInteger
            )
        option_vars = [ilp.o[i, k] for k in range(len(layer.options))]
        ilp.lp += (pulp.lpSum(option_vars) == 1, f"one_option({tok})")


def _add_symmetry_breaking(ilp: PipelineIlp, problem: PipelineProblem,
                           tokens: list[str]) -> None:
    """same_layer_order[i]: two adjacent identical layers in one stage take options in order.

    Swapping the options of identical layers within a stage changes neither its time nor its
    memory, so a deep stack of identical blocks has a huge number of equal-cost optima, which
    branch-and-bound would otherwise visit one by one. Requiring the option index to not decrease
    inside a stage keeps one of each (the row is void across a cut: `cut_i` = stage(i+1) -
    stage(i) is 0 or 1 and lifts it by the largest index).
    """
    S = problem.num_stages
    for i in range(len(problem.layers) - 1):
        a, b = problem.layers[i], problem.layers[i + 1]
        if not same_kind(a, b):
            continue
        K = len(a.options)
        if K < 2:
            continue
        index = [pulp.lpSum(k * ilp.o[j, k] for k in range(1, K)) for j in (i, i + 1)]
        stage = [pulp.lpSum(s * ilp.x[j, s] for s in range(1, S)) for j in (i, i + 1)]
        ilp.lp += (index[0] <= index[1] + (K - 1) * (stage[1] - stage[0]),
                   f"same_layer_order({tokens[i]})")


def _add_pairs(ilp: PipelineIlp, problem: PipelineProblem, tokens: list[str]) -> None:
    """w[i,s,k] = x[i,s] * o[i,k] through pair_stage and pair_option rows."""
    S = problem.num_stages
    for i, (layer, tok) in enumerate(zip(problem.layers, tokens)):
        K = len(layer.options)
        for s in range(S):
            for k in range(K):
                ilp.w[i, s, k] = ilp.lp.add_variable(f"w({tok},{s},{k})", lowBound=0, upBound=1)
        for s in range(S):
            row = pulp.lpSum(ilp.w[i, s, k] for k in range(K))
            ilp.lp += (row == ilp.x[i, s], f"pair_stage({tok},{s})")
        for k in range(K):
            col = pulp.lpSum(ilp.w[i, s, k] for s in range(S))
            ilp.lp += (col == ilp.o[i, k], f"pair_option({tok},{k})")


def _add_cuts(ilp: PipelineIlp, problem: PipelineProblem, tokens: list[str]) -> None:
    """c[i,s] >= x[i,s] - x[i+1,s]: layer i ends stage s (s < S-1)."""
    L, S = len(problem.layers), problem.num_stages
    for i in range(L - 1):
        for s in range(S - 1):
            ilp.c[i, s] = ilp.lp.add_variable(f"c({tokens[i]},{s})", lowBound=0)
            ilp.lp += (ilp.c[i, s] >= ilp.x[i, s] - ilp.x[i + 1, s], f"cut({tokens[i]},{s})")


def _stage_time(ilp: PipelineIlp, problem: PipelineProblem, s: int) -> pulp.LpAffineExpression:
    """T_s as an expression of w and c."""
    terms = [
        (option.fwd_s + option.bwd_s) * ilp.w[i, s, k]
        for i, layer in enumerate(problem.layers)
        for k, option in enumerate(layer.options)
        if option.fwd_s + option.bwd_s
    ]
    if s < problem.num_stages - 1:
        send = problem.p2p_s_per_byte
        terms += [
            send * layer.boundary_bytes * ilp.c[i, s]
            for i, layer in enumerate(problem.layers[:-1])
            if send * layer.boundary_bytes
        ]
        return pulp.lpSum(terms) + problem.p2p_latency_s
    return pulp.lpSum(terms)


def _set_objective(
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


def _stage_memory(ilp: PipelineIlp, problem: PipelineProblem) -> list[pulp.LpAffineExpression]:
    """Bytes held by each stage as expressions of x and w."""
    memory = []
    for s, flight in enumerate(problem.in_flight):
        terms = []
        for i, layer in enumerate(problem.layers):
            if layer.state_bytes:
                terms.append(layer.state_bytes * ilp.x[i, s])
            for k, option in enumerate(layer.options):
                if flight * option.activation_bytes:
                    terms.append(flight * option.activation_bytes * ilp.w[i, s, k])
        memory.append(pulp.lpSum(terms))
    return memory


def _rank_memory(
    problem: PipelineProblem, stage_memory: list[pulp.LpAffineExpression]
) -> list[pulp.LpAffineExpression]:
    """Bytes held by each rank: the sum over its stages."""
    return [
        pulp.lpSum(mem for mem, rank in zip(stage_memory, problem.ranks) if rank == r)
        for r in range(problem.num_ranks)
    ]


def _memory_scale(problem: PipelineProblem) -> float:
    most = max(problem.in_flight)
    entries = [layer.state_bytes for layer in problem.layers] + [
        most * option.activation_bytes for layer in problem.layers for option in layer.options
    ]
    return max(entries) or 1.0


def _add_memory(
    lp: pulp.LpProblem, problem: PipelineProblem, rank_memory: list[pulp.LpAffineExpression]
) -> None:
    """memory[r] rows, in units of the largest memory coefficient."""
    budget = problem.memory_budget_bytes
    if math.isinf(budget):
        return
    scale = _memory_scale(problem)
    for r, memory in enumerate(rank_memory):
        lp += (memory / scale <= budget / scale, f"memory({r})")


def _set_peak_objective(
    lp: pulp.LpProblem, problem: PipelineProblem, rank_memory: list[pulp.LpAffineExpression]
) -> None:
    """peak[r] rows: memory of rank r <= peak; min peak."""
    scale = _memory_scale(problem)
    peak = lp.add_variable("peak", lowBound=0)
    for r, memory in enumerate(rank_memory):
        lp += (memory / scale <= peak, f"peak({r})")
    lp.setObjective(pulp.lpSum([peak]))


# ---------------------------------------------------------------------------------------------
# ILP: read


def _read_plan(
    problem: PipelineProblem, ilp: PipelineIlp | RunsIlp
) -> tuple[tuple[tuple[int, ...], ...], list[int]]:
    """Stages (layer indices) and option indices from a solved model (either formulation)."""
    if isinstance(ilp, RunsIlp):
        return read_runs_plan(ilp, problem)
    S = problem.num_stages
    stage_of = []
    options = []
    for i, layer in enumerate(problem.layers):
        stage_of.append(max(range(S), key=lambda s: ilp.x[i, s].value() or 0.0))
        options.append(max(range(len(layer.options)), key=lambda k: ilp.o[i, k].value() or 0.0))
    stages = tuple(tuple(i for i, sigma in enumerate(stage_of) if sigma == s) for s in range(S))
    return stages, options


def read_pipeline_solution(
    problem: PipelineProblem, ilp: PipelineIlp | RunsIlp, result: SolverResult, *, start: float
) -> PipelineSolution:
    """The PipelineSolution of a solved `ilp`; times and peaks recomputed from the plan."""
    stages, options = _read_plan(problem, ilp)
    return _make_solution(
        problem,
        stages,
        options,
        status=result.status,
        gap=result.gap,
        solver=result.solver,
        start=start,
    )
