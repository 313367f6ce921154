"""Collective links on this machine (benchmarks/calibrate_device.py, part 3): the bus bandwidth
of all-reduce, all-gather and reduce-scatter over all ranks of the job, and the alpha-beta link
of `autopar.planning.cost` fitted to them."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

# nccl-tests' bus-bandwidth factors (doc/PERFORMANCE.md), as autopar.planning.cost prices them
_BUS = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
}


def _collective(kind: str, full: torch.Tensor, part: torch.Tensor):
    """A call of the collective `kind` on the full buffer and this rank's part of it."""
    return {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather": lambda: dist.all_gather_into_tensor(full, part),
        "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
    }[kind]


def measure_links(device, sizes: list[int], repeats: int) -> list[dict]:
    """Bus bandwidth of each collective over all ranks of the job, per size (bytes of the full
    buffer), bf16, the median of `repeats` timings of 5 back-to-back calls after warm-up."""
    n = dist.get_world_size()
    rows = []
    for kind in _BUS:
        for size in sizes:
            full = torch.randn(size // 2, device=device, dtype=torch.bfloat16)
            part = torch.empty(size // 2 // n, device=device, dtype=torch.bfloat16)
            call = _collective(kind, full, part)
            for _ in range(3):
                call()
            times = []
            for _ in range(repeats):
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(5):
                    call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t) / 5)
            seconds = statistics.median(times)
            rows.append(
                {
                    "collective": kind,
                    "bytes": size,
                    "ranks": n,
                    "seconds": seconds,
                    "bus_bytes_per_s": _BUS[kind](n) * size / seconds,
                }
            )
    return rows


def fit_link(rows: list[dict]) -> dict:
    """The alpha-beta link of autopar.planning.cost from measured collectives: beta^-1 the median bus
    bandwidth at the largest size; alpha (per ring step) from the smallest size's time less
    its bandwidth term, per step (2(n-1) for all-reduce, n-1 for the others)."""
    largest, smallest = max(r["bytes"] for r in rows), min(r["bytes"] for r in rows)
    bw = statistics.median(r["bus_bytes_per_s"] for r in rows if r["bytes"] == largest)
    alphas = []
    for r in rows:
        if r["bytes"] == smallest:
            n = r["ranks"]
            steps = 2 * (n - 1) if r["collective"] == "all_reduce" else n - 1
            moved = _BUS[r["collective"]](n) * r["bytes"] / bw
            alphas.append(max(r["seconds"] - moved, 0.0) / steps)
    return {"bandwidth_bytes_per_s": bw, "latency_s": statistics.median(alphas)}
