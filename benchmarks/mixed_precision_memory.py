"""Measured peak memory of a GPT trained with `autopar.optimizer`, beside the plan's prediction
(issue 18: "a 1.3B GPT trained with `autopar.optimizer` has measured peak memory within 3% of
the plan's prediction").

The model is built as its authors ship it, in fp32 (benchmarks/lib/models.py: GPT-3 1.3B,
vocabulary 50304, seed-0 weights, made on the device), and planned for this job's devices
(`Cluster.detect()`: the `h200-141g` or `h100-80g` preset on one GPU) by
`autopar.autoparallelize(..., precision=P)`: with "bf16-mixed" the graph is traced and priced in
bf16, the runtime holds bf16 weights and gradients, and `autopar.optimizer(pm, torch.optim.AdamW,
lr=1e-4, weight_decay=0.1, fused=True)` steps fp32 masters (the model's own fp32 weights) with
fp32 state. Each step: `pm.train_step(x, y)`, `pm.clip_grad_norm_(1.0)`, `opt.step()`,
`opt.zero_grad()`, on random tokens (--rotate distinct batches cycled through).

Measured, on a GPU:

    peak_first_step_bytes      torch.cuda.max_memory_allocated() over step 1 (the stats reset
                               after the model is built); AdamW makes its state in that step
    peak_after_first_bytes     over steps 2..N (reset after step 1): the steady state
    peak_all_steps_bytes       the larger of the two: steps 1..N
    peak_by_phase_bytes        --phase-steps more steps, the stats reset before each phase
                               (train_step, clip_grad_norm_, opt.step, zero_grad): where the peak is
    allocated_*_bytes          torch.cuda.memory_allocated() after the build and between steps
    step_s                     median step (CUDA events) over steps --warmup+1..N

beside `plan.predicted["peak_memory_bytes"]`, the plan's breakdown (`memory_<kind>_bytes`) and its
step time. --precisions bf16-mixed fp32 runs each in turn, each in a process of its own (a fresh
allocator; see `main`), the next only if --time-budget-s allows; a precision that fails (out of
memory, error) gets its error text and the run goes on. One JSON file per precision under
--out-dir (default $OUT, else the current folder): gpt-1.3b-<precision>-memory.json. A short
table is printed last.

    python benchmarks/mixed_precision_memory.py --precisions bf16-mixed fp32 --out-dir $OUT
    torchrun --standalone --nproc_per_node 1 benchmarks/mixed_precision_memory.py  # one precision
    python benchmarks/mixed_precision_memory.py --smoke     # tiny GPT on CPU (gloo), no peaks

Run it where `benchmarks` imports (`pip install -e .`, or PYTHONPATH=<repository root>).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist

import autopar
from autopar.models.losses import lm_loss
from benchmarks.lib.distributed import init_distributed
from benchmarks.lib.models import model_spec, parameter_count

MODEL = "gpt-1.3b"
PHASES = ("train_step", "clip_grad_norm_", "optimizer_step", "zero_grad")
GIB = 2**30


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the tiny GPT of --tiny (2 layers, 64 wide) on CPU: checks the script",
    )
    ap.add_argument(
        "--precisions",
        nargs="+",
        default=["bf16-mixed"],
        choices=("bf16-mixed", "fp32"),
        help="run each in turn (default bf16-mixed)",
    )
    ap.add_argument(
        "--runtime",
        default="replay",
        choices=("replay", "compile", "eager"),
        help="autoparallelize(runtime=...) (default replay; compile: Inductor on the layers)",
    )
    ap.add_argument("--global-batch", type=int, default=None, help="default 8 (--smoke: 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (--smoke: 32)")
    ap.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="the first steps left out of the median step time (default 3)",
    )
    ap.add_argument(
        "--phase-steps",
        type=int,
        default=2,
        help="steps after the measured ones with a peak per phase (default 2)",
    )
    ap.add_argument("--rotate", type=int, default=4, help="distinct random batches (default 4)")
    ap.add_argument(
        "--plan-time-limit",
        type=float,
        default=60.0,
        help="autopar.plan's time_limit per solve (s)",
    )
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start no further precision after this many seconds",
    )
    ap.add_argument("--out-dir", default=None, help="default $OUT, else the current folder")
    ap.add_argument(
        "--meta",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="free labels for the JSON (commit=..., machine=...)",
    )
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    args.global_batch = args.global_batch or (4 if args.smoke else 8)
    args.seq_len = args.seq_len or (32 if args.smoke else 2048)
    args.out_dir = args.out_dir or os.environ.get("OUT") or "."
    # what benchmarks.lib.distributed.init_distributed reads
    args.collective_timeout_s, args.threads, args.dtype = 600, 1, "fp32"
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


class Clock:
    """Elapsed time of one piece of work: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.t1 - self.t0


def _memory(cuda: bool) -> dict:
    if not cuda:
        return {}
    torch.cuda.synchronize()
    return {
        "allocated_bytes": torch.cuda.memory_allocated(),
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "reserved_bytes": torch.cuda.memory_reserved(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
    }


def _reset(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _batches(spec, args, device) -> list:
    g = torch.Generator(device="cpu").manual_seed(1234)
    vocab = spec.config["vocab_size"]
    out = []
    for _ in range(args.rotate):
        tokens = torch.randint(0, vocab, (args.global_batch, args.seq_len + 1), generator=g)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def _optimizer(pm, cuda: bool):
    kw = dict(lr=1e-4, weight_decay=0.1)
    try:
        return autopar.optimizer(pm, torch.optim.AdamW, fused=True, **kw), "fused"
    except RuntimeError:  # a CPU torch without fused AdamW
        if cuda:
            raise
        return autopar.optimizer(pm, torch.optim.AdamW, foreach=True, **kw), "foreach"


def run_precision(ctx, args, precision: str) -> dict:
    cuda = ctx.device.type == "cuda"
    spec = model_spec(MODEL, args.smoke, args.seq_len)
    row: dict = {
        "model": MODEL if not args.smoke else f"{MODEL} (smoke: tiny)",
        "precision": precision,
        "runtime": args.runtime,
        "config": spec.config,
        "parameters": parameter_count(spec),
        "global_batch": args.global_batch,
        "seq_len": args.seq_len,
        "built_dtype": "float32",
    }
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    row["memory_before_build"] = _memory(cuda)
    _reset(cuda)
    t0 = time.perf_counter()
    model = spec.build(ctx.device, torch.float32)  # fp32, as its authors ship it
    row["model_dtype"] = str(next(model.parameters()).dtype)
    batches = _batches(spec, args, ctx.device)
    cluster = autopar.Cluster.detect()
    row["cluster"] = {
        "name": cluster.name,
        "device": cluster.device.name,
        "memory_bytes": cluster.device.memory_bytes,
        "world_size": cluster.world_size,
    }
    pm = autopar.autoparallelize(
        model,
        cluster,
        batches[0],
        loss_fn=lm_loss,
        precision=precision,
        time_limit=args.plan_time_limit,
        runtime=args.runtime,
    )
    row["build_s"] = time.perf_counter() - t0
    del model  # under bf16-mixed the fp32 masters are the model's own weights: they stay
    gc.collect()
    plan = pm.plan
    row["plan"] = {
        "mesh": dict(plan.mesh),
        "data_parallel": plan.data_parallel,
        "pipeline": plan.pipeline,
        "checkpoint": plan.checkpoint,
        "precision": plan.precision,
        "summary": plan.summary(),
    }
    row["predicted"] = dict(plan.predicted)
    row["memory_after_build"] = _memory(cuda)
    opt, impl = _optimizer(pm, cuda)
    row["optimizer"] = (
        f"autopar.optimizer(pm, torch.optim.AdamW, lr=1e-4, weight_decay=0.1, {impl})"
    )
    row["memory_after_optimizer"] = _memory(cuda)

    _train(pm, opt, batches, args, cuda, row)
    return row


def _train(pm, opt, batches, args, cuda: bool, row: dict) -> None:
    """--steps measured steps, then --phase-steps with a peak per phase; figures into `row`."""
    losses, norms, clocks, between = [], [], [], []
    _reset(cuda)
    for i in range(args.steps):
        x, y = batches[i % len(batches)]
        with Clock(cuda) as clock:
            loss = pm.train_step(x, y)
            norm = pm.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
        clocks.append(clock)
        losses.append(loss)
        norms.append(norm)
        if i == 0:
            row["memory_first_step"] = _memory(cuda)
            _reset(cuda)
        between.append(_memory(cuda).get("allocated_bytes"))
    row["memory_after_first"] = _memory(cuda)
    times = [c.seconds for c in clocks]
    row["step_times_s"] = times
    row["step_s"] = statistics.median(times[args.warmup :])
    row["losses"] = [float(v) for v in losses]
    row["grad_norms"] = [float(v) for v in norms]
    row["allocated_between_steps_bytes"] = between

    phases = []
    for i in range(args.phase_steps):
        x, y = batches[(args.steps + i) % len(batches)]
        peaks = {}
        for name, fn in (
            ("train_step", lambda x=x, y=y: pm.train_step(x, y)),
            ("clip_grad_norm_", lambda: pm.clip_grad_norm_(1.0)),
            ("optimizer_step", opt.step),
            ("zero_grad", opt.zero_grad),
        ):
            _reset(cuda)
            fn()
            m = _memory(cuda)
            peaks[name] = {
                "peak_bytes": m.get("peak_bytes"),
                "allocated_after_bytes": m.get("allocated_bytes"),
            }
        phases.append(peaks)
    row["peak_by_phase"] = phases
    if cuda:
        first = row["memory_first_step"]["peak_bytes"]
        after = row["memory_after_first"]["peak_bytes"]
        row["peak_first_step_bytes"] = first
        row["peak_after_first_bytes"] = after
        row["peak_all_steps_bytes"] = max(first, after)
        pred = row["predicted"]["peak_memory_bytes"]
        row["measured_over_predicted_after_first"] = after / pred
        row["measured_over_predicted_all_steps"] = max(first, after) / pred
        row["peak_by_phase_bytes"] = {k: max(p[k]["peak_bytes"] for p in phases) for k in PHASES}


def _environment(ctx) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "world_size": ctx.world,
        "device_type": ctx.device.type,
    }
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(
            device_name=props.name, device_memory_bytes=props.total_memory, cuda=torch.version.cuda
        )
    return env


def _table(rows: list[dict]) -> str:
    kinds = ("parameters", "gradients", "optimizer", "activations", "temporaries")
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['model']} {r['precision']}: FAILED {r['error']}")
            continue
        p = r["predicted"]
        lines.append(
            f"{r['model']} {r['precision']} ({r.get('runtime', 'replay')}) on "
            f"{r['cluster']['name']} "
            f"(plan {r['plan']['mesh']}, checkpoint {len(r['plan']['checkpoint'] or {})} "
            f"ops, pipeline {bool(r['plan']['pipeline'])})"
        )
        lines.append(
            "  predicted breakdown (GiB): "
            + ", ".join(f"{k} {p.get(f'memory_{k}_bytes', 0) / GIB:.2f}" for k in kinds)
        )
        lines.append(
            f"  predicted peak {p['peak_memory_bytes'] / GIB:.3f} GiB, "
            f"step {p['step_time_s']:.4f} s"
        )
        if "peak_after_first_bytes" in r:
            for label, key in (
                ("steps 2..N", "peak_after_first_bytes"),
                ("steps 1..N", "peak_all_steps_bytes"),
                ("step 1", "peak_first_step_bytes"),
            ):
                v = r[key]
                lines.append(
                    f"  measured peak {label:<10} {v / GIB:.3f} GiB "
                    f"({(v / p['peak_memory_bytes'] - 1) * 100:+.2f}% of predicted)"
                )
            lines.append(
                "  peak by phase (GiB): "
                + ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["peak_by_phase_bytes"].items())
            )
            lines.append(
                f"  allocated between steps {r['allocated_between_steps_bytes'][-1] / GIB:.3f}"
                f" GiB; predicted parameters+gradients+optimizer "
                f"{sum(p.get(f'memory_{k}_bytes', 0) for k in kinds[:3]) / GIB:.3f} GiB"
            )
        lines.append(
            f"  median step {r['step_s']:.4f} s (predicted {p['step_time_s']:.4f} s), "
            f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, build {r['build_s']:.1f} s"
        )
    return "\n".join(lines)


def _json_name(args, precision: str) -> str:
    runtime = "" if args.runtime == "replay" else f"-{args.runtime}"
    return f"{'smoke-' if args.smoke else ''}{MODEL}-{precision}{runtime}-memory.json"


def _one_precision(args, precision: str) -> dict:
    """This process measures `precision` (one model per process, see `main`); writes its JSON
    and returns its row."""
    ctx = init_distributed(args)
    try:
        if ctx.world != 1:
            raise SystemExit("mixed_precision_memory.py measures one device: launch one process")
        env = _environment(ctx)
        print(
            f"# mixed_precision_memory.py {time.strftime('%Y-%m-%d')} {precision}: "
            f"{env.get('device_name', 'CPU')}, torch {torch.__version__}",
            flush=True,
        )
        t0 = time.perf_counter()
        try:
            row = run_precision(ctx, args, precision)
        except Exception as e:  # noqa: BLE001 - recorded in the JSON and the table
            traceback.print_exc()
            row = {
                "model": MODEL,
                "precision": precision,
                "error": f"{type(e).__name__}: {str(e)[:2000]}",
            }
        row["elapsed_s"] = time.perf_counter() - t0
        with open(os.path.join(args.out_dir, _json_name(args, precision)), "w") as f:
            json.dump(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "meta": dict(item.split("=", 1) for item in args.meta),
                    "environment": env,
                    "options": vars(args),
                    "command": sys.argv,
                    "result": row,
                },
                f,
                indent=1,
                default=str,
            )
        return row
    finally:
        dist.destroy_process_group()


def _without_precisions(argv: list[str]) -> list[str]:
    out, skipping = [], False
    for a in argv:
        if a == "--precisions":
            skipping = True
        elif skipping and not a.startswith("--"):
            continue
        else:
            skipping = False
            out.append(a)
    return out


def main(argv=None) -> int:
    """One precision measures in this process; several run one child process each, in turn,
    and the table of all of them is printed last. One model per process: a fresh allocator for
    each peak, and autopar's replay runtime fails to trace a second model of another dtype in
    the same process (AssertionError "Node tangents_2 was invalid, but is output" from
    AOTAutograd's partitioner; one dtype after another alone each run)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if len(args.precisions) == 1:
        row = _one_precision(args, args.precisions[0])
        print()
        print(_table([row]), flush=True)
        return 0
    t0, rows = time.perf_counter(), []
    env = {
        k: v
        for k, v in os.environ.items()  # the child makes its own job of one process
        if k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "GROUP_RANK",
            "GROUP_WORLD_SIZE",
            "ROLE_RANK",
            "ROLE_WORLD_SIZE",
            "TORCHELASTIC_RUN_ID",
        )
    }
    for precision in args.precisions:
        if args.time_budget_s and rows and time.perf_counter() - t0 > args.time_budget_s:
            rows.append(
                {
                    "model": MODEL,
                    "precision": precision,
                    "error": f"skipped: past --time-budget-s {args.time_budget_s}",
                }
            )
            continue
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            *_without_precisions(argv),
            "--precisions",
            precision,
        ]
        rc = subprocess.call(cmd, env=env)
        try:
            with open(os.path.join(args.out_dir, _json_name(args, precision))) as f:
                rows.append(json.load(f)["result"])
        except (OSError, ValueError, KeyError):
            rows.append(
                {
                    "model": MODEL,
                    "precision": precision,
                    "error": f"the child process exited {rc} without its JSON",
                }
            )
    print()
    print(_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
