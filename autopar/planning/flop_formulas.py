"""FLOP counts FlopCounterMode lacks, for `profile`: the CPU flash-attention kernels (counted as
their GPU siblings) and grouped matmuls (mixture-of-experts layers' experts, which would
otherwise count as free). Adding one: a formula over the op's argument shapes, in
`_FLOP_FORMULAS` (ATen ops) or `_LIBRARY_FLOP_FORMULAS` (ops of libraries autopar does not
import, by name)."""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten


def _sdpa_fwd_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Same count as torch.utils.flop_counter.sdpa_flop_count: the two matmuls q @ k^T and
    # p @ v, 2 FLOPs per multiply-add; causal masking is not discounted (as FlopCounterMode).
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (d_q + d_v)


def _sdpa_bwd_flops(
    grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    # Same count as torch.utils.flop_counter.sdpa_backward_flop_count: five matmuls, the
    # scores recomputed (q k^T), dP = dO v^T, dV = P^T dO, dQ = dS k, dK = dS^T q.
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * (3 * d_q + 2 * d_v)


def _grouped_mm_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # A grouped matmul (mixture-of-experts layers: each row of `input` times its group's
    # matrix) does one row's product per row, whatever the groups: 2 * rows * K * N for
    # (S, K) x (E, K, N), and the same count, 2 * numel(input) * N, for its other layouts
    # ((K, S) x (S, N) -> (E, K, N) in backward; (E, M, K) x (E, K, N)).
    return 2 * math.prod(input_shape) * weight_shape[-1]


def _grouped_mm_backward_flops(input_shape, weight_shape, offs_shape, grad_shape, *args,
                               out_shape=None, **kwargs) -> int:
    return 2 * _grouped_mm_flops(input_shape, weight_shape)  # input's and weight's gradients


# FlopCounterMode has no formula for the CPU flash kernel (counted as its GPU siblings) nor for
# grouped matmuls, which would count mixture-of-experts layers' experts as free.
_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_fwd_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd_flops,
    aten._grouped_mm: _grouped_mm_flops,
}
# ops of libraries autopar does not import: (namespace, op) -> formula, used once registered.
# transformers runs its experts' grouped matmul as this custom op where torch's kernel does not
# take the inputs (CPUs, fp32 weights), with its own backward op.
_LIBRARY_FLOP_FORMULAS = {
    ("transformers", "grouped_mm_fallback"): _grouped_mm_flops,
    ("transformers", "grouped_mm_fallback_backward"): _grouped_mm_backward_flops,
}


def flop_formulas() -> dict:
    """`_FLOP_FORMULAS` and the library ops of `_LIBRARY_FLOP_FORMULAS` registered by now. Called
    for every op profiled: a library op found once stays in `_FLOP_FORMULAS`, so only those
    not yet registered are looked up again."""
    for (namespace, name), formula in list(_LIBRARY_FLOP_FORMULAS.items()):
        if torch._C._dispatch_has_kernel(f"{namespace}::{name}"):
            _FLOP_FORMULAS[getattr(getattr(torch.ops, namespace), name)] = formula
            del _LIBRARY_FLOP_FORMULAS[namespace, name]
    return _FLOP_FORMULAS
