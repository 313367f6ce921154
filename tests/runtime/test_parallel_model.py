"""ZeRO data parallelism: parameters sharded over the dp axis, gathered for each op (and, for
ZeRO-3, gathered again in backward instead of kept), against single-process training."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from autopar.models.losses import lm_loss
from autopar.runtime.mesh import make_mesh
from autopar.runtime.parallel_model import ParallelModel
from autopar.trace import TracedModel, trace
from tests.helpers import traces
from tests.helpers.distributed import run_on_ranks
from tests.helpers.intra_op_plans import make_plan
from tests.helpers.models import MODELS, batches, fast_cpu_cluster, reference_losses, sgd_losses


@functools.cache
def traced_batch(model_name: str) -> TracedModel:
    """The trace of `model_name` on the batch, made once per process: the plans made here share
    it, and so do the ranks of a launch whose `prepare` made it before they were forked from its
    process (tests/helpers/distributed.py). A trace is read, never changed, by what is made of
    it; it depends on the model's code and the batch's shape only."""
    torch.manual_seed(0)
    x, y = batches()[0]
    return trace(MODELS[model_name](), (x,), loss_fn=lm_loss, target=y)


def zero_plan(model_name, mesh, flavour):
    """The planner's plan with every parameter's dp placement changed to a Shard of its first
    dim that divides: the ops still read parameters replicated over dp, so each is gathered."""
    traced = traced_batch(model_name)
    plan = make_plan(traced, fast_cpu_cluster(4), mesh=mesh)
    dp, n = list(mesh).index("dp"), mesh["dp"]
    fqn_to_node = {fqn: node for node, fqn in traced.parameters.items()}
    for fqn, placements in plan.parameters.items():
        shape = traced.node(fqn_to_node[fqn]).meta["val"].shape
        for d, size in enumerate(shape):
            if size % (n * (2 if f"S({d})" in placements else 1)) == 0:
                placements[dp] = f"S({d})"
                break
    plan.data_parallel = flavour
    return traced, plan


def zero_plan_json(model_name, mesh, flavour) -> str:
    """Planned once here, not on every rank."""
    _, plan = zero_plan(model_name, mesh, flavour)
    return plan.to_json()


def train_zero(model_name, plan_json):
    from autopar.plan import Plan

    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = batches()
    plan = Plan.from_dict(json.loads(plan_json))
    pm = ParallelModel(model, traced_batch(model_name), plan, make_mesh(plan))
    losses = sgd_losses(pm.parameters(), pm.train_step, data)
    held = sum(p.to_local().numel() for p in pm.parameters())
    return losses, held, sum(p.numel() for p in pm.parameters())


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name, mesh, flavour",
    [("gpt", {"dp": 4}, "zero3"), ("gpt", {"dp": 2, "tp": 2}, "zero3"),
     ("llama", {"dp": 4}, "zero2")],
    ids=str,
)
def test_zero_matches_single_process_and_shards_state(model_name, mesh, flavour):
    # a launch each: a replayed ZeRO run fails in AOTAutograd's partitioner in a process where
    # another run came first (tests/runtime/test_sequence_parallel.py); the ranks take the trace
    # made once before they fork
    results = run_on_ranks(train_zero, 4, model_name, zero_plan_json(model_name, mesh, flavour),
                           prepare=functools.partial(traced_batch, model_name))
    losses, held, total = results[0]
    assert all(r[0] == losses for r in results)
    assert losses == pytest.approx(reference_losses(model_name), rel=1e-5)
    assert held < total / 2  # each rank holds a fraction of the parameters


def two_nodes_of_two():
    import dataclasses

    return dataclasses.replace(fast_cpu_cluster(4), devices_per_node=2, nodes=2)


def train_hsdp(model_name, plan_json):
    import autopar
    from autopar.plan import Plan

    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = batches()
    plan = Plan.from_dict(json.loads(plan_json))
    with traces.remembered(model_name):
        pm = autopar.autoparallelize(model, two_nodes_of_two(), data[0], loss_fn=lm_loss,
                                     plan=plan)
    losses = sgd_losses(pm.parameters(), pm.train_step, data)
    return losses, sum(p.to_local().numel() for p in pm.parameters()), \
        sum(p.numel() for p in pm.parameters())


def _trace_llama() -> None:
    """A launch's `prepare`: the trace the ranks' autoparallelize makes, made once before they
    fork (tests/helpers/traces.py)."""
    torch.manual_seed(0)
    traces.remember("llama", MODELS["llama"](), batches()[0], lm_loss)


@pytest.mark.slow
def test_hybrid_sharding_matches_single_process_and_shards_within_a_node():
    """HSDP on 2 nodes x 2: parameters sharded over the 2 ranks of a node (dp), replicated
    over the nodes (dp_replicate); the batch split over all 4."""
    import autopar

    torch.manual_seed(0)
    plan = autopar.manual_plan(MODELS["llama"](), two_nodes_of_two(), batches()[0],
                               loss_fn=lm_loss, tp=1, pp=1, dp=4, microbatch_size=1, dp_shard=2)
    assert plan.mesh == {"dp_replicate": 2, "dp": 2} and plan.data_parallel == "hsdp"
    assert all(p[0] == "R" for p in plan.parameters.values())
    results = run_on_ranks(train_hsdp, 4, "llama", plan.to_json(), prepare=_trace_llama)
    losses, held, total = results[0]
    assert all(r[0] == losses for r in results)
    assert losses == pytest.approx(reference_losses("llama"), rel=1e-5)
    assert total / 4 < held <= total / 2 + 64 * 4  # half of every divisible parameter


def test_hybrid_sharding_shards_less_and_crosses_nodes_less_than_zero3():
    import autopar

    torch.manual_seed(0)
    model, cluster = MODELS["gpt"](), two_nodes_of_two()
    common = dict(loss_fn=lm_loss, tp=1, pp=1, dp=4, microbatch_size=1)
    hsdp = autopar.simulate(autopar.manual_plan(model, cluster, batches()[0], dp_shard=2,
                                                **common))
    zero3 = autopar.simulate(autopar.manual_plan(model, cluster, batches()[0], zero=3, **common))
    assert hsdp.memory_bytes["optimizer"] == pytest.approx(2 * zero3.memory_bytes["optimizer"])
    assert hsdp.step_time_s < zero3.step_time_s  # gathers stay inside the node
    with pytest.raises(autopar.AutoparError, match="dp_shard=3 with dp=4"):
        autopar.manual_plan(model, cluster, batches()[0], dp_shard=3, **common)


def evaluate_and_train(model_name, plan_json):
    """eval_step on every batch with the initial weights, whether that left any gradient, the
    training losses, then eval_step on the first batch with the trained weights."""
    from autopar.plan import Plan

    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = batches()
    plan = Plan.from_dict(json.loads(plan_json))
    pm = ParallelModel(model, traced_batch(model_name), plan, make_mesh(plan))
    before = [float(pm.eval_step(x, y)) for x, y in data]
    untouched = all(p.grad is None for p in pm.parameters())
    trained = sgd_losses(pm.parameters(), pm.train_step, data)
    return before, untouched, trained, float(pm.eval_step(*data[0]))


@pytest.mark.slow
def test_eval_step_matches_single_process():
    # dp 2 x tp 2 under ZeRO-3, one block checkpointed: evaluation runs it plainly (no grad)
    _, plan = zero_plan("gpt", {"dp": 2, "tp": 2}, "zero3")
    plan.checkpoint = {"blocks.0": "full"}
    results = run_on_ranks(evaluate_and_train, 4, "gpt", plan.to_json(),
                           prepare=functools.partial(traced_batch, "gpt"))
    torch.manual_seed(0)
    model = MODELS["gpt"]()
    data = batches()
    with torch.no_grad():
        before = [lm_loss(model(x), y).item() for x, y in data]
    trained = reference_losses("gpt", models={"gpt": lambda: model})  # trains `model` itself
    with torch.no_grad():
        after = lm_loss(model(data[0][0]), data[0][1]).item()
    for r in results:
        assert r == results[0]  # the same on every rank
    got_before, untouched, got_trained, got_after = results[0]
    assert untouched
    assert got_before == pytest.approx(before, rel=1e-5)
    assert got_trained == pytest.approx(trained, rel=1e-5)
    assert got_after == pytest.approx(after, rel=1e-5)
