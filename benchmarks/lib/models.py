"""The benchmark models: their shapes, seed-0 weights, losses and FLOP counts.

`MODELS` holds the published shapes, `TINY` the same families at sizes a CPU runs in seconds
(`--tiny`); `model_spec(name, tiny, seq_len)` picks one. Every system builds its model from a
`ModelSpec`, so every system starts from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopar.models.gpt import GPT, GPTConfig
from autopar.models.llama import Llama, LlamaConfig
from autopar.models.losses import lm_loss

H200_BF16_PEAK_TFLOPS = 989.0  # datasheet, dense (autopar/data/devices/h200-141g.json)

# GPT-3 paper (Brown et al. 2020, table 2.1) shapes, GPT-2 vocabulary padded to 50304 (nanoGPT);
# Llama 3 8B (Meta's params.json: 32 layers, 4096 wide, 32 heads, 8 kv heads, SwiGLU 14336,
# vocabulary 128256, rope theta 500000); a Llama-style 2.8B for issue 19's second row (below).
MODELS = {
    "gpt-1.3b": ("gpt", dict(vocab_size=50304, n_layer=24, n_head=16, d_model=2048)),
    "gpt-2.7b": ("gpt", dict(vocab_size=50304, n_layer=32, n_head=32, d_model=2560)),
    "gpt-6.7b": ("gpt", dict(vocab_size=50304, n_layer=32, n_head=32, d_model=4096)),
    "llama-8b": (
        "llama",
        dict(
            vocab_size=128256,
            n_layer=32,
            n_head=32,
            n_kv_head=8,
            d_model=4096,
            ffn_hidden=14336,
            rope_theta=500000.0,
        ),
    ),
    # Llama-style 2.8B (RMSNorm, RoPE, SwiGLU, GQA): Llama 2's vocabulary (32000) and rope
    # theta, 32 layers of width 2560, 32 heads of 80 and 8 kv heads, SwiGLU 8704 (Llama's rule,
    # 256 * ceil(1.25 * 8/3 * 2560 / 256)). 2,827,389,440 parameters by parameter_count (the
    # head untied). Heads, kv heads, vocabulary and widths all split by tp 2, 4 and 8.
    "llama-3b": (
        "llama",
        dict(
            vocab_size=32000,
            n_layer=32,
            n_head=32,
            n_kv_head=8,
            d_model=2560,
            ffn_hidden=8704,
        ),
    ),
}
# --tiny: the same families and code paths, sizes a CPU runs in seconds
TINY = {
    "gpt-1.3b": ("gpt", dict(vocab_size=256, n_layer=2, n_head=4, d_model=64)),
    "gpt-2.7b": ("gpt", dict(vocab_size=256, n_layer=4, n_head=4, d_model=64)),
    "gpt-6.7b": ("gpt", dict(vocab_size=256, n_layer=2, n_head=8, d_model=128)),
    "llama-8b": (
        "llama",
        dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=172),
    ),
    "llama-3b": (
        "llama",
        dict(vocab_size=256, n_layer=2, n_head=8, n_kv_head=2, d_model=64, ffn_hidden=176),
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "gpt" or "llama"
    config: dict  # GPTConfig / LlamaConfig fields, seq_len included

    def make_config(self):
        return (GPTConfig if self.family == "gpt" else LlamaConfig)(**self.config)

    def build(self, device, dtype=torch.float32) -> nn.Module:
        """The model with seed-0 weights made on `device` (identical for every system):
        GPT-2's initialisation, N(0, 0.02) for every matmul and embedding weight, zero biases
        (the model classes keep torch's defaults, whose tied N(0, 1) embedding starts GPT at
        a loss far above log(vocab))."""
        torch.manual_seed(0)
        with torch.device(device):
            model = (GPT if self.family == "gpt" else Llama)(self.make_config())
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
        return model.to(dtype)

    @property
    def heads(self) -> int:
        return self.config["n_head"]

    @property
    def kv_heads(self) -> int:
        return self.config.get("n_kv_head", self.config["n_head"])


def model_spec(name: str, tiny: bool, seq_len: int) -> ModelSpec:
    family, cfg = (TINY if tiny else MODELS)[name]
    return ModelSpec(name, family, dict(cfg, seq_len=seq_len))


def meta_model(spec: ModelSpec, dtype) -> nn.Module:
    """The model on the meta device (torch's default initialisation, no storage), in `dtype`:
    what offline planning and the predictions trace."""
    with torch.device("meta"):
        return (GPT if spec.family == "gpt" else Llama)(spec.make_config()).to(dtype)


def blocks(model) -> nn.ModuleList:
    """The repeated blocks of a GPT or Llama, in order."""
    return model.blocks if isinstance(model, GPT) else model.layers


def lm_loss_fp32(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`lm_loss` with the logits upcast first, as torchtitan computes it (--fp32-loss)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


# the loss a run trains with: autopar's CLI loss on the logits as they come (bf16 under bf16),
# or torchtitan's
LOSS = {"model": lm_loss, "fp32": lm_loss_fp32}


def model_flops_per_token(spec: ModelSpec) -> float:
    """6 x (weights that take part in a matmul, the output head included, embedding lookups
    not) + 12 L d T for attention scores and values (PaLM, Chowdhery et al. 2022, app. B;
    causal masking not discounted)."""
    model = meta_model(spec, torch.float32)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    c = spec.config
    return 6.0 * matmul + 12.0 * c["n_layer"] * c["d_model"] * c["seq_len"]


def parameter_count(spec: ModelSpec) -> int:
    model = meta_model(spec, torch.float32)
    return sum(p.numel() for p in model.parameters())  # tied weights once
