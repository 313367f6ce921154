"""Where a system's step spends its time and memory: torch.profiler over a few steps
(`profile_steps`, whose text tables `--profile-out` collects and `device_rows` reads back), and
what is alive at the step's memory peak by the op that allocated it (`memory_at_peak`)."""

from __future__ import annotations

import linecache
import os
import re
import time

import torch

from benchmarks.lib.breakdown import measured
from benchmarks.lib.distributed import Ctx

# ---- torch.profiler -------------------------------------------------------------------------


def profile_steps(ctx: Ctx, step, batches, n: int, label: str) -> tuple[dict, str]:
    """torch.profiler over n steps: where the time goes (top ops by host and device time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    ctx.sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(n):
            step(*batches[i % len(batches)])
        ctx.sync()
    wall = (time.perf_counter() - t0) / n
    ka = prof.key_averages()
    dev_attr = (
        "self_device_time_total"
        if hasattr(ka[0], "self_device_time_total")
        else "self_cuda_time_total"
    )
    aten_calls = sum(e.count for e in ka if e.key.startswith("aten::"))
    kernels = sum(
        e.count
        for e in ka
        if (getattr(e, dev_attr, 0) or 0) > 0
        and not e.key.startswith(("aten::", "cuda", "Memcpy", "Memset"))
    )
    summary = {
        "profiled_wall_s_per_step": wall,
        "aten_calls_per_step": aten_calls / n,
        "kernel_launches_per_step": kernels / n,
    }
    if ctx.device.type == "cuda":
        # kernel time by category, and the time the device is busy at all (breakdown.py)
        summary["device"] = measured(prof, n)
        summary["device_busy_s_per_step"] = summary["device"]["busy_s"]
    sort_dev = dev_attr if ctx.device.type == "cuda" else "self_cpu_time_total"

    def top(key, rows=25):
        try:
            return ka.table(sort_by=key, row_limit=rows)
        except Exception as e:  # sort keys were renamed across torch releases
            return f"(no table sorted by {key}: {type(e).__name__}: {e})"

    busy = summary.get("device_busy_s_per_step")
    busy_text = f"device busy {busy * 1e3:.1f} ms per step, " if busy is not None else ""
    text = (
        f"==== {label}: {n} profiled steps, {wall * 1e3:.1f} ms wall per step, {busy_text}"
        f"{summary['aten_calls_per_step']:.0f} aten calls per step\n"
        f"-- by self CPU time\n{top('self_cpu_time_total')}\n"
        f"-- by self device time\n{top(sort_dev, 45)}\n"
    )
    return summary, text


def _ms(text: str) -> float:
    text = text.strip()
    for unit, scale in (("ms", 1.0), ("us", 1e-3), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return 0.0


def device_rows(profile_text: str, label: str) -> dict[str, tuple[float, float]]:
    """name -> (self device ms per step, calls per step) for the system whose header starts
    with `label`, read from the tables `profile_steps` writes."""
    for part in re.split(r"^==== ", profile_text, flags=re.M)[1:]:
        header = part.split("\n", 1)[0]
        if not header.startswith(label):
            continue
        steps = int(re.search(r"(\d+) profiled steps", header).group(1))
        table = part.split("-- by self device time", 1)[1]
        rows = {}
        for line in table.splitlines():
            cols = re.split(r"\s{2,}", line.strip())
            if len(cols) >= 10 and cols[0] != "Name" and cols[-1].isdigit():
                rows[cols[0]] = (_ms(cols[6]) / steps, int(cols[-1]) / steps)
        return rows
    raise SystemExit(f"no profile headed {label!r} in the file")


# ---- memory at the peak ---------------------------------------------------------------------


def _allocated_where(frames) -> str:
    """The innermost frame outside torch's own files: in a replayed graph, the graph's
    generated code, whose line names the ATen op (fx registers it with linecache)."""
    for f in frames:
        name = f["filename"]
        if "/torch/" in name or name.startswith("<frozen"):
            continue
        text = linecache.getline(name, f["line"]).strip()
        op = re.search(r"torch\.ops\.([\w.]+)", text)
        if op:
            return f"graph op {op.group(1)}"
        return f"{os.path.basename(name)}:{f['line']} {f['name']}: {text[:60]}"
    return "torch internals"


def _by_allocator(blocks) -> list[tuple[str, list[int]]]:
    """(where, [bytes, blocks]), most bytes first."""
    groups: dict[str, list[int]] = {}
    for b in blocks:
        g = groups.setdefault(_allocated_where(b.get("frames", [])), [0, 0])
        g[0] += b["size"]
        g[1] += 1
    return sorted(groups.items(), key=lambda kv: -kv[1][0])


def _replay_to_peak(events) -> tuple[int, dict, int]:
    """Replay the allocator's trace up to its highest point: (bytes above the start there,
    the blocks made in the trace alive there by address, bytes made before it freed by then)."""
    live, total, peak, at_peak, gone_at_peak = {}, 0, 0, {}, 0
    gone = 0  # bytes of tensors made before the step and freed in it
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_requested":
            if e["addr"] in live:
                total -= live.pop(e["addr"])["size"]
            else:
                gone += e["size"]
        if total - gone > peak:
            peak, at_peak, gone_at_peak = total - gone, dict(live), gone
    return peak, at_peak, gone_at_peak


def memory_at_peak(ctx: Ctx, step, batch, label: str, top: int = 30) -> tuple[dict, str]:
    """One step under the CUDA allocator's history: what is alive at the step's peak, grouped
    by the op that allocated it. Tensors alive before the step (parameters, optimizer state)
    are `before_step_bytes`; the rest are grouped by the innermost line outside torch's own
    files: in a replayed graph that is the graph's generated code, whose line names the ATen
    op (fx registers it with linecache). Rank 0's figures."""
    ctx.sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=5_000_000)
    try:
        step(*batch)
        ctx.sync()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]
    peak, at_peak, gone_at_peak = _replay_to_peak(events)
    ranked = _by_allocator(at_peak.values())
    # alive after the step: the state made at build and in the first step (when watched)
    after_ranked = _by_allocator(
        b for seg in snap["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"
    )
    made = sum(e["size"] for e in at_peak.values())
    summary = {
        "before_step_bytes": before,
        "step_peak_bytes": before + peak,
        "alive_from_before_at_peak_bytes": before - gone_at_peak,
        "allocated_in_step_at_peak_bytes": made,
        "at_peak_by_op": {k: v[0] for k, v in ranked[:top]},
        "after_step_by_op": {k: v[0] for k, v in after_ranked[:top]},
    }
    lines = [
        f"==== {label}: memory at the step's peak (rank 0): "
        f"{(before + peak) / 2**30:.2f} GiB = {(before - gone_at_peak) / 2**30:.2f} GiB "
        f"made before the step (of {before / 2**30:.2f} GiB then) + {made / 2**30:.2f} GiB "
        "made in it",
        f"{'GiB':>8}  {'blocks':>6}  allocated by",
    ]
    lines += [f"{b / 2**30:8.3f}  {n:6d}  {k}" for k, (b, n) in ranked[:top]]
    lines += [
        "-- alive after the step (allocations made while the system was built are named "
        "when --memory-peak watched its build)",
        f"{'GiB':>8}  {'blocks':>6}  allocated by",
    ]
    lines += [f"{b / 2**30:8.3f}  {n:6d}  {k}" for k, (b, n) in after_ranked[:top]]
    return summary, "\n".join(lines) + "\n"
