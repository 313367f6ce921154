"""The search weighs expert parallelism against replicated and tensor-parallel experts and picks
ep's size (`autopar.plan`, no mesh given): a Switch Transformer of 32 experts on one node of
four H100s, under a memory limit that data parallelism, even fully sharded (ZeRO-3), goes over,
plans experts split over ep, at least as fast as the hand configuration ep=4."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autopar
from autopar.models import registry
from autopar.models.switch import SwitchTransformer

LIMIT = 3400 * 2**20  # bytes per device


def _switch():
    family, cfg = registry.entry("switch-test")
    cfg = dataclasses.replace(cfg, vocab_size=1024, d_model=1024, d_ff=4096, n_head=16, d_kv=64,
                              n_experts=32, seq_len=256, target_len=128)
    with torch.device("meta"):
        model = SwitchTransformer(cfg)
    return model, family.batch(cfg, 32), family.loss


@pytest.mark.slow
def test_the_search_picks_expert_parallelism_where_memory_binds():
    model, batch, loss_fn = _switch()
    cluster = autopar.Cluster.preset("h100-80g", devices_per_node=4)

    def hand(**mesh):
        return autopar.manual_plan(model, cluster, batch, loss_fn=loss_fn, pp=1, tp=1,
                                   microbatch_size=8, **{"dp": 1, **mesh})

    fsdp, ep4 = hand(dp=4, zero=3), hand(ep=4)
    assert fsdp.predicted["peak_memory_bytes"] > LIMIT  # data parallelism does not fit
    assert ep4.predicted["peak_memory_bytes"] <= LIMIT
    plan = autopar.plan(model, cluster, batch, loss_fn=loss_fn, memory_limit=LIMIT)
    assert plan.mesh.get("ep", 1) > 1, plan.mesh
    assert plan.predicted["peak_memory_bytes"] <= LIMIT
    assert plan.predicted["step_time_s"] <= ep4.predicted["step_time_s"] * (1 + 1e-9)
    # the experts are split over ep in the plan the search returns
    ep = list(plan.mesh).index("ep")
    assert all(pl[ep] == "S(0)" for fqn, pl in plan.parameters.items()
               if fqn.endswith((".wi", ".wo")))
