"""The models the command line knows by name, and `module.path:factory` for any other.

A model for the command line is `(model, example_inputs, loss_fn)`. A built-in one is an entry of
`BUILTIN_MODELS`: a family (how to build the model, its example batch, its loss) and a config
with the published shapes. A new size is one entry; a new architecture is a module in this
folder, a `Family` below, and its entries. `build_model` makes any of them, at any size: under
`torch.device("meta")` nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from autopar.errors import AutoparError
from autopar.models import inputs, losses
from autopar.models.bert import Bert, BertConfig
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.hf import build_hf, is_hf
from autopar.models.llama import Llama, LlamaConfig
from autopar.models.mixtral import Mixtral, MixtralConfig
from autopar.models.palm import PaLM, PaLMConfig
from autopar.models.swin import Swin, SwinConfig
from autopar.models.switch import SwitchConfig, SwitchTransformer
from autopar.models.t5 import T5, T5Config
from autopar.models.vit import ViT, ViTConfig


@dataclass(frozen=True)
class Family:
    """What every model of one architecture shares."""

    name: str
    model: Callable[[Any], nn.Module]  # config -> model
    batch: Callable[[Any, int], tuple]  # (config, batch size) -> (inputs, target)
    loss: Callable  # loss(model output, target) -> scalar
    takes: str  # the inputs `forward` reads, a format string over the config's fields
    seq_fields: tuple[str, ...] = ("seq_len",)  # config fields --seq sets; () for images

    @property
    def takes_seq(self) -> bool:
        return bool(self.seq_fields)


_TOKENS = "tokens (B, {seq_len})"
_SEQ2SEQ = "tokens (B, {seq_len}), decoder tokens (B, {target_len})"
_IMAGES = "images (B, {channels}, {image_size}, {image_size})"
GPT_FAMILY = Family("GPT", GPT, inputs.next_token_batch, losses.lm_loss, _TOKENS)
LLAMA = Family("Llama", Llama, inputs.next_token_batch, losses.lm_loss, _TOKENS)
MIXTRAL = Family("Mixtral", Mixtral, inputs.next_token_batch, losses.moe_lm_loss, _TOKENS)
PALM = Family("PaLM", PaLM, inputs.next_token_batch, losses.lm_loss, _TOKENS)
BERT = Family("BERT", Bert, inputs.masked_lm_batch, losses.masked_lm_loss,
              "tokens (B, {seq_len}), token types (B, {seq_len})")
# --seq sets the encoder's and the decoder's length both
T5_FAMILY = Family("T5", T5, inputs.seq2seq_batch, losses.lm_loss, _SEQ2SEQ,
                   ("seq_len", "target_len"))
SWITCH = Family("Switch", SwitchTransformer, inputs.seq2seq_batch, losses.moe_seq2seq_loss,
                _SEQ2SEQ, ("seq_len", "target_len"))
VIT = Family("ViT", ViT, inputs.image_batch, losses.classification_loss, _IMAGES, ())
SWIN = Family("Swin", Swin, inputs.image_batch, losses.classification_loss, _IMAGES, ())


class Entry(NamedTuple):
    family: Family
    config: Any

    @property
    def inputs(self) -> str:
        """What the model takes at its default sizes, e.g. 'tokens (B, 2048)'."""
        return self.family.takes.format(**dataclasses.asdict(self.config))


def _gpt3(n_layer: int, d_model: int, n_head: int) -> Entry:
    # GPT-2's BPE vocabulary (50257) padded to 50304, a multiple of 64, as nanoGPT does, so that
    # tensor parallelism can split it; context 2048
    return Entry(GPT_FAMILY, GPTConfig(vocab_size=50304, seq_len=2048, n_layer=n_layer,
                                       n_head=n_head, d_model=d_model))


def _llama(n_layer, d_model, n_head, n_kv_head, ffn_hidden, *, llama3: bool) -> Entry:
    # Llama 2: 32000 tokens, context 4096, RoPE base 1e4; Llama 3: 128256 tokens, context 8192,
    # RoPE base 5e5
    return Entry(LLAMA, LlamaConfig(
        vocab_size=128256 if llama3 else 32000, seq_len=8192 if llama3 else 4096,
        n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, d_model=d_model,
        ffn_hidden=ffn_hidden, rope_theta=500000.0 if llama3 else 10000.0))


def _palm(n_layer: int, d_model: int, n_head: int) -> Entry:
    # heads of 256, feed-forward 4 * d_model, 256k SentencePiece tokens, context 2048
    return Entry(PALM, PaLMConfig(vocab_size=256000, seq_len=2048, n_layer=n_layer,
                                  n_head=n_head, head_dim=256, d_model=d_model,
                                  ffn_hidden=4 * d_model))


def _bert(n_layer: int, d_model: int, n_head: int) -> Entry:
    # the released WordPiece vocabulary (30522), 512 positions, feed-forward 4 * d_model;
    # examples of 512 tokens (BERT's last 10% of pre-training steps, and MLPerf's)
    return Entry(BERT, BertConfig(vocab_size=30522, seq_len=512, max_positions=512,
                                  n_layer=n_layer, n_head=n_head, d_model=d_model,
                                  d_ff=4 * d_model))


# T5 v1.0: the released checkpoints' vocabulary (32000 SentencePiece pieces padded to 32128);
# pre-training examples of 512 input and 114 target tokens
_T5_TEXT = dict(vocab_size=32128, seq_len=512, target_len=114)


def _t5(n_layer: int, d_model: int, d_ff: int, d_kv: int, n_head: int) -> Entry:
    return Entry(T5_FAMILY, T5Config(**_T5_TEXT, n_layer=n_layer, d_model=d_model, d_ff=d_ff,
                                     d_kv=d_kv, n_head=n_head))


def _switch(size: str, n_experts: int) -> Entry:
    # T5-base / T5-large shapes with experts in every other feed-forward (the released
    # google/switch-base-* and switch-large-128 checkpoints: ReLU experts of T5's width)
    shape = (dict(n_layer=12, d_model=768, d_ff=3072, n_head=12) if size == "base" else
             dict(n_layer=24, d_model=1024, d_ff=4096, n_head=16))
    return Entry(SWITCH, SwitchConfig(**_T5_TEXT, **shape, d_kv=64, n_experts=n_experts))


def _vit(patch: int, n_layer: int, d_model: int, d_mlp: int, n_head: int) -> Entry:
    # 224 x 224 images, ImageNet-1k's 1000 classes
    return Entry(VIT, ViTConfig(image_size=224, patch_size=patch, n_layer=n_layer,
                                n_head=n_head, d_model=d_model, d_mlp=d_mlp, n_classes=1000))


def _swin(embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...]) -> Entry:
    # 224 x 224 images, patches of 4, windows of 7, MLP ratio 4, 1000 classes
    return Entry(SWIN, SwinConfig(image_size=224, patch_size=4, embed_dim=embed_dim,
                                  depths=depths, heads=heads, window=7, n_classes=1000))


BUILTIN_MODELS: dict[str, Entry] = {
    # -- GPT: the demo's model, small enough to train on 4 CPU processes in seconds
    "gpt-tiny": Entry(GPT_FAMILY, GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4,
                                            d_model=64)),
    # GPT-2 small (124M) and medium (350M) shapes, vocabulary padded to 50304 as in nanoGPT
    "gpt-small": Entry(GPT_FAMILY, GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12,
                                             n_head=12, d_model=768)),
    "gpt-medium": Entry(GPT_FAMILY, GPTConfig(vocab_size=50304, seq_len=1024, n_layer=24,
                                              n_head=16, d_model=1024)),
    # GPT-3 (Brown et al. 2020, Table 2.1: n_layers, d_model, n_heads). Dense attention in every
    # layer (GPT-3 alternates dense and locally banded sparse attention; the weights are the
    # same). Two rows of the table do not multiply out: 1.3B lists 24 heads of 128 at d_model
    # 2048, here 16 heads of 128; 13B lists d_model 5140, here 5120 = 40 heads of 128.
    "gpt3-125m": _gpt3(12, 768, 12),
    "gpt3-350m": _gpt3(24, 1024, 16),
    "gpt3-760m": _gpt3(24, 1536, 16),
    "gpt3-1.3b": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
    # -- Llama 2 (Touvron et al. 2023, "Llama 2", Table 1; feed-forward widths of the released
    # params.json: 11008, 13824, 28672) and Llama 3 (Llama Team 2024, "The Llama 3 Herd of
    # Models", Table 3): layers, d_model, heads, kv heads, feed-forward
    "llama-test": Entry(LLAMA, LlamaConfig(vocab_size=128, seq_len=16, n_layer=2, n_head=4,
                                           n_kv_head=2, d_model=64, ffn_hidden=128)),
    "llama2-7b": _llama(32, 4096, 32, 32, 11008, llama3=False),
    "llama2-13b": _llama(40, 5120, 40, 40, 13824, llama3=False),
    "llama2-70b": _llama(80, 8192, 64, 8, 28672, llama3=False),
    "llama3-8b": _llama(32, 4096, 32, 8, 14336, llama3=True),
    "llama3-70b": _llama(80, 8192, 64, 8, 28672, llama3=True),
    "llama3-405b": _llama(126, 16384, 128, 8, 53248, llama3=True),
    # -- Mixtral (Jiang et al. 2024, Table 1: layers, d_model, heads, kv heads, expert width,
    # 8 experts, top 2, 32K context, vocabulary 32000, RoPE base 1e6), experts with a capacity
    # (mixtral.py says how that differs); the test model's capacity factor 1 drops tokens
    "mixtral-test": Entry(MIXTRAL, MixtralConfig(vocab_size=128, seq_len=16, n_layer=2, n_head=4,
                                                 n_kv_head=2, d_model=64, ffn_hidden=128,
                                                 n_experts=4, capacity_factor=1.0)),
    "mixtral-8x7b": Entry(MIXTRAL, MixtralConfig(vocab_size=32000, seq_len=32768, n_layer=32,
                                                 n_head=32, n_kv_head=8, d_model=4096,
                                                 ffn_hidden=14336, rope_theta=1e6)),
    # -- PaLM (Chowdhery et al. 2022, Table 1: layers, d_model, heads)
    "palm-test": Entry(PALM, PaLMConfig(vocab_size=128, seq_len=16, n_layer=2, n_head=4,
                                        head_dim=16, d_model=64, ffn_hidden=256)),
    "palm-8b": _palm(32, 4096, 16),
    "palm-62b": _palm(64, 8192, 32),
    "palm-540b": _palm(118, 18432, 48),
    # -- BERT (Devlin et al. 2019, section 3: L, H, A)
    "bert-test": Entry(BERT, BertConfig(vocab_size=128, seq_len=16, max_positions=32,
                                        n_layer=2, n_head=4, d_model=64, d_ff=256)),
    "bert-base": _bert(12, 768, 12),
    "bert-large": _bert(24, 1024, 16),
    # -- T5 v1.0 (Raffel et al. 2020, section 3.7 and the released configs): layers per stack,
    # d_model, d_ff, d_kv, heads
    "t5-test": Entry(T5_FAMILY, T5Config(vocab_size=128, seq_len=16, target_len=8, n_layer=2,
                                         d_model=64, d_ff=128, d_kv=16, n_head=4)),
    "t5-base": _t5(12, 768, 3072, 64, 12),
    "t5-large": _t5(24, 1024, 4096, 64, 16),
    "t5-3b": _t5(24, 1024, 16384, 128, 32),
    "t5-11b": _t5(24, 1024, 65536, 128, 128),
    # -- Switch Transformer (Fedus et al. 2022, Table 9; the released checkpoints' shapes)
    # capacity factor 1 (the paper's Table 1 trains with 1.0 too): 4 and 2 tokens per expert
    # and sequence, so that tokens are dropped in tests
    "switch-test": Entry(SWITCH, SwitchConfig(vocab_size=128, seq_len=16, target_len=8,
                                              n_layer=2, d_model=64, d_ff=128, d_kv=16,
                                              n_head=4, n_experts=4, capacity_factor=1.0)),
    **{f"switch-base-{e}": _switch("base", e) for e in (8, 16, 32, 64, 128)},
    "switch-large-128": _switch("large", 128),
    # -- ViT (Dosovitskiy et al. 2021, Table 1: layers, width, MLP, heads)
    "vit-test": Entry(VIT, ViTConfig(image_size=32, patch_size=8, n_layer=2, n_head=4,
                                     d_model=64, d_mlp=256, n_classes=10)),
    "vit-b16": _vit(16, 12, 768, 3072, 12),
    "vit-l16": _vit(16, 24, 1024, 4096, 16),
    "vit-h14": _vit(14, 32, 1280, 5120, 16),
    # -- Swin (Liu et al. 2021, section 3.3: C, layer numbers; heads of 32 channels)
    "swin-test": Entry(SWIN, SwinConfig(image_size=32, patch_size=2, embed_dim=32,
                                        depths=(2, 2, 2, 2), heads=(2, 4, 8, 16), window=4,
                                        n_classes=10)),
    "swin-t": _swin(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin-b": _swin(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin-l": _swin(192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def build_model(spec: str, *, batch: int | None, seq: int | None,
                overrides: dict | None = None):
    """(model, example_inputs, loss_fn) for a built-in name, `hf:<model_type or config>`
    (`autopar.models.hf`, with config `overrides`) or a `module.path:factory`.

    Call it under `torch.device("meta")` to build without memory. `batch` and `seq` default to
    batch 8 and the config's sequence length (an image model takes no `seq`); a factory gets
    them as keyword arguments only when they are given.
    """
    if is_hf(spec):
        return build_hf(spec, batch=positive(batch, "--batch") if batch else 8, seq=seq,
                        overrides=overrides)
    if overrides:
        raise AutoparError("--set changes a Hugging Face config: use it with hf:<model_type>")
    if ":" in spec:
        return _from_factory(spec, batch=batch, seq=seq)
    family, cfg = entry(spec)
    if seq is not None:
        if not family.takes_seq:
            raise AutoparError(
                f"{spec} is an image model ({family.name}, {cfg.image_size} x {cfg.image_size} "
                "images): it has no sequence length; drop --seq"
            )
        cfg = replace(cfg, **dict.fromkeys(family.seq_fields, positive(seq, "--seq")))
    b = positive(batch, "--batch") if batch is not None else 8
    return family.model(cfg), family.batch(cfg, b), family.loss


def entry(spec: str) -> Entry:
    """The built-in model `spec`, or an AutoparError that says where to look."""
    if spec not in BUILTIN_MODELS:
        raise AutoparError(
            f"unknown model {spec!r}: use a built-in one (`autopar models` lists them), "
            "hf:<model_type> or hf:path/to/config.json (Hugging Face transformers), or "
            "module.path:factory, a function returning (model, example_inputs, loss_fn)"
        )
    return BUILTIN_MODELS[spec]


def parameter_count(spec: str) -> int:
    """The built-in model's parameters, counted on the meta device (a tied weight once)."""
    family, cfg = entry(spec)
    with torch.device("meta"):
        return sum(p.numel() for p in family.model(cfg).parameters())


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
