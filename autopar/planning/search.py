"""The outer search: every mesh (pp x dp x tp, and any other axis in `parallelism.AXES`),
microbatch size, schedule, data-parallel flavour and per-layer checkpointing, with stage cuts
solved exactly for each candidate; the fastest plan that fits the memory limit.

    candidate_meshes   every mesh of the world size over the searched axes
    search             for each (mesh, microbatch): one intra-op solve (`layer_costs`), then
                       every flavour x schedule, its stage cut by `solvers.solve_pipeline`,
                       scored by `candidate.evaluate`, pruned by lower bounds; the best
                       candidate becomes the Plan (`assemble.candidate_plan`)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass

import solvers
from autopar import parallelism
from autopar.batches import batch_size, microbatch_inputs
from autopar.cluster import Cluster
from autopar.errors import InfeasibleError, MeshError
from autopar.layers import assign_layers, decision_nodes, layer_order
from autopar.parallelism import DATA, OPS, PIPELINE, POLICIES, SEQUENCE
from autopar.plan import Plan
from autopar.planning import context_parallel, sequence_parallel
from autopar.planning.assemble import candidate_plan
from autopar.planning.candidate import (
    Candidate,
    bubble_weight,
    busiest_rank_bound,
    evaluate,
    even_stages,
    pipeline_problem,
)
from autopar.planning.cost import host_time_s
from autopar.planning.intra_op import op_compute_s
from autopar.planning.layer_costs import (
    LayerCosts,
    hybrid_shard,
    issued_ops,
    layer_costs,
    prepare,
    solve_layers,
    state_bound,
    sub_cluster,
)
from autopar.planning.profile import TrainingPrecision
from autopar.schedules import SCHEDULES, get_schedule
from autopar.units import format_bytes

# Searched unless the user names one. GPipe is left out: 1F1B's bubble with more memory. The
# zero-bubble schedules are in whenever the installed torch has them (the runtime runs them all).
DEFAULT_SCHEDULES = tuple(name for name in ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble",
                                            "ZBVZeroBubble") if name in SCHEDULES)


@dataclass
class SearchSpace:
    meshes: list[dict[str, int]]  # every searched axis present (`parallelism.full_mesh`)
    microbatch_sizes: list[int] | None  # per dp rank; None: every divisor of the per-dp batch
    schedules: tuple[str, ...]
    flavours: tuple[str, ...]  # names in parallelism.FLAVOURS
    checkpoint: tuple[str, ...] = POLICIES  # options offered to blocks


def candidate_meshes(cluster: Cluster, n_layers: int, experts: int = 0,
                     sequence: int = 0) -> list[dict[str, int]]:
    """Every mesh of the world size over the searched axes (`parallelism.AXES`), dp taking the
    ranks the others leave, pp at most the number of layers, an axis that splits experts
    (ep) a divisor of `experts` (the model's expert count; 1 without experts), one that
    splits the sequence (cp) a divisor of `sequence` that leaves each rank enough of it (1 when
    0: the search does not try cp; `context_parallel.search_sizes`, `.searched`). The innermost
    axis varies slowest: with pp, dp, tp, every tp from 1 up, and for each every pp.

    tp across nodes included: its collectives run over the slower inter-node link, yet where
    the work is latency-bound (small layers, many ranks) it still beats the in-node meshes;
    left out, a hand configuration with tp 4 on 2-GPU nodes was 2.2x faster than the plan
    (tests/planning/test_search_grid.py). `search` tries those meshes last."""
    names = parallelism.axis_names(searched=True)
    free = [a for a in reversed(names) if a != DATA]  # innermost first: the outermost loop
    out: list[dict[str, int]] = []

    def place(i: int, left: int, sizes: dict[str, int]) -> None:
        if i == len(free):
            mesh = {**sizes, DATA: left}
            out.append({a: mesh[a] for a in names})
            return
        for n in divisors(left):
            if parallelism.splits_experts(free[i]) and (experts or 1) % n:
                continue
            if parallelism.splits(free[i], SEQUENCE) and not context_parallel.searched(n, sequence):
                continue
            if free[i] != PIPELINE or n <= n_layers:
                place(i + 1, left // n, {**sizes, free[i]: n})

    place(0, cluster.world_size, {})
    return out


def divisors(n: int) -> list[int]:
    """1, ..., n: every d that divides n."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _ops_size(mesh: dict[str, int]) -> int:
    """Devices one op's tensors are split over: the product of the axes that split ops."""
    return math.prod(n for a, n in mesh.items() if parallelism.splits(a, OPS))


def search(trace_fn, example_inputs, cluster: Cluster, space: SearchSpace, *,
           memory_limit_bytes: float | None = None, precision: TrainingPrecision | None = None,
           solver: str = "highs", time_limit_s: float | None = None, log=None) -> Plan:
    """The fastest plan over `space` that fits; `trace_fn(inputs)` traces one microbatch.

    Two passes. First every (mesh, microbatch) with the fastest intra-op sharding of its stage
    mesh, those whose ops are split within a node before those across nodes, each group in the
    order of a lower bound on their candidates (compute alone, plus what the parameters cost
    each flavour at their smallest: `state_bound`), until the best plan found is no slower
    than the group's next bound; a flavour whose parameters' state alone, at its smallest,
    puts a rank over the memory limit is left out of the bound, and a pair where every flavour
    does is scored only if nothing else fits. Then, for those a lower bound does not show to
    lose against the best plan of the first pass: with tp, the fastest sharding with sequence
    parallelism (the residual stream split along the sequence over tp: 1/tp of its activations
    for about the same time, where the first pass's ties go the other way, so that a plan that
    checkpointed to fit may need less of it); and where every candidate went over the memory
    limit, the sharding of least memory (its min-peak ILPs are the slowest solves of a search
    under a tight limit)."""
    start = time.perf_counter()
    precision = precision or TrainingPrecision()
    budget = memory_limit_bytes if memory_limit_bytes is not None else cluster.device.memory_bytes
    batch = batch_size(example_inputs)
    traces: dict[int, tuple] = {}
    solved: dict[tuple, tuple] = {}
    found = _Found(budget, log)

    state_bounds: dict[tuple, list] = {}

    def flavour_bounds(stand, mesh) -> list:
        """The `StateBound` of each flavour `mesh` tries."""
        sub_mesh = parallelism.intra_op_mesh(mesh)
        key = tuple(sub_mesh.items())
        if key not in state_bounds:  # the parameters are the same at every microbatch size
            state_bounds[key] = [
                b for f in _flavours(space, mesh)
                if (b := state_bound(stand.full, cluster, sub_mesh, f,
                                     precision=precision)) is not None]
        return state_bounds[key]

    def fitting_bounds(stand, mesh) -> list:
        """The `StateBound`s of the flavours whose state, at its smallest, leaves the busiest
        pp rank (at least 1/pp of it) within the limit: the others fit nowhere on `mesh`."""
        return [b for b in flavour_bounds(stand, mesh)
                if b.state_bytes / mesh[PIPELINE] <= budget]

    def plan_bound(stand, order, mesh, m, work_s, works: WorkBound) -> float:
        """A lower bound on every candidate that fits of `mesh` with `m` microbatches whose
        intra-op work per microbatch is at least `work_s`, and each layer's at least as
        `works` says (`_compute_bounds`): the best of its fitting flavours' `StateBound`s
        under each schedule (inf when no flavour fits)."""
        pp, best, host_s = mesh[PIPELINE], math.inf, sum(works.host)
        for sched, v in _schedules(space, pp, m, len(order)):
            weight = bubble_weight(sched, pp, m, v)
            busiest = busiest_rank_bound(works.layers, pp, v)
            best = min([best, *(b.step_bound_s(work_s, pp, m, weight, cluster.device, busiest,
                                               host_s=host_s)
                                for b in fitting_bounds(stand, mesh))])
        return best

    def score(stand, profiles, order, mesh, mb, m, mode="fastest"):
        """Score the candidates of one intra-op sharding; None if it has none (MeshError)."""
        sub_mesh = parallelism.intra_op_mesh(mesh)
        key = (mb, tuple(sub_mesh.items()), mode)
        if key not in solved:
            try:
                solved[key] = solve_layers(stand, profiles, cluster, sub_mesh, precision=precision,
                                           solver=solver, time_limit_s=time_limit_s,
                                           least_memory=mode == "least",
                                           sequence_parallel="require" if mode == "sequence"
                                           else "offer",
                                           built=solved.get((mb, tuple(sub_mesh.items()),
                                                             "fastest")))
            except MeshError:
                solved[key] = None
        if solved[key] is None:
            return None
        return [found.add(c) for c in _candidates(
            solved[key], stand, profiles, cluster, sub_mesh, _flavours(space, mesh), space,
            mesh, mb, m, order, budget, solver, time_limit_s, precision, found)]

    # ops split inside a node first, widest first (ties of the bound below go this way)
    mesh_order = lambda x: (_ops_size(x) > cluster.devices_per_node, -_ops_size(x),  # noqa: E731
                            x[PIPELINE])
    ranks = parallelism.batch_ranks
    # a mesh that splits the sequence (cp) runs one sample a microbatch per data-parallel rank:
    # cp is there because one sample's activations bind, and with more samples a microbatch,
    # splitting the batch into more microbatches holds as little for less communication
    pairs = [(mesh, local) for mesh in sorted(space.meshes, key=mesh_order)
             if batch % ranks(mesh) == 0
             for local in space.microbatch_sizes or divisors(batch // ranks(mesh))
             if (batch // ranks(mesh)) % local == 0
             and (local == 1 or parallelism.sequence_ranks(mesh) == 1
                  or space.microbatch_sizes)]

    def traced(mb: int):
        if mb not in traces:  # one trace, stand-in and layer order per microbatch size
            stand, profiles = prepare(trace_fn(microbatch_inputs(example_inputs, mb)))
            traces[mb] = (stand, profiles, layer_order(assign_layers(stand.full)))
        return traces[mb]

    work_bounds: dict[tuple, WorkBound] = {}  # (mb, stage mesh) -> per layer

    def weigh(ks) -> list[tuple[bool, float, int, int, int]]:
        """(ops split across nodes, lower bound, pair, microbatch size, microbatches) of pairs
        `ks`, in the order they are solved: meshes whose ops are split within a node first
        (`_spans_nodes`), each group best first. The bound is compute and parameter charges
        alone, smallest where the most ranks split the work, as they do when tp or cp spans
        nodes; there the collectives, which it leaves out, set the step. First, they would set
        the best so far (GPT 1T on 3,072 GPUs: 8,205 s, then 4,774 s, ... against about
        106 s), and each candidate's stage cuts, which stop at the best so far, would run
        long."""
        out = []
        for k in ks:
            mesh, local = pairs[k]
            mb = local * ranks(mesh)
            stand, profiles, order = traced(mb)
            sub_mesh = parallelism.intra_op_mesh(mesh)
            key = (mb, tuple(sub_mesh.items()))
            if key not in work_bounds:
                work_bounds[key] = _compute_bounds(stand, profiles, cluster, sub_mesh)
            m = batch // mb
            works = work_bounds[key]
            out.append((_spans_nodes(mesh, cluster),
                        plan_bound(stand, order, mesh, m, sum(works.compute), works), k, mb,
                        m))
        return sorted(out)

    def solve(first) -> None:
        """Score pairs `first` (from `weigh`) best first, then the second pass over them."""
        second = []  # what the second pass may try: (mesh, microbatch)s the first pass scored
        for i, (_, bound, k, mb, m) in enumerate(first):
            if found.best is not None and bound >= found.best.step_time_s:
                found.pruned += 1  # (and the rest of its group, which comes in bound order)
                continue
            mesh = pairs[k][0]
            if log:  # a progress line: what is being solved, the best so far, elapsed
                log(f"[{i + 1}/{len(first)}] {_mesh_text(mesh)}, {m} x {mb}: {found.so_far()}, "
                    f"{time.perf_counter() - start:.0f} s")
            stand, profiles, order = traces[mb]
            fits = score(stand, profiles, order, mesh, mb, m)
            if fits:  # scored (not refused by the mesh)
                # all over the limit: the least-memory sharding may fit
                second.append((stand, profiles, order, mesh, mb, m, not any(fits)))

        def second_bound(entry) -> float:
            """A lower bound on the least-memory (or the sequence-parallel) sharding's
            candidates of a (mesh, microbatch): both solve the fastest's problem, restricted,
            so their intra-op work is at least the fastest's objective where that one is
            proven optimal."""
            stand, profiles, order, mesh, mb, m, _ = entry
            key = (mb, tuple(parallelism.intra_op_mesh(mesh).items()))
            _, _, fastest = solved[(*key, "fastest")]
            if fastest.status != "optimal":
                return 0.0
            return plan_bound(stand, order, mesh, m, fastest.objective_s, work_bounds[key])

        # most promising first: a good plan found early lets the bound rule out more of the rest
        again = [(b, i) for b, i in sorted((second_bound(e), i) for i, e in enumerate(second))
                 if found.best is None or b < found.best.step_time_s]
        for n, (bound, i) in enumerate(again):
            stand, profiles, order, mesh, mb, m, none_fit = second[i]
            sub_mesh = parallelism.intra_op_mesh(mesh)
            if found.best is not None and bound >= found.best.step_time_s:
                continue
            # where the fastest sharding fitted by checkpointing, or did not fit at all, the
            # stream split along the sequence may fit with less
            sequence = sequence_parallel.axis(sub_mesh, "offer")
            if log and (sequence or none_fit):
                how = "sequence-parallel" if sequence else "least-memory"
                log(f"[{how} {n + 1}/{len(again)}] {_mesh_text(mesh)}, {m} x {mb}: "
                    f"{found.so_far()}, {time.perf_counter() - start:.0f} s")
            if sequence:
                score(stand, profiles, order, mesh, mb, m, "sequence")
            if none_fit:
                score(stand, profiles, order, mesh, mb, m, "least")

    # every pair's lower bound before any solve, then the pairs most promising first
    # (best-first branch and bound): a good plan found early rules out the rest by their bound.
    # A pair whose parameters' state alone puts a rank over the limit is left out: it is
    # scored only if nothing else fits, for the error's smallest peak.
    fit, over = [], []
    if pairs:
        # the parameters and the layers are the same at every microbatch size: one trace says
        # whether a pipeline is too deep or the state too big
        mesh, local = pairs[0]
        stand, _, order = traced(local * ranks(mesh))
    for k, (mesh, _) in enumerate(pairs):
        if mesh[PIPELINE] <= len(order):
            (fit if fitting_bounds(stand, mesh) else over).append(k)
    solve(weigh(fit))
    if found.best is None and over:
        solve(weigh(over))
    else:
        found.too_big = len(over)
    best, smallest = found.best, found.smallest
    if best is None:
        if smallest is None:
            raise MeshError(
                f"no mesh, microbatch size and schedule in the search space fits a batch of "
                f"{batch} on {cluster.world_size} devices: check that the batch divides by dp"
            )
        raise InfeasibleError(
            f"no plan fits the memory limit of {format_bytes(budget)} per device: the smallest "
            f"peak found is {format_bytes(smallest[0])} ({smallest[1]}). Raise memory_limit, use "
            "more devices, or shrink the batch.",
            min_peak_bytes=smallest[0], budget_bytes=budget,
        )
    if log:
        log(f"searched {found.tried} candidates ({found.pipelined} with pipeline stages; "
            f"{found.pruned} meshes x microbatches ruled out by a bound before solving, "
            f"{found.too_big} by their state's memory) in "
            f"{time.perf_counter() - start:.1f} s")
    return candidate_plan(best, cluster, precision,
                          solver={"candidates": found.tried, "stage_cut": best.cut})


@dataclass
class _Found:
    """The search so far: the fastest candidate that fits, the smallest peak of those that do
    not (for the error when none fits), and how many candidates were scored."""

    budget: float
    log: object = None
    best: Candidate | None = None
    smallest: tuple[float, str] | None = None
    tried: int = 0
    pipelined: int = 0  # of those tried, candidates with pipeline stages
    pruned: int = 0  # (mesh, microbatch) pairs a bound ruled out before their solve
    too_big: int = 0  # ... and pairs whose state alone is over the limit in every flavour

    def so_far(self) -> str:
        return f"best so far {self.best.step_time_s:.4g} s" if self.best else "none fits yet"

    def add(self, c: Candidate) -> bool:
        """Keep `c` if it fits and is the fastest yet; say whether it fits."""
        self.tried += 1
        self.pipelined += c.pp > 1
        if c.peak_memory_bytes > self.budget:
            if self.smallest is None or c.peak_memory_bytes < self.smallest[0]:
                self.smallest = (c.peak_memory_bytes, c.describe())
            return False
        if self.best is None or c.step_time_s < self.best.step_time_s:
            self.best = c
            if self.log:
                self.log(f"best so far: {c.describe()} step {c.step_time_s:.4g} s")
        return True


def _spans_nodes(mesh: dict[str, int], cluster: Cluster) -> bool:
    """Whether one op's work is split over more ranks than a node holds (every axis but pp and
    dp splits it: tp, cp, ep), so that its collectives cross nodes."""
    split = math.prod(n for a, n in mesh.items() if a not in (PIPELINE, DATA))
    return split > cluster.devices_per_node


def _mesh_text(mesh: dict[str, int]) -> str:
    return " ".join(f"{a}={n}" for a, n in mesh.items())


def _flavours(space, mesh) -> tuple[str, ...]:
    """The data-parallel flavours a mesh's candidates try: replicate alone without dp."""
    return space.flavours if parallelism.state_ranks(mesh) > 1 else (parallelism.REPLICATE,)


def _candidates(solved, stand, profiles, cluster, sub_mesh, flavours, space, mesh, mb, m, order,
                budget, solver, time_limit_s, precision, found):
    """Scored candidates of one intra-op solution: every flavour x schedule, pruned by bound
    against `found.best` as it stands when each is scored."""
    pp, dp = mesh[PIPELINE], mesh[DATA]
    stage_cluster = sub_cluster(cluster, math.prod(sub_mesh.values()))
    for flavour in flavours:
        if parallelism.get_flavour(flavour).hybrid and (DATA not in sub_mesh or hybrid_shard(
                stage_cluster, dp, parallelism.inner_size(sub_mesh, DATA)) is None):
            continue  # hybrid sharding needs dp over nodes (not cp alone)
        costs = layer_costs(stand, profiles, cluster, sub_mesh, flavour, precision=precision,
                            solved=solved)
        costs.layers = _offered(costs.layers, space.checkpoint)
        # a split backward cannot run selective checkpointing (Schedule.checkpoint_problem)
        split = dataclasses.replace(costs, layers=_offered(
            costs.layers, tuple(p for p in space.checkpoint if p != "selective")))
        for schedule, v in _schedules(space, pp, m, len(order)):
            runnable = split if get_schedule(schedule).split_backward else costs
            best = found.best
            if best is not None and _step_bound(runnable, pp, m, schedule, v) >= best.step_time_s:
                continue
            yield _best_cut(runnable, cluster, mesh, mb, m, schedule, v, flavour, order, budget,
                            solver, time_limit_s, best)


@dataclass(frozen=True)
class WorkBound:
    """Per layer of the full graph, in pipeline order, two lower bounds on one microbatch's
    work of the layer on a stage mesh (`_compute_bounds`). A layer costs the slower of the
    device and the host (`layer_costs`), and the device's share also holds the flavour's
    collectives of each microbatch, which the host's does not: so a layer's work is at least
    the larger of the two, and the sum of the layers' at least the larger of the computes plus
    those collectives and the hosts (`StateBound.step_bound_s`)."""

    compute: tuple[float, ...]  # its ops' compute alone, no communication
    host: tuple[float, ...]  # the host's time to issue its ops

    @property
    def layers(self) -> tuple[float, ...]:
        return tuple(max(c, h) for c, h in zip(self.compute, self.host))


def _compute_bounds(stand, profiles, cluster: Cluster, sub_mesh: dict[str, int]) -> WorkBound:
    """The `WorkBound` of each layer on a stage mesh, before any solve. Compute: each op's
    forward and backward alone, split over the best of the ways its strategies can split work
    (over any set of the mesh's axes). Host: the replay runtime's time to issue the layer's
    ops, which no sharding shortens. Without the host's, a small model on many GPUs, where the
    host sets the pace, had bounds of half its steps and few pairs were ruled out (Llama 2 7B
    on 1,024 H100s). A layer the stand-in dropped takes the bounds of the layer that stands
    for it."""
    splits = {1}
    for n in sub_mesh.values():
        splits |= {k * n for k in splits}
    layer_of = assign_layers(stand.full)
    planned: dict[str, float] = {}
    for n in decision_nodes(stand.traced.graph_module):  # the ILP's nodes
        if n.op == "call_function" and n.name in profiles:
            layer = layer_of[n.name]
            planned[layer] = planned.get(layer, 0.0) + min(
                op_compute_s(n, profiles[n.name], cluster.device, k) for k in splits)
    issued = issued_ops(stand, layer_of)
    layers = [stand.planned_layer(name) for name in layer_order(layer_of)]
    return WorkBound(compute=tuple(planned.get(x, 0.0) for x in layers),
                     host=tuple(host_time_s(issued.get(x, 0), cluster.device) for x in layers))


def _step_bound(costs: LayerCosts, pp: int, m: int, schedule: str, v: int) -> float:
    """A lower bound on any cut's step time: with W one microbatch's work over all layers
    (fastest options), sum_s T_s >= W and max_r T_rank >= `busiest_rank_bound` of the layers'
    fastest works (at least W / pp), so the stage model's b * sum_s T_s + (m - b) * max_r
    T_rank is at least b W + (m - b) times that; plus the dp sync, whose busiest rank holds at
    least 1/pp of it."""
    works = [min(o.fwd_s + o.bwd_s for o in x.options) for x in costs.layers]
    b = bubble_weight(schedule, pp, m, v)
    sync = sum(costs.sync_s.values())
    return b * sum(works) + (m - b) * busiest_rank_bound(works, pp, v) + sync / pp


def _offered(layers, policies) -> tuple[solvers.Layer, ...]:
    """Each layer with only the checkpoint options the search space allows ("none" always)."""
    return tuple(
        dataclasses.replace(x, options=tuple(o for o in x.options
                                             if o.name == "none" or o.name in policies))
        for x in layers)


def _schedules(space, pp, m, n_layers):
    if pp == 1:
        yield "1F1B", 1
        return
    for name in space.schedules:
        sched = get_schedule(name)
        v = sched.default_v(None)
        if pp * v > n_layers:
            continue
        try:
            sched.check(pp, m, v)
        except ValueError:
            continue
        yield sched.name, v


def _best_cut(costs, cluster, mesh, mb, m, schedule, v, flavour, order, budget, solver,
              time_limit_s, best=None) -> Candidate:
    """The stage ILP's cut, and the even cut with the cheapest options that fit, scored by
    `evaluate` (which also charges the per-step dp sync the ILP leaves out); the faster wins.
    The ILP is cut off at the best plan so far: `evaluate`'s step is at least the ILP's
    objective (the same stage model, then the timeline's max and the dp sync on top), so a cut
    the cutoff rules out could not have won."""
    pp = mesh[PIPELINE]
    base = dict(mesh=dict(mesh), microbatch_size=mb, num_microbatches=m, schedule=schedule,
                v=v, flavour=flavour, costs=costs)
    found = []
    problem = pipeline_problem(costs, cluster, pp, m, schedule, v, budget)
    if _least_peak_bound(problem) + costs.temporaries_bytes <= budget:
        try:
            sol = solvers.solve_pipeline(problem, solver=solver,
                                         time_limit_s=time_limit_s or STAGE_TIME_LIMIT_S,
                                         cutoff_s=best.step_time_s if best else None)
            found.append(evaluate(Candidate(stages=sol.stages, options=dict(sol.options),
                                            cut=_cut_status(sol), **base), cluster))
        except solvers.InfeasibleProblem as e:
            found.append(Candidate(stages=(), options={}, peak_memory_bytes=e.min_peak_bytes
                                   + costs.temporaries_bytes, **base))
        except solvers.NoSolutionFound:
            pass  # the even cuts below still stand
    for how in {o.name: None for x in costs.layers for o in x.options}:
        opts = {x.name: how if how in [o.name for o in x.options] else "none"
                for x in costs.layers}
        found.append(evaluate(Candidate(stages=even_stages(order, pp * v), options=opts,
                                        cut="even", **base), cluster,
                              losing_at=best.step_time_s if best else None))
    fits = [c for c in found if c.stages and c.peak_memory_bytes <= budget]
    if fits:
        return _on_timeline(min(fits, key=lambda c: c.step_time_s), problem, cluster, budget,
                            best)
    return min(found, key=lambda c: c.peak_memory_bytes)


def _on_timeline(c: Candidate, problem, cluster, budget, best) -> Candidate:
    """`c`, or a cut made from it by swapping the sizes of two stages on one rank, when that is
    faster as the schedule runs it and fits.

    Why: the stage ILP prices a cut by each rank's total and the sum over stages, so cuts that
    only move layers between the stages of one rank often tie there, while the timeline (what
    `evaluate` charges) tells them apart: the golden gpt-small plan's two ties, (1, 4, 8, 1)
    and (1, 1, 8, 4) layers on ranks (0, 1, 0, 1), are 4% apart. Greedy, first improvement,
    until no swap helps or `POLISH_TRIES` swaps were tried; only for a rank with several
    stages, a schedule of at most `POLISH_MAX_ACTIONS` actions, when the timeline charged more
    than the stage model, and when the stage model's step could still beat `best`."""
    ranks = problem.ranks
    if (len(c.stages) <= c.pp or c.cut == "even"
            or len(c.stages) * c.num_microbatches > POLISH_MAX_ACTIONS):
        return c
    stage_model_s, _ = solvers.evaluate_pipeline(problem, c.stages, c.options)
    if c.pipeline_s <= stage_model_s or (
            best is not None and stage_model_s + c.dp_sync_s >= best.step_time_s):
        return c
    pairs = [(a, b) for a in range(len(ranks)) for b in range(a + 1, len(ranks))
             if ranks[a] == ranks[b]]
    tries = POLISH_TRIES  # each a timeline: long ones on deep pipelines of many microbatches
    improved = True
    while improved and tries:
        improved = False
        for a, b in pairs:
            sizes = [len(st) for st in c.stages]
            if sizes[a] == sizes[b] or not tries:
                continue
            tries -= 1
            sizes[a], sizes[b] = sizes[b], sizes[a]
            other = evaluate(dataclasses.replace(c, stages=_restage(c.stages, sizes)), cluster)
            if other.peak_memory_bytes <= budget and other.step_time_s < c.step_time_s:
                c, improved = other, True
    return c


# Swaps `_on_timeline` tries per candidate, and the largest schedule (stages x microbatches) it
# polishes at all: each swap runs a timeline, and on GPT-3 175B's search polishing 64-stage
# interleaved candidates of 192 microbatches took 30 s and changed no plan.
POLISH_TRIES = 8
POLISH_MAX_ACTIONS = 1024


def _restage(stages: tuple[tuple[str, ...], ...], sizes: list[int]) -> tuple[tuple[str, ...], ...]:
    """The same layers in order, cut into stages of `sizes`."""
    flat = [name for st in stages for name in st]
    ends = list(itertools.accumulate(sizes))
    return tuple(tuple(flat[e - n:e]) for n, e in zip(sizes, ends))


# A safety net: with runs of identical layers the stage ILP counts layers per run and proves
# GPT-3-sized cuts in seconds, but a model whose layers all differ gets the per-layer ILP, which
# can take minutes on many stages. Past this limit (when the caller sets none) its best cut so
# far competes with the even cuts, and the plan records that it is not proven optimal.
STAGE_TIME_LIMIT_S = 20.0


def _least_peak_bound(problem: solvers.PipelineProblem) -> float:
    """A lower bound on the busiest rank's memory: every layer's state and its smallest
    activations (at the smallest in-flight count), spread evenly over the ranks."""
    ranks = len(set(problem.stage_of_rank)) if problem.stage_of_rank else problem.num_stages
    total = sum(x.state_bytes + min(problem.in_flight) * min(o.activation_bytes
                                                             for o in x.options)
                for x in problem.layers)
    return total / ranks


def _cut_status(sol) -> str:
    if sol.status == "optimal":
        return "ilp-optimal"
    gap = f", gap {sol.gap:.2%}" if sol.gap is not None else ""
    return f"ilp-feasible{gap}"


def check_schedule(name: str) -> str:
    if name not in SCHEDULES and name.lower() not in {s.lower() for s in SCHEDULES}:
        get_schedule(name)  # raises with the list
    return get_schedule(name).name
