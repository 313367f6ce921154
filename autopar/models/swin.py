"""Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows"): patches embedded by a strided convolution, then four stages, each narrower in
space and twice as wide as the one before (patch merging between them); attention runs within
non-overlapping windows, every other block on windows shifted by half a window (torch.roll), with
a learned bias per relative position and a mask that keeps the rolled-around pieces of a shifted
window from attending to each other. The classifier reads the mean of the final tokens.

The blocks and the patch mergings sit in ONE module list, `blocks`, in the order they run, so
that each is a layer of its own (a unit of pipeline stages and checkpointing). The shifted
windows' masks depend on the resolution alone: each block builds its own once, as a buffer.

Shapes: B batch, R x R resolution of a stage, L = R * R tokens, C width, W window side,
N = W * W tokens in a window, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class SwinConfig:
    image_size: int = 32
    patch_size: int = 2
    channels: int = 3
    embed_dim: int = 32  # width of the first stage; each stage doubles it
    depths: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage
    heads: tuple[int, ...] = (1, 2, 4, 8)  # attention heads per stage
    window: int = 4
    mlp_ratio: int = 4
    n_classes: int = 10
    norm_eps: float = 1e-5


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, R, R, C) -> (B * windows, W * W, C)."""
    B, R, _, C = x.shape
    x = x.view(B, R // w, w, R // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_reverse(windows: torch.Tensor, w: int, R: int) -> torch.Tensor:
    """(B * windows, W * W, C) -> (B, R, R, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, R // w, R // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, R, R, C)


def relative_position_index(w: int) -> torch.Tensor:
    """(N, N): for each pair of positions in a window, the row of the bias table of their
    offset (dy, dx), each in [-(W-1), W-1]."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij"))
    flat = coords.flatten(1)  # (2, N)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (w - 1)  # (N, N, 2), >= 0
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def shifted_window_mask(R: int, w: int, shift: int) -> torch.Tensor:
    """(windows, N, N): 0 between tokens of the same region of the rolled image, -100 between
    tokens that the roll brought together from opposite edges (Swin's own value: after softmax,
    as good as -inf, and never NaN)."""
    region = torch.zeros(1, R, R, 1)
    cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
    for i, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        region[:, rows, cols, :] = i
    labels = window_partition(region, w).squeeze(-1)  # (windows, N)
    differ = labels[:, None, :] != labels[:, :, None]  # (windows, N, N)
    return torch.zeros(differ.shape).masked_fill(differ, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, w: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads) * 0.02)
        self.register_buffer("bias_index", relative_position_index(w), persistent=False)

    def forward(self, x, mask):
        Bw, N, C = x.shape  # Bw: batch x windows
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(Bw, N, self.heads, C // self.heads).transpose(1, 2)  # (Bw, H, N, C/H)
        k = k.view(Bw, N, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(Bw, N, self.heads, C // self.heads).transpose(1, 2)
        scores = (q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)  # (Bw, H, N, N)
        bias = self.bias_table[self.bias_index].permute(2, 0, 1)  # (H, N, N)
        scores = scores + bias
        if mask is not None:  # (windows, N, N), the same for every image of the batch
            nw = mask.shape[0]
            scores = scores.view(-1, nw, self.heads, N, N) + mask[:, None]
            scores = scores.view(Bw, self.heads, N, N)
        y = scores.softmax(dim=-1) @ v  # (Bw, H, N, C/H)
        return self.proj(y.transpose(1, 2).reshape(Bw, N, C))


class SwinBlock(nn.Module):
    """Window attention (shifted by `shift` when it is not 0), then an MLP; pre-LayerNorm."""

    def __init__(self, cfg: SwinConfig, dim: int, heads: int, resolution: int, shift: bool):
        super().__init__()
        # a stage no larger than a window is one window, and shifting it would change nothing
        self.window = min(cfg.window, resolution)
        self.shift = self.window // 2 if shift and resolution > cfg.window else 0
        self.resolution = resolution
        self.norm_1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = WindowAttention(dim, heads, self.window)
        self.norm_2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.fc = nn.Linear(dim, cfg.mlp_ratio * dim)
        self.proj = nn.Linear(cfg.mlp_ratio * dim, dim)
        mask = shifted_window_mask(resolution, self.window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x):
        B, L, C = x.shape
        R, w, s = self.resolution, self.window, self.shift
        h = self.norm_1(x).view(B, R, R, C)
        if s:
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, w), self.attn_mask), w, R)
        if s:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + h.reshape(B, L, C)
        return x + self.proj(F.gelu(self.fc(self.norm_2(x))))


class PatchMerging(nn.Module):
    """Each 2 x 2 group of tokens -> one token: (B, R * R, C) -> (B, R/2 * R/2, 2C)."""

    def __init__(self, cfg: SwinConfig, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim, eps=cfg.norm_eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, L, C = x.shape
        R = self.resolution
        x = x.view(B, R, R, C)
        # the four corners of each 2 x 2 group, side by side (Swin's order)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)  # (B, R/2, R/2, 4C)
        return self.reduction(self.norm(x.reshape(B, L // 4, 4 * C)))


class Swin(nn.Module):
    """`forward(images (B, channels, S, S)) -> class logits (B, n_classes)`."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        if len(cfg.depths) != len(cfg.heads):
            raise ValueError(f"Swin: {len(cfg.depths)} stage depths but {len(cfg.heads)} head "
                             "counts; give one of each per stage")
        R = cfg.image_size // cfg.patch_size
        sides = [R // 2**i for i in range(len(cfg.depths))]  # each stage's resolution
        if cfg.image_size % cfg.patch_size or R % 2 ** (len(cfg.depths) - 1) or any(
                r % min(cfg.window, r) for r in sides):
            raise ValueError(
                f"Swin: image size {cfg.image_size} with patch {cfg.patch_size} gives stages of "
                f"{sides} tokens a side; each must halve exactly and be a multiple of the "
                f"window {cfg.window} (or smaller than it)")
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.embed_dim, cfg.patch_size,
                                     stride=cfg.patch_size)
        self.patch_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        blocks: list[nn.Module] = []
        dim = cfg.embed_dim
        for stage, (depth, heads) in enumerate(zip(cfg.depths, cfg.heads)):
            if stage:
                blocks.append(PatchMerging(cfg, dim, R))
                dim, R = 2 * dim, R // 2
            blocks += [SwinBlock(cfg, dim, heads, R, shift=i % 2 == 1) for i in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.head = nn.Linear(dim, cfg.n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L, C)
        x = self.patch_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))  # mean over tokens -> (B, n_classes)
