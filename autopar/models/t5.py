"""T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer"), version 1.0: an encoder-decoder with no biases, T5's LayerNorm (a scale and a root
mean square, no mean and no shift: RMSNorm), ReLU feed-forward, relative position biases made by
the first block of each stack and shared by the blocks after it, cross-attention in every decoder
block, and one embedding shared by the encoder, the decoder and the output layer.

`T5(cfg, make_ffn=...)` takes another feed-forward per block: switch.py puts a mixture of experts
in every other one. A feed-forward that returns `(y, aux_loss)` has its auxiliary losses summed
over the blocks; the model then returns `(logits, aux_loss)`.

Shapes: B batch, T encoder length, S decoder length, C d_model, H heads, K d_kv (H * K need not
equal C: T5-3B and -11B have 32 and 128 heads of 128 at C = 1024).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.llama import RMSNorm


@dataclass(frozen=True, kw_only=True)
class T5Config:
    vocab_size: int = 128
    seq_len: int = 16  # encoder length (T5 pre-training: 512)
    target_len: int = 8  # decoder length (T5 pre-training: 114, the span-corruption targets)
    n_layer: int = 2  # blocks in each stack
    d_model: int = 64
    d_ff: int = 256
    d_kv: int = 16
    n_head: int = 4
    num_buckets: int = 32  # relative position buckets, as T5
    max_distance: int = 128  # distances beyond share the last bucket
    norm_eps: float = 1e-6


def relative_position_bucket(relative: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucket of each (key position - query position): exact for small distances,
    logarithmic up to `max_distance`; the encoder tells before from after, the decoder (which sees
    only the past) does not need to. As Mesh TensorFlow's `_relative_position_bucket`."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = -torch.clamp(relative, max=0)
    exact = num_buckets // 2
    # log(0) is -inf below, but torch.where keeps the exact bucket there
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    far = torch.clamp(exact + (log_ratio * (num_buckets - exact)).long(), max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """One learned scalar per bucket and head, added to the attention scores."""

    def __init__(self, cfg: T5Config, *, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.n_head)

    def forward(self, q_len: int, k_len: int, device) -> torch.Tensor:
        q = torch.arange(q_len, device=device)[:, None]
        k = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(k - q, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)  # (T, T)
        bias = self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)
        if not self.bidirectional:  # the decoder sees no future token
            future = torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(1)
            bias = bias.masked_fill(future, torch.finfo(bias.dtype).min)
        return bias


class Attention(nn.Module):
    """Multi-head attention with no 1/sqrt(K) scaling (T5 folds it into the initialisation of
    the query weights) and an additive bias (positions, causal mask) on the scores."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.n_head, self.d_kv = cfg.n_head, cfg.d_kv
        inner = cfg.n_head * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x, kv, bias):
        B, T, _ = x.shape
        S = kv.shape[1]
        q = self.q(x).view(B, T, self.n_head, self.d_kv).transpose(1, 2)  # (B, H, T, K)
        k = self.k(kv).view(B, S, self.n_head, self.d_kv).transpose(1, 2)  # (B, H, S, K)
        v = self.v(kv).view(B, S, self.n_head, self.d_kv).transpose(1, 2)
        scores = q @ k.transpose(-2, -1)  # (B, H, T, S)
        if bias is not None:
            scores = scores + bias
        y = scores.softmax(dim=-1) @ v  # (B, H, T, K)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.d_kv))


class DenseReluDense(nn.Module):
    """T5 v1.0's feed-forward: wo(relu(wi x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.relu(self.wi(x)))


def ffn_residual(norm: nn.Module, ffn: nn.Module, x: torch.Tensor, aux):
    """x + ffn(norm(x)), and the running auxiliary loss plus the feed-forward's own, if any."""
    out = ffn(norm(x))
    if isinstance(out, tuple):  # a mixture of experts (switch.py, mixtral.py): (y, aux loss)
        out, extra = out
        aux = extra if aux is None else aux + extra
    return x + out, aux


class EncoderBlock(nn.Module):
    def __init__(self, cfg: T5Config, ffn: nn.Module, *, first: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        # only the first block holds the position bias; it hands it to the others (as T5)
        self.position_bias = RelativePositionBias(cfg, bidirectional=True) if first else None
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn

    def forward(self, x, bias, aux):
        if self.position_bias is not None:
            bias = self.position_bias(x.shape[1], x.shape[1], x.device)
        h = self.attn_norm(x)
        x = x + self.attn(h, h, bias)
        x, aux = ffn_residual(self.ffn_norm, self.ffn, x, aux)
        return x, bias, aux


class DecoderBlock(nn.Module):
    def __init__(self, cfg: T5Config, ffn: nn.Module, *, first: bool):
        super().__init__()
        self.self_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.position_bias = RelativePositionBias(cfg, bidirectional=False) if first else None
        self.cross_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = Attention(cfg)  # reads the encoder's output; no position bias
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn

    def forward(self, y, enc, bias, aux):
        if self.position_bias is not None:
            bias = self.position_bias(y.shape[1], y.shape[1], y.device)  # causal mask included
        h = self.self_attn_norm(y)
        y = y + self.self_attn(h, h, bias)
        y = y + self.cross_attn(self.cross_attn_norm(y), enc, None)
        y, aux = ffn_residual(self.ffn_norm, self.ffn, y, aux)
        return y, bias, aux


def dense_ffn(cfg: T5Config, index: int, *, decoder: bool) -> nn.Module:
    """The feed-forward of block `index` of a stack: T5's dense one everywhere."""
    return DenseReluDense(cfg)


class T5(nn.Module):
    """`forward(input_ids (B, T), decoder_input_ids (B, S)) -> logits (B, S, vocab)`, or
    `(logits, aux_loss)` when a feed-forward returns an auxiliary loss."""

    def __init__(self, cfg: T5Config, make_ffn: Callable[..., nn.Module] = dense_ffn):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleList(
            EncoderBlock(cfg, make_ffn(cfg, i, decoder=False), first=i == 0)
            for i in range(cfg.n_layer))
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.decoder = nn.ModuleList(
            DecoderBlock(cfg, make_ffn(cfg, i, decoder=True), first=i == 0)
            for i in range(cfg.n_layer))
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor):
        x = self.shared(input_ids)  # (B, T, C)
        y = self.shared(decoder_input_ids)  # (B, S, C)
        bias = aux = None
        for block in self.encoder:
            x, bias, aux = block(x, bias, aux)
        enc = self.encoder_norm(x)
        bias = None
        for block in self.decoder:
            y, bias, aux = block(y, enc, bias, aux)
        # the output layer is the shared embedding; T5 scales by C^-1/2 first, as it is tied
        logits = F.linear(self.decoder_norm(y) * self.cfg.d_model ** -0.5, self.shared.weight)
        return logits if aux is None else (logits, aux)
