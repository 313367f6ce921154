"""Tests for solvers.pipeline_ranks: the objective and the rows over ranks that both stage-cut
formulations share give the cost model's step time and per-rank memory."""

import dataclasses
from types import SimpleNamespace

import pulp
import pytest

from solvers.backend import run_solver
from solvers.pipeline_problem import score_stages
from solvers.pipeline_ranks import (
    add_memory_rows,
    check_minimise,
    rank_memory,
    set_peak_objective,
    set_step_objective,
)
from tests.solvers.pipeline_instances import interleaved, layer


def row_names(lp):
    """The model's constraint names, in the order they were added."""
    return [row.name for row in lp.constraints()]


def constants(values):
    """Per-stage expressions with no variables: fixed stage times or bytes."""
    return [pulp.LpAffineExpression(value) for value in values]


def solve(lp):
    return run_solver(
        SimpleNamespace(lp=lp), solver="highs", time_limit_s=None, gap=None, msg=False
    )


def test_step_objective_is_the_cost_model():
    # Rank times (9, 6): 0.5 * 15 + 3.5 * 9 = 39, as evaluate_pipeline has it.
    p = interleaved([layer(n) for n in "abcd"])
    times_s = [3.0, 3.0, 6.0, 3.0]
    lp = pulp.LpProblem("step", pulp.LpMinimize)
    scale = set_step_objective(lp, p, constants(times_s))
    assert row_names(lp) == ["rank_time(0)", "rank_time(1)"]
    assert solve(lp).status == "optimal"
    step_s, _ = score_stages(p, times_s, [0.0] * 4)
    assert lp.objective.value() * scale == pytest.approx(step_s) == 39.0


def test_memory_rows_per_rank_only_under_a_finite_budget():
    p = interleaved([layer(n) for n in "abcd"])
    memory = rank_memory(p, constants([5.0, 7.0, 11.0, 13.0]))
    assert [held.constant for held in memory] == [16.0, 20.0]
    lp = pulp.LpProblem("memory", pulp.LpMinimize)
    add_memory_rows(lp, p, memory)
    assert row_names(lp) == []
    add_memory_rows(lp, dataclasses.replace(p, memory_budget_bytes=18.0), memory)
    assert row_names(lp) == ["memory(0)", "memory(1)"]


def test_peak_is_the_largest_rank():
    p = interleaved([layer(n) for n in "abcd"])
    lp = pulp.LpProblem("peak", pulp.LpMinimize)
    set_peak_objective(lp, p, rank_memory(p, constants([5.0, 7.0, 11.0, 13.0])))
    assert row_names(lp) == ["peak(0)", "peak(1)"]
    assert solve(lp).status == "optimal"
    # In units of the largest memory coefficient: 1 microbatch in flight * 10 activation bytes.
    assert lp.variablesDict()["peak"].value() * 10.0 == pytest.approx(20.0)


def test_minimise_is_time_or_peak():
    check_minimise("time")
    check_minimise("peak")
    with pytest.raises(ValueError, match="minimise must be 'time' or 'peak'"):
        check_minimise("memory")
