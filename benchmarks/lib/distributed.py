"""The job a benchmark runs in: its process group, device and meshes (`Ctx`), made by
`init_distributed` from torchrun's environment (or as a job of one process without it)."""

from __future__ import annotations

import argparse
import gc
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from benchmarks.lib.models import LOSS


@dataclass
class Ctx:
    device: torch.device
    rank: int
    world: int
    local_world: int
    cpu_group: object  # gloo group for objects and decisions
    dtype: torch.dtype
    args: argparse.Namespace
    meshes: dict = field(default_factory=dict)

    @property
    def loss(self):
        return LOSS["fp32" if self.args.fp32_loss else "model"]

    def mesh(self, shape: tuple[int, ...], names: tuple[str, ...]):
        """One DeviceMesh per shape (a new mesh makes new communicators)."""
        from torch.distributed.device_mesh import init_device_mesh

        key = (shape, names)
        if key not in self.meshes:
            self.meshes[key] = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
        return self.meshes[key]

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def bcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def free_memory(self) -> None:
        """Collect garbage and return the device's cached blocks; peak memory counts anew."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def init_distributed(args) -> Ctx:
    if "RANK" not in os.environ:  # plain `python benchmarks/multigpu.py`: a job of one
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    timeout = timedelta(seconds=args.collective_timeout_s)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "multigpu.py: error: --device cuda but torch sees no GPU "
                f"(torch {torch.__version__}); use --device cpu"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    # objects and decisions travel on their own gloo group, with room for rank 0's planning
    cpu_group = dist.new_group(backend="gloo", timeout=max(timeout, timedelta(seconds=3600)))
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return Ctx(
        device=device,
        rank=dist.get_rank(),
        world=world,
        local_world=local_world,
        cpu_group=cpu_group,
        dtype=dtype,
        args=args,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
