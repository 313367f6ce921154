"""One global batch as `train_step` takes it: the inputs, or (inputs, target) with a loss_fn.

The inputs are a tensor, a tuple (or list) of positional arguments, which may hold None and
other non-tensors, or a dict of keyword arguments (`model(**inputs)`, as Hugging Face models are
called). The traced graph takes only the tensors, in pytree order, then the target; `BatchLayout`
remembers where they sit among the rest, so a trace can call the model as the user does and the
runtime can find the graph's inputs in the batch a user passes to `train_step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_map, tree_unflatten

from autopar.errors import AutoparError, MeshError


class _Tensor:
    """Marks where a tensor goes among a batch's leaves (None is a leaf value of its own)."""

    def __repr__(self) -> str:
        return "a tensor"


TENSOR = _Tensor()


@dataclass(frozen=True)
class BatchLayout:
    """Where the tensors of one batch's inputs sit among its other values."""

    spec: TreeSpec  # of the inputs (not the target)
    constants: tuple  # every leaf in pytree order; TENSOR where a tensor goes
    has_target: bool

    @classmethod
    def of(cls, inputs, *, has_target: bool) -> BatchLayout:
        leaves, spec = tree_flatten(_canonical(inputs))
        consts = tuple(TENSOR if isinstance(x, torch.Tensor) else x for x in leaves)
        return cls(spec, consts, has_target)

    @property
    def n_tensors(self) -> int:
        return sum(1 for c in self.constants if c is TENSOR)

    def rebuild(self, tensors) -> object:
        """The inputs with `tensors` in the tensor slots: what the model is called with."""
        it = iter(tensors)
        return tree_unflatten([next(it) if c is TENSOR else c for c in self.constants],
                              self.spec)

    def tensors(self, inputs, target=None) -> list[torch.Tensor]:
        """The graph's inputs from a batch shaped like the one traced: its tensors, then the
        target. A batch of another structure is an AutoparError that says how it differs."""
        out = self.input_tensors(inputs)
        if self.has_target:
            if target is None:
                raise AutoparError("the model was planned with a loss_fn: pass the target too, "
                                   "train_step(inputs, target)")
            out.append(torch.as_tensor(target))
        elif target is not None:
            raise AutoparError(
                "train_step got a target, but the model was planned without a loss_fn (it "
                "computes its own loss): pass the labels among the inputs")
        return out

    def inputs_of_call(self, args: tuple, kwargs: dict):
        """The inputs of a call `model(*args, **kwargs)`, structured as the traced inputs."""
        if kwargs and args:
            raise AutoparError("pass the inputs as the model was planned with: all positional "
                               "arguments or all keywords")
        return kwargs if self.spec.type is dict else args

    def input_tensors(self, inputs) -> list[torch.Tensor]:
        """The tensors among `inputs`, which must be shaped like the traced inputs."""
        leaves, spec = tree_flatten(_canonical(inputs))
        if spec != self.spec:
            raise AutoparError(
                f"the inputs are shaped {_describe(spec)}, the model was traced (and the plan "
                f"made) with {_describe(self.spec)}: pass the inputs the same way (same "
                "positional arguments or the same keywords)"
            )
        out = []
        for leaf, const in zip(leaves, self.constants):
            if const is TENSOR:
                if not isinstance(leaf, torch.Tensor):
                    raise AutoparError(f"expected a tensor among the inputs, got {leaf!r}")
                out.append(leaf)
            elif isinstance(leaf, torch.Tensor) or leaf != const:
                raise AutoparError(
                    f"an input that was {const!r} when the model was traced is {leaf!r} now: "
                    "non-tensor inputs are part of the traced graph; re-plan to change them"
                )
        return out


def as_call(inputs) -> tuple[tuple, dict]:
    """(args, kwargs) to call the model with: a dict is keywords, a tuple or list positional
    arguments, anything else the one argument."""
    inputs = _canonical(inputs)
    return ((), inputs) if isinstance(inputs, dict) else (inputs, {})


def _canonical(inputs) -> dict | tuple:
    """Keywords as a dict, positional arguments as a tuple (`x` and `(x,)` are one call)."""
    if isinstance(inputs, dict):
        return dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    return (inputs,)


def _describe(spec: TreeSpec) -> str:
    if spec.type is dict:
        return f"keywords {list(spec.context)}"
    return f"{spec.num_children} positional argument(s)"


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


def floating_to(example_inputs, dtype: torch.dtype):
    """`example_inputs` with every floating tensor in `dtype` (token ids and labels stay
    integers): the batch of a model cast to `dtype`."""
    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        example_inputs)


def batch_size(example_inputs) -> int:
    """The batch size: dim 0 of the first tensor that has one."""
    flat = [x for x in tree_leaves(example_inputs)
            if isinstance(x, torch.Tensor) and x.ndim >= 1]
    if not flat:
        raise MeshError("example_inputs hold no tensor with a batch dimension")
    return flat[0].shape[0]
