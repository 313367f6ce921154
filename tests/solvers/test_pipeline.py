"""Tests for solvers.pipeline (solve_pipeline): hand instances with known answers, agreement with
the brute force on seeded random instances, and the choice of formulation."""

import random

import pytest

from solvers import (
    InfeasibleProblem,
    NoPlanBelowCutoff,
    PipelineProblem,
    evaluate_pipeline,
    solve_pipeline,
    solve_pipeline_brute_force,
)
from solvers import pipeline as pipeline_module
from tests.solvers.pipeline_instances import (
    FULL,
    NONE,
    LayerOption,
    interleaved,
    layer,
    problem,
    random_problem,
    repeated_problem,
)


def both(p, **kwargs):
    """The ILP's and brute force's solutions, checked to agree in step time."""
    ilp, brute = solve_pipeline(p, **kwargs), solve_pipeline_brute_force(p)
    assert ilp.step_time_s == pytest.approx(brute.step_time_s, rel=1e-9)
    return ilp, brute


class TestSolvePipeline:
    def test_balanced_cut_of_equal_layers(self, monkeypatch):
        # Each layer takes 3 s; cut (2, 2) gives 12 + 3 * 6 = 30, cut (1, 3) 12 + 3 * 9 = 39.
        p = problem([layer(n) for n in "abcd"])
        assert both(p)[0].solver == "dp"  # the cut alone: solvers.pipeline_dp answers
        monkeypatch.setattr(pipeline_module, "solve_cut_dp", lambda p: None)  # the ILPs
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
        sol, _ = both(interleaved([layer(n, state_bytes=10.0) for n in "abcd"]))
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

    def test_time_limit_and_gap_options(self):
        p = problem([layer(n, options=(NONE, FULL)) for n in "abcdef"], num_stages=3)
        sol = solve_pipeline(p, time_limit_s=30.0, gap=0.5)
        assert sol.status in ("optimal", "feasible")
        assert sol.step_time_s >= solve_pipeline(p).step_time_s

    def test_invalid_problem_is_rejected(self):
        with pytest.raises(ValueError, match="every stage needs a layer"):
            solve_pipeline(problem([layer("a")], num_stages=2))


# ---------------------------------------------------------------------------------------------
# Property: the ILP equals brute force


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
    assert sol.status == "optimal" and sol.gap <= 1e-6  # HiGHS's tolerance (highs_within_tolerance)
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


@pytest.mark.parametrize("seed", range(40))
def test_ilp_equals_brute_force_on_repeated_layers(seed):
    agree(repeated_problem(random.Random(5000 + seed)))


@pytest.mark.parametrize("seed", range(60))
def test_a_cutoff_proves_nothing_beats_it_or_gives_the_optimum(seed):
    rng = random.Random(7000 + seed)
    p = random_problem(rng) if seed % 2 else repeated_problem(rng)
    try:
        best = solve_pipeline_brute_force(p).step_time_s
    except InfeasibleProblem:  # nothing fits: nothing fits below any cutoff either
        with pytest.raises(NoPlanBelowCutoff):
            solve_pipeline(p, cutoff_s=1e30)
        return
    for below in (0.9, 0.999):  # proven: nothing beats it; or, unproven, the optimum anyway
        try:
            sol = solve_pipeline(p, cutoff_s=best * below)
        except NoPlanBelowCutoff:
            continue
        assert sol.status == "optimal" and sol.step_time_s == pytest.approx(best, rel=1e-9)
    for above in (1.001, 1.05):
        sol = solve_pipeline(p, cutoff_s=best * above)
        assert sol.status == "optimal" and sol.step_time_s == pytest.approx(best, rel=1e-9)


def test_a_cutoff_below_the_optimum_is_often_proven_outright():
    proven = tried = 0
    for seed in range(30):
        p = random_problem(random.Random(7000 + seed))
        try:
            best = solve_pipeline_brute_force(p).step_time_s
        except InfeasibleProblem:
            continue
        tried += 1
        try:
            solve_pipeline(p, cutoff_s=best * 0.9)
        except NoPlanBelowCutoff:
            proven += 1
    assert tried >= 15 and proven >= tried / 3, (proven, tried)


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


def test_the_relaxation_answers_some_instances_and_the_full_model_the_others(monkeypatch):
    """solve_pipeline first solves the problem with every layer on its fastest option and no
    memory budget, and returns that plan when it fits (`_solve_relaxed`). The brute-force
    instances above hold both kinds, so test_ilp_equals_brute_force checks both paths; and the
    relaxation's optimum is never above the full problem's (it is a lower bound)."""
    said = []
    real = pipeline_module._solve_relaxed
    monkeypatch.setattr(pipeline_module, "_solve_relaxed",
                        lambda *a, **kw: said.append(real(*a, **kw)) or said[-1])
    answered = full_model = 0
    for seed in SEEDS:
        p = random_problem(random.Random(seed))
        said.clear()
        try:
            sol = solve_pipeline(p)
        except InfeasibleProblem:
            continue
        relaxed = pipeline_module._fastest_unbounded(p)
        if relaxed is not None:
            assert solve_pipeline_brute_force(relaxed).step_time_s <= sol.step_time_s * (1 + 1e-9)
        answered += bool(said and said[0] is not None)
        full_model += bool(said and said[0] is None)
    assert answered >= 15 and full_model >= 15


def test_auto_takes_the_runs_model_when_layers_repeat(monkeypatch):
    monkeypatch.setattr(pipeline_module, "solve_cut_dp", lambda p: None)  # no DP: an ILP
    built = []
    real = pipeline_module.build_pipeline_runs_ilp
    monkeypatch.setattr(
        pipeline_module, "build_pipeline_runs_ilp", lambda p, **kw: built.append(p) or real(p, **kw)
    )
    distinct = problem([layer("a"), layer("b", state_bytes=1.0), layer("c")])
    repeated = problem([layer("a"), layer("b"), layer("c", state_bytes=1.0)])
    assert both(distinct)[0].step_time_s == both(distinct, formulation="layers")[0].step_time_s
    assert built == []
    both(repeated)
    assert built == [repeated]
    with pytest.raises(ValueError, match="formulation"):
        solve_pipeline(repeated, formulation="counts")
