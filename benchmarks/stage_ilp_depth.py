"""Stage-cut ILP solve times on a deep model: the per-layer model against the runs model.

A GPT-3 175B-like instance (embedding, 96 equal blocks, head; per-device figures at tp 8, options
none / full checkpoint) cut into pp * v stages, stage s on rank s % pp, 1F1B (v = 1) or
interleaved 1F1B (v = 2) in-flight counts, is solved by `solvers.solve_pipeline` with
formulation="layers" (one binary per layer and stage: the model autopar used before) and
formulation="runs" (counts per run of identical layers, what "auto" picks here), each under the
same time limit (autopar.planning.search gives the stage ILP 20 s).

    python benchmarks/stage_ilp_depth.py [--limit 20] [--budget-gb 76 60] [--pp 8 16 32] [--v 1 2]

Prints one row per instance and formulation: seconds, status, relative gap, step time.
"""

from __future__ import annotations

import argparse
import math
import os
import platform

from benchmarks.lib.stage_ilp import gpt3_problem, solve_row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=float, default=20.0, help="seconds per solve")
    ap.add_argument("--budget-gb", type=float, nargs="*", default=[76.0, 60.0])
    ap.add_argument("--pp", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--v", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--microbatches", type=int, default=64)
    ap.add_argument("--formulations", nargs="*", default=["layers", "runs"])
    args = ap.parse_args()
    print(
        f"# stage ILP, 98 layers, limit {args.limit:g} s; {platform.machine()}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(
        f"{'budget':>7s} {'pp':>3s} {'v':>2s} {'S':>3s}  {'model':6s} {'seconds':>7s}  "
        f"{'status':9s} {'gap':>7s} {'step s':>9s}"
    )
    for budget_gb in args.budget_gb:
        for v in args.v:
            for pp in args.pp:
                problem = gpt3_problem(pp, v, args.microbatches, budget_gb * 1e9)
                for formulation in args.formulations:
                    row = solve_row(problem, formulation, args.limit)
                    budget = "inf" if math.isinf(budget_gb) else f"{budget_gb:g} GB"
                    print(
                        f"{budget:>7s} {pp:3d} {v:2d} {pp * v:3d}  {formulation:6s} {row}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
