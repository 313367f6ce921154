"""docs/architecture.md's walkthrough, run: a new mesh axis is one entry in
`autopar.parallelism.AXES`, and the search, the cost model, the plan and the runtime pick it up.

The entry is the walkthrough's own code block (the one after `<!-- toy-axis -->`), executed
here, so the page cannot drift from what works. The toy axis "xp" splits ops, as tp does; the
test plans a GPT on a tp x xp mesh, checks that the plan uses the new axis, and trains it on 4
gloo ranks against single-process training, step by step.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import autopar
from autopar import demo, parallelism
from autopar.planning.search import candidate_meshes
from tests.helpers.distributed import run_on_ranks

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
STEPS = 2


def walkthrough_code() -> str:
    """The python block that follows the `<!-- toy-axis -->` marker in docs/architecture.md."""
    text = DOC.read_text()
    found = re.search(r"<!-- toy-axis -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"{DOC} has no ```python block after <!-- toy-axis -->"
    return found.group(1)


def add_toy_axis(code: str) -> None:
    exec(code, {"__name__": "walkthrough"})


@pytest.fixture
def toy_axis(monkeypatch):
    monkeypatch.setattr(parallelism, "AXES", parallelism.AXES)  # restored after the test
    add_toy_axis(walkthrough_code())
    assert parallelism.axis_names()[-1] == "xp"


def toy_plan(mesh: dict[str, int]) -> autopar.Plan:
    data = demo.batches(1, demo.batch_size(4))
    return autopar.plan(demo.GPT(demo.CONFIG), demo.demo_cluster(4), data[0],
                        loss_fn=demo.lm_loss, mesh=mesh)


def test_the_search_and_the_mesh_options_know_the_new_axis(toy_axis):
    meshes = candidate_meshes(demo.demo_cluster(4), n_layers=4)
    assert {"pp": 1, "dp": 1, "ep": 1, "cp": 1, "tp": 2, "xp": 2} in meshes
    assert all(list(m) == ["pp", "dp", "ep", "cp", "tp", "xp"] and math.prod(m.values()) == 4
               for m in meshes)
    assert parallelism.full_mesh({"xp": 4}, 4) == {"pp": 1, "dp": 1, "ep": 1, "cp": 1, "tp": 1,
                                                   "xp": 4}


@pytest.mark.slow
def test_a_plan_on_the_new_axis_trains_as_one_process(toy_axis):
    plan = toy_plan({"tp": 2, "xp": 2})
    assert plan.mesh == {"tp": 2, "xp": 2}
    split_over_xp = [fqn for fqn, pl in plan.parameters.items() if pl[1] != "R"]
    assert split_over_xp, "the plan splits no parameter over the new axis"
    assert "communication_xp_s" in plan.predicted  # the cost model reports the axis

    losses = run_on_ranks(train_on_rank, 4, walkthrough_code(), plan.to_json(), timeout_s=600)
    reference = demo.single_process_losses(demo.batches(STEPS, demo.batch_size(4)))
    for rank_losses in losses:
        assert rank_losses == pytest.approx(reference, rel=demo.REL_TOL)


def train_on_rank(code: str, plan_json: str) -> list[float]:
    """One of 4 ranks: the toy axis added in this process too, the plan run, SGD steps."""
    import json

    import torch

    add_toy_axis(code)
    data = demo.batches(STEPS, demo.batch_size(4))
    torch.manual_seed(demo.SEED)
    model = demo.GPT(demo.CONFIG)
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    pm = autopar.autoparallelize(model, demo.demo_cluster(4), example_inputs=data[0],
                                 loss_fn=demo.lm_loss, plan=plan)
    opt = torch.optim.SGD(pm.parameters(), lr=demo.LR)
    losses = []
    for x, y in data:
        losses.append(pm.train_step(x, y).item())
        opt.step()
        opt.zero_grad()
    return losses
