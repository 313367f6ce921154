"""Running a list of graph ops layer by layer, with activation checkpointing where planned.

Both runtimes (`compile.ParallelModel`, `pipeline_runtime.StageModule`) run ops through
`run_layers`: consecutive ops of one layer form a group; a group whose layer the plan
checkpoints runs under `torch.utils.checkpoint` (non-reentrant):

    "full"       keep only the layer's inputs, recompute everything in backward
    "selective"  also keep the outputs of the expensive ops (matmuls, attention), recompute the
                 cheap ones (elementwise, norms, views) -- Korthikanti et al. 2022, section 5.
                 Not run yet: torch's selective-checkpoint cache refuses a second backward
                 through our DTensor regions; such a plan is rejected with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx
from torch.utils.checkpoint import checkpoint

from autopar.errors import AutoparError


def check_policies(checkpointing: dict[str, str]) -> None:
    """Reject what the runtime cannot run, before any process starts training."""
    for layer, how in checkpointing.items():
        if how == "selective":
            raise AutoparError(
                f"layer {layer!r} is planned with selective checkpointing, which autopar does not "
                "run yet; re-plan with checkpoint='full' (or 'none') for it."
            )
        if how not in ("none", "full"):
            raise AutoparError(
                f"layer {layer!r}: unknown checkpoint policy {how!r}; use 'none' or 'full'"
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

    results = checkpoint(layer_fn, *[env[r] for r in reads], use_reentrant=False)
    env.update(zip(group, results))
