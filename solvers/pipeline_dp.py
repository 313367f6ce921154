r"""The stage cut by dynamic programming, where every layer has one option and memory is unbounded.

That is the relaxation `solve_pipeline` solves before anything else (`_fastest_unbounded`), and
often its answer: what is left of the problem is the cut alone,

    min  b * (W + C) + (m - b) * M,
    W = the layers' work, C = the sends after every stage but the last,
    M = max_r sum_(s on r) T_s, T_s = the work of stage s's layers + its send,

and both C and M only grow as a partial cut grows. So a partial cut is worth keeping only if no
other one ending at the same place has both a smaller busiest rank so far and fewer seconds of
sends: each state keeps that Pareto front, and the best finished front entry is the optimum.
Exact, with no tolerance but the floats': Switch-Base-8's 27 unlike layers on 16 interleaved
stages took HiGHS up to 14 s a cut and take this under 0.2 s
(docs/benchmarks/2026-12-07-stage-cut-dp).

The DP walks the ranks in order, each rank taking its stages at once; where they lie depends on
the placement (`PipelineProblem.ranks`):

    "one"   one stage a rank (stage s on rank s): one front of cut points moving forward.
    "loop"  two a rank, stage s on rank s % R (interleaved 1F1B): rank r holds stage r of the
            first round and stage R + r of the second; two fronts moving forward, from 0 and from
            e, where the first round ends (every e is tried).
    "v"     two a rank, stage s on rank s for s < R and 2R - 1 - s after (zero-bubble V): rank r
            holds stage r and stage 2R - 1 - r; fronts from 0 forward and from L backward, which
            meet where the first round ends.

`solve_cut_dp` returns None for anything else (more stages a rank, options to choose, a memory
budget) and where the DP would take long (`MAX_STEPS` transitions, deep stacks cut into few
stages, where the ILP's runs model is fast): the ILPs solve those.
"""

from __future__ import annotations

import itertools
import math

from solvers.pipeline_problem import PipelineProblem, even_plan

__all__ = ["MAX_STEPS", "placement", "solve_cut_dp"]

# Transitions (partial cut -> longer partial cut) the DP may try: about a second in CPython.
MAX_STEPS = 1_000_000


def placement(problem: PipelineProblem) -> str | None:
    """"one", "loop" or "v" (module docstring) for the placements the DP walks, else None."""
    ranks, S, R = problem.ranks, problem.num_stages, problem.num_ranks
    if ranks == tuple(range(S)):
        return "one"
    if S != 2 * R:
        return None
    if ranks == tuple(s % R for s in range(S)):
        return "loop"
    if ranks == tuple(s if s < R else 2 * R - 1 - s for s in range(S)):
        return "v"
    return None


def solve_cut_dp(problem: PipelineProblem) -> tuple[tuple[tuple[int, ...], ...], list[int]] | None:
    """The optimal cut of a problem with one option a layer and no memory budget, as
    `(stages, options)` by indices (as `stage_costs` takes them); None where the DP does not
    apply or would take more than `MAX_STEPS` transitions (module docstring)."""
    how = placement(problem)
    if (how is None or not math.isinf(problem.memory_budget_bytes)
            or any(len(x.options) != 1 for x in problem.layers)):
        return None
    L, R = len(problem.layers), problem.num_ranks
    if _steps(how, L, R) > MAX_STEPS:
        return None
    work = [x.options[0].fwd_s + x.options[0].bwd_s for x in problem.layers]
    prefix = [0.0, *itertools.accumulate(work)]
    # send[j]: the seconds of a cut at j (after layer j - 1); never charged at 0 or L
    send = [0.0] + [problem.p2p_latency_s + problem.p2p_s_per_byte * x.boundary_bytes
                    for x in problem.layers]
    b, m = problem.bubble_weight, problem.num_microbatches
    # No rank of an optimal cut works longer than `cap`: a plan whose busiest rank does has a
    # step above the even cut's, b * W + (m - b) * M > step(even). (A hair over, for rounding.)
    even_s = even_plan(problem)[0]
    cap = (even_s - b * prefix[L]) / (m - b) * (1 + 1e-9) + 1e-12 if m > b else math.inf
    walk = {"one": _one, "loop": _loop, "v": _v}[how]
    ends = walk(L, R, prefix, send, cap)
    if not ends:  # only if rounding beat the hair: the ILPs decide
        return None
    best = min(ends, key=lambda e: (b * (prefix[L] + e.sends_s) + (m - b) * e.busiest_s,
                                    e.cuts()))
    cuts = best.cuts()
    bounds = (0, *sorted(cuts), L)
    stages = tuple(tuple(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:]))
    return stages, [0] * L


class _Entry:
    """One partial cut on a state's Pareto front: the busiest rank and the sends so far, the
    cut points this rank added and the entry it grew from."""

    __slots__ = ("busiest_s", "sends_s", "points", "parent")

    def __init__(self, busiest_s, sends_s, points, parent):
        self.busiest_s, self.sends_s = busiest_s, sends_s
        self.points, self.parent = points, parent

    def cuts(self) -> tuple[int, ...]:
        """Every cut point from the first rank's to this entry's, sorted."""
        out, entry = [], self
        while entry is not None:
            out.extend(entry.points)
            entry = entry.parent
        return tuple(sorted(out))


def _keep(front: list[_Entry], busiest_s: float, sends_s: float, points, parent) -> None:
    """Add the partial cut (busiest_s, sends_s) to `front` unless an entry there is as good on
    both counts; drop the entries it beats on both. (Made an `_Entry` only when kept: most
    are not, and this loop is the DP's inner one.)"""
    beaten = False
    for old in front:
        if old.busiest_s <= busiest_s and old.sends_s <= sends_s:
            return
        beaten = beaten or (busiest_s <= old.busiest_s and sends_s <= old.sends_s)
    if beaten:
        front[:] = [old for old in front
                    if not (busiest_s <= old.busiest_s and sends_s <= old.sends_s)]
    front.append(_Entry(busiest_s, sends_s, points, parent))


def _one(L, R, prefix, send, cap) -> list[_Entry]:
    """One stage a rank: the state is where the next stage starts."""
    states = {0: [_Entry(0.0, 0.0, (), None)]}
    for r in range(R):
        last = r == R - 1
        nxt: dict[int, list[_Entry]] = {}
        for a, front in states.items():
            for a2 in ([L] if last else range(a + 1, L - (R - 1 - r) + 1)):
                if prefix[a2] - prefix[a] > cap:
                    break  # and every longer stage
                s = 0.0 if last else send[a2]
                t = prefix[a2] - prefix[a] + s
                for e in front:
                    _keep(nxt.setdefault(a2, []), max(e.busiest_s, t), e.sends_s + s,
                          () if last else (a2,), e)
        states = nxt
    return states.get(L, [])


def _loop(L, R, prefix, send, cap) -> list[_Entry]:
    """Stage r and stage R + r on rank r: for every end e of the first round, two fronts
    moving forward, from 0 to e and from e to L."""
    ends: list[_Entry] = []
    for e in range(R, L - R + 1):
        states = {(0, e): [_Entry(0.0, 0.0, (e,), None)]}
        for r in range(R):
            last = r == R - 1
            left = R - 1 - r  # ranks after this one: each needs a layer in each round
            nxt: dict[tuple[int, int], list[_Entry]] = {}
            for (a, c), front in states.items():
                for a2 in ([e] if last else range(a + 1, e - left + 1)):
                    if prefix[a2] - prefix[a] > cap:
                        break
                    first_t = prefix[a2] - prefix[a] + send[a2]  # never the last stage
                    for c2 in ([L] if last else range(c + 1, L - left + 1)):
                        if prefix[a2] - prefix[a] + prefix[c2] - prefix[c] > cap:
                            break
                        s = send[a2] + (0.0 if last else send[c2])
                        t = first_t + prefix[c2] - prefix[c] + (0.0 if last else send[c2])
                        points = (a2, c2) if not last else ()
                        for x in front:
                            _keep(nxt.setdefault((a2, c2), []), max(x.busiest_s, t),
                                  x.sends_s + s, points, x)
            states = nxt
        ends.extend(states.get((e, L), []))
    return ends


def _v(L, R, prefix, send, cap) -> list[_Entry]:
    """Stage r and stage 2R - 1 - r on rank r: fronts from 0 forward and from L backward, one
    stage each per rank, meeting where the first round ends."""
    states = {(0, L): [_Entry(0.0, 0.0, (), None)]}
    for r in range(R):
        last = r == R - 1
        left = R - 1 - r
        nxt: dict[tuple[int, int], list[_Entry]] = {}
        for (a, c), front in states.items():
            back_s = 0.0 if c == L else send[c]  # the send after stage 2R-1-r, which ends at c
            for a2 in range(a + 1, c - 2 * left):
                if prefix[a2] - prefix[a] > cap:
                    break
                # the stage [c2, c) shrinks as c2 grows: from the smallest up
                for c2 in ([a2] if last else range(c - 1, a2 + 2 * left - 1, -1)):
                    if prefix[a2] - prefix[a] + prefix[c] - prefix[c2] > cap:
                        break
                    s = send[a2] + back_s
                    t = prefix[a2] - prefix[a] + prefix[c] - prefix[c2] + s
                    points = (a2,) if last else (a2, c2)
                    for x in front:
                        _keep(nxt.setdefault((a2, c2), []), max(x.busiest_s, t),
                              x.sends_s + s, points, x)
        states = nxt
    return [x for (a, c), front in states.items() if a == c for x in front]


def _steps(how: str, L: int, R: int) -> int:
    """An upper bound on the DP's transitions (front sizes aside): to refuse long walks."""
    if how == "one":
        return R * (L - R + 1) ** 2
    if how == "v":
        return R * (L - 2 * R + 2) ** 4
    return sum(R * ((e - R + 1) * (L - e - R + 1)) ** 2 for e in range(R, L - R + 1))
