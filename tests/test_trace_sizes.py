"""The planner's traces of other batch sizes, made from one export with a symbolic batch
(`autopar.trace_sizes`), are exactly what `trace` returns at those sizes: the same nodes, names,
fingerprint, and on every node the value's shape, strides, dtype and requires_grad (what the
profile and the DTensor probes read). For every built-in family and Hugging Face ones, a
forward that branches on the batch size (it falls back to `trace`), and batch 1."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from autopar.batches import microbatch_inputs
from autopar.models.registry import BUILTIN_MODELS
from autopar.trace import TracedModel, trace
from autopar.trace_sizes import SizedTracer

FAMILIES = ["gpt-tiny", "llama-test", "palm-test", "bert-test", "vit-test", "t5-test",
            "switch-test", "swin-test"]
SLOW = {"t5-test", "switch-test", "swin-test"}
BATCH = 24  # the families' batch: the sizes compared are cut from it


def value_facts(v):
    """What the planner reads of a node's value; a stride only where its size is over 1 (the
    stride of a dim of size 1 is never used, and fake kernels do not agree on it). Not the
    storage offset, which nothing reads (HF T5's `copy` into a shifted slice is at 0 in export's
    graph, 1 on fake tensors)."""
    if isinstance(v, (tuple, list)):
        return tuple(value_facts(x) for x in v)
    if isinstance(v, torch.Tensor):
        strides = tuple(st if n > 1 else None for n, st in zip(v.shape, v.stride()))
        return (tuple(v.shape), strides, v.dtype, v.requires_grad, v.device)
    return repr(v)


def assert_same_graph(made: TracedModel, traced: TracedModel) -> None:
    assert made.fingerprint == traced.fingerprint
    pairs = list(zip(made.graph_module.graph.nodes, traced.graph_module.graph.nodes, strict=True))
    for a, b in pairs:
        assert (a.name, a.op, a.target) == (b.name, b.op, b.target)
        assert set(a.meta) == set(b.meta), a.name
        assert value_facts(a.meta.get("val")) == value_facts(b.meta.get("val")), a.name
        assert a.meta.get("nn_module_stack") == b.meta.get("nn_module_stack"), a.name
    for field in ("parameters", "buffers", "inputs", "target", "loss_node", "output_node"):
        assert getattr(made, field) == getattr(traced, field)


def builtin(name: str, batch: int):
    family, cfg = BUILTIN_MODELS[name]
    with torch.device("meta"):
        model = family.model(cfg)
        inputs, target = family.batch(cfg, batch)
    return model, inputs, target, family.loss


@functools.cache
def traced(name: str, batch: int) -> TracedModel:
    """`trace` of the family at `batch`, cut from its batch of BATCH; made once per module, as
    tests comparing with the same trace share it (gpt-tiny's batch of 2: three tests). A trace
    depends on the model's build and on its inputs' shapes and dtypes, not on which tensors of
    those shapes it is given (`inputs_key`). Read, never changed."""
    model, inputs, target, loss = builtin(name, BATCH)
    x, y = microbatch_inputs(inputs, batch), microbatch_inputs(target, batch)
    return trace(model, x, loss_fn=loss, target=y)


def check_sizes(sized: SizedTracer, name: str, model, inputs, target, loss, sizes) -> None:
    """`sized` at each of `sizes` equals `trace` there (of the family `name`). The first size
    is the reference that `SizedTracer` traces with `trace` itself: no second trace to compare
    it with."""
    for k, batch in enumerate(sizes):
        x, y = microbatch_inputs(inputs, batch), microbatch_inputs(target, batch)
        made = sized(model, x, loss_fn=loss, target=y)
        if k:
            assert_same_graph(made, traced(name, batch))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in FAMILIES])
def test_builtin_families_other_batch_sizes_equal_their_trace(name):
    """A size below the reference's, and (the fast lane's families, whose traces take a second)
    one above it from the same symbolic export; the slow lane's, whose traces take 3 s each,
    make the one below (the symbolic program is run the same way at any size)."""
    model, inputs, target, loss = builtin(name, BATCH)
    sized = SizedTracer(min_trace_s=0)
    check_sizes(sized, name, model, inputs, target, loss, (8, 2) if name in SLOW else (8, 2, 12))
    assert sized.exports == 2  # the first size, then one symbolic export for the others


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "t5"])  # an alias for `x[:]`; a shifted copy
def test_hugging_face_models_other_batch_sizes_equal_their_trace(model_type):
    from tests.helpers.hf_models import hf_batch, hf_model

    model, batch = hf_model(model_type), hf_batch(model_type)
    sized = SizedTracer(min_trace_s=0)
    sized(model, microbatch_inputs(batch, 4))  # the reference: `trace` itself
    part = microbatch_inputs(batch, 2)
    assert_same_graph(sized(model, part), trace(model, part))
    assert sized.exports == 2


def test_batch_one_is_traced():
    model, inputs, target, loss = builtin("gpt-tiny", 4)
    sized = SizedTracer(min_trace_s=0)
    check_sizes(sized, "gpt-tiny", model, inputs, target, loss, (4, 2, 1))
    assert sized.exports == 3  # 4, the symbolic export (for 2), then 1 traced


class BranchesOnBatch(nn.Module):
    """A forward whose ops depend on the batch size: no symbolic batch can stand for it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        if x.shape[0] > 3:
            y = y * 2
        return y.sum()


def test_a_forward_that_branches_on_the_batch_size_is_traced_at_each_size():
    model = BranchesOnBatch()
    sized = SizedTracer(min_trace_s=0)
    for batch in (4, 2, 6):
        x = torch.randn(batch, 8)  # a fresh tensor each: a batch of its own
        made = sized(model, x)
        assert_same_graph(made, trace(model, x))
    assert sized.exports == 4  # the symbolic export failed: every size traced


def test_cheap_traces_are_traced_at_each_size():
    """Below `min_trace_s` the symbolic export (two to three traces' time) is not made."""
    model, inputs, target, loss = builtin("gpt-tiny", 4)
    sized = SizedTracer(min_trace_s=3600)
    check_sizes(sized, "gpt-tiny", model, inputs, target, loss, (4, 2))
    assert sized.exports == 2


def test_a_shallow_copy_is_another_form():
    """The planner traces a deep model through a copy with fewer blocks (`trace_repeats`), and
    falls back to the whole model: the two must not share a reference trace."""
    model, inputs, target, loss = builtin("gpt-tiny", 4)
    sized = SizedTracer(min_trace_s=0)
    sized(model, inputs, loss_fn=loss, target=target)
    blocks = model.blocks._modules
    model.blocks._modules = dict(list(blocks.items())[:1])
    try:
        x, y = microbatch_inputs(inputs, 2), microbatch_inputs(target, 2)
        assert_same_graph(sized(model, x, loss_fn=loss, target=y),
                          trace(model, x, loss_fn=loss, target=y))
    finally:
        model.blocks._modules = blocks
    assert sized.exports == 2  # two forms, one trace each
