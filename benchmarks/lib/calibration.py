"""A device file's calibration from measured op and host times (`fit`), and writing it, or a
measured link, into the device file (`write_device`, `write_link`): what
benchmarks/calibrate_device.py does with its measurements."""

from __future__ import annotations

import json
import os
import statistics

import autopar


def fit(path: str) -> dict:
    """Per-device efficiencies from part 1 and host seconds per op from part 2:

    matmul, memory: the fraction of the datasheet peak FLOP/s and bandwidth that ops reach,
        fitted so that sum_ops count x max(flops / (peak x matmul), bytes / (bw x memory))
        matches the measured sum for each class (FLOP-bound, byte-bound by the roofline);
    kernel_s: a floor per op (fwd + bwd): the median measured time of the byte-bound ops too
        small to fill the device (below 1/10 of the byte-bound median);
    ops: per op measured well above that floor, the fraction of its own roofline it reached
        (overrides matmul/memory for that op: layer norm's backward, say, is far from both).
    """
    data = json.load(open(path))
    peak, bw = data["peak_flops"], data["hbm_bandwidth_bytes_per_s"]
    rows = [r for r in data["ops"] if "seconds" in r]
    flop_bound = [r for r in rows if r["flops"] / peak > r["bytes"] / bw]
    byte_bound = [r for r in rows if r not in flop_bound]
    mm = sum(r["count"] * r["flops"] / peak for r in flop_bound) / sum(
        r["count"] * r["seconds"] for r in flop_bound
    )
    small_cut = statistics.median(r["bytes"] for r in byte_bound) / 10
    small = [r["seconds"] for r in byte_bound if r["bytes"] < small_cut]
    kernel = statistics.median(small) if small else 0.0
    big = [r for r in byte_bound if r["bytes"] >= small_cut]
    mem = sum(r["count"] * r["bytes"] / bw for r in big) / sum(
        r["count"] * max(r["seconds"] - kernel, 1e-9) for r in big
    )
    host = {r["runtime"]: r["host_s_per_op"] for r in data.get("host", [])}
    # each op measured: the fraction of its own roofline it reaches (all its shapes together),
    # from rows whose roofline alone is above the floor: a small op's "efficiency" (launch and
    # autograd time over a roofline of nanoseconds) would price the same op on a large tensor
    # absurdly
    ops: dict[str, list[float]] = {}
    for r in rows:
        roof = max(r["flops"] / peak, r["bytes"] / bw)
        if roof > kernel:
            acc = ops.setdefault(r["op"], [0.0, 0.0])
            acc[0] += r["count"] * roof
            acc[1] += r["count"] * r["seconds"]
    per_op = {op: float(f"{min(a / b, 1.0):.4g}") for op, (a, b) in sorted(ops.items()) if a > 0}
    return {
        "matmul": round(min(mm, 1.0), 4),
        "memory": round(min(mem, 1.0), 4),
        "kernel_s": kernel,
        "ops": per_op,
        "host_s_per_op": host,
        "source": f"benchmarks/calibrate_device.py --fit {os.path.basename(path)} "
        f"({data.get('date', '')}, {data.get('device', '')}, torch "
        f"{data.get('torch', '')})",
    }


def write_device(path: str, calibration: dict) -> None:
    """Set the "calibration" of a device file (autopar/data/devices/*.json), checked by loading.
    What `fit` does not make is kept from the file: the attention curve
    (benchmarks/attention_times.py, with its line of the source) and pipeline_stage_s
    (benchmarks/fit_pipeline_stage.py)."""
    data = json.load(open(path))
    old = data["device"].get("calibration") or {}
    calibration = dict(calibration)
    for key in ("attention", "pipeline_stage_s"):
        if key in old and key not in calibration:
            calibration[key] = old[key]
    note = old.get("source", "").partition("; attention: ")[2]
    if "attention" in old and note and "attention: " not in calibration.get("source", ""):
        calibration["source"] = calibration.get("source", "") + "; attention: " + note
    data["device"]["calibration"] = calibration
    autopar.Cluster.from_dict(data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(f"wrote the calibration into {path}")


def write_link(path: str, link: dict, date: str, device: str, ranks: int) -> None:
    """Set the device file's intra_node link to the measured one, saying where it came from."""
    data = json.load(open(path))
    data["intra_node"] = {k: float(v) for k, v in link.items()}
    how = f"measured {date} on {ranks} x {device} by benchmarks/calibrate_device.py --parts links: "
    sources = data.setdefault("sources", {})
    sources.pop("intra_node", None)
    sources["intra_node.bandwidth_bytes_per_s"] = how + (
        "median bus bandwidth of bf16 all-reduce, all-gather and reduce-scatter at 128 MiB"
    )
    sources["intra_node.latency_s"] = how + (
        "per ring step, from the 8 KiB collectives less their bandwidth term"
    )
    autopar.Cluster.from_dict(data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(f"wrote the measured intra-node link into {path}")
