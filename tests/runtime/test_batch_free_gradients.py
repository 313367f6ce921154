"""What the cost model assumes of a value computed from parameters without the batch (GPT's
position embedding), replicated over dp and added to the batch split over dp: its partial
gradient flows into the parameter's, and no collective reduces it inside the microbatch
(autopar/planning/intra_op.py, `_node_time_s`). Checked on 2 gloo ranks, both runtimes: the
collectives one training step issues through DTensor, by shape."""

from __future__ import annotations

import json

import pytest
import torch

from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from tests.helpers.distributed import run_on_ranks
from tests.helpers.models import fast_cpu_cluster

CFG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def _collectives_of_a_step(plan_json: str, runtime: str) -> list[tuple[str, tuple]]:
    from torch.utils._python_dispatch import TorchDispatchMode

    import autopar
    from autopar.plan import Plan

    seen = []

    class _Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "c10d" in name:
                seen.append((name, tuple(args[0].shape) if torch.is_tensor(args[0]) else ()))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len))
    pm = autopar.autoparallelize(GPT(CFG), fast_cpu_cluster(2), (x, x), loss_fn=lm_loss,
                                 plan=Plan.from_dict(json.loads(plan_json)), runtime=runtime)
    pm.train_step(x, x)  # the replay runtime traces its layers on the first step
    with _Seen():
        pm.train_step(x, x)
    return seen


@pytest.mark.parametrize("runtime", ["replay", "eager"])
def test_position_embedding_gradient_is_not_reduced_in_the_microbatch(runtime):
    import autopar

    torch.manual_seed(0)
    x = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len))
    plan = autopar.manual_plan(GPT(CFG), fast_cpu_cluster(2), (x, x), loss_fn=lm_loss,
                               tp=1, pp=1, dp=2, microbatch_size=2)
    seen = run_on_ranks(_collectives_of_a_step, 2, plan.to_json(), runtime)[0]
    positions = (CFG.seq_len, CFG.d_model)
    assert seen, "no collective seen: the step's collectives are not where this test looks"
    assert not [c for c in seen if c[1][-2:] == positions and "reduce" in c[0]], seen
