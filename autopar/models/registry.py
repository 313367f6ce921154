"""The models the command line knows by name, and `module.path:factory` for any other.

A model for the command line is `(model, example_inputs, loss_fn)`; `build_model` makes one for
a built-in name (a table entry below) or calls a user's factory.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import replace

import torch

from autopar.errors import AutoparError
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.hf import build_hf, is_hf
from autopar.models.losses import lm_loss

BUILTIN_MODELS: dict[str, GPTConfig] = {
    # the demo's model: small enough to train on 4 CPU processes in seconds
    "gpt-tiny": GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, d_model=64),
    # GPT-2 small (124M) shapes, vocabulary padded to a multiple of 64 as in nanoGPT
    "gpt-small": GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768),
    # GPT-2 medium (350M) shapes
    "gpt-medium": GPTConfig(vocab_size=50304, seq_len=1024, n_layer=24, n_head=16, d_model=1024),
}


def build_model(spec: str, *, batch: int | None, seq: int | None,
                overrides: dict | None = None):
    """(model, example_inputs, loss_fn) for a built-in name, `hf:<model_type or config>`
    (`autopar.models.hf`, with config `overrides`) or a `module.path:factory`.

    Call it under `torch.device("meta")` to build without memory. `batch` and `seq` default to
    batch 8 and the config's sequence length; a factory gets them as keyword
    arguments only when they are given.
    """
    if is_hf(spec):
        return build_hf(spec, batch=positive(batch, "--batch") if batch else 8, seq=seq,
                        overrides=overrides)
    if overrides:
        raise AutoparError("--set changes a Hugging Face config: use it with hf:<model_type>")
    if ":" in spec:
        return _from_factory(spec, batch=batch, seq=seq)
    if spec not in BUILTIN_MODELS:
        raise AutoparError(
            f"unknown model {spec!r}: use a built-in one ({', '.join(BUILTIN_MODELS)}), "
            "hf:<model_type> or hf:path/to/config.json (Hugging Face transformers), or "
            "module.path:factory, a function returning (model, example_inputs, loss_fn)"
        )
    cfg = BUILTIN_MODELS[spec]
    if seq is not None:
        cfg = replace(cfg, seq_len=positive(seq, "--seq"))
    b = positive(batch, "--batch") if batch is not None else 8
    x = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len))  # (B, T)
    y = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len))  # (B, T)
    return GPT(cfg), (x, y), lm_loss


def is_factory(spec: str) -> bool:
    """`module.path:factory`: the user's function decides its own batch."""
    return ":" in spec and not is_hf(spec)


def positive(value: int, flag: str) -> int:
    """`value` if it is at least 1, else a ValueError naming the command-line `flag`."""
    if value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")
    return value


def _from_factory(spec: str, *, batch: int | None, seq: int | None):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AutoparError(f"bad model {spec!r}: write module.path:factory, e.g. mymodels:build")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so `autopar plan mymodels:build` finds ./mymodels.py
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise AutoparError(
            f"cannot import {module_name!r} for model {spec!r} ({e}); run from the folder that "
            "holds it or put it on PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise AutoparError(f"{module_name} has no function {attr!r} (model {spec!r})")
    kwargs = {k: v for k, v in (("batch", batch), ("seq", seq)) if v is not None}
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError:
        raise AutoparError(
            f"{spec} does not take {', '.join(f'{k}=' for k in kwargs)}: give it keyword "
            "parameters batch and seq, or drop --batch/--seq"
        ) from None
    built = factory(**kwargs)
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        raise AutoparError(
            f"{spec} returned {type(built).__name__}; it must return "
            "(model, example_inputs, loss_fn) or (model, example_inputs)"
        )
    return built if len(built) == 3 else (*built, None)
