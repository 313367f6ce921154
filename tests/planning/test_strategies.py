"""Every strategy the planner can emit for the ops of our covered models, against unsharded
execution: outputs, the output placements promised, and the gradients of every float input.

Each op runs as the runtime's `OpRunner.call` runs it, on inputs laid out as the strategy says
(Partial inputs split unevenly over the ranks), every rank simulated in one process by
LocalTensorMode (see tests/helpers/simulate.py). A failure names the node, the op, the strategy
and what differed.
"""

from __future__ import annotations

import collections
import functools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.gpt import GPT, GPTConfig
from autopar.models.llama import Llama, LlamaConfig
from autopar.models.losses import lm_loss
from autopar.planning.strategies import _signature
from autopar.trace import trace
from tests.helpers.simulate import (
    check_strategy,
    describe,
    enumerate_strategies,
    is_checked_op,
    real_values,
    simulated_mesh,
)

MESHES = [(2,), (4,), (2, 2)]


class _MLP(nn.Module):
    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x):  # (B, d)
        return self.proj(F.relu(self.fc(x)))


class _Functional(nn.Module):
    """F.layer_norm, tanh-GELU, softmax and SDPA with a per-batch boolean mask (B, 1, T, T)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.fc = nn.Linear(d, d)
        self.ln_weight = nn.Parameter(torch.randn(d))
        self.ln_bias = nn.Parameter(torch.randn(d))

    def forward(self, x, mask):  # x (B, T, C), mask (B, 1, T, T)
        B, T, C = x.shape
        h = F.layer_norm(self.fc(x), (C,), self.ln_weight, self.ln_bias)
        h = F.gelu(h, approximate="tanh")
        q = h.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        return F.softmax(y.transpose(1, 2).reshape(B, T, C), dim=-1)


def _gpt():
    cfg = GPTConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=4, d_model=32)
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    target = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    return GPT(cfg), (idx,), target, lm_loss


def _llama():
    cfg = LlamaConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                      ffn_hidden=48)
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    target = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    return Llama(cfg), (idx,), target, lm_loss


def _mlp():
    return _MLP(), (torch.randn(8, 16),), torch.randn(8, 16), F.mse_loss


def _functional():
    x = torch.randn(4, 8, 16)
    mask = torch.rand(4, 1, 8, 8) > 0.3
    mask |= torch.eye(8, dtype=torch.bool)  # every query sees at least itself
    return _Functional(), (x, mask), torch.randn(4, 8, 16), F.mse_loss


MODELS = {"gpt": _gpt, "llama": _llama, "mlp": _mlp, "functional": _functional}


@functools.cache
def _traced(name: str):
    """(traced model, real value of every node) for one of MODELS; traced once per session."""
    torch.manual_seed(0)
    model, inputs, target, loss_fn = MODELS[name]()
    traced = trace(model, inputs, loss_fn=loss_fn, target=target)
    return traced, real_values(traced, model, (*inputs, target))


@pytest.fixture
def one_thread():
    """LocalTensorMode runs many tiny per-rank kernels: threads only add overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _work(traced, mesh_shape):
    """(node, strategy) pairs to run: one per distinct (op signature, strategy), since nodes of
    equal op, arguments and input shapes (q/k/v views, repeated layers) have equal strategies;
    and for every node, the node whose run covers each of its strategies."""
    strategies = enumerate_strategies(traced, mesh_shape)
    work, covered_by = {}, collections.defaultdict(list)
    for node in traced.graph_module.graph.nodes:
        if not is_checked_op(node):
            continue
        covered_by[node.name] = []
        for strategy in strategies[node.name]:
            first = work.setdefault((_signature(node), strategy), node)
            covered_by[node.name].append(first.name)
    return work, covered_by


def _cases():
    """(mesh, model) pairs; the 2-D mesh and the two language models on the 1-D ones take
    5-50 s each: slow (the fast lane checks the MLP and the functional model on 1-D meshes)."""
    for mesh_shape in MESHES:
        for model in sorted(MODELS):
            slow = len(mesh_shape) > 1 or model in ("gpt", "llama")
            yield pytest.param(mesh_shape, model, marks=[pytest.mark.slow] if slow else [],
                               id=f"{'x'.join(map(str, mesh_shape))}-{model}")


# (mesh shape, op signature, strategy) -> "model: node" of the case that ran it. The models share
# ops of equal signature (the language models' embedding, loss, projections): a later case of
# this session skips what an earlier one ran on the same mesh (about a fifth of Llama's on 2 x 2
# after GPT's), as `_work` skips a model's own repeated ops.
_RAN: dict[tuple, str] = {}


@pytest.mark.parametrize("mesh_shape, model", _cases())
def test_every_strategy_matches_unsharded(model, mesh_shape, one_thread):
    traced, values = _traced(model)
    work, covered_by = _work(traced, mesh_shape)
    gen = torch.Generator().manual_seed(0)
    failures = []
    start = time.perf_counter()
    ran_before = {key: _RAN[(mesh_shape, *key)] for key in work if (mesh_shape, *key) in _RAN}
    with simulated_mesh(mesh_shape) as (mesh, mode):
        for key, node in work.items():
            if key in ran_before:
                continue
            _RAN[(mesh_shape, *key)] = f"{model}: {node.name}"
            errors = check_strategy(node, key[1], values, mesh, mode, gen)
            if errors:
                twins = sorted({n for n, by in covered_by.items() if node.name in by} - {node.name})
                also = f" (also nodes {', '.join(twins)})" if twins else ""
                failures.append(
                    f"{describe(node, key[1])}{also} on mesh {mesh_shape}: " + "; ".join(errors)
                )
    per_op = collections.Counter(str(node.target) for key, node in work.items()
                                 if key not in ran_before)
    print(
        f"\n{model} on mesh {mesh_shape}: {len(work) - len(ran_before)} strategies run in "
        f"{time.perf_counter() - start:.1f} s ({len(ran_before)} more run by earlier cases: "
        f"{sorted({by.split(':')[0] for by in ran_before.values()})}), covering "
        f"{sum(map(len, covered_by.values()))} node strategies; per op: {dict(per_op)}"
    )

    assert not failures, f"{len(failures)} wrong strategies:\n" + "\n".join(failures)
    unchecked = [n for n, by in covered_by.items() if not by]
    assert not unchecked, f"nodes with no strategy checked: {unchecked}"


@pytest.mark.slow  # enumerates the strategies of the slow cases above: their guard
def test_strategies_checked_are_in_the_hundreds():
    """The test above must not pass by checking nothing: every op of every model has
    strategies to run, and they add up to hundreds (those the models share counted once)."""
    distinct = set()
    for model in MODELS:
        traced, _ = _traced(model)
        for mesh_shape in MESHES:
            work, covered_by = _work(traced, mesh_shape)
            assert all(covered_by.values()), (model, mesh_shape)
            distinct.update((mesh_shape, *key) for key in work)
    assert len(distinct) >= 500, len(distinct)
