"""Trace a model (and its loss) into an ATen graph on meta tensors.

`trace` runs `torch.export.export(..., strict=False)` on a meta-device copy of the inputs, so a
model of any size traces without allocating its activations, then decomposes the graph to core
ATen ops (which DTensor has sharding rules for) while keeping scaled-dot-product attention whole.

Every `call_function` node keeps `node.meta["nn_module_stack"]`; `layer_of(node)` turns it into
the FQN of the module the op belongs to.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from autopar import rewrites
from autopar.batches import BatchLayout, as_call
from autopar.errors import AutoparError, TraceError

# Composite ops we keep whole: decomposing them would lose the fused kernel at run time.
# silu (SwiGLU's) is pointwise: DTensor shards it and its backward as any elementwise op.
# Decomposed, it is an fp32 upcast, sigmoid, mul and a downcast: four kernels and about eight
# times the memory traffic of the one fused kernel, forward and backward. (mish and softplus
# would gain as much, but DTensor has no rule for their backward ops.)
KEEP_WHOLE = (
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.silu.default,
)


class _Call(nn.Module):
    """The model called as the user calls it, with its loss: one module to export.

    `forward(*tensors)` takes the batch's tensors (then the target, with a loss_fn), puts them
    back among the inputs' other values (`BatchLayout`), calls the model with them as its
    positional or keyword arguments, and returns (loss, output): the loss drives backward, the
    output serves evaluation calls. The loss is `loss_fn(model output, target)`, or the model's
    own (a scalar it returns, or `.loss` / `["loss"]` / the first element of what it returns).
    """

    def __init__(self, model: nn.Module, loss_fn, layout: BatchLayout, quiet: dict):
        super().__init__()
        setattr(self, WRAPPED, model)
        self.loss_fn = loss_fn
        self._layout = layout
        self._quiet = quiet

    def forward(self, *args):
        inputs = self._layout.rebuild(args[: self._layout.n_tensors])
        pos, kw = as_call(inputs)
        out = getattr(self, WRAPPED)(*pos, **{**self._quiet, **kw})
        if self.loss_fn is not None:
            loss = self.loss_fn(out, args[-1])
        else:
            loss = own_loss(out, type(getattr(self, WRAPPED)).__name__)
        main = main_output(out, loss)
        return (loss,) if main is loss else (loss, main)


# The attribute _Call keeps the model under; stripped from every FQN we report.
WRAPPED = "_autopar_model"
# Names of tensor constants among TracedModel.buffers: no module of the model holds them.
CONSTANT_PREFIX = "<constant>."

# Keyword arguments that ask a model for more than training needs, and the value that turns
# that off; passed when the model's forward takes them and the inputs do not set them.
# use_cache: Hugging Face decoders return a key/value cache (DynamicCache), useless to a
# training step and not a tensor the graph can return.
QUIET_KWARGS = {"use_cache": False}


def _quiet_kwargs(model: nn.Module, given: dict) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in QUIET_KWARGS.items() if k in params and k not in given}


def own_loss(out, model_name: str) -> torch.Tensor:
    """The loss a model computes itself: a scalar it returns, or the `loss` of a
    Hugging Face `ModelOutput` / dict, or the first element of a tuple it returns."""
    found = _scalar(out)
    if found is None and isinstance(out, Mapping):
        found = _scalar(out.get("loss"))
    if found is None and isinstance(out, (tuple, list)) and out:
        found = _scalar(out[0])
    if found is None and is_dataclass(out) and hasattr(out, "loss"):
        found = _scalar(out.loss)
    if found is None:
        raise TraceError(
            f"{model_name} returned {_what(out)}, which holds no scalar loss, and no loss_fn was "
            "given: pass loss_fn=... with (inputs, target), or, for a model that computes its own "
            "loss (Hugging Face models do from `labels`), pass the labels among the inputs, e.g. "
            '{"input_ids": ids, "labels": ids}.'
        )
    return found


def main_output(out, loss: torch.Tensor) -> torch.Tensor:
    """What evaluation returns: the model's output tensor, or of a structured output the first
    tensor that is not the loss (a Hugging Face model's logits); the loss if nothing else."""
    if isinstance(out, torch.Tensor):
        return out
    values = (list(out.values()) if isinstance(out, Mapping)
              else list(out) if isinstance(out, (tuple, list))
              else [getattr(out, f.name) for f in fields(out)] if is_dataclass(out) else [])
    return next((v for v in values if isinstance(v, torch.Tensor) and v is not loss), loss)


def _scalar(x) -> torch.Tensor | None:
    return x if isinstance(x, torch.Tensor) and x.numel() == 1 else None


def _what(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"{type(out).__name__} with keys {list(out.keys())}"
    return type(out).__name__


@dataclass
class TracedModel:
    """A model's training graph and the names that tie it back to the model."""

    graph_module: fx.GraphModule
    # placeholder node name -> parameter / buffer FQN in the user's model
    parameters: dict[str, str]
    buffers: dict[str, str]
    # placeholder node names of the batch's tensors, in pytree order, then the target's
    inputs: list[str]
    # placeholder of the loss_fn's target (the last input), None when the model has its own loss
    target: str | None
    loss_node: str  # name of the node holding the scalar loss
    output_node: str  # name of the node holding the model's output (the loss itself if no loss_fn)
    model_name: str
    # where the graph's inputs sit in a batch as the user passes it
    layout: BatchLayout | None = None
    # "buffers" the forward creates (CONSTANT_PREFIX + name -> value), not the model's own
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprint: str = field(default="")

    def node(self, name: str) -> fx.Node:
        return self._nodes[name]

    @functools.cached_property
    def experts(self) -> dict[str, int]:
        """Placeholder name -> expert count, for each parameter that stacks the weights of a
        mixture-of-experts layer's experts along dim 0 (`mark_experts`)."""
        return {name: self._nodes[name].meta[EXPERTS_META] for name in self.parameters
                if EXPERTS_META in self._nodes[name].meta}

    def buffer(self, model: nn.Module, fqn: str) -> torch.Tensor:
        """The value of the buffer `fqn`: the model's, or a constant its forward creates."""
        return self.constants[fqn] if fqn in self.constants else model.get_buffer(fqn)

    def __post_init__(self):
        self._nodes = {n.name: n for n in self.graph_module.graph.nodes}
        if not self.fingerprint:
            self.fingerprint = graph_fingerprint(self.graph_module.graph)


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def trace(model: nn.Module, example_inputs, *, loss_fn=None, target=None) -> TracedModel:
    """Export `model` called with `example_inputs` (a tensor, a tuple of positional arguments or
    a dict of keyword arguments), with `loss_fn(output, target)` when given, to an ATen graph.

    The model may live on any device, meta included; no real computation runs.
    """
    ep, layout = export_call(model, example_inputs, loss_fn=loss_fn, target=target)
    return _traced_model(ep, model, layout)


def export_call(model: nn.Module, example_inputs, *, loss_fn=None, target=None, batch=None):
    """`trace`'s program before it becomes a TracedModel: (ExportedProgram decomposed to core
    ATen, BatchLayout). `batch`: a `torch.export.Dim` that dim 0 of every input tensor takes, so
    that one program serves every batch size (`autopar.trace_sizes`); export raises (a
    TraceError here) where the forward cannot keep it symbolic."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"autopar needs a torch.nn.Module, got {type(model).__name__}.")
    if loss_fn is not None and target is None:
        raise TraceError("loss_fn was given without a target: pass example targets with the inputs.")
    layout = BatchLayout.of(example_inputs, has_target=loss_fn is not None)
    module = _Call(model, loss_fn, layout, _quiet_kwargs(model, as_call(example_inputs)[1]))
    args = tuple(layout.tensors(example_inputs, target))
    dynamic = None
    if batch is not None:  # forward(*args): one spec for the tuple of args
        dynamic = (tuple({0: batch} if a.ndim else None for a in args),)
    ep = _export(module, args, model, _given_arguments(model, example_inputs), dynamic)
    table = torch.export.default_decompositions()
    for op in KEEP_WHOLE:
        table.pop(op, None)
    return ep.run_decompositions(table), layout


def trace_for_training(model: nn.Module, example_inputs, loss_fn, *, how=None) -> TracedModel:
    """`trace` of one batch as `train_step` takes it: the inputs, or `(inputs, target)` when
    `loss_fn` is given. `how`: a function with `trace`'s arguments to trace with instead
    (`autopar.trace_repeats.trace_repeated`)."""
    how = how or trace
    if loss_fn is None:
        return how(model, example_inputs)
    if not (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2):
        raise AutoparError(
            "with a loss_fn, example_inputs must be (inputs, target) as train_step takes them, "
            f"got {type(example_inputs).__name__} of length "
            f"{len(example_inputs) if hasattr(example_inputs, '__len__') else '?'}"
        )
    inputs, target = example_inputs
    return how(model, inputs, loss_fn=loss_fn, target=target)


def inputs_key(inputs) -> tuple:
    """What a trace depends on besides the model: every leaf's shape and dtype (or value)."""
    leaves, spec = tree_flatten(inputs)
    return str(spec), tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x)
                            for x in leaves)


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _given_arguments(model: nn.Module, inputs) -> set[str]:
    """The names of the forward's parameters the inputs pass a value other than None to."""
    pos, kw = as_call(inputs)
    given = {name for name, value in kw.items() if value is not None}
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return given
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds]
    return given | {name for name, value in zip(names, pos) if value is not None}


def _export(module: nn.Module, args: tuple, model: nn.Module, given: set[str], dynamic=None):
    try:
        # what export cannot trace as written, or traces worse than eager runs it
        with rewrites.applied(model, given):
            if _on_meta(model):
                return _export_as_fake_cpu(module, args, dynamic)
            return torch.export.export(module, args, strict=False, dynamic_shapes=dynamic)
    except Exception as e:  # export raises many types; all mean "this model did not trace"
        raise TraceError(_explain_export_failure(e, model)) from e


def _export_as_fake_cpu(module: nn.Module, args: tuple, dynamic=None):
    """Export a meta model as fake tensors on the CPU: still no memory, but every op picks its
    kernel, and lays out its output, as on a real device.

    On meta, attention takes the math path, whose output is contiguous in (batch, heads, time,
    dim) order, and the usual `y.transpose(1, 2).reshape(B, T, C)` copies it; the fused kernels
    of CPUs and GPUs write (batch, time, heads, dim), which makes that reshape a view. Traced on
    meta, a model had one more op and one more saved activation per attention layer than the
    graph it runs (4 GiB on GPT 6.7B at 8 x 2048 tokens per GPU). The model's own parameters
    stay as they are: the fakes stand in for them only while export runs."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module

    mode = FakeTensorMode()

    def fake(t: torch.Tensor) -> torch.Tensor:
        return FakeTensor(mode, t.to("meta"), torch.device("cpu"))

    state = {name: nn.Parameter(fake(p), requires_grad=p.requires_grad)
             for name, p in module.named_parameters()}
    state.update({name: fake(b) for name, b in module.named_buffers()})
    args = tuple(fake(a) if isinstance(a, torch.Tensor) else a for a in args)
    with _reparametrize_module(module, state, tie_weights=True):
        return torch.export.export(module, args, strict=False, dynamic_shapes=dynamic)


def _explain_export_failure(e: Exception, model: nn.Module) -> str:
    where = _failing_module(e, model)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    fix = (
        "Make the forward traceable by torch.export: avoid Python control flow on tensor values "
        "(use torch.where / torch.cond), data-dependent shapes and .item()."
    )
    return f"could not trace {_model_name(model)}{where}: {type(e).__name__}: {reason}\n{fix}"


def _failing_module(e: BaseException, model: nn.Module) -> str:
    """Best effort: the innermost module of `model` whose forward was running when export
    failed, searched through the whole chain of causes (export re-raises its own errors)."""
    forwards = {}
    for fqn, mod in model.named_modules():
        code = getattr(type(mod).forward, "__code__", None)
        if code is not None:
            forwards.setdefault(code, fqn)
    found = None
    for exc in _exception_chain(e):  # outermost first; a deeper cause overrides
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code in forwards:
                found = (forwards[code], code.co_filename, tb.tb_lineno)
            tb = tb.tb_next
    if found is None:
        return ""
    fqn, file, line = found
    mod = model.get_submodule(fqn)
    name = f"module '{fqn}'" if fqn else "the root module"
    return f" in {name} ({type(mod).__name__}.forward, {file}:{line})"


def _exception_chain(e: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return chain


def _traced_model(ep, model: nn.Module, layout: BatchLayout) -> TracedModel:
    sig = ep.graph_signature
    prefix = WRAPPED + "."
    params = {k: v.removeprefix(prefix) for k, v in sig.inputs_to_parameters.items()}
    buffers = {k: v.removeprefix(prefix) for k, v in sig.inputs_to_buffers.items()}
    user_inputs = list(sig.user_inputs)
    # tensors the forward makes from Python values (T5's `torch.tensor(decoder_start_token_id)`):
    # export lifts them to inputs; they are held like buffers, replicated
    constants = {}
    for node_name, name in sig.inputs_to_lifted_tensor_constants.items():
        fqn = CONSTANT_PREFIX + name.removeprefix(prefix)
        buffers[node_name] = fqn
        constants[fqn] = ep.constants[name].detach().clone()
    gm = ep.graph_module
    # tied weights: export keeps one placeholder per name; only the one the graph uses counts
    used = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.users}
    params = {k: v for k, v in params.items() if k in used}
    buffers = {k: v for k, v in buffers.items() if k in used}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    results = out.args[0]
    loss = results[0]
    output = results[1] if len(results) > 1 else loss
    if not isinstance(loss, fx.Node) or loss.meta["val"].numel() != 1:
        raise TraceError(f"loss_fn must return a scalar loss tensor, got {loss.meta.get('val')!r}.")
    mark_experts(gm, params, model)
    return TracedModel(
        graph_module=gm,
        parameters=params,
        buffers=buffers,
        inputs=user_inputs,
        target=user_inputs[-1] if layout.has_target else None,
        loss_node=loss.name,
        output_node=output.name if isinstance(output, fx.Node) else loss.name,
        model_name=_model_name(model),
        layout=layout,
        constants=constants,
    )


# a parameter placeholder's node meta: the number of experts its dim 0 stacks
EXPERTS_META = "autopar_experts"
# the attribute a mixture-of-experts module names its expert count by: autopar's models and
# transformers' experts modules (MixtralExperts, Qwen2MoeExperts, ...)
_EXPERT_COUNT_ATTRS = ("n_experts", "num_experts")


# grouped matmuls (input rows sorted by expert, times one matrix per expert): torch's, and the
# custom op transformers runs its experts with where torch's kernel does not take the inputs
_GROUPED_MATMULS = {"aten::_grouped_mm", "transformers::grouped_mm_fallback"}


def is_grouped_mm(op) -> bool:
    """Whether graph op `op` is a grouped matmul of a mixture-of-experts layer's experts."""
    return isinstance(op, torch._ops.OpOverload) and op.name() in _GROUPED_MATMULS


def mark_experts(gm: fx.GraphModule, params: dict[str, str], model: nn.Module) -> None:
    """Mark (node meta `EXPERTS_META`) the parameters that stack experts: a parameter of at
    least 3 dims held directly by a module with an integer `n_experts` or `num_experts`, whose
    dim 0 is that count (each expert's weight matrix, stacked so one batched matmul runs them
    all). A router's (experts, d_model) weight is 2-D, so it is not one. Node meta travels with
    the graph: stand-ins and repeated blocks copy it."""
    stacked = {}
    for prefix, mod in model.named_modules():
        count = next((getattr(mod, a) for a in _EXPERT_COUNT_ATTRS
                      if isinstance(getattr(mod, a, None), int)), None)
        if not count or count < 2:
            continue
        for name, p in mod.named_parameters(recurse=False):
            if p.ndim >= 3 and p.shape[0] == count:
                stacked[f"{prefix}.{name}" if prefix else name] = count
    if not stacked:
        return
    for n in gm.graph.nodes:
        if n.op == "placeholder" and params.get(n.name) in stacked:
            n.meta[EXPERTS_META] = stacked[params[n.name]]


def layer_of(node: fx.Node) -> str:
    """FQN of the innermost module `node` was traced in ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _clean_fqn(path)


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(FQN, class name) of every module `node` was traced in, outermost first (the root, "",
    left out)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, kind in stack.values():
        fqn = _clean_fqn(path)
        if fqn:
            out.append((fqn, kind if isinstance(kind, str) else getattr(kind, "__qualname__",
                                                                         str(kind))))
    return out


def _clean_fqn(path: str) -> str:
    # export names paths like "L['self'].model.blocks.0" or "L__self__.model.blocks.0"
    for prefix in ("L['self'].", "L__self__.", "L['self']", "L__self__"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    if path == WRAPPED:
        return ""
    return path.removeprefix(WRAPPED + ".")


def unrun_graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule of `graph` whose Python code is generated only when it is first run or
    read (torch's `_LazyGraphModule`, what Inductor uses for graphs it never runs). The planner's
    graph of a deep model is never run: generating the code of GPT-3 175B's 4,600 nodes took
    about a second a trace."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    return _LazyGraphModule(root, graph)


def graph_fingerprint(graph: fx.Graph) -> str:
    """sha256 of the graph's ops, shapes, dtypes and wiring: equal graphs, equal fingerprints."""
    h = hashlib.sha256()
    for n in graph.nodes:
        h.update(f"{fingerprint_line(n)}\n".encode())
    return h.hexdigest()


# Outputs whose dtype depends on the device an op runs on, not on the model: the fingerprint
# leaves their dtype out, so a plan made from a meta model (traced as CPU fakes) matches the
# graph on a GPU. layer_norm's saved mean and rstd are fp32 for bf16/fp16 input on CUDA and in
# the input's dtype on CPU (seen with GPT on an H200, torch 2.11). A few values per row: the
# memory and time models do not notice.
DEVICE_DEPENDENT_DTYPES = {
    torch.ops.aten.native_layer_norm.default: (1, 2),
}


def fingerprint_line(n: fx.Node) -> str:
    """What the fingerprint hashes of one node (to find where two traces part)."""
    val = n.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    free = DEVICE_DEPENDENT_DTYPES.get(n.target, ()) if n.op == "call_function" else ()
    shapes = [
        (tuple(v.shape), "*" if i in free else str(v.dtype))
        for i, v in enumerate(vals)
        if isinstance(v, torch.Tensor)
    ]
    args = [a.name if isinstance(a, fx.Node) else repr(a) for a in n.args]
    return f"{n.op}|{n.name}|{n.target}|{args}|{shapes}"


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes feeding `node`'s tensor arguments, in pytree order of (args, kwargs)."""
    found: list[fx.Node] = []
    _collect_nodes((node.args, node.kwargs), found)
    return found


def _collect_nodes(arg, found: list[fx.Node]) -> None:
    # tree_flatten's order over the containers fx puts in args (lists, tuples, dicts by
    # insertion), by hand: the planner asks this of every node many times, and tree_flatten
    # took a tenth of a solve
    if isinstance(arg, fx.Node):
        found.append(arg)
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            _collect_nodes(a, found)
    elif isinstance(arg, dict):
        for a in arg.values():
            _collect_nodes(a, found)


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem
