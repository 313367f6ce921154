"""Tests for solvers.pipeline_problem: validation, the cost model by hand, and runs of identical
layers."""

import pytest

from solvers.pipeline_problem import (
    Run,
    evaluate_pipeline,
    layer_runs,
    same_kind,
    score_stages,
    stage_costs,
)
from tests.solvers.pipeline_instances import FULL, NONE, interleaved, layer, problem


class TestEvaluatePipeline:
    def test_formula_by_hand(self):
        p = problem([layer(n, state_bytes=5.0) for n in "abc"])
        opts = dict.fromkeys("abc", "none")
        # T = (6, 3); step = 9 + 3 * 6 = 27; memory: 2 layers * (5 + 2 * 10), 1 * (5 + 1 * 10).
        assert evaluate_pipeline(p, (("a", "b"), ("c",)), opts) == (27.0, (50.0, 15.0))

    def test_bad_cut_or_option_is_rejected(self):
        p = problem([layer(n) for n in "abc"])
        opts = dict.fromkeys("abc", "none")
        with pytest.raises(ValueError, match="contiguous"):
            evaluate_pipeline(p, (("a", "c"), ("b",)), opts)
        with pytest.raises(ValueError, match="contiguous"):
            evaluate_pipeline(p, (("a", "b", "c"), ()), opts)
        with pytest.raises(ValueError, match="needs one of the options"):
            evaluate_pipeline(p, (("a",), ("b", "c")), {**opts, "b": "full"})

    def test_interleaved_rank_sums_its_stages(self):
        # pp = 2, v = 2: stages 0, 2 on rank 0 and 1, 3 on rank 1. T = (3, 3, 6, 3), rank times
        # (9, 6); b = 1/2, m = 4: step = 0.5 * 15 + 3.5 * 9 = 39. Every layer holds 1 + 1 * 10.
        p = interleaved([layer(n, state_bytes=1.0) for n in "abcde"])
        plan = (("a",), ("b",), ("c", "d"), ("e",))
        assert evaluate_pipeline(p, plan, dict.fromkeys("abcde", "none")) == (39.0, (33.0, 22.0))


class TestStageCosts:
    def test_send_follows_every_stage_but_the_last(self):
        # Stage 0 sends b's 8 bytes: 6 + 1 + 0.5 * 8 = 11 s; stage 1 (c) sends nothing.
        layers = [layer("a", boundary_bytes=4.0), layer("b", boundary_bytes=8.0)]
        p = problem(
            [*layers, layer("c", boundary_bytes=100.0)], p2p_s_per_byte=0.5, p2p_latency_s=1.0
        )
        assert stage_costs(p, ((0, 1), (2,)), [0, 0, 0]) == ([11.0, 3.0], [40.0, 10.0])

    def test_options_by_index(self):
        p = problem([layer(n, options=(NONE, FULL)) for n in "ab"])
        # a "full" on stage 0 (2 microbatches in flight), b "none" on stage 1 (one).
        assert stage_costs(p, ((0,), (1,)), [1, 0]) == ([4.0, 3.0], [4.0, 10.0])

    def test_score_from_stage_times(self):
        # b = 1, m = 4: 14 + 3 * 11 = 47.
        p = problem([layer(n) for n in "abc"])
        assert score_stages(p, [11.0, 3.0], [40.0, 10.0]) == (47.0, (40.0, 10.0))


class TestValidate:
    def test_more_stages_than_layers(self):
        with pytest.raises(ValueError, match="every stage needs a layer"):
            problem([layer("a")], num_stages=2).validate()

    def test_in_flight_length(self):
        with pytest.raises(ValueError, match="in_flight"):
            problem([layer("a"), layer("b")], in_flight=(1,)).validate()

    def test_rank_without_stage(self):
        with pytest.raises(ValueError, match=r"ranks \[1\] without a stage"):
            problem([layer("a"), layer("b")], stage_of_rank=(0, 2)).validate()

    def test_bubble_weight_above_microbatches(self):
        with pytest.raises(ValueError, match="bubble_weight"):
            problem([layer("a")], num_stages=1, num_microbatches=1, bubble_weight=2).validate()

    def test_duplicate_layer(self):
        with pytest.raises(ValueError, match="appears twice"):
            problem([layer("a"), layer("a")]).validate()


class TestLayerRuns:
    def test_same_kind_ignores_the_name(self):
        assert same_kind(layer("a"), layer("b"))
        assert not same_kind(layer("a"), layer("b", options=(NONE, FULL)))
        assert not same_kind(layer("a"), layer("b", state_bytes=1.0))
        assert not same_kind(layer("a"), layer("b", boundary_bytes=1.0))

    def test_runs_group_adjacent_identical_layers(self):
        a, b, c, d, e = layer("a"), layer("b"), layer("c", state_bytes=1.0), layer("d"), layer("e")
        assert layer_runs((a, b, c, d, e)) == (Run(0, 2, a), Run(2, 1, c), Run(3, 2, d))
        assert layer_runs((c,)) == (Run(0, 1, c),)
