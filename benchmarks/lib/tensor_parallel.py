"""The torchtitan-style baseline `tpT-fsdp2`: `parallelize_module` (Megatron column/row splits
of attention and MLP, vocabulary-split embedding and head with loss_parallel) on a tp axis of T
ranks inside the node, FSDP2 over the dp axis."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.gpt import GPT
from autopar.models.llama import apply_rope
from benchmarks.lib.baselines import checkpoint_blocks, fully_shard_blocks
from benchmarks.lib.built import Built, accumulating_step
from benchmarks.lib.distributed import Ctx
from benchmarks.lib.models import ModelSpec, blocks
from benchmarks.lib.optim import adamw
from benchmarks.lib.systems import System

# -- forwards that work with the local heads -------------------------------------------------


def _gpt_attention_tp(self, x):
    """CausalSelfAttention.forward on a column-split qkv: each rank holds [q_r; k_r; v_r]
    (see _interleave_qkv), so its heads are n_head / tp; the same function as the model's."""
    B, T, C = x.shape
    head_dim = C // self.n_head
    q, k, v = self.qkv(x).chunk(3, dim=2)
    q = q.view(B, T, -1, head_dim).transpose(1, 2)
    k = k.view(B, T, -1, head_dim).transpose(1, 2)
    v = v.view(B, T, -1, head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).reshape(B, T, -1))


def _llama_attention_tp(self, x, cos, sin):
    """llama.Attention.forward with the local number of heads."""
    B, T, C = x.shape
    q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
    k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
    v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    repeat = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(repeat, dim=1)
    v = v.repeat_interleave(repeat, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.wo(y.transpose(1, 2).reshape(B, T, -1))


@torch.no_grad()
def _interleave_qkv(linear: nn.Linear, tp: int) -> None:
    """Reorder the fused qkv rows [q; k; v] to [q_0; k_0; v_0; q_1; ...] so that a column
    split into tp pieces gives each rank whole heads of q, k and v."""

    def order(t):
        q, k, v = t.chunk(3, dim=0)
        parts = [
            torch.cat([a, b, c], dim=0) for a, b, c in zip(q.chunk(tp), k.chunk(tp), v.chunk(tp))
        ]
        return torch.cat(parts, dim=0)

    linear.weight.copy_(order(linear.weight))
    if linear.bias is not None:
        linear.bias.copy_(order(linear.bias))


def _parallelize_tp(model, tp_mesh, tp: int) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    col, row = ColwiseParallel(), RowwiseParallel()
    if isinstance(model, GPT):
        for block in model.blocks:
            _interleave_qkv(block.attn.qkv, tp)
            block.attn.forward = types.MethodType(_gpt_attention_tp, block.attn)
            parallelize_module(
                block,
                tp_mesh,
                {"attn.qkv": col, "attn.proj": row, "mlp.fc": col, "mlp.proj": row},
            )
        top = {
            "wte": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        }
    else:
        for block in model.layers:
            block.attention.forward = types.MethodType(_llama_attention_tp, block.attention)
            parallelize_module(
                block,
                tp_mesh,
                {
                    "attention.wq": col,
                    "attention.wk": col,
                    "attention.wv": col,
                    "attention.wo": row,
                    "feed_forward.w1": col,
                    "feed_forward.w3": col,
                    "feed_forward.w2": row,
                },
            )
        top = {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        }
    parallelize_module(model, tp_mesh, top)
    if isinstance(model, GPT):
        # both halves of the tied weight are split over the vocabulary (Shard(0)): tie again
        model.lm_head.weight = model.wte.weight


def build_tp(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = ctx.mesh((system.dp, system.tp), ("dp", "tp"))
    model = spec.build(ctx.device, torch.float32)
    _parallelize_tp(model, mesh["tp"], system.tp)
    if system.ac:
        checkpoint_blocks(model)
    fully_shard_blocks(model, blocks(model), mesh["dp"], ctx)
    opt = adamw(model, ctx.device)

    def fwd_bwd(x, y, scale):
        with loss_parallel():
            loss = ctx.loss(model(x), y)
            (loss * scale if scale != 1 else loss).backward()
        return loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()

    return Built(
        accumulating_step(fwd_bwd, opt, system.microbatches),
        dp_rank=mesh.get_local_rank("dp"),
        dp=system.dp,
        keep=[model, opt],
    )
