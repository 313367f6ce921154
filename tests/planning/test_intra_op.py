"""The planner on small models whose best sharding is known by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.errors import InfeasibleError, MeshError
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from autopar.planning.intra_op import build_problem
from autopar.planning.profile import TrainingPrecision, profile_graph
from autopar.planning.search import candidate_meshes
from autopar.trace import trace, trace_for_training
from tests.helpers.models import fast_cpu_cluster


class MLP(nn.Module):
    def __init__(self, d=256, hidden=1024):
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def mse(out, target):
    return F.mse_loss(out, target)


def mlp_batch(tokens=8, d=256):
    return torch.randn(tokens, d), torch.randn(tokens, d)


class TestMegatronPattern:
    def test_tp_shards_columns_then_rows(self):
        # Few tokens and big weights: moving weights costs more than moving activations, so
        # the optimum is Megatron's MLP: fc split by output features, proj by input features,
        # one all-reduce in forward.
        plan = autopar.plan(MLP(), fast_cpu_cluster(2), mlp_batch(), loss_fn=mse, mesh={"tp": 2})
        assert plan.parameters["fc.weight"] == ["S(0)"]
        assert plan.parameters["fc.bias"] == ["S(0)"]
        assert plan.parameters["proj.weight"] == ["S(1)"]
        assert plan.parameters["proj.bias"] == ["R"]
        assert plan.solver["status"] == "optimal"

    def test_dp_axis_splits_batch_and_replicates_weights(self):
        # replicate asked for: left free, ZeRO wins (it shards the optimizer step as well)
        plan = autopar.plan(MLP(), fast_cpu_cluster(2), mlp_batch(), loss_fn=mse, mesh={"dp": 2},
                            data_parallel="replicate")
        assert all(p == ["R"] for p in plan.parameters.values())
        assert all(p == ["S(0)"] for p in plan.inputs.values())


class TestMemory:
    @pytest.mark.slow
    def test_tight_memory_forces_sharding(self):
        # Replicated fp32 AdamW state of the MLP is ~8.4 MB per device, sharded it halves.
        # Many tokens make replicated weights the fastest plan; a limit halfway between the
        # smallest peak and that plan's peak leaves only plans that split the weights.
        model, batch = MLP(), mlp_batch(tokens=512)
        cluster = fast_cpu_cluster(2)
        free = autopar.plan(model, cluster, batch, loss_fn=mse, mesh={"tp": 2})
        with pytest.raises(InfeasibleError) as err:
            autopar.plan(model, cluster, batch, loss_fn=mse, mesh={"tp": 2},
                         memory_limit=_state_share(model, 2) * 1.001)
        smallest = err.value.min_peak_bytes
        assert smallest < free.predicted["peak_memory_bytes"]
        limit = (smallest + free.predicted["peak_memory_bytes"]) / 2
        tight = autopar.plan(model, cluster, batch, loss_fn=mse, mesh={"tp": 2},
                             memory_limit=limit)
        assert tight.predicted["peak_memory_bytes"] <= limit
        sharded = [fqn for fqn, p in tight.parameters.items() if p != ["R"]]
        assert "fc.weight" in sharded and "proj.weight" in sharded
        assert tight.predicted["step_time_s"] >= free.predicted["step_time_s"]

    def test_nothing_fits_says_smallest_peak_and_budget(self):
        model = MLP()
        limit = _state_share(model, 2) * 1.001  # the state fits sharded; a plan does not
        with pytest.raises(InfeasibleError) as err:
            autopar.plan(model, fast_cpu_cluster(2), mlp_batch(), loss_fn=mse, memory_limit=limit)
        e = err.value
        assert e.budget_bytes == limit and e.min_peak_bytes > limit
        assert "smallest peak found is 4.02 MiB" in str(e) and "limit of 4.01 MiB" in str(e)


def _state_share(model, world: int) -> float:
    """fp32 AdamW state (16 bytes a parameter) spread evenly over `world` devices: the least
    memory limit that gets past `autopar.plan`'s first check to the search."""
    return 16 * sum(p.numel() for p in model.parameters()) / world


class TestMeshes:
    def test_candidate_meshes_cover_factorisations(self):
        """tp outermost in the loop, then cp, ep, pp within them, dp the rest; pp at most the
        layer count; ep 1 for a model without experts, else a divisor of the expert count; cp 1
        unless the search asks for it, else a divisor of the sequence."""
        one = {"ep": 1, "cp": 1}
        assert candidate_meshes(fast_cpu_cluster(4), n_layers=2) == [
            {"pp": 1, "dp": 4, **one, "tp": 1}, {"pp": 2, "dp": 2, **one, "tp": 1},
            {"pp": 1, "dp": 2, **one, "tp": 2}, {"pp": 2, "dp": 1, **one, "tp": 2},
            {"pp": 1, "dp": 1, **one, "tp": 4}]
        assert candidate_meshes(fast_cpu_cluster(1), n_layers=3) == [
            {"pp": 1, "dp": 1, **one, "tp": 1}]
        with_experts = candidate_meshes(fast_cpu_cluster(8), n_layers=4, experts=6)
        assert {m["ep"] for m in with_experts} == {1, 2}  # of 8 ranks, those dividing 6
        assert {"pp": 2, "dp": 1, "ep": 2, "cp": 1, "tp": 2} in with_experts
        # of 8 ranks, those dividing 3,072 and leaving each at least 512 tokens (not 8: 384)
        with_sequence = candidate_meshes(fast_cpu_cluster(8), n_layers=4, sequence=3072)
        assert {m["cp"] for m in with_sequence} == {1, 2, 4}
        assert {"pp": 1, "dp": 1, "ep": 1, "cp": 4, "tp": 2} in with_sequence
        short = candidate_meshes(fast_cpu_cluster(8), n_layers=4, sequence=512)
        assert {m["cp"] for m in short} == {1}  # 512 tokens: no cp leaves a rank 512

    def test_planner_chooses_the_mesh(self):
        plan = autopar.plan(MLP(), fast_cpu_cluster(4), mlp_batch(), loss_fn=mse)
        assert plan.world_size == 4
        assert {"pp": 1, "dp": 1, "ep": 1, "cp": 1, "tp": 1} | plan.mesh in candidate_meshes(
            fast_cpu_cluster(4), 8)

    @pytest.mark.parametrize("mesh", [{"dp": 3}, {"dp": 2, "tp": 4}])
    def test_mesh_not_matching_world_size(self, mesh):
        with pytest.raises(MeshError, match="must multiply to the world size"):
            autopar.plan(MLP(), fast_cpu_cluster(4), mlp_batch(), loss_fn=mse, mesh=mesh)

    def test_batch_that_dp_cannot_divide(self):
        with pytest.raises(MeshError, match="must divide by 4"):
            autopar.plan(MLP(), fast_cpu_cluster(4), mlp_batch(tokens=6), loss_fn=mse,
                         mesh={"dp": 4})


def test_tied_weight_with_a_vocabulary_dp_cannot_divide():
    """GPT ties wte to lm_head: export reads both through one placeholder and leaves the other
    unused. The unused one is no input and must not be split over dp (vocab 100, dp 3)."""
    model = GPT(GPTConfig(vocab_size=100, seq_len=8, n_layer=1, n_head=2, d_model=16))
    x = torch.randint(0, 100, (3, 8))
    plan = autopar.plan(model, fast_cpu_cluster(3), (x, x.clone()), loss_fn=lm_loss,
                        mesh={"dp": 3})
    assert plan.parameters["lm_head.weight"] == ["R"]


class TestRepeatedLayers:
    @pytest.mark.slow
    def test_identical_blocks_share_decisions(self):
        cfg = GPTConfig(vocab_size=64, seq_len=8, n_layer=4, n_head=4, d_model=32)
        x = torch.randint(0, 64, (4, 8))
        traced = trace(GPT(cfg), (x,), loss_fn=lm_loss, target=x)
        decisions = build_problem(
            traced, profile_graph(traced.graph_module), fast_cpu_cluster(4), {"dp": 2, "tp": 2},
            precision=TrainingPrecision(), memory_budget_bytes=float("inf"),
        )
        ties = decisions.problem.ties
        # every block shares its decisions, position by position; block 0 reads the embedding
        # and keeps its own where its candidates differ
        assert len(ties) > 20 and all(len(group) >= 3 for group in ties)
        assert sum(len(group) == 4 for group in ties) > len(ties) / 2
        plan = autopar.plan(GPT(cfg), fast_cpu_cluster(4), (x, x), loss_fn=lm_loss,
                            mesh={"dp": 2, "tp": 2})
        per_block = [
            {k.split(".", 2)[2]: v for k, v in plan.parameters.items()
             if k.startswith(f"blocks.{i}.")}
            for i in range(1, 4)
        ]
        assert all(b == per_block[0] for b in per_block)


class TestDeterminism:
    def test_same_inputs_byte_identical_plan(self):
        a = autopar.plan(MLP(), fast_cpu_cluster(4), mlp_batch(), loss_fn=mse)
        b = autopar.plan(MLP(), fast_cpu_cluster(4), mlp_batch(), loss_fn=mse)
        assert a.to_json() == b.to_json()


def _memory_points_by_every_pair(gm, traced, profiles):
    """The live sets of `intra_op._memory_points` the slow way: every op's set over every op,
    then every set compared with every other (kept if no other holds it strictly, the last of
    equal ones)."""
    from autopar.layers import decision_nodes
    from autopar.planning.intra_op import source_of
    from autopar.planning.strategies import tensor_inputs

    order = decision_nodes(gm)
    index = {n.name: i for i, n in enumerate(order)}
    last_use = {n.name: index[n.name] for n in order}
    for n in order:
        if n.op == "call_function":
            for arg in tensor_inputs(n):
                src = source_of(arg)[0].name
                last_use[src] = max(last_use[src], index[n.name])
    ops = [n.name for n in order if n.op == "call_function"]
    saved = {m for m in ops if profiles[m].saved_bytes > 0}
    sets = [(m, frozenset(x for x in ops if index[x] <= index[m]
                          and (x in saved or last_use[x] >= index[m]))) for m in ops]
    always = tuple(n.name for n in order if n.op == "placeholder")
    return [(name, always + tuple(x for x in ops if x in s)) for i, (name, s) in enumerate(sets)
            if not any(s < other for _, other in sets)
            and not any(s == other for _, other in sets[i + 1:])]


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-test", "t5-test", "switch-test",
                                  "swin-test"])
def test_memory_points_are_the_maximal_live_sets(name):
    """The one-sweep maximal live sets equal those found by comparing every pair of sets, on
    graphs with branches, residuals, multi-output ops and saved activations."""
    from autopar.models.registry import build_model
    from autopar.planning.intra_op import _memory_points

    torch.manual_seed(0)
    model, example, loss_fn = build_model(name, batch=2, seq=None)
    traced = trace_for_training(model, example, loss_fn)
    gm = traced.graph_module
    profiles = profile_graph(gm)
    got = [(p.name, p.live) for p in _memory_points(gm, traced, profiles)]
    want = _memory_points_by_every_pair(gm, traced, profiles)
    assert got == want
    assert 1 < len(got) < sum(n.op == "call_function" for n in gm.graph.nodes)
