"""One example batch per kind of model, `(inputs, target)` as `train_step` takes it: `inputs` a
tensor or a tuple of the model's positional arguments. Random, from torch's global generator,
and allocated on the current default device (nothing at all under `torch.device("meta")`)."""

from __future__ import annotations

import torch

from autopar.models.losses import IGNORE


def next_token_batch(cfg, batch: int):
    """Decoder-only LMs (GPT, Llama, PaLM): tokens (B, T) and the next tokens (B, T)."""
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    return x, y


def masked_lm_batch(cfg, batch: int):
    """BERT: ((input_ids, token_type_ids), labels), each (B, T). The same number of positions
    in every sequence, `mask_fraction` of them, is replaced by [MASK] and labelled with the
    original token (BERT's fixed max_predictions_per_seq; the 10% random and 10% kept
    replacements are left out); the first half of each sequence is sentence A, the rest B."""
    B, T = batch, cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    n_masked = max(1, round(cfg.mask_fraction * T))
    where = torch.rand(B, T).argsort(dim=1)[:, :n_masked]  # (B, n_masked) distinct positions
    labels = torch.full((B, T), IGNORE).scatter(1, where, tokens.gather(1, where))
    input_ids = tokens.scatter(1, where, cfg.mask_token_id)
    token_type_ids = (torch.arange(T) >= T // 2).long().expand(B, T)
    return (input_ids, token_type_ids), labels


def seq2seq_batch(cfg, batch: int):
    """Encoder-decoders (T5, Switch): ((input_ids (B, T), decoder_input_ids (B, S)), labels
    (B, S)); the decoder reads the labels shifted right behind a start token 0 (T5's)."""
    input_ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    labels = torch.randint(0, cfg.vocab_size, (batch, cfg.target_len))
    decoder_input_ids = torch.cat([torch.zeros(batch, 1, dtype=labels.dtype), labels[:, :-1]], 1)
    return (input_ids, decoder_input_ids), labels


def image_batch(cfg, batch: int):
    """Image classifiers (ViT, Swin): images (B, channels, S, S) and class labels (B,)."""
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    return images, torch.randint(0, cfg.n_classes, (batch,))
