"""The search and context parallelism: it tries cp (every size that divides the sequence) for a
model with token inputs whose activations per sample bind memory, and not otherwise; its plan
is never slower than the hand configurations with cp it could have chosen."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autopar
from autopar.models import registry
from autopar.planning import context_parallel
from autopar.trace_repeats import tracer
from tests.helpers.models import fast_cpu_cluster

LLAMA, LLAMA_TEST = registry.entry("llama-test")
CONFIG = dataclasses.replace(LLAMA_TEST, seq_len=2048)
MiB = 2**20


def _llama():
    with torch.device("meta"):
        return LLAMA.model(CONFIG)


def test_cp_is_tried_for_token_models_whose_activations_bind():
    probe = tracer(_llama(), LLAMA.loss)(LLAMA.batch(CONFIG, 2))
    per_sample = context_parallel.activation_bytes_per_sample(probe, 2)
    assert 10 * MiB < per_sample < 100 * MiB  # about 24 MiB at 2048 tokens
    assert context_parallel.search_sizes(probe, 2, 2 * per_sample) == 2048
    assert context_parallel.search_sizes(probe, 2, 8 * per_sample) == 0  # a quarter or less
    with torch.device("meta"):
        vit, example, loss_fn = registry.build_model("vit-test", batch=2, seq=None)
    images = tracer(vit, loss_fn)(example)
    assert context_parallel.sequence_length(images) is None
    assert context_parallel.search_sizes(images, 2, 1) == 0


def _search(memory_limit: float) -> tuple[autopar.Plan, list[str]]:
    lines: list[str] = []
    plan = autopar.plan(_llama(), fast_cpu_cluster(4), LLAMA.batch(CONFIG, 1),
                        loss_fn=LLAMA.loss, memory_limit=memory_limit, log=lines.append)
    return plan, lines


@pytest.mark.slow
def _pairs(lines: list[str]) -> int:
    """How many (mesh, microbatch) pairs the search weighed: n of its "[i/n]" progress lines
    (it solves them best first by a lower bound and stops where the bound says the rest
    cannot win, so only those it solved have a line)."""
    return int(next(line for line in lines if line.startswith("[")).split("/")[1].split("]")[0])


def test_the_search_weighs_cp_where_activations_bind_and_never_loses_to_it():
    plan, lines = _search(8 * MiB)
    for hand in (dict(cp=4, tp=1), dict(cp=2, tp=2)):
        by_hand = autopar.manual_plan(_llama(), fast_cpu_cluster(4), LLAMA.batch(CONFIG, 1),
                                      loss_fn=LLAMA.loss, pp=1, dp=1, microbatch_size=1, **hand)
        assert plan.predicted["step_time_s"] <= by_hand.predicted["step_time_s"] * (1 + 1e-9)
    _, roomy = _search(16 * 2**30)
    assert not any(" cp=2 " in line or " cp=4 " in line for line in roomy)
    # where activations bind, the cp meshes join the pairs weighed (cp=2 and cp=4, each with
    # tp=1 and, for cp=2, tp=2 beside it: the meshes of 4 devices with cp)
    assert _pairs(lines) > _pairs(roomy)


def test_a_search_on_cp_alone_shards_state_over_it():
    """dp=1, cp=4: the flavours that shard state are offered (over cp), not the hybrid one."""
    searched = autopar.plan(_llama(), fast_cpu_cluster(4), LLAMA.batch(CONFIG, 1),
                            loss_fn=LLAMA.loss, mesh={"cp": 4})  # every flavour offered
    assert searched.data_parallel in ("replicate", "zero2", "zero3")
    for flavour in ("zero2", "zero3"):
        plan = autopar.plan(_llama(), fast_cpu_cluster(4), LLAMA.batch(CONFIG, 1),
                            loss_fn=LLAMA.loss, mesh={"cp": 4}, data_parallel=flavour)
        assert plan.data_parallel == flavour
        assert all(pl == ["S(0)"] for pl in plan.parameters.values()), plan.parameters
