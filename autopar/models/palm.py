"""A PaLM-style decoder (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways",
section 2): each block runs attention and the MLP in parallel from one LayerNorm,
    y = x + attn(ln(x)) + mlp(ln(x)),
multi-query attention (every query head shares one key/value head), SwiGLU, RoPE, input and output
embeddings shared, and no biases anywhere (dense layers and layer norms alone).

Shapes: B batch, T sequence, C width, H query heads, D head dim (PaLM: 256 at every size, so
H * D need not equal C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.llama import FeedForward, apply_rope, rope_tables


@dataclass(frozen=True, kw_only=True)
class PaLMConfig:
    vocab_size: int = 256
    seq_len: int = 32
    n_layer: int = 2
    n_head: int = 4
    head_dim: int = 16
    d_model: int = 64
    ffn_hidden: int = 256  # SwiGLU width: 4 * d_model in PaLM
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


class MultiQueryAttention(nn.Module):
    """H query heads, one key head and one value head (Shazeer 2019): the keys and values a
    decoder keeps are H times smaller."""

    def __init__(self, cfg: PaLMConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        H, D = self.n_head, self.head_dim
        q = self.wq(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, 1, T, D)  # (B, 1, T, D): one head for all
        v = self.wv(x).view(B, 1, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # expand is a view: the one key/value head is read by every query head, not copied
        y = F.scaled_dot_product_attention(q, k.expand(B, H, T, D), v.expand(B, H, T, D),
                                           is_causal=True)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))


class ParallelBlock(nn.Module):
    """Attention and MLP read the same normalised input and their outputs are summed: one
    norm, and (PaLM section 2) about 15% faster training at scale than the serial block."""

    def __init__(self, cfg: PaLMConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.attn = MultiQueryAttention(cfg)
        self.mlp = FeedForward(cfg)  # SwiGLU, as Llama's

    def forward(self, x, cos, sin):
        h = self.norm(x)
        return x + self.attn(h, cos, sin) + self.mlp(h)


class PaLM(nn.Module):
    """`forward(idx) -> logits (B, T, vocab)`."""

    def __init__(self, cfg: PaLMConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(ParallelBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # shared input and output embeddings
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, D/2)
        x = self.wte(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)
        # the embedding starts as N(0, 1) and is also the output layer: PaLM scales the logits
        # by d_model^-1/2 (section 5, training setup)
        return self.lm_head(self.norm(x) * self.cfg.d_model ** -0.5)  # (B, T, vocab)
