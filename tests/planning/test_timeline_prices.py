"""A candidate's pipeline time is never below what torch's schedule runs (issue 17, item 2).

The stage ILP minimises the stage model b * sum_s T_s + (m - b) * max_r T_rank, which balances
each rank's total only. With uneven stages of an interleaved or zero-bubble schedule that can be
far under the timeline of torch's own action lists (`Schedule.step_time_s`). `evaluate`, the one
scorer of the search and of `manual_plan`, prices every cut at the larger of the two; these tests
check it against the timeline computed here, over random uneven cuts and every schedule.
"""

import random

import pytest

import autopar
import solvers
from autopar.planning.candidate import Candidate, bubble_weight, evaluate
from autopar.planning.layer_costs import LayerCosts
from autopar.schedules import SCHEDULES, get_schedule


def _runs(name: str, pp: int, m: int) -> bool:
    sched = get_schedule(name)
    try:
        sched.check(pp, m, sched.default_v(None))
    except ValueError:
        return False
    return True


# every schedule of the installed torch, on the shapes it runs
SHAPES = [(name, pp, m) for name in SCHEDULES for pp, m in [(2, 4), (4, 8), (4, 4), (3, 6)]
          if _runs(name, pp, m)]


def _cluster(pp: int) -> autopar.Cluster:
    return autopar.Cluster.preset("h100-80g", nodes=1, devices_per_node=pp)


def _costs(fwd: list[float], bwd: list[float], boundary: float = 0.0) -> LayerCosts:
    """LayerCosts of layers with the given per-microbatch times and nothing else."""
    names = [f"blocks.{i}" for i in range(len(fwd))]
    layers = tuple(solvers.Layer(name=n, options=(solvers.LayerOption(
        name="none", fwd_s=f, bwd_s=b, activation_bytes=1.0),), state_bytes=1.0,
        boundary_bytes=boundary) for n, f, b in zip(names, fwd, bwd))
    zero = dict.fromkeys(names, 0.0)
    return LayerCosts(
        traced=None, stand=None, sub_mesh={"dp": 1}, decisions=None, solution=None,
        layers=layers, sync_s=zero, dp_microbatch_s=0.0, update_s=zero,
        issued=dict.fromkeys(names, 0), param_numel=zero,
        state={n: {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0} for n in names},
        temporaries_bytes=0.0, flavour="replicate", comm_s={}, model_flops=0.0)


def _candidate(costs: LayerCosts, cut: list[int], schedule: str, pp: int, m: int) -> Candidate:
    names = [x.name for x in costs.layers]
    bounds = [0, *cut, len(names)]
    stages = tuple(tuple(names[a:b]) for a, b in zip(bounds, bounds[1:]))
    return evaluate(Candidate(
        mesh={"pp": pp, "dp": 1, "tp": 1}, microbatch_size=1, num_microbatches=m,
        schedule=schedule, v=get_schedule(schedule).default_v(None), flavour="replicate",
        stages=stages, options=dict.fromkeys(names, "none"), costs=costs), _cluster(pp))


def _timeline(c: Candidate, send_s: float) -> float:
    """The schedule's step over torch's actions, each stage its layers' times (and half its
    boundary send in forward, half in backward), computed here from the stages alone."""
    fwd = [sum(c.costs.layers[int(n.split(".")[1])].options[0].fwd_s for n in st)
           for st in c.stages]
    bwd = [sum(c.costs.layers[int(n.split(".")[1])].options[0].bwd_s for n in st)
           for st in c.stages]
    for s in range(len(c.stages) - 1):
        fwd[s] += send_s / 2
        bwd[s] += send_s / 2
    return get_schedule(c.schedule).step_time_s(fwd, bwd, c.num_microbatches, c.pp, c.v)


def _stage_model(c: Candidate, send_s: float) -> float:
    t = [sum(o.fwd_s + o.bwd_s for x in c.costs.layers if x.name in st for o in x.options)
         for st in c.stages]
    for s in range(len(t) - 1):
        t[s] += send_s
    ranks = get_schedule(c.schedule).stage_ranks(c.pp, c.v)
    per_rank = [sum(t[s] for s, r in enumerate(ranks) if r == rank) for rank in range(c.pp)]
    b = bubble_weight(c.schedule, c.pp, c.num_microbatches, c.v)
    return b * sum(t) + (c.num_microbatches - b) * max(per_rank)


def _send_s(boundary: float, pp: int) -> float:
    cluster = _cluster(pp)
    link = cluster.axis_links((pp, 1))[0]
    cal = cluster.device.calibration
    return link.latency_s + (cal.pipeline_stage_s if cal else 0.0) + boundary / \
        link.bandwidth_bytes_per_s


@pytest.mark.parametrize("schedule, pp, m", SHAPES)
def test_random_uneven_cuts_are_priced_at_least_at_the_timeline(schedule, pp, m):
    v = get_schedule(schedule).default_v(None)
    rng = random.Random(f"{schedule}-{pp}-{m}")
    n_stages = pp * v
    for _ in range(20):
        n_layers = rng.randint(n_stages, 3 * n_stages)
        fwd = [rng.uniform(0.2, 2.0) for _ in range(n_layers)]
        bwd = [f * rng.uniform(1.5, 2.5) for f in fwd]
        boundary = rng.choice([0.0, 1e8])
        cut = sorted(rng.sample(range(1, n_layers), n_stages - 1))
        c = _candidate(_costs(fwd, bwd, boundary), cut, schedule, pp, m)
        send = _send_s(boundary, pp)
        timeline, model = _timeline(c, send), _stage_model(c, send)
        assert c.pipeline_s == pytest.approx(max(timeline, model), rel=1e-9)
        assert c.pipeline_s >= timeline * (1 - 1e-9)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_even_stages_the_stage_model_is_the_timeline(schedule):
    """Where the two models agree by construction (equal stages, F:B = 1:2), the price is both."""
    sched = get_schedule(schedule)
    pp, m = 4, 8
    v = sched.default_v(None)
    n = 2 * pp * v
    c = _candidate(_costs([1.0] * n, [2.0] * n), list(range(2, n, 2)), schedule, pp, m)
    assert c.pipeline_s == pytest.approx(_timeline(c, _send_s(0.0, pp)), rel=1e-6)
    assert c.pipeline_s == pytest.approx(_stage_model(c, _send_s(0.0, pp)), rel=1e-6)


def test_gpt3_175b_interleaved_plan_of_uneven_stages_costs_what_torch_runs():
    """The issue's case: an interleaved plan whose virtual stages hold 1 to 24 blocks. The
    stage model balances each rank's total and charged well under the timeline."""
    pp, v, m = 8, 2, 16
    # rank r holds stages r and r + 8: every rank 25 blocks, its two stages 1 to 24 apart
    blocks = [1, 24, 2, 23, 3, 22, 4, 21, 24, 1, 23, 2, 22, 3, 21, 4]
    ranks = get_schedule("Interleaved1F1B").stage_ranks(pp, v)
    assert {sum(b for s, b in enumerate(blocks) if ranks[s] == r) for r in range(pp)} == {25}
    n = sum(blocks)
    cut, at = [], 0
    for b in blocks[:-1]:
        at += b
        cut.append(at)
    c = _candidate(_costs([1.0] * n, [2.0] * n), cut, "Interleaved1F1B", pp, m)
    send = _send_s(0.0, pp)
    timeline, model = _timeline(c, send), _stage_model(c, send)
    assert timeline > 1.2 * model  # the stage model alone was optimistic here
    assert c.pipeline_s == pytest.approx(timeline, rel=1e-9)
