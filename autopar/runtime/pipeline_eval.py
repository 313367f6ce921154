"""Evaluation of a pipelined plan: forward only, microbatch by microbatch, stage by stage.

torch's schedules cannot run a forward alone (torch 2.13): `schedule.eval()` still runs the
backward actions of a schedule with several stages a rank ("can't steal_bwd_input"), and an
action order of forwards only is refused by its `_validate_schedule` (every microbatch must have
a backward). So evaluation runs the stages of `PipelinedModel` itself:

    for each microbatch, in order:                (the global batch split as torch splits it)
        for each stage, in pipeline order:        (held by this rank or not)
            take the stage's inputs: the microbatch (stage 0), the previous stage's outputs
                (held by this rank: interleaved and V schedules), or receive them from the
                previous stage's rank over the pp group
            run the stage's ops (`StageModule.run`) under torch.no_grad()
            send its outputs on to the next stage's rank, or keep them for the next stage here
        the last stage's rank runs the loss (`PipelinedModel._loss_fn`)

Values travel as `PipelineStage` exchanges them in training: local tensors in their travel
placements, of the shapes and dtypes the traced graph of one microbatch gives. Sends are
asynchronous and waited for at the end, so a rank runs ahead of the ranks after it (a pipeline
with one stage a rank is full after its first microbatch). Receives are posted in the same
(microbatch, stage) order on every rank as the sends, so each pair of ranks matches them in order.

Without gradients nothing is replayed or checkpointed: `LayerRunner` runs op by op when grad is
off, as it does for `ParallelModel.eval_step`, and leaves every value in the stage's
environment, which is where `forward` finds the model's output (made on the last stage, as the
logits a loss reads, or on any stage before it).

    eval_step   the mean loss over microbatches, float32 and equal on every rank (`train_step`'s)
    forward     the model's output on the global batch: the microbatches' outputs joined along
                dim 0, whole on every rank (broadcast from the rank of the stage that made it)
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks
from torch.distributed.tensor import DTensor

from autopar.errors import AutoparError
from autopar.runtime.mesh import as_traced, local_shape, mesh_device, shard_local

_EVALUATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PipelinedModel -> _Evaluator


def eval_step(pm, inputs, target=None) -> torch.Tensor:
    """`PipelinedModel.eval_step`: the loss of one global batch, forward only."""
    ev = _evaluator(pm)
    with torch.no_grad():
        tensors = pm._traced.layout.tensors(inputs, target)
        return ev.mean_loss(tensors)


def forward(pm, args: tuple, kwargs: dict):
    """`PipelinedModel.forward`: the model's output for inputs passed as to the model."""
    ev = _evaluator(pm)
    layout = pm._traced.layout
    with torch.no_grad():
        tensors = layout.input_tensors(layout.inputs_of_call(args, kwargs))
        if ev.output_is_loss:  # a model that returns nothing but its loss
            return ev.mean_loss(tensors)
        return ev.model_output(tensors)


def _evaluator(pm) -> _Evaluator:
    ev = _EVALUATORS.get(pm)
    if ev is None:
        ev = _EVALUATORS[pm] = _Evaluator(pm)
    return ev


class _Evaluator:
    """What evaluation needs of one `PipelinedModel`, found once: every stage's inputs and
    outputs, the rank of every stage, and the stage that makes the model's output."""

    def __init__(self, pm):
        self.pm = pm
        traced, plan = pm._traced, pm.plan
        stage_of, boundary, loss = pm.stage_split  # split_stages' answer for the plan
        self.ranks = [st["rank"] for st in plan.pipeline["stages"]]
        self.n_stages = len(self.ranks)
        self.m = plan.pipeline["num_microbatches"]
        mine = [s for s, r in enumerate(self.ranks) if r == pm.pp_rank]
        self.modules = dict(zip(mine, pm.stage_modules))  # built in this order
        # boundary[s]: the values stage s receives; boundary[s + 1]: those it sends
        self.boundary = [[traced.node(v) for v in names] for names in boundary]
        self.device = mesh_device(pm.mesh)
        self.inputs = [traced.node(name) for name in traced.inputs]
        out = traced.output_node
        self.output_is_loss = out == traced.loss_node
        self.out_node = traced.node(out)
        self.out_stage = stage_of.get(out)  # None: no stage makes it (`model_output` says so)
        self._out_where = "reads the target" if out in loss else "is an input of the model"

    # -- the loss -------------------------------------------------------------------------

    def mean_loss(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The mean of the microbatches' losses, all-reduced over pp as `train_step` does."""
        pm = self.pm
        chunks = self._microbatches(tensors)
        has_target = pm._traced.target is not None
        losses, sends = [], []
        for chunk in chunks:
            inputs = chunk[:-1] if has_target else chunk
            outs = self._run(inputs, self.n_stages - 1, sends)
            if outs is not None:
                losses.append(pm._loss_fn(outs, chunk[-1] if has_target else None))
        _wait(sends)
        # fp32 on every rank: the ranks without the loss cannot know its dtype (bf16 or not)
        mean = (torch.stack(losses).float().mean() if losses
                else torch.zeros((), device=self.device))
        total = mean.detach().clone()
        dist.all_reduce(total, group=pm.pp_group)  # only the last stage's rank adds a loss
        return total

    # -- the model's output ---------------------------------------------------------------

    def model_output(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The output node's value on every microbatch, joined along dim 0, whole on every
        rank. Stages after the one that makes it do not run."""
        pm = self.pm
        if self.out_stage is None:
            raise AutoparError(
                f"the model's output ({self.out_node.name}) {self._out_where}, so no pipeline "
                "stage makes it: evaluate with eval_step, or with a plan without pipeline stages")
        val = self.out_node.meta["val"]
        if not isinstance(val, torch.Tensor) or val.ndim == 0:
            raise AutoparError(
                f"the model's output ({self.out_node.name}) is {_what(val)}: a pipelined plan "
                "runs the model per microbatch and joins the outputs along dim 0, which a "
                "scalar does not have; evaluate with eval_step, or with a plan without "
                "pipeline stages")
        parts, sends = [], []
        for chunk in self._microbatches(tensors):
            value = self._run(chunk, self.out_stage, sends, output=True)
            if value is not None:
                parts.append(value.full_tensor() if isinstance(value, DTensor) else value)
        _wait(sends)
        src = self.ranks[self.out_stage]
        if pm.pp_rank == src:
            whole = torch.cat(parts).contiguous()
        else:
            whole = torch.empty((self.m * val.shape[0], *val.shape[1:]), dtype=val.dtype,
                                device=self.device)
        dist.broadcast(whole, group=pm.pp_group, group_src=src)
        return whole

    # -- one microbatch -------------------------------------------------------------------

    def _run(self, inputs: tuple, last: int, sends: list, *, output: bool = False):
        """Runs this rank's stages among 0..`last` on one microbatch. On the rank of stage
        `last`, returns that stage's outputs as local tensors, or with `output` (`last` is then
        the stage that makes it) the model's output; None elsewhere."""
        pm = self.pm
        here = pm.pp_rank
        kept = None  # the outputs of the previous stage, when it is this rank's too
        for s in range(last + 1):
            if self.ranks[s] != here:
                continue
            if s == 0:
                env = {n: shard_local(t.to(self.device), pm.sub, pm._placements[n.name])
                       for n, t in zip(self.boundary[0], inputs)}
            else:
                received = kept if self.ranks[s - 1] == here else self._receive(s)
                env = {n: DTensor.from_local(t, pm.sub, pm._placements[n.name], run_check=False)
                       for n, t in zip(self.boundary[s], received)}
            self.modules[s].run(env)
            if output and s == last:
                return env[self.out_node]
            # contiguous: an expanded (stride-0) value sends its storage, not its elements
            local = tuple(
                env[n].redistribute(pm.sub, pm._placements[n.name]).to_local().contiguous()
                for n in self.boundary[s + 1])
            if s == last:
                return local
            if self.ranks[s + 1] == here:
                kept = local
            else:  # each tensor held until its send is waited for
                sends.extend((dist.isend(t, group=pm.pp_group, group_dst=self.ranks[s + 1]), t)
                             for t in local)
        return None

    def _receive(self, s: int) -> list[torch.Tensor]:
        """Stage s's inputs from the rank of stage s - 1: local shards in travel placements."""
        pm = self.pm
        out = []
        for n in self.boundary[s]:
            val = n.meta["val"]
            shape = local_shape(val.shape, pm._placements[n.name], tuple(pm.sub.shape))
            t = torch.empty(shape, dtype=val.dtype, device=self.device)
            dist.irecv(t, group=pm.pp_group, group_src=self.ranks[s - 1]).wait()
            out.append(t)
        return out

    # -- the batch ------------------------------------------------------------------------

    def _microbatches(self, tensors: list[torch.Tensor]) -> list[tuple]:
        """The graph's inputs (and target) of every microbatch, split along dim 0 as torch's
        schedules split a batch (`split_args_kwargs_into_chunks`, the target likewise), in the
        dtypes the graph was traced in."""
        values = []
        for t, node in zip(tensors, self.inputs):
            t = as_traced(torch.as_tensor(t), node)
            want = tuple(node.meta["val"].shape)
            if not want or tuple(t.shape) != (self.m * want[0], *want[1:]):
                raise AutoparError(_shape_problem(node.name, tuple(t.shape), want, self.m))
            values.append(t)
        chunks, _ = split_args_kwargs_into_chunks(tuple(values), None, self.m)
        return chunks


def _shape_problem(name: str, got: tuple, want: tuple, m: int) -> str:
    if not want:
        return (f"input '{name}' is a scalar in the traced graph: a pipelined plan splits every "
                "input along dim 0 into microbatches; give it a batch dimension, or use a plan "
                "without pipeline stages")
    whole = (m * want[0], *want[1:])
    return (f"input '{name}' has shape {got}, the plan runs {m} microbatches of {want}: pass "
            f"one global batch of shape {whole} ({m} x {want[0]} samples), or re-plan for "
            "this batch")


def _what(val) -> str:
    return "a scalar" if isinstance(val, torch.Tensor) else f"not a tensor ({type(val).__name__})"


def _wait(sends: list) -> None:
    for work, _ in sends:
        work.wait()
    sends.clear()
