"""Tracing a deep model through a shallow copy (`autopar.trace_repeats`) gives exactly the graph
`trace` gives, names and fingerprint included, for every built-in family and the Hugging Face
families, from one trace of a few blocks; where the blocks do not repeat cleanly it falls back
to the full trace, and the user's model is left as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import autopar.trace_repeats as trace_repeats
from autopar.layers import assign_layers
from autopar.models.registry import BUILTIN_MODELS
from autopar.trace import TracedModel, trace
from autopar.trace_repeats import KEPT_UNITS, find_runs, trace_repeated

# each tiny model made deep enough for a run of more than KEPT_UNITS units
DEEP = {
    "gpt-tiny": dict(n_layer=9),
    "llama-test": dict(n_layer=9),
    "palm-test": dict(n_layer=9),
    "bert-test": dict(n_layer=9),
    "vit-test": dict(n_layer=9),
    "t5-test": dict(n_layer=8),  # block 0 holds the position bias: a run from block 1
    "switch-test": dict(n_layer=14),  # dense and expert blocks alternate: units of two
    "swin-test": dict(depths=(2, 2, 10, 2)),  # plain and shifted windows alternate
}
SLOW = {"t5-test", "switch-test", "swin-test"}


def assert_same_graph(full: TracedModel, repeated: TracedModel) -> None:
    assert repeated.fingerprint == full.fingerprint
    assert [n.name for n in repeated.graph_module.graph.nodes] == [
        n.name for n in full.graph_module.graph.nodes]
    assert repeated.parameters == full.parameters
    assert repeated.buffers == full.buffers
    assert repeated.inputs == full.inputs and repeated.target == full.target
    assert (repeated.loss_node, repeated.output_node) == (full.loss_node, full.output_node)
    assert assign_layers(repeated) == assign_layers(full)  # module paths moved with the copies
    assert repeated.constants.keys() == full.constants.keys()  # lifted by export, per block
    assert all(torch.equal(repeated.constants[k], v) for k, v in full.constants.items())


def traces_made(monkeypatch) -> list:
    """Each call of `trace` inside trace_repeated: one when the shallow graph was expanded,
    two when it fell back to the full trace."""
    calls = []
    real = trace_repeats.trace

    def counting(model, *args, **kwargs):
        calls.append(sum(1 for _ in model.modules()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trace_repeats, "trace", counting)
    return calls


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in DEEP])
def test_builtin_families_trace_once_and_equal_the_full_trace(name, monkeypatch):
    family, cfg = BUILTIN_MODELS[name]
    cfg = dataclasses.replace(cfg, **DEEP[name])
    with torch.device("meta"):
        model = family.model(cfg)
        inputs, target = family.batch(cfg, 4)
    assert find_runs(model), "the deepened model has a run of blocks"
    full = trace(model, inputs, loss_fn=family.loss, target=target)
    calls = traces_made(monkeypatch)
    repeated = trace_repeated(model, inputs, loss_fn=family.loss, target=target)
    assert len(calls) == 1 and calls[0] < sum(1 for _ in model.modules())  # one, shallow
    assert_same_graph(full, repeated)


# one stack, parallel blocks, an encoder; Switch: two stacks, dense and expert blocks alternate,
# and each block's attention lifts a tensor constant named with a counter across blocks (HF T5,
# one stack of each, is left out for the suite's time: the built-in T5 covers its runs)
HF = ["llama", "falcon", "vit", "switch_transformers"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", HF)
def test_hugging_face_models_trace_once_and_equal_the_full_trace(model_type, monkeypatch):
    from tests.helpers.hf_models import FAMILIES, hf_batch, hf_model

    task, sizes = FAMILIES[model_type]
    deep = {k: 7 for k in ("num_hidden_layers", "num_layers", "num_decoder_layers")
            if k in sizes}
    monkeypatch.setitem(FAMILIES, model_type, (task, {**sizes, **deep}))
    model, batch = hf_model(model_type), hf_batch(model_type)
    full = trace(model, batch)
    calls = traces_made(monkeypatch)
    assert_same_graph(full, trace_repeated(model, batch))
    assert len(calls) == 1


class Block(nn.Module):
    def __init__(self, index: int, every: int):
        super().__init__()
        self.layer_idx = index  # the block's place: not a difference between blocks
        self.every = every
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x = x + torch.relu(self.fc(x))
        if self.layer_idx % self.every == self.every - 1:  # what the settings do not show
            x = x * 0.5
        return x


class Stack(nn.Module):
    def __init__(self, depth: int, every: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(i, every) for i in range(depth))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x).sum()


def test_blocks_that_differ_by_their_index_fall_back_to_the_full_trace(monkeypatch):
    model = Stack(depth=10, every=3)  # a halving in blocks 2, 5, 8: the kept four show it
    x = torch.randn(4, 8)
    full = trace(model, x)
    calls = traces_made(monkeypatch)
    assert_same_graph(full, trace_repeated(model, x))
    assert len(calls) == 2  # the shallow graph did not repeat cleanly: traced whole


def test_the_model_is_left_as_it_was_even_when_the_shallow_trace_fails(monkeypatch):
    class Counting(Stack):
        def forward(self, x):
            if len(self.blocks) != 10:  # a forward that needs every block
                raise RuntimeError("expected 10 blocks")
            return super().forward(x)

    model = Counting(depth=10, every=1)
    before = list(model.blocks)
    x = torch.randn(4, 8)
    full = trace(model, x)
    calls = traces_made(monkeypatch)
    assert_same_graph(full, trace_repeated(model, x))
    assert len(calls) == 2
    assert list(model.blocks) == before and len(model.blocks) == 10


def test_short_stacks_are_traced_whole(monkeypatch):
    model = Stack(depth=KEPT_UNITS, every=1)
    assert find_runs(model) == []
    calls = traces_made(monkeypatch)
    trace_repeated(model, torch.randn(4, 8))
    assert len(calls) == 1 and calls[0] == sum(1 for _ in model.modules())
