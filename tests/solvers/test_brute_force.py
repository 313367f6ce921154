"""Tests for solvers.brute_force: the reference must itself be right on hand-made instances."""

import math

import pytest

from solvers import Edge, InfeasibleProblem, MemoryPoint, Node, ShardingProblem, solve_brute_force

INF = math.inf


def node(name, costs_s, memory_bytes=None):
    memory_bytes = memory_bytes if memory_bytes is not None else (0.0,) * len(costs_s)
    return Node(name=name, costs_s=tuple(costs_s), memory_bytes=tuple(memory_bytes))


class TestSolveBruteForce:
    def test_chain(self):
        reshard = ((0.0, 2.0), (2.0, 0.0))
        p = ShardingProblem(
            nodes=(node("a", (1.0, 2.0)), node("b", (2.5, 1.0)), node("c", (1.0, 2.0))),
            edges=(
                Edge(src="a", dst="b", costs_s=reshard),
                Edge(src="b", dst="c", costs_s=reshard),
            ),
        )
        sol = solve_brute_force(p)
        assert sol.choices == {"a": 0, "b": 0, "c": 0}
        assert (sol.objective_s, sol.status, sol.gap, sol.solver) == (
            4.5,
            "optimal",
            0.0,
            "brute_force",
        )

    def test_equal_costs_take_first_combination(self):
        p = ShardingProblem(nodes=(node("a", (1.0, 1.0)), node("b", (2.0, 2.0))))
        assert solve_brute_force(p).choices == {"a": 0, "b": 0}

    def test_ties(self):
        p = ShardingProblem(
            nodes=(node("l0", (1.0, 2.5)), node("l1", (3.0, 0.5))), ties=(("l0", "l1"),)
        )
        assert solve_brute_force(p).choices == {"l0": 1, "l1": 1}

    def test_memory(self):
        p = ShardingProblem(
            nodes=(node("w", (1.0, 2.0), (8.0, 2.0)),),
            memory_points=(MemoryPoint(name="p", live=("w",)),),
            memory_budget_bytes=4.0,
        )
        sol = solve_brute_force(p)
        assert sol.choices == {"w": 1} and sol.peak_memory_bytes == 2.0

    def test_infeasible(self):
        p = ShardingProblem(
            nodes=(node("w", (1.0, 2.0, INF), (8.0, 2.0, 1.0)),),
            memory_points=(MemoryPoint(name="p", live=("w",)),),
            memory_budget_bytes=1.5,
        )
        with pytest.raises(InfeasibleProblem, match="smallest peak") as err:
            solve_brute_force(p)
        assert err.value.min_peak_bytes == 2.0  # the 1-byte strategy is forbidden
        assert err.value.budget_bytes == 1.5

    def test_too_many_combinations(self):
        p = ShardingProblem(nodes=tuple(node(f"n{k}", (0.0,) * 10) for k in range(4)))
        with pytest.raises(ValueError, match="10000 combinations"):
            solve_brute_force(p, max_combinations=9999)
        tied = ShardingProblem(nodes=p.nodes, ties=(tuple(n.name for n in p.nodes),))
        assert solve_brute_force(tied, max_combinations=10).objective_s == 0.0
