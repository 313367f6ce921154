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

On a CPU (`--device cpu`, tiny models with --tiny) the same code runs end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import fx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import autopar  # noqa: E402
from autopar.planning.profile import profile_graph  # noqa: E402
from autopar.trace import is_getitem, trace  # noqa: E402
from benchmarks.multigpu import MODELS, lm_loss, model_spec  # noqa: E402

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
        row = groups.setdefault(k, {"op": str(n.target), "key": k, "count": 0, "node": n,
                                    "flops": flops, "bytes": moved})
        row["count"] += 1
    measure = _timer(device)
    rows = []
    for row in groups.values():
        n = row.pop("node")
        try:
            args, kwargs = _materialise(n, device, vocab)
            out = n.target(*args, **kwargs)
            outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            grads = [torch.randn_like(o) for o in outs]
            leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad]

            def step():
                o = n.target(*args, **kwargs)
                os_ = [t for t in (o if isinstance(o, (tuple, list)) else (o,))
                       if isinstance(t, torch.Tensor) and t.requires_grad]
                if os_:  # gradients returned, not accumulated into .grad (as in training)
                    torch.autograd.grad(os_, leaves, grads, allow_unused=True)

            for _ in range(3):
                step()
            row["seconds"] = statistics.median(measure(step, inner) for _ in range(repeats))
            row["backward"] = bool(outs)
        except Exception as e:  # a row that says why, the rest goes on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    return rows


# ---- part 2: host time per op ---------------------------------------------------------------

def host_time(spec, device, runtime: str, *, seq: int, steps: int) -> dict:
    spec = type(spec)(spec.name, spec.family, dict(spec.config, seq_len=seq))
    model = spec.build(device, torch.float32).to(torch.bfloat16)
    x = torch.randint(0, 100, (1, seq), device=device)
    cluster = autopar.Cluster.detect()
    plan = autopar.manual_plan(model, cluster, (x, x), loss_fn=lm_loss, tp=1, pp=1, dp=1,
                               microbatch_size=1)
    pm = autopar.autoparallelize(model, cluster, (x, x), loss_fn=lm_loss, plan=plan,
                                 runtime=runtime)
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
    ops = issued_ops(pm._traced.graph_module)
    step_s = statistics.median(times)
    return {"model": spec.name, "runtime": runtime, "seq": seq, "graph_ops": ops,
            "step_s": step_s, "host_s_per_op": step_s / ops}


def issued_ops(gm) -> int:
    """Graph ops as the cost model counts them for the host (search.layer_costs): every op."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


# ---- part 3: collective links --------------------------------------------------------------

# nccl-tests' bus-bandwidth factors (doc/PERFORMANCE.md), as autopar.planning.cost prices them
_BUS = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n}


def measure_links(device, sizes: list[int], repeats: int) -> list[dict]:
    """Bus bandwidth of each collective over all ranks of the job, per size (bytes of the full
    buffer), bf16, the median of `repeats` timings of 5 back-to-back calls after warm-up."""
    n = dist.get_world_size()
    rows = []
    for kind in _BUS:
        for size in sizes:
            full = torch.randn(size // 2, device=device, dtype=torch.bfloat16)
            part = torch.empty(size // 2 // n, device=device, dtype=torch.bfloat16)
            call = {
                "all_reduce": lambda: dist.all_reduce(full),
                "all_gather": lambda: dist.all_gather_into_tensor(full, part),
                "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
            }[kind]
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
            rows.append({"collective": kind, "bytes": size, "ranks": n, "seconds": seconds,
                         "bus_bytes_per_s": _BUS[kind](n) * size / seconds})
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


# ---- fit ------------------------------------------------------------------------------------

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
    mm = sum(r["count"] * r["flops"] / peak for r in flop_bound) / \
        sum(r["count"] * r["seconds"] for r in flop_bound)
    small_cut = statistics.median(r["bytes"] for r in byte_bound) / 10
    small = [r["seconds"] for r in byte_bound if r["bytes"] < small_cut]
    kernel = statistics.median(small) if small else 0.0
    big = [r for r in byte_bound if r["bytes"] >= small_cut]
    mem = sum(r["count"] * r["bytes"] / bw for r in big) / \
        sum(r["count"] * max(r["seconds"] - kernel, 1e-9) for r in big)
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
    return {"matmul": round(min(mm, 1.0), 4), "memory": round(min(mem, 1.0), 4),
            "kernel_s": kernel, "ops": per_op, "host_s_per_op": host,
            "source": f"benchmarks/calibrate_device.py --fit {os.path.basename(path)} "
                      f"({data.get('date', '')}, {data.get('device', '')}, torch "
                      f"{data.get('torch', '')})"}


def write_device(path: str, calibration: dict) -> None:
    """Set the "calibration" of a device file (autopar/data/devices/*.json), checked by loading."""
    data = json.load(open(path))
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
    how = (f"measured {date} on {ranks} x {device} by benchmarks/calibrate_device.py --parts "
           "links: ")
    sources = data.setdefault("sources", {})
    sources.pop("intra_node", None)
    sources["intra_node.bandwidth_bytes_per_s"] = how + (
        "median bus bandwidth of bf16 all-reduce, all-gather and reduce-scatter at 128 MiB")
    sources["intra_node.latency_s"] = how + (
        "per ring step, from the 8 KiB collectives less their bandwidth term")
    autopar.Cluster.from_dict(data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(f"wrote the measured intra-node link into {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=("ops", "host", "links"),
                    default=["ops", "host"], help="what to measure (links: >= 2 processes)")
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
    ap.add_argument("--write-device", default=None, metavar="DEVICE_JSON",
                    help="put the fit into this device file's calibration (with --fit or --json)")
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
    device = (torch.device(args.device, local_rank) if args.device == "cuda"
              else torch.device("cpu"))
    if args.device == "cuda":
        torch.cuda.set_device(device)
    cluster = autopar.Cluster.detect()
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "python": platform.python_version(),
           "cluster": cluster.name, "peak_flops": cluster.device.peak_flops_for(torch.bfloat16),
           "hbm_bandwidth_bytes_per_s": cluster.device.hbm_bandwidth_bytes_per_s,
           "microbatch": args.microbatch, "ops": [], "host": []}
    for name in args.models if "ops" in args.parts else ():
        spec = model_spec(name, args.tiny, 32 if args.tiny else 2048)
        t = time.time()
        rows = time_ops(spec, args.microbatch, device, repeats=args.repeats, inner=args.inner)
        for r in rows:
            r["model"] = name
        out["ops"] += rows
        total = sum(r["count"] * r.get("seconds", 0.0) for r in rows)
        print(f"{name}: {len(rows)} distinct ops, fwd+bwd sum {total * 1e3:.1f} ms "
              f"({time.time() - t:.0f} s)", flush=True)
    if not dist.is_initialized() and "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if "links" in args.parts:
        sizes = [2**13, 2**20, 2**24, 2**27] if not args.tiny else [2**10, 2**16]
        out["links"] = measure_links(device, sizes, args.repeats)
        out["intra_node"] = fit_link(out["links"])
        for r in out["links"]:
            print(f"{r['collective']:15s} {r['bytes']:>10d} B on {r['ranks']} ranks: "
                  f"{r['seconds'] * 1e6:9.1f} us, bus {r['bus_bytes_per_s'] / 1e9:7.1f} GB/s")
        print("link:", out["intra_node"])
    if dist.is_initialized() and dist.get_rank() != 0:
        return  # the other ranks took part in the collectives only
    for runtime in ("replay", "eager") if "host" in args.parts else ():
        spec = model_spec(args.models[0], args.tiny, args.host_seq)
        r = host_time(spec, device, runtime, seq=args.host_seq, steps=args.host_steps)
        out["host"].append(r)
        print(f"host {runtime}: {r['step_s'] * 1e3:.1f} ms per step, {r['graph_ops']} ops, "
              f"{r['host_s_per_op'] * 1e6:.1f} us per op", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        if out["ops"]:
            print("fit:", json.dumps(fit(args.json)))
            if args.write_device:
                write_device(args.write_device, fit(args.json))
        if args.write_device and "intra_node" in out:
            write_link(args.write_device, out["intra_node"], out["date"], out["device"],
                       dist.get_world_size())


if __name__ == "__main__":
    main()
