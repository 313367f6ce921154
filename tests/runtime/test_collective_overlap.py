"""Collectives of traced graphs rearranged for overlap and bucketed (`collective_overlap`): the
same values as one collective per tensor, waited at once, with fewer collectives. Run on gloo
ranks. (Gradients the hooks reduce are bucketed by `gradient_buckets`:
tests/runtime/test_gradient_buckets.py.)"""

from __future__ import annotations

import torch

from tests.helpers.distributed import run_on_ranks

c10d = torch.ops._c10d_functional


def _graphs():
    """A forward-like graph (weights gathered, one twice, and used) and a backward-like one
    (gradients reduce-scattered and returned), each as traced and as rewritten."""
    import copy

    import torch.distributed as dist
    from torch.fx.experimental.proxy_tensor import make_fx

    from autopar.runtime.collective_overlap import overlap_collectives

    n, group = dist.get_world_size(), dist.group.WORLD.group_name

    def gather(w):
        return c10d.wait_tensor.default(c10d.all_gather_into_tensor.default(w, n, group))

    def scatter(g):
        return c10d.wait_tensor.default(c10d.reduce_scatter_tensor.default(g, "sum", n, group))

    def forward(x, w1, w2, w3):
        h = x @ gather(w1).t()
        h = torch.relu(h) @ gather(w2)
        return h + gather(w3).sum() + gather(w1).sum()  # w1 again: a tied weight

    def backward(x, y):
        a = x * 2
        b = torch.sin(y)
        return scatter(a), scatter(b), scatter(a @ b.t())

    rank = dist.get_rank()
    torch.manual_seed(rank)
    fw_in = (torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 6), torch.randn(2, 6))
    bw_in = (torch.randn(4 * n, 3), torch.randn(2 * n, 3))
    out = {}
    for name, fn, args in (("forward", forward, fw_in), ("backward", backward, bw_in)):
        traced = make_fx(fn)(*args)
        rewritten, overlapped = copy.deepcopy(traced), copy.deepcopy(traced)
        overlap_collectives(rewritten)  # on CPU: no prefetch, each wait right after its issue
        overlap_collectives(overlapped, overlap=True)  # as on a GPU
        out[name] = traced, rewritten, overlapped, args
    return out


def _collectives(gm):
    return [n.target for n in gm.graph.nodes
            if n.op == "call_function" and "c10d" in str(n.target) and "wait" not in str(n.target)]


def _check_graph_rewrite():
    out = {}
    for name, (traced, rewritten, overlapped, args) in _graphs().items():
        expected, got = traced(*args), rewritten(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True)), name
        # on CPU one collective is in flight at a time: each wait right after its collective
        nodes = list(rewritten.graph.nodes)
        for i, node in enumerate(nodes):
            if node.target is c10d.wait_tensor.default:
                assert nodes[i - 1] is node.args[0], (name, node)
        # overlapped (not run here: gloo and several collectives in flight do not mix),
        # collectives of graph inputs come first and every wait sits right before its reader
        nodes = list(overlapped.graph.nodes)
        bucketing = (torch.ops.aten.view.default, torch.ops.aten.cat.default)
        for i, node in enumerate(nodes):
            if node.target is c10d.wait_tensor.default:
                assert nodes[i + 1] in node.users, (name, node)
            if node.target is c10d.all_gather_into_tensor.default:  # before any compute
                assert all(n.op == "placeholder" or n.target in bucketing for n in nodes[:i])
        out[name] = tuple(len(_collectives(g)) for g in (traced, rewritten, overlapped))
    return out


def test_bucketed_graphs_compute_the_same_with_fewer_collectives():
    counts = run_on_ranks(_check_graph_rewrite, 2)[0]
    # forward: 4 gathers (w1 twice) -> one bucket; backward: 3 reduce-scatters -> one bucket
    assert counts == {"forward": (4, 1, 1), "backward": (3, 1, 1)}
