"""Pipeline schedules as data: what each one costs in bubble time and activation memory.

One :class:`Schedule` entry per ``torch.distributed.pipelining`` schedule class; adding a schedule
is adding an entry to ``_ENTRIES``. The ground truth for every number here is the action list that
torch itself runs (:func:`simulated_actions`): the planner must assume what torch executes.

Shapes and conventions
----------------------
* ``pp`` pipeline ranks, ``num_microbatches`` (m) microbatches per step, ``v`` stages per rank, so
  ``pp * v`` stages. Looped/interleaved schedules put stage ``s`` on rank ``s % pp``; ZBV puts the
  stages in a V: stage ``s`` on rank ``s`` for ``s < pp`` and on rank ``2*pp - 1 - s`` otherwise
  (rank 0 holds the first and the last stage), as in torch's
  ``generate_stage_to_rank_mapping(style="v")``.
* A microbatch is *in flight* on a stage from its forward until its backward is complete: the full
  backward ``B``, or for zero-bubble schedules (backward split into input-grad ``I`` and
  weight-grad ``W``) the ``W``, because the weight gradient still reads the saved activations
  (Qi et al. 2023 count a microbatch's memory the same way).
* Timeline model (:func:`_timeline`): an action starts when its rank has finished the previous
  action in its list and its input is done (forward of stage s-1, backward of stage s+1, same
  microbatch); communication takes no time. Unit times: F = 1, B = 2 (I = W = 1 when split),
  equal for every stage. ``bubble_fraction`` = idle rank-time / (pp * step time).

Closed forms and where they hold (checked against torch's actions by tests/test_schedules.py):

* GPipe (Huang et al. 2019, arXiv:1811.06965): bubble (p-1)/(m+p-1); in flight m per stage.
* 1F1B (PipeDream-Flush, Narayanan et al. 2021, arXiv:2006.09503): bubble (p-1)/(m+p-1); in flight
  min(p-s, m) on stage s; step time sum_s(F_s+B_s) + (m-1) * max_s(F_s+B_s): exact for equal
  stages, an upper bound otherwise (so step_time_s simulates). GPipe's step time is two flow
  shops, sum_s F_s + (m-1) max_s F_s + sum_s B_s + (m-1) max_s B_s.
* Interleaved 1F1B (Narayanan et al. SC'21, arXiv:2104.04473): bubble (p-1)/(v*m+p-1) when m >= p;
  larger when m < p (torch's flexible variant runs one short round). Rank r keeps
  min((v-1)*k + 2*(p-1-r) + 1, v*m) microbatch-stages in flight, k = m // max(1, m // p)
  microbatches per round (Megatron's warmup).
* Zero bubble (Qi et al. 2023, arXiv:2401.10241; torch's InterleavedZeroBubble is ZB-1P,
  ZBVZeroBubble the ZB-V schedule): with F = I = W the bubble is (p-1)/(3*v*m+p-1) -- a third of
  1F1B's bubble time -- when m >= p (interleaved) or m >= 2p-1 (ZBV); larger below that. In flight
  per rank: v*p (interleaved, m a multiple of p) and 2p (ZBV, m >= 2p).

Where a closed form does not hold, the methods below use the simulation (cached per shape), so
they always answer with what torch runs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from torch.distributed.pipelining import schedules as _torch_schedules

__all__ = [
    "SCHEDULES", "Action", "Schedule", "get_schedule", "simulated_actions", "unit_timeline",
]


class Action(NamedTuple):
    """One compute action of a rank: ``kind`` is "F", "B" (full backward), "I" or "W"."""

    stage: int
    kind: str
    microbatch: int


# ---------------------------------------------------------------------------------------------
# Shape constraints, one function per rule torch enforces. Each returns None or what is wrong.


def _any_microbatches(pp: int, m: int, v: int) -> str | None:
    return None


def _at_least_one_per_stage(pp: int, m: int, v: int) -> str | None:
    # torch Schedule1F1B.__init__: n_microbatches >= num_stages.
    if m < pp * v:
        return f"needs num_microbatches >= number of stages ({pp * v}); use m >= {pp * v}"
    return None


def _whole_rounds(pp: int, m: int, v: int) -> str | None:
    # torch ScheduleInterleaved1F1B / ScheduleInterleavedZeroBubble.__init__: rounds =
    # max(1, m // pp) and m % rounds == 0 (any m <= pp works, as does any multiple of pp).
    if m % max(1, m // pp):
        fits = lambda k: k % max(1, k // pp) == 0
        below = max(k for k in range(1, m) if fits(k))
        above = min(k for k in range(m + 1, 2 * m + pp) if fits(k))
        return (
            f"needs num_microbatches to be a multiple of the number of rounds max(1, m // pp) = "
            f"{max(1, m // pp)}; use m={below} or m={above} (any m <= pp or multiple of pp works)"
        )
    return None


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """A pipeline schedule of torch.distributed.pipelining and its cost model.

    Attributes:
        name: torch's schedule name (``get_schedule_class(name)``).
        torch_class: class name in ``torch.distributed.pipelining``.
        stages_per_rank: 1 for single-stage schedules, 2 for ZBV, None when chosen (v >= 2).
        split_backward: the backward runs as input-grad I then weight-grad W (zero bubble).
        placement: "loop" (stage s on rank s % pp) or "v" (ZBV; see the module docstring).
        microbatch_rule: returns None when torch accepts (pp, m, v), else what is wrong.
        bubble_formula: the paper's closed-form bubble fraction (unit times F=1, B=2).
        formula_holds: where ``bubble_formula`` equals the simulation of torch's actions.
        source: the paper the schedule and formula come from.
    """

    name: str
    torch_class: str
    stages_per_rank: int | None
    split_backward: bool = False
    placement: str = "loop"
    microbatch_rule: Callable[[int, int, int], str | None] = _any_microbatches
    bubble_formula: Callable[[int, int, int], float]
    formula_holds: Callable[[int, int, int], bool] = lambda pp, m, v: True
    source: str

    def default_v(self, v: int | None) -> int:
        """Stages per rank: ``v`` if given, else the fixed count, else 2."""
        return v if v is not None else (self.stages_per_rank or 2)

    def check(self, pp: int, num_microbatches: int, v: int | None = None) -> None:
        """Raise ValueError when torch cannot run this schedule at this shape."""
        v = self.default_v(v)
        where = f"{self.name} with pp={pp}, num_microbatches={num_microbatches}, v={v}"
        if pp < 1 or num_microbatches < 1:
            raise ValueError(f"{where}: pp and num_microbatches must be >= 1")
        if self.stages_per_rank is not None and v != self.stages_per_rank:
            raise ValueError(
                f"{where}: {self.torch_class} runs exactly {self.stages_per_rank} stage(s) per "
                f"rank; use v={self.stages_per_rank}"
                + ("" if self.stages_per_rank > 1 else " or an interleaved schedule for v >= 2")
            )
        if self.stages_per_rank is None and v < 2:
            raise ValueError(
                f"{where}: {self.torch_class} needs v >= 2 stages per rank; use v >= 2, "
                "or 1F1B/GPipe for one stage per rank"
            )
        problem = self.microbatch_rule(pp, num_microbatches, v)
        if problem:
            raise ValueError(f"{where}: {self.torch_class} {problem}")

    def stage_ranks(self, pp: int, v: int | None = None) -> tuple[int, ...]:
        """The pp rank of every stage (pp*v entries, by stage index), as torch places them
        (``generate_stage_to_rank_mapping``): torch ignores any other placement, so a plan's
        stages must follow this one."""
        n = pp * self.default_v(v)
        if self.placement == "v":
            return tuple(s if s < pp else 2 * pp - 1 - s for s in range(n))
        return tuple(s % pp for s in range(n))

    def checkpoint_problem(self, checkpoint: dict[str, str]) -> str | None:
        """What of a plan's checkpointing (layer -> policy) this schedule cannot run, or None.

        torch's selective checkpointing keeps the outputs it saves for ONE backward through the
        region and raises on a second; a split backward runs two through every stage but the
        first (input-grad I, then weight-grad W). Full checkpointing recomputes per backward
        and runs (twice). Stage 0, whose backward torch runs whole, could take selective too;
        one rule for all stages keeps plans and the search simple."""
        selective = sorted(k for k, v in checkpoint.items() if v == "selective")
        if not (self.split_backward and selective):
            return None
        return (
            f"{self.name} splits each backward into input-grad and weight-grad, two backward "
            f"passes through every layer, but selective checkpointing allows one (torch raises "
            f"'Trying to backward an extra time'); layers {selective} are planned selective: "
            f"checkpoint them 'full' or 'none', or use a schedule without a split backward "
            f"(1F1B, Interleaved1F1B)"
        )

    def in_flight(self, pp: int, num_microbatches: int, v: int | None = None) -> tuple[int, ...]:
        """Per stage (pp*v entries, by stage index): microbatches whose activations the stage
        holds when its rank holds the most, from torch's action order."""
        self.check(pp, num_microbatches, v)
        return _in_flight(self.name, pp, num_microbatches, self.default_v(v))

    def bubble_fraction(self, pp: int, num_microbatches: int, v: int | None = None) -> float:
        """Idle fraction of the step with equal stages, F=1, B=2 (I=W=1), free communication."""
        v = self.default_v(v)
        self.check(pp, num_microbatches, v)
        if self.formula_holds(pp, num_microbatches, v):
            return self.bubble_formula(pp, num_microbatches, v)
        return _unit_bubble(self.name, pp, num_microbatches, v)

    def step_time_s(
        self,
        stage_fwd_s: float | Sequence[float],
        stage_bwd_s: float | Sequence[float],
        num_microbatches: int,
        pp: int,
        v: int | None = None,
    ) -> float:
        """Seconds for one step, given each stage's forward and backward time per microbatch.

        Times are one number (all stages equal) or one per stage (pp*v, by stage index). The
        step is simulated over torch's action lists (free communication; for split backwards
        I = W = stage_bwd_s / 2). For 1F1B this equals Narayanan et al.'s
        sum_s(F_s+B_s) + (m-1) * max_s(F_s+B_s) when stages are equal.
        """
        v = self.default_v(v)
        self.check(pp, num_microbatches, v)
        n = pp * v
        fwd = _per_stage(stage_fwd_s, n, "stage_fwd_s")
        bwd = _per_stage(stage_bwd_s, n, "stage_bwd_s")
        dur = {}
        for s in range(n):
            dur[s, "F"], dur[s, "B"] = fwd[s], bwd[s]
            dur[s, "I"] = dur[s, "W"] = bwd[s] / 2
        actions = _actions(self.name, pp, num_microbatches, v)
        return _timeline(actions, n, lambda a: dur[a.stage, a.kind])[0]


def _per_stage(t: float | Sequence[float], n: int, what: str) -> tuple[float, ...]:
    if isinstance(t, (int, float)):
        return (float(t),) * n
    t = tuple(float(x) for x in t)
    if len(t) != n:
        raise ValueError(f"{what} has {len(t)} entries; the schedule has {n} stages (pp * v)")
    return t


_ENTRIES = [
    Schedule(
        name="GPipe",
        torch_class="ScheduleGPipe",
        stages_per_rank=1,
        bubble_formula=lambda pp, m, v: (pp - 1) / (m + pp - 1),
        source="Huang et al. 2019, GPipe, arXiv:1811.06965",
    ),
    Schedule(
        name="1F1B",
        torch_class="Schedule1F1B",
        stages_per_rank=1,
        microbatch_rule=_at_least_one_per_stage,
        bubble_formula=lambda pp, m, v: (pp - 1) / (m + pp - 1),
        source="Narayanan et al. 2021, PipeDream-Flush (1F1B), arXiv:2006.09503",
    ),
    Schedule(
        name="Interleaved1F1B",
        torch_class="ScheduleInterleaved1F1B",
        stages_per_rank=None,
        microbatch_rule=_whole_rounds,
        bubble_formula=lambda pp, m, v: (pp - 1) / (v * m + pp - 1),
        formula_holds=lambda pp, m, v: m >= pp,
        source="Narayanan et al. SC'21, interleaved 1F1B, arXiv:2104.04473",
    ),
    Schedule(
        name="InterleavedZeroBubble",
        torch_class="ScheduleInterleavedZeroBubble",
        stages_per_rank=None,
        split_backward=True,
        microbatch_rule=_whole_rounds,
        bubble_formula=lambda pp, m, v: (pp - 1) / (3 * v * m + pp - 1),
        formula_holds=lambda pp, m, v: m >= pp,
        source="Qi et al. 2023, Zero Bubble Pipeline Parallelism (ZB-1P), arXiv:2401.10241",
    ),
    Schedule(
        name="ZBVZeroBubble",
        torch_class="ScheduleZBVZeroBubble",
        stages_per_rank=2,
        split_backward=True,
        placement="v",
        bubble_formula=lambda pp, m, v: (pp - 1) / (3 * v * m + pp - 1),
        formula_holds=lambda pp, m, v: m >= 2 * pp - 1,
        source="Qi et al. 2023, Zero Bubble Pipeline Parallelism (ZB-V), arXiv:2401.10241",
    ),
]

#: The schedules the installed torch has, by name.
SCHEDULES: dict[str, Schedule] = {
    e.name: e for e in _ENTRIES if hasattr(_torch_schedules, e.torch_class)
}


def get_schedule(name: str) -> Schedule:
    """The schedule called ``name`` (case-insensitive)."""
    for key, schedule in SCHEDULES.items():
        if key.lower() == name.lower():
            return schedule
    raise ValueError(
        f"unknown pipeline schedule {name!r}; available with this torch: {', '.join(SCHEDULES)}"
    )


# ---------------------------------------------------------------------------------------------
# Ground truth: torch's own action lists, and a timeline over them.


def _torch_pipeline_order(torch_class: str, pp: int, m: int, v: int) -> list[list]:
    """Each rank's action list as torch builds it, on CPU with no process group.

    Private torch API: ``torch.distributed.pipelining._schedule_visualizer.get_schedule_ops``
    (torch >= 2.6), which instantiates the schedule over mocked PipelineStages. Without it, do the
    same by hand and read the schedule's ``pipeline_order``. Kept in this one function so a torch
    upgrade touches only it.
    """
    cls = getattr(_torch_schedules, torch_class)
    try:
        from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    except ImportError:
        get_schedule_ops = None
    if get_schedule_ops is not None:
        with _without_comms():
            return [list(r) for r in get_schedule_ops(cls, pp, m, v)]
    from unittest import mock

    from torch.distributed.pipelining.stage import PipelineStage

    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod, stage.num_stages = 0, pp, None, pp * v
    single = issubclass(cls, _torch_schedules.PipelineScheduleSingle)
    order = cls(stage if single else [stage] * v, m).pipeline_order
    return [list(order[r]) for r in range(pp)]


def _without_comms():
    """Multi-stage schedules lower their compute order into one with sends and receives when
    built (``_prepare_schedule_with_comms``, which fills ``pipeline_order_with_comms`` and
    leaves ``pipeline_order`` as it was). Only the compute order is read here, and the lowering
    was most of the time of building one (GPT-3's search builds dozens); skip it."""
    from unittest import mock

    runtime = getattr(_torch_schedules, "_PipelineScheduleRuntime", None)
    if runtime is None or not hasattr(runtime, "_prepare_schedule_with_comms"):
        return contextlib.nullcontext()
    return mock.patch.object(runtime, "_prepare_schedule_with_comms",
                             lambda self, *args, **kwargs: None)


def _compute_actions(raw: list) -> list[Action]:
    """Compute actions only: drop idle slots (None) and comms/FSDP/grad-reduce actions;
    unpack fused OVERLAP_F_B actions into their parts."""
    out = []
    for a in raw:
        if a is None:
            continue
        if a.sub_actions:
            out.extend(_compute_actions(list(a.sub_actions)))
        elif a.computation_type.value in ("F", "B", "I", "W"):
            out.append(Action(a.stage_index, a.computation_type.value, a.microbatch_index))
    return out


def _in_order(actions: list[Action]) -> list[Action]:
    """Number each (stage, kind)'s microbatches 0, 1, 2, ... in list order.

    torch runs single-stage schedules (GPipe, 1F1B) from ``_step_microbatches``, which takes
    microbatches in order; their ``pipeline_order`` is only a picture of it, and in torch 2.13
    Schedule1F1B's numbers the last rank's forwards from 1. Multi-stage schedules run their
    ``pipeline_order`` itself, which already numbers in order (tests check this is a no-op there).
    """
    seen: dict[tuple[int, str], int] = {}
    out = []
    for a in actions:
        k = seen.get((a.stage, a.kind), 0)
        seen[a.stage, a.kind] = k + 1
        out.append(a._replace(microbatch=k))
    return out


@functools.lru_cache(maxsize=256)
def _actions(name: str, pp: int, m: int, v: int) -> tuple[tuple[Action, ...], ...]:
    schedule = SCHEDULES[name]
    per_rank = [_compute_actions(r) for r in _torch_pipeline_order(schedule.torch_class, pp, m, v)]
    if schedule.stages_per_rank == 1:
        per_rank = [_in_order(r) for r in per_rank]
    return tuple(tuple(r) for r in per_rank)


def simulated_actions(
    name: str, pp: int, num_microbatches: int, v: int | None = None
) -> list[list[Action]]:
    """Each rank's compute actions in the order torch runs them: the ground truth of this module.

    From torch's schedule IR (``_torch_pipeline_order``), with idle slots and communication
    filtered out; see ``_in_order`` for single-stage schedules.
    """
    schedule = get_schedule(name)
    v = schedule.default_v(v)
    schedule.check(pp, num_microbatches, v)
    return [list(r) for r in _actions(schedule.name, pp, num_microbatches, v)]


def _timeline(
    actions: Sequence[Sequence[Action]],
    num_stages: int,
    duration: Callable[[Action], float],
    spans: list[list[tuple[Action, float, float]]] | None = None,
) -> tuple[float, list[float]]:
    """(step time, busy time per rank) of running the ranks' action lists with free comms.

    F(s, mb) waits for F(s-1, mb); B/I(s, mb) waits for F(s, mb) and B/I(s+1, mb); W(s, mb) for
    I(s, mb). Each rank runs its list in order. A rank stuck on an input that never comes is a
    deadlock in the schedule, reported as RuntimeError. `spans`, when given (one list per
    rank), gets each action's (action, start, end) in the order the rank runs them.
    """
    done: dict[tuple[int, str, int], float] = {}
    ptr, free, busy = [0] * len(actions), [0.0] * len(actions), [0.0] * len(actions)

    def needs(a: Action) -> list[tuple[int, str, int]]:
        if a.kind == "F":
            return [(a.stage - 1, "F", a.microbatch)] if a.stage else []
        if a.kind == "W":
            return [(a.stage, "G", a.microbatch)]
        later = [(a.stage + 1, "G", a.microbatch)] if a.stage < num_stages - 1 else []
        return [(a.stage, "F", a.microbatch), *later]

    moved = True
    while moved:
        moved = False
        for r, rank_actions in enumerate(actions):
            while ptr[r] < len(rank_actions):
                a = rank_actions[ptr[r]]
                deps = needs(a)
                if any(d not in done for d in deps):
                    break
                start = max([free[r]] + [done[d] for d in deps])
                free[r] = start + duration(a)
                busy[r] += duration(a)
                if spans is not None:
                    spans[r].append((a, start, free[r]))
                done[a.stage, "G" if a.kind in "BI" else a.kind, a.microbatch] = free[r]
                ptr[r] += 1
                moved = True
    stuck = [r for r in range(len(actions)) if ptr[r] < len(actions[r])]
    if stuck:
        raise RuntimeError(f"schedule deadlocks: ranks {stuck} wait on inputs that never come")
    return max(free), busy


_UNIT_TIME = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}


def unit_timeline(
    name: str, pp: int, num_microbatches: int, v: int | None = None
) -> list[list[tuple[Action, float, float]]]:
    """Each rank's compute actions with their (start, end), in the unit times the bubble is
    measured in (F = 1, B = 2, I = W = 1, equal stages, free communication): the schedule
    as torch runs it, to draw (`autopar.plot`). Its idle rank-time over pp x the last end is
    `Schedule.bubble_fraction` (before any closed form)."""
    schedule = get_schedule(name)
    v = schedule.default_v(v)
    schedule.check(pp, num_microbatches, v)
    spans: list[list[tuple[Action, float, float]]] = [[] for _ in range(pp)]
    _timeline(_actions(schedule.name, pp, num_microbatches, v), pp * v,
              lambda a: _UNIT_TIME[a.kind], spans)
    return spans


@functools.lru_cache(maxsize=256)
def _unit_bubble(name: str, pp: int, m: int, v: int) -> float:
    step, busy = _timeline(_actions(name, pp, m, v), pp * v, lambda a: _UNIT_TIME[a.kind])
    return 1.0 - sum(busy) / (pp * step)


@functools.lru_cache(maxsize=256)
def _in_flight(name: str, pp: int, m: int, v: int) -> tuple[int, ...]:
    per_stage = [0] * (pp * v)
    for rank_actions in _actions(name, pp, m, v):
        live: dict[int, int] = {}
        best, at_best = -1, {}
        for a in rank_actions:
            if a.kind == "F":
                live[a.stage] = live.get(a.stage, 0) + 1
            elif a.kind in ("B", "W"):
                live[a.stage] -= 1
            if sum(live.values()) > best:
                best, at_best = sum(live.values()), dict(live)
        for stage, count in at_best.items():
            per_stage[stage] = count
    return tuple(per_stage)
