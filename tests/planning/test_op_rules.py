"""Ops without a sharding rule, and `autopar.register_rule`: an op no rule covers
(`aten._cdist_forward`, which DTensor cannot shard in torch 2.13) is replicated with a warning
and listed in the plan; a registered rule shards it, runs on local shards (checked against
unsharded execution here, and in training on two ranks in tests/runtime/test_registered_rules.py);
bad registrations and bad rules are errors that say what to do; docs/rules.md's example runs."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

import autopar
from autopar.planning import op_rules
from autopar.trace import trace
from tests.golden import make_golden
from tests.helpers.custom_ops import (
    CDIST,
    Prototypes,
    cdist_rule,
    prototypes_batch,
    prototypes_loss,
    rule_example,
    wrong_cdist_rule,
)
from tests.helpers.models import fast_cpu_cluster
from tests.helpers.simulate import check_strategy, enumerate_strategies, real_values, simulated_mesh


def _plan_prototypes() -> tuple[autopar.Plan, list[warnings.WarningMessage]]:
    """Prototypes planned on dp=2, and the NoShardingRuleWarnings planning gave."""
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = autopar.plan(Prototypes(), fast_cpu_cluster(2), prototypes_batch(),
                            loss_fn=prototypes_loss, mesh={"dp": 2})
    return plan, [w for w in caught if issubclass(w.category, autopar.NoShardingRuleWarning)]


@functools.cache
def _without_rule():
    return _plan_prototypes()


@functools.cache
def _with_rule():
    with autopar.register_rule(CDIST, cdist_rule):
        return _plan_prototypes()


# -- an op with no rule --------------------------------------------------------------------------


def test_an_op_without_a_rule_is_replicated_with_one_warning_naming_it():
    plan, caught = _without_rule()
    assert plan.ops["_cdist_forward"].rule == "replicate"
    assert plan.ops["_cdist_forward"].inputs == [["R"], ["R"]]
    assert len(caught) == 1  # one per op, however many meshes and microbatches were tried
    message = str(caught[0].message)
    assert message.startswith("aten._cdist_forward.default has no sharding rule that fits its "
                              "tensors, so its 1 node runs whole on every rank")
    assert "autopar.register_rule(torch.ops.aten._cdist_forward.default, rule)" in message
    assert caught[0].filename == __file__  # the user's line that planned, not autopar's


def test_the_plan_lists_the_ops_without_a_rule():
    plan, _ = _without_rule()
    assert plan.fallback_ops == {"aten._cdist_forward.default": 1}
    assert json.loads(plan.to_json())["fallback_ops"] == {"aten._cdist_forward.default": 1}
    assert autopar.Plan.from_dict(json.loads(plan.to_json())) == plan
    assert ("no rule    aten._cdist_forward.default (1 node) runs replicated: shard it with "
            "autopar.register_rule") in plan.summary()


def test_plans_without_fallbacks_leave_the_field_out_and_older_files_load():
    old = autopar.Plan.load(make_golden.DEMO_4CPU)  # written before the field existed
    assert old.fallback_ops == {}
    assert "fallback_ops" not in old.to_json()
    assert old.to_json() == make_golden.DEMO_4CPU.read_text()
    d = json.loads(old.to_json())
    d["fallback_ops"] = {"aten._cdist_forward.default": 0}
    with pytest.raises(ValueError, match="fallback_ops should map ATen ops to node counts"):
        autopar.Plan.from_dict(d)


# -- a registered rule ---------------------------------------------------------------------------


def test_a_registered_rule_shards_the_op_and_ends_the_warning():
    plan, caught = _with_rule()
    before, _ = _without_rule()
    assert caught == []
    assert plan.fallback_ops == {}
    assert "fallback_ops" not in plan.to_json() and "no rule" not in plan.summary()
    op = plan.ops["_cdist_forward"]
    assert op.rule == "local"
    assert op.inputs == [["S(0)"], ["S(0)"]] and op.outputs == [["S(0)"]]  # split over the batch
    assert plan.predicted["step_time_s"] < before.predicted["step_time_s"]
    assert op_rules.rule_for(CDIST) is None  # the `with` block took it back


def test_a_rule_for_a_packet_covers_its_overloads_and_an_overload_rule_comes_first():
    def other(node):
        return []

    with autopar.register_rule(torch.ops.aten._cdist_forward, cdist_rule):
        assert op_rules.rule_for(CDIST) is cdist_rule
        with autopar.register_rule(CDIST, other):
            assert op_rules.rule_for(CDIST) is other
        assert op_rules.rule_for(CDIST) is cdist_rule
    assert op_rules.rule_for(CDIST) is None


def test_registering_again_replaces_and_remove_restores():
    first = autopar.register_rule(CDIST, cdist_rule)
    second = autopar.register_rule(CDIST, wrong_cdist_rule)
    try:
        assert op_rules.rule_for(CDIST) is wrong_cdist_rule
        second.remove()
        assert op_rules.rule_for(CDIST) is cdist_rule
        second.remove()  # twice: nothing more
        assert op_rules.rule_for(CDIST) is cdist_rule
    finally:
        first.remove()
    assert op_rules.rule_for(CDIST) is None
    # a built-in rule can be overridden, and comes back
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    with autopar.register_rule(sdpa, cdist_rule):
        assert op_rules.rule_for(sdpa) is cdist_rule
    assert op_rules.rule_for(sdpa) is op_rules.RULES[sdpa]


@pytest.mark.parametrize("op", [torch.cdist, "aten::_cdist_forward", None],
                         ids=["torch.cdist", "aten-name", "None"])
def test_registering_what_is_not_an_op_says_what_to_pass(op):
    with pytest.raises(autopar.AutoparError, match=r"not an ATen op: pass an op overload such as "
                                                   r"torch\.ops\.aten\.cumsum\.default"):
        autopar.register_rule(op, cdist_rule)
    assert op_rules.rule_for(CDIST) is None


def test_registering_a_custom_op_def_says_to_pass_its_overload():
    rownorm = rule_example(plan=False)["rownorm"]  # what @torch.library.custom_op returns
    with pytest.raises(autopar.AutoparError, match=r"torch\.ops\.mylib\.foo\.default"):
        autopar.register_rule(rownorm, cdist_rule)


def test_registering_a_rule_that_is_not_callable_says_what_to_pass():
    with pytest.raises(autopar.AutoparError, match=r"fn is \[\], not callable: pass a function "
                                                   r"fn\(node\)"):
        autopar.register_rule(CDIST, [])
    assert op_rules.rule_for(CDIST) is None


# -- rules that return the wrong thing -----------------------------------------------------------


@functools.cache
def _cdist_node():
    torch.manual_seed(0)
    x, y = prototypes_batch()
    traced = trace(Prototypes(), (x,), loss_fn=prototypes_loss, target=y)
    return traced, traced.node("_cdist_forward")


def one_input_rule(node):
    return [((Shard(0),), (Shard(0),))]


def test_a_rule_with_too_few_placements_names_the_op_and_the_rule():
    with autopar.register_rule(CDIST, one_input_rule), pytest.raises(
        autopar.AutoparError,
        match=r"the sharding rule tests\.planning\.test_op_rules\.one_input_rule for "
              r"aten\._cdist_forward\.default \(node _cdist_forward\): strategy 0 has 1 input and "
              r"1 output placement\(s\), but aten\._cdist_forward\.default has 2 tensor input\(s\) "
              r"and 1 output\(s\)",
    ):
        autopar.plan(Prototypes(), fast_cpu_cluster(2), prototypes_batch(),
                     loss_fn=prototypes_loss, mesh={"dp": 2})


@pytest.mark.parametrize("result, says", [
    (None, "returned NoneType: return a list of"),
    ([(Shard(0), Shard(0), Shard(0))], "strategy 0 is"),
    ([((Shard(0), "S(0)"), (Shard(0),))], "holds 'S(0)', not a placement"),
    ([((Replicate(), Replicate()), (Replicate(), Replicate()))], "1 output(s)"),
], ids=["none", "not-a-pair", "a-string", "two-outputs"])
def test_a_rule_returning_the_wrong_thing_is_an_error_that_says_what_to_return(result, says):
    _, node = _cdist_node()
    with autopar.register_rule(CDIST, lambda node: result), pytest.raises(
            autopar.AutoparError, match=r"_cdist_forward") as e:
        op_rules.rule_strategies(node)
    assert says in str(e.value)
    assert "one placement per tensor input (2 here, in argument order)" in str(e.value) \
        or "not a placement" in str(e.value)


def test_a_rule_that_raises_is_named_in_the_traceback():
    _, node = _cdist_node()

    def broken(node):
        raise KeyError("oops")

    with autopar.register_rule(CDIST, broken), pytest.raises(KeyError) as e:
        op_rules.rule_strategies(node)
    assert any("broken for aten._cdist_forward.default" in note for note in e.value.__notes__)


# -- rules against unsharded execution -----------------------------------------------------------


def _check_rule(traced, values, node_name, mesh_shape=(2,)):
    """Errors of every strategy of `node_name`, run as the runtime runs it, on simulated ranks."""
    strategies = enumerate_strategies(traced, mesh_shape)[node_name]
    gen = torch.Generator().manual_seed(0)
    node = traced.node(node_name)
    with simulated_mesh(mesh_shape) as (mesh, mode):
        return strategies, [e for s in strategies
                            for e in check_strategy(node, s, values, mesh, mode, gen)]


def test_the_cdist_rule_matches_unsharded_execution_and_a_wrong_rule_does_not():
    traced, _ = _cdist_node()
    torch.manual_seed(0)
    x, y = prototypes_batch()
    values = real_values(traced, Prototypes(), (x, y))
    with autopar.register_rule(CDIST, cdist_rule):
        strategies, errors = _check_rule(traced, values, "_cdist_forward")
    assert {s.rule for s in strategies} == {"local"} and len(strategies) == 4
    assert errors == []
    with autopar.register_rule(CDIST, wrong_cdist_rule):
        strategies, errors = _check_rule(traced, values, "_cdist_forward")
    assert len(strategies) == 1 and errors  # the distances of half the features each


def test_the_docs_example_plans_its_custom_op_split_over_the_batch():
    ns = rule_example(plan=True)
    op = ns["plan"].ops["rownorm"]
    assert (op.rule, op.inputs, op.outputs) == ("local", [["S(0)"]], [["S(0)"]])
    assert ns["plan"].fallback_ops == {}
    model, (x, y) = ns["Model"](), (ns["x"], ns["y"])
    traced = trace(model, (x,), loss_fn=torch.nn.functional.mse_loss, target=y)
    values = real_values(traced, model, (x, y))
    strategies, errors = _check_rule(traced, values, "rownorm")
    assert len(strategies) == 3 and errors == []  # R, S(0), S(1) of a (8, 16, 256) input
