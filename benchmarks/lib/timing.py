"""Timing a system's training step: the random token batches every system gets, the median
step time after warm-up, and the device's own matmul and copy rates for comparison."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.lib.distributed import Ctx
from benchmarks.lib.models import ModelSpec


def make_batches(spec: ModelSpec, batch: int, count: int, device) -> list:
    """`count` global batches of random tokens (the same on every rank), targets the next
    token."""
    g = torch.Generator().manual_seed(1234)
    seq, vocab = spec.config["seq_len"], spec.config["vocab_size"]
    out = []
    for _ in range(count):
        tok = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((tok[:, :-1].contiguous().to(device), tok[:, 1:].contiguous().to(device)))
    return out


def time_steps(ctx: Ctx, step, batches, warmup: int, steps: int) -> dict:
    """Median step time after warm-up: CUDA events on GPUs, wall clock on CPU. Also the host
    time to issue each step (no synchronisation inside): near the step time when the CPU is
    what limits. With --max-timing-s, the timed steps are cut to fit it (every rank runs the
    slowest rank's count)."""
    first, last_warm = None, None
    for i in range(warmup):
        ctx.sync()
        t0 = time.perf_counter()
        loss = step(*batches[i % len(batches)])
        ctx.sync()
        last_warm = time.perf_counter() - t0
        if first is None:
            first = loss
    cap = ctx.args.max_timing_s
    if cap and last_warm:
        slowest = max(ctx.gather(last_warm))
        steps = max(min(ctx.args.min_steps, steps), min(steps, int(cap / slowest)))
    dist.barrier(group=ctx.cpu_group)
    times, host, last = [], [], None
    cuda = ctx.device.type == "cuda"
    events = []
    for i in range(steps):
        batch = batches[(warmup + i) % len(batches)]  # a step's arguments: (x, y), or (inputs,)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        last = step(*batch)
        host.append(time.perf_counter() - t0)
        if cuda:
            end.record()
            events.append((start, end))
        else:
            times.append(time.perf_counter() - t0)
    ctx.sync()
    if cuda:
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    if first is None:
        first = last
    return {
        "times": times,
        "host": host,
        "first_loss": None if first is None else float(first.float().mean()),
        "last_loss": None if last is None else float(last.float().mean()),
    }


def measure_device(ctx: Ctx) -> dict:
    """bf16 8192^3 matmul on random data and a device-to-device copy, medians of CUDA-event
    timings after warm-up (GPU.md's ceilings, re-measured)."""
    if ctx.device.type != "cuda":
        return {}
    n = 8192
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)

    def med(fn, reps=20, warm=5):
        for _ in range(warm):
            fn()
        ev = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            ev.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in ev)

    t_mm = med(lambda: a @ b)
    src = torch.randn(2**29, device=ctx.device)  # 2 GiB fp32
    dst = torch.empty_like(src)
    t_cp = med(lambda: dst.copy_(src), reps=10, warm=3)
    out = {
        "bf16_matmul_8192_tflops": 2 * n**3 / t_mm / 1e12,
        "d2d_copy_tb_per_s": 2 * src.numel() * 4 / t_cp / 1e12,
    }
    return out  # the caller's ctx.free_memory() frees the buffers
