"""Tests for solvers.pipeline_dp: the DP's cut is optimal (brute force and the ILP agree on
seeded random instances of every placement it walks), and it steps aside where it should."""

import dataclasses
import math
import random

import pytest

from solvers import (
    NoPlanBelowCutoff,
    PipelineProblem,
    solve_pipeline,
    solve_pipeline_brute_force,
)
from solvers.pipeline_dp import MAX_STEPS, placement, solve_cut_dp
from solvers.pipeline_problem import score_stages, stage_costs
from tests.solvers.pipeline_instances import FULL, NONE, layer, random_layer

PLACEMENTS = ("one", "loop", "v")


def ranks_of(how: str, R: int) -> tuple[int, ...]:
    if how == "one":
        return tuple(range(R))
    if how == "loop":
        return tuple(s % R for s in range(2 * R))
    return tuple(s if s < R else 2 * R - 1 - s for s in range(2 * R))


def relaxed_problem(rng: random.Random, how: str, L: int, R: int) -> PipelineProblem:
    """One option a layer, no budget, random works, sends (some free, some equal, some not) and
    bubble weight on the placement `how` with `R` ranks."""
    layers = [random_layer(rng, f"layer{k}", 1) for k in range(L)]
    if rng.random() < 0.3:  # runs of equal works: many ties
        layers = [dataclasses.replace(layers[k % 2], name=f"layer{k}") for k in range(L)]
    ranks = ranks_of(how, R)
    S = len(ranks)
    m = rng.randint(1, 8)
    return PipelineProblem(
        layers=tuple(layers), num_stages=S, num_microbatches=m,
        in_flight=tuple(rng.randint(0, m) for _ in range(S)), stage_of_rank=ranks,
        p2p_s_per_byte=rng.choice((0.0, 1e-8 * rng.randint(1, 10))),
        p2p_latency_s=rng.choice((0.0, round(rng.uniform(0.0, 1.0), 3))),
        bubble_weight=rng.choice((0.0, 1.0, 1.0 / 3.0, 0.5, rng.uniform(0.0, m))),
    )


def step_of(problem, plan) -> float:
    return score_stages(problem, *stage_costs(problem, *plan))[0]


@pytest.mark.parametrize("how", PLACEMENTS)
def test_dp_matches_brute_force(how):
    rng = random.Random(f"dp-{how}")
    for _ in range(60):
        R = rng.randint(1, 4)
        L = rng.randint(len(ranks_of(how, R)), min(len(ranks_of(how, R)) + 5, 11))
        p = relaxed_problem(rng, how, L, R)
        assert placement(p) == how or R == 1  # one rank: "loop" and "v" are the same
        plan = solve_cut_dp(p)
        assert plan is not None
        stages, options = plan
        assert [i for st in stages for i in st] == list(range(L)) and all(stages)
        assert len(stages) == p.num_stages and options == [0] * L
        brute = solve_pipeline_brute_force(p)
        assert step_of(p, plan) == pytest.approx(brute.step_time_s, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("how", ("loop", "v"))
def test_dp_matches_the_ilp_on_switch_like_stacks(how):
    """Alternating dense and expert blocks, two stacks with other sends (Switch's shape), 6
    ranks of two stages: beyond brute force, so HiGHS's proven optimum is the reference (the
    ILP takes seconds here; 8 ranks and 27 layers took it 8-28 s)."""
    rng = random.Random(how)
    dense, expert = rng.uniform(4, 7), rng.uniform(9, 12)
    works = [0.1] + [dense, expert] * 4 + [0.4] + [dense + 3, expert + 3] * 4 + [2.4]
    sends = [3.8] + [10.1] * 7 + [3.8, 25.9] + [31.1] * 7 + [5.6, 0.0]
    layers = tuple(dataclasses.replace(
        layer(f"l{k}", boundary_bytes=b * 1e6),
        options=(dataclasses.replace(NONE, fwd_s=w / 3, bwd_s=2 * w / 3),))
        for k, (w, b) in enumerate(zip(works, sends)))
    p = PipelineProblem(layers=layers, num_stages=12, num_microbatches=2,
                        in_flight=(1,) * 12, stage_of_rank=ranks_of(how, 6),
                        p2p_s_per_byte=2e-8, p2p_latency_s=0.005, bubble_weight=0.93)
    plan = solve_cut_dp(p)
    ilp = solve_pipeline(p, formulation="layers")
    assert ilp.status == "optimal"
    assert step_of(p, plan) == pytest.approx(ilp.step_time_s, rel=1e-6)
    assert step_of(p, plan) <= ilp.step_time_s * (1 + 1e-9)


def test_solve_pipeline_answers_by_dp_and_honours_the_cutoff():
    rng = random.Random("cutoff")
    p = relaxed_problem(rng, "loop", 9, 3)
    sol = solve_pipeline(p)
    assert (sol.solver, sol.status, sol.gap) == ("dp", "optimal", 0.0)
    assert sol.step_time_s == pytest.approx(solve_pipeline_brute_force(p).step_time_s,
                                            rel=1e-12)
    assert solve_pipeline(p, cutoff_s=sol.step_time_s * 1.01).stages == sol.stages
    with pytest.raises(NoPlanBelowCutoff):
        solve_pipeline(p, cutoff_s=sol.step_time_s)
    # the ILPs stay reachable by name
    assert solve_pipeline(p, formulation="layers").solver == "highs"


def test_dp_steps_aside():
    layers = tuple(layer(f"l{k}") for k in range(6))
    base = PipelineProblem(layers=layers, num_stages=2, num_microbatches=2, in_flight=(1, 1))
    assert solve_cut_dp(base) is not None
    # options to choose, a budget, or a placement it does not walk: the ILPs' problems
    two = tuple(layer(f"l{k}", options=(NONE, FULL)) for k in range(6))
    assert solve_cut_dp(dataclasses.replace(base, layers=two)) is None
    assert solve_cut_dp(dataclasses.replace(base, memory_budget_bytes=1e9)) is None
    three = dataclasses.replace(base, num_stages=6, in_flight=(1,) * 6,
                                stage_of_rank=(0, 1, 0, 1, 0, 1))
    assert placement(three) is None and solve_cut_dp(three) is None
    # a walk over MAX_STEPS: deep stacks on few interleaved ranks go to the ILP's runs model
    deep = dataclasses.replace(base, layers=tuple(layer(f"l{k}") for k in range(100)),
                               num_stages=8, in_flight=(1,) * 8,
                               stage_of_rank=ranks_of("v", 4))
    assert 4 * (100 - 8 + 2) ** 4 > MAX_STEPS and solve_cut_dp(deep) is None
    assert math.isinf(deep.memory_budget_bytes)
