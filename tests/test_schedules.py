"""Pipeline schedule models against torch's own action lists (autopar/schedules.py)."""

import sys
from collections import Counter

import pytest
import torch.distributed.pipelining as pipelining
from torch.distributed.pipelining.schedules import get_schedule_class

from autopar import schedules
from autopar.schedules import SCHEDULES, get_schedule, simulated_actions

V_CHOICES = {"GPipe": (1,), "1F1B": (1,), "ZBVZeroBubble": (2,)}


def _grid():
    """(name, pp, m, v): pp in {2, 4}, m in {pp, 2pp, 8}, v as the schedule allows."""
    for name, schedule in SCHEDULES.items():
        for pp in (2, 4):
            for m in sorted({pp, 2 * pp, 8}):
                for v in V_CHOICES.get(name, (2, 3)):
                    schedule.check(pp, m, v)  # the whole grid is runnable in torch
                    yield pytest.param(name, pp, m, v, id=f"{name}-pp{pp}-m{m}-v{v}")


GRID = list(_grid())


def _rank_of(name, stage, pp):
    if name == "ZBVZeroBubble":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


class TestRegistry:
    def test_all_five_in_this_torch(self):
        assert set(SCHEDULES) == {
            "GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble"
        }  # fmt: skip
        for name, schedule in SCHEDULES.items():
            assert get_schedule_class(name) is getattr(pipelining, schedule.torch_class)

    def test_case_insensitive(self):
        assert get_schedule("interleaved1f1b") is SCHEDULES["Interleaved1F1B"]
        assert get_schedule("ZBVZEROBUBBLE").name == "ZBVZeroBubble"

    def test_unknown_lists_available(self):
        with pytest.raises(ValueError, match="unknown pipeline schedule 'PipeDream'.*GPipe, 1F1B"):
            get_schedule("PipeDream")


class TestCheck:
    @pytest.mark.parametrize(
        "name, pp, m, v, message",
        [
            ("1F1B", 4, 3, 1, r"num_microbatches >= number of stages \(4\); use m >= 4"),
            ("Interleaved1F1B", 4, 9, 2, r"number of rounds .* = 2; use m=8 or m=10"),
            ("InterleavedZeroBubble", 4, 13, 2, r"rounds .* = 3; use m=12 or m=15"),
            ("GPipe", 4, 8, 2, r"exactly 1 stage\(s\) per rank; use v=1 or an interleaved"),
            ("Interleaved1F1B", 4, 8, 1, r"needs v >= 2 .*1F1B/GPipe"),
            ("ZBVZeroBubble", 4, 8, 3, r"exactly 2 stage\(s\) per rank; use v=2"),
            ("GPipe", 0, 8, 1, r"pp and num_microbatches must be >= 1"),
        ],
    )
    def test_errors_name_the_constraint(self, name, pp, m, v, message):
        with pytest.raises(ValueError, match=message):
            get_schedule(name).check(pp, m, v)

    @pytest.mark.parametrize("name", ["Interleaved1F1B", "InterleavedZeroBubble"])
    def test_rounds_rule_is_torchs(self, name):
        # Any m <= pp and any multiple of pp run; torch raises for the rest, and so do we.
        for m in range(1, 18):
            ours = get_schedule(name).microbatch_rule(4, m, 2) is None
            try:
                schedules._torch_pipeline_order(get_schedule(name).torch_class, 4, m, 2)
                theirs = True
            except ValueError:
                theirs = False
            assert ours == theirs, m

    def test_defaults_v(self):
        assert len(get_schedule("Interleaved1F1B").in_flight(2, 4)) == 4
        assert len(get_schedule("ZBVZeroBubble").in_flight(2, 4)) == 4
        assert len(get_schedule("1F1B").in_flight(2, 4)) == 2


@pytest.mark.parametrize("name, pp, m, v", GRID)
class TestAgainstTorchActions:
    def test_actions_cover_every_stage_and_microbatch_once(self, name, pp, m, v):
        actions = simulated_actions(name, pp, m, v)
        kinds = ("F", "I", "W") if SCHEDULES[name].split_backward else ("F", "B")
        expected = Counter((s, k, mb) for s in range(pp * v) for k in kinds for mb in range(m))
        assert Counter(a for rank in actions for a in rank) == expected
        ranks = SCHEDULES[name].stage_ranks(pp, v)  # the placement plans and the runtime use
        for rank, rank_actions in enumerate(actions):
            assert {_rank_of(name, a.stage, pp) for a in rank_actions} == {rank}
            assert {a.stage for a in rank_actions} == {s for s, r in enumerate(ranks) if r == rank}

    def test_torch_numbers_multi_stage_microbatches_in_order(self, name, pp, m, v):
        # _in_order is applied to single-stage schedules only; it is a no-op for the others.
        raw = schedules._torch_pipeline_order(SCHEDULES[name].torch_class, pp, m, v)
        for rank in raw:
            compute = schedules._compute_actions(rank)
            if SCHEDULES[name].stages_per_rank != 1:
                assert schedules._in_order(compute) == compute

    def test_in_flight(self, name, pp, m, v):
        per_stage = get_schedule(name).in_flight(pp, m, v)
        assert len(per_stage) == pp * v
        per_rank = [0] * pp
        for s, n in enumerate(per_stage):
            assert 1 <= n <= m
            per_rank[_rank_of(name, s, pp)] += n
        if name == "GPipe":
            assert per_stage == (m,) * pp
        elif name == "1F1B":
            assert per_stage == tuple(min(pp - s, m) for s in range(pp))
        elif name == "Interleaved1F1B":
            # Megatron/torch warmup: (v-1) rounds of microbatches + 2 per hop to the last rank.
            per_round = m // max(1, m // pp)
            warmup = [(v - 1) * per_round + 2 * (pp - 1 - r) + 1 for r in range(pp)]
            assert per_rank == [min(w, v * m) for w in warmup]
        elif name == "InterleavedZeroBubble" and m % pp == 0:
            assert per_rank == [v * pp] * pp
        elif name == "ZBVZeroBubble" and m >= 2 * pp:
            assert per_rank == [2 * pp] * pp

    def test_bubble_formula_against_simulation(self, name, pp, m, v):
        schedule = get_schedule(name)
        simulated = schedules._unit_bubble(name, pp, m, v)
        assert schedule.bubble_fraction(pp, m, v) == pytest.approx(simulated, abs=1e-12)
        if schedule.formula_holds(pp, m, v):
            assert schedule.bubble_formula(pp, m, v) == pytest.approx(simulated, abs=1e-12)
        else:  # the paper's formula is optimistic here; we answer with the simulation
            assert schedule.bubble_formula(pp, m, v) < simulated

    def test_unit_timeline_is_the_simulation(self, name, pp, m, v):
        # what `autopar explain --plot` draws: torch's order on each rank, one action at a time,
        # in unit times, with the simulation's bubble
        spans = schedules.unit_timeline(name, pp, m, v)
        assert [[a for a, _, _ in rank] for rank in spans] == simulated_actions(name, pp, m, v)
        unit = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
        for rank in spans:
            assert all(end - start == unit[a.kind] for a, start, end in rank)
            assert all(prev[2] <= nxt[1] for prev, nxt in zip(rank, rank[1:]))
        step = max(end for rank in spans for _, _, end in rank)
        busy = sum(end - start for rank in spans for _, start, end in rank)
        assert 1 - busy / (pp * step) == pytest.approx(schedules._unit_bubble(name, pp, m, v))

    def test_uniform_step_time(self, name, pp, m, v):
        schedule = get_schedule(name)
        step = schedule.step_time_s(0.5, 1.0, m, pp, v)
        ideal = m * v * 1.5  # every rank's own work
        assert step == pytest.approx(ideal / (1 - schedule.bubble_fraction(pp, m, v)))


class TestBelowFormulaRange:
    """Shapes torch accepts where the closed forms stop holding."""

    @pytest.mark.parametrize(
        "name, pp, m, v, bubble",
        [
            ("Interleaved1F1B", 4, 2, 2, 15 / 27),  # 27 units, 12 busy per rank
            ("InterleavedZeroBubble", 4, 3, 2, 5 / 23),
            ("ZBVZeroBubble", 4, 4, 2, 6 / 30),
        ],
    )
    def test_simulated_bubble(self, name, pp, m, v, bubble):
        schedule = get_schedule(name)
        assert not schedule.formula_holds(pp, m, v)
        assert schedule.bubble_fraction(pp, m, v) == pytest.approx(bubble)


class TestStepTimeNonUniform:
    FWD = (1.0, 0.5, 2.0, 0.75)
    BWD = (2.0, 1.5, 3.0, 1.0)

    @pytest.mark.parametrize("m", [4, 8])
    def test_gpipe_is_two_flow_shops(self, m):
        f, b = self.FWD, self.BWD
        expected = sum(f) + (m - 1) * max(f) + sum(b) + (m - 1) * max(b)
        assert get_schedule("GPipe").step_time_s(f, b, m, 4) == pytest.approx(expected)

    @pytest.mark.parametrize("m", [4, 8])
    def test_1f1b_within_narayanan_bound(self, m):
        # sum_s(F_s+B_s) + (m-1) max_s(F_s+B_s): exact for equal stages, an upper bound otherwise.
        fb = [f + b for f, b in zip(self.FWD, self.BWD)]
        bound = sum(fb) + (m - 1) * max(fb)
        step = get_schedule("1F1B").step_time_s(self.FWD, self.BWD, m, 4)
        assert max(fb) * m <= step <= bound + 1e-12
        assert get_schedule("1F1B").step_time_s(1.0, 2.0, m, 4) == pytest.approx(3 * (m + 3))

    def test_wrong_length(self):
        with pytest.raises(ValueError, match="has 4 entries; the schedule has 8 stages"):
            get_schedule("Interleaved1F1B").step_time_s(self.FWD, 1.0, 8, 4, 2)


def test_fallback_without_visualizer(monkeypatch):
    """Without the private visualizer module, the schedule's own pipeline_order gives the same."""
    expected = {
        (n, pp, m, v): schedules._actions(n, pp, m, v)
        for n, pp, m, v in [("1F1B", 4, 8, 1), ("GPipe", 2, 4, 1), ("Interleaved1F1B", 4, 8, 2)]
        + [("InterleavedZeroBubble", 2, 4, 2), ("ZBVZeroBubble", 4, 8, 2)]
    }
    monkeypatch.setitem(sys.modules, "torch.distributed.pipelining._schedule_visualizer", None)
    schedules._actions.cache_clear()
    try:
        for key, actions in expected.items():
            assert schedules._actions(*key) == actions
    finally:
        schedules._actions.cache_clear()


@pytest.mark.parametrize("name, pp, m, v", GRID)
def test_skipping_the_comms_lowering_keeps_torchs_compute_order(name, pp, m, v):
    # `_torch_pipeline_order` builds schedules without their send/receive lowering (the slow
    # part of building one); the order must be the one torch's own visualiser gives with it
    from torch.distributed.pipelining import schedules as torch_schedules
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops

    cls = getattr(torch_schedules, SCHEDULES[name].torch_class)
    ours = schedules._torch_pipeline_order(SCHEDULES[name].torch_class, pp, m, v)
    theirs = get_schedule_ops(cls, pp, m, v)
    assert [[str(a) for a in rank] for rank in ours] == [[str(a) for a in rank] for rank in theirs]
