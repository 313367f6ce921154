"""What each checkpoint policy recomputes in backward, on plain tensors (no process group).

The graph of a tiny GPT runs op by op through a `LayerRunner`, as both runtimes run it;
a dispatch mode counts the ops that backward executes. Recomputation shows up as forward ops
(the matmuls of the layer, its GELU) running during backward.
"""

from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import autopar
from autopar.layers import assign_layers
from autopar.models.losses import lm_loss
from autopar.parallelism import KEEP, check_policies
from autopar.runtime.layer_runner import LayerRunner
from autopar.trace import trace
from tests.helpers.models import MODELS, batches

aten = torch.ops.aten


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(policy: str, traced: bool = False, warm_without_grad: bool = False
                  ) -> tuple[Counter, float, dict]:
    """Ops run by backward when every block is checkpointed with `policy`; the loss; grads.
    `traced`: the replay runtime's LayerRunner; `warm_without_grad`: run it once under
    no_grad first (as torch's pipeline stages infer shapes)."""
    torch.manual_seed(0)
    model = MODELS["gpt"]()
    x, y = batches(2)[0]
    traced_ = trace(model, (x,), loss_fn=lm_loss, target=y)
    gm = traced_.graph_module
    layer_of = assign_layers(traced_)
    params = {node: model.get_parameter(fqn) for node, fqn in traced_.parameters.items()}
    buffers = {node: model.get_buffer(fqn) for node, fqn in traced_.buffers.items()}
    env = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = params.get(n.name, buffers.get(n.name))
    env[traced_.node(traced_.inputs[0])], env[traced_.node(traced_.inputs[1])] = x, y

    def run_node(n, into):
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: into[a])
        into[n] = n.target(*args, **kwargs)

    blocks = {name for name in layer_of.values() if name.startswith("blocks.")}
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    checkpointing = {b: policy for b in blocks if policy != "none"}
    if traced:
        runner = LayerRunner(nodes, run_node, layer_of, checkpointing, traced=True,
                             wanted=[traced_.node(traced_.loss_node)])
        if warm_without_grad:
            with torch.no_grad():
                runner.run(dict(env))
        runner.run(env)
    else:
        LayerRunner(nodes, run_node, layer_of, checkpointing).run(env)
    loss = env[traced_.node(traced_.loss_node)]
    with _Count() as count:
        loss.backward()
    return count.ops, loss.item(), {k: p.grad.clone() for k, p in params.items()}


@pytest.fixture(scope="module")
def runs():
    return {policy: _backward_ops(policy) for policy in ("none", "full", "selective")}


def test_every_policy_gives_the_same_loss_and_gradients(runs):
    _, loss, grads = runs["none"]
    for policy in ("full", "selective"):
        assert runs[policy][1] == loss
        for name, g in grads.items():
            torch.testing.assert_close(runs[policy][2][name], g, rtol=0, atol=0)


def test_full_recomputes_the_matmuls_selective_does_not(runs):
    none, full, selective = (runs[p][0] for p in ("none", "full", "selective"))
    for op in KEEP:
        assert selective[op] == none[op], op
    # the linears (addmm) and attention of both blocks run again; (the last linear of a block
    # not: nothing saved needs its output, and torch stops recomputing early)
    attention = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert full[aten.addmm.default] - none[aten.addmm.default] == 2 * 3
    assert full[attention] - none[attention] == 2


def test_selective_recomputes_the_cheap_ops(runs):
    for op, per_block in ((aten.gelu.default, 1), (aten.native_layer_norm.default, 2)):
        assert runs["none"][0][op] == 0
        assert runs["full"][0][op] == runs["selective"][0][op] == 2 * per_block


@pytest.mark.parametrize("policy", [
    "none", pytest.param("full", marks=pytest.mark.slow),
    pytest.param("selective", marks=pytest.mark.slow)])
def test_the_replay_runtime_gives_the_same_loss_and_gradients(runs, policy):
    """Layers traced once and replayed (the default runtime) compute what op-by-op does, also
    when the first call ran without grad (an inference trace must not be replayed in training),
    and their backward recomputes what op by op recomputes, no more."""
    ops, loss, grads = runs[policy]
    attention = aten._scaled_dot_product_flash_attention_for_cpu.default
    for warm in (False, True):
        replay_ops, replay_loss, replay_grads = _backward_ops(policy, traced=True,
                                                              warm_without_grad=warm)
        # (the traced backward once kept a dead copy of each attention forward, and ran it)
        for op in (attention, aten.addmm.default, aten.gelu.default,
                   aten.native_layer_norm.default):
            assert replay_ops[op] == ops[op], op
        assert replay_loss == pytest.approx(loss, rel=1e-6)
        assert replay_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(replay_grads[name], g, rtol=1e-5, atol=1e-6)


def test_unknown_policy_is_refused_clearly():
    with pytest.raises(autopar.AutoparError, match="unknown checkpoint policy 'some'"):
        check_policies({"blocks.0": "some"})


def test_unknown_runtime_is_refused_clearly():
    model = MODELS["gpt"]()
    with pytest.raises(autopar.AutoparError, match="unknown runtime 'fast'.*'replay', 'eager'"):
        autopar.autoparallelize(model, example_inputs=batches(2)[0], loss_fn=lm_loss,
                                runtime="fast")


def test_a_dead_collective_and_what_only_it_reads_are_dropped_from_a_traced_graph():
    """The partitioner leaves forward collectives in the backward graph with no reader, and
    fx keeps them (and so everything they read) as impure: replayed, backward issued them
    again and recomputed their inputs. Every rank drops the same ones."""
    from torch import fx

    from autopar.runtime.replay import _drop_dead_ops

    c10d = torch.ops._c10d_functional
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    logits = g.call_function(aten.mm.default, (x, w))  # recomputed only for the dead gather
    pieces = g.call_function(aten.split.Tensor, (logits, 2))
    piece = g.call_function(operator.getitem, (pieces, 0))
    gathered = g.call_function(c10d.all_gather_into_tensor.default, (piece, 2, "0"))
    g.call_function(c10d.wait_tensor.default, (gathered,))  # nobody reads it
    reduced = g.call_function(c10d.all_reduce.default, (x, "sum", "0"))
    live = g.call_function(c10d.wait_tensor.default, (reduced,))
    shared = g.call_function(c10d.all_reduce.default, (w, "sum", "0"))
    g.call_function(c10d.wait_tensor.default, (shared,))  # unread, but not the only reader:
    read = g.call_function(aten.neg.default, (shared,))  # it stays, as may this read rely on it
    g.output((g.call_function(aten.mul.Tensor, (live, 2)), read))
    gm = fx.GraphModule(torch.nn.Module(), g)
    _drop_dead_ops(gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [
        c10d.all_reduce.default, c10d.wait_tensor.default, c10d.all_reduce.default,
        c10d.wait_tensor.default, aten.neg.default, aten.mul.Tensor]
