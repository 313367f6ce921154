"""Tests for solvers.backend: solver choice, status mapping on tiny models, pulp-safe names."""

from types import SimpleNamespace

import pulp
import pytest

from solvers.backend import (
    SOLVERS,
    SolverResult,
    highs_within_tolerance,
    pick_solver,
    pulp_names,
    run_solver,
)


def cover(at_least: int) -> SimpleNamespace:
    """min x + y over binaries with x + y >= at_least: optimum 1 for 1, infeasible for 3."""
    lp = pulp.LpProblem("cover", pulp.LpMinimize)
    x = lp.add_variable("x", lowBound=0, upBound=1, cat=pulp.LpInteger)
    y = lp.add_variable("y", lowBound=0, upBound=1, cat=pulp.LpInteger)
    lp.setObjective(x + y)
    lp += (x + y >= at_least, "cover")
    return SimpleNamespace(lp=lp)


def solve(ilp, solver, gap=None):
    return run_solver(ilp, solver=solver, time_limit_s=None, gap=gap, msg=False)


class TestPickSolver:
    def test_known_solvers(self):
        assert [pick_solver(solver) for solver in SOLVERS] == ["highs", "cbc"]

    def test_unknown_solver(self):
        with pytest.raises(ValueError, match="solver must be one of"):
            pick_solver("gurobi")

    def test_falls_back_to_cbc_without_highs(self, monkeypatch):
        monkeypatch.setattr(pulp.HiGHS, "available", lambda self: False)
        with pytest.warns(UserWarning, match="falling back to CBC"):
            assert pick_solver("highs") == "cbc"


@pytest.mark.parametrize("solver", SOLVERS)
class TestRunSolver:
    def test_optimal(self, solver):
        ilp = cover(1)
        assert solve(ilp, solver) == SolverResult("optimal", 0.0, solver)
        assert ilp.lp.objective.value() == 1.0

    def test_infeasible(self, solver):
        assert solve(cover(3), solver) == SolverResult("infeasible", None, solver)

    def test_gap_option_keeps_a_plan(self, solver):
        ilp = cover(1)
        assert solve(ilp, solver, gap=0.5).status in ("optimal", "feasible")
        assert ilp.lp.objective.value() in (1.0, 2.0)


class TestHighsWithinTolerance:
    def test_other_results_pass_through(self):
        no_model = SimpleNamespace(lp=None)
        for result in (
            SolverResult("optimal", 0.0, "highs"),
            SolverResult("feasible", None, "highs"),
            SolverResult("feasible", 1e-7, "cbc"),
            SolverResult("infeasible", None, "highs"),
        ):
            assert highs_within_tolerance(no_model, result) is result

    def test_residual_gap_of_an_optimal_highs_solve(self):
        ilp = cover(1)
        solve(ilp, "highs")  # HiGHS stops at kOptimal
        residual = SolverResult("feasible", 1e-7, "highs")
        assert highs_within_tolerance(ilp, residual) == SolverResult("optimal", 1e-7, "highs")
        large = SolverResult("feasible", 1e-3, "highs")
        assert highs_within_tolerance(ilp, large) is large


class TestPulpNames:
    def test_unsafe_characters_become_underscores(self):
        assert pulp_names(["layers.0/mm", "a->b", "a b", "x_1.y"]) == [
            "layers.0_mm",
            "a__b",
            "a_b",
            "x_1.y",
        ]

    def test_repeats_are_numbered(self):
        names = ["layers.0/mm", "layers.0[mm]", "layers.0-mm", "layers.0-mm"]
        assert pulp_names(names) == [
            "layers.0_mm",
            "layers.0_mm_",
            "layers.0_mm.2",
            "layers.0_mm.3",
        ]

    def test_long_names_are_cut(self):
        assert pulp_names(["x" * 100, "x" * 70]) == ["x" * 64, "x" * 64 + ".2"]
