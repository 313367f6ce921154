"""A replicated input feeding an op split over an axis gets a partial gradient there, which the
intra-op problem prices as an all-reduce: only for inputs that have a gradient. A buffer (RoPE's
tables, a mask) has none; a value made from a parameter by an op of several inputs has one."""

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
    """x @ w, times a buffer (no gradient), times a value made from a parameter and the buffer
    by an op of two inputs (a gradient that is not a parameter's)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32))
        self.p = nn.Parameter(torch.randn(32))
        self.register_buffer("table", torch.randn(32))

    def forward(self, x):
        return ((x @ self.w) * self.table) * (self.p + self.table)


def _sum(out, target):
    return (out * target).sum()


def test_only_an_input_with_a_gradient_is_charged_its_reduction():
    x = torch.randn(8, 32)
    traced = trace_for_training(_Scaled(), (x, x), _sum)
    profiles = profile_graph(traced.graph_module)
    d = build_problem(traced, profiles, fast_cpu_cluster(4), {"dp": 4},
                      precision=TrainingPrecision(), memory_budget_bytes=float("inf"),
                      param_grad_sync=False)
    muls = [n.name for n in traced.graph_module.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.mul.Tensor][:2]
    assert len(muls) == 2
    for name, has_gradient in zip(muls, (False, True)):
        strategies = d.strategies[name]
        split = next(k for k, s in enumerate(strategies)
                     if s.inputs[0] == (Shard(0),) and s.inputs[1] == (Replicate(),))
        whole = next(k for k, s in enumerate(strategies)
                     if all(p == (Replicate(),) for p in s.inputs))
        alone = d.compute_s[name][whole] / 4  # the same work split four ways, nothing else
        if has_gradient:
            assert d.compute_s[name][split] > alone * 1.5, (name, d.compute_s[name], alone)
        else:
            assert d.compute_s[name][split] == pytest.approx(alone, rel=1e-9)
