"""Turn a traced graph and its Plan into a program that runs on a DeviceMesh.

    make_mesh           the DeviceMesh the plan names (NCCL on GPUs, gloo on CPU)
    shard_parameters    every parameter becomes a DTensor with its planned placements
    ParallelModel       runs the graph op by op: inputs of each op are redistributed to the
                        placements the plan chose, then the op runs on DTensors (or on local
                        shards, for ops with our own rule)

Running the same ATen graph the planner saw, with the same DTensor propagation, is what makes
the predicted communication the communication that happens.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.checkpoint import checkpoint

from autopar import dtensor
from autopar.errors import MeshError
from autopar.layers import assign_layers
from autopar.plan import Plan, placement_from_str
from autopar.planning.strategies import dtensor_runs, tensor_inputs
from autopar.runtime.gradient_buckets import GradientBuckets
from autopar.runtime.layer_runner import LayerRunner, check_policies, check_runtime
from autopar.trace import TracedModel, is_getitem


def make_mesh(plan: Plan):
    """The plan's mesh over the running job's ranks."""
    if not dist.is_initialized():
        raise MeshError(
            "autoparallelize needs a process group: launch with torchrun "
            "(torchrun --nproc_per_node N train.py) or call torch.distributed.init_process_group."
        )
    world = dist.get_world_size()
    if world != plan.world_size:
        mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
        raise MeshError(
            f"the plan's mesh ({mesh}) needs {plan.world_size} processes, this job has {world}: "
            f"launch with --nproc_per_node {plan.world_size} or give a mesh whose sizes multiply "
            f"to {world}."
        )
    device_type = plan.cluster.get("device_type", "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return init_device_mesh(device_type, tuple(plan.mesh.values()), mesh_dim_names=tuple(plan.mesh))


def _placements(strings):
    return tuple(placement_from_str(s) for s in strings)


class ParallelModel(nn.Module):
    """The user's model, sharded as `plan` says. `train_step` runs forward and backward."""

    def __init__(self, model: nn.Module, traced: TracedModel, plan: Plan, mesh, *,
                 runtime: str = "replay"):
        super().__init__()
        self.plan = plan
        self._replay = check_runtime(runtime) == "replay"
        self._runners: dict[tuple[str, bool], tuple[LayerRunner, list[fx.Node]]] = {}
        self.mesh = mesh
        self._traced = traced
        self._graph = traced.graph_module.graph
        self._device = _mesh_device(mesh)
        self._params = nn.ParameterDict()
        self._names: dict[str, str] = {}  # placeholder name -> key in self._params
        for node_name, fqn in traced.parameters.items():
            param = model.get_parameter(fqn)
            key = fqn.replace(".", "__")
            placements = _placements(plan.parameters[fqn])
            dt = distribute_tensor(param.detach().to(self._device), mesh, placements)
            self._params[key] = nn.Parameter(dt, requires_grad=param.requires_grad)
            self._names[node_name] = key
        self._buffers_by_node = {
            node_name: distribute_tensor(
                model.get_buffer(fqn).detach().to(self._device), mesh, (Replicate(),) * mesh.ndim
            )
            for node_name, fqn in traced.buffers.items()
        }
        self._nodes = {n.name: n for n in self._graph.nodes}
        self._no_rule_here = _ops_without_a_rule_here(plan, self._nodes)
        self._layer = assign_layers(traced)
        check_policies(getattr(plan, "checkpoint", None) or {})
        # each gradient joins a bucket of data-parallel reductions as soon as backward has made
        # it; the buckets' collectives overlap the rest of backward (DDP's overlap)
        self._buckets = GradientBuckets(mesh)
        for p in self._params.values():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._buckets.add)

    # -- public ---------------------------------------------------------------------------

    def train_step(self, inputs, target=None) -> torch.Tensor:
        """Forward and backward on one global batch; returns the loss (equal on every rank).

        Gradients land in `p.grad` of `self.parameters()` with the parameters' own placements,
        so any torch.optim optimizer can step them.
        """
        loss = self._run(_as_tuple(inputs), target, self._traced.loss_node)
        loss = loss.redistribute(self.mesh, (Replicate(),) * self.mesh.ndim)
        loss.backward()
        self._settle_gradients()
        return loss.to_local().detach()

    def forward(self, *inputs):
        """Evaluation: the model's output for `inputs`, as a full tensor on every rank."""
        out = self._run(inputs, None, self._traced.output_node)
        return out.full_tensor() if isinstance(out, DTensor) else out

    # -- the interpreter ------------------------------------------------------------------

    def _run(self, inputs: tuple, target, want: str):
        values = list(inputs) + ([target] if target is not None else [])
        user = dict(zip(self._traced.inputs, values))
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
                ops, self._run_node, self._layer, checkpointing,
                traced=self._replay and training, wanted=[self._nodes[want]],
                regather=set(self._names) if _reshards(self.plan) else frozenset(),
            )
            placeholders = [n for n in self._graph.nodes if n in needed and n.op == "placeholder"]
            self._runners[key] = runner, placeholders
        return self._runners[key]

    def _run_node(self, node: fx.Node, env: dict) -> None:
        if is_getitem(node):
            env[node] = env[node.args[0]][node.args[1]]
            return
        try:
            env[node] = self._call(node, env)
        except Exception as e:
            e.add_note(
                f"while running node {node.name} ({node.target}) planned as "
                f"{self.plan.ops[node.name]}"
            )
            raise

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
        value = torch.as_tensor(user[node.name]).to(self._device)
        expected = tuple(node.meta["val"].shape)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"input '{node.name}' has shape {tuple(value.shape)}, the plan was made for "
                f"{expected}: pass one global batch of the planned shape, or re-plan."
            )
        return _shard_local(value, self.mesh, _placements(self.plan.inputs[node.name]))

    def _call(self, node: fx.Node, env: dict):
        op = self.plan.ops[node.name]
        no_rule = node.name in self._no_rule_here
        wanted = [_placements(p) for p in op.inputs]
        if no_rule:
            wanted = [(Replicate(),) * self.mesh.ndim] * len(wanted)
        refs = iter(wanted)

        zero3 = _reshards(self.plan)

        def arg(a):
            if isinstance(a, fx.Node):
                value, target = env[a], next(refs)
                if zero3 and a.op == "placeholder" and tuple(value.placements) != target:
                    # ZeRO-3 / FSDP's reshard-after-forward: gather the sharded parameter for
                    # this op, keep only the shard for backward and gather again there
                    return checkpoint(_redistribute, value, self.mesh, target,
                                      use_reentrant=False)
                return _redistribute(value, self.mesh, target)
            if isinstance(a, torch.device):
                return self._device
            return a

        args, kwargs = tree_map(arg, (node.args, node.kwargs))
        outputs = [_placements(p) if p else None for p in op.outputs]
        if node.target in _VIEWS:
            return _view_locally(node, args[0], outputs[0], self.mesh)
        if no_rule:  # whole on every rank, then the plan's placements (see _ops_without_a_rule_here)
            whole = [(Replicate(),) * self.mesh.ndim if p else None for p in outputs]
            result = _call_locally(node, args, kwargs, whole, self.mesh)
            return _to_placements(result, outputs, self.mesh)
        if op.rule == "dtensor":
            return node.target(*args, **kwargs)
        return _call_locally(node, args, kwargs, outputs, self.mesh)

    def _settle_gradients(self):
        """Reduce partial gradients (e.g. of replicated weights under a split batch) so every
        gradient has its parameter's placements (the hooks' buckets did it for most)."""
        self._buckets.settle()
        for p in self._params.values():
            if p.grad is not None and tuple(p.grad.placements) != tuple(p.placements):
                p.grad = p.grad.redistribute(self.mesh, p.placements)


def _reshards(plan: Plan) -> bool:
    """Whether parameters are gathered for each use and resharded after forward: ZeRO-3, and
    hybrid sharding (ZeRO-3 inside each shard group)."""
    return getattr(plan, "data_parallel", "replicate") in ("zero3", "hsdp")


def _ops_without_a_rule_here(plan: Plan, nodes: dict[str, fx.Node]) -> frozenset[str]:
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
            mesh is not None and not dtensor_runs(node, [_placements(p) for p in op.inputs], mesh)
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
    moved = [_redistribute(r, mesh, pl) if isinstance(r, DTensor) and pl else r
             for r, pl in zip(results, placements)]
    return type(result)(moved) if isinstance(result, (tuple, list)) else moved[0]


def _redistribute(x: DTensor, mesh, placements) -> DTensor:
    """x with `placements`; Partial(sum) targets are reached from Replicate by `to_partial`."""
    if tuple(x.placements) == tuple(placements):
        return x
    partial_axes = [
        a for a, p in enumerate(placements) if isinstance(p, Partial) and x.placements[a] != p
    ]
    if not partial_axes:
        return x.redistribute(mesh, placements)
    staged = tuple(Replicate() if a in partial_axes else p for a, p in enumerate(placements))
    return to_partial(x.redistribute(mesh, staged), partial_axes)


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
    local_shape = _local_shape(out.shape, out_placements, mesh.shape)
    return dtensor.local_call(
        lambda t: t.reshape(local_shape),
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

    def run(*local):
        filled = list(leaves)
        for i, t in zip(slots, local):
            filled[i] = t
        a, k = tree_unflatten(filled, spec)
        return node.target(*a, **k)

    val = node.meta["val"]
    vals = tuple(val) if isinstance(val, (tuple, list)) else (val,)
    if not slots:  # a factory: nothing to differentiate
        result = run()
        results = result if isinstance(result, (tuple, list)) else (result,)
        wrapped = [
            DTensor.from_local(r, mesh, pl, run_check=False) for r, pl in zip(results, outputs)
        ]
        return type(result)(wrapped) if isinstance(result, (tuple, list)) else wrapped[0]
    split = {a for pl in outputs if pl for a, p in enumerate(pl) if not isinstance(p, Replicate)}
    in_grad = [
        tuple(
            Partial("sum") if a in split and isinstance(p, Replicate) else p
            for a, p in enumerate(dtensor.for_grad(leaves[i].placements))
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


# Ops that only reinterpret their input's shape: run on local shards (see _view_locally).
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def _local_shape(shape, placements, mesh_shape) -> tuple[int, ...]:
    """A shard's shape: every Shard(d) divides dim d by its axis size (plans shard evenly)."""
    local = list(shape)
    for p, n in zip(placements, mesh_shape):
        if isinstance(p, Shard):
            local[p.dim] //= n
    return tuple(local)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def _shard_local(value: torch.Tensor, mesh, placements) -> DTensor:
    """Every rank holds the whole global batch: keep this rank's slice, no communication."""
    replicated = DTensor.from_local(value, mesh, (Replicate(),) * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, placements)


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
