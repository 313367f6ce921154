"""The public entry points: plan offline, or plan and compile inside a torchrun job."""

from __future__ import annotations

import inspect
import json
import math

import torch.distributed as dist
from torch import nn

from autopar import parallelism
from autopar.batches import batch_size, floating_to, microbatch_inputs
from autopar.cluster import Cluster
from autopar.errors import AutoparError, InfeasibleError, MeshError
from autopar.layers import assign_layers, layer_order
from autopar.parallelism import POLICIES, check_runtime
from autopar.plan import Plan
from autopar.planning import context_parallel, search
from autopar.planning.assemble import candidate_plan
from autopar.planning.fixed_mesh import check_divides
from autopar.planning.manual import hand_configuration
from autopar.planning.profile import TrainingPrecision, parameter_state_bytes
from autopar.precision import compute_view, model_dtype
from autopar.precision import resolve as resolve_precision
from autopar.runtime.mesh import make_mesh
from autopar.runtime.optim import check_runnable, plan_precision
from autopar.runtime.parallel_model import ParallelModel
from autopar.runtime.pipeline import PipelinedModel
from autopar.trace import trace_for_training
from autopar.trace_repeats import tracer
from autopar.units import format_bytes


def plan(
    model: nn.Module,
    cluster: Cluster,
    example_inputs,
    *,
    loss_fn=None,
    mesh: dict[str, int] | None = None,
    memory_limit: float | None = None,
    precision: TrainingPrecision | str | None = None,
    solver: str = "highs",
    time_limit: float | None = None,
    schedule: str | None = None,
    microbatch_size: int | None = None,
    data_parallel: str | None = None,
    checkpoint: bool = True,
    log=None,
) -> Plan:
    """Plan `model` for `cluster` offline: no process group, no GPU, meta-device models fine.

    `example_inputs` is one global batch as `train_step` takes it: the inputs, or
    `(inputs, target)` when `loss_fn` is given. Searched (`autopar.planning.search`): every
    mesh of the axes in `autopar.parallelism.AXES` (pp x dp x tp), microbatch size, schedule
    (`search.DEFAULT_SCHEDULES`), data-parallel flavour (`parallelism.FLAVOURS`: replicate,
    zero2, zero3, hybrid sharding) and per-layer checkpointing, with stage cuts solved exactly.

    Options fix parts of the search: `mesh` (e.g. `{"pp": 2, "dp": 2, "tp": 2}`; missing axes
    are 1), `schedule` (a name in `autopar.schedules.SCHEDULES`), `microbatch_size` (samples per
    data-parallel rank, as Megatron-LM's --micro-batch-size; the plan's
    `pipeline["microbatch_size"]` is the traced microbatch, dp times that), `data_parallel`
    ("replicate", "zero2", "zero3", "hsdp"), `checkpoint=False` (never checkpoint; by default
    each block may be checkpointed "full" or "selective"). `memory_limit` is
    bytes per device (default: the device's memory). A pipelined plan's graph is that of
    `autopar.batches.microbatch_inputs(example_inputs, plan.pipeline["microbatch_size"])`.
    `precision`: "fp32", "bf16-mixed" or an `autopar.TrainingPrecision` (default: the model's
    dtype's, see `autopar.precision.resolve`); the model is traced and priced in its compute
    dtype whatever dtype it was built in, and floating inputs are cast to it.
    """
    precision = resolve_precision(precision, model)
    example_inputs = floating_to(example_inputs, precision.dtype)
    with compute_view(model, precision.dtype):
        return _search(model, cluster, example_inputs, loss_fn=loss_fn, mesh=mesh,
                       memory_limit=memory_limit, precision=precision, solver=solver,
                       time_limit=time_limit, schedule=schedule, microbatch_size=microbatch_size,
                       data_parallel=data_parallel, checkpoint=checkpoint, log=log)


def _search(model, cluster, example_inputs, *, loss_fn, mesh, memory_limit, precision, solver,
            time_limit, schedule, microbatch_size, data_parallel, checkpoint, log) -> Plan:
    """`plan` once the precision is settled and the model seen in its compute dtype."""
    inputs_only = example_inputs[0] if loss_fn is not None else example_inputs
    _check_state_fits(model, cluster, precision, memory_limit)
    trace_fn = tracer(model, loss_fn)
    probe = trace_fn(example_inputs)
    n_layers = len(layer_order(assign_layers(probe)))
    if mesh is not None:
        meshes = [parallelism.full_mesh(mesh, cluster.world_size)]
    batch = batch_size(inputs_only)
    if mesh is None:
        budget = memory_limit if memory_limit is not None else cluster.device.memory_bytes
        meshes = search.candidate_meshes(cluster, n_layers, _expert_count(probe),
                                         context_parallel.search_sizes(probe, batch, budget))
    if mesh is not None or microbatch_size is not None:
        # a fixed mesh must take the batch (and the microbatch size); among the searched ones,
        # those that do not are left out, and only when none is left is that an error
        fitting, refused = [], None
        for m in meshes:
            try:
                # heads=False: the intra-op ILP leaves heads whole where tp does not divide them
                # (Llama's 2 kv heads on tp=4 train exactly); only hand configurations split them
                check_divides(probe, m, batch, microbatch_size or 1, n_layers, schedule,
                              heads=False)
            except MeshError as e:
                refused = refused or e
            else:
                fitting.append(m)
        if not fitting:
            raise refused
        meshes = fitting
    if data_parallel is not None:
        parallelism.get_flavour(data_parallel)  # an unknown name: an error listing the flavours
    space = search.SearchSpace(
        meshes=meshes,
        microbatch_sizes=[microbatch_size] if microbatch_size else None,
        schedules=(search.check_schedule(schedule),) if schedule else search.DEFAULT_SCHEDULES,
        flavours=(data_parallel,) if data_parallel else parallelism.flavour_names(),
        checkpoint=POLICIES if checkpoint else ("none",),
    )
    return search.search(
        trace_fn, example_inputs, cluster, space, memory_limit_bytes=memory_limit,
        precision=precision, solver=solver, time_limit_s=time_limit, log=log,
    )


def _check_state_fits(model: nn.Module, cluster: Cluster, precision: TrainingPrecision,
                      memory_limit: float | None) -> None:
    """Fail at once, before any trace, when the model's parameters, gradients and optimizer
    state alone cannot fit: every plan holds all of it somewhere, so some device holds at least
    its share over every device (all of it sharded evenly, no activations), whatever the mesh."""
    budget = memory_limit if memory_limit is not None else cluster.device.memory_bytes
    total = 0.0
    for p in model.parameters():  # each tensor once, tied ones included
        state = parameter_state_bytes(p.numel(), precision)
        total += sum(state.values()) if p.requires_grad else state["parameters"]
    share = total / cluster.world_size
    if share > budget:
        need = math.ceil(total / budget)
        raise InfeasibleError(
            f"no plan fits the memory limit of {format_bytes(budget)} per device: the model's "
            f"parameters, gradients and optimizer state alone take {format_bytes(total)}, "
            f"{format_bytes(share)} per device even sharded over all {cluster.world_size} "
            f"devices. Use at least {need} devices of this memory, raise memory_limit, or "
            "train in a precision that holds less per parameter.",
            min_peak_bytes=share, budget_bytes=budget,
        )


def manual_plan(
    model: nn.Module,
    cluster: Cluster,
    example_inputs,
    *,
    loss_fn=None,
    tp: int,
    pp: int,
    dp: int,
    microbatch_size: int,
    checkpoint: str = "none",
    schedule: str = "1F1B",
    zero: int = 0,
    dp_shard: int | None = None,
    precision: TrainingPrecision | str | None = None,
    solver: str = "highs",
    sequence_parallel: bool = False,
    ep: int = 1,
    cp: int = 1,
) -> Plan:
    """A hand configuration (Megatron-LM / torchtitan style) as a Plan, scored by the same cost
    model as `plan`, so the two can be compared with `simulate`.

    tp, pp, dp: the mesh {"pp", "dp", "tp"} (pp outermost, tp innermost, so tp stays inside a
    node). microbatch_size: samples per data-parallel rank per microbatch (Megatron's
    --micro-batch-size); num_microbatches = batch / (dp * microbatch_size). Stages: the layers
    ("pre", each block, "post") cut evenly into pp x v runs (v = 2 for interleaved schedules).
    Tensor parallelism: the op shardings the intra-op ILP finds on the fixed dp x tp mesh for
    one microbatch (Megatron's column/row split is what it finds for GPT blocks).
    checkpoint: "none", or "full" or "selective" for every block ("selective" keeps the outputs
    of matmuls and attention and recomputes the rest, see `autopar.runtime.layer_runner`).
    zero: 0 -> replicate, 1 and 2 -> "zero2" (gradients
    and optimizer state sharded; ZeRO-1 is planned as ZeRO-2), 3 -> "zero3".
    dp_shard: hybrid sharding (HSDP, torchtitan's data_parallel_shard_degree): parameters are
    sharded as ZeRO-3 over groups of dp_shard ranks and replicated over dp / dp_shard groups.
    Without pp there is no gradient accumulation: microbatch_size must be batch / dp.
    sequence_parallel: Megatron-LM's sequence parallelism (needs tp > 1): the ops between the
    tensor-parallel regions (norms, dropout, residual adds) split along the sequence over tp,
    reduce-scatter and all-gather in place of all-reduce (`autopar.planning.sequence_parallel`).
    ep: expert parallelism (Megatron-Core's, DeepSpeed-MoE's): the mesh gains an "ep" axis
    between dp and tp, which splits the batch as dp does and each mixture-of-experts layer's
    experts (each ep rank holds 1/ep of them; tokens reach them by all-to-all). dp x ep ranks
    then share the batch: num_microbatches = batch / (dp * ep * microbatch_size). ep must
    divide the expert count.
    cp: context parallelism (Megatron-Core's, Llama 3's): the mesh gains a "cp" axis between ep
    and tp, which splits each sample's sequence; attention gathers keys and values over it
    (`autopar.planning.context_parallel`). cp must divide the sequence length.
    """
    if checkpoint not in POLICIES:
        raise AutoparError(f"checkpoint={checkpoint!r}: use one of {', '.join(POLICIES)}")
    flavour = parallelism.flavour_of_zero_stage(zero)
    if dp_shard is not None and (not 1 < dp_shard < dp or dp % dp_shard or zero not in (0, 3)):
        raise AutoparError(
            f"dp_shard={dp_shard} with dp={dp}, zero={zero}: hybrid sharding needs a shard group "
            f"that divides dp and is neither 1 nor dp (here one of "
            f"{[d for d in range(2, dp) if dp % d == 0] or 'none: dp has no such divisor'}), "
            "and shards like ZeRO-3 (zero=3 or leave zero out)")
    precision = resolve_precision(precision, model)
    example_inputs = floating_to(example_inputs, precision.dtype)
    with compute_view(model, precision.dtype):
        return _hand_plan(model, cluster, example_inputs, loss_fn=loss_fn, tp=tp, pp=pp, dp=dp,
                          microbatch_size=microbatch_size, checkpoint=checkpoint,
                          schedule=schedule, flavour=flavour, dp_shard=dp_shard,
                          precision=precision, solver=solver,
                          sequence_parallel=sequence_parallel, ep=ep, cp=cp)


def _hand_plan(model, cluster, example_inputs, *, loss_fn, tp, pp, dp, microbatch_size,
               checkpoint, schedule, flavour, dp_shard, precision, solver, sequence_parallel,
               ep, cp) -> Plan:
    """`manual_plan` once the precision is settled and the model seen in its compute dtype."""
    mesh = parallelism.full_mesh({"pp": pp, "dp": dp, "ep": ep, "cp": cp, "tp": tp},
                                 cluster.world_size)
    inputs_only = example_inputs[0] if loss_fn is not None else example_inputs
    batch = batch_size(inputs_only)
    trace_fn = tracer(model, loss_fn)
    # One trace: a microbatch's, which the cost model needs, also gives the layers and heads
    # (the same at any batch size). Where the batch does not split, check_divides says so.
    mb = parallelism.batch_ranks(mesh) * microbatch_size
    cut = batch % mb == 0 and mb < batch
    traced = trace_fn(microbatch_inputs(example_inputs, mb) if cut else example_inputs)
    layers = layer_order(assign_layers(traced))
    check_divides(traced, mesh, batch, microbatch_size, len(layers), schedule)
    _check_experts_divide(traced, ep)
    context_parallel.check_sequence(traced, cp)
    name = flavour.name if dp * cp > 1 else parallelism.REPLICATE
    if dp_shard is not None:
        name = parallelism.hybrid_flavour().name
    c = hand_configuration(
        trace_fn, example_inputs, cluster, mesh, batch=batch, microbatch_size=microbatch_size,
        layers=layers, checkpoint=checkpoint, schedule=schedule, flavour=name,
        dp_shard=dp_shard, precision=precision, solver=solver,
        sequence_parallel=sequence_parallel)
    return candidate_plan(c, cluster, precision, solver={"manual": 1})


def _expert_count(traced) -> int:
    """The experts every mixture-of-experts layer of `traced` has in common (their gcd; 0 for a
    model without experts): the ep sizes the search tries divide it."""
    return math.gcd(*traced.experts.values()) if traced.experts else 0


def _check_experts_divide(traced, ep: int) -> None:
    if ep == 1:
        return
    if not traced.experts:
        raise MeshError(f"ep={ep}: the model has no mixture-of-experts layer (no parameter stacks "
                        "experts along dim 0 in a module with n_experts or num_experts): use ep=1")
    count = _expert_count(traced)
    if count % ep:
        raise MeshError(f"ep={ep} does not divide the model's {count} experts: use an ep that "
                        f"does ({', '.join(str(d) for d in range(1, count + 1) if count % d == 0)})")


def autoparallelize(
    model: nn.Module,
    cluster: Cluster | None = None,
    example_inputs=None,
    *,
    loss_fn=None,
    mesh: dict[str, int] | None = None,
    plan: Plan | None = None,
    runtime: str = "replay",
    **options,
) -> ParallelModel:
    """Plan (or load `plan`) and shard `model` over this torchrun job's processes.

    Without `plan`, rank 0 runs the full search of `autopar.plan` (pp x dp x tp mesh,
    microbatches, schedule, data-parallel flavour, checkpointing) and sends the plan to the other
    ranks; `mesh` and `options` are `autopar.plan`'s options (`memory_limit`, `schedule`,
    `microbatch_size`, `data_parallel`, `checkpoint`, `solver`, `time_limit`, `precision`, ...).
    Every rank must call it with the same model (same initial weights: rank 0's are used) and
    the same example inputs. Returns a ParallelModel, or for a plan with pipeline stages (or
    gradient accumulation) a PipelinedModel; either's `train_step(inputs, target)` runs one
    forward and backward of the whole batch.

    `runtime`: "replay" (default) traces each layer's local ops and collectives on the first
    step and replays them after; "eager" runs every op through DTensor every step (several
    times the host time per op; for debugging). Both run the same ops and collectives.
    "compile" traces as "replay" does and compiles each layer's forward and backward graphs
    with Inductor (elementwise chains fused; the first step pays the compile); the cost model
    still prices the uncompiled kernels. Zero-bubble schedules (split backward) always run
    eagerly.
    """
    check_runtime(runtime)
    if example_inputs is None:
        raise AutoparError("autoparallelize needs example_inputs: one global batch.")
    options = _planning_options(mesh, options, have_plan=plan is not None)
    if cluster is None:
        cluster = Cluster.detect()
    if dist.is_initialized() and plan is None and cluster.world_size != dist.get_world_size():
        raise MeshError(
            f"cluster {cluster.name!r} has {cluster.world_size} devices but this job has "
            f"{dist.get_world_size()} processes: describe the devices the job runs on "
            f"(Cluster.detect() does) or launch {cluster.world_size} processes."
        )
    if plan is None:
        plan = _plan_on_rank0(model, cluster, example_inputs, loss_fn, options)
    # the graph the plan was made for: a pipelined plan's is one microbatch's, in the plan's
    # compute dtype whatever dtype the model is in (the runtime keeps the model's own weights as
    # fp32 masters where that is lower)
    precision = check_runnable(plan_precision(plan))
    dtype = precision.dtype if plan.precision else model_dtype(model)  # older files: as built
    batch = example_inputs
    if plan.pipeline:
        batch = microbatch_inputs(example_inputs, plan.pipeline["microbatch_size"])
    with compute_view(model, dtype):
        traced = trace_for_training(model, floating_to(batch, dtype), loss_fn)
    world = dist.get_world_size() if dist.is_initialized() else None
    plan.check_matches(graph_fingerprint=traced.fingerprint, world_size=world or plan.world_size)
    build = PipelinedModel if plan.pipeline else ParallelModel
    return build(model, traced, plan, make_mesh(plan), runtime=runtime)


def _plan_on_rank0(model: nn.Module, cluster: Cluster, example_inputs, loss_fn,
                   options: dict) -> Plan:
    """Rank 0 runs the full search, the others receive its plan as JSON: one search, and every
    rank runs the same plan. A failure is sent instead of the plan, so that no rank waits
    forever and every rank raises the same error (rank 0 with its traceback)."""
    def make() -> Plan:
        return plan(model, cluster, example_inputs, loss_fn=loss_fn, **options)

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make()
    box: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            box[0] = make().to_json()
        except Exception as e:  # an AutoparError (the user's to fix), a ValueError, or a bug
            failure = e
            box[0] = _portable(e)
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if isinstance(box[0], Exception):
        raise box[0]
    return Plan.from_dict(json.loads(box[0]))


def _portable(e: Exception) -> Exception:
    """`e` if it survives pickling (it crosses to the other ranks), else a RuntimeError that
    names it."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"planning failed on rank 0 ({type(e).__name__}: {e}); rank 0's "
                            "traceback has the details")


# autopar.plan's own arguments, not options: autoparallelize takes them itself
_NOT_OPTIONS = ("model", "cluster", "example_inputs", "loss_fn")


def _planning_options(mesh, options: dict, *, have_plan: bool) -> dict:
    """`options` (and `mesh`) as `autopar.plan` keywords; an unknown name, or options beside a
    ready `plan` (which they could not change), is an AutoparError that says what to do."""
    valid = [name for name in inspect.signature(plan).parameters if name not in _NOT_OPTIONS]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise AutoparError(
            f"unknown option(s) {unknown} for autoparallelize: its planning options are those "
            f"of autopar.plan: {', '.join(valid)}"
        )
    given = dict(options, mesh=mesh) if mesh is not None else dict(options)
    if have_plan and given:
        raise AutoparError(
            f"autoparallelize got plan= and planning option(s) {sorted(given)}: a ready plan is "
            "run as it is. Drop the options, or drop plan= to plan with them."
        )
    return given
