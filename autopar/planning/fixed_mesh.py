"""Checks of what a user fixed before any search: a mesh, a microbatch size, a schedule. Each
failure is a MeshError that names what would divide."""

from __future__ import annotations

import math

import torch

from autopar.errors import MeshError
from autopar.layers import block_of
from autopar.parallelism import BATCH, DATA, OPS, PIPELINE, batch_ranks, sequence_ranks, splits
from autopar.planning import context_parallel
from autopar.schedules import get_schedule
from autopar.trace import TracedModel


def divisors_text(n: int) -> str:
    """"1, 2, 3, 6" for 6."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_divides(traced: TracedModel, mesh: dict[str, int], batch: int, microbatch_size: int,
                  n_layers: int, schedule: str | None, *, heads: bool = True) -> None:
    """Batch, heads and layers against a FIXED mesh (every searched axis present) and
    microbatch size. `heads=False` skips the heads: the intra-op ILP leaves heads whole where
    the ops axes do not divide them; only hand configurations split them."""
    pp, dp = mesh[PIPELINE], batch_ranks(mesh)
    ranks = " x ".join(f"{a}={n}" for a, n in mesh.items() if splits(a, BATCH) and n > 1) \
        or f"{DATA}=1"
    if batch % dp:
        raise MeshError(
            f"a batch of {batch} cannot be split over the data-parallel axes of mesh {mesh}: the "
            f"batch must divide by {dp}. Use a batch that divides, or a dp (x ep) that divides "
            f"{batch} ({divisors_text(batch)})."
        )
    if batch % (dp * microbatch_size):
        raise MeshError(
            f"a batch of {batch} cannot be split into {ranks} ranks x microbatches of "
            f"{microbatch_size}: {dp} x microbatch_size must divide {batch} (microbatch sizes that "
            f"divide {batch // dp if batch % dp == 0 else batch} per rank: "
            f"{divisors_text(batch // dp) if batch % dp == 0 else 'none: dp does not divide'}; "
            f"dp values that divide the batch: {divisors_text(batch)})"
        )
    context_parallel.check_sequence(traced, sequence_ranks(mesh))
    v = get_schedule(schedule).default_v(None) if (schedule and pp > 1) else 1
    if pp * v > n_layers:
        raise MeshError(
            f"pp={pp} x {v} stage(s) per rank needs at least {pp * v} layers, the model has "
            f"{n_layers} (pre, blocks, post): use pp <= {n_layers // v}"
        )
    ops_axes = {a: n for a, n in mesh.items() if splits(a, OPS) and n > 1}
    split = math.prod(ops_axes.values())
    bad = sorted(h for h in (_head_counts(traced) if heads else set()) if h % split)
    if split > 1 and bad:
        named = " x ".join(f"{a}={n}" for a, n in ops_axes.items())
        raise MeshError(
            f"{named} does not divide the {bad[0]} attention heads: use a "
            f"{' x '.join(ops_axes)} that divides {bad[0]} ({divisors_text(bad[0])})"
        )


_ATTENTION = (torch.ops.aten.scaled_dot_product_attention.default,)


def _head_counts(traced: TracedModel) -> set[int]:
    """Attention heads: dim 1 of scaled-dot-product attention's (B, H, T, D) query, key and
    value; in a model without it, dim 2 of 4-D (B, T, H, D) views inside repeated blocks that
    split the last dim of a (B, T, H x D) value (not, say, a mixture of experts' (B, E x N, C)
    buffers viewed as (B, E, N, C))."""
    heads = {int(a.meta["val"].shape[1])
             for n in traced.graph_module.graph.nodes if n.target in _ATTENTION
             for a in n.args[:3] if isinstance(a, torch.fx.Node)}
    if heads:
        return heads
    for n in traced.graph_module.graph.nodes:
        if n.op == "call_function" and "view" in str(n.target) and block_of(n, traced):
            v = n.meta.get("val")
            src = n.args[0].meta.get("val") if isinstance(n.args[0], torch.fx.Node) else None
            if (isinstance(v, torch.Tensor) and v.ndim == 4 and isinstance(src, torch.Tensor)
                    and src.ndim == 3 and tuple(v.shape[:2]) == tuple(src.shape[:2])
                    and v.shape[2] * v.shape[3] == src.shape[2]):
                heads.add(int(v.shape[2]))
    return heads
