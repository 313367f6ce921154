"""Trace-time rewrites (autopar/rewrites.py): no-op `Module.to` in forward, registered forwards
for data-dependent modules, each undone after tracing; Switch Transformers' sparse layer
rewritten computes what the original computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autopar import rewrites
from autopar.errors import TraceError
from autopar.trace import trace


class _CastsItsLayerInForward(nn.Module):
    """As Switch Transformers' router: `self.classifier = self.classifier.to(float32)`."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        self.lin = self.lin.to(torch.float32)
        return self.lin(x)


class _RunsTheRowsThatAreHit(nn.Module):
    """As a mixture of experts in eager code: a loop over what nonzero() finds."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        out = torch.zeros_like(x)
        for row in torch.nonzero(x.sum(-1) > 0):
            out[row] = self.lin(x[row])
        return out


def _dense_rows(self, x):
    """_RunsTheRowsThatAreHit with static shapes: every row computed, the others masked."""
    return torch.where((x.sum(-1, keepdim=True) > 0), self.lin(x), torch.zeros_like(x))


def _branches_on_a_value(self, x):
    """Python control flow on a tensor's value: export cannot follow it."""
    return self.lin(x) if x.sum() > 0 else x


def _trace(model, x):
    return trace(model, (x,), loss_fn=F.mse_loss, target=torch.zeros_like(model(x)))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_module_cast_to_what_it_already_is_in_forward_traces(device):
    to = nn.Module.to
    with torch.device(device):
        model = _CastsItsLayerInForward()
    traced = trace(model, (torch.randn(2, 8, device=device),), loss_fn=F.mse_loss,
                   target=torch.zeros(2, 4, device=device))
    assert set(traced.parameters.values()) == {"lin.weight", "lin.bias"}
    assert nn.Module.to is to, "Module.to is restored after tracing"


def test_a_cast_that_changes_the_module_is_left_to_module_to():
    model = nn.Linear(2, 2)
    with rewrites.applied(model):
        model.to(torch.float64)
        assert model.weight.dtype == torch.float64


def test_registered_rewrite_traces_a_data_dependent_module(monkeypatch):
    monkeypatch.setattr(rewrites, "REWRITES", {})  # the registry as it was, after the test
    torch.manual_seed(0)
    model = _RunsTheRowsThatAreHit()
    x = torch.randn(6, 8)
    with pytest.raises(TraceError):
        _trace(model, x)
    rewrites.register(_RunsTheRowsThatAreHit, _dense_rows)
    traced = _trace(model, x)
    assert "forward" not in vars(model), "the rewrite is removed after tracing"
    targets = {str(n.target) for n in traced.graph_module.graph.nodes}
    assert "aten.nonzero.default" not in targets
    torch.testing.assert_close(_dense_rows(model, x), model(x))


def test_rewrites_are_undone_when_tracing_fails(monkeypatch):
    monkeypatch.setattr(rewrites, "REWRITES", {})
    to = nn.Module.to
    model = _RunsTheRowsThatAreHit()
    rewrites.register(_RunsTheRowsThatAreHit, _branches_on_a_value)
    with pytest.raises(TraceError):
        _trace(model, torch.randn(6, 8))
    assert nn.Module.to is to and "forward" not in vars(model)


def test_switch_sparse_layer_rewritten_equals_the_original():
    import transformers as tf  # in the test extra
    torch.manual_seed(0)
    cfg = tf.AutoConfig.for_model(
        "switch_transformers", d_model=32, d_ff=64, num_experts=4, expert_capacity=3,
        router_jitter_noise=0.0, dropout_rate=0.0)
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    layer = SwitchTransformersSparseMLP(cfg).train()
    x = torch.randn(4, 16, 32, requires_grad=True)
    selected = layer.router(x)[0]
    assert selected.sum() < 4 * 16, "capacity 3 of 16 tokens: some tokens are dropped"
    want = layer(x)
    got = rewrites.switch_sparse_mlp_forward(layer, x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    inputs = [x, *layer.parameters()]
    for g, w in zip(torch.autograd.grad(got.square().sum(), inputs),
                    torch.autograd.grad(want.square().sum(), inputs)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_hugging_face_experts_in_a_python_loop_trace_as_the_same_function():
    """Mixtral built with `experts_implementation="eager"` (a loop over the experts a batch
    reaches, which export cannot follow) traces, and the traced graph computes the loss and
    gradients of the model as built; its config is as the user left it."""
    import transformers as tf  # in the test extra

    from tests.helpers.hf_models import FAMILIES, hf_batch

    torch.manual_seed(0)
    config = tf.AutoConfig.for_model("mixtral", **FAMILIES["mixtral"][1])
    model = tf.AutoModelForCausalLM.from_config(config, experts_implementation="eager").train()
    batch = hf_batch("mixtral")
    traced = trace(model, batch)
    assert model.config._experts_implementation == "eager"
    torch.testing.assert_close(_graph_loss(traced, model, batch), model(**batch).loss,
                               rtol=1e-5, atol=1e-6)


def _graph_loss(traced, model, batch) -> torch.Tensor:
    """The loss the traced graph computes from the model's own weights and `batch`."""
    user = dict(zip(traced.inputs, traced.layout.tensors(batch, None)))
    args = [model.get_parameter(traced.parameters[n.name]) if n.name in traced.parameters
            else traced.buffer(model, traced.buffers[n.name]) if n.name in traced.buffers
            else user.get(n.name)  # a buffer nothing reads: no value needed
            for n in traced.graph_module.graph.nodes if n.op == "placeholder"]
    got = traced.graph_module(*args)
    return got[0] if isinstance(got, (tuple, list)) else got


def _attention_calls(traced) -> list[tuple[bool, bool]]:
    """(has a mask, is causal) of every SDPA call in the graph."""
    calls = []
    for n in traced.graph_module.graph.nodes:
        if n.target is torch.ops.aten.scaled_dot_product_attention.default:
            mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
            causal = n.args[5] if len(n.args) > 5 else n.kwargs.get("is_causal", False)
            calls.append((isinstance(mask, torch.fx.Node), bool(causal)))
    return calls


@pytest.mark.parametrize("family,causal", [("gpt2", True), ("llama", True), ("bert", False),
                                           ("vit", False)])
def test_hugging_face_attention_without_a_mask_traces_as_in_eager(family, causal):
    """A batch with no attention_mask (fixed-length chunks, images) traces to SDPA with no mask,
    causal for decoders, as transformers runs it outside export (the flash kernel on GPUs), and
    the graph computes the model's loss."""
    from tests.helpers.hf_models import hf_batch, hf_model

    torch.manual_seed(0)
    model = hf_model(family, dropout_off=True)
    batch = {k: v for k, v in hf_batch(family).items() if k != "attention_mask"}
    traced = trace(model, batch)
    assert _attention_calls(traced) == [(False, causal)] * 2
    torch.testing.assert_close(_graph_loss(traced, model, batch), model(**batch).loss,
                               rtol=1e-5, atol=1e-6)


def test_hugging_face_padding_and_packed_positions_keep_their_mask():
    """A padded attention_mask, or position_ids that restart inside a row (packed sequences),
    are inputs whose values decide the mask: the graph builds and applies it, and computes the
    model's loss on a batch with padding and packing. (The model is called without a cache, as
    autopar traces it: with its default cache, transformers does not look for packed rows.)"""
    from tests.helpers.hf_models import hf_batch, hf_model

    torch.manual_seed(0)
    model = hf_model("llama", dropout_off=True)
    ids = hf_batch("llama")["input_ids"]
    padded = torch.ones_like(ids)
    padded[0, -5:] = 0
    packed = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
    packed[1, 6:] -= 6  # row 1 holds two sequences
    for extra in ({"attention_mask": padded}, {"position_ids": packed}):
        batch = {"input_ids": ids, "labels": ids, **extra}
        traced = trace(model, batch)
        assert _attention_calls(traced) == [(True, False)] * 2, list(extra)
        want = model(**batch, use_cache=False).loss
        torch.testing.assert_close(_graph_loss(traced, model, batch), want, rtol=1e-5, atol=1e-6)
    import transformers.masking_utils as masking  # its checks are restored after tracing

    for name in ("is_torchdynamo_exporting", "find_packed_sequence_indices", "is_tracing"):
        assert getattr(masking, name).__module__.startswith("transformers"), name
