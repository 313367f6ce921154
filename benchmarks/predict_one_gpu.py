"""What autopar predicts for the one-GPU runs, made offline (meta tensors, no GPU): the GPT
models of benchmarks/multigpu.py (8 sequences of 2048 tokens) and the Hugging Face models of
benchmarks/hf_one_gpu.py, each planned for one device of a preset as those benchmarks plan
them (mixed bf16), with the preset's attention curve or, with --without-attention-curve, the
flat attention efficiency it had before the curve. The predictions beside a committed run's
measured steps show what a cost-model change does to them without a GPU.

    python benchmarks/predict_one_gpu.py gpt-1.3b hf-vit-1b --json predicted.json
    python benchmarks/predict_one_gpu.py hf-bert-1b --without-attention-curve
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import autopar
from autopar.cluster import DeviceSpec
from autopar.models.losses import lm_loss
from autopar.planning.profile import TrainingPrecision
from benchmarks import hf_one_gpu
from benchmarks.lib.models import MODELS, meta_model, model_spec


def cluster(preset: str, curve: bool) -> autopar.Cluster:
    c = autopar.Cluster.preset(preset, devices_per_node=1)
    if curve or not (c.device.calibration and c.device.calibration.attention):
        return c
    d = c.to_dict()
    d["device"]["calibration"].pop("attention")
    return autopar.Cluster.from_dict(d)


def plan(name: str, c: autopar.Cluster) -> autopar.Plan:
    precision = TrainingPrecision.mixed_bf16()
    if name in MODELS:
        model = meta_model(model_spec(name, False, 2048), torch.bfloat16)
        x = torch.zeros(8, 2048, dtype=torch.long, device="meta")
        return autopar.plan(model, c, (x, x.clone()), loss_fn=lm_loss, precision=precision,
                            time_limit=30)
    model = hf_one_gpu.build(name, False, "meta", torch.bfloat16)
    batch = {k: v.to("meta") for k, v in
             hf_one_gpu.batches(name, False, 1, "cpu", torch.bfloat16)[0].items()}
    return autopar.plan(model, c, batch, precision=precision)


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", choices=list(MODELS) + list(hf_one_gpu.MODELS))
    ap.add_argument("--preset", default="h200-141g")
    ap.add_argument("--without-attention-curve", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    c = cluster(args.preset, not args.without_attention_curve)
    device: DeviceSpec = c.device
    out = {"preset": args.preset, "attention_curve": (device.calibration.attention
                                                      if device.calibration else {}),
           "torch": torch.__version__, "rows": []}
    for name in args.models:
        t0 = time.perf_counter()
        p = plan(name, c)
        row = {"model": name, "planning_s": time.perf_counter() - t0,
               "predicted_step_s": p.predicted["step_time_s"],
               "predicted_peak_memory_bytes": p.predicted["peak_memory_bytes"],
               "mesh": p.mesh, "checkpoint": p.checkpoint,
               "microbatches": (p.pipeline or {}).get("num_microbatches", 1)}
        out["rows"].append(row)
        print(f"{name}: predicted step {row['predicted_step_s']:.4f} s, peak "
              f"{row['predicted_peak_memory_bytes'] / 2**30:.2f} GiB, mesh {p.mesh}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
