"""Expert parallelism in the plan space: a mixture-of-experts model planned by the search (which
may pick ep) beside hand configurations with and without ep, by the same cost model.

    python benchmarks/plan_experts.py --json experts.json [--model switch-base-128]
        [--nodes 1 8] [--batch 256] [--seq N] [--search-nodes 1] [--bf16] [--timeout S]
        [--checkpoint full]

Each hand configuration is an `autopar.manual_plan` keyword dict (tp, pp, dp, ep, zero, ...;
`autopar.sweep.resolve_manual` fills dp and the microbatch size). The search runs only on the
node counts in --search-nodes: on a 3-axis mesh (dp x ep x tp) its DTensor probes take minutes
a mesh (docs/benchmarks/2026-12-06-expert-parallel-planning/README.md).
"""

from __future__ import annotations

import argparse
import json

import torch

from autopar.planning.profile import TrainingPrecision
from autopar.sweep import sweep

# without ep: data parallel (plain, ZeRO-2, ZeRO-3), tensor parallel inside a node with ZeRO-2
# over the rest; with ep: the experts over 2 to 8 ranks of a node, the rest data parallel,
# and ep x tp
WITHOUT_EP = [{"zero": 0}, {"zero": 2}, {"zero": 3}, {"tp": 2, "zero": 2}, {"tp": 4, "zero": 2},
              {"tp": 8, "zero": 2}]
WITH_EP = [{"ep": 2, "zero": 2}, {"ep": 4, "zero": 2}, {"ep": 8, "zero": 2},
           {"ep": 4, "tp": 2, "zero": 2}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="switch-base-128")
    ap.add_argument("--cluster", default="h100-80g")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1])
    ap.add_argument("--search-nodes", type=int, nargs="*", default=[1])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 weights and bf16 mixed precision (fp32 master weights and Adam)")
    ap.add_argument("--checkpoint", default=None,
                    help="every hand configuration checkpoints every block so (e.g. full)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds a case may take (then a 'timeout' row)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    extra = {"precision": TrainingPrecision.mixed_bf16()} if args.bf16 else {}
    rows = []
    for nodes in args.nodes:
        hand = [m | ({"checkpoint": args.checkpoint} if args.checkpoint else {})
                for m in WITHOUT_EP + WITH_EP]
        options = [{"manual": m, "label": _label(m), **extra} for m in hand]
        if nodes in args.search_nodes:
            options.insert(0, {"label": "autopar", **extra})
        rows += sweep([args.model], [(args.cluster, nodes)], options, batch=args.batch,
                      seq=args.seq, dtype=torch.bfloat16 if args.bf16 else None,
                      timeout=args.timeout, log=print)
        with open(args.json, "w") as f:  # what is done so far, should a later case stall
            json.dump(rows, f, indent=1, default=str)
    print(f"{'gpus':>5} {'case':<24} {'status':<8} {'mesh':<20} {'flavour':<9} {'step s':>8} "
          f"{'peak GiB':>9} {'plan s':>7}")
    for r in rows:
        print(f"{r['gpus']:>5} {r['label']:<24} {r['status']:<8} {r['mesh'] or '':<20} "
              f"{r['data_parallel'] or '':<9} {_num(r['step_time_s'], 4):>8} "
              f"{_num(r['peak_memory_gib'], 1):>9} {_num(r['plan_s'], 0):>7}")


def _num(x, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _label(manual: dict) -> str:
    return "hand " + ",".join(f"{k}={v}" for k, v in manual.items())


if __name__ == "__main__":
    main()
