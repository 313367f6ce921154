"""The shallow stand-in (pre, blocks 0-2, post) gives the same per-layer costs and the same plan
as solving the full graph, and is only used when every block repeats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autopar
from autopar.layers import decision_nodes
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.llama import Llama, LlamaConfig
from autopar.models.losses import lm_loss
from autopar.planning.assemble import candidate_plan
from autopar.planning.candidate import Candidate, evaluate, even_stages
from autopar.planning.layer_costs import layer_costs, solve_layers
from autopar.planning.profile import TrainingPrecision, profile_graph
from autopar.planning.stand_in import stand_in, whole
from autopar.trace import trace_for_training

MESH = {"dp": 2, "tp": 2}
CLUSTER = autopar.Cluster.preset("h100-80g", devices_per_node=8)  # pp2 x dp2 x tp2
PRECISION = TrainingPrecision()


def traced_model(model, batch=4, seq=16, vocab=128):
    x = torch.randint(0, vocab, (batch, seq))
    return trace_for_training(model, (x, x.clone()), lm_loss)


MODELS = {
    "gpt": lambda: GPT(GPTConfig(vocab_size=128, seq_len=16, n_layer=6, n_head=4, d_model=32)),
    "llama": lambda: Llama(LlamaConfig(vocab_size=128, seq_len=16, n_layer=5, n_head=4,
                                       n_kv_head=2, d_model=32, ffn_hidden=64)),
}


def costs_of(stand):
    profiles = profile_graph(stand.traced.graph_module)
    solved = solve_layers(stand, profiles, CLUSTER, MESH, precision=PRECISION)
    return layer_costs(stand, profiles, CLUSTER, MESH, "zero3", precision=PRECISION,
                       solved=solved)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_stand_in_costs_equal_the_full_graph(name):
    torch.manual_seed(0)
    traced = traced_model(MODELS[name]())
    shallow = stand_in(traced)
    assert shallow.is_shallow
    prefix = "blocks" if name == "gpt" else "layers"
    depth = 6 if name == "gpt" else 5
    assert shallow.represents[f"{prefix}.2"] == tuple(f"{prefix}.{i}" for i in range(2, depth))
    n_full = len(decision_nodes(traced.graph_module))
    assert len(decision_nodes(shallow.traced.graph_module)) < n_full * 0.75

    got, want = costs_of(shallow), costs_of(whole(traced))
    assert got.solution.objective_s == pytest.approx(want.solution.objective_s, rel=1e-9)
    assert [x.name for x in got.layers] == [x.name for x in want.layers]
    for a, b in zip(got.layers, want.layers):
        assert a.state_bytes == pytest.approx(b.state_bytes, rel=1e-12)
        assert a.boundary_bytes == pytest.approx(b.boundary_bytes, rel=1e-12)
        for oa, ob in zip(a.options, b.options, strict=True):
            assert oa.fwd_s == pytest.approx(ob.fwd_s, rel=1e-9), a.name
            assert oa.bwd_s == pytest.approx(ob.bwd_s, rel=1e-9), a.name
            assert oa.activation_bytes == pytest.approx(ob.activation_bytes, rel=1e-12)
    assert got.model_flops == pytest.approx(want.model_flops, rel=1e-12)
    assert got.sync_s == pytest.approx(want.sync_s, rel=1e-9)
    assert got.comm_s == pytest.approx(want.comm_s, rel=1e-9)

    # the plan names every op of the full graph, with the full solve's shardings
    plans = []
    for costs in (got, want):
        c = Candidate(mesh={"pp": 2, "dp": 2, "tp": 2}, microbatch_size=4, num_microbatches=2,
                      schedule="1F1B", v=1, flavour="zero3",
                      stages=even_stages([x.name for x in costs.layers], 2),
                      options={x.name: "none" for x in costs.layers}, costs=costs)
        plans.append(candidate_plan(evaluate(c, CLUSTER), CLUSTER, PRECISION, solver={}))
    assert plans[0].ops == plans[1].ops
    assert plans[0].parameters == plans[1].parameters
    assert plans[0].predicted == pytest.approx(plans[1].predicted, rel=1e-9)


class Uneven(nn.Module):
    """Blocks of two widths: no block stands for the others."""

    def __init__(self, widths):
        super().__init__()
        self.emb = nn.Embedding(128, widths[0])
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU())
                                    for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], 128)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def test_blocks_that_differ_are_planned_whole():
    traced = traced_model(Uneven([32, 32, 32, 64, 64, 64, 64]))
    assert not stand_in(traced).is_shallow


def test_ops_between_blocks_are_planned_whole():
    """A top-level op between blocks would be cut away with the dropped blocks."""

    class Between(Uneven):
        def forward(self, x):
            h = self.emb(x)
            for b in self.blocks:
                h = torch.tanh(b(h))
            return self.head(h)

    assert not stand_in(traced_model(Between([32] * 7))).is_shallow


def test_few_blocks_are_planned_whole():
    traced = traced_model(Uneven([32] * 5))  # 4 blocks
    assert not stand_in(traced).is_shallow
    assert stand_in(traced_model(Uneven([32] * 6))).is_shallow  # 5 blocks
