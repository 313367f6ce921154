"""The bounds the search checks before an intra-op solve: below every sharding's per-microbatch
work on every stage mesh, and below every candidate's step with the parameters' data-parallel
charges added; pruning with them never changes the plan."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
import torch

import autopar
import autopar.planning.search as search
from autopar.layers import assign_layers, layer_order
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.llama import Llama, LlamaConfig
from autopar.models.losses import lm_loss
from autopar.planning.candidate import bubble_weight, busiest_rank_bound
from autopar.planning.layer_costs import (
    StateBound,
    layer_costs,
    prepare,
    solve_layers,
    state_bound,
)
from autopar.planning.profile import TrainingPrecision
from autopar.schedules import get_schedule
from autopar.trace import trace_for_training

CLUSTER = autopar.Cluster.preset("h100-80g", devices_per_node=8)
SEQ = 512
MODELS = {  # wide enough that compute, not the host, sets the pace (built on meta: no memory)
    "gpt": lambda: GPT(GPTConfig(vocab_size=4096, seq_len=SEQ, n_layer=6, n_head=16,
                                 d_model=1024)),
    "llama": lambda: Llama(LlamaConfig(vocab_size=4096, seq_len=SEQ, n_layer=6, n_head=16,
                                       n_kv_head=4, d_model=1024, ffn_hidden=2816)),
    # narrow: the host's time to issue the ops is longer than the device's to run them
    "narrow": lambda: GPT(GPTConfig(vocab_size=512, seq_len=SEQ, n_layer=6, n_head=4,
                                    d_model=512)),
}


@pytest.mark.parametrize("name,mesh", [
    ("gpt", {"dp": 1, "tp": 8}), ("gpt", {"dp": 2, "tp": 4}), ("gpt", {"dp": 8, "tp": 1}),
    ("llama", {"dp": 2, "tp": 4}),  # RMSNorm, rotary, SwiGLU, grouped attention
], ids=["gpt-tp8", "gpt-dp2-tp4", "gpt-dp8", "llama-dp2-tp4"])
def test_compute_bound_is_below_every_layer_sum_the_solve_gives(name, mesh):
    with torch.device("meta"):
        model = MODELS[name]()
    x = torch.zeros(8, SEQ, dtype=torch.long, device="meta")
    stand, profiles = prepare(trace_for_training(model, (x, x), lm_loss))
    precision = TrainingPrecision.mixed_bf16()
    assert stand.is_shallow  # six blocks: the stand-in's third stands for blocks 2 to 5
    per_layer = search._compute_bounds(stand, profiles, CLUSTER, mesh).layers
    bound = sum(per_layer)
    # the least-memory sharding of GPT too (Llama's takes long to prove and adds no kind of op)
    for least in (False, True) if name == "gpt" else (False,):
        solved = solve_layers(stand, profiles, CLUSTER, mesh, precision=precision,
                              least_memory=least)
        for flavour in ("replicate", "zero3"):
            costs = layer_costs(stand, profiles, CLUSTER, mesh, flavour, precision=precision,
                                solved=solved)
            works = [min(o.fwd_s + o.bwd_s for o in x.options) for x in costs.layers]
            assert len(per_layer) == len(works)
            for lower, work in zip(per_layer, works):  # layer by layer, in pipeline order
                assert 0 < lower <= work * (1 + 1e-12), (lower, work)
            # and not a trivial one: compute is most of this work on one node
            assert bound > 0.3 * sum(works), (bound, sum(works))


@pytest.mark.parametrize("mesh", [{"dp": 8, "tp": 1}, {"dp": 2, "tp": 4}], ids=["dp8", "dp2-tp4"])
def test_where_the_host_sets_the_pace_the_bound_is_each_layers_work(mesh):
    """A narrow GPT on the calibrated H100: issuing a layer's ops takes the host longer than
    the device takes to run them, whatever the sharding, so each layer's bound is its host
    time, and that is exactly the work the solve gives it (compute alone would be a few
    percent of it, and the search would solve pairs a bound can rule out)."""
    with torch.device("meta"):
        model = MODELS["narrow"]()
    x = torch.zeros(8, SEQ, dtype=torch.long, device="meta")
    stand, profiles = prepare(trace_for_training(model, (x, x), lm_loss))
    precision = TrainingPrecision.mixed_bf16()
    bounds = search._compute_bounds(stand, profiles, CLUSTER, mesh)
    solved = solve_layers(stand, profiles, CLUSTER, mesh, precision=precision)
    costs = layer_costs(stand, profiles, CLUSTER, mesh, "replicate", precision=precision,
                        solved=solved)
    works = [min(o.fwd_s + o.bwd_s for o in x.options) for x in costs.layers]
    assert len(bounds.layers) == len(works)
    for lower, host, work in zip(bounds.layers, bounds.host, works):
        assert lower == host and work * (1 - 1e-9) <= lower <= work * (1 + 1e-12), (lower, work)


@pytest.mark.parametrize("seed", range(40))
def test_busiest_rank_bound_is_the_least_busiest_rank_of_any_cut(seed):
    """Against every cut of a few layers into pp * v contiguous stages (stage s on rank
    s mod pp, as interleaved 1F1B runs them): at most the least busiest rank of them all, and
    with one stage a rank equal to it."""
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    works = [rng.choice([0.0, 1.0, rng.uniform(0.1, 5.0)]) for _ in range(n)]
    pp, v = rng.randint(1, 4), rng.choice([1, 1, 2])
    bound = busiest_rank_bound(works, pp, v)
    least = math.inf
    for ends in itertools.combinations(range(1, n), pp * v - 1):  # non-empty stages
        edges = (0, *ends, n)
        ranks = [0.0] * pp
        for s in range(pp * v):
            ranks[s % pp] += sum(works[edges[s]:edges[s + 1]])
        least = min(least, max(ranks))
    if least == math.inf:
        return  # fewer layers than stages: no cut to compare with
    assert bound <= least * (1 + 1e-12), (works, pp, v, bound, least)
    if v == 1:
        assert bound >= least * (1 - 1e-9) - 1e-12, (works, pp, bound, least)


@pytest.mark.parametrize("name,mesh", [
    ("gpt", {"pp": 1, "dp": 2, "tp": 4}), ("gpt", {"pp": 2, "dp": 4, "tp": 1}),
    ("gpt", {"pp": 2, "dp": 2, "tp": 2}),
    ("gpt", {"pp": 4, "dp": 2, "tp": 1}),  # 8 layers on 4 ranks: the busiest holds more than 1/4
    # the host sets the pace, and ZeRO's collectives of each microbatch hide behind it
    ("narrow", {"pp": 1, "dp": 2, "tp": 4}), ("narrow", {"pp": 2, "dp": 4, "tp": 1}),
], ids=["dp2-tp4", "pp2-dp4", "pp2-dp2-tp2", "pp4-dp2", "narrow-dp2-tp4", "narrow-pp2-dp4"])
def test_the_state_bound_is_below_every_candidate_of_the_mesh(name, mesh):
    """Every flavour's `StateBound` over the fastest sharding's objective is at most the step of
    each candidate the search scores for that flavour, of the fastest and of the least-memory
    sharding, under every schedule; and, with dp, above the bound without it."""
    with torch.device("meta"):
        model = MODELS[name]()
    mb, m = 8, 4
    x = torch.zeros(mb, SEQ, dtype=torch.long, device="meta")
    stand, profiles = prepare(trace_for_training(model, (x, x), lm_loss))
    order = layer_order(assign_layers(stand.full))
    precision = TrainingPrecision.mixed_bf16()
    sub_mesh = {a: n for a, n in mesh.items() if a != "pp"}
    pp = mesh["pp"]
    space = search.SearchSpace(meshes=[mesh], microbatch_sizes=None,
                               schedules=("1F1B", "Interleaved1F1B", "ZBVZeroBubble"),
                               flavours=("replicate", "zero2", "zero3"))
    fastest = solve_layers(stand, profiles, CLUSTER, sub_mesh, precision=precision)
    assert fastest[2].status == "optimal"
    work = fastest[2].objective_s
    least = solve_layers(stand, profiles, CLUSTER, sub_mesh, precision=precision,
                         least_memory=True, built=fastest)
    schedules = list(search._schedules(space, pp, m, len(order)))
    per_layer = search._compute_bounds(stand, profiles, CLUSTER, sub_mesh)
    for flavour in space.flavours:
        bounds = state_bound(stand.full, CLUSTER, sub_mesh, flavour, precision=precision)
        assert bounds.step_s > 0 and bounds.gradient_bytes > 0 and bounds.state_bytes > 0
        for solved in (fastest, least):
            costs = layer_costs(stand, profiles, CLUSTER, sub_mesh, flavour,
                                precision=precision, solved=solved)
            for schedule, v in schedules:
                b = bubble_weight(schedule, pp, m, v)
                # the busiest rank's share as the search bounds it, from each layer's compute
                busiest = busiest_rank_bound(per_layer.layers, pp, v)
                lower = bounds.step_bound_s(work, pp, m, b, CLUSTER.device, busiest,
                                            host_s=sum(per_layer.host))
                runnable = costs  # a split backward runs no selective checkpointing
                if get_schedule(schedule).split_backward:
                    runnable = dataclasses.replace(costs, layers=search._offered(
                        costs.layers, ("none", "full")))
                c = search._best_cut(runnable, CLUSTER, mesh, mb, m, schedule, v, flavour,
                                     order, float("inf"), "highs", None)
                assert lower <= c.step_time_s * (1 + 1e-12), (flavour, schedule, lower, c)
                # the busiest rank holds at least its share of the state at its smallest
                assert bounds.state_bytes / pp <= c.peak_memory_bytes * (1 + 1e-12)
                without = b * work + (m - b) * work / pp
                assert lower > without


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {},
    # replicated state over 0.5 GiB on pp x tp of 1 and 2 ranks: pairs left out before solving
    {"data_parallel": "replicate", "memory_limit": 0.5 * 2**30},
], ids=["time", "memory"])
def test_pruning_before_the_solve_changes_no_plan(monkeypatch, options):
    with torch.device("meta"):
        model = MODELS["gpt"]()
    x = torch.zeros(16, SEQ, dtype=torch.long, device="meta")
    lines = []
    pruned = autopar.plan(model, CLUSTER, (x, x), loss_fn=lm_loss, schedule="1F1B",
                          log=lines.append, **options)
    # "...; N meshes x microbatches ruled out by a bound before solving, K by their state's
    # memory) in ..."
    by_time, by_memory = (int(part.split()[0]) for part in lines[-1].split("; ")[1].split(", "))
    assert by_time > 0 and (by_memory > 0) == bool(options), lines[-1]
    monkeypatch.setattr(search, "_compute_bounds", lambda *a: search.WorkBound((0.0,), (0.0,)))
    monkeypatch.setattr(search, "state_bound", lambda *a, **k: StateBound(0.0, 0.0, 0.0, 0.0))
    unpruned = autopar.plan(model, CLUSTER, (x, x), loss_fn=lm_loss, schedule="1F1B",
                            **options)
    assert pruned.predicted["step_time_s"] == unpruned.predicted["step_time_s"]
    assert pruned.mesh == unpruned.mesh and pruned.pipeline == unpruned.pipeline
