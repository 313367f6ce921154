"""Precision is one knob: `precision=` sets the compute dtype the cost model prices and the memory
it counts, whatever dtype the model was built in; its default follows the model's dtype."""

from __future__ import annotations

import json

import pytest
import torch

import autopar
from autopar.errors import AutoparError
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from autopar.plan import Plan
from autopar.precision import compute_view, resolve
from tests.helpers.models import datasheet

CONFIG = GPTConfig(vocab_size=256, seq_len=128, n_layer=2, n_head=8, d_model=512)


def gpt(dtype=torch.float32) -> GPT:
    with torch.device("meta"):
        return GPT(CONFIG).to(dtype)


def batch():
    x = torch.randint(0, CONFIG.vocab_size, (8, CONFIG.seq_len))
    return x, x.clone()


def hand_plan(model, precision=None) -> Plan:
    # datasheet H100s (no host time an op): a model this small would wait on the host otherwise
    cluster = datasheet(autopar.Cluster.preset("h100-80g", devices_per_node=4))
    return autopar.manual_plan(model, cluster,
                               batch(), loss_fn=lm_loss, tp=2, pp=1, dp=2, microbatch_size=4,
                               precision=precision)


def test_the_default_follows_the_models_dtype():
    assert resolve(None, gpt()).name == "fp32"
    assert resolve(None, gpt(torch.bfloat16)).name == "bf16-mixed"
    assert resolve("bf16-mixed", gpt()) == autopar.TrainingPrecision.mixed_bf16()
    with pytest.raises(AutoparError, match="float16.*loss scaling"):
        resolve(None, gpt(torch.float16))
    with pytest.raises(AutoparError, match="unknown precision 'bf16'.*fp32, bf16-mixed"):
        resolve("bf16", gpt())


def test_an_fp32_model_planned_bf16_mixed_is_the_bf16_models_plan():
    # the case: an fp32 model planned for mixed precision was priced at fp32 rates
    fp32_built = hand_plan(gpt(), "bf16-mixed")
    bf16_built = hand_plan(gpt(torch.bfloat16))  # its default: bf16-mixed
    assert fp32_built.to_json() == bf16_built.to_json()
    fp32 = hand_plan(gpt())
    assert fp32.precision["compute_dtype"] == "float32"
    assert fp32_built.precision == autopar.TrainingPrecision.mixed_bf16().to_dict()
    # priced in bf16: half the bytes of every memory-bound op, tensor-core matmuls (2.1x on
    # this small model, where the memory-bound ops weigh most)
    assert fp32_built.predicted["step_time_s"] < fp32.predicted["step_time_s"] / 2
    assert "precision  bf16-mixed: compute in bfloat16; 2 + 2 + 12" in fp32_built.summary()


def test_planning_leaves_the_users_model_as_it_was():
    model = GPT(CONFIG)  # real fp32 weights
    before = {k: (v, v.dtype, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    with compute_view(model, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 and p.is_meta for p in model.parameters())
        assert model.lm_head.weight is model.wte.weight  # still tied
    hand_plan(model, "bf16-mixed")
    for k, v in model.state_dict(keep_vars=True).items():
        obj, dtype, value = before[k]
        assert v is obj and v.dtype == dtype and torch.equal(v, value), k


def test_a_plan_file_without_precision_reads_as_fp32():
    d = json.loads(hand_plan(gpt()).to_json())
    del d["precision"]
    plan = Plan.from_dict(d)
    assert plan.precision == {}
    assert "precision  fp32: compute in float32; 4 + 4 + 8" in plan.summary()
    d["precision"] = {"compute_dtype": "int8"}
    with pytest.raises(ValueError, match="precision .* is not a TrainingPrecision"):
        Plan.from_dict(d)
