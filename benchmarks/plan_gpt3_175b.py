"""Plan GPT-3 175B (96 layers, d 12288, 96 heads, seq 2048, vocab 51200, global batch 1536) for
128 nodes of 8 A100-80GB, offline on meta tensors; print the plan summary, the simulated report,
a Megatron-LM style hand configuration (tp 8, pp 8 interleaved, dp 16, microbatch 1, full
recomputation) through the same cost model, and the planning time. (Published Megatron figures
for the table-1 models are compared in benchmarks/megatron_sc21.py.)

    python benchmarks/plan_gpt3_175b.py [--layers 96] [--nodes 128] [--batch 1536]

Options --tp/--microbatch restrict the search (the default searches every tp <= 8 and
microbatch sizes 1, 2, 4 per dp rank).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

import autopar
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from autopar.planning.profile import TrainingPrecision
from autopar.planning.search import SearchSpace, candidate_meshes, search
from autopar.trace_repeats import tracer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=96)
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1536)
    ap.add_argument("--microbatch", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--tp", type=int, nargs="*", default=None)
    args = ap.parse_args()
    cfg = GPTConfig(vocab_size=51200, seq_len=2048, n_layer=args.layers, n_head=96, d_model=12288)
    with torch.device("meta"):
        model = GPT(cfg).to(torch.bfloat16)  # compute in bf16 (mixed precision)
    x = torch.zeros(args.batch, 2048, dtype=torch.long, device="meta")
    cluster = autopar.Cluster.preset("a100-80g", nodes=args.nodes)
    precision = TrainingPrecision.mixed_bf16()

    trace_fn = tracer(model, lm_loss)
    meshes = candidate_meshes(cluster, args.layers + 2)
    # tp within a node unless --tp says otherwise: the space of the dated report (the search
    # itself also tries tp across nodes, last)
    tps = args.tp or [t for t in range(1, cluster.devices_per_node + 1)]
    meshes = [m for m in meshes if m["tp"] in tps]
    space = SearchSpace(
        meshes=meshes,
        microbatch_sizes=args.microbatch,
        schedules=("1F1B", "Interleaved1F1B"),
        flavours=("replicate", "zero2", "zero3"),
    )
    print(f"# GPT-3 {args.layers} layers on {cluster.world_size} x {cluster.device.name}")
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}\n"
    )
    start = time.perf_counter()
    plan = search(trace_fn, (x, x), cluster, space, precision=precision, log=print)
    planning_s = time.perf_counter() - start
    print(f"\nplanning time: {planning_s:.1f} s\n")
    print(plan.summary().split("\n\n")[0])
    print("\n## planner's plan, simulated\n")
    print(autopar.simulate(plan).summary())
    if args.layers % 8 == 0 and args.nodes == 128:
        manual = autopar.manual_plan(
            model,
            cluster,
            (x, x),
            loss_fn=lm_loss,
            tp=8,
            pp=8,
            dp=16,
            microbatch_size=1,
            schedule="Interleaved1F1B",
            checkpoint="full",
            zero=0,
            precision=precision,
        )
        print(
            "\n## Megatron-LM style config (tp 8, pp 8 interleaved, dp 16, mb 1, full "
            "recompute), simulated\n"
        )
        print(autopar.simulate(manual).summary())


if __name__ == "__main__":
    main()
