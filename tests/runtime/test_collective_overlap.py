"""Collectives rearranged for overlap and bucketed (`_overlap` on traced graphs, `buckets` for
gradients the hooks reduce): the same values as one collective per tensor, waited at once, with
fewer collectives. Run on gloo ranks."""

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


def _check_gradient_buckets(bucket_bytes: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from autopar.runtime.gradient_buckets import GradientBuckets

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    cases = [  # (shape, placements over (dp, tp), dtype)
        ((8, 6), (Replicate(), Replicate()), torch.float32),
        ((8, 6), (Shard(0), Replicate()), torch.float32),
        ((4, 8), (Shard(1), Shard(0)), torch.float32),
        ((4, 4), (Shard(1), Shard(0)), torch.float32),  # shares a bucket with the one above
        ((8, 4), (Shard(0), Shard(0)), torch.float32),  # dim 0 split twice: one by one
        ((6,), (Replicate(), Shard(0)), torch.bfloat16),
        ((4, 6), (Shard(0), Replicate()), torch.bfloat16),
        ((3, 5), (Shard(0), Replicate()), torch.float32),  # 3 rows do not split evenly
    ]
    params, expected = [], []
    torch.manual_seed(dist.get_rank())
    for shape, placements, dtype in cases:
        full = torch.zeros(shape, dtype=dtype)
        p = torch.nn.Parameter(distribute_tensor(full, mesh, placements))
        grad_placements = (Partial("sum"), placements[1])
        local_shape = p.to_local().shape if isinstance(placements[0], Replicate) else \
            distribute_tensor(full, mesh, (Replicate(), placements[1])).to_local().shape
        g = DTensor.from_local(torch.randn(local_shape).to(dtype), mesh, grad_placements,
                               run_check=False, shape=full.shape, stride=full.stride())
        expected.append(g.redistribute(mesh, placements).full_tensor())
        p.grad = g
        params.append(p)
    buckets = GradientBuckets(mesh, bucket_bytes=bucket_bytes)
    for p in params:
        buckets.add(p)
    buckets.settle()
    for p, e, (_, placements, _) in zip(params, expected, cases):
        assert tuple(p.grad.placements) == placements
        assert torch.equal(p.grad.full_tensor(), e), placements
    return True


def test_gradient_buckets_reduce_as_dtensor_does():
    # 150 bytes: the 192-byte gradients fill a bucket alone, the smaller ones share one (and a
    # change of dtype or axis starts a new one)
    assert all(run_on_ranks(_check_gradient_buckets, 4, 150))


def _accumulated_gradients():
    """Two train_steps without zero_grad (gradient accumulation across calls): the hooks'
    buckets meet gradients already reduced by the first step."""
    import torch.distributed as dist

    from autopar.planning.intra_op import make_plan
    from autopar.runtime.parallel_model import ParallelModel, make_mesh
    from autopar.trace import trace
    from tests.test_end_to_end import MODELS, batches, fast_cpu_cluster, lm_loss

    torch.manual_seed(0)
    model, data = MODELS["gpt"](), batches()
    traced = trace(model, (data[0][0],), loss_fn=lm_loss, target=data[0][1])
    plan = make_plan(traced, fast_cpu_cluster(2), mesh={"dp": 2})
    pm = ParallelModel(model, traced, plan, make_mesh(plan))
    for x, y in data[:2]:
        pm.train_step(x, y)
    got = {fqn: pm.get_parameter("_params." + fqn.replace(".", "__")).grad.full_tensor()
           for fqn in traced.parameters.values()}
    torch.manual_seed(0)
    reference = MODELS["gpt"]()
    for x, y in data[:2]:
        lm_loss(reference(x), y).backward()
    for fqn, g in got.items():
        torch.testing.assert_close(g, reference.get_parameter(fqn).grad, rtol=1e-5, atol=1e-6,
                                   msg=fqn)
    return dist.get_rank(), len(got)


def test_gradients_accumulate_over_train_steps_as_in_one_process():
    ranks = run_on_ranks(_accumulated_gradients, 2)
    assert [r for r, _ in ranks] == [0, 1] and all(n > 0 for _, n in ranks)
