"""Running a list of graph ops layer by layer, with activation checkpointing where planned.

Both runtimes (`parallel_model.ParallelModel`, `pipeline.StageModule`) run ops through a
`LayerRunner`: consecutive ops of one layer form a group; a group whose layer the plan
checkpoints runs under `torch.utils.checkpoint` (non-reentrant):

    "full"       keep only the layer's inputs, recompute everything in backward
    "selective"  also keep the outputs of the expensive ops (matmuls, attention:
                 `parallelism.KEEP`),
                 recompute the cheap ones (elementwise, norms, views, resharding) -- Korthikanti
                 et al. 2022, section 5 -- with torch's selective checkpointing
                 (`create_selective_checkpoint_contexts`).

The planner charges the same: `layer_costs.layer_costs` keeps the outputs of the graph ops in
`parallelism.KEEP_IN_GRAPH` for "selective" and recomputes the rest of the layer's forward.
"""

from __future__ import annotations

import functools

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from autopar.parallelism import KEEP
from autopar.runtime import replay


class LayerRunner:
    """Runs a fixed list of ops (a whole model, or one pipeline stage) layer by layer.

    With `traced=True`, each layer runs as one function traced once (`replay.trace_once`): the
    first step runs through DTensor op by op and records the local ops and collectives it
    issued; later steps replay them, at a fraction of the host time. The ops, placements and
    collectives are the same, so are the results. A checkpointed layer's traced backward
    recomputes what it needs of the forward ("full": from the layer's inputs; "selective":
    also from the saved outputs of the KEEP ops), as torch's checkpoint does in eager.
    """

    def __init__(self, nodes, run_node, layer_of, checkpointing, *, traced: bool = False,
                 wanted=(), regather=frozenset(), compiled: bool = False):
        self._run_node = run_node
        self._regather = regather  # names of ZeRO-3 parameters: gathered again in backward
        # who reads each value: a later op of this runner, or the caller (`wanted`); a traced
        # layer returns only such values (an output that nothing differentiates is an error)
        self._readers: dict[fx.Node, set] = {n: {"caller"} for n in wanted}
        for n in nodes:
            for a in n.all_input_nodes:
                self._readers.setdefault(a, set()).add(n)
        groups = _groups(nodes, layer_of)
        how = [checkpointing.get(layer_of[g[0].name], "none") for g in groups]
        # units run in turn; traced, consecutive layers without checkpointing form one unit
        # (fewer traced calls, the same ops), up to UNIT_WEIGHT_BYTES of weights: a unit's
        # backward returns the gradients of all its weights at once, which gradient
        # accumulation then adds into .grad, so a unit's weights are briefly held twice
        self._units: list[tuple[list[fx.Node], str]] = []
        weight = 0
        for group, h in zip(groups, how):
            w = _weight_bytes(group)
            if (traced and h == "none" and self._units and self._units[-1][1] == "none"
                    and weight + w <= UNIT_WEIGHT_BYTES):
                self._units[-1][0].extend(group)
                weight += w
            else:
                self._units.append((list(group), h))
                weight = w
        self._traced = traced
        self._compiled = compiled  # traced graphs compiled by Inductor (runtime="compile")
        self._segments: dict[int, _Segment] = {}

    def run(self, env: dict[fx.Node, object]) -> None:
        # without grad (torch's shape inference, evaluation) nothing is traced: op by op
        traced = self._traced and torch.is_grad_enabled()
        for i, (nodes, how) in enumerate(self._units):
            if traced:
                segment = self._segments.get(i)
                if segment is None:
                    segment = self._segments[i] = _Segment(
                        nodes, env, self._run_node, self._readers, self._regather, how,
                        self._compiled)
                segment(env)
            elif how == "none" or not torch.is_grad_enabled():  # nothing to save: no recompute
                for n in nodes:
                    self._run_node(n, env)
            else:
                _run_checkpointed(nodes, env, self._run_node, how)


# what a traced layer's forward saves for backward under each policy (`replay.trace_once`'s
# `keep`): everything; nothing but its inputs; its inputs and the outputs of KEEP ops
_TRACED_KEEP = {"none": None, "full": frozenset(), "selective": KEEP}


class _Segment:
    """Ops of one or more layers as a traced function of the tensors they read, returning the
    values that later ops read (never other intermediates: they would stay alive as outputs).
    A checkpointed layer's recomputation is part of its traced backward."""

    def __init__(self, group, env, run_node, readers, regather, how: str, compiled: bool):
        inside = set(group)
        self.reads = _reads(group, env)
        self.escapes = [n for n in group if readers.get(n, set()) - inside]
        self._group, self._run_node = group, run_node
        self._out_spec = None  # the escapes' pytree and non-tensor leaves, set while tracing
        # the traced function's arguments are the reads' tensor leaves, in order
        owners = [a for a in self.reads for v in tree_flatten(env[a])[0] if _is_tensor(v)]
        positions = [i for i, a in enumerate(owners) if a.name in regather]
        self._fn = replay.trace_once(self._body, regather=positions, keep=_TRACED_KEEP[how],
                                     compiled=compiled)

    def _body(self, *tensors):
        local = dict(zip(self.reads, tree_unflatten(self._fill(tensors), self._in_spec)))
        for n in self._group:
            self._run_node(n, local)
        leaves, spec = tree_flatten([local[n] for n in self.escapes])
        self._out_spec = spec, [None if _is_tensor(v) else v for v in leaves]
        return tuple(v for v in leaves if _is_tensor(v))

    def _fill(self, tensors):
        it = iter(tensors)
        return [next(it) if slot is None else slot for slot in self._in_consts]

    def __call__(self, env):
        leaves, self._in_spec = tree_flatten([env[a] for a in self.reads])
        self._in_consts = [None if _is_tensor(v) else v for v in leaves]
        out = self._fn(*[v for v in leaves if _is_tensor(v)])
        spec, consts = self._out_spec
        it = iter(out)
        values = tree_unflatten([next(it) if c is None else c for c in consts], spec)
        env.update(zip(self.escapes, values))


UNIT_WEIGHT_BYTES = 256 * 2**20


def _weight_bytes(group) -> int:
    """Bytes of the graph inputs (weights, mostly) a group of ops reads, at their full size."""
    total = 0
    for a in {a for n in group for a in n.all_input_nodes if a.op == "placeholder"}:
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def _groups(nodes, layer_of) -> list[list[fx.Node]]:
    groups: list[list[fx.Node]] = []
    for n in nodes:
        if groups and layer_of[groups[-1][0].name] == layer_of[n.name]:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def _reads(group, env) -> list[fx.Node]:
    """The values made before `group` (present in `env`) that its ops read, in first-use order."""
    inside = set(group)
    return list(dict.fromkeys(
        a for n in group for a in n.all_input_nodes if a not in inside and a in env
    ))


def _run_checkpointed(group, env, run_node, how: str) -> None:
    inside = set(group)
    reads = _reads(group, env)
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
