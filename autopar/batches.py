"""One global batch as `train_step` takes it (the inputs, or (inputs, target)): its size, and
the microbatch every pipelined plan is traced with."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves, tree_map

from autopar.errors import MeshError


def microbatch_inputs(example_inputs, microbatch_size: int):
    """`example_inputs` (and target) with dim 0 of every tensor sliced to `microbatch_size`.

    Pipelined plans are made for the graph of ONE microbatch: the planner, `autoparallelize` and
    the pipeline runtime all trace `microbatch_inputs(example_inputs, plan.pipeline[
    "microbatch_size"])`, so the graph fingerprint matches.
    """
    def cut(x):
        if isinstance(x, torch.Tensor) and x.ndim >= 1:
            if x.shape[0] % microbatch_size:
                raise MeshError(
                    f"a tensor of batch size {x.shape[0]} cannot be cut into microbatches of "
                    f"{microbatch_size}: use a microbatch size that divides {x.shape[0]}"
                )
            return x[:microbatch_size]
        return x

    if isinstance(example_inputs, tuple):
        return tuple(tree_map(cut, a) for a in example_inputs)
    return tree_map(cut, example_inputs)


def batch_size(example_inputs) -> int:
    """The batch size: dim 0 of the first tensor that has one."""
    flat = [x for x in tree_leaves(example_inputs)
            if isinstance(x, torch.Tensor) and x.ndim >= 1]
    if not flat:
        raise MeshError("example_inputs hold no tensor with a batch dimension")
    return flat[0].shape[0]
