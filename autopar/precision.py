"""One knob for precision: what the user says (`None`, a name such as "bf16-mixed", or an
`autopar.TrainingPrecision`) becomes one TrainingPrecision, and the model is traced in its
compute dtype, whatever dtype it was built in.

    resolve(precision, model)      -> TrainingPrecision (None: follows the model's own dtype)
    compute_view(model, dtype)     -> a context in which the model's floating parameters and
                                      buffers are meta tensors of `dtype` (no memory)

The planner traces and prices the graph the runtime will run: an fp32 model planned for
"bf16-mixed" is traced as if `model.to(torch.bfloat16)` had been called, on meta tensors, so
neither a copy of the weights nor the user's model changes. The runtime then holds the weights
in that dtype (its compute copies) and keeps fp32 masters from the model's own values.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from autopar.errors import AutoparError
from autopar.planning.training_precision import PRECISION_NAMES, TrainingPrecision

# the precision a model built in a dtype trains in when none is given: bf16 weights train on
# fp32 masters (pure bf16 AdamW loses small updates), fp32 ones in fp32
_DEFAULT_FOR_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16-mixed"}


def resolve(precision, model: nn.Module | None = None) -> TrainingPrecision:
    """The TrainingPrecision `precision` names; None follows the dtype of `model`'s floating
    parameters (fp32 -> "fp32", bf16 -> "bf16-mixed")."""
    if isinstance(precision, TrainingPrecision):
        return precision
    if isinstance(precision, str):
        try:
            return TrainingPrecision.named(precision)
        except ValueError as e:
            raise AutoparError(str(e)) from None
    if precision is not None:
        raise AutoparError(f"precision={precision!r}: give a name ({', '.join(PRECISION_NAMES)}) "
                           "or an autopar.TrainingPrecision")
    dtype = model_dtype(model) if model is not None else torch.float32
    if dtype not in _DEFAULT_FOR_DTYPE:
        raise AutoparError(
            f"the model is built in {dtype}, which autopar does not train in by default (fp16 "
            "needs loss scaling): build it in float32 or bfloat16, or pass precision= "
            f"({', '.join(PRECISION_NAMES)})")
    return TrainingPrecision.named(_DEFAULT_FOR_DTYPE[dtype])


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating parameters (the most common one; fp32 without any)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


@contextlib.contextmanager
def compute_view(model: nn.Module, dtype: torch.dtype):
    """Within it, `model`'s floating parameters and buffers are meta tensors of `dtype`
    (parameters keep requires_grad; tied ones stay tied): tracing sees the model as
    `model.to(dtype)` would make it, without a copy. Does nothing when they already are."""
    floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if all(t.dtype == dtype for t in floating):
        yield
        return
    from torch.nn.utils.stateless import _reparametrize_module

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to("meta").to(dtype) if t.is_floating_point() else t.to("meta")

    state = {name: nn.Parameter(cast(p), requires_grad=p.requires_grad)
             for name, p in model.named_parameters()}
    state.update({name: cast(b) for name, b in model.named_buffers()})
    with _reparametrize_module(model, state, tie_weights=True):
        yield
