"""The stage cut's DP (`solvers/pipeline_dp.py`) against the HiGHS ILP it replaced, on the cuts
the planner really asks for: solve time and step, problem by problem.

Each case is planned once as `benchmarks/plan_zoo.py` plans it (the zoo model in bf16, bf16
mixed precision, H100 nodes, the default search). Every stage-cut problem the DP answers while it
plans (one option a layer, no memory budget: the relaxation `solve_pipeline` solves first, or a
problem of that form) is kept. Then each kept problem is solved again, `--repeats` times each, one
after the other in this process: by `solve_pipeline` as it is (the DP) and by `solve_pipeline`
with the DP set aside (the ILP HiGHS solved before: "runs" or "layers", as "auto" picks), with
the same time limit and no cutoff:

    python benchmarks/stage_cut_dp.py -o cuts.jsonl                    # the default cases
    python benchmarks/stage_cut_dp.py -o cuts.jsonl --cases switch-base-8@64
    python benchmarks/stage_cut_dp.py --report cuts.jsonl              # the markdown table

One JSON line per (problem, method): the case, the problem's layers, stages, ranks and
placement, the status, the step (s), the median wall time and every wall time.
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

# small and middle zoo models on one 8-GPU node (each planned in about a minute here): Switch's
# alternating dense and expert blocks in two stacks, T5's two stacks, and a GPT's one
DEFAULT_CASES = ("switch-base-8@8", "t5-base@8", "gpt3-350m@8")
METHODS = ("dp", "ilp")


def collect(case: str, time_limit: float) -> tuple[list, dict]:
    """Plan `case` ("model@gpus"), keeping every problem the DP answered; and the plan's row."""
    from benchmarks.plan_zoo import plan_one
    from solvers import pipeline

    name, gpus = case.split("@")
    kept: list = []
    original = pipeline.solve_cut_dp

    def keeping(problem):
        plan = original(problem)
        if plan is not None:
            kept.append(problem)
        return plan

    pipeline.solve_cut_dp = keeping
    try:
        row = plan_one(name, int(gpus), time_limit)
    finally:
        pipeline.solve_cut_dp = original
    return kept, row


def solve(problem, method: str, time_limit: float, repeats: int) -> dict:
    """`repeats` solves by `method`: status and step (of the last), the median wall time and
    every wall time."""
    from solvers import pipeline

    original = pipeline.solve_cut_dp
    if method == "ilp":
        pipeline.solve_cut_dp = lambda p: None
    try:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            sol = pipeline.solve_pipeline(problem, time_limit_s=time_limit)
            runs.append((sol.status, sol.step_time_s, sol.solver, time.perf_counter() - start))
    finally:
        pipeline.solve_cut_dp = original
    walls = [r[3] for r in runs]
    status, step, solver, _ = runs[-1]
    return {"status": status, "step_s": step, "solver": solver,
            "wall_s": statistics.median(walls), "walls_s": walls}


def run(out: str, cases: list[str], time_limit: float, repeats: int) -> None:
    from solvers.pipeline_dp import placement

    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    with open(out, "a") as f:
        for case in cases:
            kept, row = collect(case, time_limit)
            print(f"{case}: planned in {row.get('plan_s')} s ({row.get('mesh')}), "
                  f"{len(kept)} cuts kept", flush=True)
            for i, problem in enumerate(kept):
                for method in METHODS:
                    line = {"case": case, "problem": i, "layers": len(problem.layers),
                            "stages": problem.num_stages, "ranks": problem.num_ranks,
                            "placement": placement(problem), "method": method,
                            **solve(problem, method, time_limit, repeats),
                            "time_limit_s": time_limit, "machine": machine}
                    f.write(json.dumps(line) + "\n")
                    f.flush()
            print(f"{case}: done", flush=True)


def report(path: str) -> str:
    """Per case: problems, the largest step difference (relative), and each method's median,
    largest and total time."""
    rows = [json.loads(line) for line in open(path)]
    by: dict = {}
    for r in rows:
        by.setdefault((r["case"], r["problem"]), {})[r["method"]] = r
    groups: dict = {}
    for (case, _), pair in by.items():
        if set(pair) == set(METHODS):
            groups.setdefault(case, []).append(pair)
    lines = ["| case | cuts (layers x stages) | ILP not optimal | max step diff, DP vs ILP "
             "| DP median / max / total s | ILP median / max / total s | ILP / DP total |",
             "|---|---|---|---|---|---|---|"]
    for case, pairs in groups.items():
        shapes = sorted({(p["dp"]["layers"], p["dp"]["stages"]) for p in pairs})
        diff = max(abs(p["dp"]["step_s"] - p["ilp"]["step_s"]) / p["ilp"]["step_s"]
                   for p in pairs)
        not_optimal = sum(p["ilp"]["status"] != "optimal" for p in pairs)

        dp, ilp = (_times([p[method]["wall_s"] for p in pairs]) for method in METHODS)
        lines.append(
            f"| {case} | {len(pairs)} ({', '.join(f'{a}x{b}' for a, b in shapes)}) "
            f"| {not_optimal} | {diff:.1e} | {dp[0]:.4f} / {dp[1]:.3f} / {dp[2]:.2f} "
            f"| {ilp[0]:.3f} / {ilp[1]:.2f} / {ilp[2]:.1f} | {ilp[2] / dp[2]:.0f}x |")
    return "\n".join(lines)


def _times(walls: list[float]) -> tuple[float, float, float]:
    """Median, largest and total."""
    return statistics.median(walls), max(walls), sum(walls)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", help="JSON lines to append to")
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES),
                    help="model@gpus, as benchmarks/plan_zoo.py names them")
    ap.add_argument("--time-limit", type=float, default=60.0,
                    help="per solve, and the planner's own stage-cut limit (s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--report", metavar="JSONL", help="print the markdown table of a run")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    if not args.output:
        ap.error("give -o FILE (or --report FILE)")
    run(args.output, args.cases, args.time_limit, args.repeats)


if __name__ == "__main__":
    main()
