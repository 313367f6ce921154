"""The user's model as a plan without pipeline stages runs it: `ParallelModel`.

Every parameter becomes a DTensor with its planned placements; `train_step` runs the traced
graph's ops (those the loss needs) layer by layer (`LayerRunner`: replayed, checkpointed where
planned), each op through the shared `OpRunner`; gradients are reduced in buckets as backward
makes them (`GradientBuckets`).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from autopar.layers import assign_layers
from autopar.parallelism import check_policies, check_runtime
from autopar.plan import Plan
from autopar.runtime.gradient_buckets import GradientBuckets
from autopar.runtime.layer_runner import LayerRunner
from autopar.runtime.mesh import as_traced, mesh_device, placements_of, shard_local
from autopar.runtime.op_runner import OpRunner, regathers
from autopar.runtime.optim import (
    Weight,
    check_runnable,
    clip_grad_norm_,
    master_of,
    plan_precision,
    state_names,
)
from autopar.trace import TracedModel, tensor_inputs


class ParallelModel(nn.Module):
    """The user's model, sharded as `plan` says. `train_step` runs forward and backward."""

    def __init__(self, model: nn.Module, traced: TracedModel, plan: Plan, mesh, *,
                 runtime: str = "replay"):
        super().__init__()
        self.plan = plan
        self._replay = check_runtime(runtime) != "eager"
        self._compiled = runtime == "compile"
        self._runners: dict[tuple[str, bool], tuple[LayerRunner, list[fx.Node]]] = {}
        self.mesh = mesh
        self._traced = traced
        self._graph = traced.graph_module.graph
        self._device = mesh_device(mesh)
        self._params = nn.ParameterDict()
        self._names: dict[str, str] = {}  # placeholder name -> key in self._params
        self._weights: list[Weight] = []
        keeps_masters = check_runnable(plan_precision(plan)).keeps_masters
        for node_name, fqn in traced.parameters.items():
            param = model.get_parameter(fqn)
            key = fqn.replace(".", "__")
            placements = placements_of(plan.parameters[fqn])
            # in the dtype the graph was traced in: the plan's compute dtype
            value = as_traced(param.detach().to(self._device), traced.node(node_name))
            dt = distribute_tensor(value, mesh, placements)
            self._params[key] = nn.Parameter(dt, requires_grad=param.requires_grad)
            self._names[node_name] = key
            self._weights.append(Weight(fqn, self._params[key],
                                        master_of(param, self._params[key], keeps_masters)))
        self.state_names = state_names(model, traced.parameters.values())
        self._buffers_by_node = {
            node_name: distribute_tensor(
                as_traced(traced.buffer(model, fqn).detach().to(self._device),
                          traced.node(node_name)),
                mesh, (Replicate(),) * mesh.ndim)
            for node_name, fqn in traced.buffers.items()
        }
        self._nodes = {n.name: n for n in self._graph.nodes}
        self._ops = OpRunner(plan, mesh, self._device, self._nodes)
        self._layer = assign_layers(traced)
        check_policies(getattr(plan, "checkpoint", None) or {})
        # each gradient joins a bucket of data-parallel reductions as soon as backward has made
        # it; the buckets' collectives overlap the rest of backward (DDP's overlap)
        self._buckets = GradientBuckets(mesh)
        for p in self._params.values():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._buckets.add)

    # -- public ---------------------------------------------------------------------------

    @property
    def traced(self) -> TracedModel:
        """The training graph this model runs: the one the plan was made for."""
        return self._traced

    def train_step(self, inputs, target=None) -> torch.Tensor:
        """Forward and backward on one global batch; returns the loss (equal on every rank).

        Gradients land in `p.grad` of `self.parameters()` with the parameters' own placements,
        so any torch.optim optimizer can step them.
        """
        loss = self._run(self._traced.layout.tensors(inputs, target), self._traced.loss_node)
        loss = loss.redistribute(self.mesh, (Replicate(),) * self.mesh.ndim)
        loss.backward()
        self._settle_gradients()
        return loss.to_local().detach()

    def eval_step(self, inputs, target=None) -> torch.Tensor:
        """The loss of one global batch, forward only, under `torch.no_grad()` (no gradients
        touched, no checkpointing); equal on every rank, as `train_step` returns it."""
        with torch.no_grad():
            loss = self._run(self._traced.layout.tensors(inputs, target), self._traced.loss_node)
            loss = loss.redistribute(self.mesh, (Replicate(),) * self.mesh.ndim)
        return loss.to_local().detach()

    def weights(self) -> list[Weight]:
        """This rank's parameters (and their fp32 masters under mixed precision), by FQN: what
        `autopar.optimizer` steps and `clip_grad_norm_` measures."""
        return list(self._weights)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` of the whole model, across every shard (every rank
        calls it after `train_step`); returns the norm before clipping, equal on every rank."""
        return clip_grad_norm_(self._weights, max_norm, norm_type, error_if_nonfinite)

    def forward(self, *args, **kwargs):
        """Evaluation: the model's output (of a structured output, the first tensor that is not
        the loss: a Hugging Face model's logits) for inputs passed as to the model itself, as a
        full tensor on every rank."""
        layout = self._traced.layout
        tensors = layout.input_tensors(layout.inputs_of_call(args, kwargs))
        out = self._run(tensors, self._traced.output_node)
        return out.full_tensor() if isinstance(out, DTensor) else out

    # -- the interpreter ------------------------------------------------------------------

    def _run(self, tensors: list, want: str):
        user = dict(zip(self._traced.inputs, tensors))
        training = torch.is_grad_enabled() and want == self._traced.loss_node
        runner, placeholders = self._runner(want, training)
        env: dict[fx.Node, object] = {node: self._placeholder(node, user) for node in placeholders}
        runner.run(env)
        return env[self._nodes[want]]

    def _runner(self, want: str, training: bool) -> tuple[LayerRunner, list[fx.Node]]:
        """The runner of the ops `want` needs, and the placeholders they read (made once)."""
        key = (want, training)
        if key not in self._runners:
            needed = _ancestors(self._nodes[want])
            ops = [n for n in self._graph.nodes if n in needed and n.op == "call_function"]
            checkpointing = (getattr(self.plan, "checkpoint", None) or {}) if training else {}
            runner = LayerRunner(
                ops, self._ops.run_node, self._layer, checkpointing,
                traced=self._replay and training, wanted=[self._nodes[want]],
                regather=set(self._names) if regathers(self.plan) else frozenset(),
                compiled=self._compiled,
            )
            placeholders = [n for n in self._graph.nodes if n in needed and n.op == "placeholder"]
            self._runners[key] = runner, placeholders
        return self._runners[key]

    def _placeholder(self, node: fx.Node, user: dict):
        if node.name in self._names:
            return self._params[self._names[node.name]]
        if node.name in self._buffers_by_node:
            return self._buffers_by_node[node.name]
        if node.name not in user:
            raise ValueError(
                f"missing input '{node.name}': train_step needs the inputs and the target the "
                f"model was planned with ({', '.join(self._traced.inputs)})"
            )
        value = as_traced(torch.as_tensor(user[node.name]).to(self._device), node)
        expected = tuple(node.meta["val"].shape)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"input '{node.name}' has shape {tuple(value.shape)}, the plan was made for "
                f"{expected}: pass one global batch of the planned shape, or re-plan."
            )
        return shard_local(value, self.mesh, placements_of(self.plan.inputs[node.name]))

    def _settle_gradients(self):
        """Reduce partial gradients (e.g. of replicated weights under a split batch) so every
        gradient has its parameter's placements (the hooks' buckets did it for most)."""
        self._buckets.settle()
        for p in self._params.values():
            if p.grad is not None and tuple(p.grad.placements) != tuple(p.placements):
                p.grad = p.grad.redistribute(self.mesh, p.placements)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(tensor_inputs(n) if n.op != "output" else [])
        stack.extend(a for a in n.all_input_nodes if a not in seen)
    return seen
