"""The whole pipeline against single-device training, step by step, on 4 CPU processes (gloo)."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch

import autopar
from autopar.models.gpt import GPT
from autopar.models.losses import lm_loss
from tests.helpers import traces
from tests.helpers.distributed import run_cases, run_on_ranks
from tests.helpers.models import (
    CONFIG,
    MODELS,
    batches,
    fast_cpu_cluster,
    reference_losses,
    sgd_losses,
)
from tests.helpers.plans import sample_plan


def on_mesh(mesh: dict[str, int]) -> dict:
    """Planning options: `mesh`, and each rank's whole share of the batch as one microbatch.
    The search would also try smaller microbatches (gradient accumulation) and, on these meshes
    and models, choose the same plan; fixing it halves the planning. The search over
    microbatches is tested by test_autoparallelize_searches_and_passes_options_through and in
    tests/planning/test_search.py."""
    return {"mesh": mesh, "microbatch_size": len(batches()[0][0]) // mesh.get("dp", 1)}


@functools.cache
def _offline_plan(model_name: str, mesh: tuple[tuple[str, int], ...]) -> str:
    with torch.device("meta"):
        model = MODELS[model_name]()
    return autopar.plan(model, fast_cpu_cluster(4), batches()[0], loss_fn=lm_loss,
                        **on_mesh(dict(mesh))).to_json()


def offline_plan(model_name: str, mesh: dict[str, int]) -> str:
    """The plan made from the model on the meta device, as a file would carry it; made once
    per session (in this process, not on the ranks) for each model and mesh."""
    return _offline_plan(model_name, tuple(mesh.items()))


def train_parallel(model_name: str, mesh: dict[str, int], runtime: str = "replay",
                   plan_json: str | None = None, keep: bool = False):
    """Runs on every rank: plan (or load `plan_json`), shard, train; report losses and which
    weights were split (and, with `keep`, the sharded model)."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = batches()
    if plan_json is not None:
        options = {"plan": autopar.Plan.from_dict(json.loads(plan_json))}
    else:
        options = on_mesh(mesh)
    with traces.remembered(model_name):  # the compile's trace; rank 0 still plans on its own
        pm = autopar.autoparallelize(
            model, fast_cpu_cluster(4), example_inputs=data[0], loss_fn=lm_loss,
            runtime=runtime, **options,
        )
    losses = sgd_losses(pm.parameters(), pm.train_step, data)
    split = sorted(name for name, p in pm.named_parameters() if p.to_local().numel() < p.numel())
    return (losses, split, pm.plan.to_json()) + ((pm,) if keep else ())


def trace_models(names) -> None:
    """A launch's `prepare`: each model's trace of the whole batch, as the ranks' autoparallelize
    compiles a plan without pipeline stages, made once before they fork (tests/helpers/traces.py)."""
    for name in names:
        torch.manual_seed(0)
        traces.remember(name, MODELS[name](), batches()[0], lm_loss)


def _call(fn, *args):
    return fn(*args)


# both models on the 2-D mesh with the default (replay) runtime, GPT's planned offline on the
# meta device; the 1-D meshes once each, op by op (the "eager" runtime), so both runtimes stay
# proven
# (gpt on dp=4 is the fast lane's end-to-end check: `pytest -m "not slow"`)
SLOW_CASES = [("gpt", {"dp": 2, "tp": 2}, "replay", True),
              ("llama", {"dp": 2, "tp": 2}, "replay", False),
              ("llama", {"tp": 4}, "eager", False)]


def _job(model_name, mesh, runtime, plan_on_meta):
    plan_json = offline_plan(model_name, mesh) if plan_on_meta else None
    return (train_parallel, model_name, mesh, runtime, plan_json)


@pytest.fixture(scope="module")
def slow_runs() -> dict:
    """The slow lane's 4-rank runs in one launch, each rank taking them in turn, the models'
    traces made once before the ranks fork: SLOW_CASES, and GPT's checkpointed layers (after
    its plain run of the same plan)."""
    jobs = [_job(*case) for case in SLOW_CASES]
    jobs.insert(1, (train_checkpointed, "gpt", offline_plan("gpt", {"dp": 2, "tp": 2})))
    results = run_cases(_call, 4, jobs, prepare=functools.partial(trace_models, list(MODELS)))
    return {"checkpointed": results.pop(1), **{repr(case): r
                                               for case, r in zip(SLOW_CASES, results)}}


@pytest.mark.parametrize("model_name, mesh, runtime, plan_on_meta", [
    *(pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES),
    ("gpt", {"dp": 4}, "eager", False),
], ids=str)
def test_losses_match_single_process(model_name, mesh, runtime, plan_on_meta, request):
    reference = reference_losses(model_name)
    case = (model_name, mesh, runtime, plan_on_meta)
    if case in SLOW_CASES:
        results = request.getfixturevalue("slow_runs")[repr(case)]
    else:  # the fast lane's, a launch of its own
        fn, *args = _job(*case)
        results = run_on_ranks(fn, 4, *args, prepare=functools.partial(trace_models, [model_name]))
    losses = [r[0] for r in results]
    for rank_losses in losses:  # the same loss on every rank ...
        assert rank_losses == losses[0]
    # ... and the single-process loss after every step, within 1e-5 relative (fp32)
    assert losses[0] == pytest.approx(reference, rel=1e-5)
    plans = {r[2] for r in results}
    assert len(plans) == 1, "every rank must plan the same"
    if "tp" in mesh:
        assert results[0][1], "under tp at least one weight must be split"


# ops DTensor shards in a GPT on tp=2, both in the loss and split over the batch, whose rules the
# ranks below delete, as torch 2.11 lacks 2.13's rule for squeeze.dims:
# - gather: DTensor then has no rule at all (no decomposition to shard through);
# - squeeze.dims: DTensor still claims a decomposition, which then fails to shard. Only asking
#   DTensor with the plan's placements finds it, which a runtime does for a plan made with
#   another torch.
# (No other op's backward calls either; mm, say, is addmm's backward.)
NO_RULE_HERE = ("aten.gather.default", "aten.squeeze.dims")


def train_without_rules(plan_json: str):
    """Runs on every rank, under a DTensor that lacks the rules of NO_RULE_HERE: the plan
    (made with them) must still train exactly, and say which ops it could not shard."""
    from autopar import dtensor

    prop = dtensor._propagator()
    for table in ("op_strategy_funcs", "op_single_dim_strategy_funcs", "op_to_rules"):
        for op in list(getattr(prop, table, {})):
            if str(op) in NO_RULE_HERE:
                del getattr(prop, table)[op]
    assert not dtensor.has_rule(torch.ops.aten.gather.default)
    assert dtensor.has_rule(torch.ops.aten.squeeze.dims)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, _, _, pm = train_parallel("gpt", {}, plan_json=plan_json, keep=True)
    # the ops on gathered inputs do not make backward run the loss's forward again: their
    # collectives once kept a dead copy of it (LM head matmul, log-softmax) in the traced backward
    with torch.profiler.profile() as prof:
        pm.train_step(*batches()[0])
    log_softmax = sum(e.name == "aten::_log_softmax" for e in prof.events())
    return losses, [str(w.message) for w in caught if "cannot shard" in str(w.message)], log_softmax


@pytest.mark.slow
def test_a_plan_made_with_another_torch_runs_where_dtensor_lacks_its_rules():
    with torch.device("meta"):
        model = MODELS["gpt"]()
    plan = autopar.plan(model, fast_cpu_cluster(2), batches()[0], loss_fn=lm_loss, mesh={"tp": 2})
    assert plan.made_with == {"torch": torch.__version__}
    sharded = {name.rstrip("_0123456789") for name, op in plan.ops.items()
               if op.rule == "dtensor" and any(p not in ([], ["R"]) for p in op.inputs + op.outputs)}
    assert {"gather", "squeeze"} <= sharded, "the test needs these ops sharded by DTensor"
    plan.made_with = {"torch": "2.11.0+cu130"}  # as if made elsewhere
    results = run_on_ranks(train_without_rules, 2, plan.to_json(),
                           prepare=functools.partial(trace_models, ["gpt"]))
    reference = reference_losses("gpt")
    for losses, warned, log_softmax in results:
        assert losses == pytest.approx(reference, rel=1e-5)
        assert len(warned) == 1 and all(op in warned[0] for op in NO_RULE_HERE), warned
        assert "made with torch 2.11.0+cu130" in warned[0]
        assert log_softmax == 1


def plan_for_four_on_two():
    """Runs on 2 ranks with a cluster that says 4 devices: must fail clearly, not hang."""
    try:
        autopar.autoparallelize(
            GPT(CONFIG), fast_cpu_cluster(4), example_inputs=batches()[0], loss_fn=lm_loss
        )
    except autopar.AutoparError as e:
        return type(e).__name__, str(e)
    return None


def test_cluster_that_does_not_match_the_job():
    results = run_on_ranks(plan_for_four_on_two, 2)
    for name, message in results:
        assert name == "MeshError"
        assert "has 4 devices but this job has 2 processes" in message


def train_checkpointed(model_name: str, plan_json: str):
    """The planner's dp=2 x tp=2 plan, the first block checkpointed in full, the second
    selectively."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    data = batches()
    cluster = fast_cpu_cluster(4)
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    first = "blocks" if hasattr(model, "blocks") else "layers"
    plan.checkpoint = {f"{first}.0": "full", f"{first}.1": "selective"}
    with traces.remembered(model_name):
        pm = autopar.autoparallelize(model, cluster, data[0], loss_fn=lm_loss, plan=plan)
    return sgd_losses(pm.parameters(), pm.train_step, data)


@pytest.mark.slow
def test_checkpointed_layers_match_single_process(slow_runs):
    # GPT here; the pipeline tests checkpoint Llama layers. The plan is the one the GPT case of
    # test_losses_match_single_process runs (made once, here, instead of on each rank), trained
    # in the same launch as that case (`slow_runs`)
    results = slow_runs["checkpointed"]
    assert results[0] == pytest.approx(reference_losses("gpt"), rel=1e-5)


def train_searched():
    """Every rank: autoparallelize with no mesh (rank 0 runs the full search), then with options
    that fix a pipelined ZeRO-3 plan, then with a memory limit nothing fits and with a schedule
    that does not exist. One job for them all: a 4-rank start-up costs more than any of them."""
    runs = {}
    for name, options in [
        ("searched", {}),
        ("fixed", dict(mesh={"pp": 2, "dp": 2}, schedule="1F1B", microbatch_size=1,
                       data_parallel="zero3", checkpoint=False)),
    ]:
        torch.manual_seed(0)
        model = MODELS["gpt"]()
        data = batches()
        pm = autopar.autoparallelize(model, fast_cpu_cluster(4), data[0], loss_fn=lm_loss,
                                     **options)
        losses = sgd_losses(pm.parameters(), pm.train_step, data)
        runs[name] = (losses, type(pm).__name__, pm.plan.to_json())
    for name, option in [("infeasible", {"memory_limit": 1000}),
                         ("schedule", {"schedule": "2F2B"})]:
        try:
            autopar.autoparallelize(GPT(CONFIG), fast_cpu_cluster(4), batches()[0],
                                    loss_fn=lm_loss, mesh={"dp": 4}, **option)
        except Exception as e:  # rank 0 fails planning; every rank must raise the same
            runs[name] = f"{type(e).__name__}: {e}"
    return runs


@pytest.mark.slow
def test_autoparallelize_searches_and_passes_options_through():
    results = run_on_ranks(train_searched, 4)
    reference = reference_losses("gpt")
    for name in ("searched", "fixed"):
        runs = [r[name] for r in results]
        assert len({plan for _, _, plan in runs}) == 1, "every rank must run rank 0's plan"
        for losses, _, _ in runs:  # the same loss on every rank, each step
            assert losses == runs[0][0]
        assert runs[0][0] == pytest.approx(reference, rel=1e-5), name
    searched = autopar.Plan.from_dict(json.loads(results[0]["searched"][2]))
    # the full search's plan, not the intra-op one: it carries the search's record
    assert searched.solver["candidates"] > 1 and "stage_cut" in searched.solver
    kind = results[0]["searched"][1]
    assert kind == ("PipelinedModel" if searched.pipeline else "ParallelModel")
    fixed = autopar.Plan.from_dict(json.loads(results[0]["fixed"][2]))
    assert results[0]["fixed"][1] == "PipelinedModel"
    assert fixed.mesh == {"pp": 2, "dp": 2} and fixed.data_parallel == "zero3"
    assert fixed.pipeline["schedule"] == "1F1B" and fixed.pipeline["num_microbatches"] == 2
    assert fixed.checkpoint == {}
    for name, message in [("infeasible", "InfeasibleError: no plan fits the memory limit"),
                          ("schedule", "ValueError: unknown pipeline schedule '2F2B'")]:
        errors = {r.get(name) for r in results}  # the same clear error on every rank
        assert len(errors) == 1 and errors.pop().startswith(message)


def test_unknown_option_names_the_valid_ones():
    model, data = GPT(CONFIG), batches()[0]
    with pytest.raises(autopar.AutoparError, match=r"unknown option\(s\) \['microbatches'\].*"
                                                   r"memory_limit.*microbatch_size"):
        autopar.autoparallelize(model, fast_cpu_cluster(1), data, loss_fn=lm_loss,
                                microbatches=2)


def test_planning_options_beside_a_ready_plan_are_refused():
    with pytest.raises(autopar.AutoparError, match=r"plan= and planning option\(s\) "
                                                   r"\['memory_limit', 'mesh'\]"):
        autopar.autoparallelize(GPT(CONFIG), fast_cpu_cluster(4), batches()[0], loss_fn=lm_loss,
                                plan=sample_plan(), mesh={"dp": 4}, memory_limit=2**30)
