"""The plan's DeviceMesh over the running job, and how plain tensors become its DTensors.

    make_mesh       the DeviceMesh the plan names (NCCL on GPUs, gloo on CPU)
    placements_of   a plan's placement strings -> DTensor placements
    shard_local     a whole tensor every rank holds -> this rank's piece, no communication
    local_shape     a shard's shape under even placements
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from autopar.errors import MeshError
from autopar.plan import Plan, placement_from_str


def make_mesh(plan: Plan):
    """The plan's mesh over the running job's ranks."""
    if not dist.is_initialized():
        raise MeshError(
            "autoparallelize needs a process group: launch with torchrun "
            "(torchrun --nproc_per_node N train.py) or call torch.distributed.init_process_group."
        )
    world = dist.get_world_size()
    if world != plan.world_size:
        mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
        raise MeshError(
            f"the plan's mesh ({mesh}) needs {plan.world_size} processes, this job has {world}: "
            f"launch with --nproc_per_node {plan.world_size} or give a mesh whose sizes multiply "
            f"to {world}."
        )
    device_type = plan.cluster.get("device_type", "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return _one_mesh(device_type, tuple(plan.mesh.values()), tuple(plan.mesh))


# The meshes made over the current default process group, one per (device, shape, names).
# Why one: DeviceMesh compares by value, so torch's caches hand a DTensor op of a second,
# equal mesh the first mesh's object; AOTAutograd then meets a mesh that is none of the traced
# function's inputs, and a replayed ZeRO-3 unit failed to trace ("Node tangents_2 was invalid,
# but is output") in a process that had trained another plan before (tests/runtime/
# test_sequence_parallel.py and test_expert_parallel.py train several plans a process).
_MESHES: dict = {"group": None, "meshes": {}}


def _one_mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...]):
    group = dist.distributed_c10d._get_default_group()
    if _MESHES["group"] is not group:  # a new process group: the old meshes are not over it
        _MESHES.update(group=group, meshes={})
    key = (device_type, shape, names)
    if key not in _MESHES["meshes"]:
        _MESHES["meshes"][key] = init_device_mesh(device_type, shape, mesh_dim_names=names)
    return _MESHES["meshes"][key]


def placements_of(strings) -> tuple:
    """("S(0)", "R") -> (Shard(0), Replicate())."""
    return tuple(placement_from_str(s) for s in strings)


def mesh_device(mesh) -> torch.device:
    """The device this rank computes on for `mesh`."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def shard_local(value: torch.Tensor, mesh, placements) -> DTensor:
    """Every rank holds the whole global batch: keep this rank's slice, no communication."""
    replicated = DTensor.from_local(value, mesh, (Replicate(),) * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, placements)


def local_shape(shape, placements, mesh_shape) -> tuple[int, ...]:
    """A shard's shape: every Shard(d) divides dim d by its axis size (plans shard evenly)."""
    local = list(shape)
    for p, n in zip(placements, mesh_shape):
        if isinstance(p, Shard):
            local[p.dim] //= n
    return tuple(local)


def as_traced(value: torch.Tensor, node) -> torch.Tensor:
    """`value` (a weight, buffer or input) in the dtype its placeholder was traced in: the plan's
    compute dtype for floating tensors (a "bf16-mixed" plan of an fp32 model runs in bf16);
    integers as they are."""
    want = node.meta["val"].dtype
    if value.is_floating_point() and want.is_floating_point and value.dtype != want:
        return value.to(want)
    return value
