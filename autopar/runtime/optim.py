"""Training state the plan owns: the optimizer over a sharded model and its gradient clipping.

    Weight              one parameter of this rank: its FQN, the parameter the graph reads (a
                        DTensor in the compute dtype) and, under mixed precision, its fp32 master
    ShardedOptimizer    any torch optimizer class, stepped on this rank's shards (`optimizer`)
    clip_grad_norm_     the global gradient norm over every shard and stage, and the clipping

Mixed precision is ZeRO's (`TrainingPrecision.mixed_bf16`, 2 + 2 + 12 bytes a parameter): the
graph reads bf16 parameters and leaves bf16 gradients, reduced in bf16; the optimizer steps fp32
masters, sharded as the parameters are, with fp32 state. Each gradient is cast to fp32 a chunk of
parameters at a time (`CHUNK_ELEMENTS`), so that no fp32 copy of every gradient is ever held: the
plan's memory model counts none.

The optimizer steps local shards, plain tensors: a parameter's gradient has the parameter's
placements (the models settle them so), so an element-wise update (SGD, Adam, AdamW, ...) of
each shard is the update of the whole tensor. Optimizers whose step reads other parameters
(LBFGS's closure, a norm over all parameters inside step) would need the whole model, and are
refused.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from autopar.errors import AutoparError
from autopar.planning.training_precision import TrainingPrecision

# fp32 gradient elements alive at once while the masters step: 64 MiB
CHUNK_ELEMENTS = 2**24


def plan_precision(plan) -> TrainingPrecision:
    """The precision a plan was made for (fp32 for files that do not say)."""
    return TrainingPrecision.from_dict(getattr(plan, "precision", None) or {})


def check_runnable(precision: TrainingPrecision) -> TrainingPrecision:
    """`precision` if the runtime trains as it says; else an AutoparError naming what differs.
    The runtime holds parameters and gradients in the compute dtype, with fp32 masters when
    they are below fp32 (ZeRO's mixed precision)."""
    size = precision.dtype.itemsize
    if precision.compute_dtype == "float16":
        raise AutoparError("the plan computes in float16, which needs loss scaling; autopar's "
                           "runtime does not scale losses: plan with precision='bf16-mixed'")
    if (precision.param_bytes, precision.grad_bytes) != (size, size):
        raise AutoparError(
            f"the plan counts {precision.param_bytes}-byte parameters and {precision.grad_bytes}"
            f"-byte gradients, but the runtime holds both in the compute dtype "
            f"{precision.compute_dtype} ({size} bytes): plan with precision='fp32' or "
            "'bf16-mixed'")
    return precision


@dataclass
class Weight:
    """One parameter of this rank."""

    fqn: str
    param: torch.nn.Parameter  # a DTensor: what the graph reads, in the compute dtype
    master: DTensor | None  # its fp32 master under mixed precision, same placements
    counted: bool = True  # this rank adds it to the global gradient norm (once over the world)


def master_of(value: torch.Tensor, param: DTensor, keeps_masters: bool) -> DTensor | None:
    """The fp32 master of a parameter made from `value` (the model's own weight, in the dtype it
    was built in, so an fp32 model's masters are its exact weights), sharded as `param`; None
    where the parameter is fp32 already or the precision keeps no masters."""
    if not (keeps_masters and param.requires_grad and param.is_floating_point()
            and param.dtype != torch.float32):
        return None
    return distribute_tensor(value.detach().to(param.to_local().device, torch.float32),
                             param.device_mesh, param.placements)


class ShardedOptimizer(torch.optim.Optimizer):
    """`optimizer_class` over this rank's shards (the fp32 masters under mixed precision).

    Its `param_groups` and `state` are the wrapped optimizer's own, so learning-rate schedulers
    and hyperparameter changes reach it. `step()` takes the gradients the model left on its
    parameters, steps, and (mixed precision) copies the masters back into the compute weights.
    """

    def __init__(self, weights: list[Weight], optimizer_class, group_of=None, **kwargs):
        if not (isinstance(optimizer_class, type)
                and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise AutoparError(f"optimizer_class={optimizer_class!r}: give a torch.optim."
                               "Optimizer class, e.g. torch.optim.AdamW (not an instance)")
        if optimizer_class is torch.optim.LBFGS:
            raise AutoparError("torch.optim.LBFGS steps with a closure over the whole model; "
                               "autopar steps each shard on its own: use an element-wise "
                               "optimizer (SGD, Adam, AdamW, ...)")
        self.weights = [w for w in weights if w.param.requires_grad]
        if not self.weights:
            raise AutoparError("this rank holds no trainable parameter: nothing to optimize")
        self._mixed = any(w.master is not None for w in self.weights)
        # the tensors the wrapped optimizer steps: each weight's local shard (its master's)
        with torch.no_grad():  # the shards themselves, leaves the optimizer may step
            self.shards = [(w.master if w.master is not None else w.param).to_local()
                            for w in self.weights]
        self.inner = optimizer_class(self._groups(group_of),
                                     **fused_by_default(optimizer_class, self.shards, kwargs))
        super().__init__(self.shards, self.inner.defaults)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self._chunks = _chunks([s.numel() for s in self.shards], CHUNK_ELEMENTS)

    def _groups(self, group_of) -> list[dict]:
        """One group per distinct options `group_of(fqn)` returns (all in one without it)."""
        if group_of is None:
            return [{"params": self.shards}]
        groups: dict[tuple, dict] = {}
        for w, shard in zip(self.weights, self.shards):
            options = dict(group_of(w.fqn) or {})
            key = tuple(sorted(options.items()))
            groups.setdefault(key, {**options, "params": []})["params"].append(shard)
        return list(groups.values())

    @torch.no_grad()
    def step(self, closure=None):
        """One step of the wrapped optimizer on the gradients the model left on its parameters
        (`train_step`, then any `clip_grad_norm_`); under mixed precision, a chunk of fp32
        gradients at a time, the compute weights then copied from their masters."""
        if closure is not None:
            raise AutoparError("ShardedOptimizer.step takes no closure: run pm.train_step, then "
                               "step")
        for chunk in self._chunks:
            for i in chunk:
                grad = self.weights[i].param.grad
                local = None if grad is None else grad.to_local()
                self.shards[i].grad = local.float() if self._mixed and local is not None else local
            self.inner.step()
            for i in chunk:
                self.shards[i].grad = None
            if self._mixed:
                pairs = [(self.weights[i].param.to_local(), self.shards[i]) for i in chunk
                         if self.weights[i].master is not None]
                if pairs:
                    torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])

    def zero_grad(self, set_to_none: bool = True):
        """Drop (or zero) the gradients of the model's parameters."""
        for w in self.weights:
            if w.param.grad is None:
                continue
            if set_to_none:
                w.param.grad = None
            else:
                w.param.grad.zero_()

    def state_dict(self):
        """The wrapped optimizer's own state_dict (this rank's shards, indexed as torch does);
        for checkpoints that move between plans use `autopar.save`/`autopar.state_dict`."""
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        """Load what `state_dict` returned on this rank under the same plan."""
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state


def fused_by_default(optimizer_class, shards: list[torch.Tensor], kwargs: dict) -> dict:
    """`kwargs` with `fused=True` where the user chose neither `fused` nor `foreach`, the class
    takes `fused` (torch's Adam, AdamW, SGD, Adagrad), nothing asks for what fused kernels do
    not do (`differentiable`), and every shard is a floating-point tensor on a device torch has
    fused kernels for: one kernel per step for the whole chunk of shards, where torch's own
    default (foreach on GPUs, a loop on CPU) launches several per parameter list."""
    if "fused" in kwargs or "foreach" in kwargs or kwargs.get("differentiable"):
        return kwargs
    try:
        takes_fused = "fused" in inspect.signature(optimizer_class.__init__).parameters
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except (ImportError, TypeError, ValueError):  # another torch: its own default
        return kwargs
    if takes_fused and all(s.is_floating_point() and s.device.type in devices for s in shards):
        return {**kwargs, "fused": True}
    return kwargs


def _chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive indices in runs of at most `limit` elements (a larger one alone)."""
    chunks: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(sizes):
        if chunks[-1] and total + n > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += n
    return chunks


@torch.no_grad()
def clip_grad_norm_(weights: list[Weight], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scale every gradient of the model (all ranks call it) so that their global norm is at
    most `max_norm`, as `torch.nn.utils.clip_grad_norm_` on the unsharded model; returns the
    norm before clipping (fp32, equal on every rank).

    Each rank adds the part of the norm it holds once: a shard is counted where it lives, a
    replicated gradient only at coordinate 0 of its replicated mesh axes, and a parameter that
    two pipeline ranks share on one of them (`Weight.counted`)."""
    norm_type = float(norm_type)
    grads = [w.param.grad for w in weights if w.param.grad is not None]
    device = weights[0].param.to_local().device if weights else torch.device("cpu")
    # each gradient's norm in fp32 on its own, only the scalars kept: an fp32 copy of every
    # bf16 gradient at once would hold 4 bytes a parameter the plan does not count
    norms = [torch.linalg.vector_norm(g.to_local(), norm_type, dtype=torch.float32)
             for w in weights if (g := w.param.grad) is not None and w.counted
             and _first_replica(g)]
    if math.isinf(norm_type):
        local = torch.stack(norms).max() if norms else torch.zeros((), device=device)
        if dist.is_initialized():
            dist.all_reduce(local, op=dist.ReduceOp.MAX)
        total = local
    else:
        local = (torch.stack(norms).pow(norm_type).sum() if norms
                 else torch.zeros((), device=device))
        if dist.is_initialized():
            dist.all_reduce(local)
        total = local.pow(1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is "
                           f"{total.item()}: not finite; set error_if_nonfinite=False to clip "
                           "anyway")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        local = g.to_local()
        local.mul_(coef.to(local.dtype))
    return total


def _first_replica(g: DTensor) -> bool:
    """Whether this rank is at coordinate 0 of every mesh axis `g` is replicated over."""
    coord = g.device_mesh.get_coordinate()
    return coord is None or all(c == 0 for c, p in zip(coord, g.placements)
                                if isinstance(p, Replicate))


def optimizer(model, optimizer_class=torch.optim.AdamW, *, group_of=None,
              **kwargs) -> ShardedOptimizer:
    """`optimizer_class(**kwargs)` over the model `autoparallelize` returned, as its plan's
    precision says: on the parameters themselves (fp32), or on fp32 masters of the bf16
    parameters with fp32 state ("bf16-mixed"), sharded as the plan shards them.

    torch's fused kernels are asked for (`fused=True`) unless `fused` or `foreach` is given,
    where the class has them (Adam, AdamW, SGD, Adagrad) and the shards' device does.

    `group_of(fqn)`: options of the parameter group the parameter named `fqn` joins (e.g.
    `lambda fqn: {"weight_decay": 0.0} if fqn.endswith("bias") else {}`); parameters with equal
    options share a group.

        pm = autopar.autoparallelize(model, cluster, batch, loss_fn=loss_fn)
        opt = autopar.optimizer(pm, torch.optim.AdamW, lr=3e-4, weight_decay=0.1)
        loss = pm.train_step(x, y); pm.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
    """
    if not callable(getattr(model, "weights", None)):
        raise AutoparError(f"autopar.optimizer takes the model autoparallelize returned, got "
                           f"{type(model).__name__}: for a plain module use {optimizer_class.__name__}"
                           "(module.parameters(), ...)")
    return ShardedOptimizer(model.weights(), optimizer_class, group_of=group_of, **kwargs)


def state_names(model, fqns) -> dict[str, list[str]]:
    """Each parameter the plan names (`fqns`) with every name it has in `model.state_dict()`
    (a tied weight has several, the trace keeps one): how checkpoints and `full_state_dict`
    name the weights."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {fqn: names[id(model.get_parameter(fqn))] for fqn in fqns}
