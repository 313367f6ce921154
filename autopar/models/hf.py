"""Hugging Face models for the command line: `hf:<model_type>` or `hf:path/to/config.json`.

`hf:llama` is transformers' default config of that model type (`AutoConfig.for_model`), with
`--set key=value` overrides (`--set num_hidden_layers=4`); `hf:some/config.json` (or a folder
holding one) is a config file as the Hub ships it. The model class is the config's first
`architectures` entry, else the first task of `TASKS` that has a class for the config. The
example batch is what `Trainer` passes: keyword arguments with `labels`, so the model computes
its own loss (no loss_fn). Needs `pip install autopar[hf]`.
"""

from __future__ import annotations

import json
import os

import torch

from autopar.errors import AutoparError

PREFIX = "hf:"

# (auto class, inputs it takes) in the order a config without `architectures` tries them
# (encoders such as BERT have a causal-LM class too, but are trained as masked LMs)
TASKS = (
    ("AutoModelForSeq2SeqLM", "tokens"),
    ("AutoModelForMaskedLM", "tokens"),
    ("AutoModelForCausalLM", "tokens"),
    ("AutoModelForImageClassification", "image"),
)

DEFAULT_SEQ = 1024  # capped by the config's own maximum positions


def is_hf(spec: str) -> bool:
    return spec.startswith(PREFIX)


def build_hf(spec: str, *, batch: int, seq: int | None, overrides: dict | None = None):
    """(model, example_inputs, None) for `hf:<model_type>` or `hf:<config file>`."""
    transformers = _transformers()
    config = _config(transformers, spec.removeprefix(PREFIX), overrides or {})
    model_class, kind = _model_class(transformers, config)
    model = model_class._from_config(config)
    model.train()
    if kind == "image":
        if seq is not None:
            raise AutoparError(f"{spec} is an image model: drop --seq (its input is "
                               f"{config.image_size}x{config.image_size} images)")
        size = config.image_size
        return model, {
            "pixel_values": torch.randn(batch, config.num_channels, size, size),
            "labels": torch.randint(0, config.num_labels, (batch,)),
        }, None
    # a multiple of 64 within the positions the model has (RoBERTa's 514 hold 512 tokens)
    seq = seq or min(DEFAULT_SEQ, (_max_positions(config) or DEFAULT_SEQ) // 64 * 64)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return model, {"input_ids": ids, "labels": ids}, None


def parse_overrides(pairs: list[str] | None) -> dict:
    """`["num_hidden_layers=4", "tie_word_embeddings=false"]` -> their values (JSON, else
    strings)."""
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise AutoparError(f"--set {pair!r}: write KEY=VALUE, e.g. --set num_hidden_layers=4")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def _transformers():
    try:
        import transformers
    except ImportError:
        raise AutoparError("hf: models need Hugging Face transformers: "
                           'pip install "autopar[hf]"') from None
    return transformers


def _config(transformers, what: str, overrides: dict):
    if os.path.exists(what):
        config = transformers.AutoConfig.from_pretrained(what)
        unknown = sorted(k for k in overrides if not hasattr(config, k))
        if unknown:
            raise AutoparError(f"--set {', '.join(unknown)}: not fields of {what}'s config")
        for k, v in overrides.items():
            setattr(config, k, v)
        return config
    if "/" in what or what.endswith(".json"):
        raise AutoparError(f"hf:{what}: no such file or folder (give a config.json, or a "
                           "model type such as hf:llama)")
    try:
        config = transformers.AutoConfig.for_model(what, **overrides)
    except ValueError:
        types = sorted(transformers.CONFIG_MAPPING.keys())
        raise AutoparError(f"hf:{what}: transformers has no model type {what!r} (some it has: "
                           f"{', '.join(t for t in types if t[:2] == what[:2]) or types[:10]})"
                           ) from None
    if config.is_encoder_decoder and getattr(config, "decoder_start_token_id", None) is None:
        # the published T5 / Switch configs start decoding at the pad token; the classes'
        # defaults leave it unset, and the model's own loss (shifting labels right) needs it
        config.decoder_start_token_id = config.pad_token_id
    return config


def _model_class(transformers, config):
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            kind = "image" if "Image" in arch else "tokens"
            return cls, kind
    for auto_name, kind in TASKS:
        auto = getattr(transformers, auto_name)
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)], kind
    raise AutoparError(f"no trainable head for {type(config).__name__}: autopar builds "
                       f"{', '.join(a for a, _ in TASKS)} models")


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
