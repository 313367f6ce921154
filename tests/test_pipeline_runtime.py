"""Pipeline stages on gloo against single-process training, step by step.

Plans here are made by hand (the intra-op plan of one microbatch, then an even cut of the
layers), so that these tests check the runtime alone, whatever the planner would choose.
"""

from __future__ import annotations

import math

import pytest
import torch

from autopar.compile import make_mesh
from autopar.layers import assign_layers, layer_order
from autopar.pipeline_runtime import PipelinedModel
from autopar.planner import make_plan
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


def pipelined_plan(model, batch, *, pp, sub_mesh, microbatches, schedule, v=1, checkpoint=None):
    """The planner's sharding of one microbatch on the dp x tp submesh, cut evenly into
    pp * v stages (stage s on pp rank s % pp)."""
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
    return traced, plan


def train_pipelined(model_name, batch_size, config):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = batches(batch_size)
    traced, plan = pipelined_plan(model, data[0], **config)
    pm = PipelinedModel(model, traced, plan, make_mesh(plan))
    return sgd_losses(pm.parameters(), pm.train_step, data)


CASES = {
    "gpt-pp2xdp2-1F1B": ("gpt", 4, dict(pp=2, sub_mesh={"dp": 2}, microbatches=2,
                                        schedule="1F1B")),
    "llama-pp2xtp2-1F1B-checkpoint": ("llama", 4, dict(
        pp=2, sub_mesh={"tp": 2}, microbatches=2, schedule="1F1B",
        checkpoint={"layers.0": "full", "layers.1": "full"})),
    "llama-pp2xdp2-interleaved": ("llama", 4, dict(pp=2, sub_mesh={"dp": 2}, microbatches=2,
                                                   schedule="Interleaved1F1B", v=2)),
    "gpt-pp2xdp2xtp2-1F1B": ("gpt", 4, dict(pp=2, sub_mesh={"dp": 2, "tp": 2}, microbatches=2,
                                            schedule="1F1B")),
    "llama-pp4xdp2-1F1B": ("llama", 8, dict(pp=4, sub_mesh={"dp": 2}, microbatches=4,
                                            schedule="1F1B")),
    "gpt-pp2xtp4-GPipe-checkpoint": ("gpt", 4, dict(pp=2, sub_mesh={"tp": 4}, microbatches=2,
                                                    schedule="GPipe",
                                                    checkpoint={"blocks.0": "full"})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_losses_match_single_process(case):
    model_name, batch_size, config = CASES[case]
    world = config["pp"] * math.prod(config["sub_mesh"].values())
    results = run_on_ranks(train_pipelined, world, model_name, batch_size, config)
    for losses in results:  # the same loss on every rank, each step
        assert losses == results[0]
    assert results[0] == pytest.approx(reference_losses(model_name, batch_size), rel=1e-5)


def train_manual_pipeline(model_name, zero):
    """A hand configuration from autopar.manual_plan, run through autoparallelize."""
    import autopar

    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = batches(4)
    cluster = fast_cpu_cluster(4)
    plan = autopar.manual_plan(model, cluster, data[0], loss_fn=lm_loss, tp=1, pp=2, dp=2,
                               microbatch_size=1, schedule="1F1B", zero=zero)
    pm = autopar.autoparallelize(model, cluster, data[0], loss_fn=lm_loss, plan=plan)
    return sgd_losses(pm.parameters(), pm.train_step, data), plan.data_parallel


@pytest.mark.parametrize("zero", [0, 3])
def test_manual_pipeline_plan_runs_through_autoparallelize(zero):
    results = run_on_ranks(train_manual_pipeline, 4, "gpt", zero)
    losses, flavour = results[0]
    assert flavour == ("zero3" if zero == 3 else "replicate")
    assert losses == pytest.approx(reference_losses("gpt", 4), rel=1e-5)
