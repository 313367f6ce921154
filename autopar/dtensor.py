"""The one module that reaches into DTensor's private sharding-propagation API.

DTensor knows, for each ATen op, which input placements it can run on and what output placement
results; at run time it asks its `ShardingPropagator`. The planner asks the same propagator the
same question ahead of time, so what the solver assumed is exactly what runs. Torch moves these
internals between releases (checked on 2.11 and 2.13); a torch upgrade should touch only this file
and `dtensor_speedups`, which makes the planner's questions faster.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate
from torch.utils._pytree import tree_leaves, tree_map

from autopar import dtensor_speedups
from autopar.trace import tensor_inputs

Placements = tuple[Placement, ...]


def planning_mesh(shape: Sequence[int], names: Sequence[str], device_type: str = "cpu"):
    """A DeviceMesh for planning only: no process group, so it works offline at any size."""
    ranks = torch.arange(int(torch.tensor(list(shape)).prod())).view(*shape)
    kwargs = dict(mesh_dim_names=tuple(names), _init_backend=False)
    try:
        return DeviceMesh(device_type, ranks, _rank=0, **kwargs)
    except TypeError:  # releases without the _rank argument read the rank from the default group
        return DeviceMesh(device_type, ranks, **kwargs)


def _propagator():
    return DTensor._op_dispatcher.sharding_propagator


def has_rule(op) -> bool:
    """Whether DTensor has a sharding rule (or a decomposition it can shard through) for `op`."""
    prop = _propagator()
    tables = ("op_strategy_funcs", "op_single_dim_strategy_funcs", "op_to_rules")
    if any(op in getattr(prop, t, {}) for t in tables):
        return True
    decomp = getattr(prop, "decomp_strategy", None)
    has_decomp = getattr(type(decomp), "has_decomp", None) if decomp is not None else None
    return bool(has_decomp and has_decomp(op))


def rule_name(op) -> str | None:
    """The DTensor function that decides `op`'s shardings, as "module.qualname" (module relative
    to torch.distributed.tensor._ops), in the order the propagator looks them up; None for ops it
    shards through a decomposition or not at all. Callers that reason about a rule's code (which
    ones read exact sizes) key on this name, so a torch release that moves an op to another
    rule is noticed."""
    prop = _propagator()
    for table in ("op_single_dim_strategy_funcs", "op_strategy_funcs", "op_to_rules"):
        fn = getattr(prop, table, {}).get(op)
        if fn is not None:
            fn = getattr(fn, "func", fn)  # single-dim strategies are wrapped in an info object
            module = getattr(fn, "__module__", "").rsplit(".", 1)[-1]
            return f"{module}.{getattr(fn, '__qualname__', '?')}"
    return None


def _fake_dtensor(val: torch.Tensor, mesh: DeviceMesh, placements: Placements) -> DTensor:
    # a meta tensor of the global shape: allocates nothing; only the spec matters to propagation
    local = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=val.shape, stride=val.stride()
    )


def propagate(op, args, kwargs, vals_and_placements, mesh: DeviceMesh):
    """Ask DTensor how it would run `op` on inputs with the given placements.

    `args`/`kwargs` hold `InputRef(i)` where tensor input i goes; `vals_and_placements[i]` is
    (example value, placements). Returns (input placements DTensor runs on, output placements);
    they differ from the given ones when DTensor would redistribute first. Output placements are
    a tuple per tensor output (None for non-tensor outputs). Raises if DTensor cannot shard `op`.
    """

    def conv(a):
        if isinstance(a, InputRef):
            val, pl = vals_and_placements[a.index]
            return _fake_dtensor(val, mesh, pl)
        return a

    d_args, d_kwargs = tree_map(conv, args), tree_map(conv, kwargs)
    dispatcher = DTensor._op_dispatcher
    info = dispatcher.unwrap_to_op_info(op, d_args, d_kwargs)
    with dtensor_speedups.while_propagating():
        # (rejected combinations log a traceback before raising)
        # The non-cached entry: the cached one would remember answers for our planning mesh,
        # and DeviceMesh equality ignores process groups, so a later run on a real mesh of the
        # same shape could be handed specs that point at the planning mesh.
        sharding = _propagator().propagate_op_sharding_non_cached(info.schema)
    schema = sharding.redistribute_schema or info.schema
    in_pl = [s.placements for s in schema.args_spec]
    if len(in_pl) != len(vals_and_placements):  # kwargs tensors are not in args_spec
        in_pl = [
            s.placements for s in tree_leaves(schema.kwargs_schema) if hasattr(s, "placements")
        ]
        in_pl = [s.placements for s in schema.args_spec] + in_pl
    return tuple(in_pl), _output_placements(sharding.output_spec)


def _output_placements(spec):
    if spec is None:
        return (None,)
    if isinstance(spec, (tuple, list)):
        return tuple(s.placements if s is not None else None for s in spec)
    return (spec.placements,)


class InputRef:
    """Marks where tensor input `index` sits inside an op's args."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self):
        return f"InputRef({self.index})"


def is_plain_partial(p: Placement) -> bool:
    """Partial(sum/avg/...) itself, not one of DTensor's private subclasses (e.g. masked partials
    of vocab-parallel embedding), which carry state a plan cannot name."""
    return type(p) is Partial


def for_grad(placements) -> tuple[Placement, ...]:
    """The placements of a gradient flowing back into a tensor with `placements`: a Partial
    value has a whole (replicated) gradient. Said explicitly at every to_local/from_local
    because torch changed the default between releases."""
    return tuple(Replicate() if p.is_partial() else p for p in placements)


def local_call(fn, inputs, *, mesh, input_grad_placements, output_placements, output_vals):
    """Run `fn` on the local shards of DTensor `inputs`; wrap its results as DTensors.

    Gradients are handled here, not by DTensor's to_local/from_local, whose treatment of
    Partial gradients changed between torch releases: in backward, each output gradient is
    brought to `for_grad(output_placements)` (a Partial output has a whole gradient), the local
    backward of `fn` runs, and input i's local gradient is declared `input_grad_placements[i]`.
    `output_vals` are example tensors with each output's global shape.

    `fn`'s local ops are recorded in the same autograd graph as everything else (no nested
    backward): inside a checkpointed region their saved tensors are then recomputed once with
    the region, and selective checkpointing's cache sees each op exactly once per backward.
    """
    local_in = [_ToLocal.apply(x, tuple(g)) for x, g in zip(inputs, input_grad_placements)]
    result = fn(*local_in)
    outs = result if isinstance(result, (tuple, list)) else (result,)
    wrapped = tuple(
        _FromLocal.apply(o, mesh, tuple(pl), v)
        for o, pl, v in zip(outs, output_placements, output_vals)
    )
    return wrapped if isinstance(result, (tuple, list)) else wrapped[0]


def _wrap(local, mesh, placements, shape) -> DTensor:
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=shape, stride=contiguous_strides(shape)
    )


class _ToLocal(torch.autograd.Function):
    """DTensor -> its local shard; the local gradient comes back as a DTensor with the
    declared `grad_placements`."""

    @staticmethod
    def forward(ctx, x, grad_placements):
        # the shape only, not x: a reference to x would keep its shard alive until backward
        ctx.mesh, ctx.grad_placements, ctx.shape = x.device_mesh, grad_placements, x.shape
        local = x.to_local()
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad):
        return _wrap(grad, ctx.mesh, ctx.grad_placements, ctx.shape), None


class _FromLocal(torch.autograd.Function):
    """A local result -> DTensor with `placements`; its gradient is brought to
    `for_grad(placements)` before the local backward reads it."""

    @staticmethod
    def forward(ctx, local, mesh, placements, val):
        ctx.mesh, ctx.placements = mesh, placements
        return _wrap(local.view_as(local), mesh, placements, val.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad.redistribute(ctx.mesh, for_grad(ctx.placements)).to_local(), None, None, None


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def node_args(node: fx.Node):
    """(args, kwargs) of `node` with each input node an `InputRef`, as `propagate` takes them."""
    counter = itertools.count()
    return tree_map(
        lambda a: InputRef(next(counter)) if isinstance(a, fx.Node) else a,
        (node.args, node.kwargs),
    )


def can_run(node: fx.Node, placements: list[Placements], mesh) -> bool:
    """Whether this torch's DTensor can run `node` on inputs with `placements` (perhaps after
    redistributing them): a plan made with another torch release may assume a rule this one
    lacks, or one that rejects these placements."""
    args, kwargs = node_args(node)
    vals = [a.meta["val"] for a in tensor_inputs(node)]
    return ask(node.target, args, kwargs, vals, placements, mesh) is not None


def ask(op, args, kwargs, vals, placements, mesh):
    """DTensor's (input, output) placements for `op` on inputs `vals` with `placements`, or
    None where it rejects them."""
    try:
        ins, outs = propagate(op, args, kwargs, list(zip(vals, placements)), mesh)
    except Exception:  # DTensor rejects this combination outright
        return None
    if len(ins) != len(vals):
        return None
    return tuple(tuple(p) for p in ins), tuple(tuple(o) if o is not None else None for o in outs)
