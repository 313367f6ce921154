"""Evaluation of pipelined plans (`PipelinedModel.eval_step` and `pm(inputs)`) on gloo against
the same model in one process: the loss and the output on a batch, no gradient touched, and
training that still matches after it (eval, one SGD step, eval).

One 4-rank launch runs every case in turn (the ranks share one start-up and the traces made
before they fork); plans are made by hand as in tests/runtime/test_pipeline.py.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from torch import nn

from autopar.errors import AutoparError
from autopar.models.losses import lm_loss
from autopar.plan import Plan
from autopar.runtime.mesh import make_mesh
from autopar.runtime.pipeline import PipelinedModel
from autopar.trace import TracedModel, trace
from tests.helpers.distributed import run_cases
from tests.helpers.models import LR, MODELS, batches
from tests.helpers.pipeline_plans import even_pipeline_plan


class OwnLoss(nn.Module):
    """A GPT that computes its own loss from `labels`, as a Hugging Face model does, and
    returns {"loss", "logits"}: called with keywords, no loss_fn, no target."""

    def __init__(self):
        super().__init__()
        self.gpt = MODELS["gpt"]()

    def forward(self, idx, labels):
        logits = self.gpt(idx)
        return {"loss": lm_loss(logits, labels), "logits": logits}


def make_model(model_name: str) -> nn.Module:
    return OwnLoss() if model_name == "gpt-own-loss" else MODELS[model_name]()


def call(model_name: str, x, y) -> tuple[tuple, dict]:
    """(args, kwargs) of the model's call on a batch, without the loss_fn's target."""
    return ((), {"idx": x, "labels": y}) if model_name == "gpt-own-loss" else ((x,), {})


def step_args(model_name: str, x, y) -> tuple:
    """train_step / eval_step's arguments: (inputs, target), or the keywords alone."""
    return ({"idx": x, "labels": y},) if model_name == "gpt-own-loss" else (x, y)


@functools.cache
def traced_microbatch(model_name: str, mb: int) -> TracedModel:
    """The trace of one microbatch, made once per process (before the ranks fork: `trace_all`)."""
    torch.manual_seed(0)
    x, y = batches(mb)[0]
    args, kwargs = call(model_name, x, y)
    if kwargs:
        return trace(make_model(model_name), kwargs)
    return trace(make_model(model_name), args, loss_fn=lm_loss, target=y)


def pipelined_plan(model_name, batch_size, *, microbatches, **options) -> Plan:
    """The intra-op plan of one microbatch on the sub-mesh, its layers cut evenly into pp * v
    stages on the ranks the schedule places them (tests/helpers/pipeline_plans.py)."""
    mb = batch_size // microbatches
    return even_pipeline_plan(traced_microbatch(model_name, mb), mb, microbatches=microbatches,
                              **options)


BATCH = 4
# (model, plan, runtime). The ZeRO-3 case trains op by op: replayed after another replayed run
# in one process, its trace fails in AOTAutograd's partitioner (tests/runtime/
# test_sequence_parallel.py); the others replay (evaluation itself never does)
CASES = {
    # one stage a rank; a checkpointed block runs plainly without grad
    "gpt-pp2xdp2-1F1B-checkpoint": ("gpt", dict(
        pp=2, sub_mesh={"dp": 2}, microbatches=2, schedule="1F1B",
        checkpoint={"blocks.0": "full"}), "replay"),
    # two stages a rank (0, 2 | 1, 3): values cross the ranks three times a microbatch; ZeRO-3
    "gpt-pp2xdp2-Interleaved1F1B-zero3": ("gpt", dict(
        pp=2, sub_mesh={"dp": 2}, microbatches=2, schedule="Interleaved1F1B", v=2, zero=3),
        "eager"),
    "gpt-pp2xtp2-GPipe": ("gpt", dict(
        pp=2, sub_mesh={"tp": 2}, microbatches=2, schedule="GPipe"), "replay"),
    # the V (0, 3 | 1, 2): stage 1 hands stage 2 its outputs on the same rank; the last stage,
    # loss and logits are on rank 0
    "gpt-pp2xtp2-ZBV-checkpoint": ("gpt", dict(
        pp=2, sub_mesh={"tp": 2}, microbatches=4, schedule="ZBVZeroBubble", v=2,
        checkpoint={"blocks.0": "full"}), "replay"),
    # the model's own loss, keyword inputs, no target: pm(**batch) is the logits
    "gpt-own-loss-pp2xdp2-1F1B": ("gpt-own-loss", dict(
        pp=2, sub_mesh={"dp": 2}, microbatches=2, schedule="1F1B"), "replay"),
}


def evaluate(model_name: str, plan_json: str, runtime: str):
    """On one rank: eval_step and the output with the initial weights, whether any gradient was
    touched, one training step's loss, then eval_step with the trained weights."""
    torch.manual_seed(0)
    model = make_model(model_name)
    x, y = batches(BATCH)[0]
    plan = Plan.from_dict(json.loads(plan_json))
    pm = PipelinedModel(model, traced_microbatch(model_name, plan.pipeline["microbatch_size"]),
                        plan, make_mesh(plan), runtime=runtime)
    before = pm.eval_step(*step_args(model_name, x, y))
    args, kwargs = call(model_name, x, y)
    out = pm(*args, **kwargs)
    untouched = all(p.grad is None for p in pm.parameters())
    opt = torch.optim.SGD(pm.parameters(), lr=LR)
    trained = float(pm.train_step(*step_args(model_name, x, y)))
    opt.step()
    after = float(pm.eval_step(*step_args(model_name, x, y)))
    try:  # half the batch: refused on every rank before any communication
        pm.eval_step(*step_args(model_name, x[:2], y[:2]))
        refused = None
    except AutoparError as e:
        refused = str(e)
    # the output as a list: a tensor would cross to the parent as shared memory of a rank that
    # may have exited
    return ((before.dtype, tuple(before.shape), float(before)), (out.dtype, out.tolist()),
            untouched, trained, after, refused)


def reference(model_name: str):
    """The same in one process: loss and output, one SGD step's loss, the loss after it."""
    torch.manual_seed(0)
    model = make_model(model_name)
    x, y = batches(BATCH)[0]
    args, kwargs = call(model_name, x, y)

    def run():
        out = model(*args, **kwargs)
        return (out["loss"], out["logits"]) if isinstance(out, dict) else (lm_loss(out, y), out)

    with torch.no_grad():
        before, out = run()
    loss, _ = run()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    with torch.no_grad():
        after, _ = run()
    return before.item(), out, loss.item(), after.item()


def trace_all(jobs) -> None:
    """The launch's `prepare`: every case's microbatch trace, made once before the ranks fork."""
    for model_name, plan, _ in jobs:
        traced_microbatch(model_name, json.loads(plan)["pipeline"]["microbatch_size"])


@pytest.fixture(scope="module")
def runs() -> dict:
    jobs = [(model_name, pipelined_plan(model_name, BATCH, **config).to_json(), runtime)
            for model_name, config, runtime in CASES.values()]
    results = run_cases(evaluate, 4, jobs, prepare=functools.partial(trace_all, jobs))
    return dict(zip(CASES, results))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_evaluation_matches_single_process(case, runs):
    model_name, config, _ = CASES[case]
    assert config["pp"] * math.prod(config["sub_mesh"].values()) == 4
    want_before, want_out, want_trained, want_after = reference(model_name)
    results = runs[case]
    for (before, out, untouched, trained, after, _) in results:
        assert before[:2] == (torch.float32, ())  # as train_step returns it
        assert untouched  # no gradient made or touched
        assert (before, out, trained, after) == (*results[0][:2], *results[0][3:5])  # all ranks
    (_, _, before), (dtype, out), _, trained, after, refused = results[0]
    out = torch.tensor(out, dtype=dtype)
    assert before == pytest.approx(want_before, rel=1e-5)
    assert out.shape == want_out.shape  # the global batch, microbatches joined along dim 0
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert trained == pytest.approx(want_trained, rel=1e-5)  # training after evaluation
    assert after == pytest.approx(want_after, rel=1e-5)
    m, mb = config["microbatches"], BATCH // config["microbatches"]
    assert refused == (
        f"input 'args_0' has shape (2, 8), the plan runs {m} microbatches of ({mb}, 8): pass "
        f"one global batch of shape ({BATCH}, 8) ({m} x {mb} samples), or re-plan for this "
        "batch")
