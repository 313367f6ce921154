"""Run a plan with pipeline stages on torch.distributed.pipelining.

The traced graph (of ONE microbatch) is cut where the plan's stages are cut: every stage becomes
a `StageModule` that runs its ops exactly as `ParallelModel` does (the same `OpRunner`), on the
stage mesh (the plan's mesh without pp), and exchanges plain local tensors with its neighbours through `PipelineStage`. The loss
(the ops that read the target) runs as the schedule's `loss_fn` on the last stage.

    split_stages      node -> stage; each stage's boundary values in and out
    StageModule       one stage's ops, parameters and checkpointed layers
    PipelinedModel    the stages of this rank + the schedule; `train_step` like ParallelModel

Values crossing a stage boundary travel as Replicate or Shard (a Partial one is reduced first),
so that to_local/from_local have one meaning in every torch release.

Every schedule of `autopar.schedules` runs, with the stage-to-rank map torch uses (looped, or the
V of ZBVZeroBubble; a plan whose stage ranks differ is refused). Zero-bubble schedules split each
backward into input-grad I (`stage_backward_input`: autograd.grad to the stage inputs, hooks
saving the gradient where a weight's path meets the inputs' path) and weight-grad W
(`stage_backward_weight`: from those saved gradients to the weights). For that, a stage must
    * return outputs (and the loss) that are not views: after I, torch detaches them in place;
      `to_local()` is a view, so they are cloned;
    * list every weight it differentiates in `parameters()`: the last stage also holds the
      parameters its loss ops read;
    * reach each weight only through values that also depend on a stage input: a stage output
      that depends on weights alone never passes such a meeting point, and its gradient would be
      lost. Such a stage (`weight_only_outputs`) runs its whole backward at I and a no-op W.
Full checkpointing runs unchanged: non-reentrant checkpointing recomputes per backward call, so a
checkpointed layer is recomputed at I and again at W (the search charges that second forward).
Selective checkpointing cannot: torch's cache of the outputs it keeps serves one backward, and
I and W are two; such a plan is refused (`Schedule.checkpoint_problem`). Stage 0 needs nothing
of this: torch skips its I and runs its whole backward at W.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from autopar.errors import AutoparError, MeshError
from autopar.layers import assign_layers
from autopar.parallelism import PIPELINE, check_policies, check_runtime
from autopar.plan import Plan
from autopar.runtime import pipeline_eval
from autopar.runtime.gradient_buckets import GradientBuckets
from autopar.runtime.layer_runner import LayerRunner
from autopar.runtime.mesh import as_traced, local_shape, mesh_device, placements_of, shard_local
from autopar.runtime.op_runner import OpRunner, regathers
from autopar.runtime.optim import (
    Weight,
    check_runnable,
    clip_grad_norm_,
    master_of,
    plan_precision,
    state_names,
)
from autopar.schedules import Schedule, get_schedule
from autopar.trace import TracedModel, is_getitem

_STEP_RETURNS_OUTPUTS = "return_outputs" in inspect.signature(PipelineScheduleMulti.step).parameters


def _loss_nodes(traced: TracedModel) -> set[str]:
    """Ops that read the target, directly or not: they run in the schedule's loss_fn. A model
    that computes its own loss has no target: its last op (the loss) runs there alone."""
    gm = traced.graph_module
    if traced.target is None:
        return {traced.loss_node}
    target = traced.target
    tainted = {target}
    for n in _ops(gm):
        if any(a.name in tainted for a in n.all_input_nodes):
            tainted.add(n.name)
    tainted.discard(target)
    return tainted


def _ops(gm: fx.GraphModule) -> list[fx.Node]:
    """The ops that compute something: not export's `_assert_tensor_metadata` checks (no users,
    no value), which `ParallelModel` skips too (it runs only what the loss needs)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.users]


def split_stages(traced: TracedModel, plan: Plan):
    """(stage of every op node, inputs of each stage, outputs of each stage, loss-part inputs).

    A stage's inputs are the values made before it and read by it or after it; its outputs are
    the next stage's inputs (values read two stages later pass through the stage between).
    Parameters and buffers are not boundary values: each stage holds the ones it reads.
    """
    gm = traced.graph_module
    layer = assign_layers(traced)
    stages = plan.pipeline["stages"]
    stage_of_layer = {name: s for s, st in enumerate(stages) for name in st["layers"]}
    missing = sorted(set(layer.values()) - set(stage_of_layer))
    if missing:
        raise MeshError(f"the plan's pipeline stages do not place the layers {missing}")
    loss = _loss_nodes(traced)
    states = set(traced.parameters) | set(traced.buffers)
    stage_of: dict[str, int] = {}
    for n in _ops(gm):
        if n.name not in loss:
            stage_of[n.name] = stage_of_layer[layer[n.name]]
    first_input_stage = {name: 0 for name in traced.inputs}
    n_stages = len(stages)
    last_use: dict[str, int] = {}
    for n in _ops(gm):
        user_stage = n_stages if n.name in loss else stage_of[n.name]  # loss: after the last
        for a in n.all_input_nodes:
            if a.name in states:
                continue
            last_use[a.name] = max(last_use.get(a.name, -1), user_stage)
    made_in = {**first_input_stage, **stage_of}
    boundary = []  # boundary[s]: values live between stage s-1 and stage s (s = 0..n_stages)
    order = [n.name for n in gm.graph.nodes]
    for s in range(n_stages + 1):
        live = [
            v for v in order
            if v in made_in and v not in loss and made_in[v] < s <= last_use.get(v, -1)
            and v != traced.target
        ]
        boundary.append(live)
    boundary[0] = [i for i in traced.inputs if i != traced.target]
    return stage_of, boundary, loss


class StageModule(nn.Module):
    """One pipeline stage: its ops, run op by op like ParallelModel, on local tensors in and out."""

    def __init__(self, *, nodes, inputs, outputs, plan, mesh, device, params, buffers, placements,
                 layer, first, split=False, loss_nodes=(), replay=False, loss=None,
                 compiled=False):
        super().__init__()
        self.plan, self.mesh, self._device = plan, mesh, device
        self._nodes, self._in, self._out = nodes, inputs, outputs  # in/out: fx.Nodes
        self._ops = OpRunner(plan, mesh, device, {n.name: n for n in [*nodes, *loss_nodes]})
        self._params = params  # placeholder name -> nn.Parameter (shared between this rank's stages)
        self._split = split  # the schedule splits backward: outputs must not be views
        # the last stage holds the loss's parameters too: a split backward differentiates only
        # the stage's parameters()
        reads = {a.name for n in [*nodes, *loss_nodes] for a in n.all_input_nodes}
        self._held = nn.ParameterList([p for name, p in params.items() if name in reads])
        self._states = {**params, **buffers}  # placeholder name -> DTensor
        self._placements = placements  # value name -> placements it travels with
        self._layer, self._first = layer, first
        # a split backward (zero bubble) differentiates each op on its own: no traced layers
        self._runner = LayerRunner(nodes, self._ops.run_node, layer, plan.checkpoint or {},
                                   traced=replay and not split,
                                   wanted=[*outputs, *([loss] if loss is not None else [])],
                                   regather=set(params) if regathers(plan) else frozenset(),
                                   compiled=compiled)

    def forward(self, *locals_in):
        env: dict[fx.Node, object] = {}
        for node, value in zip(self._in, locals_in):
            pl = self._placements[node.name]
            if self._first:
                env[node] = shard_local(value.to(self._device), self.mesh, pl)
            else:
                env[node] = DTensor.from_local(value, self.mesh, pl, run_check=False)
        self.run(env)
        # contiguous: the send of an expanded (stride-0) value, such as an attention mask
        # broadcast over the batch, carries its storage, not its elements (seen with gloo)
        outs = tuple(
            env[n].redistribute(self.mesh, self._placements[n.name]).to_local().contiguous()
            for n in self._out
        )
        return tuple(o.clone() for o in outs) if self._split else outs

    def run(self, env: dict[fx.Node, object]) -> None:
        for n in {a for m in self._nodes for a in m.all_input_nodes}:
            if n not in env and n.name in self._states:
                env[n] = self._states[n.name]
        self._runner.run(env)


class PipelinedModel(nn.Module):
    """The stages of this rank and their schedule. `train_step(inputs, target)` runs one global
    batch (num_microbatches x microbatch_size) and returns the mean loss on every rank."""

    def __init__(self, model: nn.Module, traced: TracedModel, plan: Plan, mesh, *,
                 runtime: str = "replay"):
        super().__init__()
        replay = check_runtime(runtime) != "eager"
        compiled = runtime == "compile"
        if list(plan.mesh)[0] != PIPELINE:
            raise MeshError(f"a pipelined plan's mesh starts with 'pp', got {plan.mesh}")
        check_policies(plan.checkpoint or {})
        sched = _check_schedule(plan)
        self._split = split = sched.split_backward
        self.plan = plan
        self.mesh = mesh
        names = [a for a in plan.mesh if a != PIPELINE]
        self.sub = mesh[tuple(names)] if len(names) > 1 else mesh[names[0]]
        self.pp_group = mesh.get_group(PIPELINE)
        self.pp_rank = mesh.get_local_rank(PIPELINE)
        self.pp = plan.mesh[PIPELINE]
        device = mesh_device(mesh)
        stage_of, boundary, loss = split_stages(traced, plan)
        self.stage_split = stage_of, boundary, loss
        self._traced, self._loss = traced, loss
        layer = assign_layers(traced)
        placements = self._travel_placements(traced, boundary)
        self._placements = placements
        gm = traced.graph_module
        mine = [s for s, st in enumerate(plan.pipeline["stages"]) if st["rank"] == self.pp_rank]
        n_stages = len(plan.pipeline["stages"])
        self._params = self._make_params(model, traced, stage_of, loss, mine, device)
        carries_grad = _carries_grad(traced)
        buffers = {
            node: distribute_tensor(as_traced(traced.buffer(model, fqn).detach().to(device),
                                              traced.node(node)),
                                    self.sub, (Replicate(),) * self.sub.ndim)
            for node, fqn in traced.buffers.items()
        }
        self.stage_modules = nn.ModuleList()
        self.stages = []
        loss_nodes = [n for n in gm.graph.nodes if n.name in loss]
        self.whole_backward = []  # stages of a split schedule that run their backward whole
        for s in mine:
            nodes = [n for n in gm.graph.nodes if stage_of.get(n.name) == s]
            last = s == n_stages - 1
            module = StageModule(
                nodes=nodes, inputs=[traced.node(v) for v in boundary[s]],
                outputs=[traced.node(v) for v in boundary[s + 1]], plan=plan, mesh=self.sub,
                device=device, params=self._params, buffers=buffers, placements=placements,
                layer=layer, first=s == 0, split=split, loss_nodes=loss_nodes if last else (),
                replay=replay, compiled=compiled,
            )
            self.stage_modules.append(module)
            dw_builder = None
            if split and s > 0:
                out = [traced.node(traced.loss_node)] if last and loss_nodes else module._out
                if weight_only_outputs([*nodes, *(loss_nodes if last else ())], module._in,
                                        out, set(traced.parameters)):
                    # torch's I would miss these weights' gradients: with a dw_builder, torch
                    # runs the whole backward at I and calls what the builder returns at W
                    dw_builder = _nothing_left
                    self.whole_backward.append(s)
            self.stages.append(PipelineStage(
                module, s, n_stages, device, group=self.pp_group, dw_builder=dw_builder,
                input_args=self._example(boundary[s], s == 0, carries_grad),
                output_args=self._example(boundary[s + 1], False, carries_grad)))
        self._loss_module = StageModule(
            nodes=loss_nodes,
            inputs=[traced.node(v) for v in boundary[n_stages]], outputs=[], plan=plan,
            mesh=self.sub, device=device, params=self._params, buffers=buffers,
            placements=placements, layer=layer, first=False, split=split, replay=replay,
            compiled=compiled,
            loss=traced.node(traced.loss_node),
        )
        cls = get_schedule_class(plan.pipeline["schedule"])
        m = plan.pipeline["num_microbatches"]
        # Gradients are divided by m once per parameter in _settle_gradients: the schedule would
        # divide per stage, twice for a parameter two stages of this rank share.
        stages = self.stages if issubclass(cls, PipelineScheduleMulti) else self.stages[0]
        self.schedule = cls(stages, n_microbatches=m, loss_fn=self._loss_fn, scale_grads=False)
        self._num_microbatches = m
        self._has_first = 0 in mine
        self._has_last = (n_stages - 1) in mine
        self._target_name = traced.target

    def _travel_placements(self, traced, boundary):
        """Boundary values travel with their producer's output placements, Partial made whole;
        user inputs with the plan's input placements."""
        out = {}
        for name in traced.inputs:
            out[name] = placements_of(self.plan.inputs[name])
        for values in boundary:
            for v in values:
                if v in out:
                    continue
                node = traced.node(v)
                src, k = (node.args[0], node.args[1]) if is_getitem(node) else (node, 0)
                pl = placements_of(self.plan.ops[src.name].outputs[k])
                out[v] = tuple(Replicate() if p.is_partial() else p for p in pl)
        return out

    def _example(self, names: list[str], first: bool, carries_grad: set[str]) -> tuple:
        """What a stage receives or sends, as meta tensors, for torch's PipelineStage.

        Given them, torch does not infer them by running each stage once on uninitialised
        buffers before the first step: that run cost a forward and backward, and crashed where a
        stage indexes with a received integer tensor (a Hugging Face model's labels). The first
        stage receives whole microbatches (it shards them itself); the others local shards, in
        their travel placements."""
        out = []
        for name in names:
            val = self._traced.node(name).meta["val"]
            shape = tuple(val.shape) if first else local_shape(
                val.shape, self._placements[name], tuple(self.sub.shape))
            t = torch.empty(shape, dtype=val.dtype, device="meta")
            out.append(t.requires_grad_(not first and name in carries_grad))
        return tuple(out)

    def _make_params(self, model, traced, stage_of, loss, mine, device):
        """This rank's parameters: those its stages (or, on the last stage, the loss) read."""
        gm = traced.graph_module
        used_by: dict[str, set[int]] = {}
        n_stages = len(self.plan.pipeline["stages"])
        for n in _ops(gm):
            s = n_stages - 1 if n.name in loss else stage_of[n.name]
            for a in n.all_input_nodes:
                if a.name in traced.parameters:
                    used_by.setdefault(a.name, set()).add(s)
        self._shared = {  # parameters read on several pp ranks: their grads are summed over pp
            name for name, stages in used_by.items()
            if len({self.plan.pipeline["stages"][s]["rank"] for s in stages}) > 1
        }
        params = {}
        self._weights = []
        keeps_masters = check_runnable(plan_precision(self.plan)).keeps_masters
        for name, fqn in traced.parameters.items():
            if not used_by.get(name, set()) & set(mine):
                continue
            p = model.get_parameter(fqn)
            value = as_traced(p.detach().to(device), traced.node(name))  # the compute dtype
            dt = distribute_tensor(value, self.sub, placements_of(self.plan.parameters[fqn]))
            params[name] = nn.Parameter(dt, requires_grad=p.requires_grad)
            # a parameter two pp ranks share counts in the gradient norm on the first of them
            first = min(self.plan.pipeline["stages"][s]["rank"] for s in used_by[name])
            self._weights.append(Weight(fqn, params[name],
                                        master_of(p, params[name], keeps_masters),
                                        counted=first == self.pp_rank))
        self._all_params = {name: fqn for name, fqn in traced.parameters.items()}
        self.state_names = state_names(model, traced.parameters.values())
        return params

    def _loss_fn(self, output, target):
        values = output if isinstance(output, tuple) else (output,)
        env = {}
        for node, value in zip(self._loss_module._in, values):
            pl = self._placements[node.name]
            env[node] = DTensor.from_local(value, self.sub, pl, run_check=False)
        if self._target_name is not None:
            target_node = self._traced.node(self._target_name)
            env[target_node] = shard_local(target.to(value.device), self.sub,
                                            self._placements[self._target_name])
        self._loss_module.run(env)
        loss = env[self._traced.node(self._traced.loss_node)]
        loss = loss.redistribute(self.sub, (Replicate(),) * self.sub.ndim).to_local()
        return loss.clone() if self._split else loss  # torch detaches it in place after I

    def train_step(self, inputs, target=None) -> torch.Tensor:
        """Forward and backward on one global batch, through the plan's pipeline schedule
        (num_microbatches x microbatch_size); returns the mean loss (equal on every rank).

        Gradients land in `p.grad` of this rank's `self.parameters()` (its stages'), with the
        parameters' own placements, so any torch.optim optimizer can step them.
        """
        tensors = [as_traced(torch.as_tensor(t), self._traced.node(name)) for t, name in
                   zip(self._traced.layout.tensors(inputs, target), self._traced.inputs)]
        inputs = tensors[: self._traced.layout.n_tensors]
        if self._target_name is not None:
            target = tensors[self._traced.layout.n_tensors]
        else:
            # a model with its own loss: the schedule still splits a target into microbatches
            # and hands each to our loss_fn, which ignores it
            target = torch.zeros(self._num_microbatches)
        losses: list = []
        kwargs = {}
        if self._has_last:
            kwargs = {"target": target, "losses": losses}
            if _STEP_RETURNS_OUTPUTS:  # the stage outputs feed our loss_fn; nothing to merge
                kwargs["return_outputs"] = False
        args = inputs if self._has_first else ()
        self.schedule.step(*args, **kwargs)
        self._settle_gradients()
        # fp32 on every rank: the ranks without the loss cannot know its dtype (bf16 or not)
        mean = (torch.stack(losses).float().mean() if losses
                else torch.zeros((), device=mesh_device(self.mesh)))
        total = mean.detach().clone()
        dist.all_reduce(total, group=self.pp_group)  # only the last stage's rank adds a loss
        return total

    def eval_step(self, inputs, target=None) -> torch.Tensor:
        """The loss of one global batch, forward only, under `torch.no_grad()` (no gradients
        touched, no checkpointing); equal on every rank, as `train_step` returns it. Runs the
        stages microbatch by microbatch itself (`pipeline_eval`), not through the schedule."""
        return pipeline_eval.eval_step(self, inputs, target)

    def forward(self, *args, **kwargs):
        """Evaluation: the model's output (of a structured output, the first tensor that is not
        the loss: a Hugging Face model's logits) for inputs passed as to the model itself, as a
        full tensor on every rank (the microbatches' outputs joined along dim 0)."""
        return pipeline_eval.forward(self, args, kwargs)

    @property
    def traced(self) -> TracedModel:
        """The training graph of one microbatch: the one the plan was made for."""
        return self._traced

    def weights(self) -> list[Weight]:
        """This rank's parameters (and their fp32 masters under mixed precision), by FQN: what
        `autopar.optimizer` steps and `clip_grad_norm_` measures."""
        return list(self._weights)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` of the whole model, across every shard and stage
        (every rank calls it after `train_step`); returns the norm before clipping."""
        return clip_grad_norm_(self._weights, max_norm, norm_type, error_if_nonfinite)

    def _settle_gradients(self):
        buckets = GradientBuckets(self.sub)  # after the last microbatch: reduced once, bucketed
        for p in self._params.values():
            buckets.add(p)
        buckets.settle()
        for p in self._params.values():
            if p.grad is not None:
                p.grad.div_(self._num_microbatches)  # the loss is the mean over microbatches
        for name in sorted(self._shared):  # every pp rank takes part, in the same order
            p = self._params.get(name)
            if p is not None and p.grad is not None:
                local = p.grad.to_local()
            elif p is not None:
                local = torch.zeros_like(p.to_local())
            else:
                local = torch.zeros(self._parameter_local_shape(name), device=mesh_device(self.mesh),
                                    dtype=self._traced.node(name).meta["val"].dtype)
            dist.all_reduce(local, group=self.pp_group)
            if p is not None:
                p.grad = DTensor.from_local(local, self.sub, p.placements, run_check=False)

    def _parameter_local_shape(self, name):
        placements = placements_of(self.plan.parameters[self._all_params[name]])
        return local_shape(self._traced.node(name).meta["val"].shape, placements, self.sub.shape)


def _check_schedule(plan: Plan) -> Schedule:
    """The plan's schedule, if torch can run it at the plan's shape, checkpointing and stage
    ranks; else an error naming what differs and how to fix it."""
    p, pp = plan.pipeline, plan.mesh[PIPELINE]
    try:
        sched = get_schedule(p["schedule"])
        sched.check(pp, p["num_microbatches"], p["stages_per_rank"])
    except ValueError as e:
        raise MeshError(f"the plan's pipeline cannot run: {e}") from None
    refused = sched.checkpoint_problem(plan.checkpoint or {})
    if refused:
        raise AutoparError(refused)
    want = list(sched.stage_ranks(pp, p["stages_per_rank"]))
    have = [st["rank"] for st in p["stages"]]
    if have != want:
        raise MeshError(
            f"the plan puts its stages on pp ranks {have}, but torch's {sched.torch_class} runs "
            f"them on {want} ({'a V' if sched.placement == 'v' else 'stage s on rank s % pp'}): "
            f"set the stages' 'rank' to {want}, or re-plan with autopar.plan / manual_plan"
        )
    return sched


def _nothing_left():
    """dw_builder of a stage whose whole backward ran at I: its W has nothing to do."""
    return lambda: None


# aten ops whose output carries no gradient back to their tensor inputs
_NO_GRAD_OPS = {"detach", "lift_fresh_copy", "zeros_like", "ones_like", "empty_like",
                "full_like", "rand_like", "randn_like", "randint_like", "new_zeros", "new_ones",
                "new_empty", "new_full"}


def _floating(n: fx.Node) -> bool:
    val = n.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals)


def _carries_grad(traced: TracedModel) -> set[str]:
    """Values that require grad in training: floating values computed from a parameter that
    requires grad (user inputs never do)."""
    model = traced.graph_module
    out = {n for n in traced.parameters if _requires_grad(model, n)}
    for n in model.graph.nodes:
        if (n.op == "call_function" and _floating(n)
                and getattr(n.target, "_opname", "") not in _NO_GRAD_OPS
                and any(a.name in out for a in n.all_input_nodes)):
            out.add(n.name)
    return out


def _requires_grad(gm: fx.GraphModule, placeholder: str) -> bool:
    val = next(n for n in gm.graph.nodes if n.name == placeholder).meta.get("val")
    return bool(getattr(val, "requires_grad", True))


def weight_only_outputs(nodes, inputs, outputs, params: set[str]) -> list[str]:
    """Outputs of a stage that carry gradient to parameters but depend on no floating stage
    input: torch's split backward finds weight gradients only where a weight's path meets an
    input's path, so theirs would be lost."""
    from_input = {n for n in inputs if _floating(n)}
    from_params: set[fx.Node] = set()
    for n in nodes:
        if not _floating(n) or getattr(n.target, "_opname", "") in _NO_GRAD_OPS:
            continue
        args = n.all_input_nodes
        if any(a in from_input for a in args):
            from_input.add(n)
        elif any(a.name in params or a in from_params for a in args):
            from_params.add(n)
    return [o.name for o in outputs if o in from_params]
