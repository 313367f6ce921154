"""Measure what the cost model assumes, on the machine it runs on: op times and host time.

The cost model prices each graph op by a roofline on its profiled FLOPs and bytes
(`autopar.planning.cost.compute_time_s`) and the host's time to issue it (`autopar.planning.cost.host_time_s`).
This script measures both on one device, for the ops of real models, and writes every
measurement as JSON; `--fit` turns those into the calibration a device file carries
(`"calibration"` in `autopar/data/devices/*.json`).

Part 1, op times. Each model is traced on meta (`autopar.trace`, bf16, one microbatch of
--microbatch sequences) and profiled (`autopar.planning.profile.profile_graph`). Every distinct op
(target, argument shapes, dtypes and constants) with FLOPs or bytes is run on random tensors:
forward + backward (autograd on random output gradients), the median of --repeats CUDA-event
timings of --inner calls each, after warm-up. Each row carries the op's profiled fwd+bwd FLOPs
and bytes, its count in the graph and its measured seconds.

Part 3 (--parts links, on a job of 2+ processes): bus bandwidth of all-reduce, all-gather and
reduce-scatter over all ranks at 8 KiB .. 128 MiB; the fitted alpha-beta link becomes the device
file's `intra_node` link.

Part 2, host time per op. The same model family at a size where the device work is negligible
(--host-seq tokens, batch 1) is trained by autopar on a job of one process, once per runtime
(`replay`, `eager`); the wall time of a step (device synchronised) divided by the graph's ops is
the host's time per op for forward + backward.

    torchrun --standalone --nproc_per_node 1 benchmarks/calibrate_device.py \
        --models gpt-1.3b gpt-6.7b --json $OUT/calibration.json
    python benchmarks/calibrate_device.py \
        --fit docs/benchmarks/2026-11-29-single-h200-replay/h200-calibration.json
        # prints the "calibration" block for the device file

Attention is priced by shape, from a curve that benchmarks/attention_times.py measures and fits
(`"attention"` in the calibration); `--write-device` here keeps that curve.

On a CPU (`--device cpu`, tiny models with --tiny) the same code runs end to end. The
measurements are `benchmarks.lib.op_timing` (parts 1 and 2) and `benchmarks.lib.links` (part 3),
the fit `benchmarks.lib.calibration`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.distributed as dist

import autopar
from benchmarks.lib.calibration import fit, write_device, write_link
from benchmarks.lib.links import fit_link, measure_links
from benchmarks.lib.models import MODELS, model_spec
from benchmarks.lib.op_timing import host_time, time_ops


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--parts",
        nargs="+",
        choices=("ops", "host", "links"),
        default=["ops", "host"],
        help="what to measure (links: >= 2 processes)",
    )
    ap.add_argument("--models", nargs="+", default=["gpt-1.3b"])
    ap.add_argument("--microbatch", type=int, default=4)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized models (--device cpu)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--host-seq", type=int, default=64)
    ap.add_argument("--host-steps", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--fit", default=None, metavar="JSON", help="fit a measured JSON and print")
    ap.add_argument(
        "--write-device",
        default=None,
        metavar="DEVICE_JSON",
        help="put the fit into this device file's calibration (with --fit or --json)",
    )
    return ap


def _header(device) -> dict:
    cluster = autopar.Cluster.detect()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cluster": cluster.name,
        "peak_flops": cluster.device.peak_flops_for(torch.bfloat16),
        "hbm_bandwidth_bytes_per_s": cluster.device.hbm_bandwidth_bytes_per_s,
    }


def _measure_ops(args, device, out: dict) -> None:
    for name in args.models if "ops" in args.parts else ():
        spec = model_spec(name, args.tiny, 32 if args.tiny else 2048)
        t = time.time()
        rows = time_ops(spec, args.microbatch, device, repeats=args.repeats, inner=args.inner)
        for r in rows:
            r["model"] = name
        out["ops"] += rows
        total = sum(r["count"] * r.get("seconds", 0.0) for r in rows)
        print(
            f"{name}: {len(rows)} distinct ops, fwd+bwd sum {total * 1e3:.1f} ms "
            f"({time.time() - t:.0f} s)",
            flush=True,
        )


def _measure_links(args, device, out: dict) -> None:
    sizes = [2**13, 2**20, 2**24, 2**27] if not args.tiny else [2**10, 2**16]
    out["links"] = measure_links(device, sizes, args.repeats)
    out["intra_node"] = fit_link(out["links"])
    for r in out["links"]:
        print(
            f"{r['collective']:15s} {r['bytes']:>10d} B on {r['ranks']} ranks: "
            f"{r['seconds'] * 1e6:9.1f} us, bus {r['bus_bytes_per_s'] / 1e9:7.1f} GB/s"
        )
    print("link:", out["intra_node"])


def _measure_host(args, device, out: dict) -> None:
    for runtime in ("replay", "eager") if "host" in args.parts else ():
        spec = model_spec(args.models[0], args.tiny, args.host_seq)
        r = host_time(spec, device, runtime, seq=args.host_seq, steps=args.host_steps)
        out["host"].append(r)
        print(
            f"host {runtime}: {r['step_s'] * 1e3:.1f} ms per step, {r['graph_ops']} ops, "
            f"{r['host_s_per_op'] * 1e6:.1f} us per op",
            flush=True,
        )


def _write(args, out: dict) -> None:
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    if out["ops"]:
        print("fit:", json.dumps(fit(args.json)))
        if args.write_device:
            write_device(args.write_device, fit(args.json))
    if args.write_device and "intra_node" in out:
        write_link(
            args.write_device, out["intra_node"], out["date"], out["device"], dist.get_world_size()
        )


def main(argv=None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.fit:
        print(json.dumps(fit(args.fit), indent=2))
        if args.write_device:
            write_device(args.write_device, fit(args.fit))
        return
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    out = dict(_header(device), microbatch=args.microbatch, ops=[], host=[])
    _measure_ops(args, device, out)
    if not dist.is_initialized() and "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if "links" in args.parts:
        _measure_links(args, device, out)
    if dist.is_initialized() and dist.get_rank() != 0:
        return  # the other ranks took part in the collectives only
    _measure_host(args, device, out)
    if args.json:
        _write(args, out)


if __name__ == "__main__":
    main()
