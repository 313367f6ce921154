"""Tests for solvers.pipeline_runs, the count model over runs of identical layers: it equals the
brute force and the per-layer ILP on seeded random instances, its rank bounds are exact, and deep
GPT-like stacks are proven optimal against an independent rank-by-rank search."""

import bisect
import dataclasses
import itertools
import random
from functools import partial

import pytest

from solvers import (
    InfeasibleProblem,
    NoPlanBelowCutoff,
    PipelineProblem,
    evaluate_pipeline,
    solve_pipeline,
    solve_pipeline_brute_force,
)
import solvers.pipeline as pipeline_module
from solvers.pipeline_problem import Run, layer_runs
from solvers.pipeline_runs import build_pipeline_runs_ilp, fastest_fill, rank_time_cap
from tests.solvers.pipeline_instances import (
    FULL,
    INF,
    NONE,
    gpt_like,
    layer,
    problem,
    run_template,
    runs_problem,
)

RUN_SEEDS = range(100)


def check_plan(p: PipelineProblem, sol) -> None:
    """A valid cut and options that evaluate to what the solution reports, within budget."""
    assert sol.status == "optimal" and sol.gap <= 1e-6
    step_s, peak_bytes = evaluate_pipeline(p, sol.stages, sol.options)
    assert (step_s, peak_bytes) == (sol.step_time_s, sol.peak_memory_bytes)
    assert max(peak_bytes) <= p.memory_budget_bytes
    assert len(sol.stages) == p.num_stages and len(peak_bytes) == p.num_ranks


def outcome(solve, p: PipelineProblem):
    """("feasible", step seconds) or ("infeasible", smallest peak bytes)."""
    try:
        sol = solve(p)
    except InfeasibleProblem as err:
        return "infeasible", err.min_peak_bytes
    if solve is not solve_pipeline_brute_force:
        check_plan(p, sol)
    return "feasible", sol.step_time_s


@pytest.mark.parametrize("seed", RUN_SEEDS)
def test_runs_formulation_equals_brute_force_and_per_layer_ilp(seed):
    p = runs_problem(random.Random(7000 + seed))
    expected = outcome(solve_pipeline_brute_force, p)
    for formulation in ("runs", "layers"):
        kind, value = outcome(partial(solve_pipeline, formulation=formulation), p)
        assert kind == expected[0], formulation
        assert value == pytest.approx(expected[1], rel=1e-9), formulation


def test_runs_instances_cover_the_cases():
    problems = [runs_problem(random.Random(7000 + seed)) for seed in RUN_SEEDS]
    outcomes = [outcome(solve_pipeline_brute_force, p)[0] for p in problems]
    assert outcomes.count("feasible") >= 50 and outcomes.count("infeasible") >= 30
    runs = [layer_runs(p.layers) for p in problems]
    assert sum(any(r.size >= 3 for r in rs) for rs in runs) >= 70
    assert sum(len(rs) >= 3 for rs in runs) >= 30
    options = {len(r.layer.options) for rs in runs for r in rs if r.size >= 2}
    assert options == {1, 2, 3}
    assert sum(len(set(p.ranks)) < p.num_stages for p in problems) >= 40  # ranks with 2+ stages
    assert sum(p.num_stages >= 4 for p in problems) >= 25
    # Feasible instances whose model has rank_bound rows, so a wrong bound would show.
    bounded = [o for p, o in zip(problems, outcomes) if build_pipeline_runs_ilp(p).holds]
    assert bounded.count("feasible") >= 12


@pytest.mark.parametrize("seed", range(5))
def test_runs_formulation_with_cbc(seed):
    p = runs_problem(random.Random(7000 + seed))
    expected = outcome(solve_pipeline_brute_force, p)
    kind, value = outcome(partial(solve_pipeline, formulation="runs", solver="cbc"), p)
    assert kind == expected[0] and value == pytest.approx(expected[1], rel=1e-9)


@pytest.mark.parametrize("seed", range(30))
def test_fastest_fill_equals_enumeration(seed):
    # The least time for q identical layers on one stage within a budget, against every multiset
    # of options; long runs only with 1-2 options (the enumeration is linear in q then).
    rng = random.Random(9000 + seed)
    template = run_template(rng, 0)
    extra = rng.random() < 0.3
    options = template.options + (NONE,) * extra
    if len({o.name for o in options}) < len(options):
        options = template.options
    size = rng.randint(1, 8) if len(options) > 2 else rng.randint(1, 100)
    run = Run(0, size, dataclasses.replace(template, options=options))
    in_flight = rng.randint(0, 6)
    per_layer = [run.layer.state_bytes + in_flight * o.activation_bytes for o in options]
    budget = float(rng.randint(0, int(size * max(per_layer) / 1e6))) * 1e6 + 0.5e6
    expected = []
    for q in range(size + 1):
        best = INF
        for chosen in itertools.combinations_with_replacement(range(len(options)), q):
            if sum(per_layer[k] for k in chosen) <= budget:
                best = min(best, sum(options[k].fwd_s + options[k].bwd_s for k in chosen))
        expected.append(best)
    got = fastest_fill(run, in_flight, budget)
    assert got == pytest.approx(expected, rel=1e-12)


def test_runs_model_names_are_readable():
    layers = [
        layer("embed"),
        *(layer(f"block.{i}", options=(NONE, FULL)) for i in range(4)),
        layer("head", state_bytes=1.0),
    ]
    lp = build_pipeline_runs_ilp(problem(layers, num_stages=3, memory_budget_bytes=95.0)).lp
    for name in (
        "one_end(1)",
        "done(block.0,1)",
        "take(head,2)",
        "non_empty(0)",
        "memory(2)",
        "rank_time(0)",
        "rank_bound(block.0,0)",
        "total(block.0,0)",
    ):
        assert lp.get_constraint_by_name(name) is not None, name


def test_runs_model_equals_per_layer_ilp_beyond_brute_force():
    # 14 layers in 8 stages with 2 options: 28 million plans, but the per-layer ILP proves it.
    p = gpt_like(blocks=12, pp=4, v=2, m=16, budget=23e9)
    runs, layers = (solve_pipeline(p, formulation=f) for f in ("runs", "layers"))
    check_plan(p, runs)
    assert layers.status == "optimal"
    assert runs.step_time_s == pytest.approx(layers.step_time_s, rel=1e-6)


def stage_choices(p, s, blocks):
    """(seconds, bytes) of stage s holding `blocks` blocks (plus "pre" if first, "post" if
    last), for every count of checkpointed blocks and every option of pre and post."""
    pre, block, post = p.layers[0], p.layers[1], p.layers[-1]
    ends = [x for x, here in ((pre, s == 0), (post, s == p.num_stages - 1)) if here]
    send = p.p2p_latency_s + p.p2p_s_per_byte * block.boundary_bytes
    out = []
    for chosen in itertools.product(*(x.options for x in ends)):
        for n in range(blocks + 1):  # n blocks take "full", the others "none"
            picks = [
                *zip(ends, chosen),
                *[(block, block.options[1])] * n,
                *[(block, block.options[0])] * (blocks - n),
            ]
            seconds = sum(o.fwd_s + o.bwd_s for _, o in picks)
            size = sum(x.state_bytes + p.in_flight[s] * o.activation_bytes for x, o in picks)
            out.append((seconds + send * (s < p.num_stages - 1), size))
    return out


def least_per_total(p, stages, blocks):
    """Rank holding `stages` (one or two): total blocks -> least seconds within the budget."""
    per_stage = []
    for s in stages:
        per_count = []
        for k in range(0 if s in (0, p.num_stages - 1) else 1, blocks + 1):
            choices = sorted(stage_choices(p, s, k), key=lambda c: c[1])
            fastest = list(itertools.accumulate((t for t, _ in choices), min))
            per_count.append((k, choices, [b for _, b in choices], fastest))
        per_stage.append(per_count)
    best = {}
    for k, choices, sizes, fastest in per_stage[0]:
        if len(stages) == 1:
            fits = bisect.bisect_right(sizes, p.memory_budget_bytes)
            if fits:
                best[k] = fastest[fits - 1]
            continue
        for k2, _, sizes2, fastest2 in per_stage[1]:
            if k + k2 > blocks:
                break
            for t, b in choices:  # with the other stage's fastest choice that still fits
                fits = bisect.bisect_right(sizes2, p.memory_budget_bytes - b)
                if fits:
                    best[k + k2] = min(best.get(k + k2, INF), t + fastest2[fits - 1])
    return best


def one_run_optimum(p):
    """The optimum of a pre + equal blocks + post problem with at most two stages per rank,
    searched rank by rank (no ILP).

    Exact for this shape: any counts of blocks per stage (>= 1 but for the first and last
    stage, which hold pre and post) make one contiguous cut; pre and the blocks send the same
    bytes, so a rank's time and memory depend only on its stages' counts and options. Per rank
    and total count: the least time that fits. Then for every bound tau on rank time, the least
    sum of rank times (a knapsack over ranks); the step is b * sum + (m - b) * tau, and taus
    past the best step so far cannot win.
    """
    blocks = len(p.layers) - 2
    least = [
        least_per_total(p, [s for s in range(p.num_stages) if p.ranks[s] == r], blocks)
        for r in range(p.num_ranks)
    ]
    w, m, optimum = p.bubble_weight, p.num_microbatches, INF
    for tau in sorted({t for best in least for t in best.values()}):
        if (m - w) * tau >= optimum:
            break
        sums = {0: 0.0}  # blocks on the ranks so far -> least sum of their times
        for best in least:
            fits = [(k, t) for k, t in best.items() if t <= tau]
            after = {}
            for used, total in sums.items():
                for k, t in fits:
                    if used + k <= blocks and total + t < after.get(used + k, INF):
                        after[used + k] = total + t
            sums = after
        if blocks in sums:
            optimum = min(optimum, w * sums[blocks] + (m - w) * tau)
    return optimum


@pytest.mark.parametrize("blocks, pp, v, budget", [(96, 8, 2, 60e9), (96, 16, 1, 45e9),
                                                    (192, 16, 1, 80e9)])
def test_deep_tight_memory_is_proven_optimal(blocks, pp, v, budget):
    # GPT-3 175B's 96 blocks with a budget that forces checkpointing. On 8 ranks x 2 stages the
    # per-layer ILP, and the runs model without rank_bound rows, stay ~2% from proving
    # optimality after 10 minutes. Twice as deep, the model is no harder (`rank_time_cap`).
    p = gpt_like(blocks=blocks, pp=pp, v=v, m=64, budget=budget)
    sol = solve_pipeline(p, time_limit_s=20.0)
    check_plan(p, sol)
    assert sol.step_time_s == pytest.approx(one_run_optimum(p), rel=1e-6)


@pytest.mark.parametrize("seed", range(60))
def test_the_deep_path_equals_brute_force(seed, monkeypatch):
    # Deep stacks are solved below the even plan's step (or a lower cutoff), with every rank's
    # time capped by that bound; forced here onto small instances, it must find the same
    # optimum as the brute force, with and without a cutoff above it, and below a cutoff under
    # it prove that none is, or give the optimum.
    monkeypatch.setattr(pipeline_module, "_DEEP_RUN", 2)
    p = runs_problem(random.Random(7000 + seed))
    kind, best = outcome(solve_pipeline_brute_force, p)
    assert outcome(solve_pipeline, p) == (kind, pytest.approx(best, rel=1e-9))
    if kind == "infeasible":
        with pytest.raises(NoPlanBelowCutoff):
            solve_pipeline(p, cutoff_s=1e30)
        return
    for above in (1.001, 1.05):
        sol = solve_pipeline(p, cutoff_s=best * above)
        check_plan(p, sol)
        assert sol.step_time_s == pytest.approx(best, rel=1e-9)
    try:  # proven: nothing beats the cutoff; or, unproven, the optimum anyway
        sol = solve_pipeline(p, cutoff_s=best * 0.99)
    except NoPlanBelowCutoff:
        return
    check_plan(p, sol)
    assert sol.step_time_s == pytest.approx(best, rel=1e-9)


def test_a_cutoff_keeps_a_deep_runs_counts_near_their_even_share():
    # 192 blocks on 16 ranks x 2 stages: without a cap a stage may count up to 192 blocks, and
    # a rank's total too; below a cutoff 1% over the optimum only counts up to about twice the
    # even share (12 a rank) are left, and the optimum below it is the same.
    p = gpt_like(blocks=192, pp=16, v=2, m=64, budget=80e9)
    best = solve_pipeline(p).step_time_s
    most = lambda ilp: max(  # noqa: E731
        [z.upBound for z in ilp.count.values()]
        + [q for (_, _, q), h in ilp.holds.items() if h.upBound])
    assert most(build_pipeline_runs_ilp(p)) == 192
    assert most(build_pipeline_runs_ilp(p, cutoff_s=best * 1.01)) <= 2 * 192 / 16
    assert solve_pipeline(p, cutoff_s=best * 1.01).step_time_s == pytest.approx(best, rel=1e-9)
    assert rank_time_cap(p, None) is None and rank_time_cap(p, best) < best / (64 - 0.5)


def _with_carry(p: PipelineProblem, rng: random.Random) -> PipelineProblem:
    """`p` with random carried bytes (what a stage holds of values from further back), equal
    within each run of identical layers so that runs stay runs."""
    carry = {}
    layers = []
    for x in p.layers:
        key = (x.options, x.state_bytes, x.boundary_bytes)
        carry.setdefault(key, float(rng.randint(0, 100)) * 1e6)
        layers.append(dataclasses.replace(x, carry_bytes=carry[key]))
    return dataclasses.replace(p, layers=tuple(layers))


@pytest.mark.parametrize("seed", range(40))
def test_carried_bytes_are_held_by_the_next_stage_in_every_formulation(seed):
    """Layers that are not a chain: the stage after a cut holds the cut's carried bytes per
    microbatch in flight; the runs model, the per-layer ILP and the brute force agree, on the
    fastest plan and (when nothing fits) on the smallest peak."""
    rng = random.Random(9100 + seed)
    p = _with_carry(runs_problem(rng), rng)
    expected = outcome(solve_pipeline_brute_force, p)
    for formulation in ("runs", "layers"):
        kind, value = outcome(partial(solve_pipeline, formulation=formulation), p)
        assert kind == expected[0], formulation
        assert value == pytest.approx(expected[1], rel=1e-9), formulation


def test_carried_bytes_count_on_the_stage_after_the_cut():
    a = dataclasses.replace(layer("a", state_bytes=1.0), carry_bytes=100.0)
    b, c = layer("b", state_bytes=1.0), layer("c", state_bytes=1.0)
    p = problem([a, b, c], num_stages=2, in_flight=(2, 1))
    # NONE keeps 10 bytes per microbatch in flight: (a | b c) holds 1+20, 2+20 and 100 carried
    assert evaluate_pipeline(p, (("a",), ("b", "c")), {n: "none" for n in "abc"})[1] == (
        21.0, 122.0)
    assert evaluate_pipeline(p, (("a", "b"), ("c",)), {n: "none" for n in "abc"})[1] == (
        42.0, 11.0)
    assert solve_pipeline(dataclasses.replace(p, memory_budget_bytes=60.0)).stages == (
        ("a", "b"), ("c",))
