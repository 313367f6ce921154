"""Layers found by structure (autopar/layers.py): the innermost element of a module list of one
class that runs as a chain; ops outside every stack before, between and after; contiguous layers;
and the values each cut between layers carries (the layer DAG's cut, not the last output)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from autopar.layers import assign_layers, block_of, crossing, layer_order
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from autopar.models.registry import build_model
from autopar.trace import trace, trace_for_training
from tests.helpers.hf_models import hf_batch, hf_model


def _lm(model, batch=2, seq=8, vocab=128):
    x = torch.randint(0, vocab, (batch, seq))
    return trace_for_training(model, (x, x.clone()), lm_loss)


@functools.cache
def _hf(model_type):
    with torch.device("meta"):
        model = hf_model(model_type)
    return trace(model, hf_batch(model_type))


def test_gpt_layers_are_its_blocks():
    traced = _lm(GPT(GPTConfig(vocab_size=128, seq_len=8, n_layer=3, n_head=2, d_model=16)))
    assert layer_order(assign_layers(traced)) == ["pre", "blocks.0", "blocks.1", "blocks.2",
                                                  "post"]
    # a chain: each cut carries one value, the block's output
    assert [len(c) for c in crossing(traced)] == [1, 1, 1, 1, 0]


def test_t5_layers_are_each_encoder_and_decoder_block():
    traced = _hf("t5")
    order = layer_order(assign_layers(traced))
    assert order == ["pre", "encoder.block.0", "encoder.block.1", "between.0",
                     "decoder.block.0", "decoder.block.1", "post"]
    # `block.0.layer` (self-attention, feed-forward) is no stack: its classes differ
    assert block_of(traced.node(next(n for n, x in assign_layers(traced).items()
                                     if x == "encoder.block.1")), traced) == "encoder.block.1"


@pytest.mark.parametrize("model_type", ["t5"])
def test_a_cut_in_the_decoder_carries_the_encoder_output(model_type):
    """Every decoder block reads the encoder's output: a cut between two decoder blocks sends
    it too, besides the block's output."""
    traced = _hf(model_type)
    layer = assign_layers(traced)
    order = layer_order(layer)
    cuts = dict(zip(order, crossing(traced)))
    # the encoder's output: made between the stacks, read by the decoder blocks' cross-attention
    encoder_out = [v for v in cuts["between.0"] if layer.get(v) == "between.0"
                   and any(layer[u.name] == "decoder.block.1" for u in traced.node(v).users)]
    assert encoder_out
    assert set(encoder_out) <= set(cuts["decoder.block.0"])
    assert [v for v in cuts["decoder.block.0"] if layer[v] == "decoder.block.0"]  # the chain
    assert not set(encoder_out) & set(cuts["decoder.block.1"])  # the last reader is behind


def test_swin_layers_are_its_blocks_and_patch_merging():
    traced = _hf("swin")
    assert layer_order(assign_layers(traced)) == [
        "pre", "swin.encoder.layers.0.blocks.0", "swin.encoder.layers.0.blocks.1",
        "swin.encoder.layers.0",  # patch merging: in the stage, in none of its blocks
        "swin.encoder.layers.1.blocks.0", "swin.encoder.layers.1.blocks.1", "post"]


def test_vit_layers_are_its_blocks():
    order = layer_order(assign_layers(_hf("vit")))
    assert order == ["pre", "vit.layers.0", "vit.layers.1", "post"]


class _Experts(nn.Module):
    """A block whose feed-forward is a list of experts, each reading the block's input."""

    def __init__(self, d=16, n=3):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, h):
        x = self.norm(h)
        return h + sum(e(x) for e in self.experts)


class _MoE(nn.Module):
    def __init__(self, depth=3, d=16):
        super().__init__()
        self.emb = nn.Embedding(128, d)
        self.blocks = nn.ModuleList(_Experts(d) for _ in range(depth))
        self.mid = nn.Linear(d, d)
        self.more = nn.ModuleList(_Experts(d) for _ in range(2))
        self.head = nn.Linear(d, 128)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        h = torch.tanh(self.mid(h))
        for b in self.more:
            h = b(h)
        return self.head(h)


def test_experts_are_no_stack_and_ops_between_stacks_are_a_layer():
    """A list of experts that all read the block's input is not a chain: the blocks stay the
    layers. The ops between two stacks form one layer of their own."""
    order = layer_order(assign_layers(_lm(_MoE())))
    assert order == ["pre", "blocks.0", "blocks.1", "blocks.2", "between.0", "more.0", "more.1",
                     "post"]


def test_layers_are_contiguous():
    """Every layer is one run of ops in graph order, so a stage is a run of layers."""
    for traced in (_hf("t5"), _hf("swin"), _lm(_MoE())):
        layer = assign_layers(traced)
        runs = [layer[n.name] for n in traced.graph_module.graph.nodes
                if n.op == "call_function" and n.name in layer]
        changes = [a for a, b in zip(runs, runs[1:]) if a != b] + runs[-1:]
        assert len(changes) == len(set(changes))


def test_a_flat_list_of_blocks_and_patch_mergings_is_a_stack():
    """The zoo's Swin keeps its blocks and patch mergings in one list of two classes: each is a
    layer (T5's `block.3.layer`, a list of three classes inside a block, is not a stack)."""
    with torch.device("meta"):
        model, batch, loss_fn = build_model("swin-test", batch=2, seq=None)
    order = layer_order(assign_layers(trace_for_training(model, batch, loss_fn)))
    assert order == ["pre", *(f"blocks.{i}" for i in range(len(model.blocks))), "post"]
