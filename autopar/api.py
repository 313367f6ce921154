"""The public entry points: plan offline, or plan and compile inside a torchrun job."""

from __future__ import annotations

import json

import torch.distributed as dist
from torch import nn

from autopar.cluster import Cluster
from autopar.compile import ParallelModel, make_mesh
from autopar.errors import AutoparError, MeshError
from autopar.plan import Plan
from autopar.planner import make_plan
from autopar.profile import TrainingPrecision
from autopar.trace import TracedModel, trace


def _trace(model: nn.Module, example_inputs, loss_fn) -> TracedModel:
    if loss_fn is None:
        return trace(model, example_inputs)
    if not (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2):
        raise AutoparError(
            "with a loss_fn, example_inputs must be (inputs, target) as train_step takes them, "
            f"got {type(example_inputs).__name__} of length "
            f"{len(example_inputs) if hasattr(example_inputs, '__len__') else '?'}"
        )
    inputs, target = example_inputs
    return trace(model, inputs, loss_fn=loss_fn, target=target)


def plan(
    model: nn.Module,
    cluster: Cluster,
    example_inputs,
    *,
    loss_fn=None,
    mesh: dict[str, int] | None = None,
    memory_limit: float | None = None,
    precision: TrainingPrecision | None = None,
    solver: str = "highs",
    time_limit: float | None = None,
) -> Plan:
    """Plan `model` for `cluster` offline: no process group, no GPU, meta-device models fine.

    `example_inputs` is one global batch as `train_step` takes it: the inputs, or
    `(inputs, target)` when `loss_fn` is given. `mesh` fixes the mesh shape (e.g.
    `{"dp": 2, "tp": 2}`); without it every dp x tp shape is tried. `memory_limit` is bytes per
    device (default: the device's memory).
    """
    traced = _trace(model, example_inputs, loss_fn)
    return make_plan(
        traced,
        cluster,
        mesh=mesh,
        memory_limit_bytes=memory_limit,
        precision=precision,
        solver=solver,
        time_limit_s=time_limit,
    )


def autoparallelize(
    model: nn.Module,
    cluster: Cluster | None = None,
    example_inputs=None,
    *,
    loss_fn=None,
    mesh: dict[str, int] | None = None,
    plan: Plan | None = None,
    **options,
) -> ParallelModel:
    """Plan (or load `plan`) and shard `model` over this torchrun job's processes.

    Every rank must call it with the same model (same initial weights: rank 0's are used) and
    the same example inputs. Returns a ParallelModel whose `train_step(inputs, target)` runs one
    forward and backward.
    """
    if example_inputs is None:
        raise AutoparError("autoparallelize needs example_inputs: one global batch.")
    if cluster is None:
        cluster = Cluster.detect()
    if dist.is_initialized() and plan is None and cluster.world_size != dist.get_world_size():
        raise MeshError(
            f"cluster {cluster.name!r} has {cluster.world_size} devices but this job has "
            f"{dist.get_world_size()} processes: describe the devices the job runs on "
            f"(Cluster.detect() does) or launch {cluster.world_size} processes."
        )
    traced = _trace(model, example_inputs, loss_fn)
    if plan is None:
        plan = _plan_on_rank0(traced, cluster, mesh, _planner_options(options))
    world = dist.get_world_size() if dist.is_initialized() else None
    plan.check_matches(graph_fingerprint=traced.fingerprint, world_size=world or plan.world_size)
    return ParallelModel(model, traced, plan, make_mesh(plan))


def _plan_on_rank0(traced: TracedModel, cluster: Cluster, mesh, options: dict) -> Plan:
    """Rank 0 plans, the others receive its plan: one solve, and every rank runs the same plan."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make_plan(traced, cluster, mesh=mesh, **options)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = make_plan(traced, cluster, mesh=mesh, **options).to_json()
        except AutoparError as e:  # every rank raises the same clear error
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return Plan.from_dict(json.loads(box[0]))


def _planner_options(options: dict) -> dict:
    renames = {"memory_limit": "memory_limit_bytes", "time_limit": "time_limit_s"}
    allowed = {"memory_limit", "time_limit", "solver", "precision"}
    unknown = set(options) - allowed
    if unknown:
        raise AutoparError(
            f"unknown option(s) {sorted(unknown)}; autoparallelize takes {sorted(allowed)}"
        )
    return {renames.get(k, k): v for k, v in options.items()}
