"""Running a list of graph ops layer by layer, with activation checkpointing where planned.

Both runtimes (`compile.ParallelModel`, `pipeline_runtime.StageModule`) run ops through
`run_layers`: consecutive ops of one layer form a group; a group whose layer the plan
checkpoints runs under `torch.utils.checkpoint` (non-reentrant):

    "full"       keep only the layer's inputs, recompute everything in backward
    "selective"  also keep the outputs of the expensive ops (matmuls, attention: `KEEP`),
                 recompute the cheap ones (elementwise, norms, views, resharding) -- Korthikanti
                 et al. 2022, section 5 -- with torch's selective checkpointing
                 (`create_selective_checkpoint_contexts`).

The planner charges the same: `search.layer_costs` keeps the outputs of the graph ops in
`KEEP_IN_GRAPH` for "selective" and recomputes the rest of the layer's forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import fx
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from autopar.errors import AutoparError

aten = torch.ops.aten

# Ops whose outputs "selective" keeps, as the checkpoint sees them at run time: below autograd,
# where linear is already addmm/mm and scaled_dot_product_attention the fused kernel it picked.
KEEP = frozenset(
    getattr(aten, name).default
    for name in (
        "mm", "addmm", "bmm", "baddbmm", "convolution",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward", "_efficient_attention_forward",
    )
    if hasattr(aten, name)
)

# The same ops as they appear in the traced graph (what the planner counts).
KEEP_IN_GRAPH = frozenset(
    KEEP | {aten.scaled_dot_product_attention.default, aten.linear.default}
)

POLICIES = ("none", "full", "selective")


def check_policies(checkpointing: dict[str, str]) -> None:
    """Reject what the runtime cannot run, before any process starts training."""
    for layer, how in checkpointing.items():
        if how not in POLICIES:
            raise AutoparError(
                f"layer {layer!r}: unknown checkpoint policy {how!r}; use one of {POLICIES}"
            )


def run_layers(
    nodes: list[fx.Node],
    env: dict[fx.Node, object],
    run_node: Callable[[fx.Node, dict], None],
    layer_of: dict[str, str],
    checkpointing: dict[str, str],
) -> None:
    """Run `nodes` in order into `env` (node -> value); `run_node(n, env)` runs one op."""
    for group in _groups(nodes, layer_of):
        how = checkpointing.get(layer_of[group[0].name], "none")
        if how == "none":
            for n in group:
                run_node(n, env)
        else:
            _run_checkpointed(group, env, run_node, how)


def _groups(nodes, layer_of) -> list[list[fx.Node]]:
    groups: list[list[fx.Node]] = []
    for n in nodes:
        if groups and layer_of[groups[-1][0].name] == layer_of[n.name]:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def _run_checkpointed(group, env, run_node, how: str) -> None:
    inside = set(group)
    reads = list(dict.fromkeys(
        a for n in group for a in n.all_input_nodes if a not in inside and a in env
    ))
    outside = {a: env[a] for n in group for a in n.all_input_nodes if a not in inside}

    def layer_fn(*values):
        local = {**outside, **dict(zip(reads, values))}
        for n in group:
            run_node(n, local)
        return tuple(local[n] for n in group)

    extra = {}
    if how == "selective":
        extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_policy)
    results = checkpoint(layer_fn, *[env[r] for r in reads], use_reentrant=False, **extra)
    env.update(zip(group, results))


def _keep_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEEP else CheckpointPolicy.PREFER_RECOMPUTE
