"""Losses the built-in models train with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over (B, T, vocab) logits and (B, T) targets."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())
