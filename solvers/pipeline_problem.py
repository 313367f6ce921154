r"""The pipeline stage-cut problem as plain data, and how to score one plan of it.

Layers, in order, are cut into `S` contiguous non-empty stages; each layer also picks one option
(a way to run it, e.g. checkpoint "none" / "full" / "selective") that trades time for activation
memory. Stage `s` lives on rank `rank(s)` (`PipelineProblem.stage_of_rank`, default `rank(s) = s`;
interleaved schedules put several stages, "virtual stages" or chunks, on one rank). Everything is
in seconds and bytes, per rank; names, never indices, identify layers and options in a plan.

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
    Memory of rank r = sum_(s on r) (sum_(l in s) (state_bytes_l + in_flight[s] * activation_bytes
    of l's option) + [s > 0] * in_flight[s] * carry_bytes of the last layer of stage s-1):
    parameters, gradients and optimizer state, plus the activations of the microbatches the
    schedule keeps in flight on that stage at its peak (Piper, NeurIPS'21), plus what the stage
    receives from further back than the layer before it (layers that are not a chain: T5's
    encoder output, received and held by every decoder stage).

`evaluate_pipeline` scores a plan given by names; `stage_costs` and `score_stages` are the same
model on layer and option indices, for the solvers. A plan fits when the largest rank's memory is
at most `memory_budget_bytes`; the solvers (`solvers.pipeline`, `solvers.pipeline_brute_force`)
minimise step_s over the plans that fit.

Runs of identical layers: two layers are `same_kind` when they have the same options, state
bytes, boundary bytes and carry bytes, so swapping them in a plan changes nothing but names.
`layer_runs` groups adjacent identical layers; the runs model (`solvers.pipeline_runs`) and the
per-layer model's symmetry breaking (`solvers.pipeline_layers`) rest on it.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

from solvers.problem import InfeasibleProblem

__all__ = [
    "Layer",
    "LayerOption",
    "PipelineProblem",
    "PipelineSolution",
    "Run",
    "evaluate_pipeline",
    "even_plan",
    "infeasible_cut_error",
    "layer_runs",
    "same_kind",
    "score_stages",
    "solution_from_plan",
    "stage_costs",
]

_GIB = 1024.0**3


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
        Bytes sent to the next stage when a cut follows the layer: every value made up to it and
        read after it (its output, and what later layers read from further back).
    carry_bytes : float
        Of `boundary_bytes`, what the next stage holds per microbatch in flight besides this
        layer's own outputs (which its `activation_bytes` count): values made further back that
        the stage receives, reads or passes on. 0 (default) for a chain of layers.
    """

    name: str
    options: tuple[LayerOption, ...]
    state_bytes: float
    boundary_bytes: float
    carry_bytes: float = 0.0


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
    _check_number(f"{where}: carry_bytes", layer.carry_bytes, allow_inf=False)
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
# Evaluate: the cost model of the module docstring


def stage_costs(
    problem: PipelineProblem, stages: tuple[tuple[int, ...], ...], options: list[int]
) -> tuple[list[float], list[float]]:
    """Per stage: T_s and memory bytes (module docstring), for a plan given by indices.

    `stages[s]` holds the layer indices of stage s, `options[i]` the option index of layer i;
    nothing is checked (`evaluate_pipeline` checks a plan given by names).
    """
    times_s, memory_bytes = [], []
    last = len(stages) - 1
    for s, members in enumerate(stages):
        t_s = mem_bytes = 0.0
        for i in members:
            layer = problem.layers[i]
            option = layer.options[options[i]]
            t_s += option.fwd_s + option.bwd_s
            mem_bytes += layer.state_bytes + problem.in_flight[s] * option.activation_bytes
        if s > 0:
            mem_bytes += problem.in_flight[s] * problem.layers[stages[s - 1][-1]].carry_bytes
        if s < last:
            boundary = problem.layers[members[-1]].boundary_bytes
            t_s += problem.p2p_latency_s + problem.p2p_s_per_byte * boundary
        times_s.append(t_s)
        memory_bytes.append(mem_bytes)
    return times_s, memory_bytes


def score_stages(
    problem: PipelineProblem, times_s: list[float], memory_bytes: list[float]
) -> tuple[float, tuple[float, ...]]:
    """`(step_s, peak bytes per rank)` from per-stage times and memory (`stage_costs`)."""
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
    return score_stages(problem, *stage_costs(problem, by_index, option_index))


def even_plan(
    problem: PipelineProblem,
) -> tuple[float, tuple[tuple[int, ...], ...], list[int]] | None:
    """The fastest plan that fits among the even cuts with one option for every layer:
    `(step_s, stages, options)` by indices (as in `stage_costs`), or None when none fits.

    Stages take L / S layers each (the first L mod S one more); each option name is tried on
    every layer that has it, the others keeping their first option. A cheap plan to start a
    search from: the solvers bound their models by its step (`solvers.pipeline`).
    """
    L, S = len(problem.layers), problem.num_stages
    sizes = [L // S + (s < L % S) for s in range(S)]
    starts = list(itertools.accumulate(sizes, initial=0))
    stages = tuple(tuple(range(a, b)) for a, b in zip(starts, starts[1:]))
    names = dict.fromkeys(o.name for layer in problem.layers for o in layer.options)
    best = None
    for name in names:
        options = [next((k for k, o in enumerate(layer.options) if o.name == name), 0)
                   for layer in problem.layers]
        step_s, peaks = score_stages(problem, *stage_costs(problem, stages, options))
        if max(peaks) <= problem.memory_budget_bytes and (best is None or step_s < best[0]):
            best = (step_s, stages, options)
    return best


def solution_from_plan(
    problem: PipelineProblem,
    stages: tuple[tuple[int, ...], ...],
    options: list[int],
    *,
    status: str,
    gap: float | None,
    solver: str,
    start: float,
) -> PipelineSolution:
    """The PipelineSolution of a plan given by indices (as in `stage_costs`), with its times and
    peaks computed here; `solve_time_s` is the time since `start` (a `time.perf_counter()`)."""
    times_s, memory_bytes = stage_costs(problem, stages, options)
    step_s, peak_bytes = score_stages(problem, times_s, memory_bytes)
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


def infeasible_cut_error(problem: PipelineProblem, min_peak_bytes: float) -> InfeasibleProblem:
    """The InfeasibleProblem every stage-cut solver raises, with its user-facing message."""
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
# Runs of identical layers


@dataclass(frozen=True)
class Run:
    """`size` adjacent identical layers, the first at layer index `first`; `layer` is that one."""

    first: int
    size: int
    layer: Layer


def same_kind(a: Layer, b: Layer) -> bool:
    """Whether swapping `a` and `b` in a plan changes nothing but names (time, memory, sends)."""
    return (a.options, a.state_bytes, a.boundary_bytes, a.carry_bytes) == (
        b.options,
        b.state_bytes,
        b.boundary_bytes,
        b.carry_bytes,
    )


def layer_runs(layers: tuple[Layer, ...]) -> tuple[Run, ...]:
    """The maximal runs of adjacent identical layers, in order."""
    runs: list[Run] = []
    for i, layer in enumerate(layers):
        if runs and same_kind(runs[-1].layer, layer):
            runs[-1] = Run(runs[-1].first, runs[-1].size + 1, runs[-1].layer)
        else:
            runs.append(Run(i, 1, layer))
    return tuple(runs)
