"""`runtime="compile"` (issue 19, item 1): each traced layer's forward and backward graphs,
collectives included, compiled by Inductor, train as the uncompiled replay and as one process
does (CPU, gloo, tensor parallelism: the layers' graphs carry all-reduces)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import autopar
from autopar.errors import AutoparError
from autopar.models.losses import lm_loss
from tests.helpers.distributed import run_on_ranks
from tests.helpers.models import MODELS, batches, fast_cpu_cluster, reference_losses, sgd_losses


@functools.cache
def tp_plan() -> str:
    with torch.device("meta"):
        model = MODELS["gpt"]()
    return autopar.plan(model, fast_cpu_cluster(2), batches()[0], loss_fn=lm_loss,
                        mesh={"tp": 2}).to_json()


@functools.cache
def pp_plan() -> str:
    with torch.device("meta"):
        model = MODELS["gpt"]()
    return autopar.manual_plan(model, fast_cpu_cluster(2), batches()[0], loss_fn=lm_loss, tp=1,
                               pp=2, dp=1, microbatch_size=2).to_json()


def train(plan_json: str, runtime: str) -> list[float]:
    torch.manual_seed(0)
    data = batches()
    pm = autopar.autoparallelize(MODELS["gpt"](), fast_cpu_cluster(2), data[0], loss_fn=lm_loss,
                                 plan=autopar.Plan.from_dict(json.loads(plan_json)),
                                 runtime=runtime)
    return sgd_losses(pm.parameters(), pm.train_step, data)


def train_both(plans: list[str]) -> list[tuple[list[float], list[float], int]]:
    """Each plan's losses under both runtimes, and how many graphs went to Inductor."""
    from autopar.runtime import replay

    graphs = []
    inductor = replay._compiled

    def counted(gm, example_inputs):
        graphs.append(gm)
        return inductor(gm, example_inputs)

    replay._compiled = counted
    out = []
    for plan_json in plans:
        graphs.clear()
        out.append((train(plan_json, "compile"), train(plan_json, "replay"), len(graphs)))
    return out


@pytest.mark.slow
def test_compiled_layers_train_as_the_replayed_ones_and_one_process():
    # tp=2 (all-reduces inside the compiled graphs) and pp=2 (1F1B, 2 microbatches: each
    # stage's layers compiled)
    per_rank = run_on_ranks(train_both, 2, [tp_plan(), pp_plan()])
    reference = reference_losses("gpt")
    for results in per_rank:
        for compiled, replayed, graphs in results:
            assert graphs >= 2  # Inductor compiled layers' forward and backward graphs
            assert compiled == pytest.approx(replayed, rel=1e-5)
            assert compiled == pytest.approx(reference, rel=1e-5)
    assert [r[0] for r in per_rank[0]] == [r[0] for r in per_rank[1]]  # equal on both ranks


def test_an_unknown_runtime_names_the_three():
    with pytest.raises(AutoparError, match="'replay', 'eager', 'compile'"):
        autopar.autoparallelize(MODELS["gpt"](), fast_cpu_cluster(1), batches()[0],
                                loss_fn=lm_loss, runtime="inductor")
