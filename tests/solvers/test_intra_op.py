"""Tests for solvers.intra_op: hand-made instances with known answers, and brute-force agreement."""

import dataclasses
import math
import random

import pulp
import pytest

from solvers import (
    Edge,
    InfeasibleProblem,
    MemoryPoint,
    Node,
    NoSolutionFound,
    ShardingProblem,
    evaluate,
    solve_brute_force,
    smallest_peak,
    solve_intra_op,
)
from solvers.intra_op import build_intra_op_ilp

INF = math.inf
GIB = 1024.0**3


def node(name, costs_s, memory_bytes=None):
    memory_bytes = memory_bytes if memory_bytes is not None else (0.0,) * len(costs_s)
    return Node(name=name, costs_s=tuple(costs_s), memory_bytes=tuple(memory_bytes))


def edge(src, dst, costs_s):
    return Edge(src=src, dst=dst, costs_s=tuple(tuple(row) for row in costs_s))


def point(name, *live):
    return MemoryPoint(name=name, live=tuple(live))


def chain():
    """a -> b -> c; a and c prefer 0, b prefers 1, resharding costs 2 per change."""
    reshard = ((0.0, 2.0), (2.0, 0.0))
    return ShardingProblem(
        nodes=(node("a", (1.0, 2.0)), node("b", (2.5, 1.0)), node("c", (1.0, 2.0))),
        edges=(edge("a", "b", reshard), edge("b", "c", reshard)),
    )


def random_problem(rng: random.Random, *, max_nodes=6, max_strategies=4) -> ShardingProblem:
    n = rng.randint(2, max_nodes)
    names = [f"n{k}" for k in range(n)]
    counts = [rng.randint(1, max_strategies) for _ in names]
    # Ties: sometimes give two or three nodes the same count and tie them.
    ties = []
    if n >= 3 and rng.random() < 0.3:
        group = rng.sample(range(n), rng.randint(2, 3))
        for k in group[1:]:
            counts[k] = counts[group[0]]
        ties.append(tuple(names[k] for k in group))
    nodes = []
    for name, count in zip(names, counts):
        costs = [round(rng.uniform(0.0, 10.0), 3) for _ in range(count)]
        if count > 1 and rng.random() < 0.1:
            costs[rng.randrange(count)] = INF
        memory = [float(rng.randint(0, 100)) * 1e6 for _ in range(count)]
        nodes.append(node(name, costs, memory))
    edges = []
    for a in range(n):
        for b in range(a + 1, n):
            if rng.random() < 0.5:
                matrix = [
                    [
                        INF if rng.random() < 0.1 else round(rng.uniform(0.0, 5.0), 3)
                        for _ in range(counts[b])
                    ]
                    for _ in range(counts[a])
                ]
                edges.append(edge(names[a], names[b], matrix))
    points = []
    for k in range(rng.randint(0, 4)):
        live = rng.sample(names, rng.randint(1, n))
        points.append(point(f"p{k}", *live))
    budget = INF
    if points and rng.random() < 0.8:
        budget = float(rng.randint(0, 100 * n)) * 1e6 + 0.5e6  # never exactly on a peak
    return ShardingProblem(
        nodes=tuple(nodes),
        edges=tuple(edges),
        memory_points=tuple(points),
        memory_budget_bytes=budget,
        ties=tuple(ties),
    )


def assert_valid(problem, solution):
    assert set(solution.choices) == {nd.name for nd in problem.nodes}
    for nd in problem.nodes:
        assert 0 <= solution.choices[nd.name] < nd.num_strategies
    for tie in problem.ties:
        assert len({solution.choices[name] for name in tie}) == 1
    objective_s, peak_bytes = evaluate(problem, solution.choices)
    assert math.isfinite(objective_s)
    assert objective_s == solution.objective_s
    assert peak_bytes == solution.peak_memory_bytes
    assert peak_bytes <= problem.memory_budget_bytes


def assert_agrees_with_brute_force(problem, solver):
    try:
        expected = solve_brute_force(problem)
    except InfeasibleProblem as err:
        with pytest.raises(InfeasibleProblem) as got:
            solve_intra_op(problem, solver=solver)
        assert got.value.min_peak_bytes == pytest.approx(err.min_peak_bytes, rel=1e-9)
        assert got.value.budget_bytes == err.budget_bytes
        return "infeasible"
    solution = solve_intra_op(problem, solver=solver)
    assert solution.status == "optimal" and solution.gap == 0.0 and solution.solver == solver
    assert_valid(problem, solution)
    assert solution.objective_s == pytest.approx(expected.objective_s, rel=1e-9, abs=1e-12)
    return "feasible"


class TestSolveIntraOp:
    def test_single_node_takes_cheapest(self):
        p = ShardingProblem(nodes=(node("a", (3.0, 1.0, 2.0)),))
        sol = solve_intra_op(p)
        assert sol.choices == {"a": 1}
        assert sol.objective_s == 1.0
        assert sol.peak_memory_bytes == 0.0
        assert (sol.status, sol.gap, sol.solver) == ("optimal", 0.0, "highs")

    def test_one_strategy_is_fixed(self):
        p = ShardingProblem(
            nodes=(node("a", (5.0,)), node("b", (1.0, 0.0))),
            edges=(edge("a", "b", ((0.0, 3.0),)),),
        )
        sol = solve_intra_op(p)
        assert sol.choices == {"a": 0, "b": 0}
        assert sol.objective_s == 6.0

    def test_no_edges_picks_each_minimum(self):
        p = ShardingProblem(nodes=(node("a", (2.0, 1.0)), node("b", (0.5, 4.0))))
        assert solve_intra_op(p).choices == {"a": 1, "b": 0}

    def test_empty_problem(self):
        sol = solve_intra_op(ShardingProblem(nodes=()))
        assert sol.choices == {} and sol.objective_s == 0.0

    def test_resharding_keeps_chain_consistent(self):
        # Alone, b prefers 1 (saves 1.5 s), but switching twice costs 4 s: all take 0.
        sol = solve_intra_op(chain())
        assert sol.choices == {"a": 0, "b": 0, "c": 0}
        assert sol.objective_s == 4.5

    def test_cheap_resharding_lets_nodes_differ(self):
        reshard = ((0.0, 0.25), (0.25, 0.0))
        p = ShardingProblem(
            nodes=chain().nodes,
            edges=(edge("a", "b", reshard), edge("b", "c", reshard)),
        )
        sol = solve_intra_op(p)
        assert sol.choices == {"a": 0, "b": 1, "c": 0}
        assert sol.objective_s == 3.5

    def test_forbidden_pair_is_avoided(self):
        p = ShardingProblem(
            nodes=(node("a", (0.0, 1.0)), node("b", (0.0, 1.0))),
            edges=(edge("a", "b", ((INF, 0.0), (0.0, 5.0))),),
        )
        sol = solve_intra_op(p)
        assert sol.objective_s == 1.0
        assert sol.choices in ({"a": 0, "b": 1}, {"a": 1, "b": 0})

    def test_forbidden_strategy_is_avoided(self):
        p = ShardingProblem(nodes=(node("a", (INF, 3.0)),))
        assert solve_intra_op(p).choices == {"a": 1}

    def test_memory_budget_forces_sharding(self):
        # Strategy 0 replicates (fast, 8 GiB); strategy 1 shards (slow, 2 GiB).
        nodes = (
            node("w1", (1.0, 2.0), (8 * GIB, 2 * GIB)),
            node("w2", (1.0, 2.0), (8 * GIB, 2 * GIB)),
        )
        points = (point("fwd", "w1", "w2"),)
        free = ShardingProblem(nodes=nodes, memory_points=points)
        assert solve_intra_op(free).choices == {"w1": 0, "w2": 0}
        tight = ShardingProblem(nodes=nodes, memory_points=points, memory_budget_bytes=10 * GIB)
        sol = solve_intra_op(tight)
        assert sorted(sol.choices.values()) == [0, 1]
        assert sol.peak_memory_bytes == 10 * GIB  # exactly on the budget is allowed
        assert sol.objective_s == 3.0

    def test_liveness_not_sum_over_nodes(self):
        # Never live together, so each may replicate under a budget of 8 GiB.
        nodes = (
            node("x", (1.0, 2.0), (8 * GIB, 2 * GIB)),
            node("y", (1.0, 2.0), (8 * GIB, 2 * GIB)),
        )
        p = ShardingProblem(
            nodes=nodes,
            memory_points=(point("p1", "x"), point("p2", "y")),
            memory_budget_bytes=8 * GIB,
        )
        sol = solve_intra_op(p)
        assert sol.choices == {"x": 0, "y": 0}
        assert sol.peak_memory_bytes == 8 * GIB

    def test_infeasible_reports_min_peak(self):
        nodes = (
            node("w1", (1.0, 2.0), (8 * GIB, 3 * GIB)),
            node("w2", (1.0, 2.0), (8 * GIB, 3 * GIB)),
        )
        p = ShardingProblem(
            nodes=nodes, memory_points=(point("fwd", "w1", "w2"),), memory_budget_bytes=5 * GIB
        )
        with pytest.raises(InfeasibleProblem) as err:
            solve_intra_op(p)
        assert err.value.min_peak_bytes == 6 * GIB
        assert err.value.budget_bytes == 5 * GIB
        assert "5.000 GiB" in str(err.value) and "6.000 GiB" in str(err.value)

    def test_min_peak_respects_forbidden_pairs(self):
        # The 1 GiB choice for b needs a forbidden pair, so the smallest allowed peak is 4 GiB.
        p = ShardingProblem(
            nodes=(node("a", (1.0,), (1 * GIB,)), node("b", (1.0, 1.0), (3 * GIB, 0.0))),
            edges=(edge("a", "b", ((0.0, INF),)),),
            memory_points=(point("p", "a", "b"),),
            memory_budget_bytes=2 * GIB,
        )
        with pytest.raises(InfeasibleProblem) as err:
            solve_intra_op(p)
        assert err.value.min_peak_bytes == 4 * GIB

    def test_smallest_peak_ignores_the_budget_and_the_time(self):
        # The smallest peak needs b's slow strategy and avoids the forbidden pair: 4 GiB, the
        # same figure the infeasible solve reports, whatever the budget says.
        p = ShardingProblem(
            nodes=(node("a", (1.0,), (1 * GIB,)),
                   node("b", (1.0, 9.0, 1.0), (3 * GIB, 3 * GIB, 0.0))),
            edges=(edge("a", "b", ((0.0, 0.0, INF),)),),
            memory_points=(point("p", "a", "b"),),
            memory_budget_bytes=2 * GIB,
        )
        assert smallest_peak(p) == 4 * GIB
        assert smallest_peak(dataclasses.replace(p, memory_budget_bytes=INF)) == 4 * GIB
        with pytest.raises(InfeasibleProblem) as err:
            solve_intra_op(p)
        assert err.value.min_peak_bytes == 4 * GIB

    def test_all_pairs_forbidden(self):
        p = ShardingProblem(
            nodes=(node("a", (0.0, 0.0)), node("b", (0.0, 0.0))),
            edges=(edge("a", "b", ((INF, INF), (INF, INF))),),
        )
        with pytest.raises(InfeasibleProblem) as err:
            solve_intra_op(p)
        assert err.value.min_peak_bytes == INF
        assert "forbidden" in str(err.value)

    def test_ties_share_one_choice(self):
        # Alone, l0 prefers 0 and l1 prefers 1; tied, the sum decides: 1 + 3 > 2.5 + 0.5.
        p = ShardingProblem(
            nodes=(node("l0", (1.0, 2.5)), node("l1", (3.0, 0.5))),
            ties=(("l0", "l1"),),
        )
        sol = solve_intra_op(p)
        assert sol.choices == {"l0": 1, "l1": 1}
        assert sol.objective_s == 3.0

    def test_ties_share_variables(self):
        layers = tuple(node(f"layer{k}", (1.0, 2.0, 3.0)) for k in range(10))
        p = ShardingProblem(nodes=layers, ties=(tuple(nd.name for nd in layers),))
        ilp = build_intra_op_ilp(p)
        assert list(ilp.strategy_vars) == ["layer0"]
        assert len(ilp.lp.variables()) == 3

    def test_edge_inside_tie_group_uses_diagonal(self):
        p = ShardingProblem(
            nodes=(node("l0", (1.0, 1.0)), node("l1", (1.0, 1.0))),
            edges=(edge("l0", "l1", ((INF, 9.0), (9.0, 2.0))),),
            ties=(("l0", "l1"),),
        )
        sol = solve_intra_op(p)
        assert sol.choices == {"l0": 1, "l1": 1}
        assert sol.objective_s == 4.0

    def test_overlapping_ties_merge(self):
        p = ShardingProblem(
            nodes=(node("a", (0.0, 1.0)), node("b", (1.0, 1.0)), node("c", (5.0, 0.0))),
            ties=(("a", "b"), ("b", "c")),
        )
        sol = solve_intra_op(p)
        assert len(set(sol.choices.values())) == 1
        assert sol.objective_s == 2.0

    def test_odd_names_are_sanitised(self):
        names = ["layers.0/mm", "layers.0[mm]", "layers.0-mm", "a->b", "a b"]
        nodes = tuple(node(name, (1.0, 0.5), (2.0, 0.0)) for name in names)
        edges = tuple(edge(names[k], names[k + 1], ((0.0, 1.0), (1.0, 0.0))) for k in range(4))
        p = ShardingProblem(
            nodes=nodes,
            edges=edges,
            memory_points=(point("x[0]", *names),),
            memory_budget_bytes=1.0,
        )
        ilp = build_intra_op_ilp(p)
        for name in (
            "one_strategy(layers.0_mm)",
            "one_strategy(layers.0_mm.2)",
            "edge_row(layers.0_mm_,layers.0_mm.2)(1)",
            "memory(x_0_)",
        ):
            assert ilp.lp.get_constraint_by_name(name) is not None, name
        assert solve_intra_op(p, solver="cbc").choices == {name: 1 for name in names}
        assert solve_intra_op(p).choices == {name: 1 for name in names}

    def test_memory_rows_only_where_they_bind(self):
        nodes = (node("a", (1.0, 2.0), (4.0, 1.0)), node("b", (1.0, 2.0), (1.0, 1.0)))
        points = (point("p", "a"), point("p", "a", "b"), point("q", "b"))
        p = ShardingProblem(nodes=nodes, memory_points=points, memory_budget_bytes=3.0)
        ilp = build_intra_op_ilp(p)
        assert ilp.lp.get_constraint_by_name("memory(p)") is not None
        assert ilp.lp.get_constraint_by_name("memory(p.2)") is not None
        assert ilp.lp.get_constraint_by_name("memory(q)") is None  # 1 byte always fits
        sol = solve_intra_op(p)
        assert sol.choices == {"a": 1, "b": 0} and sol.peak_memory_bytes == 2.0

    def test_parallel_edges_both_count(self):
        p = ShardingProblem(
            nodes=(node("a", (0.0, 0.0)), node("b", (0.0, 0.0))),
            edges=(
                edge("a", "b", ((1.0, 0.0), (0.0, 1.0))),
                edge("a", "b", ((1.0, 2.0), (2.0, 1.0))),
            ),
        )
        assert solve_intra_op(p).objective_s == 2.0

    def test_cbc_matches_hand_answer(self):
        sol = solve_intra_op(chain(), solver="cbc")
        assert sol.choices == {"a": 0, "b": 0, "c": 0}
        assert (sol.status, sol.gap, sol.solver) == ("optimal", 0.0, "cbc")

    def test_falls_back_to_cbc_without_highs(self, monkeypatch):
        monkeypatch.setattr(pulp.HiGHS, "available", lambda self: False)
        with pytest.warns(UserWarning, match="falling back to CBC"):
            sol = solve_intra_op(chain())
        assert sol.solver == "cbc" and sol.choices == {"a": 0, "b": 0, "c": 0}

    def test_unknown_solver(self):
        with pytest.raises(ValueError, match="solver must be one of"):
            solve_intra_op(chain(), solver="gurobi")

    def test_deterministic(self):
        p = random_problem(random.Random(7), max_nodes=8)
        first = solve_intra_op(p)
        assert all(solve_intra_op(p).choices == first.choices for _ in range(3))

    def test_time_limit_returns_plan(self):
        rng = random.Random(1)
        names = [f"n{k}" for k in range(60)]
        nodes = tuple(node(n, [rng.uniform(0, 1) for _ in range(6)]) for n in names)
        edges = tuple(
            edge(names[a], names[b], [[rng.uniform(0, 1) for _ in range(6)] for _ in range(6)])
            for a in range(60)
            for b in (a + 1, a + 2)
            if b < 60
        )
        p = ShardingProblem(nodes=nodes, edges=edges)
        sol = solve_intra_op(p, time_limit_s=0.5)  # HiGHS finds a plan at the root at once
        assert sol.status in {"optimal", "feasible"}
        assert sol.gap == 0.0 if sol.status == "optimal" else sol.gap is None or sol.gap > 0.0
        assert_valid(p, sol)
        try:
            sol = solve_intra_op(p, solver="cbc", time_limit_s=0.5)
        except NoSolutionFound as err:  # CBC may stop before its first plan: also correct
            assert "time_limit_s=0.5" in str(err)
        else:
            assert sol.status in {"optimal", "feasible"}
            assert_valid(p, sol)

    @pytest.mark.parametrize("solver", ["highs", "cbc"])
    def test_gap_option(self, solver):
        sol = solve_intra_op(chain(), solver=solver, gap=0.5)
        assert sol.status in {"optimal", "feasible"}
        assert_valid(chain(), sol)


class TestAgainstBruteForce:
    def test_highs_random(self):
        rng = random.Random(2024)
        outcomes = [
            assert_agrees_with_brute_force(random_problem(rng), "highs") for _ in range(500)
        ]
        # The generator must exercise both sides.
        assert outcomes.count("infeasible") >= 50 and outcomes.count("feasible") >= 300

    def test_cbc_random(self):
        rng = random.Random(99)
        for _ in range(60):
            assert_agrees_with_brute_force(random_problem(rng), "cbc")


class TestValidate:
    @pytest.mark.parametrize(
        ("problem", "match"),
        [
            (ShardingProblem(nodes=(node("a", ()),)), "no strategies"),
            (
                ShardingProblem(nodes=(Node(name="a", costs_s=(1.0,), memory_bytes=(1.0, 2.0)),)),
                "memory_bytes has 2",
            ),
            (ShardingProblem(nodes=(node("a", (1.0,)), node("a", (1.0,)))), "appears twice"),
            (ShardingProblem(nodes=(node("a", (-1.0,)),)), r"costs_s\[0\] is -1.0"),
            (ShardingProblem(nodes=(node("a", (math.nan,)),)), "not NaN"),
            (ShardingProblem(nodes=(node("a", (1.0,), (INF,)),)), "must be finite"),
            (
                ShardingProblem(nodes=(node("a", (1.0,)),), edges=(edge("a", "z", ((0.0,),)),)),
                "unknown node 'z'",
            ),
            (
                ShardingProblem(nodes=(node("a", (1.0,)),), edges=(edge("a", "a", ((0.0,),)),)),
                "to itself",
            ),
            (
                ShardingProblem(
                    nodes=(node("a", (1.0, 2.0)), node("b", (1.0,))),
                    edges=(edge("a", "b", ((0.0,),)),),
                ),
                "2 rows",
            ),
            (
                ShardingProblem(
                    nodes=(node("a", (1.0,)), node("b", (1.0, 2.0))),
                    edges=(edge("a", "b", ((0.0,),)),),
                ),
                "needs 2",
            ),
            (
                ShardingProblem(
                    nodes=(node("a", (1.0,)), node("b", (1.0,))),
                    edges=(edge("a", "b", ((math.nan,),)),),
                ),
                "edge 0",
            ),
            (
                ShardingProblem(nodes=(node("a", (1.0,)),), memory_points=(point("p", "q"),)),
                "memory point 'p' names unknown node 'q'",
            ),
            (
                ShardingProblem(nodes=(node("a", (1.0,)),), memory_points=(point("p", "a", "a"),)),
                "twice",
            ),
            (
                ShardingProblem(nodes=(node("a", (1.0,)),), memory_budget_bytes=-1.0),
                "memory_budget_bytes",
            ),
            (
                ShardingProblem(nodes=(node("a", (1.0,)),), memory_budget_bytes=math.nan),
                "memory_budget_bytes",
            ),
            (
                ShardingProblem(
                    nodes=(node("a", (1.0,)), node("b", (1.0, 2.0))), ties=(("a", "b"),)
                ),
                "different strategy counts",
            ),
            (ShardingProblem(nodes=(node("a", (1.0,)),), ties=(("a", "x"),)), "unknown node 'x'"),
        ],
    )
    def test_errors(self, problem, match):
        with pytest.raises(ValueError, match=match):
            problem.validate()
        with pytest.raises(ValueError, match=match):
            solve_intra_op(problem)

    def test_valid_problem_passes(self):
        chain().validate()
