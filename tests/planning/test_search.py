"""The outer search against brute force on its chosen mesh, on tiny GPTs (4 devices)."""

from __future__ import annotations

import itertools
import math
import re
from types import SimpleNamespace

import pytest
import torch

import autopar
import solvers
from autopar.batches import microbatch_inputs
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.inputs import next_token_batch
from autopar.models.losses import lm_loss
from autopar.planning.candidate import bubble_weight, pipeline_problem
from autopar.schedules import SCHEDULES, get_schedule
from tests.helpers.models import SEARCH_BATCH as BATCH
from tests.helpers.models import datasheet, free_host
from tests.helpers.planning import shared_planning_work

# The planner against every hand configuration, on a grid of models, clusters and memory
# limits: tests/planning/test_search_grid.py.


@pytest.mark.slow
def test_choice_is_the_min_over_every_config_of_its_mesh(gpt_on_four_h100s):
    """Brute force over microbatch, checkpoint, flavour and schedule on the chosen mesh: the
    planner's step time is the minimum (even cuts are in the planner's space). The search and
    the hand configurations share traces and solves (tests/helpers/planning.py)."""
    model, batch, cluster = gpt_on_four_h100s
    with shared_planning_work():
        best = autopar.plan(model, cluster, batch, loss_fn=lm_loss)
        mesh = {"pp": 1, "dp": 1, "tp": 1} | best.mesh
        pp, dp, tp = mesh["pp"], mesh["dp"], mesh["tp"]
        times = []
        for mb, ckpt, zero, schedule in itertools.product(
            [d for d in range(1, BATCH // dp + 1) if (BATCH // dp) % d == 0],
            ["none", "full"], [0, 2, 3] if dp > 1 else [0], ["1F1B", "Interleaved1F1B"],
        ):
            try:
                p = autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, tp=tp, pp=pp,
                                        dp=dp, microbatch_size=mb, checkpoint=ckpt,
                                        schedule=schedule, zero=zero)
            except autopar.MeshError:
                continue
            times.append(autopar.simulate(p).step_time_s)
    assert times
    assert autopar.simulate(best).step_time_s <= min(times) * (1 + 1e-9)


def test_pipelined_plan_follows_the_contract(gpt_on_four_h100s):
    model, batch, cluster = gpt_on_four_h100s
    plan = autopar.plan(model, cluster, batch, loss_fn=lm_loss, mesh={"pp": 2, "dp": 2},
                        schedule="1F1B", microbatch_size=1)
    assert list(plan.mesh) == ["pp", "dp"]
    p = plan.pipeline
    assert p["schedule"] == "1F1B" and p["microbatch_size"] == 2 and p["num_microbatches"] == 4
    layers = [name for st in p["stages"] for name in st["layers"]]
    assert layers == ["pre", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "post"]
    assert all(len(v) == 1 for v in plan.parameters.values())  # one entry per non-pp axis
    again = autopar.Plan.from_dict(plan.to_dict())
    assert again == plan


def _state_share(model, world: int) -> float:
    """fp32 AdamW state (16 bytes a parameter) spread evenly over `world` devices."""
    return 16 * sum(p.numel() for p in model.parameters()) / world


def test_memory_limit_that_nothing_fits_says_smallest_peak(gpt_on_four_h100s):
    model, batch, cluster = gpt_on_four_h100s
    limit = _state_share(model, cluster.world_size) * 1.01  # the state would fit, sharded
    with pytest.raises(autopar.InfeasibleError, match="smallest peak found") as e:
        autopar.plan(model, cluster, batch, loss_fn=lm_loss, mesh={"pp": 2, "dp": 2},
                     memory_limit=limit)
    assert e.value.min_peak_bytes > limit


def test_state_that_cannot_fit_fails_before_any_trace(gpt_on_four_h100s, monkeypatch):
    """Parameters, gradients and optimizer state over every device's memory: no plan can fit,
    said at once (a 405B model on 8 GPUs traced for minutes before), with the devices needed."""
    model, batch, cluster = gpt_on_four_h100s
    share = _state_share(model, cluster.world_size)

    def no_trace(*args, **kwargs):
        raise AssertionError("traced")

    monkeypatch.setattr(autopar.api, "tracer", no_trace)
    with pytest.raises(autopar.InfeasibleError, match=r"Use at least 5 devices") as e:
        autopar.plan(model, cluster, batch, loss_fn=lm_loss, memory_limit=share * 4 / 4.5)
    assert e.value.min_peak_bytes == pytest.approx(share)


def test_microbatch_inputs_slices_every_tensor():
    x, y = torch.zeros(8, 3), torch.ones(8)
    (a, b) = microbatch_inputs((x, y), 2)
    assert a.shape == (2, 3) and b.shape == (2,)
    with pytest.raises(autopar.MeshError, match="divides 8"):
        microbatch_inputs((x, y), 3)


@pytest.fixture(scope="module")
def compute_bound():
    """A GPT whose stages compute for longer than their sends take (meta: no memory used), on
    H100s whose host is free (`free_host`): with the measured host times a split backward's
    op-by-op issue costs more than the bubble it saves, here and at d_model 2048 x 2048 tokens."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=1024, seq_len=256, n_layer=4, n_head=8, d_model=1024))
    x = torch.randint(0, 1024, (BATCH, 256))
    return model, (x, x.clone()), free_host(autopar.Cluster.preset("h100-80g", devices_per_node=4))


@pytest.mark.slow
def test_search_picks_zero_bubble_and_zbv_stages_follow_the_v(compute_bound):
    model, batch, cluster = compute_bound
    args = dict(loss_fn=lm_loss, mesh={"pp": 2, "dp": 2}, microbatch_size=1)
    best = autopar.plan(model, cluster, batch, **args)
    p = best.pipeline
    schedule = get_schedule(p["schedule"])
    assert schedule.split_backward and p["num_microbatches"] == 4
    assert [st["rank"] for st in p["stages"]] == list(schedule.stage_ranks(2, 2))
    assert best.predicted["bubble_fraction"] == schedule.bubble_fraction(2, 4, 2)
    hand = dict(loss_fn=lm_loss, tp=1, pp=2, dp=2, microbatch_size=1)
    one_f_one_b = autopar.manual_plan(model, cluster, batch, schedule="1F1B", **hand)
    assert autopar.simulate(best).step_time_s < autopar.simulate(one_f_one_b).step_time_s

    manual = autopar.manual_plan(model, cluster, batch, schedule="ZBVZeroBubble", **hand)
    assert [st["layers"] for st in manual.pipeline["stages"]] == [
        ["pre"], ["blocks.0", "blocks.1"], ["blocks.2"], ["blocks.3", "post"]]
    # short of memory, 1F1B checkpoints some blocks "selective"; ZB-V cannot run that
    limit = 0.7 * one_f_one_b.predicted["peak_memory_bytes"]
    tight = autopar.plan(model, cluster, batch, schedule="1F1B", memory_limit=limit, **args)
    assert "selective" in tight.checkpoint.values()
    zbv = autopar.plan(model, cluster, batch, schedule="ZBVZeroBubble", memory_limit=limit, **args)
    assert set(zbv.checkpoint.values()) == {"full"}
    for plan in (zbv, manual):
        assert plan.pipeline["schedule"] == "ZBVZeroBubble"
        assert [st["rank"] for st in plan.pipeline["stages"]] == [0, 1, 1, 0]


def test_selective_checkpointing_under_split_backward_is_refused(gpt_on_four_h100s):
    model, batch, cluster = gpt_on_four_h100s
    with pytest.raises(autopar.AutoparError, match=r"allows one .* layers \['blocks.0', .*"
                                                   r"checkpoint them 'full' or 'none'"):
        autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, tp=1, pp=2, dp=2,
                            microbatch_size=1, schedule="ZBVZeroBubble", checkpoint="selective")


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_bubble_weight_reproduces_the_schedule_bubble(name):
    """Equal stages in the stage model idle b(pp-1) / (m + b(pp-1)) of the step: the schedule's
    bubble_fraction (always for zero bubble; where the closed form holds for the others)."""
    schedule = get_schedule(name)
    for pp in (2, 4):
        for m in (pp, 2 * pp - 1, 2 * pp, 8):
            v = schedule.default_v(None)
            try:
                schedule.check(pp, m, v)
            except ValueError:
                continue
            b = bubble_weight(name, pp, m, v)
            if schedule.split_backward or schedule.formula_holds(pp, m, v):
                idle = b * (pp - 1) / (m + b * (pp - 1))
                assert idle == pytest.approx(schedule.bubble_fraction(pp, m, v)), (pp, m)
            if schedule.split_backward and schedule.formula_holds(pp, m, v):
                assert b == pytest.approx(1 / (3 * v))


def test_split_backward_charges_a_second_recompute():
    """Checkpointed layers recompute at I and again at W; the V places stage s on its rank."""
    none = solvers.LayerOption(name="none", fwd_s=1.0, bwd_s=2.0, activation_bytes=4.0)
    full = solvers.LayerOption(name="full", fwd_s=1.0, bwd_s=3.0, activation_bytes=1.0)
    layers = tuple(solvers.Layer(name=f"l{i}", options=(none, full), state_bytes=0.0,
                                 boundary_bytes=0.0) for i in range(4))
    costs = SimpleNamespace(layers=layers, sub_mesh={"dp": 2}, temporaries_bytes=0.0,
                            issued={x.name: 10 for x in layers})
    cluster = autopar.Cluster.preset("h100-80g", devices_per_node=4)
    for name, ranks, full_bwd in [("Interleaved1F1B", (0, 1, 0, 1), 3.0),
                                  ("ZBVZeroBubble", (0, 1, 1, 0), 4.0)]:
        problem = pipeline_problem(costs, cluster, 2, 4, name, 2, math.inf)
        assert problem.stage_of_rank == ranks
        assert [o.bwd_s for o in problem.layers[0].options] == [2.0, full_bwd]


@pytest.mark.slow
def test_host_time_is_charged_and_favours_few_microbatches(gpt_on_four_h100s):
    """On a device whose host needs 1 ms per op, a layer costs at least its ops' host time:
    the step is never predicted below the host's, and the plan runs the batch in as few
    microbatches as fit (each one issues every op again)."""
    import dataclasses

    from autopar.cluster import Calibration
    from autopar.trace import trace

    model, batch, cluster = gpt_on_four_h100s
    slow_host = Calibration(host_s_per_op={"replay": 1e-3, "eager": 1e-3})
    cluster = dataclasses.replace(
        cluster, devices_per_node=1,
        device=dataclasses.replace(cluster.device, calibration=slow_host))
    plan = autopar.plan(model, cluster, batch, loss_fn=lm_loss)
    traced = trace(model, (batch[0],), loss_fn=lm_loss, target=batch[1])
    ops = sum(1 for n in traced.graph_module.graph.nodes if n.op == "call_function")
    assert plan.predicted["step_time_s"] >= 0.99 * ops * 1e-3
    assert (plan.pipeline or {}).get("num_microbatches", 1) == 1


def test_the_pipeline_runtime_cost_is_charged_per_stage_send():
    import dataclasses

    from autopar.cluster import Calibration

    none = solvers.LayerOption(name="none", fwd_s=1.0, bwd_s=2.0, activation_bytes=4.0)
    layers = tuple(solvers.Layer(name=f"l{i}", options=(none,), state_bytes=0.0,
                                 boundary_bytes=0.0) for i in range(4))
    costs = SimpleNamespace(layers=layers, sub_mesh={"dp": 1}, temporaries_bytes=0.0,
                            issued={x.name: 10 for x in layers})
    cluster = autopar.Cluster.preset("h100-80g", devices_per_node=2)
    plain = pipeline_problem(costs, cluster, 2, 4, "1F1B", 1, math.inf)
    slow = dataclasses.replace(cluster, device=dataclasses.replace(
        cluster.device, calibration=Calibration(pipeline_stage_s=0.5)))
    charged = pipeline_problem(costs, slow, 2, 4, "1F1B", 1, math.inf)
    assert charged.p2p_latency_s == pytest.approx(plain.p2p_latency_s + 0.5)


@pytest.mark.slow
def test_plan_keeps_nothing_of_the_model_alive():
    # a fresh interpreter: the solvers' first import happens inside autopar.plan, where pulp's
    # import-time tracebacks once held plan's frame, and so the model, for good
    import subprocess
    import sys

    script = """
import gc, weakref, torch, autopar
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.inputs import next_token_batch
from autopar.models.losses import lm_loss
model = GPT(GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=2, d_model=16))
x = torch.randint(0, 64, (4, 8))
autopar.plan(model, autopar.Cluster.preset("cpu", devices_per_node=2), (x, x), loss_fn=lm_loss,
             mesh={"dp": 2})
refs = [weakref.ref(p) for p in model.parameters()]
del model
gc.collect()
print(sum(r() is not None for r in refs))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0", "parameters of a deleted model are still alive"


def test_zero_collectives_are_charged_per_microbatch_where_the_runtime_issues_them():
    from autopar.parallelism import get_flavour
    from autopar.planning.cost import data_parallel_traffic_s

    link = autopar.Cluster.preset("h100-80g").intra_node
    p = autopar.planning.profile.TrainingPrecision.mixed_bf16()
    n = 1e8

    def c(kind, nbytes):
        return autopar.planning.cost.collective_time_s(kind, nbytes, 4, link)

    gather, scatter = c("all_gather", 2 * n), c("reduce_scatter", 2 * n)
    # (per step, per microbatch forward, per microbatch backward)
    def traffic(flavour):
        return data_parallel_traffic_s(get_flavour(flavour), n, p, 4, 4, (link, link))

    assert traffic("replicate") == (c("all_reduce", 2 * n), 0, 0)
    assert traffic("zero2") == (0.0, gather, scatter)
    assert traffic("zero3") == (0.0, gather, gather + scatter)


def test_zero2_gathered_weights_live_with_the_activations_unless_checkpointed(gpt_on_four_h100s):
    # forward keeps the weights it gathered for backward (FSDP without reshard-after-forward);
    # a checkpointed layer's recomputation gathers them again instead. On a free host
    # (`free_host`): with the H100's measured host time this tiny layer costs its host's time,
    # which hides the gather's
    from autopar.planning.layer_costs import layer_costs, solve_layers
    from autopar.planning.profile import TrainingPrecision, profile_graph
    from autopar.planning.stand_in import stand_in
    from autopar.trace import trace_for_training

    model, batch, _ = gpt_on_four_h100s
    cluster = free_host(autopar.Cluster.preset("h100-80g", devices_per_node=2))
    stand = stand_in(trace_for_training(model, batch, lm_loss))
    profiles = profile_graph(stand.traced.graph_module)
    precision = TrainingPrecision.mixed_bf16()
    solved = solve_layers(stand, profiles, cluster, {"dp": 2}, precision=precision)
    costs = {f: layer_costs(stand, profiles, cluster, {"dp": 2}, f, precision=precision,
                            solved=solved) for f in ("replicate", "zero2")}
    block = next(x.name for x in costs["zero2"].layers if x.name == "blocks.1")
    rep, z2 = ({o.name: o for o in next(x for x in costs[f].layers if x.name == block).options}
               for f in ("replicate", "zero2"))
    weights = costs["zero2"].param_numel[block] * precision.compute_bytes  # gathered, bf16
    assert z2["none"].activation_bytes - rep["none"].activation_bytes == pytest.approx(weights)
    for how in ("full", "selective"):
        assert z2[how].activation_bytes == pytest.approx(rep[how].activation_bytes)
        # recomputing pays the forward's gather again; not recomputing pays nothing more
        extra = (z2[how].bwd_s - z2["none"].bwd_s) - (rep[how].bwd_s - rep["none"].bwd_s)
        assert extra == pytest.approx(z2["none"].fwd_s - rep["none"].fwd_s) and extra > 0


def test_mixed_precision_steps_fp32_masters_on_fp32_gradients():
    """torch's AdamW steps an fp32 master on an fp32 gradient: under mixed precision the bf16
    gradient is cast (written) and read again in fp32 before the pass over the state; an fp32
    model steps its own gradients."""
    from autopar.planning.cost import optimizer_step_s
    from autopar.planning.profile import TrainingPrecision, parameter_state_bytes

    device = autopar.Cluster.preset("h100-80g").device
    n = 1e9

    def seconds(moved):
        return autopar.planning.cost.compute_time_s(0.0, moved, device, "float32")

    fp32 = TrainingPrecision.fp32()
    assert optimizer_step_s(parameter_state_bytes(n, fp32), device, fp32) == seconds(
        2 * (4 + 8) * n + 4 * n)  # read and write parameters and state, read gradients
    mixed = TrainingPrecision.mixed_bf16()
    assert optimizer_step_s(parameter_state_bytes(n, mixed), device, mixed) == seconds(
        2 * (2 + 12) * n + 2 * n + 2 * 4 * n)  # ... and the fp32 gradient, written and read


def test_gradient_accumulation_is_charged_per_later_microbatch(gpt_on_four_h100s):
    from autopar.planning.cost import gradient_accumulation_s

    device = autopar.Cluster.preset("h100-80g").device
    g = 1e9
    assert gradient_accumulation_s(g, 1, device) == 0.0  # the one gradient is .grad itself
    # three adds into .grad (read both, write one) and one division (read, write)
    assert gradient_accumulation_s(g, 4, device) == autopar.planning.cost.compute_time_s(
        0.0, (3 * 3 + 2) * g, device, "float32")
    import dataclasses

    model, batch, cluster = gpt_on_four_h100s
    cluster = dataclasses.replace(cluster, devices_per_node=1)
    one = autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, tp=1, pp=1, dp=1,
                              microbatch_size=BATCH)
    four = autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, tp=1, pp=1, dp=1,
                               microbatch_size=BATCH // 4)
    assert one.predicted["gradient_accumulation_s"] == 0.0
    acc = four.predicted["gradient_accumulation_s"]
    assert acc > 0 and four.predicted["dp_sync_s"] >= acc
    assert four.predicted["dp_sync_s"] - acc == pytest.approx(one.predicted["dp_sync_s"])


def test_progress_lines_say_what_is_solved_and_the_best_so_far(gpt_on_four_h100s):
    """A long plan says where it is: one line per (mesh, microbatch) it solves, numbered out of
    all of them, with the best step found so far and the time since the search began; the
    last line says how many the bound ruled out (those it did not reach). At datasheet
    speeds: on the calibrated device this small GPT is paced by the host's time to issue its
    ops, which bounds every pair tightly, and the first pair solved rules out the others."""
    model, batch, cluster = gpt_on_four_h100s
    said: list[str] = []
    plan = autopar.plan(model, datasheet(cluster), batch, loss_fn=lm_loss, mesh={"pp": 2, "dp": 2},
                        schedule="1F1B", log=said.append)
    progress = [line for line in said if re.match(r"\[\d+/\d+\] ", line)]  # the first pass's
    k = len(progress)
    n = int(progress[0].split("/")[1].split("]")[0])
    assert k > 1 and progress[0].startswith(f"[1/{n}] pp=2 dp=2") and "none fits yet" in progress[0]
    assert progress[-1].startswith(f"[{k}/{n}]") and "best so far" in progress[-1]
    assert said[-1].startswith("searched")
    pruned = int(said[-1].split("; ")[1].split()[0])
    assert k + pruned == n, (k, pruned, n)
    assert plan.predicted["step_time_s"] > 0


def test_a_microbatch_size_leaves_out_the_meshes_the_batch_does_not_divide():
    """Megatron's 76.1B row: batch 1792 with microbatch 1 on 1,024 GPUs, where dp = 1024 does not
    divide the batch. The search plans over the meshes that do; a fixed mesh that does not is
    still an error that says what divides."""
    cfg = GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=2, d_model=16)
    with torch.device("meta"):
        model = GPT(cfg)
    batch = next_token_batch(cfg, 12)  # 12 does not divide by 8 (nor dp = 8 x microbatch 1)
    cluster = autopar.Cluster.preset("h100-80g", devices_per_node=8)
    plan = autopar.plan(model, cluster, batch, loss_fn=lm_loss, microbatch_size=1)
    assert 12 % plan.mesh.get("dp", 1) == 0
    with pytest.raises(autopar.MeshError, match="must divide by 8"):
        autopar.plan(model, cluster, batch, loss_fn=lm_loss, mesh={"dp": 8}, microbatch_size=1)


def test_stages_that_straddle_nodes_are_priced_by_their_slowest_links():
    """24 GPUs (3 nodes of 8) cut into 2 stages of 12: stage 1 holds ranks 12-23, half of node 1
    and node 2. Only aligned blocks of gcd(12, 8) = 4 ranks share a node in both stages, so a
    stage sees 3 nodes of 4 (before, it was taken for one node of 8, 8 devices short, and
    planning failed; Megatron's 310B row, 60 of 1,920 GPUs a stage, did)."""
    from autopar.planning.layer_costs import sub_cluster

    cluster = autopar.Cluster.preset("h100-80g", nodes=3)
    assert (sub_cluster(cluster, 12).nodes, sub_cluster(cluster, 12).devices_per_node) == (3, 4)
    assert (sub_cluster(cluster, 16).nodes, sub_cluster(cluster, 16).devices_per_node) == (2, 8)
    assert (sub_cluster(cluster, 4).nodes, sub_cluster(cluster, 4).devices_per_node) == (1, 4)
    assert (sub_cluster(cluster, 6).nodes, sub_cluster(cluster, 6).devices_per_node) == (3, 2)
    cfg = GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=2, d_model=16)
    with torch.device("meta"):
        model = GPT(cfg)
    plan = autopar.plan(model, cluster, next_token_batch(cfg, 24), loss_fn=lm_loss,
                        mesh={"pp": 2, "dp": 6, "tp": 2}, microbatch_size=1,
                        data_parallel="replicate")
    assert dict(plan.mesh) == {"pp": 2, "dp": 6, "tp": 2}
