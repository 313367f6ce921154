"""Planning time does not grow with depth for models of several stacks: a T5 with 18 blocks per
stack plans for a 4-GPU node about as fast as one with 6, traces included (the planner traces a
long run of blocks as four, `autopar.trace_repeats`, and solves three of each stack, the
stand-in). Both depths take that path: a stack of 4 is traced whole (its run, after T5's first
block, is too short to cut), and so traces fewer blocks than any cut one, which made a 4-to-12
comparison measure the cut itself (1.2-1.45x over CI runs). One microbatch size per data-parallel rank: every other would cost a trace of each
model and add nothing here."""

from __future__ import annotations

import time

import pytest
import torch

import autopar


def _t5(layers: int):
    import transformers

    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=layers, num_heads=4, d_kv=8,
                                   vocab_size=128, decoder_start_token_id=0, pad_token_id=0)
    with torch.device("meta"):
        return transformers.T5ForConditionalGeneration(config).train()


def _planning_s(layers: int) -> tuple[float, autopar.Plan]:
    """CPU seconds of `autopar.plan`, its traces included."""
    ids = torch.ones(8, 16, dtype=torch.long)
    model = _t5(layers)
    start = time.process_time()
    plan = autopar.plan(model, autopar.Cluster.preset("h100-80g", devices_per_node=4),
                        {"input_ids": ids, "labels": ids}, schedule="1F1B", microbatch_size=1)
    return time.process_time() - start, plan


@pytest.mark.slow
def test_t5_planning_time_does_not_grow_with_depth():
    shallow_s, shallow = _planning_s(6)
    deep_s, deep = _planning_s(18)
    assert shallow.solver["candidates"] == deep.solver["candidates"]
    assert deep_s <= 1.3 * shallow_s, (shallow_s, deep_s)
