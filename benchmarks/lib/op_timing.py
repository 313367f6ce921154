"""Op and host times on this machine, for the cost model's calibration
(benchmarks/calibrate_device.py, parts 1 and 2).

Part 1, op times (`time_ops`). A model is traced on meta (`autopar.trace`, bf16, one
microbatch) and profiled (`autopar.planning.profile.profile_graph`). Every distinct op (target,
argument shapes, dtypes and constants) with FLOPs or bytes is run on random tensors: forward +
backward (autograd on random output gradients), the median of `repeats` timings of `inner`
calls each (CUDA events on GPUs), after warm-up. Each row carries the op's profiled fwd+bwd
FLOPs and bytes, its count in the graph and its measured seconds.

Part 2, host time per op (`host_time`). The model at a size where the device work is
negligible (batch 1) is trained by autopar on a job of one process under one runtime; the wall
time of a step (device synchronised) divided by the graph's ops is the host's time per op for
forward + backward.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import fx

import autopar
from autopar.models.losses import lm_loss
from autopar.planning.profile import profile_graph
from autopar.trace import is_getitem, trace

# ---- part 1: op times -----------------------------------------------------------------------


def _key(n: fx.Node) -> str:
    def show(a):
        if isinstance(a, fx.Node):
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                return f"T{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}"
            return repr(v)
        if isinstance(a, (list, tuple)):
            return "[" + ",".join(show(x) for x in a) + "]"
        return repr(a)

    return f"{n.target}({show(list(n.args))}, {show(sorted(n.kwargs.items()))})"


def _real(v, device, vocab: int):
    if not isinstance(v, torch.Tensor):
        return v
    if v.dtype.is_floating_point:
        return (torch.randn(v.shape, device=device, dtype=v.dtype) * 0.02).requires_grad_()
    if v.dtype == torch.bool:
        return torch.rand(v.shape, device=device) > 0.5
    return torch.randint(0, vocab, v.shape, device=device, dtype=v.dtype)


def _materialise(n: fx.Node, device, vocab: int):
    def conv(a):
        if isinstance(a, fx.Node):
            return _real(a.meta["val"], device, vocab)
        if isinstance(a, torch.device):
            return device
        return a

    return fx.node.map_aggregate(n.args, conv), fx.node.map_aggregate(n.kwargs, conv)


def _tensors(tree) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _timer(device):
    if device.type == "cuda":

        def measure(fn, inner):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
    else:

        def measure(fn, inner):
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t) / inner

    return measure


def time_ops(spec, microbatch: int, device, *, repeats: int, inner: int) -> list[dict]:
    with torch.device("meta"):
        model = spec.build("meta", torch.float32).to(torch.bfloat16)
    seq = spec.config["seq_len"]
    x = torch.zeros(microbatch, seq, dtype=torch.long, device="meta")
    traced = trace(model, (x,), loss_fn=lm_loss, target=x)
    gm = traced.graph_module
    profiles = profile_graph(gm, no_grad=set(traced.buffers) | set(traced.inputs))
    vocab = min(spec.config["vocab_size"], seq)
    groups: dict[str, dict] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or is_getitem(n) or not n.users:
            continue
        p = profiles[n.name]
        flops, moved = p.fwd_flops + p.bwd_flops, p.fwd_bytes + p.bwd_bytes
        if not flops and not moved:
            continue
        k = _key(n)
        row = groups.setdefault(
            k,
            {"op": str(n.target), "key": k, "count": 0, "node": n, "flops": flops, "bytes": moved},
        )
        row["count"] += 1
    measure = _timer(device)
    rows = []
    for row in groups.values():
        n = row.pop("node")
        try:
            row.update(_time_op(n, device, vocab, measure, repeats=repeats, inner=inner))
        except Exception as e:  # a row that says why, the rest goes on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def _requiring_grad(out) -> list[torch.Tensor]:
    return [
        o
        for o in (out if isinstance(out, (tuple, list)) else (out,))
        if isinstance(o, torch.Tensor) and o.requires_grad
    ]


def _time_op(n: fx.Node, device, vocab: int, measure, *, repeats: int, inner: int) -> dict:
    """One op's forward + backward on random tensors: its median seconds, and whether it has a
    backward."""
    args, kwargs = _materialise(n, device, vocab)
    outs = _requiring_grad(n.target(*args, **kwargs))
    grads = [torch.randn_like(o) for o in outs]
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad]

    def step():
        os_ = _requiring_grad(n.target(*args, **kwargs))
        if os_:  # gradients returned, not accumulated into .grad (as in training)
            torch.autograd.grad(os_, leaves, grads, allow_unused=True)

    for _ in range(3):
        step()
    seconds = statistics.median(measure(step, inner) for _ in range(repeats))
    return {"seconds": seconds, "backward": bool(outs)}


# ---- part 2: host time per op ---------------------------------------------------------------


def host_time(spec, device, runtime: str, *, seq: int, steps: int) -> dict:
    spec = type(spec)(spec.name, spec.family, dict(spec.config, seq_len=seq))
    model = spec.build(device, torch.float32).to(torch.bfloat16)
    x = torch.randint(0, 100, (1, seq), device=device)
    cluster = autopar.Cluster.detect()
    plan = autopar.manual_plan(
        model, cluster, (x, x), loss_fn=lm_loss, tp=1, pp=1, dp=1, microbatch_size=1
    )
    pm = autopar.autoparallelize(
        model, cluster, (x, x), loss_fn=lm_loss, plan=plan, runtime=runtime
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        pm.train_step(x, x)
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        pm.train_step(x, x)
        sync()
        times.append(time.perf_counter() - t)
    ops = issued_ops(pm.traced.graph_module)
    step_s = statistics.median(times)
    return {
        "model": spec.name,
        "runtime": runtime,
        "seq": seq,
        "graph_ops": ops,
        "step_s": step_s,
        "host_s_per_op": step_s / ops,
    }


def issued_ops(gm) -> int:
    """Graph ops as the cost model counts them for the host (planning.layer_costs.layer_costs): every op."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")
