"""Trace-time rewrites: what autopar changes while `torch.export` traces a model, so that
models whose forward export cannot follow as written still trace, with no edit by the user.

Planning and training both run the traced graph, never the module's own forward, so a rewrite
decides what runs everywhere. Each must therefore compute what the module computes (the tests
train with it and compare with the unmodified model in one process), with static shapes.

Two kinds:

- **`Module.to` that changes nothing.** A module cast inside forward to the dtype and device it
  already has (Switch Transformers' router runs `self.classifier = self.classifier.to(float32)`
  on every call) returns the module itself. Left alone, `Module._apply` swaps each parameter
  with its own conversion, which export's fake parameters refuse ("Couldn't swap
  Linear.weight"). A cast that changes something is left to `Module.to` (and fails as before).
- **`REWRITES`: a module class -> a forward of the same math export can trace**, installed on
  each instance of exactly that class (not its subclasses) while export runs. Data-dependent
  code (`nonzero`, a Python loop over the experts a batch reaches, `torch.where` with one
  argument) has shapes that depend on the values, which export cannot trace and a plan cannot
  price. Classes are named by `module.qualname`, so this module imports no model library.

Adding one: a function `forward(module, *args, **kwargs)` and `register(class or its name,
forward)`; a docstring saying what it computes, and why it equals the original.

And one for a library's own switch: **Hugging Face experts run as a Python loop.** transformers'
mixture-of-experts layers (Mixtral, Qwen-MoE, ...) pick their implementation from
`config._experts_implementation`; "eager" loops over the experts a batch reaches (`nonzero`).
While export runs, such a config says `"grouped_mm"`: transformers' own implementation of the
same function (each token through its top-k experts, weighted by its routing weights) with one
grouped matmul, which traces. The config is restored on exit.

And one for a library's own guards: **Hugging Face attention masks built because export runs.**
transformers (`masking_utils`) leaves the attention mask out when no token is padded, so that
SDPA runs causal (`is_causal=True`) or unmasked and takes the flash kernel. While export runs it
always builds the full (B, 1, S, S) mask instead: an exported program may later see padded or
packed batches, and the values that would tell are not known while tracing. autopar's graph
only ever runs batches of the example's structure (`trace.inputs_key`), so what the example
leaves out, no batch passes:

- no `attention_mask`: no token is padded. transformers' masking code is told it is not
  exporting; a mask the example does pass is a traced input (`is_tracing(padding_mask)`), still
  built and applied.
- no `position_ids`: the model counts positions itself (0, 1, 2, ... in every row), so rows
  are not packed sequences, as transformers finds outside export. Positions the example passes
  are still checked for packing (and keep the mask).

The mask dropped would be all causal (decoders) or all true (encoders, ViT). Without this, a
Hugging Face Llama runs SDPA with an explicit mask: the memory-efficient kernel, slower than the
flash kernel the same model gets in eager PyTorch.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import types
from collections.abc import Callable, Collection

import torch
from torch import nn

REWRITES: dict[str, Callable] = {}
# transformers' names (transformers.integrations.moe): the loop, and the grouped matmul
_LOOPED_EXPERTS, _TRACEABLE_EXPERTS = "eager", "grouped_mm"
# transformers' mask builders; the export check and the packed-rows check they skip a mask on
_HF_MASKING = "transformers.masking_utils"
_EXPORT_CHECK, _PACKED_CHECK = "is_torchdynamo_exporting", "find_packed_sequence_indices"
# older releases (5.17) ask `is_tracing(padding_mask)` alone, which is True for no mask too
_TRACING_CHECK = "is_tracing"


def register(cls: type | str, forward: Callable) -> None:
    """Trace every instance of `cls` (a class, or "module.QualName") with `forward` instead."""
    REWRITES[cls if isinstance(cls, str) else _name(cls)] = forward


@contextlib.contextmanager
def applied(model: nn.Module, given: Collection[str] = ()):
    """While tracing `model` called with the arguments named in `given`: no-op `Module.to`
    calls return the module, each submodule whose class has a rewrite forwards through it, and
    Hugging Face masks are decided as outside export. Everything is restored on exit."""
    patched = []
    configs = []  # Hugging Face configs whose experts loop in Python
    original_to = nn.Module.to
    try:
        for mod in model.modules():
            forward = REWRITES.get(_name(type(mod)))
            if forward is not None and "forward" not in vars(mod):
                mod.forward = types.MethodType(forward, mod)
                patched.append(mod)
            config = getattr(mod, "config", None)
            if (getattr(config, "_experts_implementation", None) == _LOOPED_EXPERTS
                    and all(c is not config for c in configs)):
                configs.append(config)
        for config in configs:
            config._experts_implementation = _TRACEABLE_EXPERTS
        nn.Module.to = _to_unless_unchanged(original_to)
        with _hf_masks_as_in_eager(given):
            yield
    finally:
        nn.Module.to = original_to
        for mod in patched:
            del mod.forward
        for config in configs:
            config._experts_implementation = _LOOPED_EXPERTS


@contextlib.contextmanager
def _hf_masks_as_in_eager(given: Collection[str]):
    """transformers' masking code, if loaded, decides on masks as it does outside export, for
    a call that passes the arguments named in `given`."""
    masking = sys.modules.get(_HF_MASKING)  # not loaded: no Hugging Face model is traced
    patches = {_EXPORT_CHECK: _not_exporting}
    if hasattr(masking, _TRACING_CHECK):
        patches[_TRACING_CHECK] = _traced_if_given(getattr(masking, _TRACING_CHECK))
    if "position_ids" not in given:
        patches[_PACKED_CHECK] = _one_sequence_per_row
    saved = {name: getattr(masking, name) for name in patches if hasattr(masking, name)}
    try:
        for name in saved:
            setattr(masking, name, patches[name])
        yield
    finally:
        for name, original in saved.items():
            setattr(masking, name, original)


def _not_exporting() -> bool:
    return False


def _traced_if_given(is_tracing):
    """transformers' `is_tracing(tensor)`, but False when there is no tensor (no mask passed):
    only a value the example passes is a traced one."""
    return lambda tensor=None: tensor is not None and is_tracing(tensor)


def _one_sequence_per_row(position_ids):
    return None  # transformers' answer for positions with no restart in any row


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _to_unless_unchanged(original_to):
    """`Module.to`, except that a cast every tensor of the module already satisfies returns the
    module untouched (as `Tensor.to` returns the tensor itself)."""

    def to(self, *args, **kwargs):
        device, dtype, _non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if memory_format is None and all(
            (device is None or t.device == device)
            and (dtype is None or not (t.is_floating_point() or t.is_complex())
                 or t.dtype == dtype)
            for t in itertools.chain(self.parameters(), self.buffers())
        ):
            return self
        return original_to(self, *args, **kwargs)

    return to


# --- Switch Transformers (Hugging Face): top-1 routing with expert capacity -------------------


def switch_sparse_mlp_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """`SwitchTransformersSparseMLP.forward` with static shapes: the expert-capacity dispatch
    of the Switch Transformer's own implementation (Fedus et al. 2021, Mesh TensorFlow).

    The router is called as is: a one-hot expert per token (B, S, E), zero where the token
    arrived after `expert_capacity` others of its sequence had (capacity is per sequence), and
    the chosen expert's probability (B, S, 1). Each expert gets C = min(S, expert_capacity)
    slots per sequence; the k-th token of a sequence routed to expert e fills slot k. A one-hot
    dispatch (B, S, E x C) gathers the tokens into a (B, E x C, d) buffer by batched matmul,
    each expert runs on its (B, C, d) slots (empty ones hold zeros), and the same one-hot
    scatters the results back, times the probability. Every token reaches the expert the
    original sends it to and comes back times the same probability (a one-hot matmul copies
    values exactly); a dropped token gets zeros, as in the original. So the result and its
    gradients are the original's, up to the rounding of the expert matmuls on more rows.
    (Batch stays dim 0 throughout, and no view is 4-D, which `fixed_mesh` would take for
    attention heads.)

    The original loops over the experts `nonzero` finds and runs each on the tokens
    `torch.where` picks: shapes that depend on the routing, which export cannot trace. Here
    every expert computes C slots per sequence whether they are filled or not, as the Switch
    Transformer does on accelerators; the plan prices that work.
    """
    seq = hidden_states.shape[1]
    selected, weights, _logits = self.router(hidden_states)  # (B, S, E), (B, S, 1), (B, S, E)
    num_experts = self.router.num_experts
    capacity = min(seq, int(self.router.expert_capacity))
    position = torch.cumsum(selected, dim=1) - 1  # slot of each kept token in its expert
    slots = torch.arange(capacity, device=hidden_states.device)
    dispatch = (selected.unsqueeze(-1) * (position.unsqueeze(-1) == slots))  # (B, S, E, C)
    dispatch = dispatch.flatten(2).to(hidden_states.dtype)  # (B, S, E * C)
    expert_in = torch.bmm(dispatch.transpose(1, 2), hidden_states)  # (B, E * C, d)
    expert_out = torch.cat([
        self.experts[f"expert_{e}"](expert_in[:, e * capacity:(e + 1) * capacity])
        for e in range(num_experts)
    ], dim=1).to(hidden_states.dtype)
    combined = torch.bmm(dispatch, expert_out)  # (B, S, d)
    return combined * weights


register(
    "transformers.models.switch_transformers.modeling_switch_transformers."
    "SwitchTransformersSparseMLP",
    switch_sparse_mlp_forward,
)
