"""Checkpoints through torch.distributed.checkpoint that move between plans: saved under one plan,
loaded under another (dp2 x tp2 -> pp2 x dp2 -> ZeRO-3 on 2 ranks; bf16-mixed dp2 x tp2 ->
pp2 x dp2), the weights and AdamW state bit for bit, training going on as if never stopped; a
plain model's checkpoint loads; the whole weights come back as the model names them."""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

import autopar
from autopar.errors import AutoparError
from autopar.models.gpt import GPT
from autopar.models.losses import lm_loss
from autopar.plan import Plan
from tests.helpers.distributed import run_on_ranks
from tests.helpers.models import CONFIG, MODELS, batches, fast_cpu_cluster

LR, WEIGHT_DECAY = 1e-2, 0.1
PLANS = {  # name: (world size, manual_plan options)
    "dp2xtp2": (4, dict(tp=2, pp=1, dp=2, microbatch_size=2)),
    "pp2xdp2": (4, dict(tp=1, pp=2, dp=2, microbatch_size=1)),
    "zero3-dp2": (2, dict(tp=1, pp=1, dp=2, microbatch_size=2, zero=3)),
}


def cluster(world: int) -> autopar.Cluster:
    c = fast_cpu_cluster(world)
    return dataclasses.replace(c, device=dataclasses.replace(
        c.device, peak_flops={**c.device.peak_flops, "bfloat16": 4e11}))


def model():
    torch.manual_seed(0)
    return MODELS["gpt"]()


@functools.cache
def plan_json(name: str, precision: str = "fp32") -> str:
    world, options = PLANS[name]
    return autopar.manual_plan(model(), cluster(world), batches()[0], loss_fn=lm_loss,
                               precision=precision, **options).to_json()


def train(plan_text: str, *, load_from=None, save_to=None, before: int = 0, after: int = 0):
    """Build the plan's model, load a checkpoint (the steps it holds come first in the data),
    train `before` steps, save, snapshot the state, train `after` more; returns (snapshot,
    losses after the save, the loaded extra)."""
    plan = Plan.from_dict(json.loads(plan_text))
    data = batches()
    pm = autopar.autoparallelize(model(), cluster(plan.world_size), data[0], loss_fn=lm_loss,
                                 plan=plan)
    opt = autopar.optimizer(pm, torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY)
    extra = autopar.load(load_from, pm, opt) if load_from else {"step": 0}
    step = extra["step"]

    def train_on(steps):
        losses = []
        for x, y in data[step: step + steps]:
            losses.append(float(pm.train_step(x, y)))
            opt.step()
            opt.zero_grad()
        return losses

    train_on(before)
    step += before
    if save_to:
        autopar.save(save_to, pm, opt, extra={"step": step})
    snapshot = _snapshot(autopar.state_dict(pm, opt))
    return snapshot, train_on(after), extra


def _snapshot(state: dict) -> dict:
    """Every tensor of the state, whole, as numpy (tensors cross the result queue through
    shared memory the rank frees when it exits); group options unpickled."""
    out = {}
    for key in sorted(state):
        value = state[key]
        if isinstance(value, torch.distributed.tensor.DTensor):
            out[key] = value.full_tensor().detach().clone().numpy()  # not the live weight
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().clone().numpy()
        else:
            out[key] = pickle.loads(value.getvalue())
    return out


def merged(ranks) -> dict:
    """The ranks' snapshots as one (a pipelined rank holds its stages' weights)."""
    out = {}
    for snapshot, _, _ in ranks:
        out.update(snapshot)
    return out


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        if isinstance(want[key], np.ndarray):
            assert np.array_equal(got[key], want[key]), key  # bit for bit
        else:
            assert got[key] == want[key], key


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """fp32: dp2 x tp2 trains 2 steps and saves; pp2 x dp2 loads it, saves again, trains the
    same 2 next steps; ZeRO-3 on 2 ranks loads that. bf16-mixed: dp2 x tp2 -> pp2 x dp2."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    out = {}
    def launch(world, plan, **kw):  # run_on_ranks passes positional arguments only
        kw = {k: str(tmp / v) if k in ("save_to", "load_from") else v for k, v in kw.items()}
        return run_on_ranks(functools.partial(train, **kw), world, plan)

    out["dp2xtp2"] = launch(4, plan_json("dp2xtp2"), save_to="a", before=2, after=2)
    out["pp2xdp2"] = launch(4, plan_json("pp2xdp2"), load_from="a", save_to="b", after=2)
    out["zero3-dp2"] = launch(2, plan_json("zero3-dp2"), load_from="b")
    out["mixed-dp2xtp2"] = launch(4, plan_json("dp2xtp2", "bf16-mixed"), save_to="m", before=2)
    out["mixed-pp2xdp2"] = launch(4, plan_json("pp2xdp2", "bf16-mixed"), load_from="m")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("saved, loaded", [("dp2xtp2", "pp2xdp2"), ("dp2xtp2", "zero3-dp2"),
                                           ("mixed-dp2xtp2", "mixed-pp2xdp2")])
def test_a_checkpoint_loads_bit_for_bit_under_another_plan(chain, saved, loaded):
    want = merged(chain[saved])
    assert any(k.endswith("/exp_avg_sq") for k in want)  # AdamW's state is in it
    assert_same_state(merged(chain[loaded]), want)
    assert all(extra == {"step": 2} for _, _, extra in chain[loaded])


@pytest.mark.slow
def test_training_goes_on_as_if_never_stopped(chain):
    _, uninterrupted, _ = chain["dp2xtp2"][0]
    _, resumed, _ = chain["pp2xdp2"][0]
    assert len(resumed) == 2
    assert resumed == pytest.approx(uninterrupted, rel=1e-5)


def load_plain(plan_text: str, path):
    plan = Plan.from_dict(json.loads(plan_text))
    pm = autopar.autoparallelize(model(), cluster(plan.world_size), batches()[0],
                                 loss_fn=lm_loss, plan=plan)
    autopar.load(path, pm)
    from_dcp = {k: v.numpy() for k, v in autopar.full_state_dict(pm).items()}
    torch.manual_seed(1)
    autopar.load_state_dict(pm, MODELS["gpt"]().state_dict())  # a plain state_dict, in memory
    return from_dcp, {k: v.numpy() for k, v in autopar.full_state_dict(pm).items()}


@pytest.mark.slow
def test_a_plain_models_checkpoint_loads_and_comes_back_whole(tmp_path):
    torch.manual_seed(7)
    plain = MODELS["gpt"]()
    dcp.save(plain.state_dict(), checkpoint_id=tmp_path, no_dist=True)
    ranks = run_on_ranks(load_plain, 4, plan_json("pp2xdp2"), str(tmp_path))
    torch.manual_seed(1)
    other = MODELS["gpt"]().state_dict()
    for from_dcp, from_memory in ranks:  # every rank has the whole model, tied names included
        want = {k: v for k, v in plain.state_dict().items() if k in dict(plain.named_parameters(
            remove_duplicate=False))}
        assert sorted(from_dcp) == sorted(want)
        for k in want:
            assert np.array_equal(from_dcp[k], want[k].numpy()), k
            assert np.array_equal(from_memory[k], other[k].numpy()), k


def load_wrong(plan_text: str, path):
    plan = Plan.from_dict(json.loads(plan_text))
    pm = autopar.autoparallelize(model(), cluster(plan.world_size), batches()[0],
                                 loss_fn=lm_loss, plan=plan)
    try:
        autopar.load(path, pm)
    except AutoparError as e:
        return str(e)
    return "loaded"


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_with_the_reason(tmp_path):
    bigger = GPT(dataclasses.replace(CONFIG, d_model=128))
    dcp.save(bigger.state_dict(), checkpoint_id=tmp_path, no_dist=True)
    messages = run_on_ranks(load_wrong, 2, plan_json("zero3-dp2"), str(tmp_path))
    assert all("another model" in m and "(64, 64)" not in m for m in messages), messages
    assert all("shape" in m for m in messages)


def test_no_checkpoint_there_is_a_clear_error(tmp_path):
    with pytest.raises(AutoparError, match="no checkpoint at"):
        autopar.load(tmp_path / "missing", object())


def test_load_needs_the_parallel_model(tmp_path):
    with pytest.raises(AutoparError, match="autoparallelize returned"):
        autopar.save(tmp_path, model())
