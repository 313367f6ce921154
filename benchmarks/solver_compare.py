"""HiGHS against CBC on the problems the planner really solves (issue 17): solve time and
objective, problem by problem.

Each case is planned once as `benchmarks/plan_zoo.py` plans it: the zoo model in bf16, bf16
mixed precision, H100 nodes, the default search. While it plans, every intra-op ILP
(`solvers.solve_intra_op`) and every stage-cut ILP (`solvers.solve_pipeline`) it asks for is
kept. Then each kept problem is solved again by both back ends, HiGHS and CBC (pulp's bundled
CBC), with the same time limit, one after the other in this process, `--repeats` times each
(wall clock; the median is the figure, every time is kept: a CBC run now and then stalls for
10 s on a problem it solves in 0.02 s otherwise):

    python benchmarks/solver_compare.py -o solvers.jsonl                 # the default cases
    python benchmarks/solver_compare.py -o solvers.jsonl --cases gpt3-350m@8 t5-base@8
    python benchmarks/solver_compare.py --report solvers.jsonl           # the markdown tables

One JSON line per (problem, back end): the case, the kind ("intra-op" or "stage-cut"), the
problem's size (variables the solver sees are not counted: the problem's own nodes and edges,
or layers and stages), the status ("optimal", "feasible" when the time limit stopped it with a
plan, "infeasible", "no solution"), the objective (seconds: the intra-op objective or the
step time), the median wall time and every wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# small and middle zoo models on one 8-GPU node: every search feature (pp, dp, tp, ZeRO
# flavours, schedules, checkpointing) and three block kinds; each planned in 20-80 s here
DEFAULT_CASES = ("gpt3-350m@8", "bert-large@8", "t5-base@8")
BACKENDS = ("highs", "cbc")


def collect(case: str, time_limit: float) -> tuple[list, dict]:
    """Plan `case` ("model@gpus") with the planner's solves recorded: [(kind, problem, kwargs)]
    and the plan's row."""
    import solvers
    from autopar.planning import layer_costs, search
    from benchmarks.plan_zoo import plan_one

    name, gpus = case.split("@")
    kept: list = []
    originals = (solvers.solve_intra_op, solvers.solve_pipeline)

    def intra_op(problem, **kwargs):
        kept.append(("intra-op", problem, kwargs))
        return originals[0](problem, **kwargs)

    def pipeline(problem, **kwargs):
        kept.append(("stage-cut", problem, kwargs))
        return originals[1](problem, **kwargs)

    # the planner reaches both through the `solvers` module (layer_costs, search)
    solvers.solve_intra_op, solvers.solve_pipeline = intra_op, pipeline
    try:
        row = plan_one(name, int(gpus), time_limit)
    finally:
        solvers.solve_intra_op, solvers.solve_pipeline = originals
    assert layer_costs.solvers is solvers and search.solvers is solvers
    return kept, row


def size(kind: str, problem) -> dict:
    if kind == "intra-op":
        return {"nodes": len(problem.nodes), "edges": len(problem.edges),
                "strategies": sum(len(n.costs_s) for n in problem.nodes)}
    return {"layers": len(problem.layers), "stages": problem.num_stages}


def solve(kind: str, problem, kwargs: dict, backend: str, time_limit: float,
          repeats: int) -> dict:
    """`repeats` solves by `backend`: status and objective (of the last), the median wall time
    and every wall time."""
    runs = [_solve_once(kind, problem, kwargs, backend, time_limit) for _ in range(repeats)]
    walls = [r.pop("wall_s") for r in runs]
    return {**runs[-1], "wall_s": statistics.median(walls), "walls_s": walls,
            "same_every_time": all(r == runs[-1] for r in runs)}


def _solve_once(kind: str, problem, kwargs: dict, backend: str, time_limit: float) -> dict:
    import solvers

    fn = solvers.solve_intra_op if kind == "intra-op" else solvers.solve_pipeline
    kwargs = {**kwargs, "solver": backend, "time_limit_s": time_limit}
    start = time.perf_counter()
    try:
        sol = fn(problem, **kwargs)
    except solvers.InfeasibleProblem:
        return {"status": "infeasible", "objective_s": None,
                "wall_s": time.perf_counter() - start}
    except solvers.NoSolutionFound:
        return {"status": "no solution", "objective_s": None,
                "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    objective = sol.objective_s if kind == "intra-op" else sol.step_time_s
    return {"status": sol.status, "objective_s": objective, "gap": sol.gap, "wall_s": wall}


def run(out: str, cases: list[str], time_limit: float, repeats: int) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    with open(out, "a") as f:
        for case in cases:
            kept, row = collect(case, time_limit)
            print(f"{case}: planned in {row.get('plan_s')} s ({row.get('mesh')}), "
                  f"{len(kept)} solves kept", flush=True)
            for i, (kind, problem, kwargs) in enumerate(kept):
                for backend in BACKENDS:
                    result = solve(kind, problem, kwargs, backend, time_limit, repeats)
                    line = {"case": case, "problem": i, "kind": kind, **size(kind, problem),
                            "backend": backend, **result, "time_limit_s": time_limit,
                            "machine": machine}
                    f.write(json.dumps(line) + "\n")
                    f.flush()
            print(f"{case}: done", flush=True)


def report(path: str) -> str:
    """Per case and kind: problems, both optimal, the largest objective difference where both
    are optimal, and each back end's median and total time."""
    rows = [json.loads(line) for line in open(path)]
    by: dict = {}
    for r in rows:
        by.setdefault((r["case"], r["kind"], r["problem"]), {})[r["backend"]] = r
    lines = ["| case | kind | problems | both optimal | max objective diff (both optimal) "
             "| HiGHS median / total s | CBC median / total s | CBC / HiGHS total | not optimal "
             "(HiGHS, CBC) |",
             # each problem's time is the median of its repeats
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for (case, kind, _), pair in by.items():
        if set(pair) == set(BACKENDS):
            groups.setdefault((case, kind), []).append(pair)
    for (case, kind), pairs in groups.items():
        both = [p for p in pairs if all(p[b]["status"] == "optimal" for b in BACKENDS)]
        diff = max((abs(p["highs"]["objective_s"] - p["cbc"]["objective_s"])
                    / max(abs(p["highs"]["objective_s"]), 1e-30) for p in both), default=0.0)
        times = {b: [p[b]["wall_s"] for p in pairs] for b in BACKENDS}
        not_optimal = [sum(p[b]["status"] != "optimal" for p in pairs) for b in BACKENDS]
        lines.append(
            f"| {case} | {kind} | {len(pairs)} | {len(both)} | {diff:.1e} "
            f"| {statistics.median(times['highs']):.3f} / {sum(times['highs']):.1f} "
            f"| {statistics.median(times['cbc']):.3f} / {sum(times['cbc']):.1f} "
            f"| {sum(times['cbc']) / sum(times['highs']):.2f}x "
            f"| {not_optimal[0]}, {not_optimal[1]} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", help="JSON lines to append to")
    ap.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES),
                    help="model@gpus, models from `autopar models`")
    ap.add_argument("--time-limit", type=float, default=60.0,
                    help="seconds per solve, for the planner and for each back end")
    ap.add_argument("--repeats", type=int, default=3, help="solves of each problem by each back end")
    ap.add_argument("--report", help="print the tables of this JSON lines file and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    if not args.out:
        ap.error("-o/--out is required (or --report FILE)")
    run(args.out, args.cases, args.time_limit, args.repeats)
    print(report(args.out))


if __name__ == "__main__":
    main()
