"""Plan one of benchmarks/multigpu.py's models offline, on the meta device, for a node of N
H200s, and print the plan's summary: the offline figures quoted in
docs/benchmarks/2026-11-29-multigpu-x2-llama/ (which plan the search picks on 4 and 8 GPUs,
and the predictions of the 2-GPU plans after a change to the cost model). No GPU needed.

    python benchmarks/plan_offline.py gpt-1.3b --gpus 4
    python benchmarks/plan_offline.py gpt-6.7b --gpus 2 --option checkpoint=False
    python benchmarks/plan_offline.py gpt-1.3b --gpus 2 -o gpt13.json   # then, on the GPUs:
    torchrun --nproc_per_node 2 benchmarks/multigpu.py --models gpt-1.3b --systems autopar \
        --plan-file gpt-1.3b=gpt13.json

The global batch is multigpu.py's default, 8 sequences of 2048 tokens per GPU; bf16 mixed
precision; each stage-cut solve is limited to 30 s, as in the benchmark runs.
"""

from __future__ import annotations

import argparse
import ast
import time

import torch

import autopar
from autopar.models.losses import lm_loss
from autopar.planning.profile import TrainingPrecision
from benchmarks.lib.models import MODELS, meta_model, model_spec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=list(MODELS))
    ap.add_argument("--gpus", type=int, default=2, help="H200s in the node (default 2)")
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an autopar.plan option, as a Python literal: checkpoint=False, "
        "data_parallel='zero2', mesh={'dp': 4}",
    )
    ap.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="PATH",
        help="also write the plan as JSON, for multigpu.py --plan-file",
    )
    args = ap.parse_args(argv)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    spec = model_spec(args.model, False, 2048)
    model = meta_model(spec, torch.bfloat16)
    x = torch.zeros(8 * args.gpus, 2048, dtype=torch.long, device="meta")
    cluster = autopar.Cluster.preset("h200-141g", devices_per_node=args.gpus)
    t0 = time.perf_counter()
    plan = autopar.plan(
        model,
        cluster,
        (x, x.clone()),
        loss_fn=lm_loss,
        precision=TrainingPrecision.mixed_bf16(),
        time_limit=30,
        **options,
    )
    print(f"{args.model} on {args.gpus} x H200, planned in {time.perf_counter() - t0:.0f} s")
    print(plan.summary().split("\n  parameter")[0])
    if args.output:
        plan.save(args.output)
        print(f"plan written to {args.output}")


if __name__ == "__main__":
    main()
