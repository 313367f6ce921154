"""Hugging Face models as they come trace on meta, and the command line builds them by name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from autopar import cli
from autopar.planning.layer_costs import prepare
from autopar.trace import trace
from tests.helpers.hf_models import FAMILIES, hf_batch, hf_model


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_traces_as_it_comes(model_type):
    """Default config (dropout, caches and all), keyword batch with labels, no loss_fn."""
    with torch.device("meta"):
        model = hf_model(model_type)
    traced = trace(model, hf_batch(model_type))
    assert traced.target is None
    assert traced.node(traced.loss_node).meta["val"].numel() == 1
    assert traced.output_node != traced.loss_node  # the logits, for evaluation


@pytest.mark.parametrize("model_type", ["t5", "swin"])
def test_attention_with_a_learned_bias_profiles(model_type):
    """What failed: the profile ran a view the trace made on the fused attention kernel's
    layout, which attention with a mask that requires grad does not get in training."""
    stand, profiles = prepare(trace(hf_model(model_type), hf_batch(model_type)))
    assert profiles and all(n in profiles for n in stand.traced.inputs)


def test_switch_sparse_layer_traces_without_data_dependent_shapes():
    """What failed: the router casts its classifier in forward; the experts loop over the
    experts nonzero() finds (autopar.rewrites gives it a fixed-capacity dispatch)."""
    model = hf_model("switch_transformers", dropout_off=True)
    sparse = model.encoder.block[1].layer[1].mlp
    x = torch.randn(4, 16, 64)
    traced = trace(sparse, (x,), loss_fn=F.mse_loss, target=x)
    targets = {str(n.target) for n in traced.graph_module.graph.nodes}
    assert "aten.nonzero.default" not in targets and "aten.bmm.default" in targets
    assert set(traced.parameters.values()) == {name for name, _ in sparse.named_parameters()}


def test_cli_plans_a_hugging_face_model_type(capsys):
    code = cli.main(["plan", "hf:gpt2", "--set", "n_layer=2", "--set", "n_embd=64",
                     "--set", "n_head=4", "--set", "vocab_size=128", "--seq", "16",
                     "--cluster", "h100-80g", "--devices-per-node", "2", "--json"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["cluster"]["devices_per_node"] == 2
    assert any(fqn.startswith("transformer.h.1.") for fqn in plan["parameters"])


@pytest.mark.parametrize("argv, message", [
    (["hf:no_such_type"], "no model type 'no_such_type'"),
    (["hf:missing/config.json"], "no such file"),
    (["hf:gpt2", "--set", "n_layer"], "write KEY=VALUE"),
    (["gpt-tiny", "--set", "n_layer=2"], "use it with hf:"),
    (["hf:vit", "--seq", "16"], "image model: drop --seq"),
])
def test_cli_hugging_face_mistakes_are_explained(capsys, argv, message):
    assert cli.main(["plan", *argv, "--cluster", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
