"""Planning time of GPT-3, as issue 17 measures it: each case of `plan_gpt3_175b.py` run several
times, each run in a fresh interpreter; the median planning time (the script's own "planning
time" line: trace, search and plan, not the interpreter's start), the planned step time, and the
run's peak resident memory.

    python benchmarks/planning_times.py --runs 5 --json times.json
    python benchmarks/planning_times.py --cases 96-layers-tp8 192-layers-tp8 --runs 3
    python benchmarks/planning_times.py --trees /tmp/old . --cases 175b-1024-gpus --runs 2

`--trees`: checkouts of the project to compare (each its own script and `autopar`, through
PYTHONPATH), run alternately, run by run, so that both see the same machine.

Cases:
    175b-1024-gpus   GPT-3 175B (96 layers), batch 1536, 128 nodes x 8 A100-80GB, the script's
                     whole search space (every tp <= 8, pp, dp; microbatches 1, 2, 4 a rank)
    96-layers-tp8    96 layers, batch 256, 16 nodes, tp 8, microbatch 1 (isolates depth)
    192-layers-tp8   the same with 192 layers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_gpt3_175b.py")
CASES = {
    "175b-1024-gpus": [],
    "96-layers-tp8": ["--layers", "96", "--nodes", "16", "--batch", "256", "--tp", "8",
                      "--microbatch", "1"],
    "192-layers-tp8": ["--layers", "192", "--nodes", "16", "--batch", "256", "--tp", "8",
                       "--microbatch", "1"],
}


def run_once(args: list[str], tree: str | None = None) -> dict:
    """One run of the script in its own process: planning time, step, peak RSS. `tree`: a
    checkout of the project whose script and `autopar` run instead of these."""
    start = time.perf_counter()
    script, env = SCRIPT, None
    if tree is not None:
        tree = os.path.abspath(tree)
        script = os.path.join(tree, "benchmarks", os.path.basename(SCRIPT))
        env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
    planning = re.search(r"^planning time: ([\d.]+) s", out, re.M)
    step = re.search(r"predicted\s+step ([\d.]+) ms", out)
    mesh = re.search(r"^\s+mesh\s+(.*)$", out, re.M)
    return {
        "planning_s": float(planning.group(1)),
        "step_s": float(step.group(1)) / 1e3,
        "mesh": mesh.group(1).strip(),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="write every run and the medians here")
    ap.add_argument("--trees", nargs="+", default=None,
                    help="checkouts to compare, run alternately (default: this one alone)")
    args = ap.parse_args()
    if args.trees:
        return compare_trees(args)
    import torch

    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
                         f"cores, Python {platform.python_version()}, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "cases": {}}
    for name in args.cases:
        runs = []
        for k in range(args.runs):
            runs.append(run_once(CASES[name]))
            print(f"{name} run {k + 1}/{args.runs}: {runs[-1]['planning_s']:.1f} s, step "
                  f"{runs[-1]['step_s']:.4g} s, {runs[-1]['peak_rss_mib']:.0f} MiB", flush=True)
        result["cases"][name] = {
            "args": CASES[name], "runs": runs,
            "median_planning_s": statistics.median(r["planning_s"] for r in runs),
            "max_peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "steps_s": sorted({r["step_s"] for r in runs}),
            "meshes": sorted({r["mesh"] for r in runs}),
        }
    cases = result["cases"]
    if "96-layers-tp8" in cases and "192-layers-tp8" in cases:
        result["depth_ratio"] = (cases["192-layers-tp8"]["median_planning_s"]
                                 / cases["96-layers-tp8"]["median_planning_s"])
    print(f"\n{'case':<16} {'median plan':>12} {'peak RSS':>10}  step(s)")
    for name, c in cases.items():
        print(f"{name:<16} {c['median_planning_s']:>10.1f} s {c['max_peak_rss_mib']:>6.0f} MiB  "
              f"{', '.join(f'{s:.4g} s' for s in c['steps_s'])}")
    if "depth_ratio" in result:
        print(f"depth ratio 192 / 96 layers: {result['depth_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def compare_trees(args) -> None:
    """Each case, run by run, in every tree in turn; the medians per tree."""
    result = {"date": time.strftime("%Y-%m-%d"), "runs": args.runs, "trees": {}}
    for tree in args.trees:
        commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
        result["trees"][tree] = {"commit": commit, "cases": {c: [] for c in args.cases}}
    for name in args.cases:
        for k in range(args.runs):
            for tree in args.trees:
                run = run_once(CASES[name], tree)
                result["trees"][tree]["cases"][name].append(run)
                print(f"{name} run {k + 1}/{args.runs}, {tree} "
                      f"({result['trees'][tree]['commit']}): {run['planning_s']:.1f} s, step "
                      f"{run['step_s']:.4g} s, {run['peak_rss_mib']:.0f} MiB", flush=True)
    for tree, t in result["trees"].items():
        for name, runs in t["cases"].items():
            med = statistics.median(r["planning_s"] for r in runs)
            t.setdefault("median_planning_s", {})[name] = med
            print(f"{tree} ({t['commit']}) {name}: median {med:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
