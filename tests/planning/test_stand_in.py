"""The shallow stand-in (each run of identical layers cut to three) gives the same per-layer
costs and the same plan as solving the full graph: GPT and Llama (one stack), T5 (two stacks,
the decoder reading the encoder), a model of stages of two widths with blocks alternating (a
run of period 2), and blocks with an op between them."""

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
from autopar.planning.stand_in import find_runs, stand_in, whole
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

    _assert_same_plan(got, want)


def _assert_same_plan(got, want):
    """The plan names every op of the full graph, with the full solve's shardings."""
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


class Between(Uneven):
    """A top-level op between blocks: each forms a layer, the run's unit is (block, op)."""

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = torch.tanh(b(h))
        return self.head(h)


def test_ops_between_blocks_make_a_run_of_period_two():
    shallow = stand_in(traced_model(Between([32] * 7)))
    assert shallow.is_shallow
    # units (blocks.i, between.i), i = 0..4; the op after the last block is "post"
    assert shallow.represents["blocks.2"] == ("blocks.2", "blocks.3", "blocks.4")
    assert shallow.represents["between.2"] == ("between.2", "between.3", "between.4")


def test_few_blocks_are_planned_whole():
    traced = traced_model(Uneven([32] * 5))  # 4 blocks
    assert not stand_in(traced).is_shallow
    assert stand_in(traced_model(Uneven([32] * 6))).is_shallow  # 5 blocks


def test_runs_of_one_layer_or_of_a_pair():
    """find_runs: repeats of one signature, or of a pair of different ones; a run's first unit
    needs only the same kinds; runs of fewer than MIN_BLOCKS units are left alone."""
    assert find_runs(list("pAAAAAAq"), list("pAAAAAAq")) == [(1, 1, 6)]
    assert find_runs(list("pABABABABABq"), list("pABABABABABq")) == [(1, 2, 5)]
    assert find_runs(list("pABABABAq"), list("pABABABAq")) == []  # 4 pairs
    # block 0 reads the embedding, its kind is the others': it opens the run
    assert find_runs(["p", "a0", *"aaaa", "q"], ["p", *"aaaaa", "q"]) == [(1, 1, 5)]
    # two stacks, each a run (T5's encoder and decoder)
    sigs = ["p", *"eeeee", "m", *"ddddd", "q"]
    assert find_runs(sigs, sigs) == [(1, 1, 5), (7, 1, 5)]


class _Block(nn.Module):
    """One class; odd blocks run one op more (as Swin's shifted windows do)."""

    def __init__(self, d, odd):
        super().__init__()
        self.norm, self.odd = nn.LayerNorm(d), odd
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        x = self.norm(h)
        x = torch.tanh(x) if self.odd else x
        return h + self.fc2(torch.relu(self.fc1(x)))


class _Stage(nn.Module):
    def __init__(self, d, depth, out):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d, i % 2 == 1) for i in range(depth))
        self.merge = nn.Linear(d, out) if out else None

    def forward(self, h):
        for b in self.blocks:
            h = b(h)
        return self.merge(h) if self.merge is not None else h


class Stages(nn.Module):
    """Swin-like: stages of different widths, a merging layer between, blocks alternating."""

    def __init__(self, widths=(16, 32), depths=(2, 10)):
        super().__init__()
        self.emb = nn.Embedding(128, widths[0])
        outs = [*widths[1:], None]
        self.stages = nn.ModuleList(_Stage(w, d, o) for w, d, o in zip(widths, depths, outs))
        self.head = nn.Linear(widths[-1], 128)

    def forward(self, x):
        h = self.emb(x)
        for stage in self.stages:
            h = stage(h)
        return self.head(h)


def _t5(layers=6):
    import transformers

    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=layers, num_heads=4, d_kv=8,
                                   vocab_size=128, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config).train()


def _traced_t5(layers=6):
    from autopar.trace import trace
    from tests.helpers.hf_models import hf_batch

    torch.manual_seed(0)
    return trace(_t5(layers), hf_batch("t5"))


STACKS = {
    # T5: two stacks, the decoder's blocks also reading the encoder's output
    "t5": (_traced_t5, {"encoder.block.3": 3, "decoder.block.3": 3}),
    # stages of two widths, a merging layer, blocks alternating: a run of period 2
    "stages": (lambda: traced_model(Stages()),
               {"stages.1.blocks.4": 3, "stages.1.blocks.5": 3}),
    "between": (lambda: traced_model(Between([32] * 7)), {"blocks.2": 3, "between.2": 3}),
}


@pytest.mark.parametrize("name", [pytest.param("t5", marks=pytest.mark.slow), "stages",
                                  "between"])
def test_stand_in_of_several_stacks_equals_the_full_graph(name):
    make, represented = STACKS[name]
    traced = make()
    shallow = stand_in(traced)
    assert {k: len(v) for k, v in shallow.represents.items()} == represented
    got, want = costs_of(shallow), costs_of(whole(traced))
    assert got.solution.objective_s == pytest.approx(want.solution.objective_s, rel=1e-9)
    assert [x.name for x in got.layers] == [x.name for x in want.layers]
    for a, b in zip(got.layers, want.layers):
        assert a.state_bytes == pytest.approx(b.state_bytes, rel=1e-12), a.name
        assert a.boundary_bytes == pytest.approx(b.boundary_bytes, rel=1e-12), a.name
        assert a.carry_bytes == pytest.approx(b.carry_bytes, rel=1e-12), a.name
        for oa, ob in zip(a.options, b.options, strict=True):
            assert oa.fwd_s == pytest.approx(ob.fwd_s, rel=1e-9), a.name
            assert oa.bwd_s == pytest.approx(ob.bwd_s, rel=1e-9), a.name
            assert oa.activation_bytes == pytest.approx(ob.activation_bytes, rel=1e-12)
    assert got.model_flops == pytest.approx(want.model_flops, rel=1e-12)
    assert got.comm_s == pytest.approx(want.comm_s, rel=1e-9)
    assert got.sync_s == pytest.approx(want.sync_s, rel=1e-9)
    _assert_same_plan(got, want)
