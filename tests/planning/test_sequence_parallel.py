"""The search weighs sequence parallelism: with tensor parallelism and a memory limit the fastest
sharding does not meet, it splits the residual stream along the sequence over tp when that
fits as fast, before trading time for memory (autopar.planning.search, second pass)."""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from autopar.planning import sequence_parallel

CFG = GPTConfig(vocab_size=512, seq_len=256, n_layer=2, n_head=8, d_model=512)
MESH = {"pp": 1, "dp": 1, "tp": 4}


def _plan(**options) -> autopar.Plan:
    with torch.device("meta"):
        model = GPT(CFG)
    ids = torch.zeros(8, CFG.seq_len, dtype=torch.long, device="meta")
    return autopar.plan(model, autopar.Cluster.preset("h100-80g", devices_per_node=4),
                        (ids, ids), loss_fn=lm_loss, mesh=MESH, checkpoint="none",
                        microbatch_size=8, **options)


def _norms_on_tp(plan: autopar.Plan) -> set[str]:
    tp = list(plan.mesh).index("tp")
    return {op.outputs[0][tp] for name, op in plan.ops.items()
            if name.startswith("native_layer_norm")}


def test_the_search_splits_the_sequence_where_memory_binds():
    free = _plan()
    assert _norms_on_tp(free) == {"R"}  # nothing binds: Megatron's tensor parallelism
    limit = free.predicted["peak_memory_bytes"] * 0.85
    bound = _plan(memory_limit=limit)
    assert _norms_on_tp(bound) == {"S(1)"}
    assert bound.predicted["peak_memory_bytes"] <= limit
    # the memory came from the stream's activations, not from time
    assert bound.predicted["step_time_s"] == pytest.approx(free.predicted["step_time_s"],
                                                          rel=1e-3)


def test_the_stream_is_what_crosses_layers():
    from autopar.trace import trace_for_training

    with torch.device("meta"):
        model = GPT(CFG)
    ids = torch.zeros(2, CFG.seq_len, dtype=torch.long, device="meta")
    traced = trace_for_training(model, (ids, ids), lm_loss)
    assert sequence_parallel.stream_shapes(traced) == {(2, CFG.seq_len, CFG.d_model)}
    names = sequence_parallel.stream_nodes(traced)
    kinds = {name.rstrip("_0123456789") for name in names}
    assert kinds == {"embedding", "add", "native_layer_norm"}
    assert sum(n.startswith("native_layer_norm") for n in names) == 2 * CFG.n_layer + 1
