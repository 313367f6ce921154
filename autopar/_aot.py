"""The one module that reaches into AOTAutograd (torch._functorch), which torch may move.

`trace_once(fn)` traces `fn` (DTensors in, DTensors out) through DTensor's dispatch and
autograd, once, into a forward and a backward graph of plain ATen ops on local shards, with
DTensor's redistributions as functional collectives. Later calls replay those graphs: no
DTensor dispatch, no sharding propagation, no Python per op beyond the graph's own code. This
is what torch.compile does under DTensor, without Dynamo (our interpreter is plain Python over
a fixed graph, so there is nothing to guard) and without Inductor (the kernels stay the eager
ones the cost model prices).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import fx
from torch._functorch.aot_autograd import aot_function, make_boxed_func
from torch._functorch.partitioners import default_partition
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.checkpoint import CheckpointPolicy

from autopar._overlap import overlap_collectives


def _as_is(graph_module, example_inputs):
    _drop_dead_ops(graph_module)
    _fold_views(graph_module)
    overlap_collectives(graph_module)
    return make_boxed_func(graph_module)


def _drop_dead_ops(gm: fx.GraphModule) -> None:
    """Erase ops whose results nothing reads. fx keeps them when the op could draw random
    numbers (attention, for its dropout): the partitioner leaves such a forward op in the
    backward graph with no reader, and replayed as is it would run each attention forward
    twice. Ops that write to an input, collectives and asserts stay."""
    for n in reversed(list(gm.graph.nodes)):
        if (n.op == "call_function" and not n.users and isinstance(n.target, torch._ops.OpOverload)
                and not n.target._schema.is_mutable and n.target.namespace == "aten"
                and not n.target.__name__.startswith("_assert")):
            gm.graph.erase_node(n)


_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def _fold_views(gm: fx.GraphModule) -> None:
    """Fewer ops to issue, the same results: a view of a view of a contiguous tensor is one
    view of it, and a view to the shape it already has is the tensor itself (the traced model
    is full of both: every layer reshapes around its matmuls). Graph outputs stay as they are
    (AOTAutograd tracks which outputs alias inputs)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    returned = set(out.all_input_nodes)
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _VIEWS or n in returned:
            continue
        src = n.args[0]
        while (isinstance(src, fx.Node) and src.target in _VIEWS
               and _contiguous(src.args[0])):
            src = src.args[0]
        if src is not n.args[0]:
            n.args = (src, *n.args[1:])
        val, src_val = n.meta.get("val"), getattr(src, "meta", {}).get("val")
        if (isinstance(val, torch.Tensor) and isinstance(src_val, torch.Tensor)
                and val.shape == src_val.shape and val.stride() == src_val.stride()):
            n.replace_all_uses_with(src)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _contiguous(n) -> bool:
    val = getattr(n, "meta", {}).get("val") if isinstance(n, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_contiguous()


def trace_once(fn: Callable, *, regather: Collection[int] = ()) -> Callable:
    """`fn` traced on its first call with each signature (grad mode; each argument's type,
    shape, dtype, device, placements and requires_grad) and replayed on later calls with it.

    `regather`: positions of arguments (ZeRO-3 parameter shards) whose forward-only uses, the
    gathers, are recomputed in backward instead of saved: FSDP's reshard after forward.
    """
    traced: dict[tuple, Callable] = {}

    def call(*args):
        key = (torch.is_grad_enabled(), *map(_signature, args))
        f = traced.get(key)
        if f is None:
            f = traced[key] = _trace(fn, args, regather)
        return f(*args)

    return call


def _signature(a) -> tuple:
    if not isinstance(a, torch.Tensor):
        return (type(a), a)
    return (type(a), tuple(a.shape), a.dtype, a.device, a.requires_grad,
            tuple(getattr(a, "placements", ())))


def _trace(fn: Callable, args, regather: Collection[int]) -> Callable:
    # AOTAutograd flattens each DTensor into its parts (local tensor, mesh): the graph inputs
    # that come from regathered arguments
    primals, start = set(), 0
    for i, a in enumerate(args):
        n = _parts(a)
        if i in regather:
            primals.update(range(start, start + n))
        start += n

    def partition(joint: fx.GraphModule, joint_inputs, **kwargs):
        if primals:
            _recompute_weight_only(joint, primals)
        return default_partition(joint, joint_inputs, **kwargs)

    return aot_function(fn, fw_compiler=_as_is, bw_compiler=_as_is, partition_fn=partition)


def _parts(x) -> int:
    """How many graph inputs AOTAutograd makes of argument `x`."""
    if not is_traceable_wrapper_subclass(x):
        return 1
    attrs, _ = x.__tensor_flatten__()
    return sum(_parts(getattr(x, a)) for a in attrs)


def _recompute_weight_only(joint: fx.GraphModule, primals: set[int]) -> None:
    """Tag for recomputation every value computed from the `positions` arguments alone (no
    activation, no gradient): the all-gathers of sharded weights and their reshapes."""
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    inputs = [n for n in placeholders if n.name.startswith("primals")]
    weight_only = {p for i, p in enumerate(inputs) if i in primals}
    others = set(placeholders) - weight_only
    for n in joint.graph.nodes:
        if n.op != "call_function":
            continue
        inputs = n.all_input_nodes
        if inputs and all(a in weight_only for a in inputs) and not any(a in others for a in inputs):
            weight_only.add(n)
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            n.meta["ac_graph_id"] = 0
