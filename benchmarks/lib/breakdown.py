"""Where a training step's device time goes, measured, beside what autopar's cost model charges.

`benchmarks/multigpu.py --profile SYSTEM` profiles a few steps of each system it names; this
module turns such a profile into plain numbers per step (`measured(prof, steps)`):

    kernels_s      the sum of every kernel's duration
    busy_s         the time at least one kernel runs (the union over streams: a collective
                   overlapping a matmul counts once)
    by_category    kernel time by what launched it: the ATen op (its category below), or the
                   optimizer (everything inside the step's `OPTIMIZER_RANGE`), or autograd's
                   gradient accumulation (`ACCUMULATE_RANGE`), or a collective
    top_ops        the same kernel time by the op that launched it, the costliest first
    unattributed_s kernels no op claims (negative if some kernel was claimed twice)
    idle_by_host_s what the host was doing while no kernel ran: each gap goes to the host
                   event overlapping it most (innermost: "leaf", outermost: "outer")

and, for a plan without tensor or pipeline parallelism (gradient accumulation is fine), what
the cost model charges the same categories (`predicted(...)`):

    by_category    every graph op's forward + backward time as the planner prices it
                   (`cost.compute_time_s` on the plan's device), under the op's category, once
                   per microbatch; the optimizer, the accumulation and the data-parallel
                   collectives from `plan.predicted`
    host_bound_s   what the cost model adds where it finds the host slower than the device:
                   its stand-in for the device's idle time (the step time less `busy_s`)

`compare(row)` lays the two side by side; `benchmarks/step_breakdown.py` prints that table
for each row of a results file.
"""

from __future__ import annotations

OPTIMIZER_RANGE = "benchmark.optimizer"  # record_function label around the optimizer step
TOP_OPS = 40  # ops listed by their kernel time in `measured`

CATEGORIES = (
    "matmul",
    "attention",
    "norm",
    "loss",
    "embedding",
    "elementwise",
    "copy",
    "collective",
    "accumulate",
    "optimizer",
)
ACCUMULATE_RANGE = "torch::autograd::AccumulateGrad"  # autograd adding a gradient into .grad

_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "_scaled_mm"}
_LOSS = {
    "_log_softmax",
    "_log_softmax_backward_data",
    "log_softmax",
    "nll_loss_forward",
    "nll_loss_backward",
    "nll_loss2d_forward",
    "nll_loss2d_backward",
    "gather",
    "scatter",
    "scatter_add",
    "cross_entropy_loss",
}
_COPY = {
    "copy_",
    "_to_copy",
    "clone",
    "cat",
    "contiguous",
    "split_with_sizes_copy",
    "_chunk_cat",
    "stack",
    "zero_",
    "fill_",
    "zeros",
    "zeros_like",
    "new_zeros",
    "_foreach_copy_",
    "empty_like",
    "index_put_",
    "slice_scatter",
    "select_scatter",
    # views priced by their backward, a cat or a zeroed copy (profile._VIEW_BACKWARD_BYTES)
    "split_with_sizes",
    "split",
    "unbind",
    "chunk",
    "slice",
    "select",
    "slice_backward",
    "select_backward",
}
_COLLECTIVE_PREFIXES = (
    "record_param_comms",
    "nccl",
    "c10d",
    "_c10d_functional",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "all_to_all",
)


def category(op: str) -> str:
    """The category of an op, by its name as a graph target (`aten.mm.default`) or as the
    profiler shows it (`aten::mm`)."""
    name = op.removeprefix("aten::").removeprefix("aten.")
    if name.startswith(_COLLECTIVE_PREFIXES):
        return "collective"
    base = name.split(".")[0]
    if base in _MATMUL:
        return "matmul"
    if "attention" in base or "flash" in base or "sdpa" in base:
        return "attention"
    if "norm" in base:
        return "norm"
    if base in _LOSS:
        return "loss"
    if base.startswith("embedding"):
        return "embedding"
    if base in _COPY:
        return "copy"
    if base.startswith(("_fused_adam", "_foreach_")):
        return "optimizer"
    return "elementwise"


# ---- measured ------------------------------------------------------------------------------


def _gaps(intervals) -> list[tuple[float, float]]:
    """The (start, end) stretches between the first start and the last end that no interval
    covers."""
    gaps, end = [], None
    for a, b in sorted(intervals):
        if end is not None and a > end:
            gaps.append((end, a))
        end = b if end is None else max(end, b)
    return gaps


def union_s(intervals) -> float:
    """Length of the union of (start, end) intervals, in their unit."""
    if not intervals:
        return 0.0
    span = max(b for _, b in intervals) - min(a for a, _ in intervals)
    return span - sum(b - a for a, b in _gaps(intervals))


def _largest(d: dict[str, float], n: int) -> dict[str, float]:
    return dict(sorted(d.items(), key=lambda kv: -kv[1])[:n])


def _is_device(e) -> bool:
    return getattr(e.device_type, "name", str(e.device_type)) != "CPU"


# Host events that are calls into the CUDA runtime or driver, or the profiler's notes about
# them ("Command Buffer Full": a launch that waited for room in the queue). torch.profiler
# lists the launched kernel among their kernels too, beside the op's that made the call.
_RUNTIME_PREFIXES = (
    "cuda",
    "cuLaunch",
    "cuMem",
    "cuStream",
    "cuEvent",
    "cuGraph",
    "hip",
    "Memcpy",
    "Memset",
    "Command Buffer Full",
    "Activity Buffer Request",
)


def _is_runtime_call(e) -> bool:
    return e.name.startswith(_RUNTIME_PREFIXES)


def _under(e, label: str) -> bool:
    p = e
    while p is not None:
        if p.name == label:
            return True
        p = p.cpu_parent
    return False


def _deepest(e, a: float, b: float):
    """The innermost event under host event `e` that overlaps (a, b) the most."""
    while True:
        best, most = None, 0.0
        for c in e.cpu_children:
            o = min(c.time_range.end, b) - max(c.time_range.start, a)
            if o > most:
                best, most = c, o
        if best is None:
            return e
        e = best


def idle_by_host(events, kernels, top: int = TOP_OPS) -> dict:
    """What the host was doing while the device idled: each gap between kernels (on the
    union of streams) goes to the host event that overlaps it the most, on any thread (the
    innermost such event, `leaf`, and the outermost, `outer`); a gap no host event overlaps
    goes to "(no host event)". Seconds summed over the profile, the largest first."""
    import bisect

    gaps = _gaps(kernels)
    threads: dict[object, list] = {}  # outer host events per thread, in time order
    for e in events:
        if not _is_device(e) and e.cpu_parent is None and not getattr(e, "is_async", False):
            threads.setdefault(e.thread, []).append(e)
    lanes = []
    for evs in threads.values():
        evs.sort(key=lambda e: e.time_range.start)
        lanes.append((evs, [e.time_range.start for e in evs]))
    by_leaf: dict[str, float] = {}
    by_outer: dict[str, float] = {}
    for a, b in gaps:
        best, most = None, 0.0
        for evs, starts in lanes:  # on one thread, the events that overlap (a, b)
            i = bisect.bisect_left(starts, b) - 1
            while i >= 0 and evs[i].time_range.end > a:
                e = evs[i]
                o = min(e.time_range.end, b) - max(e.time_range.start, a)
                if o > most:
                    best, most = e, o
                i -= 1
        if best is None:
            leaf_name = outer_name = "(no host event)"
        else:
            leaf_name, outer_name = _deepest(best, a, b).name, best.name
        by_leaf[leaf_name] = by_leaf.get(leaf_name, 0.0) + (b - a)
        by_outer[outer_name] = by_outer.get(outer_name, 0.0) + (b - a)
    return {"gaps": len(gaps), "leaf": _largest(by_leaf, top), "outer": _largest(by_outer, top)}


def measured(prof, steps: int) -> dict:
    """Per-step device figures of a torch.profiler run over `steps` steps (seconds)."""
    events = prof.events()
    device = [e for e in events if _is_device(e)]
    # a record_function range shows on the device too, as an annotation spanning its kernels;
    # the profiler lists it among the "kernels" of its host range, so skip it by name there
    annotations = {e.name for e in device if getattr(e, "is_user_annotation", False)}
    kernels = [(e.time_range.start, e.time_range.end) for e in device if e.name not in annotations]
    by = dict.fromkeys(CATEGORIES, 0.0)
    by_op: dict[str, float] = {}
    attributed = 0.0
    for e in events:
        if _is_device(e) or getattr(e, "is_async", False) or _is_runtime_call(e):
            continue
        # the kernels this op launched itself
        own = sum(k.duration for k in e.kernels if k.name not in annotations)
        if not own:
            continue
        cat = (
            "optimizer"
            if _under(e, OPTIMIZER_RANGE)
            else "accumulate"
            if _under(e, ACCUMULATE_RANGE)
            else category(e.name)
        )
        by[cat] += own
        by_op[e.name] = by_op.get(e.name, 0.0) + own
        attributed += own
    total = sum(b - a for a, b in kernels)
    scale = 1e-6 / steps  # profiler times are microseconds
    out = {
        "kernels_s": total * scale,
        "busy_s": union_s(kernels) * scale,
        "by_category": {k: v * scale for k, v in by.items()},
        # the ops behind those figures, the costliest first (what each category holds)
        "top_ops": {k: v * scale for k, v in _largest(by_op, TOP_OPS).items()},
    }
    # not negative unless some kernel was attributed twice (a host event this module does
    # not know lists it too): shown as is, not clipped
    out["unattributed_s"] = (total - attributed) * scale
    idle = idle_by_host(events, kernels)
    out["idle_gaps_per_step"] = idle["gaps"] / steps
    out["idle_by_host_s"] = {
        k: {name: v * scale for name, v in d.items()} for k, d in idle.items() if k != "gaps"
    }
    return out


# ---- predicted -----------------------------------------------------------------------------


def predictable(plan) -> str | None:
    """Why `predicted` cannot split this plan's step by category, or None: it prices the ops
    of the unsharded graph, which only a plan without tensor or pipeline parallelism runs
    (each data-parallel rank runs the whole graph on its part of each microbatch)."""
    other = {axis: n for axis, n in plan.mesh.items() if axis != "dp" and n > 1}
    if other:
        return f"the plan splits ops over {other}; only data-parallel plans are split by category"
    return None


def microbatches(plan) -> tuple[int, int | None]:
    """(microbatches per step, the traced microbatch over all dp ranks, or None: the batch)."""
    pipe = plan.pipeline or {}
    return pipe.get("num_microbatches", 1), pipe.get("microbatch_size")


def predicted(gm, profiles, plan, device) -> dict:
    """What the cost model charges per step, by category: every op of `gm` (the graph of one
    rank's microbatch, profiled by `autopar.planning.profile.profile_graph`) forward + backward on
    `device` (calibrated as the planner sees it), once per microbatch, plus the plan's
    optimizer step and data-parallel collectives (`plan.predicted`)."""
    import torch

    from autopar.planning import cost

    per_step, _ = microbatches(plan)
    by = dict.fromkeys(CATEGORIES, 0.0)
    for n in gm.graph.nodes:
        p = profiles.get(n.name)
        if n.op != "call_function" or p is None:
            continue
        flops, moved = p.fwd_flops + p.bwd_flops, p.fwd_bytes + p.bwd_bytes
        if not (flops or moved):
            continue
        val = n.meta.get("val")
        dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
        by[category(str(n.target))] += per_step * cost.compute_time_s(
            flops, moved, device, dtype, op=str(n.target), attention=p.attention
        )
    pred = plan.predicted
    comm = pred.get("communication_dp_s", 0.0)
    accumulate = pred.get("gradient_accumulation_s", 0.0)
    # replicate: dp_sync_s is the gradient all-reduce, the accumulation and the optimizer;
    # ZeRO: the accumulation and the optimizer (its collectives run inside the layers)
    opt = (
        pred.get("dp_sync_s", 0.0)
        - accumulate
        - (comm if plan.data_parallel == "replicate" else 0.0)
    )
    by["accumulate"] += accumulate
    by["optimizer"] += max(opt, 0.0)
    by["collective"] += comm
    step = pred.get("step_time_s", 0.0)
    # a layer costs the slower of its device time and the host's time to issue it: what the
    # host adds where it is the slower (no category: the device waits)
    return {"by_category": by, "host_bound_s": max(step - sum(by.values()), 0.0), "step_s": step}


# ---- the table -----------------------------------------------------------------------------


def compare(row: dict) -> str:
    """A benchmark row's breakdown (its "profile" with "device", and "predicted_breakdown"
    where the plan has one) as a table of milliseconds per step."""
    dev = (row.get("profile") or {}).get("device")
    if not dev:
        return f"{row['model']} {row['system']}: no device breakdown in this row"
    pred = (row.get("predicted_breakdown") or {}).get("by_category", {})
    lines = [
        f"{row['model']} {row['system']} ({row['gpus']} GPU): ms per step",
        f"{'':14} {'measured':>9} {'predicted':>9}",
    ]

    def ms(v):
        return f"{v * 1e3:9.1f}" if v is not None else f"{'-':>9}"

    def line(name, m, p):
        lines.append(f"{name:14} {ms(m)} {ms(p) if pred or p is not None else ''}")

    for k in CATEGORIES:  # a file written before a category existed has none of it
        line(k, dev["by_category"].get(k), pred.get(k) if pred else None)
    line("unattributed", dev["unattributed_s"], None)
    line("kernels", dev["kernels_s"], sum(pred.values()) if pred else None)
    line("device busy", dev["busy_s"], None)
    step = row.get("measured_step_s")
    if step:
        line("step", step, row.get("predicted_step_s"))
        host = (row.get("predicted_breakdown") or {}).get("host_bound_s")
        line("idle", step - dev["busy_s"], host)
    idle = dev.get("idle_by_host_s")
    if idle:  # profiled: the profiler's own host time lengthens these gaps
        for side in ("outer", "leaf"):
            lines.append(f"idle while the host ran ({side} event, profiled ms per step):")
            lines += [f"  {v * 1e3:7.2f}  {name}" for name, v in list(idle[side].items())[:8]]
    return "\n".join(lines)
