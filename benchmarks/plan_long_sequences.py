"""Context parallelism in the plan space: Llama 3 8B at long sequences, planned by the search
(which may pick cp) beside hand configurations with and without cp, by the same cost model.

    python benchmarks/plan_long_sequences.py --json long.json [--seqs 8192 32768 131072]
        [--nodes 1 8] [--search-nodes 1 8] [--no-hand] [--timeout S]

Every case trains the same number of tokens per node and step (`TOKENS_PER_NODE`): at 8K, 16
sequences a node; at 128K, one. bf16 weights and bf16 mixed precision (fp32 master weights and
Adam state). Each hand configuration is an `autopar.manual_plan` keyword dict;
`autopar.sweep.resolve_manual` fills dp (the devices tp x cp leave) and the microbatch size
(batch / dp: no gradient accumulation without pp). Every hand configuration checkpoints each
block in full: without it none fits at these lengths.
"""

from __future__ import annotations

import argparse
import json

import torch

from autopar.planning.profile import TrainingPrecision
from autopar.sweep import sweep

TOKENS_PER_NODE = 131072
FULL = {"checkpoint": "full"}
# without cp: Megatron-style tp inside the node (with and without sequence parallelism),
# ZeRO-3 data parallelism, tp with pipeline stages; with cp: cp x tp filling the node
WITHOUT_CP = [{"tp": 8, "zero": 2, **FULL}, {"tp": 8, "zero": 2, "sequence_parallel": True, **FULL},
              {"tp": 4, "zero": 3, **FULL}, {"zero": 3, **FULL},
              {"tp": 4, "pp": 2, "microbatch_size": 1, **FULL}]
WITH_CP = [{"cp": 2, "tp": 4, "zero": 2, **FULL}, {"cp": 4, "tp": 2, "zero": 2, **FULL},
           {"cp": 8, "zero": 2, **FULL}, {"cp": 2, "tp": 4, "zero": 2, "sequence_parallel": True,
                                         **FULL}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--cluster", default="h100-80g")
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--search-nodes", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--hand", action=argparse.BooleanOptionalAction, default=True,
                    help="plan the hand configurations (--no-hand: the search alone)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds a case may take (then a 'timeout' row)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    precision = TrainingPrecision.mixed_bf16()
    rows = []
    for seq in args.seqs:
        for nodes in args.nodes:
            options = [{"manual": m, "label": _label(m), "precision": precision}
                       for m in (WITHOUT_CP + WITH_CP if args.hand else [])]
            if nodes in args.search_nodes:
                options.insert(0, {"label": "autopar", "precision": precision})
            batch = nodes * TOKENS_PER_NODE // seq
            if not options:
                continue
            for r in sweep([args.model], [(args.cluster, nodes)], options, batch=batch, seq=seq,
                           dtype=torch.bfloat16, timeout=args.timeout, log=print):
                rows.append({"seq": seq, "batch": batch, **r})
            with open(args.json, "w") as f:  # what is done so far, should a later case stall
                json.dump(rows, f, indent=1, default=str)
    print(f"{'seq':>7} {'gpus':>5} {'case':<44} {'status':<8} {'mesh':<22} {'step s':>8} "
          f"{'peak GiB':>9} {'plan s':>7}")
    for r in rows:
        print(f"{r['seq']:>7} {r['gpus']:>5} {r['label']:<44} {r['status']:<8} "
              f"{r['mesh'] or '':<22} {_num(r['step_time_s'], 3):>8} "
              f"{_num(r['peak_memory_gib'], 1):>9} {_num(r['plan_s'], 0):>7}")


def _num(x, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _label(manual: dict) -> str:
    return "hand " + ",".join(f"{k}={v}" for k, v in manual.items()
                              if k not in ("checkpoint",))


if __name__ == "__main__":
    main()
