"""A replicated input feeding an op split over an axis gets a partial gradient there, which the
intra-op problem prices as an all-reduce in each microbatch's backward, but only where the
runtime runs one: not for an input without a gradient (a buffer such as RoPE's tables), and on
dp not for a value computed from parameters without the batch (GPT's position embedding), whose
partial gradient flows into its parameter's, which the data-parallel flavour reduces once per
step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard

from autopar.planning.intra_op import build_problem
from autopar.planning.profile import TrainingPrecision, profile_graph
from autopar.trace import trace_for_training
from tests.helpers.models import fast_cpu_cluster


class _Scaled(nn.Module):
    """Three products of a batched value with a whole one: a buffer (no gradient), a value made
    from a parameter and the buffer (computed without the batch), and the batch's mean (made
    from the batch: its gradient is reduced over dp in each microbatch)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32))
        self.p = nn.Parameter(torch.randn(32))
        self.register_buffer("table", torch.randn(32))

    def forward(self, x):
        h = x @ self.w
        a = h * self.table
        b = a * (self.p + self.table)
        return b * h.mean(0)


def _sum(out, target):
    return (out * target).sum()


# per product: (buffer, value made without the batch, the batch's mean) charged?
@pytest.mark.parametrize("param_grad_sync,expected", [
    (False, (False, False, True)),  # the search's problems: dp's parameter gradients by flavour
    (True, (False, True, True)),  # every gradient reduced where it is made partial
])
def test_only_a_gradient_the_runtime_reduces_in_the_microbatch_is_charged(param_grad_sync,
                                                                           expected):
    x = torch.randn(8, 32)
    traced = trace_for_training(_Scaled(), (x, x), _sum)
    profiles = profile_graph(traced.graph_module)
    d = build_problem(traced, profiles, fast_cpu_cluster(4), {"dp": 4},
                      precision=TrainingPrecision(), memory_budget_bytes=float("inf"),
                      param_grad_sync=param_grad_sync)
    muls = [n.name for n in traced.graph_module.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.mul.Tensor][:3]
    assert len(muls) == 3
    for name, charged in zip(muls, expected):
        strategies = d.strategies[name]
        split = next(k for k, s in enumerate(strategies)
                     if s.inputs[0] == (Shard(0),) and s.inputs[1] == (Replicate(),))
        whole = next(k for k, s in enumerate(strategies)
                     if all(p == (Replicate(),) for p in s.inputs))
        alone = d.compute_s[name][whole] / 4  # the same work split four ways, nothing else
        if charged:
            assert d.compute_s[name][split] > alone * 1.5, (name, d.compute_s[name], alone)
        else:
            assert d.compute_s[name][split] == pytest.approx(alone, rel=1e-9), name
