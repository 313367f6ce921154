"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"): the image cut
into patches by a strided convolution, a class token, learned positions, a pre-LayerNorm encoder
(GELU MLP, biases) and a linear classifier on the class token's final state.

Shapes: B batch, N patches + 1 (the class token), C width, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_mlp: int = 256
    n_classes: int = 10
    norm_eps: float = 1e-6

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, N, C)
        q = q.view(B, N, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, N, C/H)
        k = k.view(B, N, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, N, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class ViT(nn.Module):
    """`forward(images (B, channels, S, S)) -> class logits (B, n_classes)`."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"ViT: patch size {cfg.patch_size} does not divide the image size "
                             f"{cfg.image_size}")
        self.cfg = cfg
        # one patch -> one token: a convolution whose kernel and stride are the patch
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.d_model, cfg.patch_size,
                                     stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.n_patches + 1, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N - 1, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))  # the class token's state -> (B, n_classes)
