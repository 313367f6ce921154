"""Ops sharded by a rule registered with `autopar.register_rule` train on two gloo ranks as in
one process: `torch.cdist` (no DTensor rule in torch 2.13) split over the batch, and
docs/rules.md's torch.library custom op. The ranks run the plan made here, without registering
the rule: a plan's "local" op runs on local shards as its placements say."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import autopar
from tests.helpers.custom_ops import (
    CDIST,
    Prototypes,
    cdist_rule,
    prototypes_batch,
    prototypes_loss,
    rule_example,
)
from tests.helpers.distributed import run_on_ranks
from tests.helpers.models import fast_cpu_cluster

STEPS, LR = 3, 0.1


def _steps(parameters, train_step, x, y) -> tuple[list[float], dict]:
    """Losses of STEPS SGD steps on one batch, and the first step's gradients by name."""
    opt = torch.optim.SGD([p for _, p in parameters], lr=LR)
    losses, grads = [], {}
    for step in range(STEPS):
        losses.append(float(train_step(x, y)))
        if step == 0:
            grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor")
                     else p.grad.clone() for name, p in parameters}
        opt.step()
        opt.zero_grad()
    return losses, grads


def _single_process(model, loss_fn, x, y):
    def step(a, b):
        loss = loss_fn(model(a), b)
        loss.backward()
        return loss.item()

    return _steps(list(model.named_parameters()), step, x, y)


def _train(model_name: str, plan_json: str):
    """On each rank: the model, sharded as planned, trained STEPS steps."""
    if model_name == "prototypes":
        make, loss_fn, (x, y) = Prototypes, prototypes_loss, prototypes_batch()
    else:
        ns = rule_example(plan=False)  # this process's own definition of the custom op
        make, loss_fn, (x, y) = ns["Model"], F.mse_loss, _rownorm_batch()
    torch.manual_seed(0)
    model = make()
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    pm = autopar.autoparallelize(model, fast_cpu_cluster(2), (x, y), loss_fn=loss_fn, plan=plan)
    named = [(n.removeprefix("_params.").replace("__", "."), p) for n, p in pm.named_parameters()]
    losses, grads = _steps(named, pm.train_step, x, y)
    return losses, {name: g.tolist() for name, g in grads.items()}  # tensors would share memory


def _rownorm_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 16, 64, generator=g), torch.randn(8, 16, 64, generator=g)


def _check(results, model, loss_fn, x, y):
    want_losses, want_grads = _single_process(model, loss_fn, x, y)
    for losses, grads in results:
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(torch.tensor(g), want_grads[name], rtol=1e-5, atol=1e-6,
                                       msg=name)


def test_cdist_with_a_registered_rule_trains_as_in_one_process():
    torch.manual_seed(0)
    x, y = prototypes_batch()
    with autopar.register_rule(CDIST, cdist_rule):
        plan = autopar.plan(Prototypes(), fast_cpu_cluster(2), (x, y), loss_fn=prototypes_loss,
                            mesh={"dp": 2})
    op = plan.ops["_cdist_forward"]
    assert op.rule == "local" and op.inputs == [["S(0)"], ["S(0)"]]
    results = run_on_ranks(_train, 2, "prototypes", plan.to_json())
    torch.manual_seed(0)
    _check(results, Prototypes(), prototypes_loss, x, y)


def test_the_docs_example_trains_as_in_one_process():
    ns = rule_example(plan=False)
    x, y = _rownorm_batch()
    torch.manual_seed(0)
    plan = autopar.plan(ns["Model"](), fast_cpu_cluster(2), (x, y), loss_fn=F.mse_loss,
                        mesh={"dp": 2})
    assert plan.ops["rownorm"].rule == "local" and plan.ops["rownorm"].inputs == [["S(0)"]]
    results = run_on_ranks(_train, 2, "rownorm", plan.to_json())
    torch.manual_seed(0)
    _check(results, ns["Model"](), F.mse_loss, x, y)
