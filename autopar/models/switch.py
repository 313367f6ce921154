"""Switch Transformer (Fedus, Zoph and Shazeer 2022, "Switch Transformers: Scaling to Trillion
Parameter Models with Simple and Efficient Sparsity"): T5 (t5.py) with every other feed-forward
a mixture of experts, each token sent to the one expert its router ranks first.

Routing is dense, as in Mesh TensorFlow and the paper's own code, so that torch.export sees no
data-dependent shape: one-hot masks and a cumulative sum give each token its slot in its
expert's buffer, and einsums move tokens into a fixed (experts, capacity, d_model) buffer and
back. Tokens are routed in groups of one sequence: an expert takes at most
`capacity = ceil(capacity_factor * tokens per sequence / experts)` tokens of a sequence; a token
beyond that is dropped (its feed-forward output is zero and the residual carries it on). One
sequence per group keeps routing within a sample, so splitting the batch (data parallelism,
microbatches) changes nothing.

Shapes: B batch (groups), T tokens per group, E experts, N capacity, C d_model, F d_ff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.t5 import T5, DenseReluDense, T5Config


@dataclass(frozen=True, kw_only=True)
class SwitchConfig(T5Config):
    n_experts: int = 4
    capacity_factor: float = 1.25  # the paper's training capacity factor (section 2.2)
    # alpha of the load-balancing loss (paper eq. 4: alpha = 1e-2); 0 leaves it out, and the
    # model returns its logits alone
    aux_loss_coef: float = 0.01


class SwitchFFN(nn.Module):
    """Top-1 routing over `n_experts` ReLU feed-forwards (T5's), with a capacity per group."""

    def __init__(self, cfg: SwitchConfig):
        super().__init__()
        self.n_experts, self.capacity_factor = cfg.n_experts, cfg.capacity_factor
        self.aux_loss_coef = cfg.aux_loss_coef
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        # every expert's weights in one tensor, so one batched matmul runs them all
        self.wi = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_ff))
        self.wo = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_ff, cfg.d_model))
        nn.init.normal_(self.wi, std=cfg.d_model ** -0.5)  # as a Linear's output variance
        nn.init.normal_(self.wo, std=cfg.d_ff ** -0.5)

    def capacity(self, tokens: int) -> int:
        return math.ceil(self.capacity_factor * tokens / self.n_experts)

    def forward(self, x: torch.Tensor):
        B, T, _ = x.shape
        E, N = self.n_experts, self.capacity(T)
        probs = self.router(x).softmax(dim=-1)  # (B, T, E)
        gate, expert = probs.max(dim=-1)  # (B, T): the top expert and its probability
        chosen = expert.unsqueeze(-1) == torch.arange(E, device=x.device)  # (B, T, E) one-hot
        # the slot of each token in its expert's buffer: how many tokens of its group chose
        # that expert before it
        slot = torch.cumsum(chosen.long(), dim=1) - 1  # (B, T, E)
        kept = chosen & (slot < N)  # over capacity: dropped
        dispatch = (kept.unsqueeze(-1)
                    & (slot.unsqueeze(-1) == torch.arange(N, device=x.device))).to(x.dtype)
        # (B, T, E, N): 1 where token t goes to slot n of expert e
        expert_in = torch.einsum("bten,btc->benc", dispatch, x)  # (B, E, N, C)
        h = F.relu(torch.einsum("benc,ecf->benf", expert_in, self.wi))  # (B, E, N, F)
        expert_out = torch.einsum("benf,efc->benc", h, self.wo)  # (B, E, N, C)
        combine = dispatch * gate[:, :, None, None]  # the gate scales what comes back
        y = torch.einsum("bten,benc->btc", combine, expert_out)  # (B, T, C)
        if not self.aux_loss_coef:
            return y
        return y, self.aux_loss_coef * self.load_balancing_loss(chosen, probs)

    def load_balancing_loss(self, chosen: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """alpha-free eq. 4 of the paper, E * sum_e f_e * P_e per group (f_e: the fraction of
        tokens routed to expert e, P_e: its mean router probability), averaged over groups;
        1 when routing is uniform."""
        f = chosen.to(probs.dtype).mean(dim=1)  # (B, E)
        p = probs.mean(dim=1)  # (B, E)
        return self.n_experts * (f * p).sum(dim=-1).mean()


def switch_ffn(cfg: SwitchConfig, index: int, *, decoder: bool) -> nn.Module:
    """Every other feed-forward is sparse (the paper's Table 9: expert frequency 1/2), the
    second of each pair, as in the released checkpoints (encoder/decoder_sparse_step = 2)."""
    if index % 2 == 1:
        return SwitchFFN(cfg)
    return DenseReluDense(cfg)


class SwitchTransformer(T5):
    """T5 with `switch_ffn` feed-forwards: `forward(input_ids, decoder_input_ids) -> logits`,
    or `(logits, aux_loss)` when `cfg.aux_loss_coef` is not 0 (add it to the loss:
    `autopar.models.losses.moe_seq2seq_loss`)."""

    def __init__(self, cfg: SwitchConfig):
        super().__init__(cfg, make_ffn=switch_ffn)
