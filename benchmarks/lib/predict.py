"""autopar's predictions of each system's step, made on rank 0 before anything is timed:
`autopar.plan` of the real model for the autopar system, `autopar.manual_plan` of each
baseline's configuration on a meta model (in worker processes, `start_predictions`), a plan
made elsewhere (`offline_prediction`, --plan-file), and the cost model's step by category
(`predicted_breakdown`). Tasks and results are plain data (picklable, JSON-able)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch
from torch import nn

import autopar
from autopar.planning.profile import TrainingPrecision, profile_graph
from autopar.trace import trace
from benchmarks.lib import breakdown
from benchmarks.lib.models import LOSS, ModelSpec, meta_model
from benchmarks.lib.systems import ONE_DEVICE, System


def predicted_breakdown(ctx, spec: ModelSpec, plan_json: str, batch: int, seq: int) -> dict:
    """What the cost model charges one step of the plan, by category (breakdown.py): the
    graph of one dp rank's microbatch, traced on meta and priced on the plan's device.
    `ctx` gives the compute dtype and the loss (`ctx.dtype`, `ctx.loss`)."""
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    why = breakdown.predictable(plan)
    if why:
        return {"error": why}
    _, micro = breakdown.microbatches(plan)
    x = torch.zeros(
        (micro or batch) // plan.mesh.get("dp", 1), seq, dtype=torch.long, device="meta"
    )
    traced = trace(meta_model(spec, ctx.dtype), (x,), loss_fn=ctx.loss, target=x.clone())
    gm = traced.graph_module
    profiles = profile_graph(gm, no_grad=set(traced.buffers) | set(traced.inputs))
    device = autopar.Cluster.from_dict(plan.cluster).device
    return breakdown.predicted(gm, profiles, plan, device)


def predict(task: dict, model: nn.Module | None = None, example=None) -> dict:
    """One planning task. Without "system": `autopar.plan` of `model` (a real model on the
    device it runs on, with a real global batch `example`: a plan is fingerprinted against
    the traced graph; a plan made from a meta model runs too, see --plan-file). With "system":
    `autopar.manual_plan` of that configuration on a meta model (a prediction only).
    Returns plain data (picklable, JSON-able)."""
    import logging

    logging.getLogger("torch.distributed.tensor._collective_utils").setLevel(logging.ERROR)
    spec = ModelSpec(**task["spec"])
    dtype = getattr(torch, task["dtype"])
    batch = task["batch"]
    cluster = autopar.Cluster.from_dict(task["cluster"])
    precision = (
        TrainingPrecision.mixed_bf16() if dtype != torch.float32 else TrainingPrecision.fp32()
    )
    t0 = time.perf_counter()
    try:
        with _quiet_solver():
            if task["system"] is None:
                plan = autopar.plan(
                    model,
                    cluster,
                    example,
                    loss_fn=LOSS[task["loss"]],
                    precision=precision,
                    time_limit=task.get("time_limit"),
                    memory_limit=task.get("memory_limit"),
                    **task.get("plan_options", {}),
                )
            else:
                plan = _manual_plan(
                    spec,
                    dtype,
                    batch,
                    cluster,
                    System(**task["system"]),
                    LOSS[task["loss"]],
                    precision,
                )
    except Exception as e:  # a prediction that fails must not stop the measurement
        return {
            "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
            "planning_s": time.perf_counter() - t0,
        }
    out = {
        "predicted": {k: float(v) for k, v in plan.predicted.items()},
        "planning_s": time.perf_counter() - t0,
    }
    return _with_plan(out, plan) if task["system"] is None else out


def _manual_plan(spec: ModelSpec, dtype, batch: int, cluster, s: System, loss_fn, precision):
    """`autopar.manual_plan` of a baseline's configuration, on a meta model.

    `compiled` is predicted as `eager` is (one device, no sharding, the same precision's bytes
    per parameter): the cost model has no notion of torch.compile yet, so its prediction is
    the uncompiled step's; pricing Inductor's fused kernels is issue 19, item 2."""
    model = meta_model(spec, dtype)
    x = torch.zeros(batch, spec.config["seq_len"], dtype=torch.long, device="meta")
    dp = s.dp
    micro = batch // (dp * s.microbatches)
    return autopar.manual_plan(
        model,
        cluster,
        (x, x.clone()),
        loss_fn=loss_fn,
        tp=s.tp,
        pp=s.pp,
        dp=dp,
        microbatch_size=micro,
        checkpoint="full" if s.ac else "none",
        zero=3 if (s.kind not in ONE_DEVICE and dp > 1) else 0,
        precision=precision,
    )


def _with_plan(out: dict, plan) -> dict:
    """A prediction with the plan itself, for the autopar system to run."""
    return dict(out, plan_json=plan.to_json(), summary=plan.summary())


def offline_prediction(path: str) -> dict:
    """predict()'s output for a plan made elsewhere (--plan-file): its own prediction, made
    for the cluster it was planned for."""
    plan = autopar.Plan.load(path)
    return _with_plan(
        {
            "predicted": {k: float(v) for k, v in plan.predicted.items()},
            "planning_s": None,
            "plan_file": path,
        },
        plan,
    )


@contextlib.contextmanager
def _quiet_solver():
    """HiGHS prints its banner on file descriptor 1: send it to stderr, keep stdout a report."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def start_predictions(tasks: list[dict], workers: int):
    """manual_plan predictions in `workers` processes (spawned: no CUDA state is inherited);
    returns a function that waits for them. workers=0: computed when waited for."""
    if workers <= 0 or not tasks:
        return lambda: [predict(t) for t in tasks]
    import concurrent.futures as cf
    import multiprocessing as mp

    pool = cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("spawn"))
    futures = [pool.submit(predict, t) for t in tasks]

    def wait():
        try:
            return [f.result() for f in futures]
        finally:
            pool.shutdown()

    return wait
