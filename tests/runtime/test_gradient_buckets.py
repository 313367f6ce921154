"""Gradients that the hooks reduce, bucketed (`gradient_buckets`): the same values as DTensor's
own reduction of each gradient, also when gradients accumulate over train steps. Run on gloo
ranks."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_on_ranks


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

    from autopar.models.losses import lm_loss
    from autopar.runtime.mesh import make_mesh
    from autopar.runtime.parallel_model import ParallelModel
    from autopar.trace import trace
    from tests.helpers.intra_op_plans import make_plan
    from tests.helpers.models import MODELS, batches, fast_cpu_cluster

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


@pytest.mark.slow
def test_gradients_accumulate_over_train_steps_as_in_one_process():
    ranks = run_on_ranks(_accumulated_gradients, 2)
    assert [r for r, _ in ranks] == [0, 1] and all(n > 0 for _, n in ranks)
