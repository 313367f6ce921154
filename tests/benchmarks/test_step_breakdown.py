"""benchmarks/step_breakdown.py: a profiled step's device time by category, beside the cost
model's. The measured side is checked on hand-made profiler events (CI has no GPU); the
predicted side on a tiny GPT's one-device plan, whose categories must add up to the plan's own
predicted step."""

from __future__ import annotations

import types

import pytest
import torch

import autopar
from autopar.models.losses import lm_loss
from autopar.planning.profile import TrainingPrecision
from benchmarks.lib.breakdown import (
    ACCUMULATE_RANGE,
    CATEGORIES,
    OPTIMIZER_RANGE,
    category,
    compare,
    measured,
    predictable,
    union_s,
)
from benchmarks.lib.models import meta_model, model_spec
from benchmarks.lib.predict import predicted_breakdown


@pytest.mark.parametrize(
    "op, want",
    [
        ("aten.mm.default", "matmul"),
        ("aten::addmm", "matmul"),
        ("aten.scaled_dot_product_attention.default", "attention"),
        ("aten::_cudnn_attention_backward", "attention"),
        ("aten.native_layer_norm.default", "norm"),
        ("aten::native_layer_norm_backward", "norm"),
        ("aten._log_softmax.default", "loss"),
        ("aten::_log_softmax_backward_data", "loss"),
        ("aten.embedding.default", "embedding"),
        ("aten::embedding_dense_backward", "embedding"),
        ("aten::copy_", "copy"),
        ("aten::cat", "copy"),
        ("aten::_foreach_copy_", "copy"),
        ("aten.split_with_sizes.default", "copy"),  # priced by its backward, a cat
        ("record_param_comms", "collective"),
        ("nccl:all_gather_into_tensor", "collective"),
        ("_c10d_functional::reduce_scatter_tensor", "collective"),
        ("aten::_fused_adamw_", "optimizer"),
        ("aten::_foreach_mul_", "optimizer"),
        ("aten::gelu_backward", "elementwise"),
        ("aten.add.Tensor", "elementwise"),
    ],
)
def test_each_op_falls_in_its_category(op, want):
    assert category(op) == want


def test_union_counts_overlapping_time_once():
    assert union_s([]) == 0
    assert union_s([(0, 10), (20, 30)]) == 20
    assert union_s([(0, 10), (5, 15), (12, 14)]) == 15  # overlap, and one inside another
    assert union_s([(20, 30), (0, 25)]) == 30  # order does not matter


# ---- measured, on events shaped as torch.profiler gives them --------------------------------


def _device(name, start, end, annotation=False):
    return types.SimpleNamespace(
        name=name,
        device_type=types.SimpleNamespace(name="CUDA"),
        time_range=types.SimpleNamespace(start=start, end=end),
        is_user_annotation=annotation,
        is_async=False,
    )


def _host(name, kernels, parent=None, start=0, end=0, thread=1):
    launched = [
        types.SimpleNamespace(name=k.name, duration=k.time_range.end - k.time_range.start)
        for k in kernels
    ]
    e = types.SimpleNamespace(
        name=name,
        device_type=types.SimpleNamespace(name="CPU"),
        kernels=launched,
        cpu_parent=parent,
        cpu_children=[],
        is_async=False,
        time_range=types.SimpleNamespace(start=start, end=end),
        thread=thread,
    )
    if parent is not None:
        parent.cpu_children.append(e)
    return e


def test_measured_attributes_each_kernel_once_and_counts_the_busy_union():
    mm = _device("gemm_kernel", 0, 100)
    nccl = _device("ncclDevKernel_AllGather", 50, 150)  # overlaps the matmul
    adam = _device("multi_tensor_apply_kernel", 200, 230)
    cast = _device("elementwise_kernel", 230, 240)
    acc = _device("add_kernel", 240, 245)
    # record_function ranges show on the device as annotations spanning their kernels, and
    # torch.profiler lists them among their host range's kernels: counting them would count
    # the optimizer's kernels twice
    opt_gpu = _device(OPTIMIZER_RANGE, 200, 240, annotation=True)
    opt = _host(OPTIMIZER_RANGE, [opt_gpu])
    events = [
        _host("aten::mm", [mm]),
        _host("record_param_comms", [nccl]),
        # the launch calls list the kernels they launched, as the ops that made them do
        _host("cudaLaunchKernel", [mm]),
        _host("Command Buffer Full", [adam]),
        opt,
        _host("aten::_fused_adamw_", [adam], parent=opt),
        _host("aten::copy_", [cast], parent=opt),  # the optimizer's casts: its category
        _host("aten::add_", [acc], parent=_host(ACCUMULATE_RANGE, [])),  # into .grad
        mm,
        nccl,
        adam,
        cast,
        acc,
        opt_gpu,
    ]
    prof = types.SimpleNamespace(events=lambda: events)
    m = measured(prof, steps=2)
    us = 1e-6 / 2
    assert m["kernels_s"] == pytest.approx(245 * us)  # 100 + 100 + 30 + 10 + 5, no annotation
    assert m["busy_s"] == pytest.approx(195 * us)  # 0..150 and 200..245
    by = m["by_category"]
    assert set(by) == set(CATEGORIES)
    assert by["matmul"] == pytest.approx(100 * us)
    assert by["collective"] == pytest.approx(100 * us)
    assert by["optimizer"] == pytest.approx(40 * us)
    assert by["accumulate"] == pytest.approx(5 * us)
    assert sum(by.values()) == pytest.approx(m["kernels_s"])
    assert m["unattributed_s"] == 0


def test_a_kernel_no_op_launched_is_unattributed():
    k = _device("some_kernel", 0, 10)
    prof = types.SimpleNamespace(events=lambda: [k])
    m = measured(prof, steps=1)
    assert m["unattributed_s"] == pytest.approx(10e-6)
    assert sum(m["by_category"].values()) == 0


# ---- predicted -----------------------------------------------------------------------------


def _plan(device: str, batch: int = 4, seq: int = 32):
    spec = model_spec("gpt-1.3b", True, seq)
    model = meta_model(spec, torch.bfloat16)
    x = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    cluster = autopar.Cluster.preset(device, devices_per_node=1)
    plan = autopar.plan(
        model, cluster, (x, x.clone()), loss_fn=lm_loss, precision=TrainingPrecision.mixed_bf16()
    )
    return spec, plan


_CTX = types.SimpleNamespace(dtype=torch.bfloat16, loss=lm_loss)


@pytest.mark.parametrize(
    "device, batch, seq, host_bound",
    [("h100-80g", 1024, 2048, False), ("h200-141g", 4, 32, True)],
)
def test_predicted_categories_add_up_to_the_plans_predicted_step(device, batch, seq, host_bound):
    """The same cost model, op by op: the categories are the plan's step, split. A calibrated
    device with a measured host time per op also charges the host's time to issue the ops
    where it is longer than the device's: that is `host_bound_s`. On 4 x 32 tokens this tiny
    model is host-bound (h200; the h100 too: 6.2 ms of its 7.2 ms step); on 1024 x 2048 every
    layer's device time on the h100 is longer than its host's, so it charges none (at
    256 x 2048 it still charged 0.17 ms, at 512 x 2048 none)."""
    spec, plan = _plan(device, batch, seq)
    assert predictable(plan) is None
    out = predicted_breakdown(_CTX, spec, plan.to_json(), batch, seq)
    by = out["by_category"]
    assert set(by) == set(CATEGORIES)
    assert by["matmul"] > 0 and by["attention"] > 0 and by["optimizer"] > 0
    assert by["collective"] == 0  # one device
    step = plan.predicted["step_time_s"]
    assert (out["host_bound_s"] > 1e-9 * step) == host_bound
    assert sum(by.values()) + out["host_bound_s"] == pytest.approx(step, rel=1e-6)


def _manual(devices: int, **config):
    """A hand configuration of the tiny GPT on `devices` H100s, batch 4 of 32 tokens."""
    spec = model_spec("gpt-1.3b", True, 32)
    x = torch.zeros(4, 32, dtype=torch.long, device="meta")
    plan = autopar.manual_plan(
        meta_model(spec, torch.bfloat16),
        autopar.Cluster.preset("h100-80g", devices_per_node=devices),
        (x, x.clone()),
        loss_fn=lm_loss,
        dp=1,
        pp=1,
        precision=TrainingPrecision.mixed_bf16(),
        **config,
    )
    return spec, plan


def test_a_plan_with_tensor_parallelism_is_not_split_by_category():
    spec, plan = _manual(2, tp=2, microbatch_size=4)
    assert "splits ops" in predictable(plan)
    assert "error" in predicted_breakdown(_CTX, spec, plan.to_json(), 4, 32)
    piped = types.SimpleNamespace(mesh={"pp": 2, "dp": 1}, pipeline={"num_microbatches": 4})
    assert "splits ops over {'pp': 2}" in predictable(piped)
    accumulating = types.SimpleNamespace(mesh={"pp": 1, "dp": 2}, pipeline={"num_microbatches": 4})
    assert predictable(accumulating) is None  # gradient accumulation: the same graph, 4 times


def test_the_table_shows_measured_beside_predicted_and_the_idle_time():
    by = dict.fromkeys(CATEGORIES, 0.0)
    row = {
        "model": "gpt",
        "system": "autopar",
        "gpus": 1,
        "measured_step_s": 0.3,
        "predicted_step_s": 0.25,
        "profile": {
            "device": {
                "kernels_s": 0.28,
                "busy_s": 0.27,
                "unattributed_s": 0.0,
                "by_category": dict(by, matmul=0.28),
            }
        },
        "predicted_breakdown": {"by_category": dict(by, matmul=0.25)},
    }
    text = compare(row)
    assert "matmul" in text and "280.0" in text and "250.0" in text
    idle = next(line for line in text.splitlines() if line.startswith("idle"))
    assert idle.split()[1] == "30.0"  # step 300 ms less 270 ms busy
    assert "no device breakdown" in compare({"model": "gpt", "system": "eager"})


def test_each_idle_gap_goes_to_the_host_event_that_overlaps_it_most():
    kernels = [(0, 10), (30, 40), (35, 50), (100, 110)]  # idle: 10..30 and 50..100
    opt = _host(OPTIMIZER_RANGE, [], start=5, end=28)  # covers most of the first gap
    cast = _host("aten::copy_", [], parent=opt, start=12, end=27)
    other = _host("aten::add", [], start=0, end=11, thread=2)  # another thread, barely in it
    settle = _host("settle", [], start=60, end=70, thread=2)
    events = [opt, cast, other, settle] + [_device("k", a, b) for a, b in kernels]
    out = measured(types.SimpleNamespace(events=lambda: events), steps=1)
    assert out["idle_gaps_per_step"] == 2
    idle = out["idle_by_host_s"]
    assert idle["outer"] == pytest.approx({OPTIMIZER_RANGE: 20e-6, "settle": 50e-6})
    assert idle["leaf"] == pytest.approx({"aten::copy_": 20e-6, "settle": 50e-6})
    assert sum(idle["outer"].values()) == pytest.approx(
        union_s([(10, 30), (50, 100)]) * 1e-6
    )  # every idle microsecond, once


def test_a_gap_no_host_event_overlaps_is_said_so():
    events = [_device("k", 0, 10), _device("k", 20, 30)]
    out = measured(types.SimpleNamespace(events=lambda: events), steps=1)
    assert out["idle_by_host_s"]["outer"] == pytest.approx({"(no host event)": 10e-6})


def test_gradient_accumulation_is_priced_once_per_microbatch():
    spec, plan = _manual(1, tp=1, microbatch_size=2)
    assert plan.pipeline["num_microbatches"] == 2
    out = predicted_breakdown(_CTX, spec, plan.to_json(), 4, 32)
    # one add of the second microbatch's gradients, one division: 5 passes over them
    assert (
        out["by_category"]["accumulate"] == pytest.approx(plan.predicted["gradient_accumulation_s"])
        and out["by_category"]["accumulate"] > 0
    )
    assert sum(out["by_category"].values()) + out["host_bound_s"] == pytest.approx(
        plan.predicted["step_time_s"], rel=1e-6
    )
