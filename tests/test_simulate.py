"""simulate(plan) reads the plan alone: the same report after a JSON round trip."""

from __future__ import annotations

import json

import pytest

import autopar
from autopar.models.losses import lm_loss
from tests.helpers.models import SEARCH_BATCH as BATCH


def test_report_fields_and_round_trip(gpt_on_four_h100s, tmp_path):
    model, batch, cluster = gpt_on_four_h100s
    plan = autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, tp=2, pp=2, dp=1,
                               microbatch_size=2)
    path = tmp_path / "p.json"
    plan.save(path)
    r = autopar.simulate(autopar.Plan.load(path))
    assert r == autopar.simulate(plan)
    assert r.samples_per_s == pytest.approx(BATCH / r.step_time_s)
    assert r.tokens_per_s == pytest.approx(BATCH * 16 / r.step_time_s)
    assert 0 < r.mfu < 1
    assert r.tflops_per_gpu == pytest.approx(r.flops_per_step / r.step_time_s / 4 / 1e12)
    assert r.bubble_fraction == pytest.approx(1 / 5)  # 1F1B, pp=2, m=4: (p-1)/(m+p-1)
    assert r.peak_memory_bytes == pytest.approx(sum(r.memory_bytes.values()))
    assert set(r.communication_s) == {"pp", "dp", "tp"}
    json.dumps(r.__dict__)


def test_intra_op_only_plan_is_refused_clearly():
    from tests.helpers.plans import sample_plan

    with pytest.raises(ValueError, match="re-plan"):
        autopar.simulate(sample_plan())
