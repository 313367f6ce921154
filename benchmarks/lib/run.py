"""One model's measurements: plan and predict on rank 0, then build, warm up, time (and maybe
profile) each system in turn, a row per system. A system that fails (out of memory, error) gets
a row with the error text and the run goes on."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from dataclasses import asdict

import torch

import autopar
from benchmarks.lib.autopar_system import build_autopar
from benchmarks.lib.baselines import build_compiled, build_eager, build_fsdp2
from benchmarks.lib.breakdown import compare
from benchmarks.lib.distributed import Ctx
from benchmarks.lib.models import ModelSpec, model_flops_per_token, model_spec, parameter_count
from benchmarks.lib.pipeline import build_pp
from benchmarks.lib.predict import (
    offline_prediction,
    predict,
    predicted_breakdown,
    start_predictions,
)
from benchmarks.lib.profiling import memory_at_peak, profile_steps
from benchmarks.lib.report import log, one_line, write_json
from benchmarks.lib.systems import System, expand_systems
from benchmarks.lib.tensor_parallel import build_tp
from benchmarks.lib.timing import make_batches, time_steps

BASELINE_BUILDERS = {
    "eager": build_eager,
    "compiled": build_compiled,
    "fsdp2": build_fsdp2,
    "tp": build_tp,
    "pp": build_pp,
}


def error_text(e: BaseException) -> str:
    """The first line that says something, of the error or of what caused it (torch's
    pipelining wraps a backward's failure in a RuntimeError whose message starts with a
    newline); "OOM: ..." when any error of the chain ran out of memory."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        chain.append((e, f"{type(e).__name__}: {lines[0] if lines else ''}".strip()))
        e = e.__cause__ or e.__context__
    for exc, text in chain:
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
            return ("OOM: " + text)[:400]
    texts = [t for _, t in chain if not t.endswith(":")]
    return " <- ".join(texts or [chain[0][1]])[:400]


def _is_oom(row: dict) -> bool:
    return (row.get("error") or "").startswith("OOM")


def _plan_option(item: str) -> tuple[str, object]:
    """--plan-option KEY=VALUE: an integer value (microbatch_size=2) as an int, else the text."""
    key, value = item.split("=", 1)
    return key, int(value) if value.lstrip("-").isdigit() else value


# ---- one system -----------------------------------------------------------------------------


def _new_row(ctx: Ctx, spec: ModelSpec, system: System, batch, seq, pred: dict, state) -> dict:
    row = {
        "model": spec.name,
        "gpus": ctx.world,
        "system": system.name,
        "tokens_per_s": None,
        "mfu": None,
        "peak_memory_bytes": None,
        "predicted_step_s": pred.get("predicted", {}).get("step_time_s"),
        "measured_step_s": None,
        "config": system.config(),
        "global_batch": batch,
        "seq_len": seq,
        "parameters": state["parameters"],
        "gc_disabled_while_timed": ctx.args.no_gc,
        "predicted_peak_memory_bytes": pred.get("predicted", {}).get("peak_memory_bytes"),
        "planning_s": pred.get("planning_s"),
    }
    if pred.get("plan_file"):
        row["plan_file"] = pred["plan_file"]
    if "error" in pred:
        row["prediction_error"] = pred["error"]
    return row


def _build(ctx: Ctx, spec: ModelSpec, system: System, pred: dict, example):
    """(the built system or None, this rank's failure or None)."""
    try:
        if system.kind == "autopar":
            if "plan_json" not in pred:
                raise RuntimeError(f"no plan: {pred.get('error', 'planning failed')}")
            return build_autopar(ctx, spec, system, pred["plan_json"], example), None
        return BASELINE_BUILDERS[system.kind](ctx, spec, system), None
    except Exception as e:
        if ctx.args.verbose:
            traceback.print_exc()
        return None, error_text(e)


def _measure(ctx: Ctx, spec: ModelSpec, system: System, built, mine, watch: bool) -> dict:
    """Time the built system (and profile it, and watch its memory, where asked): this rank's
    figures, or its failure."""
    args = ctx.args
    result, failure, prof, mem = None, None, None, None
    try:
        if watch:  # and its first step: what the optimizer and the runtime make once
            built.step(*mine[0])
            ctx.sync()
            torch.cuda.memory._record_memory_history(enabled=None)
        if args.no_gc:
            gc.collect()
            gc.disable()
        result = time_steps(ctx, built.step, mine, args.warmup, args.steps)
        gc.enable()
        if system.kind in args.profile_kinds:
            prof = profile_steps(
                ctx,
                built.step,
                mine,
                args.profile_steps,
                f"{spec.name} {system.name} ({ctx.world} x {ctx.device.type})",
            )
        if watch:
            mem = memory_at_peak(
                ctx, built.step, mine[0], f"{spec.name} {system.name} ({ctx.world} x cuda)"
            )
    except Exception as e:
        failure = error_text(e)
        if args.verbose:
            traceback.print_exc()
    gc.enable()
    if watch:  # off already, unless the first step failed
        torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated() if ctx.device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() if ctx.device.type == "cuda" else None
    return {
        "failure": failure,
        "peak": peak,
        "reserved": reserved,
        "median": statistics.median(result["times"]) if result else None,
        "host": statistics.median(result["host"]) if result else None,
        "result": result,
        "prof": prof,
        "mem": mem,
    }


def run_system(ctx: Ctx, spec: ModelSpec, system: System, batches, pred: dict, state) -> dict:
    """Build, warm up, time (and maybe profile) one system; a row for the JSON (rank 0's)."""
    args = ctx.args
    batch, seq = batches[0][0].shape
    row = _new_row(ctx, spec, system, batch, seq, pred, state)
    over = time.perf_counter() - state["t0"] > args.time_budget_s if args.time_budget_s else False
    if ctx.bcast(over):
        row["error"] = f"skipped: --time-budget-s {args.time_budget_s:g} s spent"
        return row
    t_build = time.perf_counter()
    watch = system.kind in args.memory_kinds and ctx.device.type == "cuda"
    if watch:  # who allocates what the system holds between steps (memory_at_peak's table)
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    built, failure = _build(ctx, spec, system, pred, batches[0])
    build_s = time.perf_counter() - t_build
    failures = ctx.gather(failure)
    if any(failures):
        if watch:
            torch.cuda.memory._record_memory_history(enabled=None)
        row["error"] = "build: " + next(f for f in failures if f)
        del built
        ctx.free_memory()
        return row
    ctx.free_memory()  # drops the full models the builders made; peak memory counts from here
    mine = [built.slice_batch(x, y) for x, y in batches]
    every = ctx.gather(_measure(ctx, spec, system, built, mine, watch))
    info = dict(built.info)
    del built, mine
    ctx.free_memory()
    if any(r["failure"] for r in every):
        row["error"] = next(r["failure"] for r in every if r["failure"])
        return row
    _add_measurements(ctx, row, every, info, build_s, pred, state)
    if every[0]["prof"] is not None:
        row["profile"] = every[0]["prof"][0]
        state["profiles"].append(every[0]["prof"][1])
        if system.kind == "autopar" and "device" in row["profile"] and ctx.rank == 0:
            row["predicted_breakdown"] = predicted_breakdown(
                ctx, spec, pred["plan_json"], batch, seq
            )
            state["profiles"].append(compare(row) + "\n")
    if every[0]["mem"] is not None:
        row["memory_at_peak"] = every[0]["mem"][0]
        state["profiles"].append(every[0]["mem"][1])
    return row


def _add_measurements(
    ctx: Ctx, row: dict, every: list[dict], info: dict, build_s: float, pred: dict, state
) -> None:
    """The row's figures from every rank's: the slowest rank sets the pace."""
    step_s = max(r["median"] for r in every)
    tokens = row["global_batch"] * row["seq_len"]
    flops = state["flops_per_token"] * tokens
    cuda = ctx.device.type == "cuda"
    row.update(
        tokens_per_s=tokens / step_s,
        mfu=flops / (step_s * ctx.world * ctx.args.peak_tflops * 1e12),
        measured_step_s=step_s,
        peak_memory_bytes=max(r["peak"] for r in every) if cuda else None,
        peak_reserved_bytes=max(r["reserved"] for r in every) if cuda else None,
        mean_step_s=statistics.fmean(t for r in every for t in r["result"]["times"]),
        step_times_s=[round(t, 6) for t in every[0]["result"]["times"]],
        timed_steps=len(every[0]["result"]["times"]),
        host_issue_s=max(r["host"] for r in every),
        build_s=build_s,
        model_flops_per_step=flops,
        first_loss=_mean_loss(every, "first_loss"),
        last_loss=_mean_loss(every, "last_loss"),
        **info,
    )
    if state.get("matmul_tflops"):
        row["mfu_vs_measured_matmul"] = flops / (step_s * ctx.world * state["matmul_tflops"] * 1e12)
    if pred.get("predicted", {}).get("flops_per_step"):
        row["autopar_flops_per_step"] = pred["predicted"]["flops_per_step"]
    if row["predicted_step_s"]:
        row["predicted_over_measured"] = row["predicted_step_s"] / step_s


def _mean_loss(every: list[dict], key: str) -> float | None:
    """The global batch's loss: ranks hold the loss of their dp part (FSDP), the same value
    per dp group (TP, autopar), or nothing (pipeline stages before the last); equal parts,
    so the mean over the ranks that hold one is the whole batch's."""
    vals = [r["result"][key] for r in every if r["result"][key] is not None]
    return statistics.fmean(vals) if vals else None


# ---- one model ------------------------------------------------------------------------------


def _predictions(ctx: Ctx, spec: ModelSpec, systems: list[System], cluster, batches) -> dict:
    """Rank 0: every system's prediction by name, the autopar system's with its plan. autopar
    plans the real model before anything is timed; the baselines' manual plans are made in
    worker processes meanwhile."""
    args = ctx.args
    batch = batches[0][0].shape[0]
    base = {
        "spec": asdict(spec),
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "batch": batch,
        "cluster": cluster.to_dict(),
        "time_limit": args.plan_time_limit,
        "memory_limit": args.memory_limit_gib * 2**30 if args.memory_limit_gib else None,
        "loss": "fp32" if args.fp32_loss else "model",
        "plan_options": dict(_plan_option(o) for o in args.plan_option),
    }
    manual = [] if args.no_predict_baselines else [s for s in systems if s.kind != "autopar"]
    t0 = time.perf_counter()
    wait = start_predictions([dict(base, system=asdict(s)) for s in manual], args.plan_workers)
    preds = {}
    if any(s.kind == "autopar" for s in systems) and spec.name in args.plan_files:
        preds["autopar"] = offline_prediction(args.plan_files[spec.name])
        log(ctx, f"{spec.name}: autopar runs the plan of --plan-file (made offline)")
        log(ctx, preds["autopar"]["summary"].split("\n  parameter")[0])
    elif any(s.kind == "autopar" for s in systems):
        try:
            model = spec.build(ctx.device, torch.float32).to(ctx.dtype)
        except Exception as e:
            preds["autopar"] = {"error": "building the model to plan: " + error_text(e)}
        else:
            preds["autopar"] = predict(dict(base, system=None), model, batches[0])
            del model
            ctx.free_memory()
        t_plan = preds["autopar"].get("planning_s", 0.0)
        log(ctx, f"{spec.name}: autopar.plan took {t_plan:.1f} s")
        if "summary" in preds["autopar"]:
            log(ctx, preds["autopar"]["summary"].split("\n  parameter")[0])
    preds.update(zip([s.name for s in manual], wait()))
    log(
        ctx,
        f"{spec.name}: planning and {len(manual)} manual plan(s) done in "
        f"{time.perf_counter() - t0:.1f} s ({args.plan_workers} worker process(es))",
    )
    return preds


def run_model(ctx: Ctx, name: str, state) -> list[dict]:
    args = ctx.args
    seq = args.seq_len or (32 if args.tiny else 2048)
    spec = model_spec(name, args.tiny, seq)
    batch = args.global_batch or (4 if args.tiny else 8) * ctx.world
    systems, notes = expand_systems(args, spec, ctx.world, ctx.local_world, batch)
    state["notes"] += notes
    state["flops_per_token"] = model_flops_per_token(spec)
    state["parameters"] = parameter_count(spec)
    cluster = autopar.Cluster.detect()
    batches = make_batches(spec, batch, args.rotate, ctx.device)
    preds = _predictions(ctx, spec, systems, cluster, batches) if ctx.rank == 0 else None
    preds = ctx.bcast(preds)
    rows = []
    for s in systems:
        if s.kind == "pp" and not s.forced:
            # a hand pipeline only where memory forces it: every other baseline ran out
            others = [r for r in rows if r["config"]["kind"] not in ("autopar", "pp")]
            if others and not all(_is_oom(r) for r in others):
                state["notes"].append(
                    f"{spec.name}: {s.name} not run: a baseline without a pipeline fits "
                    "(--force-pp runs it anyway)"
                )
                continue
        row = run_system(ctx, spec, s, batches, preds.get(s.name, {}), state)
        rows.append(row)
        state["runs"].append(row)
        log(ctx, one_line(row))
        write_json(ctx, state)
    return rows
