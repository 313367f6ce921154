"""The hand pipeline baseline `ppP-fsdp2`: torch.distributed.pipelining's 1F1B over P stages of
equal runs of blocks, FSDP2 over the dp axis of each stage."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from autopar.models.gpt import GPT
from benchmarks.lib.baselines import checkpoint_blocks, fully_shard_blocks
from benchmarks.lib.built import Built
from benchmarks.lib.distributed import Ctx, local_tensor
from benchmarks.lib.models import ModelSpec, blocks
from benchmarks.lib.optim import adamw, optimizer_step
from benchmarks.lib.systems import System


class _Stage(nn.Module):
    """Blocks [lo, hi) of a GPT or Llama; the first stage embeds, the last one ends in logits.
    A GPT's tied head is a copy on the last stage whose gradient is summed with the
    embedding's after each step (Megatron-LM's embedding group)."""

    def __init__(self, model, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.gpt = isinstance(model, GPT)
        self.first, self.last = first, last
        self.blocks = nn.ModuleList(list(blocks(model))[lo:hi])
        if self.gpt:
            if first:
                self.wte, self.wpe = model.wte, model.wpe
            if last:
                self.ln_f = model.ln_f
                head = nn.Linear(
                    model.cfg.d_model,
                    model.cfg.vocab_size,
                    bias=False,
                    device=model.wte.weight.device,
                )
                with torch.no_grad():
                    head.weight.copy_(model.wte.weight)
                self.lm_head = model.lm_head if first else head
        else:
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)
            if first:
                self.tok_embeddings = model.tok_embeddings
            if last:
                self.norm, self.output = model.norm, model.output

    def forward(self, x):
        if self.first:
            if self.gpt:
                pos = torch.arange(x.shape[1], device=x.device)
                x = self.wte(x) + self.wpe(pos)
            else:
                x = self.tok_embeddings(x)
        if self.gpt:
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x)) if self.last else x
        T = x.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.output(self.norm(x)) if self.last else x


def build_pp(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    pp, dp = system.pp, system.dp
    mesh = ctx.mesh((pp, dp), ("pp", "dp"))
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    model = spec.build(ctx.device, torch.float32)
    if system.ac:
        checkpoint_blocks(model)
    n = spec.config["n_layer"]
    cuts = [round(i * n / pp) for i in range(pp + 1)]
    first, last = pp_rank == 0, pp_rank == pp - 1
    stage_mod = _Stage(model, cuts[pp_rank], cuts[pp_rank + 1], first, last)
    del model
    # torchtitan: no reshard after forward under a pipeline (each microbatch would regather)
    fully_shard_blocks(stage_mod, stage_mod.blocks, mesh["dp"], ctx, reshard_after_forward=False)
    stage = PipelineStage(stage_mod, pp_rank, pp, ctx.device, group=mesh.get_group("pp"))
    sched = Schedule1F1B(stage, n_microbatches=system.microbatches, loss_fn=ctx.loss)
    opt = adamw(stage_mod, ctx.device)
    tied = None
    if stage_mod.gpt:  # one group per dp coordinate: pp rank 0 and pp rank pp-1
        for d in range(dp):
            g = dist.new_group([d, (pp - 1) * dp + d])
            if d == dp_rank:
                tied = g
    tied_weight = (
        (stage_mod.wte.weight if first else stage_mod.lm_head.weight if last else None)
        if stage_mod.gpt
        else None
    )

    def step(x, y):
        losses = [] if last else None
        if first:
            sched.step(x, target=y if last else None, losses=losses)
        elif last:
            sched.step(target=y, losses=losses)
        else:
            sched.step()
        if tied_weight is not None and tied_weight.grad is not None:
            dist.all_reduce(local_tensor(tied_weight.grad), group=tied)
        optimizer_step(opt)
        opt.zero_grad()
        return torch.stack(losses).mean().detach() if losses else None

    info = {"stages": [[cuts[i], cuts[i + 1]] for i in range(pp)]}
    return Built(step, dp_rank=dp_rank, dp=dp, info=info, keep=[stage_mod, opt, sched, stage])
