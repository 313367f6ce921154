"""Tests for solvers.pipeline_layers, the per-layer stage-cut ILP: readable names, symmetry
breaking only between identical neighbours, and plans read back from a solve. (Its optimum against
the brute force: tests/solvers/test_pipeline.py and test_pipeline_runs.py.)"""

from solvers import solve_pipeline_brute_force
from solvers.backend import run_solver
from solvers.pipeline_layers import build_pipeline_ilp, read_layers_plan
from tests.solvers.pipeline_instances import FULL, NONE, layer, problem


def row_names(lp):
    """The model's constraint names, in the order they were added."""
    return [row.name for row in lp.constraints()]


def test_constraint_names_are_readable():
    p = problem([layer(n) for n in ("embed", "block.0", "head")], memory_budget_bytes=100.0)
    lp = build_pipeline_ilp(p).lp
    for name in ("one_stage(block.0)", "contiguous(head,1)", "memory(0)", "rank_time(1)"):
        assert lp.get_constraint_by_name(name) is not None, name


def test_symmetry_rows_only_between_identical_neighbours():
    # a, b identical with one option (nothing to order); c, d identical with two; e differs.
    layers = [
        layer("a"),
        layer("b"),
        layer("c", options=(NONE, FULL)),
        layer("d", options=(NONE, FULL)),
        layer("e", options=(NONE, FULL), state_bytes=1.0),
    ]
    lp = build_pipeline_ilp(problem(layers)).lp
    assert [name for name in row_names(lp) if name.startswith("same_layer")] == [
        "same_layer_order(c)"
    ]


def test_peak_model_has_no_time_rows():
    p = problem([layer(n) for n in "abc"], memory_budget_bytes=100.0)
    ilp = build_pipeline_ilp(p, minimise="peak")
    names = row_names(ilp.lp)
    assert "peak(0)" in names and "peak(1)" in names
    assert not [n for n in names if n.startswith(("rank_time", "memory", "cut"))]
    assert not ilp.c


def test_plan_is_read_back_from_a_solve():
    # Budget 30 (see test_pipeline.py): stage 0 checkpoints one of a, b; same_layer_order puts
    # the checkpointed one second.
    p = problem([layer(n, options=(NONE, FULL)) for n in "abcd"], memory_budget_bytes=30.0)
    ilp = build_pipeline_ilp(p)
    run_solver(ilp, solver="highs", time_limit_s=None, gap=None, msg=False)
    stages, options = read_layers_plan(ilp, p)
    assert (stages, options) == (((0, 1), (2, 3)), [0, 1, 0, 0])
    assert solve_pipeline_brute_force(p).stages == (("a", "b"), ("c", "d"))
