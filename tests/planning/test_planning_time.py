"""Planning time does not grow with depth for models of several stacks: a T5 with 12 blocks per
stack plans for a 4-GPU node about as fast as one with 4 (the stand-in keeps 4 blocks of each
stack; export's trace, linear in depth, is timed apart and left out). One microbatch size per
data-parallel rank: every other would cost a trace of each model and add nothing here."""

from __future__ import annotations

import time

import pytest
import torch

import autopar
import autopar.trace


def _t5(layers: int):
    import transformers

    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=layers, num_heads=4, d_kv=8,
                                   vocab_size=128, decoder_start_token_id=0, pad_token_id=0)
    with torch.device("meta"):
        return transformers.T5ForConditionalGeneration(config).train()


def _planning_s(layers: int, monkeypatch) -> tuple[float, autopar.Plan]:
    """CPU seconds of `autopar.plan` less those of its traces."""
    traced_s = [0.0]
    trace = autopar.trace.trace_for_training

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return trace(*args, **kwargs)
        finally:
            traced_s[0] += time.process_time() - start

    monkeypatch.setattr(autopar.trace, "trace_for_training", timed)
    ids = torch.ones(8, 16, dtype=torch.long)
    start = time.process_time()
    plan = autopar.plan(_t5(layers), autopar.Cluster.preset("h100-80g", devices_per_node=4),
                        {"input_ids": ids, "labels": ids}, schedule="1F1B", microbatch_size=1)
    return time.process_time() - start - traced_s[0], plan


@pytest.mark.slow
def test_t5_planning_time_does_not_grow_with_depth(monkeypatch):
    shallow_s, shallow = _planning_s(4, monkeypatch)
    deep_s, deep = _planning_s(12, monkeypatch)
    assert shallow.solver["candidates"] == deep.solver["candidates"]
    assert deep_s <= 1.5 * shallow_s, (shallow_s, deep_s)
