"""Traces that the ranks of one launch share instead of each making its own.

Every rank's `autopar.autoparallelize` exports the model it is given: on 2 cores, 4 ranks
exporting at once took most of a small model's training test (a GPT export is about 1 CPU s;
its 4-rank run on a plan about 2). `run_on_ranks(..., prepare=...)` calls its `prepare` once,
in the process the ranks are then forked from; a `prepare` that calls `remember` leaves the
trace in memory for every rank, and a rank that trains inside `remembered(key)` takes it:

    def _prepare(jobs):                      # once, before the ranks fork
        for name, plan_json in jobs:
            model, example, loss_fn = build(name)
            traces.remember(name, model, example, loss_fn, Plan.from_json(plan_json))

    def _train(name, plan_json):             # on every rank
        model, example, loss_fn = build(name)
        with traces.remembered(name):
            pm = autopar.autoparallelize(model, cluster, example, loss_fn=loss_fn, plan=...)

The trace is `autopar.trace.trace_for_training` of a model built as the rank builds its own,
with the same inputs (a pipelined plan's microbatch, as autoparallelize traces it): the same
graph, so the same program, which a plan's fingerprint check would refuse otherwise. A trace
is read, never changed, by the model it is compiled into. Anything not remembered (another
key, other inputs or loss) is traced as before.
"""

from __future__ import annotations

import contextlib

import pytest

from autopar import api
from autopar.batches import microbatch_inputs
from autopar.trace import TracedModel, inputs_key, trace_for_training

_TRACES: dict = {}  # (key, inputs' key, loss_fn) -> TracedModel


def remember(key: str, model, example_inputs, loss_fn, plan=None) -> TracedModel:
    """Trace `model` as autoparallelize does for `plan` (None: a plan without pipeline stages)
    and keep it under `key`, the name of how the model was built."""
    inputs = example_inputs
    if plan is not None and plan.pipeline:
        inputs = microbatch_inputs(example_inputs, plan.pipeline["microbatch_size"])
    found = _TRACES.get((key, inputs_key(inputs), loss_fn))
    if found is None:
        found = _TRACES[key, inputs_key(inputs), loss_fn] = trace_for_training(
            model, inputs, loss_fn)
    return found


@contextlib.contextmanager
def remembered(key: str):
    """Within the block, autoparallelize takes the trace remembered under `key` for the inputs
    and loss function it traces, where there is one."""
    real = api.trace_for_training

    def trace(model, inputs, loss_fn, **kwargs):
        found = None if kwargs else _TRACES.get((key, inputs_key(inputs), loss_fn))
        return found if found is not None else real(model, inputs, loss_fn, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "trace_for_training", trace)
        yield
