"""A weight two layers read (GPT's token embedding, which is also its output head) is one tensor
on a rank that holds both readers and one tensor on each pipeline rank that holds one of them,
as the runtimes hold it: the memory model counts it that way, and the stage-cut problem of one
stage charges it once."""

from __future__ import annotations

import functools

import pytest
import torch

import autopar
from autopar.models.registry import build_model
from autopar.planning.candidate import Candidate, evaluate, pipeline_problem
from autopar.planning.layer_costs import layer_costs, prepare, solve_layers
from autopar.planning.profile import TrainingPrecision
from autopar.trace import trace_for_training

SUB_MESH = {"dp": 1, "tp": 1}
FP32 = TrainingPrecision()  # 4 bytes a parameter, as much again for its gradient, 8 for Adam


@functools.cache
def _gpt_small():
    with torch.device("meta"):
        model, example, loss_fn = build_model("gpt-small", batch=2, seq=64)
    traced = trace_for_training(model, example, loss_fn)
    stand, profiles = prepare(traced)
    cluster = autopar.Cluster.preset("h100-80g", nodes=1, devices_per_node=2)
    solved = solve_layers(stand, profiles, cluster, SUB_MESH, precision=FP32)
    costs = layer_costs(stand, profiles, cluster, SUB_MESH, "replicate", precision=FP32,
                        solved=solved)
    params = sum(p.numel() for p in model.parameters())  # the tied weight once
    return costs, cluster, params, model.wte.weight.numel()


def _candidate(costs, stages):
    return Candidate(mesh={"pp": len(stages), **SUB_MESH}, microbatch_size=2,
                     num_microbatches=2, schedule="1F1B", v=1, flavour="replicate",
                     stages=stages, options={x.name: "none" for x in costs.layers}, costs=costs)


def test_gpt_is_priced_with_its_tied_embedding_once_on_one_device():
    costs, _, params, _ = _gpt_small()
    cluster = autopar.Cluster.preset("h100-80g", nodes=1, devices_per_node=1)
    assert len(costs.tied) == 1  # the embedding and the head read one weight
    order = tuple(x.name for x in costs.layers)
    one = evaluate(_candidate(costs, (order,)), cluster)
    assert one.rank_memory[0]["parameters"] == 4 * params
    assert one.rank_memory[0]["optimizer"] == 8 * params
    # the one-stage cut problem charges the same state
    problem = pipeline_problem(costs, cluster, 1, 2, "1F1B", 1, float("inf"))
    assert sum(x.state_bytes for x in problem.layers) == pytest.approx(16 * params)


def test_each_pipeline_rank_holds_its_own_copy():
    costs, cluster, params, tied = _gpt_small()
    order = tuple(x.name for x in costs.layers)
    half = len(order) // 2
    two = evaluate(_candidate(costs, (order[:half], order[half:])), cluster)
    held = [r["parameters"] for r in two.rank_memory]
    assert sum(held) == 4 * (params + tied)  # the embedding on the first, the head on the last
    assert all(h > 4 * tied for h in held)
