"""Tests for solvers.pipeline and solvers.pipeline_runs: hand instances with known answers,
brute-force agreement of both formulations, and deep instances against an independent search."""

import bisect
import dataclasses
import itertools
import math
import random
from functools import partial

import pytest

from solvers import (
    InfeasibleProblem,
    Layer,
    LayerOption,
    PipelineProblem,
    evaluate_pipeline,
    solve_pipeline,
    solve_pipeline_brute_force,
)
from solvers import pipeline as pipeline_module
from solvers.pipeline import build_pipeline_ilp, build_pipeline_runs_ilp
from solvers.pipeline_runs import Run, fastest_fill, layer_runs

INF = math.inf
NONE = LayerOption(name="none", fwd_s=1.0, bwd_s=2.0, activation_bytes=10.0)
FULL = LayerOption(name="full", fwd_s=1.0, bwd_s=3.0, activation_bytes=2.0)


def layer(name, options=(NONE,), state_bytes=0.0, boundary_bytes=0.0):
    return Layer(
        name=name, options=tuple(options), state_bytes=state_bytes, boundary_bytes=boundary_bytes
    )


def problem(layers, num_stages=2, num_microbatches=4, in_flight=None, **kwargs):
    if in_flight is None:  # 1F1B: stage s holds min(S - s, m) microbatches
        in_flight = tuple(min(num_stages - s, num_microbatches) for s in range(num_stages))
    return PipelineProblem(
        layers=tuple(layers),
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        in_flight=tuple(in_flight),
        **kwargs,
    )


def both(p, **kwargs):
    """The ILP's and brute force's solutions, checked to agree in step time."""
    ilp, brute = solve_pipeline(p, **kwargs), solve_pipeline_brute_force(p)
    assert ilp.step_time_s == pytest.approx(brute.step_time_s, rel=1e-9)
    return ilp, brute


class TestEvaluatePipeline:
    def test_formula_by_hand(self):
        p = problem([layer(n, state_bytes=5.0) for n in "abc"])
        opts = dict.fromkeys("abc", "none")
        # T = (6, 3); step = 9 + 3 * 6 = 27; memory: 2 layers * (5 + 2 * 10), 1 * (5 + 1 * 10).
        assert evaluate_pipeline(p, (("a", "b"), ("c",)), opts) == (27.0, (50.0, 15.0))

    def test_bad_cut_or_option_is_rejected(self):
        p = problem([layer(n) for n in "abc"])
        opts = dict.fromkeys("abc", "none")
        with pytest.raises(ValueError, match="contiguous"):
            evaluate_pipeline(p, (("a", "c"), ("b",)), opts)
        with pytest.raises(ValueError, match="contiguous"):
            evaluate_pipeline(p, (("a", "b", "c"), ()), opts)
        with pytest.raises(ValueError, match="needs one of the options"):
            evaluate_pipeline(p, (("a",), ("b", "c")), {**opts, "b": "full"})


class TestValidate:
    def test_more_stages_than_layers(self):
        with pytest.raises(ValueError, match="every stage needs a layer"):
            solve_pipeline(problem([layer("a")], num_stages=2))

    def test_in_flight_length(self):
        with pytest.raises(ValueError, match="in_flight"):
            solve_pipeline(problem([layer("a"), layer("b")], in_flight=(1,)))

    def test_rank_without_stage(self):
        with pytest.raises(ValueError, match=r"ranks \[1\] without a stage"):
            solve_pipeline(problem([layer("a"), layer("b")], stage_of_rank=(0, 2)))

    def test_bubble_weight_above_microbatches(self):
        with pytest.raises(ValueError, match="bubble_weight"):
            solve_pipeline(problem([layer("a")], num_stages=1, num_microbatches=1, bubble_weight=2))

    def test_duplicate_layer(self):
        with pytest.raises(ValueError, match="appears twice"):
            solve_pipeline(problem([layer("a"), layer("a")]))


class TestSolvePipeline:
    def test_balanced_cut_of_equal_layers(self):
        # Each layer takes 3 s; cut (2, 2) gives 12 + 3 * 6 = 30, cut (1, 3) 12 + 3 * 9 = 39.
        p = problem([layer(n) for n in "abcd"])
        for solver in ("highs", "cbc"):
            sol, _ = both(p, solver=solver)
            assert sol.stages == (("a", "b"), ("c", "d"))
            assert sol.stage_time_s == (6.0, 6.0)
            assert sol.step_time_s == 30.0
            assert sol.peak_memory_bytes == (40.0, 20.0)
            assert (sol.status, sol.gap, sol.solver) == ("optimal", 0.0, solver)

    def test_one_stage_holds_everything(self):
        p = problem([layer(n) for n in "abc"], num_stages=1)
        sol, _ = both(p)
        assert sol.stages == (("a", "b", "c"),)
        assert sol.step_time_s == 9.0 + 3 * 9.0

    def test_memory_forces_checkpointing_on_first_stage_only(self):
        # 1F1B: stage 0 holds 2 microbatches, stage 1 one. Unlimited: all "none", cut (2, 2),
        # memory (40, 20). Budget 30: stage 0 checkpoints one of its two layers (2 * (10 + 2) =
        # 24 bytes, T_0 = 3 + 4 = 7, step = 13 + 3 * 7 = 34); stage 1 keeps "none". Cut (1, 3)
        # would fit without checkpointing but costs 12 + 3 * 9 = 39.
        layers = [layer(n, options=(NONE, FULL)) for n in "abcd"]
        free, _ = both(problem(layers))
        assert set(free.options.values()) == {"none"} and free.step_time_s == 30.0
        sol, brute = both(problem(layers, memory_budget_bytes=30.0))
        assert sol.stages == (("a", "b"), ("c", "d"))
        assert sorted(sol.options[n] for n in "ab") == ["full", "none"]
        assert sol.options["c"] == sol.options["d"] == "none"
        assert sol.step_time_s == 34.0
        assert sol.peak_memory_bytes == (24.0, 20.0)

    def test_p2p_cost_moves_the_cut(self):
        # Without sends the cut is after b. Sending b's output costs 50 s, a's 0.5 s, c's 1 s:
        # after a: T = (3.5, 9), 12.5 + 27 = 39.5; after c: T = (10, 3), 13 + 30 = 43.
        layers = [
            layer("a", boundary_bytes=1.0),
            layer("b", boundary_bytes=100.0),
            layer("c", boundary_bytes=2.0),
            layer("d", boundary_bytes=7.0),
        ]
        assert solve_pipeline(problem(layers)).stages == (("a", "b"), ("c", "d"))
        sol, _ = both(problem(layers, p2p_s_per_byte=0.5))
        assert sol.stages == (("a",), ("b", "c", "d"))
        assert sol.stage_time_s == (3.5, 9.0)
        assert sol.step_time_s == 39.5

    def test_p2p_latency_is_paid_by_every_stage_but_the_last(self):
        p = problem([layer(n) for n in "abcd"], p2p_latency_s=1.0)
        sol, _ = both(p)
        # Cut (2, 2): T = (7, 6), 13 + 3 * 7 = 34; cut (1, 3): T = (4, 9), 13 + 27 = 40.
        assert sol.stages == (("a", "b"), ("c", "d")) and sol.step_time_s == 34.0

    def test_interleaved_ranks_sum_stages(self):
        # pp = 2 ranks, v = 2 chunks each: stages 0, 2 on rank 0 and 1, 3 on rank 1. Each rank
        # runs 6 s per microbatch; b = 1/v gives (m + (pp - 1) / v) * 6 = 4.5 * 6 = 27.
        p = problem(
            [layer(n, state_bytes=10.0) for n in "abcd"],
            num_stages=4,
            in_flight=(1, 1, 1, 1),
            stage_of_rank=(0, 1, 0, 1),
            bubble_weight=0.5,
        )
        sol, _ = both(p)
        assert sol.step_time_s == 27.0
        assert sol.peak_memory_bytes == (40.0, 40.0)

    def test_infeasible_reports_smallest_peak(self):
        # State 10 per layer, activations 2 * 1 on stage 0 and 1 * 1 on stage 1 (all "full").
        # Cut (1, 2): peaks (12, 22); cut (2, 1): (24, 11). The smallest max-rank peak is 22.
        small = LayerOption(name="full", fwd_s=1.0, bwd_s=3.0, activation_bytes=1.0)
        big = LayerOption(name="none", fwd_s=1.0, bwd_s=2.0, activation_bytes=10.0)
        layers = [layer(n, options=(big, small), state_bytes=10.0) for n in "abc"]
        p = problem(layers, memory_budget_bytes=15.0)
        for solve in (solve_pipeline, solve_pipeline_brute_force):
            with pytest.raises(InfeasibleProblem, match="smallest peak") as err:
                solve(p)
            assert err.value.min_peak_bytes == 22.0
            assert err.value.budget_bytes == 15.0
        with pytest.raises(InfeasibleProblem) as err:
            solve_pipeline(p, solver="cbc")
        assert err.value.min_peak_bytes == 22.0
        assert solve_pipeline(problem(layers, memory_budget_bytes=22.0)).peak_memory_bytes == (
            12.0,
            22.0,
        )

    def test_constraint_names_are_readable(self):
        p = problem([layer(n) for n in ("embed", "block.0", "head")], memory_budget_bytes=100.0)
        lp = build_pipeline_ilp(p).lp
        for name in ("one_stage(block.0)", "contiguous(head,1)", "memory(0)", "rank_time(1)"):
            assert lp.get_constraint_by_name(name) is not None, name

    def test_time_limit_and_gap_options(self):
        p = problem([layer(n, options=(NONE, FULL)) for n in "abcdef"], num_stages=3)
        sol = solve_pipeline(p, time_limit_s=30.0, gap=0.5)
        assert sol.status in ("optimal", "feasible")
        assert sol.step_time_s >= solve_pipeline(p).step_time_s


# ---------------------------------------------------------------------------------------------
# Property: the ILP equals brute force


def random_problem(rng: random.Random) -> PipelineProblem:
    n = rng.randint(2, 7)
    S = rng.randint(1, min(4, n))
    m = rng.randint(1, 6)
    layers = []
    for k in range(n):
        options = tuple(
            LayerOption(
                name=f"opt{j}",
                fwd_s=round(rng.uniform(0.0, 5.0), 3),
                bwd_s=round(rng.uniform(0.0, 10.0), 3),
                activation_bytes=float(rng.randint(0, 100)) * 1e6,
            )
            for j in range(rng.randint(1, 3))
        )
        layers.append(
            layer(
                f"layer{k}",
                options=options,
                state_bytes=float(rng.randint(0, 100)) * 1e6,
                boundary_bytes=float(rng.randint(0, 100)) * 1e6,
            )
        )
    stage_of_rank, bubble_weight = (), 1.0
    divisors = [pp for pp in range(1, S) if S % pp == 0]
    if divisors and rng.random() < 0.3:
        pp = rng.choice(divisors)
        stage_of_rank = tuple(s % pp for s in range(S))
        bubble_weight = rng.choice((1.0, pp / S))  # 1 / v with v = S / pp
    if rng.random() < 0.5:
        in_flight = tuple(min(S - s, m) for s in range(S))
    else:
        in_flight = tuple(rng.randint(0, m) for _ in range(S))
    total_bytes = sum(
        lay.state_bytes + max(in_flight) * max(o.activation_bytes for o in lay.options)
        for lay in layers
    )
    budget = INF
    if rng.random() < 0.85:  # never exactly on a peak: peaks are whole megabytes
        budget = float(rng.randint(0, int(total_bytes / 1e6 * 0.8))) * 1e6 + 0.5e6
    return _with_random_links(rng, layers, S, m, in_flight, stage_of_rank, budget, bubble_weight)


def _with_random_links(rng, layers, S, m, in_flight, stage_of_rank, budget, bubble_weight):
    """The problem, with a random pp link (free, or a random bandwidth and latency)."""
    return PipelineProblem(
        layers=tuple(layers),
        num_stages=S,
        num_microbatches=m,
        in_flight=in_flight,
        stage_of_rank=stage_of_rank,
        memory_budget_bytes=budget,
        p2p_s_per_byte=rng.choice((0.0, 1e-8 * rng.randint(1, 10))),
        p2p_latency_s=rng.choice((0.0, round(rng.uniform(0.0, 1.0), 3))),
        bubble_weight=bubble_weight,
    )


SEEDS = range(240)


def agree(p: PipelineProblem, solver: str = "highs") -> str:
    try:
        expected = solve_pipeline_brute_force(p)
    except InfeasibleProblem as err:
        with pytest.raises(InfeasibleProblem) as got:
            solve_pipeline(p, solver=solver)
        assert got.value.min_peak_bytes == pytest.approx(err.min_peak_bytes, rel=1e-9)
        return "infeasible"
    sol = solve_pipeline(p, solver=solver)
    assert sol.status == "optimal" and sol.gap <= 1e-6  # HiGHS's tolerance (see _tolerant)
    assert sol.step_time_s == pytest.approx(expected.step_time_s, rel=1e-9)
    step_s, peak_bytes = evaluate_pipeline(p, sol.stages, sol.options)
    assert (step_s, peak_bytes) == (sol.step_time_s, sol.peak_memory_bytes)
    assert max(peak_bytes) <= p.memory_budget_bytes
    assert len(peak_bytes) == p.num_ranks
    return "feasible"


@pytest.mark.parametrize("seed", SEEDS)
def test_ilp_equals_brute_force(seed):
    agree(random_problem(random.Random(seed)))


@pytest.mark.parametrize("seed", range(10))
def test_cbc_equals_brute_force(seed):
    agree(random_problem(random.Random(1000 + seed)), solver="cbc")


def repeated_problem(rng: random.Random) -> PipelineProblem:
    """A random problem whose layers come in runs of identical copies (a stack of equal
    blocks), where the ILP's symmetry-breaking rows apply."""
    p = random_problem(rng)
    layers, k = [], 0
    while len(layers) < 8:
        template = rng.choice(p.layers)
        for _ in range(rng.randint(1, 4)):
            layers.append(dataclasses.replace(template, name=f"copy{k}"))
            k += 1
    layers = layers[:8]
    S = min(p.num_stages + 1, 5)
    return dataclasses.replace(
        p, layers=tuple(layers), num_stages=S, stage_of_rank=(),
        in_flight=tuple(min(S - s, p.num_microbatches) for s in range(S)), bubble_weight=1.0,
    )


@pytest.mark.parametrize("seed", range(40))
def test_ilp_equals_brute_force_on_repeated_layers(seed):
    agree(repeated_problem(random.Random(5000 + seed)))


def test_random_instances_cover_the_cases():
    problems = [random_problem(random.Random(seed)) for seed in SEEDS]
    outcomes = []
    for p in problems:
        try:
            solve_pipeline_brute_force(p)
            outcomes.append("feasible")
        except InfeasibleProblem:
            outcomes.append("infeasible")
    assert outcomes.count("feasible") >= 60 and outcomes.count("infeasible") >= 30
    assert sum(bool(p.stage_of_rank) for p in problems) >= 20
    assert sum(p.bubble_weight != 1.0 for p in problems) >= 5
    assert sum(p.num_stages == 1 for p in problems) >= 10


# ---------------------------------------------------------------------------------------------
# The runs formulation (counts per run of identical layers) equals brute force and the per-layer
# ILP


def run_template(rng: random.Random, tag: int) -> Layer:
    """A layer with 1-3 random options; copies of it (renamed) make a run."""
    options = tuple(
        LayerOption(
            name=f"opt{j}",
            fwd_s=round(rng.uniform(0.0, 5.0), 3),
            bwd_s=round(rng.uniform(0.0, 10.0), 3),
            activation_bytes=float(rng.randint(0, 100)) * 1e6,
        )
        for j in range(rng.choice((1, 2, 2, 3)))
    )
    return layer(
        f"template{tag}",
        options=options,
        state_bytes=float(rng.randint(0, 100)) * 1e6,
        boundary_bytes=float(rng.randint(0, 100)) * 1e6,
    )


def random_ranks(rng: random.Random, S: int) -> tuple[tuple[int, ...], float]:
    """stage_of_rank and bubble weight: one stage per rank, interleaved (s % pp), or any map."""
    kind = rng.choice(("own", "interleaved", "any"))
    divisors = [pp for pp in range(1, S) if S % pp == 0]
    if kind == "interleaved" and divisors:
        pp = rng.choice(divisors)
        return tuple(s % pp for s in range(S)), rng.choice((1.0, pp / S))
    if kind == "any" and S > 1:
        R = rng.randint(1, S - 1)
        ranks = list(range(R)) + [rng.randrange(R) for _ in range(S - R)]
        rng.shuffle(ranks)
        return tuple(ranks), 1.0
    return (), 1.0


MAX_PLANS = 6000  # brute force tries them all: keeps each instance near 0.1 s


def runs_problem(rng: random.Random) -> PipelineProblem:
    """Runs of identical layers (1-3 options) cut into 1-6 stages, on interleaved or arbitrary
    ranks, with random in-flight counts and budgets (some infeasible)."""
    while True:
        L = rng.randint(3, 10)
        S = rng.randint(1, min(6, L))
        layers = []
        while len(layers) < L:
            template = run_template(rng, len(layers))
            for _ in range(min(rng.randint(1, 5), L - len(layers))):
                layers.append(dataclasses.replace(template, name=f"layer{len(layers)}"))
        plans = math.comb(L - 1, S - 1) * math.prod(len(x.options) for x in layers)
        if plans <= MAX_PLANS:
            break
    m = rng.randint(1, 6)
    stage_of_rank, bubble_weight = random_ranks(rng, S)
    if rng.random() < 0.5:
        in_flight = tuple(min(S - s, m) for s in range(S))
    else:
        in_flight = tuple(rng.randint(0, m) for _ in range(S))
    total_bytes = sum(
        x.state_bytes + max(in_flight) * max(o.activation_bytes for o in x.options) for x in layers
    )
    budget = INF
    if rng.random() < 0.85:  # never exactly on a peak: peaks are whole megabytes
        budget = float(int(total_bytes / 1e6 * rng.uniform(0.1, 0.9))) * 1e6 + 0.5e6
    return _with_random_links(rng, layers, S, m, in_flight, stage_of_rank, budget, bubble_weight)


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


def test_auto_takes_the_runs_model_when_layers_repeat(monkeypatch):
    built = []
    real = pipeline_module.build_pipeline_runs_ilp
    monkeypatch.setattr(pipeline_module, "build_pipeline_runs_ilp",
                        lambda p, **kw: built.append(p) or real(p, **kw))
    distinct = problem([layer("a"), layer("b", state_bytes=1.0), layer("c")])
    repeated = problem([layer("a"), layer("b"), layer("c", state_bytes=1.0)])
    assert both(distinct)[0].step_time_s == both(distinct, formulation="layers")[0].step_time_s
    assert built == []
    both(repeated)
    assert built == [repeated]
    with pytest.raises(ValueError, match="formulation"):
        solve_pipeline(repeated, formulation="counts")


def test_runs_model_names_are_readable():
    layers = [layer("embed"), *(layer(f"block.{i}", options=(NONE, FULL)) for i in range(4)),
              layer("head", state_bytes=1.0)]
    lp = build_pipeline_runs_ilp(problem(layers, num_stages=3, memory_budget_bytes=95.0)).lp
    for name in ("one_end(1)", "done(block.0,1)", "take(head,2)", "non_empty(0)", "memory(2)",
                 "rank_time(0)", "rank_bound(block.0,0)", "total(block.0,0)"):
        assert lp.get_constraint_by_name(name) is not None, name


def gpt_like(blocks, pp, v, m, budget):
    """Embedding, equal transformer blocks and a head (GPT-3 175B per-device figures at tp 8),
    options none / full checkpoint, interleaved: stage s on rank s % pp."""
    def options(fwd_s, bwd_s, act_bytes, full_act_bytes):
        return (LayerOption(name="none", fwd_s=fwd_s, bwd_s=bwd_s, activation_bytes=act_bytes),
                LayerOption(name="full", fwd_s=fwd_s, bwd_s=bwd_s + fwd_s,
                            activation_bytes=full_act_bytes))
    block = options(0.0061, 0.0122, 358.6e6, 50.3e6)
    layers = [layer("pre", options(0.0003, 0.0006, 50.3e6, 0.0), 1.26e9, 50.3e6)]
    layers += [layer(f"blocks.{i}", block, 3.62e9, 50.3e6) for i in range(blocks)]
    layers += [layer("post", options(0.0017, 0.0034, 103e6, 50.3e6), 1.26e9, 0.0)]
    S = pp * v
    in_flight = [min(max(2 * pp - 1 - 2 * s, pp), 4 * pp - 2 * s - 1) for s in range(S)]
    return problem(layers, num_stages=S, num_microbatches=m,
                   in_flight=in_flight if v == 2 else [min(pp - s, m) for s in range(S)],
                   stage_of_rank=tuple(s % pp for s in range(S)), memory_budget_bytes=budget,
                   p2p_s_per_byte=1 / 12.5e9, p2p_latency_s=5e-6, bubble_weight=1 / v)


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
            picks = [*zip(ends, chosen), *[(block, block.options[1])] * n,
                     *[(block, block.options[0])] * (blocks - n)]
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
    least = [least_per_total(p, [s for s in range(p.num_stages) if p.ranks[s] == r], blocks)
             for r in range(p.num_ranks)]
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


@pytest.mark.parametrize("pp, v, budget", [(8, 2, 60e9), (16, 1, 45e9)])
def test_deep_tight_memory_is_proven_optimal(pp, v, budget):
    # GPT-3 175B's 96 blocks with a budget that forces checkpointing. On 8 ranks x 2 stages the
    # per-layer ILP, and the runs model without rank_bound rows, stay ~2% from proving
    # optimality after 10 minutes.
    p = gpt_like(blocks=96, pp=pp, v=v, m=64, budget=budget)
    sol = solve_pipeline(p, time_limit_s=20.0)
    check_plan(p, sol)
    assert sol.step_time_s == pytest.approx(one_run_optimum(p), rel=1e-6)
