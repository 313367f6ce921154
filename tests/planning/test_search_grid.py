"""The planner is never slower (simulated) than the best hand configuration in its own search
space, on a grid of small cases: a GPT- and a Llama-style model (on meta: planning needs no
memory) x 4 H100s in one node and 8 in four nodes of 2 (so tp 4 and 8 cross nodes) x the device's
memory and a tight limit that only a quarter of the hand configurations fit.

The hand configurations are every `autopar.manual_plan` (Megatron-style: even stages, one
checkpoint policy for every block) of tp x pp x dp x microbatch size x checkpoint policy x
schedule x data-parallel sharding (ZeRO 0/2/3, hybrid) that manual_plan accepts; it rightly
refuses shapes that do not divide (batch by dp x microbatch, heads by tp, layers by stages) and
checkpointing a schedule cannot run.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import autopar
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.llama import Llama, LlamaConfig
from autopar.models.losses import lm_loss
from autopar.parallelism import POLICIES
from autopar.planning import search
from tests.helpers import background
from tests.helpers.planning import shared_planning_work

BATCH = 4
SEQ = 64
MODELS = {  # 8 heads (Llama: 4 kv heads), so hand configurations may take tp 1, 2, 4 (and 8)
    "gpt": lambda: GPT(GPTConfig(vocab_size=512, seq_len=SEQ, n_layer=2, n_head=8, d_model=256)),
    "llama": lambda: Llama(LlamaConfig(vocab_size=512, seq_len=SEQ, n_layer=2, n_head=8,
                                       n_kv_head=4, d_model=256, ffn_hidden=512)),
}
CLUSTERS = {
    "1x4": lambda: autopar.Cluster.preset("h100-80g", devices_per_node=4),
    "4x2": lambda: autopar.Cluster.preset("h100-80g", nodes=4, devices_per_node=2),
}
pytestmark = pytest.mark.slow  # hundreds of hand configurations planned per case
MIN_HAND_CONFIGS = 100  # per case: the grid must really compare, not skip its way to a pass


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def hand_configurations(world: int):
    """Every tp x pp x dp x microbatch x checkpoint x schedule x data-parallel sharding of
    `world` devices."""
    for tp in _divisors(world):
        for pp in _divisors(world // tp):
            dp = world // tp // pp
            schedules = search.DEFAULT_SCHEDULES if pp > 1 else ("1F1B",)  # pp 1: no schedule
            for mb, ckpt, schedule, sharding in itertools.product(
                    _divisors(BATCH // dp) if BATCH % dp == 0 else [1], POLICIES, schedules,
                    _dp_shardings(dp)):
                yield dict(tp=tp, pp=pp, dp=dp, microbatch_size=mb, checkpoint=ckpt,
                           schedule=schedule, **sharding)


def _dp_shardings(dp: int) -> list[dict]:
    """ZeRO 0, 2 and 3 (ZeRO-1 is planned as ZeRO-2), and hybrid sharding (ZeRO-3 within groups
    of dp_shard ranks, replicated across them) for every group size between 1 and dp."""
    if dp == 1:
        return [dict(zero=0)]
    return [dict(zero=z) for z in (0, 2, 3)] + [
        dict(zero=3, dp_shard=d) for d in _divisors(dp) if 1 < d < dp]


def tight_limit(scored) -> float:
    """A memory limit that a quarter of the hand configurations fit."""
    peaks = sorted(peak for _, peak, _ in scored)
    return peaks[len(peaks) // 4]


def grid_of(model_name: str) -> dict:
    """For each cluster: every hand configuration manual_plan takes, scored (step seconds,
    peak bytes, config); the plan, and the plan under the tight limit (JSON, with the limit).
    One model's plans and hand configurations share traces, stand-ins and intra-op solves
    (tests/helpers/planning.py): hundreds of hand configurations reuse a few dozen. Made by the
    session's worker (tests/helpers/background.py): a minute of planning for Llama."""
    x = torch.zeros(BATCH, SEQ, dtype=torch.long, device="meta")
    with torch.device("meta"):
        model = MODELS[model_name]()
    grid = {}
    with shared_planning_work():
        for c in CLUSTERS:
            cluster = CLUSTERS[c]()
            scored = []
            for config in hand_configurations(cluster.world_size):
                try:
                    plan = autopar.manual_plan(model, cluster, (x, x), loss_fn=lm_loss, **config)
                except autopar.AutoparError:  # a MeshError, or checkpointing the schedule refuses
                    continue
                report = autopar.simulate(plan)
                scored.append((report.step_time_s, plan.predicted["peak_memory_bytes"], config))
            limit = tight_limit(scored)
            grid[c] = {
                "hand": scored,
                "plan": autopar.plan(model, cluster, (x, x), loss_fn=lm_loss).to_json(),
                "tight": (limit, autopar.plan(model, cluster, (x, x), loss_fn=lm_loss,
                                              memory_limit=limit).to_json()),
            }
    return grid


def _plan(plan_json: str) -> autopar.Plan:
    return autopar.Plan.from_dict(json.loads(plan_json))


CASES = list(itertools.product(MODELS, CLUSTERS))


def _cases():
    for m, c in CASES:
        yield pytest.param((m, c), id=f"{m}-{c}", marks=background.work(grid_of, m))


@pytest.mark.parametrize("case", _cases())
def test_never_slower_than_the_best_hand_configuration(case):
    grid = background.value(grid_of, case[0])[case[1]]
    scored = grid["hand"]
    assert len(scored) >= MIN_HAND_CONFIGS
    best = min(scored, key=lambda s: s[0])
    got = autopar.simulate(_plan(grid["plan"])).step_time_s
    assert got <= best[0] * (1 + 1e-9), (got, best)


@pytest.mark.parametrize("case", _cases())
def test_never_slower_under_a_tight_memory_limit(case):
    """Against the hand configurations that fit a limit the fastest of them does not."""
    grid = background.value(grid_of, case[0])[case[1]]
    scored = grid["hand"]
    limit, plan_json = grid["tight"]
    fits = [s for s in scored if s[1] <= limit]
    assert len(fits) >= MIN_HAND_CONFIGS // 4
    assert min(scored, key=lambda s: s[0])[1] > limit, "the limit must bind"
    plan = _plan(plan_json)
    report = autopar.simulate(plan)
    assert plan.predicted["peak_memory_bytes"] <= limit
    best = min(fits, key=lambda s: s[0])
    assert report.step_time_s <= best[0] * (1 + 1e-9), (report.step_time_s, best)


@background.work(grid_of, "gpt")
@background.work(grid_of, "llama")
def test_the_grid_covers_every_axis_of_the_search():
    """Across the grid, hand configurations of every value of every axis were compared, tp
    across nodes included."""
    compared = [config for m, c in CASES
                for _, _, config in background.value(grid_of, m)[c]["hand"]]
    for axis, values in [("checkpoint", POLICIES), ("schedule", search.DEFAULT_SCHEDULES),
                         ("zero", (0, 2, 3)), ("tp", (1, 2, 4, 8)), ("pp", (1, 2, 4)),
                         ("dp", (1, 2, 4)), ("microbatch_size", (1, 2, 4)), ("dp_shard", (2,))]:
        assert {c.get(axis) for c in compared} >= set(values), axis
    across = [c for _, _, c in background.value(grid_of, "gpt")["4x2"]["hand"] if c["tp"] > 2]
    assert across, "tp across the 2-GPU nodes"
