"""Running one graph op on the mesh as the plan says: the op runner the sharded model and the
pipeline stages share.

Each op's inputs are redistributed to the placements the plan chose, then the op runs on
DTensors through DTensor's own rule, or on local shards for ops with our own rule (and for
views, and for ops this torch's DTensor cannot shard as the plan does). Running the same ATen
graph the planner saw, with the same DTensor propagation, is what makes the predicted
communication the communication that happens.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.checkpoint import checkpoint

from autopar import dtensor, parallelism
from autopar.plan import Plan
from autopar.runtime import attention, experts
from autopar.runtime.mesh import local_shape, placements_of
from autopar.trace import is_getitem, is_grouped_mm


class OpRunner:
    """Runs the ops of `nodes` (a model's, or a pipeline stage's) on `mesh`, on `device`."""

    def __init__(self, plan: Plan, mesh, device: torch.device, nodes: dict[str, fx.Node]):
        self.plan, self.mesh, self._device = plan, mesh, device
        self._no_rule_here = ops_without_a_rule_here(plan, nodes)
        self._regathers = regathers(plan)

    def run_node(self, node: fx.Node, env: dict) -> None:
        """Run `node` into `env` (node -> value)."""
        if is_getitem(node):
            env[node] = env[node.args[0]][node.args[1]]
            return
        try:
            env[node] = self.call(node, env)
        except Exception as e:
            e.add_note(
                f"while running node {node.name} ({node.target}) planned as "
                f"{self.plan.ops[node.name]}"
            )
            raise

    def call(self, node: fx.Node, env: dict):
        """`node`'s value: its op run on the values of its inputs in `env`."""
        op = self.plan.ops[node.name]
        no_rule = node.name in self._no_rule_here
        wanted = [placements_of(p) for p in op.inputs]
        if no_rule:
            wanted = [(Replicate(),) * self.mesh.ndim] * len(wanted)
        refs = iter(wanted)

        def arg(a):
            if isinstance(a, fx.Node):
                value, target = env[a], next(refs)
                if self._regathers and a.op == "placeholder" and tuple(value.placements) != target:
                    # FSDP's reshard-after-forward (ZeRO-3): gather the sharded parameter for
                    # this op, keep only the shard for backward and gather again there
                    return checkpoint(redistribute, value, self.mesh, target,
                                      use_reentrant=False)
                return redistribute(value, self.mesh, target)
            if isinstance(a, torch.device):
                return self._device
            return a

        args, kwargs = tree_map(arg, (node.args, node.kwargs))
        outputs = [placements_of(p) if p else None for p in op.outputs]
        if node.target in _VIEWS:
            return _view_locally(node, args[0], outputs[0], self.mesh)
        if no_rule:  # whole on every rank, then the plan's placements (ops_without_a_rule_here)
            whole = [(Replicate(),) * self.mesh.ndim if p else None for p in outputs]
            result = _call_locally(node, args, kwargs, whole, self.mesh)
            return _to_placements(result, outputs, self.mesh)
        if op.rule == "dtensor" and not draws_random(node):
            return node.target(*args, **kwargs)
        return _call_locally(node, args, kwargs, outputs, self.mesh)


def draws_random(node: fx.Node) -> bool:
    """An op that draws from the random generator (dropout's mask): it runs on local shards,
    each rank drawing from its own generator, as DTensor runs it on CPU. On GPUs DTensor
    would instead read and advance the device's generator state through its RNG tracker,
    which cannot run while the replay runtime traces a layer (a real state tensor inside
    fake-tensor tracing)."""
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def regathers(plan: Plan) -> bool:
    """Whether parameters are gathered for each use and resharded after forward: the plan's
    data-parallel flavour `regathers` (ZeRO-3, and hybrid sharding inside each shard group)."""
    return parallelism.get_flavour(plan.data_parallel).regathers


def ops_without_a_rule_here(plan: Plan, nodes: dict[str, fx.Node]) -> frozenset[str]:
    """The ops the plan runs through DTensor's own rules that this torch's DTensor cannot run
    so: the plan was made with another torch release (2.13 shards `squeeze.dims`, which
    cross-entropy decomposes to; 2.11 has no rule for it). Each runs whole on every rank, on
    gathered inputs, and its outputs take the plan's placements after: correct, at the price
    of collectives the plan did not count. Warns once, naming them.

    A plan made with this torch asked this DTensor already: only a missing rule is looked for.
    Otherwise each op is asked again with the plan's placements (a second or two for a graph
    of thousands of ops), since a rule can exist and still reject them."""
    made_with = plan.made_with.get("torch")
    mesh = None
    if made_with != torch.__version__:
        axes = plan.sharding_mesh
        mesh = dtensor.planning_mesh(tuple(axes.values()), tuple(axes))
    missing = []
    for name, op in plan.ops.items():
        node = nodes.get(name)
        if op.rule != "dtensor" or node is None:
            continue
        if not dtensor.has_rule(node.target) or (
            mesh is not None and not dtensor.can_run(node, [placements_of(p) for p in op.inputs],
                                                     mesh)
        ):
            missing.append(name)
    if missing:
        ops = sorted({str(nodes[name].target) for name in missing})
        warnings.warn(
            f"this torch ({torch.__version__}) cannot shard {', '.join(ops)} as the plan does: "
            f"the plan was made with torch {made_with or '(not recorded)'}. Those ops run on "
            "gathered inputs here, with collectives the plan's prediction leaves out; re-plan "
            "with this torch to avoid them.",
            stacklevel=3,
        )
    return frozenset(missing)


def _to_placements(result, placements, mesh):
    """Each DTensor of `result` (one, or a tuple) redistributed to its entry of `placements`."""
    results = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    moved = [redistribute(r, mesh, pl) if isinstance(r, DTensor) and pl else r
             for r, pl in zip(results, placements)]
    return type(result)(moved) if isinstance(result, (tuple, list)) else moved[0]


def redistribute(x: DTensor, mesh, placements) -> DTensor:
    """x with `placements`; Partial(sum) targets are reached from Replicate by `to_partial`."""
    if tuple(x.placements) == tuple(placements):
        return x
    averaged = tuple(a for a, p in enumerate(x.placements)
                     if isinstance(p, Partial) and p.reduce_op == "avg" and placements[a] != p)
    if averaged:
        x = _AverageAsSum.apply(x, averaged)
        if tuple(x.placements) == tuple(placements):
            return x
    partial_axes = [
        a for a, p in enumerate(placements) if isinstance(p, Partial) and x.placements[a] != p
    ]
    if not partial_axes:
        return x.redistribute(mesh, placements)
    staged = tuple(Replicate() if a in partial_axes else p for a, p in enumerate(placements))
    return to_partial(x.redistribute(mesh, staged), partial_axes)


class _AverageAsSum(torch.autograd.Function):
    """A Partial(avg) value (a mean over a sharded dim) as the same value in Partial(sum), by
    dividing each rank's piece locally. Redistributed from Partial(avg) by DTensor, the value's
    gradient must come back as Partial(avg), which DTensor cannot make from the Partial(sum)
    gradients of replicated inputs to ops run on local shards (`_call_locally`, `to_partial`);
    from Partial(sum) it can. The value does not change, so neither does its gradient."""

    @staticmethod
    def forward(ctx, x: DTensor, axes: tuple[int, ...]) -> DTensor:
        n = 1
        for a in axes:
            n *= x.device_mesh.size(a)
        placements = tuple(Partial("sum") if a in axes else p for a, p in enumerate(x.placements))
        return DTensor.from_local(x.to_local() / n, x.device_mesh, placements, run_check=False,
                                  shape=x.shape, stride=x.stride())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def to_partial(x: DTensor, axes: list[int]) -> DTensor:
    """Replicate -> Partial(sum) on `axes` without communication: the rank at coordinate 0 of
    each axis keeps the value, the others hold zeros, so the sum is the value. (DTensor's public
    redistribute refuses to target Partial, which ops such as addmm with a row-split weight need
    for the bias.) The gradient comes back masked the same way: a Partial(sum) on `axes`."""
    mesh = x.device_mesh
    target = tuple(Partial("sum") if a in axes else p for a, p in enumerate(x.placements))
    whole = dtensor.for_grad(x.placements)
    grad = tuple(Partial("sum") if a in axes else p for a, p in enumerate(whole))
    coord = mesh.get_coordinate()
    keep = all(coord[a] == 0 for a in axes)
    return dtensor.local_call(
        lambda t: t if keep else t * 0,
        [x],
        mesh=mesh,
        input_grad_placements=[grad],
        output_placements=[target],
        output_vals=[x],
    )


def _view_locally(node: fx.Node, x: DTensor, out_placements, mesh) -> DTensor:
    """A view on local shards, as DTensor's own view rule runs it, but with reshape: the
    traced view was valid for single-device strides, and a shard that a redistribution or
    a local kernel laid out differently may need a copy (in forward or in backward)."""
    out = node.meta["val"]
    shape = local_shape(out.shape, out_placements, mesh.shape)
    return dtensor.local_call(
        lambda t: t.reshape(shape),
        [x],
        mesh=mesh,
        input_grad_placements=[dtensor.for_grad(x.placements)],
        output_placements=[out_placements],
        output_vals=[out],
    )


def _call_locally(node: fx.Node, args, kwargs, outputs, mesh):
    """Ops with our own rule (and replicated fallbacks) run on local shards: each rank calls
    the op on its pieces and the results are rewrapped with the rule's output placements.
    A replicated input feeding outputs split over an axis gets a partial gradient there."""
    leaves, spec = tree_flatten((args, kwargs))
    slots = [i for i, v in enumerate(leaves) if isinstance(v, DTensor)]
    target = attention.replay_target(node.target)  # attention: the kernel eager would pick
    if target is attention.attention and _splits_queries(leaves[0]):
        # queries split along the sequence (context parallelism): causal rows balanced over
        # ranks where they can be, else masked by where they sit
        target = _sequence_split_attention(node, leaves[0], mesh)
    elif is_grouped_mm(node.target) and (first := _first_expert(leaves[1], mesh)) is not None:
        # experts split over ranks: each rank its own experts' rows (dropless routing)
        target = experts.own_rows(target, first)

    def run(*local):
        filled = list(leaves)
        for i, t in zip(slots, local):
            filled[i] = t
        a, k = tree_unflatten(filled, spec)
        return target(*a, **k)

    val = node.meta["val"]
    vals = tuple(val) if isinstance(val, (tuple, list)) else (val,)
    if not slots:  # a factory: nothing to differentiate
        result = run()
        results = result if isinstance(result, (tuple, list)) else (result,)
        wrapped = [
            DTensor.from_local(r, mesh, pl, run_check=False) for r, pl in zip(results, outputs)
        ]
        return type(result)(wrapped) if isinstance(result, (tuple, list)) else wrapped[0]
    # a partial input's gradient is whole (each rank's local backward gives all of it; for
    # expert rows, all of its own rows, the only ones read)
    split = {a for pl in outputs if pl for a, p in enumerate(pl) if not isinstance(p, Replicate)}
    in_grad = [
        tuple(
            Partial("sum") if a in split and isinstance(p, Replicate) else g
            for a, (p, g) in enumerate(zip(leaves[i].placements,
                                           dtensor.for_grad(leaves[i].placements)))
        )
        for i in slots
    ]
    return dtensor.local_call(
        run,
        [leaves[i] for i in slots],
        mesh=mesh,
        input_grad_placements=in_grad,
        output_placements=outputs,
        output_vals=vals,
    )


def _splits_queries(q) -> bool:
    return isinstance(q, DTensor) and any(isinstance(p, Shard) and p.dim == 2
                                          for p in q.placements)


def _sequence_split_attention(node: fx.Node, q: DTensor, mesh):
    """The local attention for queries `q` split along the sequence, as planned."""
    args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"),
                    node.args)) | node.kwargs
    axis = parallelism.balanced_causal_axis(q.placements, q.to_local().shape[2],
                                            bool(args.get("is_causal", False)),
                                            args.get("attn_mask") is not None)
    if axis is None:
        return attention.query_rows(_first_row(q, mesh))
    return attention.balanced_rows(mesh.get_group(axis), mesh.get_local_rank(axis),
                                   mesh.size(axis))


def _first_expert(weight: DTensor, mesh) -> int | None:
    """The first expert whose weights this rank holds, where axes split a grouped matmul's
    experts (dim 0 of its weight); None where none does."""
    if not any(isinstance(p, Shard) and p.dim == 0 for p in weight.placements):
        return None
    return _first_index(weight, 0, mesh)


def _first_row(q: DTensor, mesh) -> int:
    """The sequence position (dim 2) of this rank's first query row."""
    return _first_index(q, 2, mesh)


def _first_index(x: DTensor, dim: int, mesh) -> int:
    """Where this rank's shard of `x` starts along `dim`: the axes that split `dim` cut it in
    mesh order, outer axes first (DTensor's order for even shards)."""
    index, coordinate = 0, mesh.get_coordinate()
    for a, p in enumerate(x.placements):
        if isinstance(p, Shard) and p.dim == dim:
            index = index * mesh.size(a) + coordinate[a]
    return index * x.to_local().shape[dim]


# Ops that only reinterpret their input's shape: run on local shards (see _view_locally).
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}
