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

import contextlib
import operator
from collections.abc import Callable, Collection

import torch
from torch import fx
from torch._functorch import partitioners as _partitioners
from torch._functorch.aot_autograd import aot_function, make_boxed_func
from torch._functorch.partitioners import default_partition
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.checkpoint import CheckpointPolicy

from autopar.runtime.collective_overlap import overlap_collectives


def _as_is(graph_module, example_inputs):
    _drop_dead_ops(graph_module)
    _fold_views(graph_module)
    overlap_collectives(graph_module)
    return make_boxed_func(graph_module)


def _compiled(graph_module, example_inputs):
    """The graph compiled by Inductor (`runtime="compile"`): its elementwise chains fused into
    generated kernels, after the same clean-up. Inductor orders the collectives itself, so our
    overlap pass is left out."""
    from torch._inductor.compile_fx import compile_fx_inner

    _drop_dead_ops(graph_module)
    _fold_views(graph_module)
    _explicit_dtypes(graph_module)
    return compile_fx_inner(graph_module, example_inputs)


def _explicit_dtypes(gm: fx.GraphModule) -> None:
    """Give every factory op (arange, full, ...) the dtype it made when traced: the traced ops
    leave it to torch's default, which Inductor's lowerings do not."""
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if (schema is None or n.kwargs.get("dtype") is not None
                or not isinstance(n.meta.get("val"), torch.Tensor)
                or not any(a.name == "dtype" and a.kwarg_only for a in schema.arguments)):
            continue
        n.kwargs = {**n.kwargs, "dtype": n.meta["val"].dtype}
    gm.recompile()


def _drop_dead_ops(gm: fx.GraphModule) -> None:
    """Erase ops whose results nothing reads, and then what only they read. fx keeps them
    when the op could draw random numbers (attention, for its dropout) or is a collective:
    the partitioner leaves such a forward op in the backward graph with no reader, with every
    op it reads. Replayed as is, backward ran each attention forward twice; and where forward
    issued a collective on a computed value (tensor parallelism; the loss under data
    parallelism when its ops run on gathered inputs), backward issued it again, and recomputed
    its inputs: GPT 1.3B's LM-head matmul and log-softmax ran twice a step on 2 H200s
    (docs/benchmarks/2026-11-30-multigpu-x2-offline-plans/).

    A dead functional collective (and the wait on it) goes too: every rank traces the same
    graph and drops the same ones, so the ranks' collectives still pair up. Ops that write to
    an input and asserts stay."""
    wait = torch.ops._c10d_functional.wait_tensor.default
    for n in reversed(list(gm.graph.nodes)):  # readers first: a dead chain goes in one pass
        if n.op != "call_function" or n.users or not _pure(n.target):
            continue
        if n.target is wait and len(n.args[0].users) > 1:
            continue  # another reader of the collective may rely on this wait having run
        gm.graph.erase_node(n)


def _pure(target) -> bool:
    if target is operator.getitem:  # a piece of a multi-output op (split's)
        return True
    return (isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable
            and target.namespace in ("aten", "_c10d_functional")
            and not target.__name__.startswith("_assert"))


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


def trace_once(fn: Callable, *, regather: Collection[int] = (),
               keep: Collection | None = None, compiled: bool = False) -> Callable:
    """`fn` traced on its first call with each signature (grad mode; each argument's type,
    shape, dtype, device, placements and requires_grad) and replayed on later calls with it.

    `regather`: positions of arguments (ZeRO-3 parameter shards) whose forward-only uses, the
    gathers, are recomputed in backward instead of saved: FSDP's reshard after forward.
    `keep`: activation checkpointing inside the graphs. None: none (backward reads what
    forward saved); else backward recomputes every forward value it needs except the outputs
    of the ops in `keep` (empty: "full"; the matmuls and attention: "selective"), which
    forward saves. `compiled`: the graphs are decomposed as Inductor wants them and compiled by
    it (`_compiled`), not replayed op by op.
    """
    traced: dict[tuple, Callable] = {}

    def call(*args):
        key = (torch.is_grad_enabled(), *map(_signature, args))
        f = traced.get(key)
        if f is None:
            f = traced[key] = _trace(fn, args, regather, keep, compiled)
        return f(*args)

    return call


def _signature(a) -> tuple:
    if not isinstance(a, torch.Tensor):
        return (type(a), a)
    return (type(a), tuple(a.shape), a.dtype, a.device, a.requires_grad,
            tuple(getattr(a, "placements", ())))


def _trace(fn: Callable, args, regather: Collection[int], keep: Collection | None,
           compiled: bool = False) -> Callable:
    # AOTAutograd flattens each DTensor into its parts (local tensor, mesh): the graph inputs
    # that come from regathered arguments
    primals, start = set(), 0
    for i, a in enumerate(args):
        n = _parts(a)
        if i in regather:
            primals.update(range(start, start + n))
        start += n

    def partition(joint: fx.GraphModule, joint_inputs, **kwargs):
        if keep is not None:
            _recompute_forward(joint, frozenset(keep))
        if primals:
            _recompute_weight_only(joint, primals)
        with _rng_only_where_drawn():
            return default_partition(joint, joint_inputs, **kwargs)

    if compiled:
        from torch._inductor.decomposition import select_decomp_table

        return aot_function(fn, fw_compiler=_compiled, bw_compiler=_compiled,
                            partition_fn=partition, decompositions=select_decomp_table())
    return aot_function(fn, fw_compiler=_as_is, bw_compiler=_as_is, partition_fn=partition)


def _parts(x) -> int:
    """How many graph inputs AOTAutograd makes of argument `x`."""
    if not is_traceable_wrapper_subclass(x):
        return 1
    attrs, _ = x.__tensor_flatten__()
    return sum(_parts(getattr(x, a)) for a in attrs)


def _recompute_forward(joint: fx.GraphModule, keep: frozenset) -> None:
    """Tag the joint graph's forward ops for recomputation in backward, except those in
    `keep` and those that draw random numbers (saved: recomputed, they would draw others).
    The partitioner then saves the graph's inputs and the kept outputs, and puts into the
    backward graph only the recomputation that backward reads, as torch's checkpoint stops
    recomputing once it has what backward needs."""
    for n in joint.graph.nodes:
        if n.op != "call_function" or n.meta.get("partitioner_tag") != "is_forward":
            continue
        src = n.args[0] if n.target is operator.getitem else n
        save = _draws_random(src) or src.target in keep
        n.meta["recompute"] = CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.MUST_RECOMPUTE
        n.meta["ac_graph_id"] = 0


@contextlib.contextmanager
def _rng_only_where_drawn():
    """The partitioner replays the random state around every recomputed op that torch tags
    as random, attention included, even at dropout 0 where it draws nothing (and the replay
    wraps each attention in a higher-order op). Ours never recompute an op that draws
    (`_recompute_forward` saves those), so tell the partitioner the truth about draws."""
    original = _partitioners.has_recomputable_rng_ops
    _partitioners.has_recomputable_rng_ops = lambda gm: any(
        _partitioners.must_recompute(n) and _draws_random(n) for n in gm.graph.nodes
    )
    try:
        yield
    finally:
        _partitioners.has_recomputable_rng_ops = original


def _draws_random(n: fx.Node) -> bool:
    """Whether the op may draw random numbers: torch tags attention as such for its dropout,
    which draws nothing at dropout_p 0."""
    op = n.target
    if not isinstance(op, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    names = [a.name for a in op._schema.arguments]
    if "dropout_p" not in names:
        return True
    i = names.index("dropout_p")
    p = n.args[i] if i < len(n.args) else n.kwargs.get("dropout_p", op._schema.arguments[i].default_value)
    return p != 0


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
