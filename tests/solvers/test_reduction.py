"""solvers.reduction: the memory-free sharding problem solved by graph reduction equals brute
force; series-parallel graphs reduce to nothing, others leave a core; a choice that does not fit
the budget is not returned."""

from __future__ import annotations

import math
import random

import pytest

from solvers import (
    Edge,
    InfeasibleProblem,
    MemoryPoint,
    Node,
    ShardingProblem,
    solve_brute_force,
    solve_intra_op,
)
from solvers.reduction import reduce_problem, solve_without_memory
from tests.solvers.test_intra_op import assert_agrees_with_brute_force, random_problem


def node(name, costs, memory=None):
    return Node(name=name, costs_s=tuple(costs), memory_bytes=tuple(memory or [0.0] * len(costs)))


def edge(src, dst, matrix):
    return Edge(src=src, dst=dst, costs_s=tuple(tuple(row) for row in matrix))


def by_brute_force(core: ShardingProblem):
    return solve_brute_force(core)


def without_memory(problem: ShardingProblem) -> ShardingProblem:
    return ShardingProblem(nodes=problem.nodes, edges=problem.edges, ties=problem.ties)


def dense_problem(rng: random.Random, n: int, k: int) -> ShardingProblem:
    """`n` nodes of up to `k` strategies, each pair joined with probability 0.6 (cycles, chords,
    cores), either direction, sometimes twice; some forbidden strategies and pairs; a tie."""
    names = [f"n{i}" for i in range(n)]
    counts = [rng.randint(1, k) for _ in names]
    ties = ()
    if rng.random() < 0.4:
        group = rng.sample(range(n), 2)
        counts[group[1]] = counts[group[0]]
        ties = ((names[group[0]], names[group[1]]),)
    nodes = tuple(node(nm, [math.inf if c > 1 and rng.random() < 0.05 else rng.uniform(0, 10)
                            for _ in range(c)]) for nm, c in zip(names, counts))
    edges = []
    for a in range(n):
        for b in range(a + 1, n):
            for _ in range(2 if rng.random() < 0.1 else 1):
                if rng.random() < 0.6:
                    src, dst = (a, b) if rng.random() < 0.5 else (b, a)
                    edges.append(edge(names[src], names[dst], [
                        [math.inf if rng.random() < 0.05 else rng.uniform(0, 5)
                         for _ in range(counts[dst])] for _ in range(counts[src])]))
    return ShardingProblem(nodes=nodes, edges=tuple(edges), ties=ties)


@pytest.mark.parametrize("seed", range(4))
def test_the_reduction_equals_brute_force_on_dense_graphs(seed):
    rng = random.Random(seed)
    for _ in range(60):
        problem = dense_problem(rng, rng.randint(2, 8), 3)
        try:
            expected = solve_brute_force(problem)
        except InfeasibleProblem:  # every choice forbidden: not returned (the core's solver
            try:                   # may say so first); the ILP then says why
                assert solve_without_memory(problem, by_brute_force) is None
            except InfeasibleProblem:
                pass
            continue
        got = solve_without_memory(problem, by_brute_force)
        assert got is not None and got.status == "optimal"
        assert got.objective_s == pytest.approx(expected.objective_s, rel=1e-12)
        for tie in problem.ties:
            assert len({got.choices[name] for name in tie}) == 1


def test_a_choice_over_the_budget_is_not_returned_and_the_ilp_still_finds_the_optimum():
    rng = random.Random(5)
    declined = 0
    for _ in range(300):
        problem = random_problem(rng, max_nodes=7)
        try:
            unlimited = solve_brute_force(without_memory(problem))
        except InfeasibleProblem:
            continue  # every choice forbidden (the dense test covers these)
        relaxed = solve_without_memory(problem, by_brute_force)
        if relaxed is None:
            declined += 1  # the full ILP then finds the optimum under the budget
            assert_agrees_with_brute_force(problem, "highs")
        elif relaxed is not None:
            assert relaxed.peak_memory_bytes <= problem.memory_budget_bytes
            assert relaxed.objective_s == pytest.approx(unlimited.objective_s, rel=1e-12)
    assert declined > 20  # the memory rows did bind in many instances


def residual_block(prefix: str, x: str, k: int, rng: random.Random) -> tuple[list, list, str]:
    """x -> norm -> q, k, v -> attention -> proj -> add(x, proj): branches and a skip."""
    names = [f"{prefix}{s}" for s in ("norm", "q", "k", "v", "attn", "proj", "add")]
    nodes = [node(nm, [rng.uniform(0, 3) for _ in range(k)]) for nm in names]
    norm, q, kk, v, attn, proj, add = names
    pairs = [(x, norm), (norm, q), (norm, kk), (norm, v), (q, attn), (kk, attn), (v, attn),
             (attn, proj), (proj, add), (x, add)]
    edges = [edge(a, b, [[rng.uniform(0, 2) for _ in range(k)] for _ in range(k)])
             for a, b in pairs]
    return nodes, edges, add


def test_a_stack_of_residual_blocks_reduces_to_nothing_and_ties_between_blocks_stay_exact():
    rng = random.Random(0)
    nodes, edges, x = [node("input", [1.0, 0.5, 2.0])], [], "input"
    for b in range(3):
        more_nodes, more_edges, x = residual_block(f"b{b}.", x, 3, rng)
        nodes += more_nodes
        edges += more_edges
    untied = ShardingProblem(nodes=tuple(nodes), edges=tuple(edges))
    core, _ = reduce_problem(untied)
    assert not core.nodes  # series-parallel: no ILP at all
    # the blocks tied position by position (as the planner ties repeated layers): the group
    # graph gains edges between a block's groups and themselves, and stays exact
    ties = tuple(tuple(f"b{b}.{s}" for b in range(3))
                 for s in ("norm", "q", "k", "v", "attn", "proj", "add"))
    tied = ShardingProblem(nodes=tuple(nodes), edges=tuple(edges), ties=ties)
    got = solve_without_memory(tied, by_brute_force)
    assert got.objective_s == pytest.approx(solve_brute_force(tied).objective_s, rel=1e-12)
    assert solve_intra_op(tied).objective_s == pytest.approx(got.objective_s, rel=1e-12)


def test_a_complete_graph_is_left_to_the_core():
    rng = random.Random(1)
    names = ["a", "b", "c", "d"]
    nodes = tuple(node(n, [rng.uniform(0, 3) for _ in range(3)]) for n in names)
    edges = tuple(edge(a, b, [[rng.uniform(0, 2) for _ in range(3)] for _ in range(3)])
                  for i, a in enumerate(names) for b in names[i + 1:])
    problem = ShardingProblem(nodes=nodes, edges=edges)
    core, _ = reduce_problem(problem)
    assert {n.name for n in core.nodes} == set(names)  # every node has three neighbours
    # with a leaf hung on it, the leaf goes and the four stay
    leaf = ShardingProblem(nodes=nodes + (node("e", [0.0, 1.0, 2.0]),),
                           edges=edges + (edge("d", "e", [[1, 0, 2], [0, 3, 1], [2, 2, 0]]),))
    core, _ = reduce_problem(leaf)
    assert {n.name for n in core.nodes} == set(names)
    got = solve_without_memory(leaf, by_brute_force)
    assert got.objective_s == pytest.approx(solve_brute_force(leaf).objective_s, rel=1e-12)


def test_memory_points_do_not_enter_the_reduction_but_decide_the_answer():
    a, b = node("a", [1.0, 2.0], [10.0, 1.0]), node("b", [1.0, 2.0], [10.0, 1.0])
    ab = edge("a", "b", [[0.0, 5.0], [5.0, 0.0]])
    live = (MemoryPoint(name="p", live=("a", "b")),)
    fits = ShardingProblem(nodes=(a, b), edges=(ab,), memory_points=live,
                           memory_budget_bytes=20.0)
    assert solve_without_memory(fits, by_brute_force).choices == {"a": 0, "b": 0}
    tight = ShardingProblem(nodes=(a, b), edges=(ab,), memory_points=live,
                            memory_budget_bytes=2.0)
    assert solve_without_memory(tight, by_brute_force) is None
    assert solve_intra_op(tight).choices == {"a": 1, "b": 1}
