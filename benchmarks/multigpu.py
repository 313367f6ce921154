"""autopar's plan against FSDP2, torchtitan-style TP + FSDP2 and hand pipelines, measured (issue 4).

One torchrun launch measures, for each model and the job's GPU count (the world size), every
system on the same machine in the same run:

    autopar         `autopar.plan` for this cluster (Cluster.detect()), then
                    `autopar.autoparallelize(..., plan=plan)`; bf16 parameters and gradients,
                    AdamW on fp32 master copies of the local shards (`MasterAdamW`)
    eager           one GPU only: the plain model in bf16 with the same MasterAdamW, so the gap
                    to `autopar` is the cost of autopar's runtime (op-by-op on DTensors)
    compiled        one GPU only: the user's best plain path (issue 19): the fp32 model under
                    `torch.compile(model)`, each forward and loss under bf16 autocast, fused
                    AdamW; Inductor compiles in the first warm-up step. Predicted as `eager`
                    is: the cost model does not price compiled kernels yet
    fsdp2           torch's `fully_shard` on every block and on the root (ZeRO-3),
                    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), fused AdamW
    tpT-fsdp2       torchtitan style: `parallelize_module` (Megatron column/row splits of
                    attention and MLP, vocabulary-split embedding and head with loss_parallel)
                    on a tp axis of T ranks inside the node, FSDP2 over the dp axis
    ppP-fsdp2       pipeline parallel by hand (torch.distributed.pipelining, 1F1B), equal runs
                    of blocks per stage, FSDP2 over dp; run only where memory forces it (every
                    other baseline of the model ran out of memory) unless --force-pp

Each baseline kind runs without and with activation checkpointing of every block (`-ac`;
--ac) and with gradient accumulation over N microbatches where asked (`-gaN`; --accum); a
concrete name (`eager-ac-ga4`, `compiled-ac`, `tp4-fsdp2`, `pp2-fsdp2-ac`) runs just that
configuration.
For each: tokens/s, MFU (model FLOPs 6 N_matmul + 12 L d T per token over --peak-tflops,
989 TFLOP/s = H200 bf16 dense datasheet; also against the bf16 matmul rate measured at the
start), peak memory (max over ranks of torch.cuda.max_memory_allocated), the median step time
(CUDA events after warm-up; random token batches rotated) and autopar's prediction of that
step (`plan.predicted["step_time_s"]` for autopar, `autopar.manual_plan` of the same
configuration for the baselines). A system that fails (out of memory, error) gets a row with
the error text and the run goes on; the first and last losses of every system are recorded
(same weights, same batches: the first agrees across systems to bf16 rounding).

    torchrun --standalone --nproc_per_node 8 benchmarks/multigpu.py --json $OUT/multigpu.json
    torchrun --standalone --nproc_per_node 2 benchmarks/multigpu.py --device cpu --tiny \
        --json /tmp/multigpu.json            # every system end to end on CPU (gloo)

The script runs the same as a module (`python -m benchmarks.multigpu ...`, `torchrun ... -m
benchmarks.multigpu ...`) from any folder where `benchmarks` imports: `pip install -e .`
installs it beside autopar (or set PYTHONPATH to the repository root). The work is done by
`benchmarks.lib` (models, systems, baselines, timing, profiling, predictions, reports; the map
is in benchmarks/__init__.py); this file parses the command line and runs the models in turn.

Planning runs on rank 0 before each model's measurements: `autopar.plan` on the real model (a
plan is fingerprinted against the graph traced from the model it runs, and a meta-device trace
differs), the baselines' `manual_plan`s on meta models in --plan-workers processes meanwhile;
nothing else runs while a system is timed. The JSON is rewritten after every row, so a run
stopped by a time limit keeps what it measured; --time-budget-s skips the systems that would
start after that many seconds (a row says so), --max-timing-s shortens each system's timing.
A rank that fails inside a step while the others wait in a collective stalls the job until
--collective-timeout-s; the rows written so far stay. autopar runs with its default runtime
("replay": each layer traced once, then replayed); --runtime eager runs it op by op, --runtime
compile replays each layer's graphs compiled by Inductor (the first step pays the compile).

--profile SYSTEM runs torch.profiler over --profile-steps more steps of those systems: top ops
by host and device time (--profile-out), and on GPUs the step's kernel time by category beside
what the cost model charges (benchmarks/step_breakdown.py; its table ends the profile file, and
`python benchmarks/step_breakdown.py RESULTS.json` prints it again from the JSON).

--memory-peak SYSTEM runs one more step of those systems under the CUDA allocator's history and
lists what is alive at its peak by the op that allocated it (a replayed graph's line names its
ATen op), and what the build and the first step left alive between steps: the table that found
the planning leak and the over-counted ZeRO-2 copies of 2026-11-29
(docs/benchmarks/2026-11-29-multigpu-x2-llama/). Plans predicted near the device's memory are
best run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, for every system alike.

Single-GPU run of 2026-11-29 (docs/benchmarks/2026-11-29-single-h200/):

    torchrun --standalone --nproc_per_node 1 benchmarks/multigpu.py --models gpt-1.3b gpt-2.7b \
        --systems autopar eager fsdp2 --ac none --max-timing-s 20 --profile autopar eager \
        --profile-out $OUT/profile.txt --json $OUT/singlegpu.json

Issue 19 on one GPU: autopar's compiled replay beside torch.compile by hand and plain eager, each
with and without activation checkpointing (add --accum 1 2 where memory binds), GPT 1.3B and
the Llama-style 2.8B:

    torchrun --standalone --nproc_per_node 1 benchmarks/multigpu.py --models gpt-1.3b llama-3b \
        --systems autopar compiled eager --ac both --runtime compile \
        --json $OUT/one-gpu-compiled.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# NVLink multicast must stay off on the shared multi-GPU hosts (docs: GPU.md); every process
# this script starts inherits these.
for _var, _val in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_var] = _val

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import autopar  # noqa: E402
from benchmarks.lib.distributed import init_distributed  # noqa: E402
from benchmarks.lib.models import H200_BF16_PEAK_TFLOPS, MODELS  # noqa: E402
from benchmarks.lib.report import log, table, write_json  # noqa: E402
from benchmarks.lib.run import run_model  # noqa: E402
from benchmarks.lib.systems import KINDS, check_system_token  # noqa: E402
from benchmarks.lib.timing import measure_device  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N benchmarks/multigpu.py",
        description=__doc__.split("\n\n")[0],
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="tiny configurations of the same model families (CPU checks)",
    )
    ap.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        metavar="MODEL",
        help=f"from {', '.join(MODELS)} (default: all)",
    )
    ap.add_argument(
        "--systems",
        nargs="+",
        default=list(KINDS),
        metavar="SYSTEM",
        help=f"kinds from {', '.join(KINDS)} (default: all; each baseline kind "
        "expands over --ac, --accum and --tp-sizes; pp only where memory "
        "forces it, see --force-pp; eager and compiled only on one device), or "
        "concrete names: eager-ac, compiled-ac-ga2, fsdp2-ga4, tp4-fsdp2-ac, "
        "pp2-fsdp2 (always run)",
    )
    ap.add_argument(
        "--ac",
        choices=("none", "full", "both"),
        default="both",
        help="activation checkpointing of every block for the baseline kinds",
    )
    ap.add_argument(
        "--accum",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="gradient accumulation over N microbatches for the eager, compiled, "
        "fsdp2 and tp kinds (default 1)",
    )
    ap.add_argument(
        "--tp-sizes",
        type=int,
        nargs="+",
        default=None,
        help="tp sizes to try (default: every divisor > 1 of the GPUs per node)",
    )
    ap.add_argument(
        "--pp-sizes",
        type=int,
        nargs="+",
        default=None,
        help="pp sizes for the hand pipeline (default: the world size)",
    )
    ap.add_argument(
        "--pp-microbatches",
        type=int,
        default=None,
        help="microbatches of the hand pipeline (default: the largest in "
        "[pp, 2 pp] that divides the per-dp-rank batch)",
    )
    ap.add_argument(
        "--force-pp",
        action="store_true",
        help="run the hand pipeline even when another baseline fits",
    )
    ap.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="sequences per step (default 8 per GPU; --tiny: 4 per process)",
    )
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (--tiny: 32)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument(
        "--max-timing-s",
        type=float,
        default=None,
        help="cut the timed steps of a system so they take about this long, from "
        "the last warm-up step's time (never fewer than --min-steps)",
    )
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument(
        "--rotate", type=int, default=4, help="distinct random batches cycled through (default 4)"
    )
    ap.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="compute dtype (bf16 mixed precision; fp32 for CPUs without bf16)",
    )
    ap.add_argument(
        "--fp32-loss",
        action="store_true",
        help="upcast the logits before the cross-entropy (torchtitan's loss)",
    )
    ap.add_argument(
        "--plan-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an autopar.plan option fixed for the autopar system (string values: "
        "data_parallel=replicate, schedule=1F1B)",
    )
    ap.add_argument(
        "--plan-file",
        action="append",
        default=[],
        metavar="MODEL=PATH",
        help="run this plan (a JSON file from benchmarks/plan_offline.py -o, or "
        "autopar plan -o) as the autopar system of MODEL instead of planning "
        "on the real model: checks that a plan made offline runs here",
    )
    ap.add_argument(
        "--runtime",
        choices=("replay", "eager", "compile"),
        default="replay",
        help="autopar's runtime (autoparallelize(runtime=...)): replay (default), "
        "eager (op by op), compile (replay with each layer's graphs compiled by "
        "Inductor; the first step pays the compile)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_PEAK_TFLOPS,
        help="per-device peak for MFU (default 989, H200 bf16 dense datasheet)",
    )
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument(
        "--append", action="store_true", help="keep the runs already in --json and add these"
    )
    ap.add_argument(
        "--profile",
        nargs="*",
        default=None,
        metavar="SYSTEM",
        help="torch.profiler over --profile-steps steps of these system kinds "
        "(default with no names: autopar eager fsdp2); tables to "
        "--profile-out, figures in the row",
    )
    ap.add_argument(
        "--memory-peak",
        nargs="+",
        default=[],
        metavar="SYSTEM",
        help="one more step of these system kinds under the CUDA allocator's "
        "history: what is alive at its peak, by the op that allocated it "
        "(to --profile-out, figures in the row)",
    )
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--profile-out", default=None, help="text file for profiler tables")
    ap.add_argument(
        "--plan-workers",
        type=int,
        default=None,
        help="processes for planning on rank 0 (default: half the CPUs, <= 8; "
        "0 plans in the main process)",
    )
    ap.add_argument(
        "--plan-time-limit",
        type=float,
        default=None,
        help="autopar.plan's time_limit (s) per stage-cut solve",
    )
    ap.add_argument(
        "--memory-limit-gib",
        type=float,
        default=None,
        help="autopar.plan's per-device memory limit (default: the device's "
        "memory as the cluster preset gives it)",
    )
    ap.add_argument(
        "--no-gc",
        action="store_true",
        help="Python's garbage collector off while a system is timed",
    )
    ap.add_argument(
        "--no-predict-baselines",
        action="store_true",
        help="skip the manual_plan prediction of each baseline",
    )
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="skip the systems that would start after this many seconds",
    )
    ap.add_argument(
        "--collective-timeout-s",
        type=float,
        default=600,
        help="process-group timeout: a rank that fails inside a step leaves the "
        "others waiting this long (default 600)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU process")
    ap.add_argument(
        "--meta",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="free labels for the JSON (commit=..., machine=...)",
    )
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked, with the sets and paths the run reads (profile_kinds,
    memory_kinds, plan_files) and the default number of planning workers filled in."""
    ap = _parser()
    args = ap.parse_args(argv)
    _check_choices(ap, args)
    _check_numbers(ap, args)
    _check_outputs(ap, args)
    if args.plan_workers is None:
        args.plan_workers = min(8, max(0, (os.cpu_count() or 2) // 2))
        if args.plan_workers < 2:
            args.plan_workers = 0
    return args


def _check_choices(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The models and systems asked for exist."""
    fail = ap.error
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        fail(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    for token in args.systems:
        why = check_system_token(token)
        if why:
            fail(f"--systems: {why}")


def _check_numbers(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    fail = ap.error
    if any(n < 1 for n in args.accum):
        fail(f"--accum takes positive integers, got {args.accum}")
    for name in ("tp_sizes", "pp_sizes"):
        if any(n < 2 for n in getattr(args, name) or []):
            fail(f"--{name.replace('_', '-')} takes integers >= 2, got {getattr(args, name)}")
    if args.memory_limit_gib is not None and args.memory_limit_gib <= 0:
        fail("--memory-limit-gib must be > 0")
    if args.max_timing_s is not None and args.max_timing_s <= 0:
        fail("--max-timing-s must be > 0")
    for name in ("steps", "warmup", "rotate", "profile_steps", "threads", "min_steps"):
        v = getattr(args, name)
        if v < (0 if name == "warmup" else 1):
            fail(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {v}")
    for name in ("global_batch", "seq_len", "pp_microbatches"):
        v = getattr(args, name)
        if v is not None and v < 1:
            fail(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.seq_len is not None and args.seq_len % 2:
        fail(f"--seq-len must be even (rotary tables split the head dim), got {args.seq_len}")
    if args.append and not args.json:
        fail("--append needs --json PATH")
    if args.peak_tflops <= 0:
        fail("--peak-tflops must be > 0")


def _check_outputs(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Profiled and watched kinds, plan files, labels; sets what they name on `args`."""
    fail = ap.error
    if args.profile is not None:
        bad = [s for s in args.profile if s not in KINDS]
        if bad:
            fail(f"--profile: unknown system kind(s) {bad}: choose from {', '.join(KINDS)}")
        args.profile_kinds = set(args.profile or ("autopar", "eager", "fsdp2"))
    else:
        args.profile_kinds = set()
    bad = [s for s in args.memory_peak if s not in KINDS]
    if bad:
        fail(f"--memory-peak: unknown system kind(s) {bad}: choose from {', '.join(KINDS)}")
    args.memory_kinds = set(args.memory_peak)
    args.plan_files = {}
    for item in args.plan_file:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS:
            fail(f"--plan-file takes MODEL=PATH with MODEL from {', '.join(MODELS)}, got {item!r}")
        try:
            autopar.Plan.load(path)  # a bad file is an error now, not after the baselines ran
        except (OSError, ValueError) as e:
            fail(f"--plan-file {item}: {e}")
        args.plan_files[name] = path  # a path: args go into the JSON as they are
    if args.profile_out and args.profile is None and not args.memory_peak:
        fail("--profile-out needs --profile or --memory-peak")
    for item in args.meta:
        if "=" not in item:
            fail(f"--meta takes KEY=VALUE, got {item!r}")


def _environment(ctx) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "world_size": ctx.world,
        "local_world_size": ctx.local_world,
        "device_type": ctx.device.type,
        "backend": dist.get_backend(),
        "dtype": str(ctx.dtype),
    }
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(
            device_name=props.name, device_memory_bytes=props.total_memory, cuda=torch.version.cuda
        )
    return env


def _new_state(ctx, args) -> dict:
    """What the run gathers as it goes: the JSON's header, its rows, the notes and the profile
    tables; with --append, the runs already in the file (rank 0)."""
    state = {
        "t0": time.perf_counter(),
        "runs": [],
        "notes": [],
        "profiles": [],
        "date": time.strftime("%Y-%m-%d"),
        "meta": dict(item.split("=", 1) for item in args.meta),
        "options": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "previous_runs": [],
        "earlier": [],
    }
    if args.append and ctx.rank == 0 and os.path.exists(args.json):
        with open(args.json) as f:
            before = json.load(f)
        state["previous_runs"] = before.pop("runs", [])
        state["earlier"] = before.pop("earlier", []) + [before]  # their settings and readings
    state["environment"] = _environment(ctx)
    return state


def _measure_device(ctx, state) -> None:
    """The device's own matmul and copy rates into `state`, and the run's first line."""
    measured = measure_device(ctx)
    ctx.free_memory()
    state["device_measurements"] = {"per_rank": ctx.gather(measured)} if measured else {}
    if measured:
        state["matmul_tflops"] = measured["bf16_matmul_8192_tflops"]
        state["device_measurements"].update(measured)  # rank 0's, at the top
    env = state["environment"]
    log(
        ctx,
        f"# multigpu.py {state['date']}: {ctx.world} x "
        f"{env.get('device_name', 'CPU process')}, torch {torch.__version__}, "
        f"{ctx.args.dtype}, batch {ctx.args.global_batch or 'default'}"
        + (
            f"; bf16 matmul {measured['bf16_matmul_8192_tflops']:.0f} TFLOP/s, "
            f"copy {measured['d2d_copy_tb_per_s']:.2f} TB/s"
            if measured
            else ""
        ),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.distributed.tensor._collective_utils").setLevel(logging.ERROR)
    ctx = init_distributed(args)
    state = _new_state(ctx, args)
    try:
        _measure_device(ctx, state)
        for name in args.models:
            run_model(ctx, name, state)
        if ctx.rank == 0 and args.profile_out and state["profiles"]:
            with open(args.profile_out, "w") as f:
                f.write("\n".join(state["profiles"]))
        if ctx.device.type == "cpu":
            state["notes"].append(
                f"CPU run: MFU is against --peak-tflops ({args.peak_tflops:g}"
                " TFLOP/s), meaningless for CPUs; peak memory is not measured"
            )
        write_json(ctx, state)
        if ctx.rank == 0:
            print()
            for n in state["notes"]:
                print(f"note: {n}")
            print()
            print(table(state["runs"]))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
