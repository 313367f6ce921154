"""manual_plan: hand configurations as plans, and clear errors for shapes that do not divide."""

from __future__ import annotations

import pytest

import autopar
from autopar.models.losses import lm_loss
from tests.helpers.models import SEARCH_BATCH as BATCH
from tests.helpers.models import free_host


def manual(gpt_on_four_h100s, **kw):
    model, batch, cluster = gpt_on_four_h100s
    args = dict(tp=1, pp=2, dp=2, microbatch_size=1) | kw
    return autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, **args)


def test_even_stages_checkpoint_and_zero(gpt_on_four_h100s):
    plan = manual(gpt_on_four_h100s, checkpoint="full", zero=3)
    assert [st["layers"] for st in plan.pipeline["stages"]] == [
        ["pre", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3", "post"]]
    assert plan.checkpoint == {f"blocks.{i}": "full" for i in range(4)}
    assert plan.data_parallel == "zero3"
    assert any(p[0].startswith("S(") for p in plan.parameters.values())
    none = manual(gpt_on_four_h100s, zero=0)
    assert none.data_parallel == "replicate"
    rz, rn = autopar.simulate(plan), autopar.simulate(none)
    assert rz.memory_bytes["optimizer"] < rn.memory_bytes["optimizer"]
    assert rz.memory_bytes["activations"] < rn.memory_bytes["activations"]


def test_heads_that_tp_cannot_divide(gpt_on_four_h100s):
    with pytest.raises(autopar.MeshError, match=r"tp=8 does not divide the 4 attention heads"):
        model, batch, _ = gpt_on_four_h100s
        autopar.manual_plan(model, autopar.Cluster.preset("h100-80g"), batch, loss_fn=lm_loss,
                            tp=8, pp=1, dp=1, microbatch_size=BATCH)


def test_batch_that_microbatch_cannot_divide(gpt_on_four_h100s):
    with pytest.raises(autopar.MeshError, match="microbatch sizes that divide 4 per rank: 1, 2, 4"):
        manual(gpt_on_four_h100s, microbatch_size=3)


def test_more_stages_than_layers(gpt_on_four_h100s):
    model, batch, _ = gpt_on_four_h100s
    cluster = autopar.Cluster.preset("h100-80g", nodes=1)
    with pytest.raises(autopar.MeshError, match="use pp <= 6"):
        autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, tp=1, pp=8, dp=1,
                            microbatch_size=1)


@pytest.mark.slow
def test_selective_checkpointing(gpt_on_four_h100s):
    # on a free host: on the calibrated H100 these small layers' recomputation costs the
    # host's time to issue them, "selective" and "full" alike
    model, batch, cluster = gpt_on_four_h100s
    case = (model, batch, free_host(cluster))
    plan = manual(case, checkpoint="selective")
    assert set(plan.checkpoint.values()) == {"selective"}
    full = manual(case, checkpoint="full")
    none = manual(case)
    # keeps more than "full" and recomputes less; keeps less than no checkpointing
    mem = lambda p: p.predicted["memory_activations_bytes"]  # noqa: E731
    assert mem(full) < mem(plan) < mem(none)
    assert none.predicted["step_time_s"] < plan.predicted["step_time_s"] < \
        full.predicted["step_time_s"]
