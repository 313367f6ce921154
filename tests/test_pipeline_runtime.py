"""Pipeline stages on gloo against single-process training, step by step.

Plans here are made by hand (the intra-op plan of one microbatch, then an even cut of the
layers), so that these tests check the runtime alone, whatever the planner would choose.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from autopar.compile import make_mesh
from autopar.layers import assign_layers, layer_order
from autopar.pipeline_runtime import PipelinedModel
from autopar.plan import Plan
from autopar.planner import make_plan
from autopar.search import _shard_parameters_over_dp
from autopar.trace import trace
from tests.helpers.distributed import run_on_ranks
from tests.test_end_to_end import (
    MODELS,
    batches,
    fast_cpu_cluster,
    lm_loss,
    reference_losses,
    sgd_losses,
)


def pipelined_plan(model, batch, *, pp, sub_mesh, microbatches, schedule, v=1, checkpoint=None,
                   zero=0):
    """The planner's sharding of one microbatch on the dp x tp submesh, cut evenly into
    pp * v stages (stage s on pp rank s % pp); with zero=3 parameters sharded over dp."""
    x, y = batch
    mb = x.shape[0] // microbatches
    traced = trace(model, (x[:mb],), loss_fn=lm_loss, target=y[:mb])
    sub_size = math.prod(sub_mesh.values())
    plan = make_plan(traced, fast_cpu_cluster(sub_size), mesh=sub_mesh)
    plan.mesh = {"pp": pp, **sub_mesh}
    plan.cluster = fast_cpu_cluster(pp * sub_size).to_dict()
    layers = layer_order(assign_layers(traced))
    n = pp * v
    cuts = [layers[i * len(layers) // n : (i + 1) * len(layers) // n] for i in range(n)]
    plan.pipeline = {
        "schedule": schedule,
        "stages_per_rank": v,
        "microbatch_size": mb,
        "num_microbatches": microbatches,
        "stages": [{"rank": s % pp, "layers": cuts[s]} for s in range(n)],
    }
    plan.checkpoint = dict(checkpoint or {})
    if zero:
        plan.data_parallel = "zero3"
        _shard_parameters_over_dp(plan, traced, sub_mesh)
    return traced, plan


def train_pipelined(model_name, batch_size, plan_json):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = batches(batch_size)
    plan = Plan.from_dict(json.loads(plan_json))
    mb = plan.pipeline["microbatch_size"]
    x, y = data[0]
    traced = trace(model, (x[:mb],), loss_fn=lm_loss, target=y[:mb])
    pm = PipelinedModel(model, traced, plan, make_mesh(plan))
    return sgd_losses(pm.parameters(), pm.train_step, data)


def plan_json(model_name, batch_size, config) -> str:
    """Planned once here, not on every rank (8 ranks planning at once on 2 cores is slow)."""
    torch.manual_seed(0)
    _, plan = pipelined_plan(MODELS[model_name](), batches(batch_size)[0], **config)
    return plan.to_json()


# The three 8-rank meshes of the planner issue, each with GPT and Llama; between them 1F1B,
# Interleaved1F1B and GPipe, with and without checkpointing (full and selective), replicated and
# ZeRO-3 (FSDP) dp.
CASES = {
    "gpt-pp2xdp2xtp2-interleaved-zero3": ("gpt", 4, dict(
        pp=2, sub_mesh={"dp": 2, "tp": 2}, microbatches=2, schedule="Interleaved1F1B", v=2,
        zero=3)),
    "llama-pp2xdp2xtp2-1F1B-checkpoint": ("llama", 4, dict(
        pp=2, sub_mesh={"dp": 2, "tp": 2}, microbatches=2, schedule="1F1B",
        checkpoint={"layers.0": "full", "layers.1": "selective"})),
    "gpt-pp4xdp2-1F1B-checkpoint": ("gpt", 8, dict(
        pp=4, sub_mesh={"dp": 2}, microbatches=4, schedule="1F1B",
        checkpoint={"blocks.0": "selective", "blocks.1": "full"})),
    "llama-pp4xdp2-1F1B-zero3": ("llama", 8, dict(
        pp=4, sub_mesh={"dp": 2}, microbatches=4, schedule="1F1B", zero=3)),
    "gpt-pp2xtp4-GPipe-checkpoint": ("gpt", 4, dict(
        pp=2, sub_mesh={"tp": 4}, microbatches=2, schedule="GPipe",
        checkpoint={"blocks.0": "full"})),
    "llama-pp2xtp4-interleaved": ("llama", 4, dict(
        pp=2, sub_mesh={"tp": 4}, microbatches=2, schedule="Interleaved1F1B", v=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_losses_match_single_process(case):
    model_name, batch_size, config = CASES[case]
    world = config["pp"] * math.prod(config["sub_mesh"].values())
    assert world == 8
    results = run_on_ranks(train_pipelined, world, model_name, batch_size,
                           plan_json(model_name, batch_size, config))
    for losses in results:  # the same loss on every rank, each step
        assert losses == results[0]
    assert results[0] == pytest.approx(reference_losses(model_name, batch_size), rel=1e-5)


def train_manual_pipeline(model_name, zero, pp):
    """A hand configuration from autopar.manual_plan, run through autoparallelize."""
    import autopar

    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = batches(4)
    cluster = fast_cpu_cluster(4 // (3 - pp))  # pp 2 x dp 2, or pp 1 x dp 2
    plan = autopar.manual_plan(model, cluster, data[0], loss_fn=lm_loss, tp=1, pp=pp, dp=2,
                               microbatch_size=1, schedule="1F1B", zero=zero)
    pm = autopar.autoparallelize(model, cluster, data[0], loss_fn=lm_loss, plan=plan)
    return sgd_losses(pm.parameters(), pm.train_step, data), plan.data_parallel, plan.pipeline


@pytest.mark.parametrize("zero, pp", [(0, 2), (3, 2), (2, 1)])
def test_manual_pipeline_plan_runs_through_autoparallelize(zero, pp):
    """pp = 1 with two microbatches per step is gradient accumulation, run by the same
    pipeline runtime on a mesh whose pp axis has size 1."""
    results = run_on_ranks(train_manual_pipeline, pp * 2, "gpt", zero, pp)
    losses, flavour, pipeline = results[0]
    assert flavour == {0: "replicate", 2: "zero2", 3: "zero3"}[zero]
    assert pipeline["num_microbatches"] == 2 and len(pipeline["stages"]) == pp
    assert losses == pytest.approx(reference_losses("gpt", 4), rel=1e-5)
