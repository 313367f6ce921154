"""Attention in the replay runtime runs the kernel torch picks for real tensors
(autopar/runtime/attention.py), not the one its selector picks while a layer is traced on
fakes: on an H100 that choice was the fp32 math fallback for HF ViT-1B, where eager ran cuDNN.

CPUs have no such fault to show (their selector agrees on fakes), so these tests pin the
mechanism: the choice is made on real tensors even inside a fake trace, the op that runs is
the one the choice names, and the replay runtime's graphs follow it.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from autopar.runtime import attention
from tests.helpers.distributed import run_on_ranks

aten = torch.ops.aten


def _qkv(shape=(2, 4, 17, 16)):
    g = torch.Generator().manual_seed(0)
    B, H, T, D = shape  # (batch, time, heads, dim) storage seen as (batch, heads, time, dim)
    return [torch.randn(B, T, H, D, generator=g).transpose(1, 2) for _ in range(3)]


def _ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_choice_is_made_on_real_tensors_inside_a_fake_trace():
    q, k, v = _qkv()
    want = int(torch._fused_sdp_choice(q, k, v))
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert attention.choice(fq, fk, fv, None, 0.0, False, None, False) == want
    meta = [t.to("meta") for t in (q, k, v)]
    assert attention.choice(*meta, None, 0.0, False, None, False) == attention.MATH


@pytest.mark.parametrize("chosen", [attention.FLASH, attention.MATH])
def test_the_op_that_runs_is_the_one_chosen(monkeypatch, chosen):
    monkeypatch.setattr(attention, "_choice", lambda *a: chosen)
    q, k, v = _qkv()
    ops = _ops(make_fx(lambda q, k, v: attention.attention(q, k, v, scale=0.25),
                       tracing_mode="fake")(q, k, v))
    flash = str(aten._scaled_dot_product_flash_attention_for_cpu.default)
    assert (flash in ops) == (chosen == attention.FLASH), ops
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(attention.attention(q, k, v, scale=0.25), want)


def replayed_attention_ops(chosen: int | None) -> list[str]:
    """On one rank: HF's tiny ViT through autoparallelize (replay runtime), one step, with
    the backend choice forced to `chosen` (None: torch's); the replayed graphs' ops."""
    import autopar
    from autopar.runtime import replay
    from tests.helpers.hf_models import hf_batch, hf_model
    from tests.helpers.models import fast_cpu_cluster

    if chosen is not None:
        attention._choice = lambda *a: chosen
    graphs = []
    as_is = replay._as_is
    replay._as_is = lambda gm, inputs: (graphs.append(gm), as_is(gm, inputs))[1]
    try:
        torch.manual_seed(0)
        model, batch = hf_model("vit", dropout_off=True), hf_batch("vit")
        pm = autopar.autoparallelize(model, fast_cpu_cluster(1), batch, mesh={"dp": 1})
        pm.train_step(batch)
    finally:
        replay._as_is = as_is
    return sorted({op for gm in graphs for op in _ops(gm)})


@pytest.mark.slow
def test_the_replay_runtime_runs_attention_as_chosen_for_real_tensors():
    """Without the runtime asking `attention`, both runs would replay the composite's own
    choice (the CPU flash kernel)."""
    flash = str(aten._scaled_dot_product_flash_attention_for_cpu.default)
    chosen, math = run_on_ranks(replayed_attention_ops, 1, None)[0], \
        run_on_ranks(replayed_attention_ops, 1, attention.MATH)[0]
    assert flash in chosen
    assert flash not in math and str(aten.bmm.default) in math, math


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_masks_give_the_composites_result(mask_dtype):
    """A boolean mask goes to the composite, which converts it per backend (HF's padding
    masks); a float mask is passed on as it is."""
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 17, 17, generator=torch.Generator().manual_seed(1)) > 0.3
    mask |= torch.eye(17, dtype=torch.bool)  # no row fully masked
    if mask_dtype is not torch.bool:
        mask = torch.zeros(mask.shape).masked_fill(~mask, -1e4)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention.attention(q, k, v, mask), want)


def test_each_layout_is_recorded_with_the_backend_chosen():
    """`attention.seen` is what benchmarks report as the kernel the replay ran."""
    attention.seen.clear()
    q, k, v = _qkv()
    attention.attention(q, k, v)
    (key, chosen), = attention.seen.items()
    shapes, strides, dtype, device, dropout, causal, mask = key
    assert shapes == (tuple(q.shape),) * 3 and strides == (q.stride(),) * 3
    assert (dtype, device, dropout, causal, mask) == ("torch.float32", "cpu", 0.0, False, False)
    assert chosen == int(torch._fused_sdp_choice(q, k, v))
    attention.attention(q, k, v, torch.ones(17, 17, dtype=torch.bool))
    assert attention.COMPOSITE in attention.seen.values()
