"""The `autopar` system: the model made parallel by `autopar.autoparallelize` as a plan says,
bf16 parameters and gradients, AdamW on fp32 master copies of the local shards."""

from __future__ import annotations

import json

import torch

import autopar
from benchmarks.lib.built import Built
from benchmarks.lib.distributed import Ctx
from benchmarks.lib.models import ModelSpec
from benchmarks.lib.optim import MasterAdamW, fused_on, optimizer_step
from benchmarks.lib.systems import System


def build_autopar(ctx: Ctx, spec: ModelSpec, system: System, plan_json: str, example) -> Built:
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    model = spec.build(ctx.device, torch.float32).to(ctx.dtype)
    pm = autopar.autoparallelize(
        model,
        autopar.Cluster.from_dict(plan.cluster),
        example_inputs=example,
        loss_fn=ctx.loss,
        plan=plan,
        runtime=ctx.args.runtime,
    )
    del model
    opt = MasterAdamW(pm.parameters(), fused=fused_on(ctx.device))

    def step(x, y):
        loss = pm.train_step(x, y)
        optimizer_step(opt)
        opt.zero_grad()
        return loss

    info = {
        "plan": _plan_brief(plan),
        "graph_ops": len(plan.ops),
        "runtime": ctx.args.runtime,
        "plan_memory_limit_bytes": (
            ctx.args.memory_limit_gib * 2**30 if ctx.args.memory_limit_gib else None
        ),
    }
    return Built(step, dp_rank=0, dp=1, info=info, keep=[pm, opt])  # train_step takes it all


def _plan_brief(plan) -> dict:
    pipe = plan.pipeline or {}
    return {
        "mesh": dict(plan.mesh),
        "data_parallel": plan.data_parallel,
        "schedule": pipe.get("schedule"),
        "microbatch_size": pipe.get("microbatch_size"),
        "num_microbatches": pipe.get("num_microbatches"),
        "checkpoint": _count_values(plan.checkpoint or {}),
    }


def _count_values(d: dict) -> dict:
    out: dict = {}
    for v in d.values():
        out[v] = out.get(v, 0) + 1
    return out
