"""Losses the built-in models train with, one per kind of output (`registry.FAMILIES` pairs each
family with its loss and with its example batch from `inputs.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that no loss counts (cross_entropy's default ignore_index)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over (B, T, vocab) logits and (B, T) targets; also a decoder's
    loss in an encoder-decoder (T5), whose targets are the decoder's next tokens."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BERT's masked-LM loss: cross-entropy at the masked positions alone, whose (B, T) labels
    are the original tokens; every other label is IGNORE. The mean is over masked tokens, so
    splitting the batch is exact only when every sequence masks as many (inputs.py's do)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (B, classes) logits and (B,) class indices (ViT, Swin)."""
    return F.cross_entropy(logits, labels)


def moe_lm_loss(output, target: torch.Tensor) -> torch.Tensor:
    """A mixture-of-experts decoder's loss (mixtral.py): next-token cross-entropy plus the
    routers' load-balancing loss, already scaled by its coefficient, when the model returns
    one."""
    return moe_seq2seq_loss(output, target)


def moe_seq2seq_loss(output, target: torch.Tensor) -> torch.Tensor:
    """A Switch Transformer's loss: the decoder's cross-entropy plus the routers'
    load-balancing loss, already scaled by its coefficient, when the model returns one."""
    if isinstance(output, tuple):
        logits, aux = output
        return lm_loss(logits, target) + aux
    return lm_loss(output, target)
