"""Planning work shared between the plans a test makes of one model.

A search and the hand configurations compared with it trace the same model, build the same
stand-ins and solve the same intra-op problems. Each of those is a pure function of its
arguments, so remembering them changes no result, only the time (a solve is the slow part of
planning, and hundreds of hand configurations reuse a few dozen).
"""

from __future__ import annotations

import contextlib
import inspect
import json

import pytest

from autopar import trace, trace_repeats
from autopar.planning import manual, search


def _memo(fn, key):
    """`fn` remembering its results by `key(*args, **kwargs)` (the values it holds keep the
    objects whose ids are in the keys alive)."""
    seen: dict = {}

    def memoized(*args, **kwargs):
        k = key(*args, **kwargs)
        if k not in seen:
            seen[k] = (fn(*args, **kwargs), args)
        return seen[k][0]

    return memoized


_SOLVE_LAYERS = search.solve_layers


def _solve_key(*args, **kwargs):
    """solve_layers' arguments, however passed (the search and manual_plan pass them apart)."""
    bound = inspect.signature(_SOLVE_LAYERS).bind(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    return (id(a.pop("stand")), id(a.pop("profiles")), json.dumps(a.pop("cluster").to_dict()),
            tuple(a.pop("sub_mesh").items()), repr(sorted(a.items())))


@contextlib.contextmanager
def shared_planning_work():
    """Within the block, `autopar.plan` and `autopar.manual_plan` share traces (by model
    object, input shapes and loss function), stand-ins and intra-op solves. Models must not
    change inside the block."""
    with pytest.MonkeyPatch.context() as mp:
        # the planner's `how` is a partial of trace_repeated over a per-call SizedTracer: the
        # graph is the same whatever tracer made it, so the key is the function itself
        traced = _memo(trace.trace_for_training, lambda model, inputs, loss_fn, how=None: (
            id(model), trace.inputs_key(inputs), loss_fn, getattr(how, "func", how)))
        mp.setattr(trace, "trace_for_training", traced)
        mp.setattr(trace_repeats, "trace_for_training", traced)  # the planner's tracer
        prepare = _memo(search.prepare, id)
        solve_layers = _memo(search.solve_layers, _solve_key)
        for planning in (search, manual):  # the search's and manual_plan's
            mp.setattr(planning, "prepare", prepare)
            mp.setattr(planning, "solve_layers", solve_layers)
        yield
