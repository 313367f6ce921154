"""trace: meta-tensor export, layer mapping, fingerprints, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autopar.errors import TraceError
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from autopar.trace import graph_fingerprint, layer_of, trace

CFG = GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, d_model=32)


def gpt_batch(batch=2, device="cpu"):
    x = torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len), device=device)
    return x, torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len), device=device)


class TestTrace:
    def test_meta_model_traces_without_memory(self):
        with torch.device("meta"):
            model = GPT(GPTConfig(vocab_size=50304, seq_len=2048, n_layer=4, n_head=32,
                                  d_model=4096))
        x, y = gpt_batch(device="meta")
        traced = trace(model, (x,), loss_fn=lm_loss, target=y)
        val = traced.node(traced.loss_node).meta["val"]
        assert val.numel() == 1

    def test_parameters_keyed_by_fqn_and_tied_weight_once(self):
        model = GPT(CFG)
        x, y = gpt_batch()
        traced = trace(model, (x,), loss_fn=lm_loss, target=y)
        fqns = set(traced.parameters.values())
        assert "blocks.1.mlp.fc.weight" in fqns
        # wte.weight and lm_head.weight are one tensor: it appears once
        assert len({"wte.weight", "lm_head.weight"} & fqns) == 1
        assert len(traced.inputs) == 2  # idx, target

    def test_every_op_maps_to_its_layer(self):
        model = GPT(CFG)
        x, y = gpt_batch()
        traced = trace(model, (x,), loss_fn=lm_loss, target=y)
        layers = {layer_of(n) for n in traced.graph_module.graph.nodes if n.op == "call_function"}
        assert {"blocks.0.attn.qkv", "blocks.1.mlp.fc", "wte", "lm_head"} <= layers
        assert not any(layer.startswith("_autopar") for layer in layers)

    def test_attention_stays_whole(self):
        x, y = gpt_batch()
        traced = trace(GPT(CFG), (x,), loss_fn=lm_loss, target=y)
        ops = {str(n.target) for n in traced.graph_module.graph.nodes}
        assert "aten.scaled_dot_product_attention.default" in ops
        assert "aten.bmm.default" not in ops

    def test_meta_model_traces_to_the_graph_the_real_one_runs(self):
        # on meta, attention's output was laid out as by the math kernel, and the reshape
        # after it became a copy that the real graph does not have
        torch.manual_seed(0)
        real = GPT(CFG)
        with torch.device("meta"):
            meta = GPT(CFG)
        x, y = gpt_batch()
        graphs = [trace(m, (x,), loss_fn=lm_loss, target=y) for m in (real, meta)]
        ops = [[str(n.target) for n in g.graph_module.graph.nodes] for g in graphs]
        assert ops[0] == ops[1]
        assert graphs[0].fingerprint == graphs[1].fingerprint
        assert all(p.device.type == "meta" for p in meta.parameters())  # the model is left as is

    def test_silu_stays_whole(self):
        # decomposed, silu is an fp32 upcast, sigmoid, mul and a downcast: four kernels
        model = nn.Linear(8, 8).to(torch.bfloat16)
        x = torch.randn(2, 8, dtype=torch.bfloat16)
        traced = trace(model, (x,), loss_fn=lambda out, y: F.silu(out).sum(), target=x)
        ops = [str(n.target) for n in traced.graph_module.graph.nodes if n.op == "call_function"]
        assert "aten.silu.default" in ops
        assert not any(op.startswith(("aten.sigmoid", "aten._to_copy")) for op in ops)

    def test_model_output_is_loss_without_loss_fn(self):
        class WithLoss(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 4)

            def forward(self, x):
                return self.lin(x).square().mean()

        traced = trace(WithLoss(), (torch.randn(2, 4),))
        assert traced.loss_node == traced.output_node


class TestFingerprint:
    def test_same_model_same_fingerprint_other_shape_other(self):
        def fingerprint(batch):
            x, y = gpt_batch(batch)
            return trace(GPT(CFG), (x,), loss_fn=lm_loss, target=y).fingerprint

        a, b, c = fingerprint(2), fingerprint(2), fingerprint(4)
        assert a == b != c
        assert len(a) == 64

    def test_fingerprint_function_matches_field(self):
        x, y = gpt_batch()
        traced = trace(GPT(CFG), (x,), loss_fn=lm_loss, target=y)
        assert graph_fingerprint(traced.graph_module.graph) == traced.fingerprint

    def test_layer_norm_statistics_dtype_is_the_devices_not_the_models(self):
        """On CUDA, layer_norm saves fp32 mean and rstd for bf16 input; on CPU (and so in a
        meta model's trace) bf16. A plan made offline must still match the GPU's graph, so
        the fingerprint ignores those two dtypes, and no other."""
        x, y = gpt_batch()
        graph = trace(GPT(CFG).to(torch.bfloat16), (x,), loss_fn=lm_loss,
                      target=y).graph_module.graph
        before = graph_fingerprint(graph)
        norm = next(n for n in graph.nodes if n.target == torch.ops.aten.native_layer_norm.default)
        out, mean, rstd = norm.meta["val"]
        assert mean.dtype == torch.bfloat16
        norm.meta["val"] = (out, mean.float(), rstd.float())  # as traced on a GPU
        assert graph_fingerprint(graph) == before
        norm.meta["val"] = (out.float(), mean, rstd)  # the normalised output is the model's
        assert graph_fingerprint(graph) != before


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: export cannot trace this
            return x * 2
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.lin(x)).sum()


class TestErrors:
    def test_untraceable_model_names_module_reason_and_fix(self):
        with pytest.raises(TraceError) as err:
            trace(Outer(), (torch.randn(2, 4),))
        msg = str(err.value)
        assert "module 'gate'" in msg and "DataDependent" in msg
        assert "data-dependent" in msg.lower() or "guard" in msg.lower()
        assert "torch.where" in msg  # what to change

    def test_not_a_module(self):
        with pytest.raises(TraceError, match="needs a torch.nn.Module"):
            trace(lambda x: x, (torch.randn(2),))

    def test_non_scalar_loss(self):
        with pytest.raises(TraceError, match="scalar loss"):
            trace(nn.Linear(4, 4), (torch.randn(2, 4),))

    def test_loss_fn_without_target(self):
        with pytest.raises(TraceError, match="target"):
            trace(GPT(CFG), gpt_batch()[:1], loss_fn=lm_loss)

    def test_model_output_that_is_not_a_loss(self):
        with pytest.raises(TraceError, match="no loss_fn was given"):
            trace(GPT(CFG), gpt_batch()[:1])
