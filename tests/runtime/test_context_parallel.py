"""Context parallelism (`autopar.manual_plan(..., cp=N)`): each sample's sequence split over the
"cp" axis. A Llama-style decoder (RoPE, grouped-query attention, causal mask) at a sequence of
512, trained on 4 gloo ranks under dp=2 x cp=2 and cp=2 x tp=2: the loss after every step equals
single-process training within 1e-5 relative.

On cp, the intra-op solver picks how attention runs, by price: with heads to spare it moves the
tokens to a split of the heads by all-to-all (as DeepSpeed-Ulysses does); where tp splits the
heads already, or there is one head, the queries stay split along the sequence and the
keys and values are gathered (as Llama 3's context parallelism does), each rank's causal rows
masked by where they sit. Both run here; in the second, every attention call on every rank
takes 1/cp of the sequence's queries."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import autopar
from autopar.errors import MeshError
from autopar.models import registry
from autopar.models.llama import Llama
from tests.helpers.distributed import run_on_ranks
from tests.helpers.models import fast_cpu_cluster, sgd_losses

SEQ = 512
STEPS = 3
FAMILY, BASE = registry.entry("llama-test")
CONFIGS = {
    # 4 query heads, 2 key/value heads: cp may split heads
    "gqa": dataclasses.replace(BASE, seq_len=SEQ),
    # one head: cp cannot split it
    "one-head": dataclasses.replace(BASE, seq_len=SEQ, n_head=1, n_kv_head=1, d_model=32),
}
MESHES = {"dp2xcp2": dict(dp=2, cp=2, tp=1), "cp2xtp2": dict(dp=1, cp=2, tp=2)}
CASES = {  # name: (config, mesh, attention queries split along the sequence)
    "gqa-dp2xcp2": ("gqa", "dp2xcp2", False),
    "gqa-cp2xtp2": ("gqa", "cp2xtp2", True),  # tp splits the heads; cp the queries
    "one-head-dp2xcp2": ("one-head", "dp2xcp2", True),
}


def _batches(config: str, batch: int):
    torch.manual_seed(1)
    return [FAMILY.batch(CONFIGS[config], batch) for _ in range(STEPS)]


def _model(config: str):
    torch.manual_seed(0)
    return Llama(CONFIGS[config])


def _plan(case: str) -> autopar.Plan:
    config, mesh, _ = CASES[case]
    batch = MESHES[mesh]["dp"]
    with torch.device("meta"):
        model = Llama(CONFIGS[config])
    return autopar.manual_plan(model, fast_cpu_cluster(4), _batches(config, batch)[0],
                               loss_fn=FAMILY.loss, pp=1, microbatch_size=1, **MESHES[mesh])


def _reference(config: str, batch: int) -> list[float]:
    model = _model(config)

    def step(x, y):
        loss = FAMILY.loss(model(x), y)
        loss.backward()
        return loss.item()

    return sgd_losses(model.parameters(), step, _batches(config, batch))


def _train(config: str, batch: int, plan_json: str):
    """On every rank: the losses of the steps, and the local query shape of every attention
    call in the last step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    queries = []
    attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                 torch.ops.aten._scaled_dot_product_attention_math.default,
                 torch.ops.aten.scaled_dot_product_attention.default}

    class _Queries(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in attention:
                queries.append(tuple(getattr(args[0], "_local_tensor", args[0]).shape))
            return func(*args, **(kwargs or {}))

    model = _model(config)
    data = _batches(config, batch)
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    pm = autopar.autoparallelize(model, fast_cpu_cluster(4), data[0], loss_fn=FAMILY.loss,
                                 plan=plan)
    losses = sgd_losses(pm.parameters(), pm.train_step, data[:-1])

    def last_step(x, y):
        with _Queries():
            return pm.train_step(x, y)

    return losses + sgd_losses(pm.parameters(), last_step, data[-1:]), queries


def test_inputs_split_along_the_sequence_and_attention_chooses():
    for case, (config, mesh, split_queries) in CASES.items():
        plan = _plan(case)
        cp = list(plan.mesh).index("cp")
        assert all(v[cp] == "S(1)" for v in plan.inputs.values()), (case, plan.inputs)
        assert all(v[cp] == "R" for v in plan.parameters.values()), case
        sdpa = [op for name, op in plan.ops.items()
                if name.startswith("scaled_dot_product_attention")]
        assert len(sdpa) == CONFIGS[config].n_layer
        for op in sdpa:
            q, k, v = (pl[cp] for pl in op.inputs)
            want = ("S(2)", "R", "R") if split_queries else ("S(1)",) * 3  # Ulysses: heads
            assert (q, k, v) == want, (case, op)


def test_cp_must_divide_the_sequence_and_needs_one():
    with torch.device("meta"):
        model = Llama(CONFIGS["gqa"])
    with pytest.raises(MeshError, match="cp=3 does not divide the sequence of 512 tokens"):
        autopar.manual_plan(model, fast_cpu_cluster(3), _batches("gqa", 1)[0],
                            loss_fn=FAMILY.loss, pp=1, dp=1, tp=1, cp=3, microbatch_size=1)
    with torch.device("meta"):
        vit, example, loss_fn = registry.build_model("vit-test", batch=2, seq=None)
    with pytest.raises(MeshError, match="cp=2: context parallelism splits a sequence of tokens"):
        autopar.manual_plan(vit, fast_cpu_cluster(2), example, loss_fn=loss_fn, pp=1, dp=1,
                            tp=1, cp=2, microbatch_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_trains_as_one_process(case):
    config, mesh, split_queries = CASES[case]
    cfg, sizes = CONFIGS[config], MESHES[mesh]
    batch = sizes["dp"]
    want = _reference(config, batch)
    for losses, queries in run_on_ranks(_train, 4, config, batch, _plan(case).to_json()):
        assert losses == pytest.approx(want, rel=1e-5)
        assert queries, "no attention call was seen"
        for shape in queries:  # (local batch, local heads, local queries, head dim)
            if split_queries:
                assert shape[2] == SEQ // sizes["cp"], shape
            else:
                assert shape[2] == SEQ and shape[1] == cfg.n_head // (sizes["cp"] * sizes["tp"])
