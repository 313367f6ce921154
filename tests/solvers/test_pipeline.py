"""Tests for solvers.pipeline: hand instances with known answers, and brute-force agreement."""

import dataclasses
import math
import random

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
from solvers.pipeline import build_pipeline_ilp

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
