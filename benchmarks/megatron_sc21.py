"""Megatron-LM's weak-scaling study (Narayanan et al., SC'21, table 1) through autopar's cost model.

Each row of the paper's table 1 (GPT, vocabulary 51200, sequence 2048, A100-80GB, 8 per node)
is built as a meta-device GPT and its published hand configuration (tensor parallel, pipeline
parallel, data parallel = GPUs / (tp x pp), global batch) becomes an `autopar.manual_plan`, which
`autopar.simulate` scores. Table 1 gives no microbatch size or schedule; we assume microbatch 1
(gradient accumulation over batch / dp microbatches, also when pp = 1) with 1F1B, full
activation recomputation (the paper trains with it, and its FLOP count assumes it), and no ZeRO.

Throughput is compared the paper's way: its FLOPs per step (section 5.1, with recomputation)
    F = 96 B s l h^2 (1 + s / (6 h) + V / (16 l h))
over the step time and the GPU count. The published step time is F / (published TFLOP/s x GPUs).

    python benchmarks/megatron_sc21.py [--rows 0 1 ...] [--plan-rows ...] [--json PATH]

`--plan-rows` also runs autopar's own planner on those rows (same cluster, batch, memory limit
and microbatch 1 per data-parallel rank; it chooses the mesh, schedule, ZeRO stage,
checkpointing and stage cut) and adds its plan beside the hand configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import version

import torch

from benchmarks.lib.megatron import TABLE_1, markdown, simulate_row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="*", default=list(range(len(TABLE_1))))
    ap.add_argument("--plan-rows", type=int, nargs="*", default=[])
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    args = ap.parse_args()
    print(f"# Megatron-LM SC'21 table 1 through autopar's cost model, {time.strftime('%Y-%m-%d')}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, autopar {version('autopar')}\n"
    )
    rows = []
    for i in args.rows:
        rows.append(simulate_row(TABLE_1[i], plan_too=i in args.plan_rows, log=print))
        if args.json:  # after every row: a long run stopped early keeps the rows it finished
            with open(args.json, "w") as f:
                json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
