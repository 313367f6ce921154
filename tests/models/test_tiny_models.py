"""The test-sized model of every family: it traces on meta and on CPU, trains a step on CPU, and
plans for a node of eight H100s; and the properties each architecture promises (Switch's
routing with no data-dependent shape, Swin's masks as buffers, T5's one position table per
stack, BERT's equal number of masked tokens per sequence)."""

from __future__ import annotations

import math

import pytest
import torch

from autopar.errors import AutoparError
from autopar.models.registry import BUILTIN_MODELS, build_model
from autopar.models.switch import SwitchConfig, SwitchFFN
from autopar.trace import trace_for_training

# one per family
TINY = ["gpt-tiny", "llama-test", "palm-test", "bert-test", "t5-test", "switch-test", "mixtral-test",
        "vit-test", "swin-test"]
BATCH = 4


def build(name: str, device: str):
    torch.manual_seed(0)
    with torch.device(device):
        return build_model(name, batch=BATCH, seq=None)


def as_args(inputs) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def test_every_family_has_a_tiny_model():
    assert {BUILTIN_MODELS[name].family.name for name in TINY} == {
        entry.family.name for entry in BUILTIN_MODELS.values()}


@pytest.mark.parametrize("name", TINY)
def test_traces_on_meta(name):
    model, batch, loss_fn = build(name, "meta")
    traced = trace_for_training(model, batch, loss_fn)
    assert traced.node(traced.loss_node).meta["val"].numel() == 1


@pytest.mark.parametrize("name", TINY)
def test_traces_and_trains_a_step_on_cpu(name):
    model, batch, loss_fn = build(name, "cpu")
    trace_for_training(model, batch, loss_fn)
    inputs, target = batch
    loss = loss_fn(model(*as_args(inputs)), target)
    loss.backward()
    assert math.isfinite(loss.item())
    for fqn, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), fqn


class TestSeq:
    def test_sets_both_lengths_of_an_encoder_decoder(self):
        with torch.device("meta"):
            _, ((x, dec), y), _ = build_model("t5-test", batch=2, seq=8)
        assert x.shape == dec.shape == y.shape == (2, 8)

    def test_is_an_error_for_an_image_model(self):
        with pytest.raises(AutoparError, match="vit-test is an image model .* drop --seq"):
            build_model("vit-test", batch=2, seq=8)

    def test_longer_than_bert_positions(self):
        with pytest.raises(ValueError, match="exceeds its 32 learned positions"):
            build_model("bert-test", batch=2, seq=64)


class TestSwitchRouting:
    CFG = SwitchConfig(d_model=8, d_ff=16, n_experts=4, capacity_factor=1.0, aux_loss_coef=0.01)

    def test_tokens_over_capacity_pass_through(self):
        torch.manual_seed(0)
        ffn = SwitchFFN(self.CFG)
        with torch.no_grad():  # every token prefers expert 2
            ffn.router.weight.zero_()
            ffn.router.weight[2] = 1.0
        x = torch.rand(2, 8, 8) + 0.1  # (B, T, C): capacity ceil(8 / 4) = 2 per sequence
        y, aux = ffn(x)
        kept = y.abs().sum(-1) > 0  # (B, T)
        assert kept.tolist() == [[True, True] + [False] * 6] * 2  # the first two of each group
        # all tokens on one expert: f = (0, 0, 1, 0), P_2 the largest probability
        p2 = torch.softmax(ffn.router(x), -1)[..., 2].mean(1)
        assert aux.item() == pytest.approx(0.01 * 4 * p2.mean().item(), rel=1e-5)

    def test_exports_with_no_data_dependent_op(self):
        model, batch, loss_fn = build("switch-test", "meta")
        traced = trace_for_training(model, batch, loss_fn)
        ops = {str(n.target) for n in traced.graph_module.graph.nodes if n.op == "call_function"}
        assert not {op for op in ops if "nonzero" in op or "masked_select" in op}
        assert "aten.cumsum.default" in ops


def test_swin_shift_masks_are_buffers_of_the_shifted_blocks():
    model, _, _ = build("swin-test", "cpu")
    masks = {fqn for fqn, _ in model.named_buffers() if fqn.endswith("attn_mask")}
    # 16 x 16 tokens, windows of 4: stages of 16 and 8 shift (blocks 1 and 4); 4 and 2 do not
    assert masks == {"blocks.1.attn_mask", "blocks.4.attn_mask"}
    mask = model.blocks[1].attn_mask  # (windows, N, N)
    assert mask.shape == (16, 16, 16) and set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # the first window is whole after the roll


def test_t5_position_tables_in_each_stacks_first_block_only():
    model, _, _ = build("t5-test", "meta")
    tables = [fqn for fqn, _ in model.named_parameters() if "position_bias" in fqn]
    assert tables == ["encoder.0.position_bias.embedding.weight",
                      "decoder.0.position_bias.embedding.weight"]


def test_bert_masks_as_many_tokens_in_every_sequence():
    _, ((input_ids, _), labels), _ = build("bert-test", "cpu")
    masked = labels != -100
    assert masked.sum(1).tolist() == [2] * BATCH  # 15% of 16 tokens
    assert (input_ids[masked] == 103).all()
