"""Hugging Face models as they come, trained on 4 CPU processes against one process.

Each family's tiny model (tests/helpers/hf_models.py: default config, dropout off so runs
compare) is planned by hand on `dp=2 x tp=2` and, where it has a stack of blocks, `pp=2 x dp=2`,
called the way Hugging Face's Trainer calls it (a dict of keyword arguments with `labels`, the
model's own loss, no loss_fn), and trained a few SGD steps; the loss after every step equals
single-process training of the same model within 1e-5 relative.
"""

from __future__ import annotations

import json

import pytest
import torch

import autopar
from tests.helpers.distributed import run_on_ranks
from tests.helpers.hf_models import FAMILIES, hf_batch, hf_model
from tests.helpers.models import fast_cpu_cluster

STEPS, LR = 3, 0.1


def _sgd_losses(parameters, train_step) -> list[float]:
    opt = torch.optim.SGD(parameters, lr=LR)
    losses = []
    for step in range(STEPS):
        losses.append(float(train_step(hf_batch_cached(step))))
        opt.step()
        opt.zero_grad()
    return losses


def hf_batch_cached(step: int):
    return _BATCHES.setdefault(step, hf_batch(_MODEL[0], seed=step))


_BATCHES: dict = {}
_MODEL: list = [None]


def single_process_losses(model_type: str) -> list[float]:
    _MODEL[0] = model_type
    _BATCHES.clear()
    torch.manual_seed(0)
    model = hf_model(model_type, dropout_off=True)

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        return loss.detach()

    return _sgd_losses(model.parameters(), step)


def hand_plan(model_type: str, mesh: dict[str, int]) -> str:
    """The plan of `mesh` (two microbatches per step with pp), made from the model on meta."""
    with torch.device("meta"):
        model = hf_model(model_type, dropout_off=True)
    batch = hf_batch(model_type, seed=0)
    dp, pp = mesh.get("dp", 1), mesh.get("pp", 1)
    return autopar.manual_plan(
        model, fast_cpu_cluster(4), batch, tp=mesh.get("tp", 1), pp=pp, dp=dp,
        microbatch_size=len(batch["labels"]) // dp // (2 if pp > 1 else 1)).to_json()


def parallel_losses(model_type: str, plan_json: str) -> list[float]:
    """On every rank: shard as the plan says, train."""
    _MODEL[0] = model_type
    _BATCHES.clear()
    torch.manual_seed(0)
    model = hf_model(model_type, dropout_off=True)
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    pm = autopar.autoparallelize(model, fast_cpu_cluster(4), hf_batch(model_type), plan=plan)
    return _sgd_losses(pm.parameters(), pm.train_step)


def train_all(cases) -> list:
    return [parallel_losses(model_type, plan_json) for model_type, plan_json in cases]


CASES = [(t, {"dp": 2, "tp": 2}) for t in FAMILIES] + [
    (t, {"pp": 2, "dp": 2}) for t in FAMILIES]


@pytest.mark.slow
def test_hugging_face_models_train_as_one_process():
    expected = [single_process_losses(t) for t, _ in CASES]
    plans = [(t, hand_plan(t, mesh)) for t, mesh in CASES]
    got = run_on_ranks(train_all, 4, plans, timeout_s=1200)
    for (model_type, mesh), want, ranks in zip(CASES, expected, zip(*got)):
        for losses in ranks:
            assert losses == pytest.approx(want, rel=1e-5), (model_type, mesh)


def dropout_on_losses(model_type: str, plan_json: str) -> list[float]:
    """On every rank: the model as it comes (dropout on), sharded and trained."""
    torch.manual_seed(0)
    model = hf_model(model_type)
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    pm = autopar.autoparallelize(model, fast_cpu_cluster(4), hf_batch(model_type), plan=plan)
    opt = torch.optim.SGD(pm.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        losses.append(float(pm.train_step(hf_batch(model_type, seed=step))))
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.slow
def test_dropout_stays_on_and_ranks_agree():
    """BERT as it comes (dropout 0.1) on dp=2 x tp=2: every rank reports the same losses, and
    they are not those of the same model without dropout (dropout really ran)."""
    plan = hand_plan("bert", {"dp": 2, "tp": 2})
    ranks = run_on_ranks(dropout_on_losses, 4, "bert", plan)
    assert all(r == ranks[0] for r in ranks)
    assert all(torch.isfinite(torch.tensor(ranks[0])))
    assert ranks[0] != pytest.approx(single_process_losses("bert"), rel=1e-4)
