"""Training state on disk through `torch.distributed.checkpoint` (DCP), loadable under any plan.

    save(path, pm, optimizer, extra=)   every rank writes its shards: one DCP directory
    load(path, pm, optimizer) -> extra  every rank reads the slices its plan holds
    state_dict(pm, optimizer)           the flat dict DCP saves and loads (for dcp.save/load)
    load_state_dict(pm, state, opt)     that dict after dcp.load, or a plain `model.state_dict()`
    full_state_dict(pm)                 the whole weights on every rank, as the model names them

A checkpoint names everything by the model's parameter names and holds whole-tensor geometry:
each weight is a DTensor (its global shape, this rank's slice), so DCP reads any other plan's
slices out of it (dp x tp into pp x dp, ZeRO-3 into replicated, 4 ranks into 2). The keys are
flat strings, never nested dicts:

    model/<fqn>                   the fp32 weight (the master under mixed precision)
    optimizer/<fqn>/<state>       the optimizer's state of that weight (exp_avg, step, ...)
    optimizer/<fqn>/group         its parameter group's options (lr, betas, ...), pickled
    extra                         the caller's `extra`, pickled (rank 0's)

Buffers are not saved: a model's buffers are made by its constructor (RoPE tables, masks).
"""

from __future__ import annotations

import io
import os
import pickle

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, distribute_tensor

from autopar.errors import AutoparError
from autopar.runtime.mesh import mesh_device
from autopar.runtime.optim import plan_precision

MODEL, OPTIMIZER, EXTRA = "model/", "optimizer/", "extra"


def _weights(pm) -> list:
    if not callable(getattr(pm, "weights", None)):
        raise AutoparError(f"expected the model autoparallelize returned, got "
                           f"{type(pm).__name__}: save a plain module with torch.save or dcp.save")
    return pm.weights()


def _truth(w) -> DTensor:
    """The weight as saved: the fp32 master where there is one."""
    return (w.master if w.master is not None else w.param).detach()


def state_dict(pm, optimizer=None) -> dict:
    """The flat dict of this rank's training state that `dcp.save` writes and `dcp.load` fills
    in place (see the module docstring for its keys)."""
    state = {MODEL + w.fqn: _truth(w) for w in _weights(pm)}
    if optimizer is not None:
        _ensure_state(optimizer)
        for w, shard, group in _optimized(optimizer):
            for name, value in optimizer.inner.state[shard].items():
                state[f"{OPTIMIZER}{w.fqn}/{name}"] = _as_dtensor(value, shard, w)
            options = {k: v for k, v in group.items() if k != "params"}
            state[f"{OPTIMIZER}{w.fqn}/group"] = io.BytesIO(pickle.dumps(options))
    return state


def save(path: str | os.PathLike, pm, optimizer=None, *, extra: dict | None = None) -> None:
    """Write the weights (and `optimizer`'s state, and `extra`: anything picklable, rank 0's,
    such as the step and a scheduler's state_dict) to the DCP directory `path`. Every rank
    calls it."""
    state = state_dict(pm, optimizer)
    if extra is not None:
        box = [extra]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        state[EXTRA] = io.BytesIO(pickle.dumps(box[0]))
    dcp.save(state, checkpoint_id=os.fspath(path), no_dist=not dist.is_initialized())


def load(path: str | os.PathLike, pm, optimizer=None) -> dict:
    """Read the checkpoint at `path` (written by `save` under any plan and world size, or by
    `dcp.save(model.state_dict())` of the plain model) into `pm` and `optimizer`; returns the
    `extra` it was saved with ({} without). Every rank calls it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AutoparError(f"no checkpoint at {path!r}: give the directory autopar.save wrote")
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    plain = not any(k.startswith(MODEL) for k in saved)  # the unsharded model's dcp.save
    state = state_dict(pm, optimizer)
    if plain:
        if optimizer is not None:
            raise AutoparError(f"{path!r} holds a plain model's weights and no optimizer state: "
                               "load it with optimizer=None, then make the optimizer")
        state = {_plain_key(pm, k[len(MODEL):], saved): v for k, v in state.items()}
    _check_matches(path, state, saved, optimizer)
    has_extra = EXTRA in saved
    if has_extra:
        state[EXTRA] = io.BytesIO()
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    if plain:
        state = {MODEL + _fqn_of(pm, k): v for k, v in state.items()}
    load_state_dict(pm, state, optimizer)
    if not has_extra:
        return {}
    blob = state[EXTRA]
    blob.seek(0)
    return pickle.loads(blob.read())


def load_state_dict(pm, state: dict, optimizer=None) -> None:
    """Put `state` into `pm` (and `optimizer`): `state_dict`'s dict after `dcp.load` filled
    it, or a plain `model.state_dict()` of the unsharded model (full tensors, by the model's
    names; tied names either). Every rank calls it with the same values."""
    if not any(k.startswith(MODEL) for k in state):  # a plain model.state_dict()
        state = {MODEL + _fqn_of(pm, k): v for k, v in state.items() if _fqn_of(pm, k, None)}
    weights = _weights(pm)
    missing = [w.fqn for w in weights if MODEL + w.fqn not in state]
    if missing:
        raise AutoparError(f"the state has no weight for {_few(missing)}: it is of another "
                           "model (or another version of it)")
    with torch.no_grad():
        for w in weights:
            _copy_into(_truth(w), state[MODEL + w.fqn], w.fqn)
            if w.master is not None:  # the compute weight follows its master
                w.param.to_local().copy_(w.master.to_local())
        if optimizer is not None:
            for w, _, group in _optimized(optimizer):
                blob = state.get(f"{OPTIMIZER}{w.fqn}/group")
                if isinstance(blob, io.BytesIO):
                    blob.seek(0)
                    group.update(pickle.loads(blob.read()))


def full_state_dict(pm) -> dict[str, torch.Tensor]:
    """The model's weights, whole, on every rank, under every name the model gives them (tied
    ones twice, as `model.state_dict()` has them): fp32 masters where there are, else the
    weights as held. For inference, `model.load_state_dict`, or Hugging Face's
    `save_pretrained(state_dict=...)`. Every rank calls it (a pipelined model's stages send
    their weights to the others)."""
    held = {w.fqn: w for w in _weights(pm)}
    names = sorted(pm.state_names)
    owners = _owners(held, names)
    out = {}
    for fqn in names:
        w = held.get(fqn)
        # a copy: a replicated weight's full_tensor() is the live weight itself
        full = _truth(w).full_tensor().clone() if w is not None else None
        if owners is not None:  # pipelined: the first rank that holds it sends it
            if full is None:
                shape, dtype = _saved_geometry(pm, fqn)
                full = torch.empty(shape, dtype=dtype, device=mesh_device(pm.mesh))
            dist.broadcast(full, src=owners[fqn])
        for alias in pm.state_names[fqn]:
            out[alias] = full
    return out


# -- helpers ----------------------------------------------------------------------------------


def _saved_geometry(pm, fqn: str) -> tuple[tuple, torch.dtype]:
    """The shape and dtype `_truth` has for the weight `fqn` on the ranks that hold it."""
    node = next(n for n, f in pm.traced.parameters.items() if f == fqn)
    val = pm.traced.node(node).meta["val"]
    mastered = (plan_precision(pm.plan).keeps_masters and val.requires_grad
                and val.is_floating_point() and val.dtype != torch.float32)
    return tuple(val.shape), torch.float32 if mastered else val.dtype


def _optimized(optimizer):
    """(weight, shard, its group) for every weight the optimizer steps."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return [(w, s, group_of[id(s)]) for w, s in zip(optimizer.weights, optimizer.shards)]


def _ensure_state(optimizer) -> None:
    """Make the optimizer's state (torch makes it on the first step) so that DCP has tensors to
    load into: one step on zero gradients, the shards put back as they were."""
    shards = optimizer.shards
    if all(optimizer.inner.state.get(s) for s in shards):
        return
    with torch.no_grad():
        kept = [s.clone() for s in shards]
        for s in shards:
            s.grad = torch.zeros_like(s)
        optimizer.inner.step()
        for s, k in zip(shards, kept):
            s.copy_(k)
            s.grad = None


def _as_dtensor(value, shard: torch.Tensor, w):
    """A state tensor of a shard's shape as a DTensor of the weight's geometry (DCP reshards
    it); a scalar (Adam's step) as it is."""
    if isinstance(value, torch.Tensor) and value.shape == shard.shape and value.ndim:
        ref = _truth(w)
        return DTensor.from_local(value, ref.device_mesh, ref.placements, shape=ref.shape,
                                  stride=ref.stride(), run_check=False)
    return value


def _copy_into(target: DTensor, value, fqn: str) -> None:
    if isinstance(value, DTensor):
        if value.to_local().data_ptr() == target.to_local().data_ptr():
            return  # dcp.load filled it in place
        value = value.redistribute(target.device_mesh, target.placements).to_local()
    elif isinstance(value, torch.Tensor):
        if tuple(value.shape) != tuple(target.shape):
            raise AutoparError(f"weight {fqn!r} has shape {tuple(value.shape)} in the state but "
                               f"{tuple(target.shape)} in the model: the state is of another "
                               "model (or another configuration of it)")
        value = distribute_tensor(value.detach().to(target.to_local().device, target.dtype),
                                  target.device_mesh, target.placements).to_local()
    else:
        raise AutoparError(f"weight {fqn!r}: expected a tensor, got {type(value).__name__}")
    target.to_local().copy_(value)


def _check_matches(path: str, state: dict, saved: dict, optimizer) -> None:
    """The checkpoint at `path` must hold every key this rank loads, in the same shape."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    missing = [k for k in state if k not in saved]
    if missing:
        what = ("optimizer state (it was saved without an optimizer: load with optimizer=None)"
                if all(k.startswith(OPTIMIZER) for k in missing) and optimizer is not None
                else f"{_few(missing)}: it is of another model (or another version of it)")
        raise AutoparError(f"checkpoint {path!r} has no {what}")
    for key, value in state.items():
        meta = saved[key]
        if isinstance(value, torch.Tensor) and isinstance(meta, TensorStorageMetadata) and \
                tuple(meta.size) != tuple(value.shape):
            raise AutoparError(f"checkpoint {path!r}: {key} has shape {tuple(meta.size)}, the "
                               f"model's is {tuple(value.shape)}: a checkpoint of another "
                               "model (or another configuration of it)")


def _plain_key(pm, fqn: str, saved: dict) -> str:
    """The name a plain model's checkpoint holds `fqn` under (a tied weight: either name)."""
    for name in pm.state_names.get(fqn, [fqn]):
        if name in saved:
            return name
    return fqn  # reported as missing by _check_matches


def _fqn_of(pm, name: str, default=...):
    """The parameter name the plan uses for `name` (one of a tied weight's names)."""
    for fqn, aliases in pm.state_names.items():
        if name in aliases:
            return fqn
    if default is ...:
        raise AutoparError(f"{name!r} is not a parameter of the model")
    return default


def _owners(held: dict, names: list[str]) -> dict[str, int] | None:
    """For a model whose ranks hold different weights (pipelined): the first global rank that
    holds each; None where every rank holds every weight."""
    if not dist.is_initialized() or _everyone_holds_all(held, names):
        return None
    lists: list = [None] * dist.get_world_size()
    dist.all_gather_object(lists, sorted(held))
    return {n: min(r for r, have in enumerate(lists) if n in have) for n in names}


def _everyone_holds_all(held: dict, names: list[str]) -> bool:
    flag = torch.tensor([int(all(n in held for n in names))])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
