"""The plain-PyTorch baselines on one device and under FSDP2, and the pieces the tensor- and
pipeline-parallel baselines share with them:

    eager   one GPU only: the plain model in bf16 with `MasterAdamW` (autopar's optimizer)
    compiled  one GPU only: what a user writes by hand for speed (issue 19): the fp32 model
            under `torch.compile`, each forward and loss under bf16 autocast, fused AdamW
    fsdp2   torch's `fully_shard` on every block and on the root (ZeRO-3),
            MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), fused AdamW

`checkpoint_blocks` wraps every block in activation checkpointing (`-ac`).
"""

from __future__ import annotations

import contextlib
import functools

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


def _fwd_bwd(model, loss_fn, autocast=contextlib.nullcontext):
    """Forward and backward of one (micro)batch, the loss scaled by `scale` (1 / microbatches);
    forward and loss under `autocast()` (a fresh context each time), backward outside it as
    torch's AMP recipe has it."""

    def fwd_bwd(x, y, scale):
        with autocast():
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


def build_compiled(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    """The user's best plain path on one device: fp32 parameters, gradients and AdamW states
    (4 + 4 + 8 bytes per parameter: the 16 that mixed bf16's 2 + 2 + 12 come to), every
    forward and loss under autocast to `ctx.dtype`, `torch.compile(model)` with its defaults,
    fused AdamW (`adamw`: fused on GPUs, foreach elsewhere). Blocks are checkpointed before
    compiling (`-ac`), so Dynamo traces the checkpoints as such.

    With --dtype fp32 (CPUs without bf16, the CPU tests) nothing is autocast: CPU autocast
    takes only bf16 and fp16, and fp32 compute is what the other systems run then, so the
    losses stay comparable to theirs. Inductor compiles in the first step (warm-up, untimed
    unless --warmup 0); info counts the graphs Dynamo made and its graph breaks then, since a
    break would time a slower path than a user would keep."""
    if ctx.world != 1:
        raise ValueError(
            "compiled runs on a job of one process; launch with --nproc_per_node 1 for it"
        )
    # a fresh Dynamo: each compiled system of a run compiles its own model from scratch, never
    # hitting the recompile limit of the GPT/Llama forward code (past it Dynamo runs eagerly)
    torch._dynamo.reset()
    model = spec.build(ctx.device, torch.float32)
    if system.ac:
        checkpoint_blocks(model)
    compiled = torch.compile(model)
    opt = adamw(model, ctx.device)
    autocast = (contextlib.nullcontext if ctx.dtype == torch.float32 else
                functools.partial(torch.autocast, device_type=ctx.device.type, dtype=ctx.dtype))

    inner = accumulating_step(_fwd_bwd(compiled, ctx.loss, autocast), opt, system.microbatches)
    info = {
        "torch_compile": True,
        "autocast": None if ctx.dtype == torch.float32 else str(ctx.dtype),
        "fused_adamw": fused_on(ctx.device),
    }
    from torch._dynamo.utils import counters

    before = _dynamo_counts(counters)
    first = [True]

    def step(x, y):
        loss = inner(x, y)
        if first[0]:  # after the first step: what Dynamo made of the model
            first[0] = False
            graphs, breaks = (a - b for a, b in zip(_dynamo_counts(counters), before))
            info.update(dynamo_graphs=graphs, dynamo_graph_breaks=breaks)
        return loss

    return Built(step, dp_rank=0, dp=1, info=info, keep=[model, compiled, opt])


def _dynamo_counts(counters) -> tuple[int, int]:
    """(graphs Dynamo compiled, graph breaks) so far in this process."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def build_fsdp2(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    mesh = ctx.mesh((ctx.world,), ("dp",))
    model = spec.build(ctx.device, torch.float32)  # fp32 shards; bf16 compute (MixedPrecision)
    if system.ac:
        checkpoint_blocks(model)
    fully_shard_blocks(model, blocks(model), mesh, ctx)
    opt = adamw(model, ctx.device)
    step = accumulating_step(_fwd_bwd(model, ctx.loss), opt, system.microbatches)
    return Built(step, dp_rank=ctx.rank, dp=ctx.world, keep=[model, opt])
