"""The plain-PyTorch baselines on one device and under FSDP2, and the pieces the tensor- and
pipeline-parallel baselines share with them:

    eager   one GPU only: the plain model in bf16 with `MasterAdamW` (autopar's optimizer)
    fsdp2   torch's `fully_shard` on every block and on the root (ZeRO-3),
            MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), fused AdamW

`checkpoint_blocks` wraps every block in activation checkpointing (`-ac`).
"""

from __future__ import annotations

import torch

from benchmarks.lib.built import Built, accumulating_step
from benchmarks.lib.distributed import Ctx
from benchmarks.lib.models import ModelSpec, blocks
from benchmarks.lib.optim import MasterAdamW, adamw, fused_on
from benchmarks.lib.systems import System


def checkpoint_blocks(model) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = blocks(model)
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def _mp_policy(ctx: Ctx):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if ctx.dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=ctx.dtype, reduce_dtype=torch.float32)


def fully_shard_blocks(model, layers, mesh, ctx: Ctx, *, reshard_after_forward=True) -> None:
    """FSDP2 on each block of `layers`, then on `model` (what is left: embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in layers:
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=_mp_policy(ctx),
            reshard_after_forward=reshard_after_forward,
        )
    fully_shard(
        model, mesh=mesh, mp_policy=_mp_policy(ctx), reshard_after_forward=reshard_after_forward
    )


def _fwd_bwd(model, loss_fn):
    """Forward and backward of one (micro)batch, the loss scaled by `scale` (1 / microbatches)."""

    def fwd_bwd(x, y, scale):
        loss = loss_fn(model(x), y)
        (loss * scale if scale != 1 else loss).backward()
        return loss.detach()

    return fwd_bwd


def build_eager(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    if ctx.world != 1:
        raise ValueError("eager runs on a job of one process")
    model = spec.build(ctx.device, torch.float32).to(ctx.dtype)
    if system.ac:
        checkpoint_blocks(model)
    opt = MasterAdamW(model.parameters(), fused=fused_on(ctx.device))
    step = accumulating_step(_fwd_bwd(model, ctx.loss), opt, system.microbatches)
    return Built(step, dp_rank=0, dp=1, keep=[model, opt])


def build_fsdp2(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    mesh = ctx.mesh((ctx.world,), ("dp",))
    model = spec.build(ctx.device, torch.float32)  # fp32 shards; bf16 compute (MixedPrecision)
    if system.ac:
        checkpoint_blocks(model)
    fully_shard_blocks(model, blocks(model), mesh, ctx)
    opt = adamw(model, ctx.device)
    step = accumulating_step(_fwd_bwd(model, ctx.loss), opt, system.microbatches)
    return Built(step, dp_rank=ctx.rank, dp=ctx.world, keep=[model, opt])
