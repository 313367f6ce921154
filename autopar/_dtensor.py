"""The one module that reaches into DTensor's private sharding-propagation API.

DTensor knows, for each ATen op, which input placements it can run on and what output placement
results; at run time it asks its `ShardingPropagator`. The planner asks the same propagator the
same question ahead of time, so what the solver assumed is exactly what runs. Torch moves these
internals between releases (checked on 2.11 and 2.13); a torch upgrade should touch only this file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate
from torch.utils._pytree import tree_leaves, tree_map

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
    with _quiet_fake_tensor_log():  # rejected combinations log a traceback before raising
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


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


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
    """
    return _LocalCall.apply(
        fn,
        mesh,
        tuple(input_grad_placements),
        tuple(output_placements),
        tuple(output_vals),
        *inputs,
    )


def _wrap(local, mesh, placements, val) -> DTensor:
    return DTensor.from_local(
        local,
        mesh,
        placements,
        run_check=False,
        shape=val.shape,
        stride=contiguous_strides(val.shape),
    )


class _LocalCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, mesh, in_grad, out_placements, out_vals, *inputs):
        local_in = [x.to_local().detach().requires_grad_(x.requires_grad) for x in inputs]
        with torch.enable_grad():  # record fn's local graph for backward
            result = fn(*local_in)
        outs = result if isinstance(result, (tuple, list)) else (result,)
        ctx.mesh, ctx.in_grad, ctx.out_placements = mesh, in_grad, out_placements
        ctx.local_in, ctx.outs = local_in, outs
        ctx.in_vals = [x for x in inputs]
        wrapped = tuple(
            _wrap(o.detach(), mesh, pl, v) for o, pl, v in zip(outs, out_placements, out_vals)
        )
        ctx.mark_non_differentiable(*[w for w, o in zip(wrapped, outs) if not o.requires_grad])
        return wrapped if isinstance(result, (tuple, list)) else wrapped[0]

    @staticmethod
    def backward(ctx, *grads):
        pairs = [
            (o, g.redistribute(ctx.mesh, for_grad(pl)).to_local())
            for o, g, pl in zip(ctx.outs, grads, ctx.out_placements)
            if g is not None and o.requires_grad
        ]
        wanted = [t for t in ctx.local_in if t.requires_grad]
        local_grads = (
            torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            if pairs and wanted
            else [None] * len(wanted)
        )
        by_input = iter(local_grads)
        out = []
        for t, x, pl in zip(ctx.local_in, ctx.in_vals, ctx.in_grad):
            g = next(by_input) if t.requires_grad else None
            out.append(None if g is None else _wrap(g, ctx.mesh, pl, x))
        return (None, None, None, None, None, *out)


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
