"""Tests for solvers.pipeline_brute_force: the reference must itself be right on hand-made
instances."""

import pytest

from solvers import InfeasibleProblem, LayerOption, solve_pipeline_brute_force
from tests.solvers.pipeline_instances import FULL, NONE, layer, problem


class TestSolvePipelineBruteForce:
    def test_balanced_cut(self):
        # Each layer takes 3 s: cut (2, 2) gives 12 + 3 * 6 = 30, (1, 3) and (3, 1) 12 + 3 * 9.
        sol = solve_pipeline_brute_force(problem([layer(n) for n in "abcd"]))
        assert sol.stages == (("a", "b"), ("c", "d"))
        assert (sol.stage_time_s, sol.step_time_s) == ((6.0, 6.0), 30.0)
        assert (sol.status, sol.gap, sol.solver) == ("optimal", 0.0, "brute_force")

    def test_equal_steps_take_the_first_plan(self):
        # a | b c and a b | c both take 9 + 3 * 6 = 27 s: the first cut point wins; of two equal
        # options the first wins.
        twin = LayerOption(name="twin", fwd_s=1.0, bwd_s=2.0, activation_bytes=10.0)
        sol = solve_pipeline_brute_force(problem([layer(n, options=(NONE, twin)) for n in "abc"]))
        assert sol.stages == (("a",), ("b", "c"))
        assert sol.options == dict.fromkeys("abc", "none")
        assert sol.step_time_s == 27.0

    def test_memory_forces_checkpointing(self):
        # Budget 30: stage 0 (2 microbatches in flight) checkpoints one of its two layers,
        # 2 * (10 + 2) = 24 bytes, T_0 = 7, step 13 + 3 * 7 = 34; the first such plan takes b.
        layers = [layer(n, options=(NONE, FULL)) for n in "abcd"]
        sol = solve_pipeline_brute_force(problem(layers, memory_budget_bytes=30.0))
        assert sol.stages == (("a", "b"), ("c", "d"))
        assert sol.options == {"a": "none", "b": "full", "c": "none", "d": "none"}
        assert (sol.step_time_s, sol.peak_memory_bytes) == (34.0, (24.0, 20.0))

    def test_infeasible_reports_smallest_peak(self):
        # One stage, one layer: 50 bytes of state and 10 of activations never fit in 40.
        p = problem([layer("a", state_bytes=50.0)], num_stages=1, memory_budget_bytes=40.0)
        with pytest.raises(InfeasibleProblem, match="smallest peak found is") as err:
            solve_pipeline_brute_force(p)
        assert (err.value.min_peak_bytes, err.value.budget_bytes) == (60.0, 40.0)

    def test_invalid_problem_is_rejected(self):
        with pytest.raises(ValueError, match="appears twice"):
            solve_pipeline_brute_force(problem([layer("a"), layer("a")]))
