r"""The intra-op sharding problem without its memory rows, solved by exact graph reduction.

Memory aside, the sharding problem is a pairwise minimisation: one variable per tie group
(`problem.tie_groups`), a cost vector c_v per group (its members' node costs, plus the diagonal
of every edge inside the group) and a cost matrix M_uv per pair of groups joined by edges (their
edges' matrices, summed). Three reductions keep its optimum exactly:

    isolated group v      takes argmin_j c_v[j];
    leaf v (neighbour u)  folds into u:   c_u[i] += min_j (M_uv[i, j] + c_v[j]);
    link v (u and w)      becomes a matrix between u and w:
                          M_uw[i, k] += min_j (M_uv[i, j] + c_v[j] + M_vw[j, k]);

and matrices between the same two groups add up. Alpa merges simple ops into their operands
by rule; this is the exact form of that idea. They repeat until every group left has three
neighbours or more. A transformer block is nearly series-parallel (residual branches, the q/k/v
fan-out), so most groups go; what is left, the core, is a smaller problem of the same kind that
the caller solves (the ILP), and the eliminated groups are read back from the core's choice.

Dropping the memory rows relaxes the problem, so its optimum is a lower bound on the problem's
own; a choice that reaches it and also fits the budget is therefore optimal for the problem
itself. `solve_without_memory` returns that choice, or None when it does not fit (the caller
then solves the full ILP): exact either way.

    solve_without_memory(problem, solve_core) -> Solution | None
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from solvers.problem import Edge, Node, ShardingProblem, Solution, evaluate, tie_groups

__all__ = ["reduce_problem", "solve_without_memory"]

# A link's elimination builds a k_u x k_v x k_w array: past this many entries it is left to the
# core (strategy counts of 2D meshes reach ~100, so typical links are 10^5-10^6 entries).
MAX_LINK_ENTRIES = 4_000_000


class _Reduced:
    """The group graph as the reductions leave it, and how to read eliminated groups back."""

    def __init__(self, problem: ShardingProblem):
        self.group_of = tie_groups(problem)
        self.cost: dict[str, np.ndarray] = {}
        self.adj: dict[str, dict[str, np.ndarray]] = {}  # adj[a][b]: rows a's strategies
        for node in problem.nodes:
            rep = self.group_of[node.name]
            c = np.asarray(node.costs_s, dtype=float)
            self.cost[rep] = self.cost[rep] + c if rep in self.cost else c
            self.adj.setdefault(rep, {})
        for edge in problem.edges:
            a, b = self.group_of[edge.src], self.group_of[edge.dst]
            m = np.asarray(edge.costs_s, dtype=float)
            if a == b:
                self.cost[a] = self.cost[a] + np.diagonal(m)
            else:
                self._add(a, b, m)
        # (group, its neighbours then, its best strategy given theirs), in elimination order
        self.steps: list[tuple[str, tuple[str, ...], np.ndarray]] = []

    def _add(self, a: str, b: str, m: np.ndarray) -> None:
        if b in self.adj[a]:
            m = self.adj[a][b] + m
        self.adj[a][b] = m
        self.adj[b][a] = m.T

    def _drop(self, v: str) -> None:
        for u in self.adj.pop(v):
            del self.adj[u][v]
        del self.cost[v]

    def eliminate(self, v: str) -> bool:
        """Remove `v` by the reduction its degree allows; False when none does."""
        nbrs = tuple(self.adj[v])
        c = self.cost[v]
        if len(nbrs) > 2 or (len(nbrs) == 2 and len(self.cost[nbrs[0]]) * len(c)
                             * len(self.cost[nbrs[1]]) > MAX_LINK_ENTRIES):
            return False
        if not nbrs:  # isolated
            table = np.asarray(int(np.argmin(c)))
        elif len(nbrs) == 1:  # leaf: [i_u, j_v]
            through = self.adj[nbrs[0]][v] + c[None, :]
            self.cost[nbrs[0]] = self.cost[nbrs[0]] + through.min(axis=1)
            table = through.argmin(axis=1)
        else:  # link: [i_u, j_v, k_w]
            u, w = nbrs
            through = (self.adj[u][v] + c[None, :])[:, :, None] + self.adj[v][w][None, :, :]
            table = through.argmin(axis=1)
        self.steps.append((v, nbrs, table))
        self._drop(v)
        if len(nbrs) == 2:
            self._add(u, w, through.min(axis=1))
        return True

    def reduce(self) -> None:
        pending = list(self.adj)
        while pending:
            v = pending.pop()
            if v not in self.adj or len(self.adj[v]) > 2:
                continue
            nbrs = tuple(self.adj[v])
            if self.eliminate(v):
                pending.extend(nbrs)

    def core(self) -> ShardingProblem:
        """The groups left, as a problem of their own (no ties, no memory)."""
        nodes = tuple(Node(name=v, costs_s=tuple(self.cost[v].tolist()),
                           memory_bytes=(0.0,) * len(self.cost[v])) for v in self.adj)
        edges = tuple(Edge(src=a, dst=b, costs_s=tuple(map(tuple, m.tolist())))
                      for a in self.adj for b, m in self.adj[a].items() if a < b)
        return ShardingProblem(nodes=nodes, edges=edges)

    def read_back(self, core_choices: dict[str, int]) -> dict[str, int]:
        """Every node's strategy, from the core's choices and the eliminations."""
        chosen = dict(core_choices)
        for v, nbrs, table in reversed(self.steps):
            chosen[v] = int(table[tuple(chosen[u] for u in nbrs)] if nbrs else table)
        return {name: chosen[rep] for name, rep in self.group_of.items()}


def reduce_problem(problem: ShardingProblem) -> tuple[ShardingProblem, _Reduced]:
    """The core left after the reductions, and the record to read a core choice back with
    (`record.read_back(core_choices)` gives every node's strategy)."""
    reduced = _Reduced(problem)
    reduced.reduce()
    return reduced.core(), reduced


def solve_without_memory(
    problem: ShardingProblem, solve_core: Callable[[ShardingProblem], Solution]
) -> Solution | None:
    """The optimal choice of `problem` with its memory rows dropped, when that choice fits the
    budget (it is then optimal for `problem`: see the module docstring); None when it does not
    fit, when every choice is forbidden, or when `solve_core` does not prove its core optimal."""
    start = time.perf_counter()
    core, reduced = reduce_problem(problem)
    core_choices: dict[str, int] = {}
    solver = "reduction"
    if core.nodes:
        sol = solve_core(core)
        if sol.status != "optimal":
            return None
        core_choices, solver = sol.choices, sol.solver
    choices = reduced.read_back(core_choices)
    objective_s, peak_bytes = evaluate(problem, choices)
    if math.isinf(objective_s) or peak_bytes > problem.memory_budget_bytes:
        return None
    return Solution(choices=choices, objective_s=objective_s, peak_memory_bytes=peak_bytes,
                    status="optimal", gap=0.0, solver=solver,
                    solve_time_s=time.perf_counter() - start)
