"""A Mixtral-style decoder (Jiang et al. 2024, "Mixtral of Experts"): Llama (llama.py) with
every feed-forward a mixture of SwiGLU experts, each token sent to the `top_k` experts its
router ranks highest, their outputs weighted by the softmax of those k router logits.

One difference from Mixtral: an expert takes at most `capacity` tokens of a sequence (GShard's
capacity, Lepikhin et al. 2021), where Mixtral drops none. Routing is dense, as in switch.py,
so that torch.export sees no data-dependent shape and the planner can split the experts over
`ep` with DTensor's own rules: one-hot masks and a cumulative sum give each (token, choice) its
slot in its expert's fixed (experts, capacity, d_model) buffer, first choices of the whole
sequence before second ones (GShard's priority). A choice beyond capacity is dropped (the
token keeps its other experts and the residual). With `capacity_factor` = n_experts / top_k
no choice is ever dropped (every expert has a slot for every token), at that many times the
expert compute.

Shapes: B batch (groups), T tokens, K choices per token, E experts, N capacity, C d_model,
F ffn_hidden (each expert's SwiGLU width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.llama import Attention, Llama, LlamaConfig, RMSNorm
from autopar.models.t5 import ffn_residual


@dataclass(frozen=True, kw_only=True)
class MixtralConfig(LlamaConfig):
    n_experts: int = 8
    top_k: int = 2
    capacity_factor: float = 1.25
    # the router's load-balancing loss (Switch's, over the top-k choices), scaled; 0 leaves it
    # out and the model returns its logits alone. transformers' MixtralConfig: 0.001
    aux_loss_coef: float = 0.001


class TopKExperts(nn.Module):
    """Top-k routing over `n_experts` SwiGLU feed-forwards, with a capacity per group."""

    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        if not 1 <= cfg.top_k <= cfg.n_experts:
            raise ValueError(f"top_k ({cfg.top_k}) must be between 1 and n_experts "
                             f"({cfg.n_experts})")
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.capacity_factor, self.aux_loss_coef = cfg.capacity_factor, cfg.aux_loss_coef
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        # every expert's weights stacked, so one batched matmul runs them all
        E, C, Fh = cfg.n_experts, cfg.d_model, cfg.ffn_hidden
        self.w1 = nn.Parameter(torch.empty(E, C, Fh))
        self.w3 = nn.Parameter(torch.empty(E, C, Fh))
        self.w2 = nn.Parameter(torch.empty(E, Fh, C))
        for w, fan_in in ((self.w1, C), (self.w3, C), (self.w2, Fh)):
            nn.init.normal_(w, std=fan_in ** -0.5)  # as a Linear's output variance

    def capacity(self, tokens: int) -> int:
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor):
        B, T, _ = x.shape
        E, K, N = self.n_experts, self.top_k, self.capacity(T)
        logits = self.router(x)  # (B, T, E)
        top, expert = logits.topk(K, dim=-1)  # (B, T, K)
        gate = top.softmax(dim=-1)  # Mixtral: the softmax of the k chosen logits
        chosen = expert.unsqueeze(-1) == torch.arange(E, device=x.device)  # (B, T, K, E)
        # slots in choice-major order: every first choice of the group before any second one
        by_choice = chosen.transpose(1, 2).reshape(B, K * T, E)
        slot = torch.cumsum(by_choice.long(), dim=1) - 1  # (B, K*T, E)
        kept = by_choice & (slot < N)
        dispatch = (kept.unsqueeze(-1)
                    & (slot.unsqueeze(-1) == torch.arange(N, device=x.device))).to(x.dtype)
        dispatch = dispatch.view(B, K, T, E, N)  # 1 where choice k of token t fills slot n of e
        # the k choices of a token are k different experts: summed, still 0 or 1 per slot
        combine = (dispatch * gate.transpose(1, 2)[..., None, None]).sum(dim=1)  # (B, T, E, N)
        expert_in = torch.einsum("bten,btc->benc", dispatch.sum(dim=1), x)  # (B, E, N, C)
        h = (F.silu(torch.einsum("benc,ecf->benf", expert_in, self.w1))
             * torch.einsum("benc,ecf->benf", expert_in, self.w3))  # (B, E, N, F)
        expert_out = torch.einsum("benf,efc->benc", h, self.w2)  # (B, E, N, C)
        y = torch.einsum("bten,benc->btc", combine, expert_out)  # (B, T, C)
        if not self.aux_loss_coef:
            return y
        return y, self.aux_loss_coef * self.load_balancing_loss(chosen, logits)

    def load_balancing_loss(self, chosen: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Switch's loss over top-k choices (transformers' `load_balancing_loss_func`):
        E * sum_e f_e * P_e per group, f_e the fraction of choices routed to expert e, P_e its
        mean router probability, averaged over groups; k when routing is uniform."""
        f = chosen.to(logits.dtype).sum(dim=2).mean(dim=1)  # (B, E): choices per token
        p = logits.softmax(dim=-1).mean(dim=1)  # (B, E)
        return self.n_experts * (f * p).sum(dim=-1).mean()


class MixtralBlock(nn.Module):
    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.experts = TopKExperts(cfg)

    def forward(self, x, cos, sin, aux):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return ffn_residual(self.ffn_norm, self.experts, x, aux)


class Mixtral(Llama):
    """`forward(idx) -> logits (B, T, vocab)`, or `(logits, aux_loss)` when
    `cfg.aux_loss_coef` is not 0 (add it to the loss: `autopar.models.losses.moe_lm_loss`)."""

    block_type = MixtralBlock

    def forward(self, idx: torch.Tensor):
        B, T = idx.shape
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        x = self.tok_embeddings(idx)  # (B, T, C)
        aux = None
        for layer in self.layers:
            x, aux = layer(x, cos, sin, aux)
        logits = self.output(self.norm(x))  # (B, T, vocab)
        return logits if aux is None else (logits, aux)
