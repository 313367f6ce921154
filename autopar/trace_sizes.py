"""One export for every batch size: the planner's graphs of other microbatch sizes made from a
program whose batch dimension is symbolic, instead of exporting the model again for each.

The search traces the model once per microbatch size it tries (GPT-3 175B on 1,024 GPUs: 11
sizes), and export with its decomposition is the slow part of a trace (1-7 s a model on the
2-core machine, more than the rest of planning for Switch, Swin and T5). `SizedTracer` is a
drop-in for `trace`:

    trace_with = SizedTracer()
    trace_with(model, inputs, loss_fn=..., target=...) -> TracedModel   (as `trace`)

The first batch size is traced as `trace` does: its node names are the reference. The second
(if the first took a second or more) exports the model once more with dim 0 of every input a
`torch.export.Dim` (at least 2), and every later size is made by running that program on fake
tensors of the size (`_concrete`): the symbolic sizes become ints, the nodes that computed them
go, and a slice `x[:]` the symbolic size kept becomes what the static trace has in its place
(nothing, or an alias). Node names are the reference's, position by position.

The graph must be the one `trace` returns, fingerprint included: the runtime traces the model
for real and refuses a plan whose fingerprint differs. So the program is checked once, made at
the reference's own size, against the reference node for node (`fingerprint_line`), and at
every other size its ops must line up with the reference's one for one. Anything else falls
back to `trace`: a forward that branches on the batch size (export cannot keep it symbolic),
an op fake tensors cannot run, a graph that differs. Batch 1 is always traced: export
specialises sizes 0 and 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten

from autopar.batches import batch_size
from autopar.trace import (
    TracedModel,
    export_call,
    fingerprint_line,
    mark_experts,
    trace,
    unrun_graph_module,
)

MIN_BATCH = 2  # the symbolic dim's least value: export specialises 0 and 1


@dataclasses.dataclass
class _Form:
    """One shape of call (the model's modules, the inputs but for dim 0): its reference trace
    and, once asked for, the symbolic program (None: not made, or failed its check)."""

    reference: TracedModel
    batch: int
    trace_s: float  # how long the reference took to trace
    program: fx.GraphModule | None = None
    tried: bool = False


class SizedTracer:
    """`trace`, for calls that differ only in batch size: see the module docstring.

    The symbolic export costs two to three traces (its shape reasoning), so it is made only for
    a form whose first trace took `min_trace_s` or more: where tracing is cheap (small models,
    a search of few sizes) tracing each size is as fast. Either way the graphs are the same."""

    def __init__(self, min_trace_s: float = 1.0):
        self._forms: dict = {}
        self.min_trace_s = min_trace_s
        self.exports = 0  # exports run (fresh traces and the symbolic one): what this saves

    def __call__(self, model: nn.Module, example_inputs, *, loss_fn=None,
                 target=None) -> TracedModel:
        batch = batch_size(example_inputs)
        form = self._forms.get(key := _form_key(model, example_inputs, target))
        if batch < MIN_BATCH or (form is not None and batch == form.batch):
            return self._trace(model, example_inputs, loss_fn, target)
        if form is None:
            start = time.perf_counter()
            ref = self._trace(model, example_inputs, loss_fn, target)
            self._forms[key] = _Form(ref, batch, time.perf_counter() - start)
            return ref
        if not form.tried and form.trace_s >= self.min_trace_s:
            form.tried = True
            form.program = self._symbolic(form, model, example_inputs, loss_fn, target)
        if form.program is not None:
            graph = _concrete(form.program.graph, batch, form.reference)
            if graph is not None:
                gm = unrun_graph_module(form.program, graph)
                mark_experts(gm, form.reference.parameters, model)  # as `trace` marks them
                return dataclasses.replace(form.reference, graph_module=gm, fingerprint="")
        return self._trace(model, example_inputs, loss_fn, target)

    def _trace(self, model, example_inputs, loss_fn, target) -> TracedModel:
        self.exports += 1
        return trace(model, example_inputs, loss_fn=loss_fn, target=target)

    def _symbolic(self, form: _Form, model, example_inputs, loss_fn, target):
        """The program with a symbolic batch, if made at the reference's size it is the
        reference's graph node for node; else None."""
        self.exports += 1
        try:
            ep, _ = export_call(model, example_inputs, loss_fn=loss_fn, target=target,
                                batch=torch.export.Dim("batch", min=MIN_BATCH))
        except Exception:  # noqa: BLE001 - export's errors are many; any means "trace each size"
            return None
        graph = _concrete(ep.graph_module.graph, form.batch, form.reference)
        ref = form.reference.graph_module.graph
        if graph is None or list(map(_facts, graph.nodes)) != list(map(_facts, ref.nodes)):
            return None
        return ep.graph_module


def _facts(n: fx.Node) -> tuple:
    """What must agree between two traces of a node: what the fingerprint hashes, and what the
    profile and the sharding probes read of its values besides (strides of dims over 1,
    requires_grad)."""
    val = n.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return fingerprint_line(n), tuple(
        (tuple(st for size, st in zip(v.shape, v.stride()) if size > 1), v.requires_grad)
        for v in vals if isinstance(v, torch.Tensor))


def _form_key(model: nn.Module, example_inputs, target) -> tuple:
    """What a trace depends on but the batch size: the model's modules (a shallow copy of it
    is another form), each input leaf's shape past dim 0 and dtype, or its value."""
    leaves, spec = tree_flatten((example_inputs, target))
    return (id(model), tuple(name for name, _ in model.named_modules()), str(spec),
            tuple((x.ndim, tuple(x.shape[1:]), x.dtype) if isinstance(x, torch.Tensor)
                  else repr(x) for x in leaves))


def _concrete(program: fx.Graph, batch: int, reference: TracedModel) -> fx.Graph | None:
    """`program` (symbolic batch) made at `batch`, with the reference's node names; None if its
    nodes do not line up with the reference's (same ops in the same order) or fake tensors
    cannot run it.

    Walked beside the reference: a node that computes a size goes (its users get the int); a
    slice `x[:]` becomes what the reference has in its place: a slice, an alias, or nothing
    (static export drops it where only views read it)."""
    values = _run(program, batch)
    if values is None:
        return None
    refs = iter(reference.graph_module.graph.nodes)
    graph = fx.Graph()
    new: dict[fx.Node, object] = {}  # program node -> its node in `graph`, or its int
    for n in program.nodes:
        if _is_size(n, values):
            new[n] = values[n]
            continue
        r = next(refs, None)
        if r is None:
            return None
        target = n.target
        if _is_whole_slice(n, values) and not _reads(r, n, values, new[n.args[0]]):
            new[n] = new[n.args[0]]  # dropped: readers take x
            refs = itertools.chain([r], refs)
            continue
        if _is_whole_slice(n, values) and r.target is torch.ops.aten.alias.default:
            target = r.target
        if (n.op, target) != (r.op, r.target):
            return None
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), new.__getitem__)
        if target is not n.target:
            args, kwargs = args[:1], {}  # alias(x)
        node = graph.create_node(n.op, target, args, kwargs, name=r.name, type_expr=n.type)
        if node.name != r.name:
            return None
        node.meta = dict(n.meta)
        if "val" in n.meta:
            node.meta["val"] = _like(values[n], n.meta["val"])
        new[n] = node
    return graph if next(refs, None) is None else None


def _run(program: fx.Graph, batch: int) -> dict | None:
    """Every node's value on fake tensors at `batch` (inputs contiguous, as `microbatch_inputs`
    cuts them), or None if an op will not run so."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values: dict[fx.Node, object] = {}
    try:
        with mode, torch.no_grad():
            for n in program.nodes:
                if n.op == "placeholder":
                    values[n] = _input_like(n.meta.get("val"), batch)
                elif n.op == "call_function":
                    args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
                    values[n] = n.target(*args, **kwargs)
                elif n.op != "output":
                    return None  # get_attr, call_module: not in export's flat graphs
    except Exception:  # noqa: BLE001 - data-dependent ops and the like: trace this size
        return None
    return values


def _input_like(val, batch: int):
    """A fake input as `val` (symbolic sizes and strides) would be at `batch`."""
    if not isinstance(val, torch.Tensor):
        return val
    shape = [_at(x, batch) for x in val.shape]
    stride = [_at(x, batch) for x in val.stride()]  # an expanded input keeps its 0 strides
    return torch.empty_strided(shape, stride, dtype=val.dtype, device=val.device)


def _like(value, program_val):
    """`value` flagged `requires_grad` where the program's value is (export's graph has it on
    parameters only; the profile reads it), on a detached alias: same size, strides, storage."""
    if isinstance(value, (tuple, list)) and isinstance(program_val, (tuple, list)):
        return type(value)(_like(v, p) for v, p in zip(value, program_val))
    if isinstance(value, torch.Tensor) and getattr(program_val, "requires_grad", False):
        return value.detach().requires_grad_(True)
    return value


def _at(x, batch: int) -> int:
    """A size or stride with the batch symbol (the only one) set to `batch`."""
    if not isinstance(x, torch.SymInt):
        return int(x)
    expr = x.node.expr
    return int(expr.subs({s: batch for s in expr.free_symbols}))


def _reads(r: fx.Node, n: fx.Node, values: dict, x) -> bool:
    """Whether the reference's node `r` is the slice `n` (the same slice of `x`, the node made
    here for n's input) or an alias of `x`."""
    if not (r.args and isinstance(r.args[0], fx.Node) and isinstance(x, fx.Node)
            and r.args[0].name == x.name):
        return False
    if r.target is torch.ops.aten.alias.default:
        return True
    return (r.target is torch.ops.aten.slice.Tensor
            and _slice_args(r.args) == _slice_args(fx.node.map_arg(n.args, values.__getitem__)))


def _slice_args(args) -> tuple:
    """(dim, start, end, step) of a slice's args, defaults filled in."""
    given = tuple(args[1:5])
    dim, start, end, step = given + (0, None, None, 1)[len(given):]
    return dim, start or 0, end, step or 1


def _is_size(n: fx.Node, values: dict) -> bool:
    """A node that computes a size (an int, float or bool): a static trace has the number."""
    v = values.get(n)
    return (n.op == "call_function" and isinstance(v, (int, float, bool))
            and not isinstance(v, torch.Tensor))


def _is_whole_slice(n: fx.Node, values: dict) -> bool:
    """A slice `x[:]`: from 0 to the end of a dim (the int64 maximum), step 1. A slice up to a
    size, `x[:T]`, is in static traces too."""
    if n.target is not torch.ops.aten.slice.Tensor:
        return False
    _, start, end, step = _slice_args(fx.node.map_arg(n.args, values.__getitem__))
    return start == 0 and (end is None or end >= sys.maxsize) and step == 1
