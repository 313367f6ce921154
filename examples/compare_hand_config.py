"""Compare autopar's plan with a hand configuration (Megatron-LM style: tp, pp, dp, microbatch
size, ZeRO stage, activation recomputation) for the same model on the same cluster, offline.

A hand configuration is a Plan too (`autopar.manual_plan`), priced by the same cost model as
the planner's search (`autopar.plan`), so `autopar.simulate` of each can be set side by side:
step time, throughput, MFU, peak memory a GPU and its parts, communication on each mesh axis.
No GPU is needed: the model is built on the meta device.

    python examples/compare_hand_config.py                    # GPT-3 1.3B, 64 H100s: ~40 s
    python examples/compare_hand_config.py --tp 4 --pp 2 --microbatch-size 1 --checkpoint full
    python examples/compare_hand_config.py --model gpt3-125m --nodes 1 --batch 64   # seconds

The figures are predictions (datasheet rates, scaled by the device file's measured
calibration where it has one), not measurements.
"""

from __future__ import annotations

import argparse
import time

import torch

import autopar
from autopar.models.registry import build_model, parameter_count


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt3-1.3b", help="a built-in model (`autopar models`)")
    ap.add_argument("--cluster", default="h100-80g", help="a preset (`autopar clusters`)")
    ap.add_argument("--nodes", type=int, default=8, help="nodes (default 8)")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="default: the preset's (8 for the GPU presets)")
    ap.add_argument("--batch", type=int, default=512, help="global batch (default 512)")
    ap.add_argument("--precision", choices=("bf16-mixed", "fp32"), default="bf16-mixed")
    hand = ap.add_argument_group("the hand configuration (autopar.manual_plan)")
    hand.add_argument("--tp", type=int, default=2)
    hand.add_argument("--pp", type=int, default=1)
    hand.add_argument("--dp", type=int, default=None, help="default: the remaining GPUs")
    hand.add_argument("--microbatch-size", type=int, default=None,
                      help="samples a data-parallel rank per microbatch (default: batch / dp "
                           "without pp, else 1)")
    hand.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=1)
    hand.add_argument("--checkpoint", choices=("none", "selective", "full"), default="none")
    hand.add_argument("--schedule", default="1F1B")
    return ap.parse_args(argv)


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def describe(plan: autopar.Plan, seconds: float) -> dict[str, str]:
    """One column of the table: the plan's shape and what `autopar.simulate` predicts."""
    r = autopar.simulate(plan)
    pipe = plan.pipeline or {}
    column = {
        "mesh": " x ".join(f"{a}={n}" for a, n in plan.mesh.items() if n > 1) or "1 GPU",
        "microbatches": f"{pipe.get('num_microbatches', 1)}",
        "schedule": pipe.get("schedule") or "-",
        "data parallel": plan.data_parallel,
        "checkpointed layers": str(len(plan.checkpoint or {})),
        "step time": f"{r.step_time_s * 1e3:.1f} ms",
        "samples / s": f"{r.samples_per_s:,.0f}",
        "tokens / s": f"{r.tokens_per_s:,.0f}",
        "TFLOP/s a GPU": f"{r.tflops_per_gpu:.0f}",
        "MFU": f"{r.mfu:.1%}",
        "peak memory a GPU": size(r.peak_memory_bytes),
    }
    column.update({f"  {kind}": size(b) for kind, b in r.memory_bytes.items()})
    column.update({f"communication {axis}": f"{s * 1e3:.1f} ms"
                   for axis, s in r.communication_s.items()})
    column["pipeline bubble"] = f"{r.bubble_fraction:.1%}"
    column["made in"] = f"{seconds:.1f} s"
    return column


def main(argv=None) -> None:
    args = parse_args(argv)
    cluster = autopar.Cluster.preset(args.cluster, nodes=args.nodes,
                                     devices_per_node=args.gpus_per_node)
    gpus = cluster.world_size
    with torch.device("meta"):  # no weights are made, whatever the size
        model, example, loss_fn = build_model(args.model, batch=args.batch, seq=None)
    dp = args.dp or gpus // (args.tp * args.pp)
    mbs = args.microbatch_size or (args.batch // dp if args.pp == 1 else 1)
    label = (f"hand: tp={args.tp} pp={args.pp} dp={dp} mbs={mbs} zero={args.zero}"
             + (f" ckpt={args.checkpoint}" if args.checkpoint != "none" else ""))
    n = parameter_count(args.model)
    params = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    print(f"{args.model} ({params} parameters) on {args.nodes} x {cluster.devices_per_node} "
          f"{args.cluster} ({gpus} GPUs), global batch {args.batch}, {args.precision}",
          flush=True)

    t0 = time.perf_counter()
    hand = autopar.manual_plan(model, cluster, example, loss_fn=loss_fn, tp=args.tp,
                               pp=args.pp, dp=dp, microbatch_size=mbs, zero=args.zero,
                               checkpoint=args.checkpoint, schedule=args.schedule,
                               precision=args.precision)
    t1 = time.perf_counter()
    searched = autopar.plan(model, cluster, example, loss_fn=loss_fn, precision=args.precision)
    t2 = time.perf_counter()

    columns = {"autopar.plan": describe(searched, t2 - t1), label: describe(hand, t1 - t0)}
    last = ("pipeline bubble", "made in")
    rows = [k for k in dict.fromkeys(k for c in columns.values() for k in c) if k not in last]
    rows += last  # after every column's communication rows
    width = max(map(len, rows)) + 2
    col = max(24, *(len(n) + 2 for n in columns))
    print("\n" + (" " * width + "".join(n.ljust(col) for n in columns)).rstrip())
    for row in rows:
        cells = "".join(c.get(row, "-").ljust(col) for c in columns.values())
        print((row.ljust(width) + cells).rstrip())

    mine = autopar.simulate(searched).step_time_s
    theirs = autopar.simulate(hand).step_time_s
    limit = cluster.device.memory_bytes
    print(f"\nautopar's plan: {theirs / mine:.2f}x the hand configuration's predicted speed")
    if hand.predicted["peak_memory_bytes"] > limit:
        print(f"(the hand configuration needs more than the {limit / 2**30:.0f} GiB a GPU has)")


if __name__ == "__main__":
    main()
