r"""Stage cuts and per-layer options as an integer linear program with one variable per layer.

The reference formulation of the stage-cut problem (`solvers.pipeline_problem`: layers in order
cut into S contiguous non-empty stages, one option per layer, stage s on rank rank(s)). Its
per-stage time and memory feed the rows over ranks of `solvers.pipeline_ranks`.

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
                         lower bound, which the objective makes tight (c adds time and
                         memory and nothing else).                                 (`_add_cuts`)
    t_max >= 0           the largest rank time.               (`pipeline_ranks.set_step_objective`)

Stage time and memory, linear in w and c                     (`_stage_time`, `_stage_memory`)
    T_s = sum_(l,k) (fwd_s + bwd_s)_(l,k) * w[l,s,k]
          + [s < S-1] * (p2p_latency_s + p2p_s_per_byte * sum_(l < L-1) boundary_l * c[l,s])
    M_s = sum_l (state_l * x[l,s] + in_flight[s] * sum_k act_(l,k) * w[l,s,k])
          + [s > 0] * in_flight[s] * sum_(l < L-1) carry_l * c[l,s-1]

Objective                                                 (`pipeline_ranks.set_step_objective`)
    min  b * sum_s T_s  +  (m - b) * t_max,   scaled so that the largest coefficient is 1.

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
    same_layer_order[l]: for identical adjacent layers l, l+1 (`same_kind`: same options, state,
                         boundary):
                         sum_k k*o[l,k] <= sum_k k*o[l+1,k] + (K-1) * (stage(l+1) - stage(l)),
                         stage(l) = sum_s s*x[l,s]: inside a stage their options are in order.
                         Symmetry breaking only: it removes equal-cost copies of a plan, never
                         the only optimum.                           (`_add_symmetry_breaking`)
    rank_time[r]:        sum_(s in S_r) T_s <= t_max      (`pipeline_ranks.set_step_objective`)
    memory[r]:           sum_(s in S_r) M_s <= budget        (`pipeline_ranks.add_memory_rows`)

With `minimise="peak"` (when nothing fits) the model keeps the cut, option and pair families
(and cut[l,s] when some layer carries bytes), drops memory[r] and the time rows, and minimises
a continuous `peak` with peak[r]: sum_(s in S_r) M_s <= peak
(`pipeline_ranks.set_peak_objective`).

Names in brackets are written with parentheses in the model, e.g. `contiguous(block_3,2)`,
`memory(1)`. `build_pipeline_ilp` builds the model; `read_layers_plan` reads the cut and options
of a solved one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulp

from solvers.backend import pulp_names
from solvers.pipeline_problem import PipelineProblem, same_kind
from solvers.pipeline_ranks import (
    add_memory_rows,
    check_minimise,
    rank_memory,
    set_peak_objective,
    set_step_objective,
)

__all__ = ["PipelineIlp", "build_pipeline_ilp", "read_layers_plan"]


@dataclass
class PipelineIlp:
    """A built pulp model and its variables (`lp` is what `run_solver` solves)."""

    lp: pulp.LpProblem
    x: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)  # (i, s)
    o: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)  # (i, k)
    w: dict[tuple[int, int, int], pulp.LpVariable] = field(default_factory=dict)  # (i, s, k)
    c: dict[tuple[int, int], pulp.LpVariable] = field(default_factory=dict)  # (i, s)
    seconds_per_unit: float = 1.0  # the time objective's scale (`set_step_objective`)


def build_pipeline_ilp(problem: PipelineProblem, *, minimise: str = "time") -> PipelineIlp:
    """Build the pulp model of the module docstring.

    `minimise="time"` gives the stage-cut ILP (objective: step seconds; memory[r] rows);
    `"peak"` the smallest-peak ILP (objective: the largest rank's memory; no budget).
    """
    check_minimise(minimise)
    ilp = PipelineIlp(lp=pulp.LpProblem(f"pipeline_{minimise}", pulp.LpMinimize))
    tokens = pulp_names([layer.name for layer in problem.layers])
    _add_cut_vars(ilp, problem, tokens)
    _add_option_vars(ilp, problem, tokens)
    _add_pairs(ilp, problem, tokens)
    _add_symmetry_breaking(ilp, problem, tokens)
    carries = any(layer.carry_bytes for layer in problem.layers)
    if minimise == "time" or carries:
        _add_cuts(ilp, problem, tokens)
    memory = rank_memory(problem, _stage_memory(ilp, problem))
    if minimise == "time":
        times = [_stage_time(ilp, problem, s) for s in range(problem.num_stages)]
        ilp.seconds_per_unit = set_step_objective(ilp.lp, problem, times)
        add_memory_rows(ilp.lp, problem, memory)
    else:
        set_peak_objective(ilp.lp, problem, memory)
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


def _add_symmetry_breaking(ilp: PipelineIlp, problem: PipelineProblem, tokens: list[str]) -> None:
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
        ilp.lp += (
            index[0] <= index[1] + (K - 1) * (stage[1] - stage[0]),
            f"same_layer_order({tokens[i]})",
        )


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


def _stage_memory(ilp: PipelineIlp, problem: PipelineProblem) -> list[pulp.LpAffineExpression]:
    """Bytes held by each stage as expressions of x, w (and c, for carried bytes)."""
    memory = []
    for s, flight in enumerate(problem.in_flight):
        terms = [flight * layer.carry_bytes * ilp.c[i, s - 1]
                 for i, layer in enumerate(problem.layers[:-1])
                 if s > 0 and flight * layer.carry_bytes]
        for i, layer in enumerate(problem.layers):
            if layer.state_bytes:
                terms.append(layer.state_bytes * ilp.x[i, s])
            for k, option in enumerate(layer.options):
                if flight * option.activation_bytes:
                    terms.append(flight * option.activation_bytes * ilp.w[i, s, k])
        memory.append(pulp.lpSum(terms))
    return memory


def read_layers_plan(
    ilp: PipelineIlp, problem: PipelineProblem
) -> tuple[tuple[tuple[int, ...], ...], list[int]]:
    """Stages (layer indices) and option indices from a solved model: each layer's largest x
    and o."""
    S = problem.num_stages
    stage_of = []
    options = []
    for i, layer in enumerate(problem.layers):
        stage_of.append(max(range(S), key=lambda s: ilp.x[i, s].value() or 0.0))
        options.append(max(range(len(layer.options)), key=lambda k: ilp.o[i, k].value() or 0.0))
    stages = tuple(tuple(i for i, sigma in enumerate(stage_of) if sigma == s) for s in range(S))
    return stages, options
