"""Context parallelism as planning sees it: the "cp" axis (`parallelism.SEQUENCE`) splits each
sample's sequence, for long sequences whose activations do not fit.

    sequence_length     the sequence a model's inputs share (their dim 1), or None
    check_sequence      a MeshError unless cp divides that sequence
    search_sizes        the cp sizes the search tries for a model on a cluster
    priced_attention    the attention shape an op strategy's time is priced at

What the axis does (Liu et al. 2023, ring attention; Llama 3's all-gathered keys and values,
Dubey et al. 2024, sec. 3.3.2): the token inputs arrive split along dim 1 (`intra_op`), so
every op of a layer that works token by token (embeddings, matmuls, norms, RoPE with its
tables split alike) runs on 1/cp of the tokens with no communication. Attention is the one op
that mixes tokens: its rule (`op_rules._sdpa`) takes the queries split along the sequence and
the keys and values whole, gathered over cp by DTensor (all-gather forward, reduce-scatter of
their gradients backward, both priced as resharding), and the runtime masks each rank's query
rows by where they sit (`runtime.attention.query_rows`). Parameters are whole over cp; their
gradients are summed over it once a step (`layer_costs`), as ep's are.

Causal attention is balanced where the queries are split on one axis: each rank computes one
half-chunk of rows from each end of the sequence (`parallelism.balanced_causal_axis`), each
against the keys up to its last row, so all ranks do the same work, (2cp+1)/(4cp^2) of the
unmasked attention (`work_share`), for two all-to-alls of the queries' halves and the outputs
each way (`exchange_s`). Where it is not balanced (queries split on two axes), each rank's
rows run as one dense masked block: 1/cp of the unmasked attention.

Not done yet: ring attention (keys and values passed round a ring, overlapped with compute);
keys and values are gathered whole, so one rank holds all of them for a layer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx
from torch.distributed.tensor import Shard

from autopar import parallelism
from autopar.errors import MeshError
from autopar.planning import cost
from autopar.planning.profile import Attention, OpProfile
from autopar.planning.strategies import shard_factor
from autopar.trace import TracedModel

_SDPA = torch.ops.aten.scaled_dot_product_attention.default

# cp is tried when one sample's activations, unsharded, take more than this share of a
# device's memory: then tp within a node alone leaves little room (Llama 3 8B at 8K tokens
# holds about 36 GiB a sample in bf16; at 2K, 9 GiB, and cp is not tried on 80 GB devices)
_ACTIVATIONS_BIND = 0.25
# the fewest tokens of a sample the search leaves a cp rank: below it, each rank's attention is
# too small a piece of work for cp's per-layer all-gather and exchange to pay, and a shorter
# sequence's activations are held down by tp, pp and checkpointing (Megatron-Core and Llama 3
# use cp from 8K-token sequences on, 1K+ tokens a rank). A bound on the search space, not a
# measured crossover: manual_plan takes any cp. Without it, a 64-token Llama under a tight
# limit (tests/planning/test_search_grid.py) tried cp 2 to 8 on 8 GPUs for the same plan, at
# several times the planning time
MIN_TOKENS_PER_RANK = 512


def sequence_length(traced: TracedModel) -> int | None:
    """The sequence length the model's inputs share: dim 1 of each input with two or more dims,
    when there is a (batch, tokens) integer input (token ids) and every such input agrees.
    None for models without one (images, or inputs of different lengths, such as T5's
    encoder and decoder): cp does not apply to them."""
    vals = [traced.node(name).meta["val"] for name in traced.inputs]
    vals = [v for v in vals if isinstance(v, torch.Tensor) and v.ndim >= 2]
    if not any(v.ndim == 2 and not v.dtype.is_floating_point for v in vals):
        return None
    lengths = {int(v.shape[1]) for v in vals}
    return lengths.pop() if len(lengths) == 1 else None


def check_sequence(traced: TracedModel, cp: int) -> None:
    """A MeshError unless the model has a sequence (`sequence_length`) that cp divides."""
    if cp == 1:
        return
    length = sequence_length(traced)
    if length is None:
        shapes = ", ".join(f"{name} {tuple(traced.node(name).meta['val'].shape)}"
                           for name in traced.inputs)
        raise MeshError(
            f"cp={cp}: context parallelism splits a sequence of tokens, and this model's inputs "
            f"({shapes}) have none: it needs (batch, tokens) token ids, with every other input "
            "of two or more dims as long. Use cp=1.")
    if length % cp:
        raise MeshError(
            f"cp={cp} does not divide the sequence of {length} tokens: use a cp that does "
            f"({', '.join(str(d) for d in range(1, length + 1) if length % d == 0 and d <= 64)}"
            f"{', ...' if length > 64 else ''})")


def searched(cp: int, sequence: int) -> bool:
    """Whether the search tries `cp` for a sequence of `sequence` tokens (0: cp is not tried):
    a divisor leaving each rank at least `MIN_TOKENS_PER_RANK` of them. cp=1 always."""
    return cp == 1 or (sequence > 0 and sequence % cp == 0
                       and sequence // cp >= MIN_TOKENS_PER_RANK)


def search_sizes(traced: TracedModel, batch: int, memory_bytes: float) -> int:
    """The sequence length whose divisors the search tries as cp (`search.candidate_meshes`),
    or 0 (cp stays 1): only for a model with a sequence, and only when one sample's forward
    values (`activation_bytes_per_sample` of `traced`, a trace of `batch` samples) exceed
    `_ACTIVATIONS_BIND` of `memory_bytes`. Below that, splitting the batch, tp and
    checkpointing hold activations down at less cost."""
    length = sequence_length(traced)
    if length is None:
        return 0
    per_sample = activation_bytes_per_sample(traced, batch)
    return length if per_sample > _ACTIVATIONS_BIND * memory_bytes else 0


def activation_bytes_per_sample(traced: TracedModel, batch: int) -> float:
    """Bytes of the floating-point values forward computes (views and the values computed
    without the batch left out), per sample: an upper bound on what backward saves, read off
    the graph without profiling it."""
    total = 0.0
    for n in traced.graph_module.graph.nodes:
        v = n.meta.get("val")
        if (n.op == "call_function" and isinstance(v, torch.Tensor) and v.dtype.is_floating_point
                and not getattr(n.target, "is_view", False) and v.ndim and v.shape[0] == batch):
            total += v.numel() * v.element_size()
    return total / max(batch, 1)


def splits_queries(n: fx.Node, strategy) -> bool:
    """Whether `strategy` of attention node `n` splits the queries along the sequence."""
    return (n.target is _SDPA and bool(strategy.inputs)
            and any(isinstance(p, Shard) and p.dim == 2 for p in strategy.inputs[0]))


def _balanced_axis(n: fx.Node, strategy, shape) -> int | None:
    """The mesh axis attention node `n` runs balanced on under `strategy`, as the runtime
    decides it (`parallelism.balanced_causal_axis`), or None."""
    if not splits_queries(n, strategy):
        return None
    q = n.args[0].meta["val"]
    args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"),
                    n.args)) | n.kwargs
    rows = q.shape[2] // shard_factor(tuple(p if getattr(p, "dim", None) == 2 else None
                                            for p in strategy.inputs[0]), shape)
    return parallelism.balanced_causal_axis(strategy.inputs[0], rows,
                                            bool(args.get("is_causal", False)),
                                            args.get("attn_mask") is not None)


def work_share(n: fx.Node, strategy, shape) -> float:
    """What a balanced attention's split work comes to against a plain split over its axis of
    m ranks: each rank computes (2m+1)/(4m^2) of the unmasked attention, not 1/m."""
    axis = _balanced_axis(n, strategy, shape)
    if axis is None:
        return 1.0
    m = shape[axis]
    return 4 * m / (2 * m + 1)


def exchange_s(n: fx.Node, strategy, shape, links) -> float:
    """The all-to-alls of a balanced attention: its queries' halves to the ranks that compute
    them and the outputs back, forward, and their gradients backward (each priced as the
    rank's whole local queries sent)."""
    axis = _balanced_axis(n, strategy, shape)
    if axis is None:
        return 0.0
    q = n.args[0].meta["val"]
    local = q.numel() * q.element_size() / shard_factor(strategy.inputs[0], shape)
    return 4 * cost.collective_time_s("all_to_all", local, shape[axis], links[axis])


def priced_attention(n: fx.Node, prof: OpProfile, strategy) -> Attention | None:
    """The attention shape op `n` is priced at under `strategy`: a causal attention whose
    queries are split along the sequence runs as masked blocks on each rank (no blocks
    skipped inside them), so it is priced as unmasked attention (of which a balanced one does
    a share, `work_share`)."""
    a = prof.attention
    if a is not None and a.causal and splits_queries(n, strategy):
        return dataclasses.replace(a, causal=False, masked=True)
    return a


def axes(mesh: dict[str, int]) -> tuple[str, ...]:
    """The axes of `mesh` that split the sequence, of size > 1."""
    return tuple(a for a, n in mesh.items() if n > 1 and parallelism.splits(a, parallelism.SEQUENCE))
