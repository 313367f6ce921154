"""The vocabulary of parallelism that planning and the runtime share.

Planning (`autopar.planning`) decides, the runtime (`autopar.runtime`) carries out, and neither
imports the other: what both must agree on is here, as data.

    AXES            the mesh axes, outermost first: what each splits and where it sits
    FLAVOURS        the data-parallel flavours: what each shards and which collectives it issues
    POLICIES        activation checkpointing per layer, and the ops "selective" keeps
    RUNTIMES        how a planned model runs its ops
    BUCKET_BYTES    the size of one bucket of data-parallel collectives

A new mesh axis or flavour is one entry in `AXES` or `FLAVOURS`: the search enumerates an axis's
sizes, the cost model prices its collectives by what it splits and the link its position gives
it, the plan names it and the runtime builds its DeviceMesh from the plan. docs/architecture.md
walks through adding one (tests/test_toy_axis.py runs that walkthrough).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from autopar.errors import AutoparError, MeshError

# -- mesh axes ------------------------------------------------------------------------------------

# What an axis splits, which decides how every stage treats it:
LAYERS = "layers"  # pipeline stages: the stage cut ILP; stage boundaries sent point to point
BATCH = "batch"  # samples: inputs Shard(0) and parameters whole over it (or sharded by the
#                 data-parallel flavour); gradients reduced over it as the flavour says
SEQUENCE = "sequence"  # tokens: inputs Shard(1) (their sequence dim) and parameters whole over
#                 it, gradients all-reduced over it once a step; attention takes the queries
#                 split along the sequence and keys and values gathered (context parallelism)
OPS = "ops"  # each op's tensors, any way DTensor's rules allow, as the intra-op ILP chooses;
#              inputs arrive whole; resharding between ops priced per transition


@dataclass(frozen=True, kw_only=True)
class MeshAxis:
    """One axis of the device mesh.

    Attributes:
        name: the axis name in plans, meshes and the command line.
        splits: LAYERS, BATCH, SEQUENCE or OPS (above).
        searched: the search tries sizes for it, and a user may fix its size (`mesh=`). An axis
            that is not searched is made by something else (hybrid sharding's "dp_replicate").
        experts: a BATCH axis that also splits each mixture-of-experts layer's experts: their
            stacked weights (`TracedModel.experts`) are split on their expert dim over it, not
            held whole, and tokens reach their experts by all-to-all. Its sizes divide the
            model's expert count (1 for a model without experts).
        doc: one line for messages and docs.

    Its collectives are priced on the link its position gives it (`Cluster.axis_links`: an axis
    and every axis inside it that fit in one node talk over the intra-node link).
    """

    name: str
    splits: str
    searched: bool = True
    experts: bool = False
    doc: str


# Outermost first. Order matters: the runtime's DeviceMesh is laid out in this order, and inner
# axes get the fast intra-node links, so the axis that talks most (tp) is innermost.
AXES: tuple[MeshAxis, ...] = (
    MeshAxis(name="pp", splits=LAYERS, doc="pipeline parallel: layers cut into stages"),
    MeshAxis(name="dp_replicate", splits=BATCH, searched=False,
             doc="hybrid sharding's replicas, across nodes (made by the 'hsdp' flavour)"),
    MeshAxis(name="dp", splits=BATCH, doc="data parallel: the batch split over ranks"),
    MeshAxis(name="ep", splits=BATCH, experts=True,
             doc="expert parallel: the batch split over ranks as by dp, and each "
                 "mixture-of-experts layer's experts split over them"),
    MeshAxis(name="cp", splits=SEQUENCE,
             doc="context parallel: each sample's sequence split over ranks; attention "
                 "gathers keys and values"),
    MeshAxis(name="tp", splits=OPS, doc="tensor parallel: each op's tensors split over ranks"),
)

PIPELINE = "pp"  # the one LAYERS axis: always outermost, placements are not written for it
DATA = "dp"  # the searched BATCH axis: takes the ranks the other axes leave
DATA_REPLICAS = "dp_replicate"  # a hybrid flavour's replicas of the shard groups on DATA
TENSOR = "tp"  # the OPS axis Megatron-style tensor (and sequence) parallelism splits


def mesh_axis(name: str) -> MeshAxis:
    """The registered axis called `name`."""
    for a in AXES:
        if a.name == name:
            return a
    raise MeshError(f"unknown mesh axis {name!r}; the axes are {', '.join(axis_names())}")


def axis_names(*, searched: bool = False) -> tuple[str, ...]:
    """Names of the registered axes, outermost first (only those the search tries, if asked)."""
    return tuple(a.name for a in AXES if a.searched or not searched)


def splits(name: str, what: str) -> bool:
    """Whether axis `name` splits `what` (LAYERS, BATCH, SEQUENCE or OPS)."""
    return mesh_axis(name).splits == what


def full_mesh(mesh: dict[str, int], world_size: int) -> dict[str, int]:
    """`mesh` with every searched axis, outermost first, missing ones of size 1; an error
    names an unknown axis, a bad size, or sizes that do not multiply to the world size."""
    names = axis_names(searched=True)
    unknown = sorted(set(mesh) - set(names))
    if unknown:
        raise MeshError(f"mesh {mesh}: unknown axis name(s) {unknown}; use {', '.join(names)}")
    full = {name: mesh.get(name, 1) for name in names}
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in full.values()):
        raise MeshError(f"mesh {mesh}: axis sizes must be positive integers")
    check_world_size(mesh, world_size)
    return full


def check_world_size(mesh: dict[str, int], world_size: int, *, cluster: str = "the cluster") -> None:
    """The one check that a mesh's sizes multiply to the world size."""
    devices = math.prod(mesh.values())
    if devices != world_size:
        raise MeshError(
            f"mesh {mesh} has {devices} devices but {cluster} has {world_size}: the axis sizes "
            "must multiply to the world size."
        )


def sharding_mesh(mesh: dict[str, int]) -> dict[str, int]:
    """The axes placements are written for: all but the pipeline's."""
    return {a: n for a, n in mesh.items() if not splits(a, LAYERS)}


def intra_op_mesh(mesh: dict[str, int]) -> dict[str, int]:
    """The mesh one pipeline stage's ops are sharded over, as the intra-op ILP solves it: the
    sharding axes of size > 1 (a lone data-parallel axis of 1 when there are none)."""
    sub = {a: n for a, n in sharding_mesh(mesh).items() if n > 1}
    return sub or {DATA: 1}


def batch_ranks(mesh: dict[str, int]) -> int:
    """Ranks the batch is split over: the product of the axes that split it (dp, ep, and a
    hybrid flavour's dp_replicate). A microbatch size "per data-parallel rank" is per one of
    these."""
    return math.prod(n for a, n in mesh.items() if splits(a, BATCH))


def sequence_ranks(mesh: dict[str, int]) -> int:
    """Ranks each sample's sequence is split over: the product of the axes that split it."""
    return math.prod(n for a, n in mesh.items() if splits(a, SEQUENCE))


def balanced_causal_axis(query_placements, local_rows: int, is_causal: bool,
                         masked: bool) -> int | None:
    """The mesh axis on which attention with these query placements runs with its causal rows
    balanced (context parallelism, `runtime.attention.balanced_rows`), or None: queries split
    along the sequence (dim 2 of (B, H, T, D)) on exactly one axis, a causal mask and no other,
    and an even number of local rows (each rank's chunk cut in two halves). Balanced, rank r of
    n computes the half-chunks r and 2n-1-r of the 2n, one from each end of the sequence, so
    every rank does the same causal work (Megatron-Core's and Llama 3's layout; here the halves
    travel to their rank inside attention, by all-to-all, and back)."""
    axes = [a for a, p in enumerate(query_placements) if getattr(p, "dim", None) == 2]
    if len(axes) != 1 or not is_causal or masked or local_rows % 2:
        return None
    return axes[0]


def state_ranks(mesh: dict[str, int]) -> int:
    """Ranks that each hold a whole replica of the parameters while computing on different
    data: dp and the axes that split the sequence (cp). A flavour that shards state divides it
    over all of them (as Megatron-Core's distributed optimizer shards over dp x cp); a hybrid
    one over its dp group only."""
    return mesh.get(DATA, 1) * sequence_ranks(mesh)


def splits_experts(name: str) -> bool:
    """Whether axis `name` splits mixture-of-experts layers' experts."""
    return mesh_axis(name).experts


def inner_size(mesh: dict[str, int], name: str) -> int:
    """Devices on the axes inside `name` (after it in `mesh`): one `name` rank's group."""
    axes = list(mesh)
    return math.prod(mesh[a] for a in axes[axes.index(name) + 1:])


# -- data-parallel flavours -----------------------------------------------------------------------

# Collective.over: the group a data-parallel collective runs on
ALL_DP = "dp"  # every data-parallel rank
SHARD_GROUP = "shard"  # the ranks one parameter is sharded over (all dp ranks, or hsdp's group)
REPLICAS = "replicas"  # hybrid sharding's replicas: one rank of each shard group


@dataclass(frozen=True)
class Collective:
    """One data-parallel collective per parameter: when it runs (once per "step", or in each
    microbatch's "forward" or "backward"), which collective, on what ("gradients", "weights", or
    "gradient_shard": a gradient's shard after the reduce-scatter), over which group."""

    when: str
    kind: str
    of: str
    over: str


@dataclass(frozen=True, kw_only=True)
class DataParallelFlavour:
    """How parameters, gradients and optimizer state live on the data-parallel ranks.

    Attributes:
        name: as in plans (`Plan.data_parallel`) and `autopar.plan(data_parallel=...)`.
        shards_state: parameters, gradients and optimizer state are divided over the shard
            group (FSDP2's `fully_shard`); the plan shows S(d) on "dp" for such parameters.
        regathers: weights are gathered for each use and dropped after forward, so backward
            gathers them again (FSDP2's reshard_after_forward). Without it, a sharding flavour
            keeps forward's gathered weights until backward (memory, like activations).
        hybrid: the data-parallel ranks form replicas x shard groups, a shard group inside
            one node (HSDP): the plan's mesh gets "dp_replicate" outside "dp".
        collectives: what it issues per parameter, as the runtime does; the cost model prices
            each on its group's link.
        zero_stages: the `manual_plan(zero=...)` values that mean this flavour.
        source: where it comes from.
    """

    name: str
    shards_state: bool
    regathers: bool
    hybrid: bool = False
    collectives: tuple[Collective, ...]
    zero_stages: tuple[int, ...]
    source: str

    @property
    def keeps_gathered_weights(self) -> bool:
        """Forward's gathered weights live until backward (sharded, not regathered: ZeRO-2)."""
        return self.shards_state and not self.regathers


_GATHER_WEIGHTS = Collective("forward", "all_gather", "weights", SHARD_GROUP)
_REGATHER_WEIGHTS = Collective("backward", "all_gather", "weights", SHARD_GROUP)
_SCATTER_GRADIENTS = Collective("backward", "reduce_scatter", "gradients", SHARD_GROUP)

FLAVOURS: tuple[DataParallelFlavour, ...] = (
    DataParallelFlavour(
        name="replicate", shards_state=False, regathers=False,
        collectives=(Collective("step", "all_reduce", "gradients", ALL_DP),),
        zero_stages=(0,), source="DDP: one all-reduce of the accumulated gradients a step"),
    DataParallelFlavour(
        name="zero2", shards_state=True, regathers=False,
        collectives=(_GATHER_WEIGHTS, _SCATTER_GRADIENTS),
        zero_stages=(1, 2),  # ZeRO-1 is planned as ZeRO-2
        source="Rajbhandari et al. 2020 (ZeRO), sec. 5; FSDP2 without reshard after forward"),
    DataParallelFlavour(
        name="zero3", shards_state=True, regathers=True,
        collectives=(_GATHER_WEIGHTS, _REGATHER_WEIGHTS, _SCATTER_GRADIENTS),
        zero_stages=(3,), source="Rajbhandari et al. 2020 (ZeRO-3); FSDP2 fully_shard"),
    DataParallelFlavour(
        name="hsdp", shards_state=True, regathers=True, hybrid=True,
        collectives=(_GATHER_WEIGHTS, _REGATHER_WEIGHTS, _SCATTER_GRADIENTS,
                     Collective("backward", "all_reduce", "gradient_shard", REPLICAS)),
        zero_stages=(), source="FSDP2 on a 2-D mesh (HSDP): ZeRO-3 in a node, replicas across"),
)

REPLICATE = "replicate"


def flavour_names() -> tuple[str, ...]:
    return tuple(f.name for f in FLAVOURS)


def get_flavour(name: str) -> DataParallelFlavour:
    """The flavour called `name`; an AutoparError lists the flavours otherwise."""
    for f in FLAVOURS:
        if f.name == name:
            return f
    raise AutoparError(f"data_parallel={name!r}: use one of {flavour_names()}")


def hybrid_flavour() -> DataParallelFlavour:
    """The flavour `manual_plan(dp_shard=...)` means: the hybrid one."""
    return next(f for f in FLAVOURS if f.hybrid)


def flavour_of_zero_stage(zero: int) -> DataParallelFlavour:
    """The flavour `manual_plan(zero=...)` means (0 replicate, 1 and 2 zero2, 3 zero3)."""
    for f in FLAVOURS:
        if zero in f.zero_stages:
            return f
    stages = sorted(z for f in FLAVOURS for z in f.zero_stages)
    raise AutoparError(f"zero={zero!r}: use {', '.join(map(str, stages[:-1]))} or {stages[-1]}")


# -- checkpointing, runtimes, buckets -------------------------------------------------------------

# Per layer: "none"; "full" keeps only the layer's inputs and recomputes its forward in
# backward; "selective" also keeps the outputs of the ops below (Korthikanti et al. 2022,
# section 5) and recomputes the cheap ones (elementwise, norms, views, resharding).
POLICIES = ("none", "full", "selective")

_aten = torch.ops.aten

# What "selective" keeps, as the checkpoint sees the ops at run time: below autograd, where
# linear is already addmm/mm and scaled_dot_product_attention the fused kernel it picked.
KEEP = frozenset(
    getattr(_aten, name).default
    for name in (
        "mm", "addmm", "bmm", "baddbmm", "convolution",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward", "_efficient_attention_forward",
    )
    if hasattr(_aten, name)
)

# The same ops as they appear in the traced graph (what the planner counts).
KEEP_IN_GRAPH = frozenset(KEEP | {_aten.scaled_dot_product_attention.default,
                                  _aten.linear.default})

# How a model's ops run: "replay" traces each layer once and replays it; "eager" runs every op
# through DTensor every step (slower on the host; for debugging).
RUNTIMES = ("replay", "eager", "compile")

# Data-parallel collectives go out a bucket at a time (one collective for many weights), in
# the replayed graphs and in the gradient buckets; the cost model shares each bucket's latency.
BUCKET_BYTES = 64 * 2**20


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise AutoparError(f"unknown runtime {runtime!r}; use one of {RUNTIMES}")
    return runtime


def check_policies(checkpointing: dict[str, str]) -> None:
    """Reject what the runtime cannot run, before any process starts training."""
    for layer, how in checkpointing.items():
        if how not in POLICIES:
            raise AutoparError(
                f"layer {layer!r}: unknown checkpoint policy {how!r}; use one of {POLICIES}"
            )
