"""Check a node's strategies against unsharded execution, with every rank simulated in-process.

    real_values          run a traced graph on real tensors: node -> its value (valid indices,
                         masks and shapes for free)
    enumerate_strategies every strategy the planner can emit per node, walked as
                         `planner.build_problem` walks the graph
    simulated_mesh       a DeviceMesh over a fake process group, and a LocalTensorMode that runs
                         DTensor numerically at every rank of it
    check_strategy       run one node under one strategy exactly as the runtime's `OpRunner.call`
                         does and compare outputs and input gradients with the unsharded op

The simulation is `torch.distributed._local_tensor.LocalTensorMode` (private, torch >= 2.10): a
LocalTensor holds one shard per rank, collectives combine them, so values are exact at every rank
without processes. Partial inputs are split unevenly with sign-varying offsets, as DTensor's own
`strategy_validation.py` does, so that an op which is not linear cannot pass by accident.
Floating values run in float64 (strides kept), so rounding never trips the fp32 tolerances
(rtol 1e-5, atol 1e-6) and any mismatch is a wrong strategy.
"""

from __future__ import annotations

import contextlib
import operator
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
from torch import fx
from torch.distributed._local_tensor import (
    LocalTensor,
    LocalTensorMode,
    maybe_disable_local_tensor_mode,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from autopar import dtensor
from autopar.plan import OpSharding, placement_to_str
from autopar.planning.intra_op import decision_nodes, output_options
from autopar.planning.strategies import Strategy, node_strategies, placement_options, tensor_inputs
from autopar.runtime.op_runner import OpRunner
from autopar.trace import TracedModel

RTOL, ATOL = 1e-5, 1e-6


# -- the graph ---------------------------------------------------------------------------------


def real_values(traced: TracedModel, model: torch.nn.Module, args: tuple) -> dict[fx.Node, object]:
    """Every node's value when the traced graph runs on `model`'s weights and `args`
    (the user inputs, the target last)."""
    env: dict[fx.Node, object] = {}
    user = dict(zip(traced.inputs, args))
    for n in traced.graph_module.graph.nodes:
        if n.op == "placeholder":
            if n.name in traced.parameters:
                env[n] = model.get_parameter(traced.parameters[n.name]).detach()
            elif n.name in traced.buffers:
                env[n] = model.get_buffer(traced.buffers[n.name]).detach()
            elif n.name in user:
                env[n] = user[n.name]
        elif n.op == "call_function":
            fn_args, fn_kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
            env[n] = n.target(*fn_args, **fn_kwargs)
    return env


def enumerate_strategies(traced: TracedModel, mesh_shape: tuple[int, ...]) -> dict[str, list]:
    """Strategies per decision node, as `planner.build_problem` finds them.

    Placeholders take every even placement (`placement_options`): a superset of what any axis
    naming allows them ("dp" axes fix inputs to Shard(0), others to Replicate), so every op
    strategy reachable under some naming is reached here.
    """
    names = [f"axis{i}" for i in range(len(mesh_shape))]
    pmesh = dtensor.planning_mesh(mesh_shape, names)
    strategies: dict[str, list[Strategy]] = {}
    for n in decision_nodes(traced.graph_module):
        if n.op == "placeholder":
            shape = n.meta["val"].shape
            strategies[n.name] = [
                Strategy((), (pl,), "input") for pl in placement_options(shape, mesh_shape)
            ]
        else:
            options = [output_options(a, strategies) for a in tensor_inputs(n)]
            strategies[n.name] = node_strategies(n, pmesh, options)
    return strategies


# -- the simulated ranks -----------------------------------------------------------------------


@contextlib.contextmanager
def simulated_mesh(mesh_shape: tuple[int, ...]):
    """(DeviceMesh, LocalTensorMode) over a fake process group of prod(mesh_shape) ranks.

    The mode is returned disabled-by-default; enter it (`with mode:`) around sharded work only.
    """
    world = int(torch.tensor(mesh_shape).prod())
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        names = tuple(f"axis{i}" for i in range(len(mesh_shape)))
        mesh = DeviceMesh("cpu", torch.arange(world).view(*mesh_shape), mesh_dim_names=names)
        yield mesh, LocalTensorMode(world)
    finally:
        dist.destroy_process_group()


def _coordinates(mesh: DeviceMesh) -> dict[int, tuple[int, ...]]:
    grid = mesh.mesh
    return {int(grid[idx]): idx for idx in _all_indices(tuple(grid.shape))}


def _all_indices(shape):
    if not shape:
        return [()]
    return [(i, *rest) for i in range(shape[0]) for rest in _all_indices(shape[1:])]


def _split_partial(local: LocalTensor, axis: int, reduce_op: str, mesh, gen) -> LocalTensor:
    """Per-rank values that reduce over mesh axis `axis` to each rank's current value."""
    n = mesh.shape[axis]
    coords = _coordinates(mesh)
    if not isinstance(local, LocalTensor):  # replicated shards may come back as one tensor
        local = LocalTensor({r: local.detach().clone() for r in coords})
    any_local = next(iter(local._local_tensors.values()))
    noise = torch.randn(any_local.shape, generator=gen, dtype=any_local.dtype)
    ratios = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    ratios = (ratios / ratios.sum()).tolist()  # uneven, sum to 1
    offsets = [1.0] * (n - 1) + [-(n - 1.0)]  # sign-varying, sum to 0
    out = {}
    for rank, t in local._local_tensors.items():
        c = coords[rank][axis]
        if reduce_op == "sum":
            out[rank] = t * ratios[c] + noise * offsets[c]
        elif reduce_op == "avg":
            out[rank] = (t * ratios[c] + noise * offsets[c]) * n
        elif reduce_op in ("max", "min"):
            gap = noise.abs() + 1.0
            out[rank] = t if c == 0 else (t - gap if reduce_op == "max" else t + gap)
        else:
            raise NotImplementedError(f"Partial({reduce_op}) inputs are not simulated")
    return LocalTensor({r: v.detach() for r, v in out.items()})


def sharded_input(value: torch.Tensor, placements, mesh, gen) -> DTensor:
    """A leaf DTensor whose full value is `value`, laid out as `placements` (Partial included)."""
    plain = tuple(Replicate() if isinstance(p, Partial) else p for p in placements)
    dt = distribute_tensor(value.detach(), mesh, plain)
    if plain != tuple(placements):
        local = dt.to_local()
        for axis, p in enumerate(placements):
            if isinstance(p, Partial):
                with maybe_disable_local_tensor_mode():
                    local = _split_partial(local, axis, p.reduce_op, mesh, gen)
        dt = DTensor.from_local(
            local, mesh, placements, run_check=False, shape=dt.shape, stride=dt.stride()
        )
    if value.dtype.is_floating_point:
        dt.requires_grad_(True)
    return dt


# -- one strategy ------------------------------------------------------------------------------


def _strs(pl):
    return [placement_to_str(p) for p in pl]


def _run_as_compile(node: fx.Node, strategy: Strategy, env: dict, mesh):
    """The runtime's `OpRunner.call` on a plan that holds just this node's strategy."""
    op = OpSharding(
        inputs=[_strs(pl) for pl in strategy.inputs],
        outputs=[_strs(pl) if pl is not None else [] for pl in strategy.outputs],
        rule=strategy.rule,
    )
    plan = SimpleNamespace(  # made with this torch: the strategy came from its DTensor
        ops={node.name: op}, made_with={"torch": torch.__version__}, data_parallel="replicate")
    return OpRunner(plan, mesh, torch.device("cpu"), {node.name: node}).call(node, env)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (tuple, list)) else [x]


def _differs(name: str, got, want: torch.Tensor) -> str | None:
    """Why a simulated full tensor (a LocalTensor, one copy per rank) is not `want`."""
    per_rank = got._local_tensors if isinstance(got, LocalTensor) else {0: got}
    for rank, t in sorted(per_rank.items()):
        if tuple(t.shape) != tuple(want.shape):
            return f"{name}: shape {tuple(t.shape)} on rank {rank}, expected {tuple(want.shape)}"
        if want.dtype.is_floating_point:
            close = torch.allclose(t.double(), want.double(), rtol=RTOL, atol=ATOL)
        else:
            close = torch.equal(t, want)
        if not close:
            diff = (t.double() - want.double()).abs().max().item()
            return f"{name}: rank {rank} differs from unsharded (max abs diff {diff:.3g})"
    return None


def _exact(x):
    """Floating values in float64: a right strategy then matches to ~1e-15 whatever order it
    sums in, so the tolerances only ever catch wrong strategies, never rounding."""
    if not (isinstance(x, torch.Tensor) and x.dtype.is_floating_point):
        return x
    # keep the strides: a non-contiguous input takes other paths (compile's view fix);
    # an expanded value (stride 0) cannot be written with its strides, so it becomes dense
    if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
        return x.to(torch.float64)
    return torch.empty_strided(x.shape, x.stride(), dtype=torch.float64).copy_(x)


def _loss(outs: list, weights: dict[int, torch.Tensor]):
    terms = [(outs[k] * w).sum() for k, w in weights.items() if outs[k].requires_grad]
    return sum(terms) if terms else None


def _reference(node: fx.Node, inputs: dict, weights: dict[int, torch.Tensor]):
    """Unsharded outputs, and the gradient of sum(out * weight) per input node."""
    leaves = {
        a: x.detach().clone().requires_grad_(x.dtype.is_floating_point) for a, x in inputs.items()
    }
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: leaves[a])
    outs = _as_list(node.target(*args, **kwargs))
    loss = _loss(outs, weights)
    wants = [a for a, x in leaves.items() if x.requires_grad]
    grads = dict.fromkeys(leaves)
    if loss is not None and wants:
        found = torch.autograd.grad(loss, [leaves[a] for a in wants], allow_unused=True)
        grads.update(zip(wants, found))
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in outs], grads


def check_strategy(node, strategy, values, mesh, mode, gen) -> list[str]:
    """Why `strategy` is wrong for `node`: empty when the op, run as compile runs it, gives
    the unsharded outputs, the promised output placements and the unsharded input gradients.

    `values` maps each node to its real unsharded value (see `real_values`); `mode` is the
    LocalTensorMode of `mesh`; `gen` draws the Partial splits and the output weights.
    """
    ins = tensor_inputs(node)
    # one value per input node; a node feeding two slots is laid out as its first slot says
    # and redistributed for the second, as compile does
    first_pl = {}
    for a, pl in zip(ins, strategy.inputs):
        first_pl.setdefault(a, pl)
    inputs = {a: _exact(values[a]) for a in first_pl}
    weights = {
        k: torch.randn(o.shape, generator=gen, dtype=torch.float64)
        for k, o in enumerate(_as_list(values[node]))
        if isinstance(o, torch.Tensor) and o.dtype.is_floating_point
    }
    ref_outs, ref_grads = _reference(node, inputs, weights)
    with mode:
        env = {a: sharded_input(inputs[a], pl, mesh, gen) for a, pl in first_pl.items()}
        try:
            outs = _as_list(_run_as_compile(node, strategy, env, mesh))
        except Exception as e:  # a strategy that cannot even run is wrong
            return [f"raised {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"]
        errors, fulls = _check_outputs(strategy, outs, ref_outs)
        loss = _loss(list(fulls.values()), {i: weights[k] for i, k in enumerate(fulls)})
        if errors or loss is None:
            return errors
        loss.backward()
        for a, dt in env.items():
            if dt.requires_grad:
                want = ref_grads[a] if ref_grads[a] is not None else torch.zeros_like(inputs[a])
                got = dt.grad.full_tensor() if dt.grad is not None else torch.zeros_like(want)
                errors.append(_differs(f"grad of {a.name}", got, want))
    return [e for e in errors if e]


def _check_outputs(strategy: Strategy, outs: list, ref_outs: list):
    """Errors of the op's outputs, and their full values (float outputs, by output index)."""
    errors, fulls = [], {}
    for k, (want, got) in enumerate(zip(ref_outs, outs)):
        if not isinstance(want, torch.Tensor):
            continue
        if not isinstance(got, DTensor):
            errors.append(f"output {k} is a {type(got).__name__}, not a DTensor")
            continue
        promised = strategy.outputs[k]
        if promised is not None and tuple(got.placements) != tuple(promised):
            errors.append(
                f"output {k} placed {_strs(got.placements)}, strategy promised {_strs(promised)}"
            )
        full = got.full_tensor()
        if want.dtype.is_floating_point:
            fulls[k] = full
        if (why := _differs(f"output {k}", full, want)) is not None:
            errors.append(why)
    return errors, fulls


def describe(node: fx.Node, strategy: Strategy) -> str:
    """`name (op) rule: ([in placements], ...) -> ([out placements], ...)`"""
    ins = ", ".join("[" + ",".join(_strs(pl)) + "]" for pl in strategy.inputs)
    outs = ", ".join(
        "[" + ",".join(_strs(pl)) + "]" if pl is not None else "-" for pl in strategy.outputs
    )
    return f"{node.name} ({node.target}) {strategy.rule}: ({ins}) -> ({outs})"


def is_checked_op(node: fx.Node) -> bool:
    """An op with strategies of its own (getitem only picks an output of one)."""
    return node.op == "call_function" and node.target is not operator.getitem
