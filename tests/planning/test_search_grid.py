"""The planner is never slower (simulated) than the best hand configuration in its own search
space, on a grid of small cases: a GPT- and a Llama-style model (on meta: planning needs no
memory) x 4 H100s in one node and 8 in four nodes of 2 (so tp 4 and 8 cross nodes; the H100's
datasheet figures, see CLUSTERS) x the device's memory and a tight limit that only a quarter of
the hand configurations fit.

The hand configurations are every `autopar.manual_plan` (Megatron-style: even stages, one
checkpoint policy for every block) of tp x pp x dp x microbatch size x checkpoint policy x
schedule x data-parallel sharding (ZeRO 0/2/3, hybrid) that manual_plan accepts; it rightly
refuses shapes that do not divide (batch by dp x microbatch, heads by tp, layers by stages) and
checkpointing a schedule cannot run.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import autopar
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.llama import Llama, LlamaConfig
from autopar.models.losses import lm_loss
from autopar.parallelism import POLICIES
from autopar.planning import search
from tests.helpers.models import datasheet
from tests.helpers.planning import shared_planning_work

BATCH = 4
SEQ = 64
MODELS = {  # 8 heads (Llama: 4 kv heads), so hand configurations may take tp 1, 2, 4 (and 8)
    "gpt": lambda: GPT(GPTConfig(vocab_size=512, seq_len=SEQ, n_layer=2, n_head=8, d_model=256)),
    "llama": lambda: Llama(LlamaConfig(vocab_size=512, seq_len=SEQ, n_layer=2, n_head=8,
                                       n_kv_head=4, d_model=256, ffn_hidden=512)),
}
# the H100's datasheet figures: with its calibration (71 us to issue an op, 21 us the least an
# op takes) these small models are host-bound, and in every case the fastest hand
# configuration fits the tight limit, which then binds nothing
CLUSTERS = {
    "1x4": lambda: datasheet(autopar.Cluster.preset("h100-80g", devices_per_node=4)),
    "4x2": lambda: datasheet(autopar.Cluster.preset("h100-80g", nodes=4, devices_per_node=2)),
}
pytestmark = pytest.mark.slow  # hundreds of hand configurations planned per case
MIN_HAND_CONFIGS = 100  # per case: the grid must really compare, not skip its way to a pass


@pytest.fixture(scope="module", autouse=True)
def shared_work():
    """The plans and hand configurations of a model share its traces, stand-ins and intra-op
    solves (tests/helpers/planning.py): hundreds of hand configurations reuse a few dozen."""
    with shared_planning_work():
        yield


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


class Grid:
    """The cases, each model built once (one object for both clusters, so that its traces are
    shared too); every case's hand configurations scored and its plans made once (per memory
    limit)."""

    def __init__(self):
        x = torch.zeros(BATCH, SEQ, dtype=torch.long, device="meta")
        with torch.device("meta"):
            models = {m: build() for m, build in MODELS.items()}
        self.cases = {(m, c): (models[m], (x, x), CLUSTERS[c]())
                      for m, c in itertools.product(MODELS, CLUSTERS)}
        self._hand: dict = {}
        self._plans: dict = {}

    def hand(self, case) -> list[tuple[float, float, dict]]:
        """(step seconds, peak bytes, config) of every hand configuration manual_plan takes."""
        if case not in self._hand:
            model, batch, cluster = self.cases[case]
            scored = []
            for config in hand_configurations(cluster.world_size):
                try:
                    plan = autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, **config)
                except autopar.AutoparError:  # a MeshError, or checkpointing the schedule refuses
                    continue
                report = autopar.simulate(plan)
                scored.append((report.step_time_s, plan.predicted["peak_memory_bytes"], config))
            self._hand[case] = scored
        return self._hand[case]

    def plan(self, case, memory_limit=None) -> autopar.Plan:
        if (case, memory_limit) not in self._plans:
            model, batch, cluster = self.cases[case]
            self._plans[case, memory_limit] = autopar.plan(model, cluster, batch, loss_fn=lm_loss,
                                                           memory_limit=memory_limit)
        return self._plans[case, memory_limit]


@pytest.fixture(scope="module")
def grid(shared_work) -> Grid:
    return Grid()


def tight_limit(scored) -> float:
    """A memory limit that a quarter of the hand configurations fit."""
    peaks = sorted(peak for _, peak, _ in scored)
    return peaks[len(peaks) // 4]


CASES = list(itertools.product(MODELS, CLUSTERS))


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_never_slower_than_the_best_hand_configuration(grid, case):
    scored = grid.hand(case)
    assert len(scored) >= MIN_HAND_CONFIGS
    best = min(scored, key=lambda s: s[0])
    got = autopar.simulate(grid.plan(case)).step_time_s
    assert got <= best[0] * (1 + 1e-9), (got, best)


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_never_slower_under_a_tight_memory_limit(grid, case):
    """Against the hand configurations that fit a limit the fastest of them does not."""
    scored = grid.hand(case)
    limit = tight_limit(scored)
    fits = [s for s in scored if s[1] <= limit]
    assert len(fits) >= MIN_HAND_CONFIGS // 4
    assert min(scored, key=lambda s: s[0])[1] > limit, "the limit must bind"
    plan = grid.plan(case, memory_limit=limit)
    report = autopar.simulate(plan)
    assert plan.predicted["peak_memory_bytes"] <= limit
    best = min(fits, key=lambda s: s[0])
    assert report.step_time_s <= best[0] * (1 + 1e-9), (report.step_time_s, best)


def test_the_grid_covers_every_axis_of_the_search(grid):
    """Across the grid, hand configurations of every value of every axis were compared, tp
    across nodes included."""
    compared = [config for case in CASES for _, _, config in grid.hand(case)]
    for axis, values in [("checkpoint", POLICIES), ("schedule", search.DEFAULT_SCHEDULES),
                         ("zero", (0, 2, 3)), ("tp", (1, 2, 4, 8)), ("pp", (1, 2, 4)),
                         ("dp", (1, 2, 4)), ("microbatch_size", (1, 2, 4)), ("dp_shard", (2,))]:
        assert {c.get(axis) for c in compared} >= set(values), axis
    across = [c for _, _, c in grid.hand(("gpt", "4x2")) if c["tp"] > 2]
    assert across, "tp across the 2-GPU nodes"
