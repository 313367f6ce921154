"""The optimizers the systems train with: AdamW at one learning rate and weight decay, on fp32
master copies of bf16 parameters (`MasterAdamW`: autopar and eager) or on FSDP2's fp32 shards
(`adamw`: the torch baselines), stepped under the range a profile counts as the optimizer."""

from __future__ import annotations

import torch

from benchmarks.lib.breakdown import OPTIMIZER_RANGE
from benchmarks.lib.distributed import local_tensor

LR, WEIGHT_DECAY = 1e-4, 0.1


def fused_on(device: torch.device) -> bool:
    """Fused AdamW kernels on GPUs; the foreach implementation elsewhere."""
    return device.type == "cuda"


class MasterAdamW:
    """AdamW on fp32 master copies of bf16 parameters, mixed precision as in ZeRO (2 + 2 + 12
    bytes per parameter, what `TrainingPrecision.mixed_bf16` charges): the bf16 gradients
    are cast to fp32 a chunk of parameters at a time (CHUNK elements, fused AdamW per chunk),
    so no fp32 gradient copy of the whole model is ever held.

    Works on the local shards: a DTensor parameter's gradient has the parameter's placements
    (ParallelModel settles them so), so the element-wise AdamW update of each shard is the
    update of the whole tensor. fp32 parameters get plain AdamW."""

    CHUNK = 2**28  # fp32 gradient elements alive at once: 1 GiB

    def __init__(self, params, *, fused: bool):
        self.params = [p for p in params if p.requires_grad]
        with torch.no_grad():
            self.local = [local_tensor(p) for p in self.params]
        self.low = any(p.dtype != torch.float32 for p in self.local)
        kw = {"fused": True} if fused else {"foreach": True}
        if not self.low:
            self.chunks = [list(range(len(self.params)))]
            self.opts = [torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY, **kw)]
            return
        self.master = [p.detach().float().clone() for p in self.local]
        self.chunks, size = [[]], 0
        for i, m in enumerate(self.master):
            if self.chunks[-1] and size + m.numel() > self.CHUNK:
                self.chunks.append([])
                size = 0
            self.chunks[-1].append(i)
            size += m.numel()
        self.opts = [
            torch.optim.AdamW([self.master[i] for i in c], lr=LR, weight_decay=WEIGHT_DECAY, **kw)
            for c in self.chunks
        ]

    @torch.no_grad()
    def step(self):
        if not self.low:
            self.opts[0].step()
            return
        for chunk, opt in zip(self.chunks, self.opts):
            for i in chunk:
                g = self.params[i].grad
                self.master[i].grad = None if g is None else local_tensor(g).float()
            opt.step()
            for i in chunk:
                self.master[i].grad = None
            torch._foreach_copy_([self.local[i] for i in chunk], [self.master[i] for i in chunk])

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def adamw(model, device: torch.device) -> torch.optim.AdamW:
    """Plain AdamW over the model's parameters (FSDP2's fp32 shards)."""
    kw = {"fused": True} if fused_on(device) else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **kw)


def optimizer_step(opt) -> None:
    """`opt.step()`, under the range a profile counts as the optimizer (breakdown.py)."""
    with torch.profiler.record_function(OPTIMIZER_RANGE):
        opt.step()
