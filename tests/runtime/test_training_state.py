"""The optimizer and gradient clipping autopar owns (`autopar.optimizer`, `clip_grad_norm_`),
in fp32 and in ZeRO's bf16 mixed precision, on a plan without pipeline (dp2 x tp2) and a
pipelined one (pp2 x dp2, GPT's tied embedding on both pp ranks), against one process
training the same fp32-built model as a user would: torch's AdamW and
`torch.nn.utils.clip_grad_norm_` (fp32), or a bf16 copy stepped on fp32 masters (bf16-mixed)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math

import pytest
import torch

import autopar
from autopar.errors import AutoparError
from autopar.models.losses import lm_loss
from autopar.plan import Plan
from autopar.runtime import optim
from tests.helpers.distributed import run_cases
from tests.helpers.models import MODELS, batches, fast_cpu_cluster

LR, WEIGHT_DECAY, MAX_NORM = 1e-2, 0.1, 0.5
MESHES = {"dp2xtp2": dict(tp=2, pp=1, dp=2, microbatch_size=2),
          "pp2xdp2": dict(tp=1, pp=2, dp=2, microbatch_size=1)}


def cluster() -> autopar.Cluster:
    """Four CPU processes that compute bf16 too (the test cluster's device lists fp32 only)."""
    c = fast_cpu_cluster(4)
    return dataclasses.replace(c, device=dataclasses.replace(
        c.device, peak_flops={**c.device.peak_flops, "bfloat16": 4e11}))


def model():
    torch.manual_seed(0)
    return MODELS["gpt"]()  # built in fp32, as its authors ship it


@functools.cache
def plan_json(mesh: str, precision: str) -> str:
    return autopar.manual_plan(model(), cluster(), batches()[0], loss_fn=lm_loss,
                               precision=precision, **MESHES[mesh]).to_json()


def train(plan_text: str):
    """Each step's loss, gradient norms (inf, then 2 as clipped; flat) and, after the last, the fp32
    weights (the masters under mixed precision) and the dtype the graph read each in."""
    data = batches()
    pm = autopar.autoparallelize(model(), cluster(), data[0], loss_fn=lm_loss,
                                 plan=Plan.from_dict(json.loads(plan_text)))
    opt = autopar.optimizer(pm, torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY)
    assert opt.inner.defaults["fused"] is True  # the kernels the user did not choose against
    losses, norms = [], []
    for x, y in data:
        losses.append(float(pm.train_step(x, y)))
        inf = float(pm.clip_grad_norm_(1e9, norm_type=math.inf))  # measures, clips nothing
        norms += [inf, float(pm.clip_grad_norm_(MAX_NORM))]
        opt.step()
        opt.zero_grad()
    # numpy: tensors cross the result queue through shared memory the rank frees when it exits
    weights = {w.fqn: (w.master if w.master is not None else w.param).full_tensor().detach()
               .float().numpy()
               for w in pm.weights()}
    dtypes = {w.fqn: (str(w.param.dtype), w.master is not None) for w in pm.weights()}
    return losses, norms, weights, dtypes


def reference(precision: str):
    """One process: fp32 AdamW and torch's clipping, or (bf16-mixed) a bf16 copy of the model
    whose fp32 masters AdamW steps, its bf16 gradients clipped by their fp32 norm."""
    fp32 = model()
    masters = dict(fp32.named_parameters(remove_duplicate=False))  # tied: both names
    compute = fp32 if precision == "fp32" else copy.deepcopy(fp32).to(torch.bfloat16)
    params = dict(compute.named_parameters())
    opt = torch.optim.AdamW(fp32.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses, norms = [], []
    for x, y in batches():
        loss = lm_loss(compute(x), y)
        loss.backward()
        losses.append(loss.item())
        grads = [p.grad for p in params.values()]
        inf = float(torch.nn.utils.clip_grad_norm_(params.values(), 1e9, norm_type=math.inf))
        if precision == "fp32":
            two = float(torch.nn.utils.clip_grad_norm_(params.values(), MAX_NORM))
        else:  # the norm of bf16 gradients, summed in fp32
            two = float(torch.stack([g.float().pow(2).sum() for g in grads]).sum().sqrt())
            for g in grads:
                g.mul_(min(1.0, MAX_NORM / (two + 1e-6)))
            for name, p in params.items():
                masters[name].grad = p.grad.float()
        norms += [inf, two]
        opt.step()
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(masters[name])
        opt.zero_grad()
        compute.zero_grad()
    return losses, norms, {k: v.detach() for k, v in masters.items()}


CASES = [(mesh, precision) for precision in ("fp32", "bf16-mixed") for mesh in MESHES]


@pytest.fixture(scope="module")
def runs() -> dict:
    per_rank = run_cases(train, 4, [(plan_json(*case),) for case in CASES])
    out = {}
    for case, ranks in zip(CASES, per_rank):
        losses, norms, _, _ = ranks[0]
        weights, dtypes = {}, {}
        for _, _, w, d in ranks:
            weights.update({k: torch.from_numpy(v) for k, v in w.items()})
            dtypes.update(d)
        out[case] = losses, norms, weights, dtypes
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_fp32_adamw_and_clipping_equal_torch_on_the_unsharded_model(mesh, runs):
    losses, norms, weights, dtypes = runs[(mesh, "fp32")]
    want_losses, want_norms, want_weights = reference("fp32")
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert norms == pytest.approx(want_norms, rel=1e-5)
    assert all(dtype == ("torch.float32", False) for dtype in dtypes.values())
    # within 1% of one step (lr): Adam divides each gradient by its own root mean square, so an
    # element whose gradient is mostly rounding moves by up to 3e-5 otherwise (2 of 12288 seen)
    for fqn, w in weights.items():
        torch.testing.assert_close(_steady(fqn, w), _steady(fqn, want_weights[fqn]), rtol=1e-3,
                                   atol=LR / 100, msg=lambda m, fqn=fqn: f"{fqn}: {m}")
    assert norms[1] > MAX_NORM  # the clip really scaled the gradients


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_bf16_mixed_matches_an_fp32_master_reference(mesh, runs):
    losses, norms, weights, dtypes = runs[(mesh, "bf16-mixed")]
    want_losses, want_norms, want_weights = reference("bf16-mixed")
    # bf16 tolerance: the ranks reduce bf16 partial sums and gradients in another order
    assert losses == pytest.approx(want_losses, rel=2e-2)
    assert norms == pytest.approx(want_norms, rel=5e-2)
    # the graph ran in bf16, every weight with an fp32 master, and the masters moved as the
    # reference's did: far closer to them than to where they started
    assert all(dtype == ("torch.bfloat16", True) for dtype in dtypes.values())
    start = dict(model().named_parameters(remove_duplicate=False))
    for fqn, w in weights.items():
        assert w.dtype == torch.float32
        want, w = _steady(fqn, want_weights[fqn]), _steady(fqn, w)
        moved = (want - _steady(fqn, start[fqn].detach())).norm()
        assert (w - want).norm() < 0.1 * moved, fqn


def _steady(fqn: str, w: torch.Tensor) -> torch.Tensor:
    """`w` without the key bias: softmax ignores a constant added to every score, so the key
    bias's gradient is rounding noise, and Adam's normalised step of noise is +-lr whichever
    order a rank sums in. The rest of the weights must agree."""
    if fqn.endswith("attn.qkv.bias"):
        q, _, v = w.chunk(3)
        return torch.cat([q, v])
    return w


def test_a_precision_the_runtime_cannot_train_is_refused_with_the_fix():
    plan = Plan.from_dict(json.loads(plan_json("dp2xtp2", "fp32")))
    plan.precision = dict(plan.precision, compute_dtype="float16", compute_bytes=2,
                          param_bytes=2, grad_bytes=2)
    with pytest.raises(AutoparError, match="loss scaling.*bf16-mixed"):
        autopar.autoparallelize(model(), cluster(), batches()[0], loss_fn=lm_loss, plan=plan)


def test_optimizer_needs_the_parallel_model():
    with pytest.raises(AutoparError, match="autoparallelize returned"):
        autopar.optimizer(model(), torch.optim.AdamW, lr=1e-3)


def test_fused_kernels_unless_the_user_chooses_or_the_class_has_none():
    """`autopar.optimizer` asks for torch's fused kernels (one kernel a step for a chunk of
    shards) where the user said nothing of `fused` or `foreach`, the class has them and every
    shard can use them; else it passes the options as given. The steps above (AdamW, fused on
    these CPU shards) equal torch's unfused AdamW on the unsharded model."""
    shards = [torch.zeros(4), torch.zeros(0)]
    fused = optim.fused_by_default
    assert fused(torch.optim.AdamW, shards, {"lr": 1.0}) == {"lr": 1.0, "fused": True}
    assert fused(torch.optim.SGD, shards, {}) == {"fused": True}
    for chosen in ({"fused": False}, {"foreach": True}, {"foreach": False},
                   {"differentiable": True}):
        assert fused(torch.optim.AdamW, shards, chosen) == chosen
    assert fused(torch.optim.RMSprop, shards, {}) == {}  # no fused kernel in torch
    assert fused(torch.optim.AdamW, [torch.zeros(4, dtype=torch.long)], {}) == {}
