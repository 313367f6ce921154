"""Tiny Hugging Face models of every family autopar supports, built as their users build them.

`AutoConfig.for_model(model_type, **sizes)` then the task's `AutoModelFor...from_config`: every
config field at transformers' default except the sizes that make the model tiny (and, for
`dropout_off`, its dropout rates, so that runs compare), in training mode. A batch is a dict of
keyword arguments with `labels`, so the model computes its own loss, as `Trainer` calls it.
"""

from __future__ import annotations

import torch

VOCAB, SEQ, BATCH, IMAGE, CLASSES = 128, 16, 4, 32, 10

_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                vocab_size=VOCAB)
_T5 = dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=VOCAB,
           # the published T5 and Switch checkpoints' configs set these; the classes' defaults
           # do not, and the models' own loss (`_shift_right`) needs them
           decoder_start_token_id=0, pad_token_id=0)

# model_type -> (task, size fields)
FAMILIES: dict[str, tuple[str, dict]] = {
    "gpt2": ("causal-lm", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB)),
    "llama": ("causal-lm", dict(_DECODER, num_key_value_heads=2)),  # grouped-query attention
    "mistral": ("causal-lm", dict(_DECODER, num_key_value_heads=2)),
    "mixtral": ("causal-lm", dict(_DECODER, num_key_value_heads=2, num_local_experts=4)),
    # multi-query attention, parallel attention + MLP, no biases (Falcon's defaults)
    "falcon": ("causal-lm", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=VOCAB)),
    "gpt_neox": ("causal-lm", dict(_DECODER)),
    "bert": ("masked-lm", dict(_DECODER)),
    "roberta": ("masked-lm", dict(_DECODER)),
    "t5": ("seq2seq-lm", dict(_T5)),
    # capacity 3 of 16 tokens per sequence and expert: the top-1 router drops tokens. Its
    # config's num_decoder_layers defaults to 12, not to num_layers as T5's does: set, so that
    # the decoder is 2 blocks (dense, then sparse) like the encoder (it was 12 blocks, 2,090
    # graph ops against T5's 480, the slowest family of every HF test)
    "switch_transformers": ("seq2seq-lm", dict(_T5, num_decoder_layers=2,
                                               num_sparse_encoder_layers=1,
                                               num_sparse_decoder_layers=1, num_experts=4,
                                               expert_capacity=3)),
    "vit": ("image-classification", dict(_DECODER, image_size=IMAGE, patch_size=8,
                                         num_labels=CLASSES)),
    "swin": ("image-classification", dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                          image_size=IMAGE, patch_size=4, window_size=4,
                                          num_labels=CLASSES)),
}

_DROPOUTS = ("dropout", "dropout_rate", "hidden_dropout_prob", "attention_probs_dropout_prob",
             "hidden_dropout", "attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
             "summary_first_dropout", "classifier_dropout", "router_jitter_noise",
             "drop_path_rate", "hidden_dropout_prob")


def hf_model(model_type: str, *, dropout_off: bool = False) -> torch.nn.Module:
    import transformers

    task, sizes = FAMILIES[model_type]
    config = transformers.AutoConfig.for_model(model_type, **sizes)
    if dropout_off:
        for name in _DROPOUTS:
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "seq2seq-lm": transformers.AutoModelForSeq2SeqLM,
        "image-classification": transformers.AutoModelForImageClassification,
    }[task]
    return auto.from_config(config).train()


# Families whose batches carry no attention mask, as fixed-length pretraining chunks come; the
# others pass the all-ones mask a tokenizer gives. Both ways are tested: transformers builds
# the full mask from a mask that is passed, and leaves it out (flash attention) otherwise.
NO_ATTENTION_MASK = {"llama", "mixtral", "gpt_neox", "roberta"}


def hf_batch(model_type: str, seed: int = 0, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """One batch of keyword arguments, labels included, always the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    task, _ = FAMILIES[model_type]
    if task == "image-classification":
        return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g),
                "labels": torch.randint(0, CLASSES, (batch,), generator=g)}
    ids = torch.randint(1, VOCAB, (batch, SEQ), generator=g)
    out = {"input_ids": ids}
    if model_type not in NO_ATTENTION_MASK:
        out["attention_mask"] = torch.ones_like(ids)
    if task == "masked-lm":  # predict every token, as a fully masked batch would
        return {**out, "labels": ids.roll(1, dims=1)}
    return {**out, "labels": torch.randint(1, VOCAB, (batch, SEQ), generator=g)}
