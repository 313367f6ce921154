"""BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers"): a
post-LayerNorm encoder with learned positions and token types, and the masked-LM head, whose
output layer is the word embedding (tied) plus a bias. No next-sentence head or pooler: the
model trains on masked-LM alone (as RoBERTa showed suffices).

Shapes: B batch, T sequence, C width, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class BertConfig:
    vocab_size: int = 128
    seq_len: int = 16  # the example batch's length
    max_positions: int = 32  # rows of the learned position table (BERT: 512)
    type_vocab_size: int = 2  # sentence A and sentence B
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 256
    norm_eps: float = 1e-12
    mask_token_id: int = 103  # [MASK] in BERT's WordPiece vocabulary
    mask_fraction: float = 0.15  # of each sequence's tokens predicted (BERT section 3.1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional: no mask
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Layer(nn.Module):
    """Post-LN (the original Transformer's order): normalise after each residual sum."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, x):
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.proj(F.gelu(self.fc(x))))


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: every weight N(0, 0.02), biases 0 (LayerNorms stay 1 and 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class Bert(nn.Module):
    """`forward(input_ids, token_type_ids) -> masked-LM logits (B, T, vocab)`."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.seq_len > cfg.max_positions:
            raise ValueError(f"BERT's sequence length {cfg.seq_len} exceeds its {cfg.max_positions} "
                             "learned positions: use a sequence length <= max_positions")
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.ln_embed = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        # the masked-LM head: a dense transform, then the word embedding read backwards
        self.head_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.head_ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.decoder.weight = self.word.weight  # tied; the bias is the head's own
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        x = self.ln_embed(x)  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        h = self.head_ln(F.gelu(self.head_dense(x)))
        return self.decoder(h)  # (B, T, vocab)
