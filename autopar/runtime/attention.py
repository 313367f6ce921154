"""Scaled-dot-product attention in the replay runtime: the kernel eager would run.

`aten.scaled_dot_product_attention` is a composite op: each call asks torch's kernel selector
(`torch._fused_sdp_choice`) which backend the inputs allow (cuDNN, flash, memory-efficient, or
the math fallback) and calls that backend's op. The replay runtime traces each layer once on
fake tensors (`replay.trace_once`), so the selector runs then, on the fakes, and the graph
replayed every step keeps whatever it said. On an H100 (torch 2.11) HF ViT-1B's attention
(head dim 88, 257 tokens, no mask) was replayed as the math fallback while eager ran cuDNN on
the same layouts: fp32 batched matmuls and softmax, about 4x eager's attention time, and score
matrices the plan never priced (docs/benchmarks/2026-12-05-hf-one-h100/). The memory-efficient
kernel takes fp32 and head dim 88, so the refusal was not about dtype or head size; which check
refused the traced tensors is not yet seen on a GPU (CPUs choose the same on fakes as on real
tensors). Choosing on real tensors takes the trace out of the choice, whatever that check is.
On an H200 (torch 2.11) the replay then ran cuDNN attention for HF ViT-1B, Llama-1B and
BERT-1B, the kernels eager ran, in the same time (docs/benchmarks/2026-12-06-hf-one-gpu/).

`attention(...)` asks the selector about real tensors of the inputs' shapes, strides, dtypes and
devices (allocated, never computed on, and remembered per layout), and calls the op of the
backend it names, as the composite does. Only what the composite does without extra work is
done here (no head-dim padding, no boolean or padded masks); the rest goes to the composite
(which then chooses on the fakes, as before). `seen` records each layout asked about and the
backend chosen, for benchmarks to report.
This file holds the torch internals it reads (the selector, the backend ops' signatures).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed._local_tensor import maybe_run_for_local_tensor
from torch.utils._python_dispatch import _disable_current_modes

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

# torch.nn.attention.SDPBackend's values, as `torch._fused_sdp_choice` returns them
MATH, FLASH, EFFICIENT, CUDNN = 0, 1, 2, 3
COMPOSITE = -1  # not chosen here: the composite op chooses (on the fakes, when traced)
NAMES = {MATH: "math", FLASH: "flash", EFFICIENT: "efficient", CUDNN: "cudnn",
         COMPOSITE: "composite"}

# the kernel choice on fake tensors is the composite's own (tests compare against it)
enabled = True

# every layout asked about, as (shapes, strides, dtype, device, dropout, causal, mask) -> the
# backend chosen: what a benchmark reports as the attention kernel the replay runs
seen: dict[tuple, int] = {}


def replay_target(target):
    """What the runtime calls for graph op `target`: SDPA through `attention`."""
    return attention if target is SDPA and enabled else target


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
              scale=None, enable_gqa=False):
    """`aten.scaled_dot_product_attention` with the backend chosen as for real tensors."""
    if attn_mask is not None and not attn_mask.is_floating_point():
        # a boolean mask: the composite converts it for each backend its own way
        seen[(tuple(tuple(t.shape) for t in (query, key, value, attn_mask)),
              tuple(tuple(t.stride()) for t in (query, key, value, attn_mask)),
              str(query.dtype), str(query.device), float(dropout_p), bool(is_causal),
              True)] = COMPOSITE
        return SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                    enable_gqa=enable_gqa)
    backend = choice(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    device = query.device.type
    if backend == CUDNN and device == "cuda":
        return aten._scaled_dot_product_cudnn_attention(
            query, key, value, attn_mask, lse, dropout_p, is_causal, False, scale=scale)[0]
    if backend == FLASH and device == "cuda" and attn_mask is None and query.size(-1) % 8 == 0:
        return aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if backend == FLASH and device == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    if backend == EFFICIENT and device == "cuda" and attn_mask is None and not enable_gqa:
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, None, lse, dropout_p, is_causal, scale=scale)[0]
    if backend == MATH:
        return aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale,
            enable_gqa=enable_gqa)[0]
    return SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                enable_gqa=enable_gqa)


def query_rows(first_row: int):
    """`attention` for queries that are rows `first_row`, `first_row + 1`, ... of the sequence
    and keys and values that are all of it (context parallelism: each rank holds a slice of the
    queries and gathers the keys and values). A causal mask is then the sequence's, not the
    local block's top-left triangle: query row i sees key j when j <= first_row + i."""

    def run(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
            enable_gqa=False):
        # (a per-rank first row of simulated ranks is not an int: it takes the mask too)
        whole = isinstance(first_row, int) and first_row == 0 and query.size(-2) == key.size(-2)
        if is_causal and not whole:
            rows = torch.arange(query.size(-2), device=query.device) + first_row
            cols = torch.arange(key.size(-2), device=query.device)
            attn_mask, is_causal = cols[None, :] <= rows[:, None], False
        return attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                         enable_gqa=enable_gqa)

    return run


def balanced_rows(group, rank: int, size: int):
    """`attention` for causal queries split along the sequence over `size` ranks of `group`
    (this one is `rank`), keys and values whole, with the causal work balanced
    (`parallelism.balanced_causal_axis`). The rank's chunk of rows is cut in two halves, and
    each half goes by all-to-all to the rank that computes it: half-chunk j of the 2n to rank
    j if j < n, else to rank 2n-1-j, so rank r computes halves r and 2n-1-r, one from each end
    of the sequence. Each half reads only the keys up to its last row, masked inside that last
    block, so a rank's work is (2n+1)/(4n^2) of the unmasked attention, the same on every rank
    (causal attention's own share is about 1/(2n)). The outputs go back the same way.

    Written SPMD: every rank runs the same ops, and what depends on the rank (split sizes, a
    swap of the halves, how many keys each half reads) is ints from `_balanced_layout`, so
    simulated ranks (LocalTensorMode, where the rank is a per-rank int) run it too."""
    n = size
    layout = _balanced_layout(rank, n)
    swap, to, back, ends = layout[0], layout[1:n + 1], layout[n + 1:2 * n + 1], layout[-2:]

    def run(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
            enable_gqa=False):
        h = query.size(-2) // 2
        sends, receives = [t * h for t in to], [b * h for b in back]
        # this rank's halves 2r, 2r+1, in the order of the ranks they go to
        sent = query.movedim(-2, 0).roll(swap * h, 0).contiguous()
        mine = funcol.all_to_all_single_autograd(sent, receives, sends, group).movedim(0, -2)
        # received in source order: half r, then half 2n-1-r (held by ranks r//2 <= (2n-1-r)//2)
        outs = []
        for piece, last in zip(mine.split(h, dim=-2), ends):
            end = last * h
            # the keys up to this half's last row; a per-rank int (simulated ranks) cannot size
            # a view, so there all the keys are read, masked past those rows: the same values
            seen = end if isinstance(end, int) else key.size(-2)
            rows = torch.arange(h, device=query.device) + (end - h)
            cols = torch.arange(seen, device=query.device)
            outs.append(attention(piece, key[..., :seen, :], value[..., :seen, :],
                                  cols[None, :] <= rows[:, None], dropout_p, False,
                                  scale=scale, enable_gqa=enable_gqa))
        out = torch.cat(outs, dim=-2).movedim(-2, 0).contiguous()
        home = funcol.all_to_all_single_autograd(out, sends, receives, group)
        return home.roll(-swap * h, 0).movedim(0, -2)

    return run


@maybe_run_for_local_tensor
def _balanced_layout(rank: int, n: int) -> tuple[int, ...]:
    """Rank `rank`'s part in `balanced_rows`, in half-chunks: (swap, halves it sends to each
    rank ..., halves it receives from each rank ..., the half-chunks of keys its first computed
    half reads, its second's). A flat tuple of ints: simulated ranks combine each entry into one
    per-rank int."""
    def owner(j):  # the rank that computes half-chunk j
        return min(j, 2 * n - 1 - j)

    held, wanted = (2 * rank, 2 * rank + 1), (rank, 2 * n - 1 - rank)
    swap = int(owner(held[0]) > owner(held[1]))
    to = [sum(owner(j) == d for j in held) for d in range(n)]
    back = [sum(j // 2 == s for j in wanted) for s in range(n)]
    ends = [j + 1 for j in wanted]
    return (swap, *to, *back, *ends)


def choice(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> int:
    """The backend torch's selector picks for real tensors laid out as these."""
    tensors = (query, key, value) + ((attn_mask,) if attn_mask is not None else ())
    layout = tuple((tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t.requires_grad)
                   for t in tensors)
    chosen = _choice(layout, float(dropout_p), bool(is_causal), scale, bool(enable_gqa),
                     torch.is_grad_enabled())
    seen[(tuple(shape for shape, *_ in layout), tuple(stride for _, stride, *_ in layout),
          str(query.dtype), str(query.device), float(dropout_p), bool(is_causal),
          attn_mask is not None)] = chosen
    return chosen


@functools.lru_cache(maxsize=256)
def _choice(layout, dropout_p, is_causal, scale, enable_gqa, grad) -> int:
    if any(device.type == "meta" for _, _, _, device, _ in layout):
        return MATH
    with _disable_current_modes(), torch.set_grad_enabled(grad):  # real tensors, not fakes
        real = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                .requires_grad_(requires_grad and dtype.is_floating_point)
                for shape, stride, dtype, device, requires_grad in layout]
        mask = real[3] if len(real) > 3 else None
        return int(torch._fused_sdp_choice(real[0], real[1], real[2], mask, dropout_p,
                                           is_causal, scale=scale, enable_gqa=enable_gqa))
