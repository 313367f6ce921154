"""The outer search against hand configurations and brute force, on tiny GPTs (4 devices)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import autopar
from autopar.models.gpt import GPT, GPTConfig
from autopar.search import microbatch_inputs

BATCH = 8


def lm_loss(out, target):
    return F.cross_entropy(out.flatten(0, 1), target.flatten())


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, seq_len=16, n_layer=4, n_head=4, d_model=64))
    x = torch.randint(0, 128, (BATCH, 16))
    cluster = autopar.Cluster.preset("h100-80g", devices_per_node=4)
    return model, (x, x.clone()), cluster


@pytest.fixture(scope="module")
def best(setup):
    model, batch, cluster = setup
    return autopar.plan(model, cluster, batch, loss_fn=lm_loss)


MANUAL = [  # (tp, pp, dp, microbatch per dp rank, checkpoint, schedule, zero)
    (1, 1, 4, 2, "none", "1F1B", 0),
    (2, 1, 2, 4, "none", "1F1B", 0),
    (4, 1, 1, 8, "full", "1F1B", 0),
    (1, 2, 2, 1, "none", "1F1B", 0),
    (1, 2, 2, 2, "full", "1F1B", 3),
    (2, 2, 1, 2, "none", "1F1B", 0),
    (1, 4, 1, 2, "none", "1F1B", 0),
    (1, 2, 2, 1, "none", "Interleaved1F1B", 2),
]


def test_planner_never_slower_than_manual(setup, best):
    model, batch, cluster = setup
    got = autopar.simulate(best).step_time_s
    for tp, pp, dp, mb, ckpt, schedule, zero in MANUAL:
        manual = autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, tp=tp, pp=pp, dp=dp,
                                     microbatch_size=mb, checkpoint=ckpt, schedule=schedule,
                                     zero=zero)
        assert got <= autopar.simulate(manual).step_time_s * (1 + 1e-9), (tp, pp, dp, mb)


def test_choice_is_the_min_over_every_config_of_its_mesh(setup, best):
    """Brute force over microbatch, checkpoint, flavour and schedule on the chosen mesh: the
    planner's step time is the minimum (even cuts are in the planner's space)."""
    model, batch, cluster = setup
    mesh = {"pp": 1, "dp": 1, "tp": 1} | best.mesh
    pp, dp, tp = mesh["pp"], mesh["dp"], mesh["tp"]
    times = []
    for mb, ckpt, zero, schedule in itertools.product(
        [d for d in range(1, BATCH // dp + 1) if (BATCH // dp) % d == 0],
        ["none", "full"], [0, 2, 3] if dp > 1 else [0], ["1F1B", "Interleaved1F1B"],
    ):
        try:
            p = autopar.manual_plan(model, cluster, batch, loss_fn=lm_loss, tp=tp, pp=pp, dp=dp,
                                    microbatch_size=mb, checkpoint=ckpt, schedule=schedule,
                                    zero=zero)
        except autopar.MeshError:
            continue
        times.append(autopar.simulate(p).step_time_s)
    assert times
    assert autopar.simulate(best).step_time_s <= min(times) * (1 + 1e-9)


def test_pipelined_plan_follows_the_contract(setup):
    model, batch, cluster = setup
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


def test_memory_limit_that_nothing_fits_says_smallest_peak(setup):
    model, batch, cluster = setup
    with pytest.raises(autopar.InfeasibleError, match="smallest peak found") as e:
        autopar.plan(model, cluster, batch, loss_fn=lm_loss, mesh={"pp": 2, "dp": 2},
                     memory_limit=1000)
    assert e.value.min_peak_bytes > 1000


def test_microbatch_inputs_slices_every_tensor():
    x, y = torch.zeros(8, 3), torch.ones(8)
    (a, b) = microbatch_inputs((x, y), 2)
    assert a.shape == (2, 3) and b.shape == (2,)
    with pytest.raises(autopar.MeshError, match="divides 8"):
        microbatch_inputs((x, y), 3)
