"""Plain data for the intra-op sharding problem, and how to score one choice of strategies.

A `ShardingProblem` is a graph whose nodes each pick one strategy (an index into their cost
tuples) and whose edges charge a resharding cost for every (src strategy, dst strategy) pair. Memory
is checked at program points: at each `MemoryPoint` the chosen `memory_bytes` of the nodes live
there must add up to no more than `memory_budget_bytes`. Everything is in seconds and bytes, per
device. Names, never indices, identify nodes, so a problem can be built in any order.

`math.inf` is a legal cost and means "forbidden": an edge pair that cannot be resharded, or a node
strategy that must not be chosen. `evaluate` scores such a choice as `inf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "Edge",
    "InfeasibleProblem",
    "MemoryPoint",
    "Node",
    "NoSolutionFound",
    "ShardingProblem",
    "Solution",
    "evaluate",
]

_GIB = 1024.0**3


@dataclass(frozen=True, kw_only=True)
class Node:
    """One op (or tensor) that picks a strategy.

    Attributes
    ----------
    name : str
        Unique name (an fx node name, a parameter FQN, ...).
    costs_s : tuple of float
        Per strategy: seconds the op takes, compute plus its own collectives. `inf` forbids the
        strategy.
    memory_bytes : tuple of float
        Per strategy: bytes this node holds on one device while it is live.
    """

    name: str
    costs_s: tuple[float, ...]
    memory_bytes: tuple[float, ...]

    @property
    def num_strategies(self) -> int:
        return len(self.costs_s)


@dataclass(frozen=True, kw_only=True)
class Edge:
    """A data dependency `src -> dst` and its resharding cost matrix.

    Attributes
    ----------
    src, dst : str
        Node names.
    costs_s : tuple of tuple of float
        `costs_s[i][j]`: seconds to reshard when `src` takes strategy `i` and `dst` strategy `j`;
        `math.inf` forbids the pair.
    """

    src: str
    dst: str
    costs_s: tuple[tuple[float, ...], ...]


@dataclass(frozen=True, kw_only=True)
class MemoryPoint:
    """A program point and the nodes whose memory is live there."""

    name: str
    live: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ShardingProblem:
    """Nodes, edges, memory points and a per-device budget.

    Attributes
    ----------
    nodes : tuple of Node
    edges : tuple of Edge
    memory_points : tuple of MemoryPoint
        Each point's live sum of chosen `memory_bytes` must be `<= memory_budget_bytes`.
    memory_budget_bytes : float
        Per device; `inf` (the default) means no limit.
    ties : tuple of tuple of str
        Groups of nodes that must choose the same strategy index (repeated layers). Members have
        equal strategy counts and share one set of decision variables. Groups that share a member
        are merged.
    """

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...] = ()
    memory_points: tuple[MemoryPoint, ...] = ()
    memory_budget_bytes: float = math.inf
    ties: tuple[tuple[str, ...], ...] = ()

    def node(self, name: str) -> Node:
        """The node called `name` (KeyError if there is none)."""
        return _node_index(self)[name]

    def validate(self) -> None:
        """Raise ValueError naming the first bad node, edge, point, tie or field."""
        by_name: dict[str, Node] = {}
        for node in self.nodes:
            _validate_node(node)
            if node.name in by_name:
                raise ValueError(f"node {node.name!r} appears twice; node names must be unique")
            by_name[node.name] = node
        for k, edge in enumerate(self.edges):
            _validate_edge(k, edge, by_name)
        for point in self.memory_points:
            _validate_point(point, by_name)
        budget = self.memory_budget_bytes
        if not isinstance(budget, (int, float)) or math.isnan(budget) or budget < 0:
            raise ValueError(
                f"memory_budget_bytes must be a non-negative number or math.inf, got {budget!r}"
            )
        for tie in self.ties:
            _validate_tie(tie, by_name)


def _validate_costs(where: str, field: str, values: object, *, allow_inf: bool) -> None:
    if not isinstance(values, tuple):
        raise ValueError(f"{where}: {field} must be a tuple, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: {field}[{i}] must be a number, got {value!r}")
        if math.isnan(value) or value < 0:
            raise ValueError(f"{where}: {field}[{i}] is {value!r}; it must be >= 0 and not NaN")
        if math.isinf(value) and not allow_inf:
            raise ValueError(f"{where}: {field}[{i}] is infinite; it must be finite")


def _validate_node(node: Node) -> None:
    where = f"node {node.name!r}"
    if not isinstance(node.name, str) or not node.name:
        raise ValueError(f"node name must be a non-empty string, got {node.name!r}")
    _validate_costs(where, "costs_s", node.costs_s, allow_inf=True)
    _validate_costs(where, "memory_bytes", node.memory_bytes, allow_inf=False)
    if len(node.costs_s) == 0:
        raise ValueError(f"{where} has no strategies; give it at least one")
    if len(node.costs_s) != len(node.memory_bytes):
        raise ValueError(
            f"{where}: costs_s has {len(node.costs_s)} strategies but memory_bytes has "
            f"{len(node.memory_bytes)}; they must have one entry per strategy"
        )


def _validate_edge(k: int, edge: Edge, by_name: dict[str, Node]) -> None:
    where = f"edge {k} ({edge.src!r} -> {edge.dst!r})"
    for end in (edge.src, edge.dst):
        if end not in by_name:
            raise ValueError(f"{where} names unknown node {end!r}")
    if edge.src == edge.dst:
        raise ValueError(f"{where} goes from a node to itself; drop it or fold it into the node")
    n_src, n_dst = by_name[edge.src].num_strategies, by_name[edge.dst].num_strategies
    if not isinstance(edge.costs_s, tuple) or len(edge.costs_s) != n_src:
        rows = len(edge.costs_s) if isinstance(edge.costs_s, tuple) else edge.costs_s
        raise ValueError(
            f"{where}: costs_s must be a tuple of {n_src} rows (one per strategy of "
            f"{edge.src!r}), got {rows!r}"
        )
    for i, row in enumerate(edge.costs_s):
        _validate_costs(where, f"costs_s[{i}]", row, allow_inf=True)
        if len(row) != n_dst:
            raise ValueError(
                f"{where}: costs_s[{i}] has {len(row)} entries; it needs {n_dst} (one per "
                f"strategy of {edge.dst!r})"
            )


def _validate_point(point: MemoryPoint, by_name: dict[str, Node]) -> None:
    where = f"memory point {point.name!r}"
    if not isinstance(point.live, tuple):
        raise ValueError(f"{where}: live must be a tuple of node names")
    seen: set[str] = set()
    for name in point.live:
        if name not in by_name:
            raise ValueError(f"{where} names unknown node {name!r} as live")
        if name in seen:
            raise ValueError(f"{where} lists node {name!r} twice as live")
        seen.add(name)


def _validate_tie(tie: tuple[str, ...], by_name: dict[str, Node]) -> None:
    if not isinstance(tie, tuple) or not tie:
        raise ValueError(f"tie {tie!r} must be a non-empty tuple of node names")
    for name in tie:
        if name not in by_name:
            raise ValueError(f"tie {tie!r} names unknown node {name!r}")
    counts = {name: by_name[name].num_strategies for name in tie}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"tie {tie!r} joins nodes with different strategy counts {counts}; tied nodes must "
            "have the same strategies in the same order"
        )


@dataclass(frozen=True, kw_only=True)
class Solution:
    """The strategies chosen for a problem, and what they cost.

    Attributes
    ----------
    choices : dict of str to int
        Node name -> strategy index.
    objective_s : float
        Sum of chosen node costs plus chosen edge costs (recomputed with `evaluate`).
    peak_memory_bytes : float
        Max over memory points of the live sum (0 if there are no points).
    status : str
        "optimal", or "feasible" when a time limit stopped the solver with a plan in hand.
    gap : float or None
        Relative MIP gap when not proven optimal (None if the solver did not say), else 0.0.
    solver : str
        "highs", "cbc" or "brute_force".
    solve_time_s : float
        Wall-clock seconds spent building and solving.
    """

    choices: dict[str, int]
    objective_s: float
    peak_memory_bytes: float
    status: str
    gap: float | None
    solver: str
    solve_time_s: float


class InfeasibleProblem(Exception):
    """No choice of strategies fits the memory budget (or avoids every forbidden pair).

    `min_peak_bytes` is the smallest peak any allowed choice reaches; it is `inf` when every
    choice uses a forbidden (infinite-cost) strategy or edge pair.
    """

    def __init__(self, message: str, *, min_peak_bytes: float, budget_bytes: float):
        super().__init__(message)
        self.min_peak_bytes = min_peak_bytes
        self.budget_bytes = budget_bytes


class NoSolutionFound(RuntimeError):
    """The solver stopped (time limit) before it found any plan; the problem may be feasible."""


class NoPlanBelowCutoff(NoSolutionFound):
    """Proven: no plan that fits has an objective below the caller's cutoff (a plan the caller
    already holds is at least as good as any this problem has)."""


def infeasible_error(min_peak_bytes: float, budget_bytes: float) -> InfeasibleProblem:
    """The InfeasibleProblem both solvers raise, with its user-facing message."""
    if math.isinf(min_peak_bytes):
        message = (
            "no sharding avoids the forbidden choices: every combination of strategies uses a "
            "strategy or a resharding pair whose cost is inf; allow at least one path through "
            "the graph (check the edges between tied nodes, which must agree on one index)"
        )
    else:
        message = (
            f"no sharding fits the memory budget of {budget_bytes / _GIB:.3f} GiB per device; "
            f"the smallest peak found is {min_peak_bytes / _GIB:.3f} GiB "
            f"({min_peak_bytes:.0f} bytes); raise the budget, add devices, or allow more "
            "sharding/recomputation"
        )
    return InfeasibleProblem(message, min_peak_bytes=min_peak_bytes, budget_bytes=budget_bytes)


def _node_index(problem: ShardingProblem) -> dict[str, Node]:
    return {node.name: node for node in problem.nodes}


def tie_groups(problem: ShardingProblem) -> dict[str, str]:
    """Map every node name to its tie group's representative (the first node in problem order).

    Overlapping tie groups are merged (union-find); an untied node represents itself.
    """
    parent = {node.name: node.name for node in problem.nodes}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    order = {node.name: k for k, node in enumerate(problem.nodes)}
    for tie in problem.ties:
        for name in tie[1:]:
            a, b = find(tie[0]), find(name)
            if a != b:
                keep, drop = (a, b) if order[a] < order[b] else (b, a)
                parent[drop] = keep
    return {name: find(name) for name in parent}


def evaluate(problem: ShardingProblem, choices: dict[str, int]) -> tuple[float, float]:
    """Score one choice: `(objective_s, peak_memory_bytes)`.

    `objective_s` is `inf` if the choice takes a forbidden strategy or edge pair. Ties are not
    checked here; the solvers only produce choices that respect them.

    Examples
    --------
    >>> p = ShardingProblem(
    ...     nodes=(Node(name="a", costs_s=(1.0, 2.0), memory_bytes=(4.0, 2.0)),),
    ...     memory_points=(MemoryPoint(name="a", live=("a",)),),
    ... )
    >>> evaluate(p, {"a": 1})
    (2.0, 2.0)
    """
    objective_s = 0.0
    for node in problem.nodes:
        objective_s += node.costs_s[choices[node.name]]
    for edge in problem.edges:
        objective_s += edge.costs_s[choices[edge.src]][choices[edge.dst]]
    by_name = _node_index(problem)
    peak_bytes = 0.0
    for point in problem.memory_points:
        live_bytes = 0.0
        for name in point.live:
            live_bytes += by_name[name].memory_bytes[choices[name]]
        peak_bytes = max(peak_bytes, live_bytes)
    return objective_s, peak_bytes
