"""One candidate plan and its score: a mesh, microbatching, schedule, data-parallel flavour,
stage cut and per-layer checkpointing, priced from its `LayerCosts`.

    Candidate          the configuration and, once scored, what it costs
    pipeline_problem   the candidate's stage-cut problem (`solvers.PipelineProblem`)
    evaluate           step time and per-device memory of one cut + options (the only scorer:
                       the search and `manual_plan` both use it)

Cost model of one candidate (all seconds per training step, per device):

    pipeline_s   stage model of solvers.pipeline_problem (Narayanan et al. SC'21): b * sum_s T_s
                 + (m - b) * max_r T_rank_r, T_s = per-microbatch fwd + bwd of the stage's layers
                 (intra-op compute + resharding on the stage mesh) + p2p send of the boundary
                 over the pp link (every value made before the cut and read after it:
                 `layer_costs.boundary_bytes`); b = 1 (GPipe, 1F1B), 1/v (interleaved),
                 about 1/(3v) for zero bubble (`bubble_weight`). Stage s runs on the rank
                 the schedule puts it (`Schedule.stage_ranks`: s % pp, or ZBV's V). With a
                 split backward a "full" layer recomputes its forward twice (see
                 autopar/runtime/pipeline.py), and "selective" is not offered
                 (`Schedule.checkpoint_problem`). Memory per rank: the stage model's, with
                 what a stage receives from further back than the layer before it
                 (`solvers.Layer.carry_bytes`) held per microbatch in flight.
    dp_sync_s    once per step, after gradient accumulation, max over pp ranks of its layers':
                 the flavour's once-a-step collectives (replicate: all-reduce of the gradients
                 over dp); plus the optimizer step, a memory-bound pass over the rank's local
                 state (`cost.optimizer_step_s`), and with several microbatches the gradient
                 accumulation (`cost.gradient_accumulation_s`). The sharding flavours reduce
                 inside each microbatch's traced graphs, so their collectives are in the layer
                 times: forward all-gathers the weights (gathered again in backward by a
                 flavour that `regathers`), backward reduce-scatters the gradients (ZeRO,
                 Rajbhandari et al. 2020, sec. 5; hsdp then all-reduces each shard across the
                 replicas). Serial, although on CUDA the replay runtime overlaps these
                 collectives with compute (autopar/runtime/collective_overlap.py,
                 gradient_buckets.py): on 2 H200s this predicted 0.91-1.03 of the measured
                 steps (docs/benchmarks/2026-11-29-multigpu-x2-overlap/), so no overlap is
                 assumed.
    step_s       pipeline_s + dp_sync_s (no overlap: a conservative serial model).

    The stage model is what the stage ILP minimises; a candidate's pipeline_s is the larger of
    it and the timeline of the same cut over torch's action lists (`Schedule.step_time_s`:
    each stage's own forward and backward, `_timeline_s`). The two agree on equal stages (b is
    fitted to the timeline there); with uneven stages of an interleaved or zero-bubble schedule
    the stage model can be well under what torch runs, so no candidate is priced below the
    timeline, and the search's bounds (which bound the stage model) still hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import solvers
from autopar.cluster import Cluster
from autopar.errors import AutoparError
from autopar.parallelism import DATA, PIPELINE
from autopar.planning import cost
from autopar.planning.layer_costs import LayerCosts
from autopar.schedules import get_schedule


@dataclass
class Candidate:
    """One full configuration and what it costs (per device)."""

    mesh: dict[str, int]  # every searched axis (parallelism.AXES), outermost first
    microbatch_size: int  # the traced batch (over all dp ranks)
    num_microbatches: int
    schedule: str
    v: int
    flavour: str
    stages: tuple[tuple[str, ...], ...]
    options: dict[str, str]
    costs: LayerCosts = field(repr=False)
    step_time_s: float = math.inf
    pipeline_s: float = 0.0
    dp_sync_s: float = 0.0
    accumulate_s: float = 0.0  # of dp_sync_s: gradient accumulation over the microbatches
    peak_memory_bytes: float = math.inf
    rank_memory: list[dict[str, float]] = field(default_factory=list)
    bubble_fraction: float = 0.0
    p2p_s: float = 0.0
    cut: str = ""  # how the stage cut was found: "ilp-optimal", "ilp-feasible, gap x%", "even"

    @property
    def pp(self) -> int:
        return self.mesh[PIPELINE]

    @property
    def dp(self) -> int:
        return self.mesh[DATA]

    def describe(self) -> str:
        """"pp=2 dp=4 tp=2, 8 x 4, 1F1B, zero2": for logs and errors."""
        axes = " ".join(f"{a}={n}" for a, n in self.mesh.items())
        return (f"{axes}, {self.num_microbatches} x {self.microbatch_size}, {self.schedule}, "
                f"{self.flavour}")


def bubble_weight(schedule: str, pp: int, m: int, v: int) -> float:
    """b of the stage model b * sum_s T_s + (m - b) * max_r T_rank (solvers.pipeline_problem).

    With equal stages (T_s = t, pp*v of them) the model gives v*t*(m + b*(pp-1)): an idle
    fraction b*(pp-1) / (m + b*(pp-1)). 1F1B and GPipe idle (pp-1)/(m+pp-1), so b = 1;
    interleaved 1F1B (pp-1)/(v*m+pp-1), so b = 1/v. Zero-bubble schedules fill the warm-up and
    cool-down with the weight-grads W of other microbatches, so a hop costs F + I and not
    F + B: a third of the time when F = I = W. Their b is the one whose idle fraction equals
    `Schedule.bubble_fraction` (simulated on torch's actions, F = I = W): 1/(3v) where the
    closed form (pp-1)/(3*v*m+pp-1) holds, larger with few microbatches, where it does not.
    """
    if pp == 1:
        return 1.0
    # every schedule from its simulated bubble, so that interleaved 1F1B with m < pp (torch's
    # short round, a larger bubble than (pp-1)/(v*m+pp-1)) is charged what torch runs too
    f = get_schedule(schedule).bubble_fraction(pp, m, v)
    return min(f * m / ((1.0 - f) * (pp - 1)), float(m))


def busiest_rank_bound(works: Sequence[float], pp: int, v: int) -> float:
    """A lower bound on max_r T_rank of the stage model over every cut of layers whose times
    are at least `works` (in pipeline order) into pp * v contiguous stages, v a rank.

    Every rank holds a layer at most as heavy as the heaviest, and the busiest at least 1/pp of
    the total. With one stage a rank (v = 1) a rank's layers are one contiguous stretch, so the
    busiest holds at least the least largest part of any cut of `works` into pp stretches: on
    96 equal blocks and 64 ranks, two blocks, not 1.5. Found by bisection, from below: the
    result never passes the least largest part."""
    total = sum(works)
    low = max(max(works, default=0.0), total / pp)
    if v != 1 or pp == 1 or low <= 0.0:
        return low

    def cuts_within(cap: float) -> bool:  # greedy: fill each stretch up to `cap`
        parts, held = 1, 0.0
        for w in works:
            if held + w > cap:
                parts, held = parts + 1, 0.0
            held += w
        return parts <= pp

    high = total
    for _ in range(40):  # to 1e-12 of the total: the bound needs no more
        mid = (low + high) / 2
        if cuts_within(mid):
            high = mid
        else:
            low = mid  # no cut into pp stretches has every part within `mid`
    return low


def pipeline_problem(costs: LayerCosts, cluster: Cluster, pp, m, schedule, v, budget):
    """The stage-cut problem of `costs` on `pp` ranks, `m` microbatches, `schedule` with `v`
    stages per rank, under `budget` bytes per device."""
    sched = get_schedule(schedule)
    n = pp * v
    in_flight = sched.in_flight(pp, m, v) if pp > 1 else (1,)
    full = (pp, *costs.sub_mesh.values())
    link = cluster.axis_links(full)[0]
    layers = costs.layers
    if n == 1:  # one stage holds every reader of a tied weight, and one copy of it
        less = {}
        for t in costs.tied:
            for later in t.readers[1:]:
                less[later] = less.get(later, 0.0) + sum(t.state.values())
        layers = tuple(dataclasses.replace(x, state_bytes=x.state_bytes - less.get(x.name, 0.0))
                       for x in layers)
    if sched.split_backward and pp > 1:
        # non-reentrant checkpointing recomputes once per backward call: at I and again at W
        # (stage 0 runs one whole backward and recomputes once; charged twice all the same);
        # and a split backward runs op by op (the eager runtime's host time)
        def split(x, o):
            hf, hb = cost.host_split_s(costs.issued[x.name], cluster.device, "eager")
            f, b = max(o.fwd_s, hf), max(o.bwd_s, hb)
            return dataclasses.replace(o, fwd_s=f, bwd_s=b + f if o.name == "full" else b)

        layers = tuple(dataclasses.replace(x, options=tuple(split(x, o) for o in x.options))
                       for x in layers)
    return solvers.PipelineProblem(
        layers=layers, num_stages=n, num_microbatches=m, in_flight=tuple(in_flight),
        stage_of_rank=sched.stage_ranks(pp, v),
        memory_budget_bytes=max(budget - costs.temporaries_bytes, 0.0),
        p2p_s_per_byte=1.0 / link.bandwidth_bytes_per_s if pp > 1 else 0.0,
        p2p_latency_s=link.latency_s + _pipeline_stage_s(cluster) if pp > 1 else 0.0,
        bubble_weight=bubble_weight(schedule, pp, m, v),
    )


def evaluate(c: Candidate, cluster: Cluster, *, losing_at: float | None = None) -> Candidate:
    """Fill in c's step time, memory and breakdown from its cut and options (the one scorer).

    `losing_at`: a step the caller already has. When the stage model and the dp sync alone
    reach it, the timeline (the costly part) is not run: the step is then that lower bound,
    at or above `losing_at`, so `c` cannot win, and its memory is exact as always."""
    refused = get_schedule(c.schedule).checkpoint_problem(c.options)
    if refused:
        raise AutoparError(refused)
    problem = pipeline_problem(c.costs, cluster, c.pp, c.num_microbatches, c.schedule, c.v,
                               math.inf)
    stage_model_s, _ = solvers.evaluate_pipeline(problem, c.stages, c.options)
    by_name = {layer.name: layer for layer in c.costs.layers}
    ranks = [dict(parameters=0.0, gradients=0.0, optimizer=0.0, activations=0.0,
                  temporaries=c.costs.temporaries_bytes) for _ in range(c.pp)]
    sync = [0.0] * c.pp
    accumulate = [0.0] * c.pp
    held: list[set[str]] = [set() for _ in range(c.pp)]  # each rank's layers
    for s, members in enumerate(c.stages):
        r = problem.stage_of_rank[s]
        held[r].update(members)
        if s > 0:  # what the stage receives from further back than the layer before it
            carried = by_name[c.stages[s - 1][-1]].carry_bytes
            ranks[r]["activations"] += problem.in_flight[s] * carried
        for name in members:
            opt = next(o for o in by_name[name].options if o.name == c.options[name])
            for k, val in c.costs.state[name].items():
                ranks[r][k] += val
            ranks[r]["activations"] += problem.in_flight[s] * opt.activation_bytes
            acc = cost.gradient_accumulation_s(c.costs.state[name]["gradients"],
                                               c.num_microbatches, cluster.device)
            sync[r] += c.costs.sync_s[name] + c.costs.update_s[name] + acc
            accumulate[r] += acc
    for r in range(c.pp):  # a tied weight: one copy per rank, however many readers it holds
        for t in c.costs.tied:
            extra = t.duplicates(held[r])
            for k, val in t.state.items():
                ranks[r][k] -= extra * val
            sync[r] -= extra * t.sync_s
    worst = max(range(c.pp), key=lambda r: sync[r])
    if losing_at is not None and stage_model_s + sync[worst] >= losing_at:
        pipe_s = stage_model_s
    else:
        pipe_s = max(stage_model_s, _timeline_s(problem, c))
    c.pipeline_s = pipe_s
    c.dp_sync_s = sync[worst]
    c.accumulate_s = accumulate[worst]
    c.step_time_s = pipe_s + c.dp_sync_s
    c.rank_memory = ranks
    c.peak_memory_bytes = max(sum(r.values()) for r in ranks)
    c.bubble_fraction = (get_schedule(c.schedule).bubble_fraction(c.pp, c.num_microbatches, c.v)
                         if c.pp > 1 else 0.0)
    c.p2p_s = sum(problem.p2p_latency_s + problem.p2p_s_per_byte * by_name[st[-1]].boundary_bytes
                  for st in c.stages[:-1]) * c.num_microbatches
    return c


def _timeline_s(problem: solvers.PipelineProblem, c: Candidate) -> float:
    """c's step as torch runs its schedule: each stage's forward and backward per microbatch
    (its layers' chosen options, the boundary send split between the forward's activations and
    the backward's gradients) through `Schedule.step_time_s`, the timeline over torch's own
    action lists. The stage model balances each rank's total only, so with uneven stages of an
    interleaved or zero-bubble schedule it can be well under this (1.45x on GPT-3 175B's
    interleaved plan of 1 to 24 blocks a stage, issue 17)."""
    if c.pp == 1:
        return 0.0  # one stage: the stage model's m * T is exact
    by_name = {x.name: x for x in problem.layers}
    fwd, bwd = [], []
    for s, members in enumerate(c.stages):
        f = b = 0.0
        for name in members:
            o = next(o for o in by_name[name].options if o.name == c.options[name])
            f, b = f + o.fwd_s, b + o.bwd_s
        if s < len(c.stages) - 1:
            send = problem.p2p_latency_s + problem.p2p_s_per_byte * by_name[members[-1]].boundary_bytes
            f, b = f + send / 2, b + send / 2
        fwd.append(f)
        bwd.append(b)
    return get_schedule(c.schedule).step_time_s(fwd, bwd, c.num_microbatches, c.pp, c.v)


def even_stages(order: list[str], n: int) -> tuple[tuple[str, ...], ...]:
    """Layers cut into n contiguous runs of (nearly) equal count, as Megatron does."""
    return tuple(tuple(order[i * len(order) // n:(i + 1) * len(order) // n]) for i in range(n))


def _pipeline_stage_s(cluster: Cluster) -> float:
    """The pipeline runtime's own time per stage and microbatch (Calibration.pipeline_stage_s),
    charged with each stage's send: 0 on an uncalibrated device."""
    cal = cluster.device.calibration
    return cal.pipeline_stage_s if cal else 0.0


