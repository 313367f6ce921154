"""The search's last step on a pipelined candidate (`search._on_timeline`): cuts that only move
layers between the stages of one rank often tie in the stage model but not on the schedule's
timeline, so the search swaps such stages' sizes while that makes the step faster and fits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import autopar
import solvers
import autopar.planning.search as search
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from autopar.planning.candidate import Candidate, evaluate, pipeline_problem
from autopar.planning.layer_costs import layer_costs, prepare, solve_layers
from autopar.planning.profile import TrainingPrecision
from autopar.trace import trace_for_training

CLUSTER = autopar.Cluster.preset("h100-80g", devices_per_node=8)
MESH = {"pp": 2, "dp": 1, "tp": 4}


@pytest.fixture(scope="module")
def costs():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=4096, seq_len=512, n_layer=6, n_head=16, d_model=1024))
    x = torch.zeros(2, 512, dtype=torch.long, device="meta")
    stand, profiles = prepare(trace_for_training(model, (x, x), lm_loss))
    sub = {"tp": 4}
    precision = TrainingPrecision.mixed_bf16()
    solved = solve_layers(stand, profiles, CLUSTER, sub, precision=precision)
    return layer_costs(stand, profiles, CLUSTER, sub, "replicate", precision=precision,
                       solved=solved)


@pytest.mark.parametrize("schedule", ["Interleaved1F1B", "ZBVZeroBubble"])
def test_swaps_on_one_rank_never_slow_a_cut_and_end_where_no_swap_helps(costs, schedule):
    m, v = 4, 2
    problem = pipeline_problem(costs, CLUSTER, 2, m, schedule, v, math.inf)
    ranks = problem.ranks
    names = [layer.name for layer in costs.layers]  # pre, 6 blocks, post
    options = {name: "none" for name in names}
    improved = 0
    for ends in itertools.combinations(range(1, len(names)), 3):  # every cut into 4 stages
        bounds = (0, *ends, len(names))
        stages = tuple(tuple(names[a:b]) for a, b in zip(bounds, bounds[1:]))
        c = evaluate(Candidate(mesh=dict(MESH), microbatch_size=2, num_microbatches=m,
                               schedule=schedule, v=v, flavour="replicate", stages=stages,
                               options=options, costs=costs, cut="ilp-optimal"), CLUSTER)
        before = [len(st) for st in c.stages]
        polished = search._on_timeline(c, problem, CLUSTER, math.inf, None)
        after = [len(st) for st in polished.stages]
        assert polished.step_time_s <= c.step_time_s
        for r in set(ranks):  # only sizes moved between one rank's stages
            mine = [s for s in range(len(ranks)) if ranks[s] == r]
            assert sorted(before[s] for s in mine) == sorted(after[s] for s in mine)
        if polished.step_time_s < c.step_time_s:
            improved += 1
            # it ends where no swap of one rank's stage sizes is faster
            for a, b in itertools.combinations(range(len(ranks)), 2):
                if ranks[a] == ranks[b]:
                    sizes = list(after)
                    sizes[a], sizes[b] = sizes[b], sizes[a]
                    other = evaluate(Candidate(
                        mesh=dict(MESH), microbatch_size=2, num_microbatches=m,
                        schedule=schedule, v=v, flavour="replicate",
                        stages=search._restage(polished.stages, sizes), options=options,
                        costs=costs), CLUSTER)
                    assert other.step_time_s >= polished.step_time_s
    assert improved >= 3  # the timeline does tell such cuts apart


def test_a_losing_candidate_skips_the_timeline_but_not_its_memory(costs):
    # evaluate(losing_at=...) runs the timeline only when the stage model and the dp sync stay
    # under the step the caller has; otherwise the step is that lower bound, memory exact.
    names = [layer.name for layer in costs.layers]
    problem = pipeline_problem(costs, CLUSTER, 2, 4, "Interleaved1F1B", 2, math.inf)

    def made(stages, **kw):
        return evaluate(Candidate(mesh=dict(MESH), microbatch_size=2, num_microbatches=4,
                                  schedule="Interleaved1F1B", v=2, flavour="replicate",
                                  stages=stages, options={n: "none" for n in names},
                                  costs=costs), CLUSTER, **kw)

    charged = 0
    for ends in itertools.combinations(range(1, len(names)), 3):
        bounds = (0, *ends, len(names))
        stages = tuple(tuple(names[a:b]) for a, b in zip(bounds, bounds[1:]))
        full = made(stages)
        floor = solvers.evaluate_pipeline(problem, stages, full.options)[0] + full.dp_sync_s
        assert made(stages, losing_at=math.inf).step_time_s == full.step_time_s
        lost = made(stages, losing_at=floor)
        assert lost.step_time_s == pytest.approx(floor) and floor <= full.step_time_s * (1 + 1e-12)
        assert lost.rank_memory == full.rank_memory
        assert lost.peak_memory_bytes == full.peak_memory_bytes
        if full.step_time_s > floor * 1.001:  # the timeline charges this cut more
            charged += 1
            assert made(stages, losing_at=floor * 1.001).step_time_s == full.step_time_s
    assert charged >= 3
