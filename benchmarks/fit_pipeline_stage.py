"""Fit `Calibration.pipeline_stage_s` (the pipeline runtime's own time per stage and
microbatch) to one measured pipelined step: the value at which autopar's prediction of that
plan equals the measured time.

The plan is re-made offline (meta model, no GPU) with the measured run's constraints; its
predicted step is evaluated at two values of pipeline_stage_s and interpolated (the stage
model is piecewise linear in it). The 2026-11-29 figure (11 ms, autopar/data/devices/
h200-141g.json) came from GPT 1.3B on 2 H200s, pp2 Interleaved1F1B, 8 microbatches of 2,
measured 0.4192 s (docs/benchmarks/2026-11-29-multigpu-x2/gpt-1.3b-autopar-pp2-vs-fsdp2.json):

    PYTHONPATH=. python benchmarks/fit_pipeline_stage.py --model gpt-1.3b --gpus 2 --batch 16 \
        --pp 2 --schedule Interleaved1F1B --microbatch 2 --measured 0.4192
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import autopar
from autopar.models.losses import lm_loss
from autopar.planning.profile import TrainingPrecision
from benchmarks.lib.models import model_spec


def predicted(model, example, cluster, stage_s: float, args) -> float:
    cal = dataclasses.replace(cluster.device.calibration, pipeline_stage_s=stage_s)
    c = dataclasses.replace(cluster, device=dataclasses.replace(cluster.device, calibration=cal))
    plan = autopar.plan(
        model,
        c,
        example,
        loss_fn=lm_loss,
        mesh={"pp": args.pp, "dp": args.gpus // args.pp},
        schedule=args.schedule,
        microbatch_size=args.microbatch,
        precision=TrainingPrecision.mixed_bf16(),
        time_limit=20,
    )
    return plan.predicted["step_time_s"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-1.3b")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--schedule", default="Interleaved1F1B")
    ap.add_argument("--microbatch", type=int, default=2)
    ap.add_argument("--measured", type=float, required=True, help="measured step (s)")
    ap.add_argument("--preset", default="h200-141g")
    args = ap.parse_args(argv)
    spec = model_spec(args.model, False, 2048)
    model = spec.build("meta", torch.float32).to(torch.bfloat16)
    x = torch.zeros(args.batch, 2048, dtype=torch.long, device="meta")
    cluster = autopar.Cluster.preset(args.preset, devices_per_node=args.gpus)
    if cluster.device.calibration is None:
        ap.error(f"{args.preset} has no calibration: run benchmarks/calibrate_device.py first")
    lo, hi = 0.0, 0.01
    p_lo, p_hi = (predicted(model, (x, x), cluster, s, args) for s in (lo, hi))
    fitted = lo + (args.measured - p_lo) * (hi - lo) / (p_hi - p_lo)
    print(
        f"predicted {p_lo:.4f} s at pipeline_stage_s={lo}, {p_hi:.4f} s at {hi}; "
        f"measured {args.measured:.4f} s -> pipeline_stage_s = {fitted:.4f} s"
    )


if __name__ == "__main__":
    main()
