"""Stage cuts of layers that are not a chain: a cut between two T5 decoder blocks sends, and the
stage after it holds, the encoder's output besides the block's own output (every value made
before the cut and read after it)."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import autopar
from autopar.layers import assign_layers, crossing, layer_order
from autopar.planning.candidate import Candidate, evaluate
from autopar.planning.layer_costs import layer_costs, prepare, solve_layers
from autopar.planning.profile import TrainingPrecision
from autopar.trace import trace
from tests.helpers.hf_models import hf_batch, hf_model

SUB_MESH = {"dp": 1, "tp": 1}  # one device per stage: bytes are whole tensors
PRECISION = TrainingPrecision()


@functools.cache
def _t5_costs():
    with torch.device("meta"):
        model = hf_model("t5")
    traced = trace(model, hf_batch("t5"))
    stand, profiles = prepare(traced)
    cluster = autopar.Cluster.preset("h100-80g", nodes=1, devices_per_node=2)
    solved = solve_layers(stand, profiles, cluster, SUB_MESH, precision=PRECISION)
    costs = layer_costs(stand, profiles, cluster, SUB_MESH, "replicate", precision=PRECISION,
                        solved=solved)
    return traced, cluster, costs


def _nbytes(traced, name):
    v = traced.node(name).meta["val"]
    return v.numel() * v.element_size()


def test_a_decoder_cut_sends_and_holds_the_encoder_output():
    traced, _, costs = _t5_costs()
    layer = assign_layers(traced)
    cuts = dict(zip(layer_order(layer), crossing(traced)))
    by_name = {x.name: x for x in costs.layers}
    after = cuts["decoder.block.0"]
    # the encoder's output: made between the stacks, read by every decoder block
    encoder_out = [v for v in after if layer[v] == "between.0"
                   and traced.node(v).meta["val"].shape[-1] == 64]
    assert encoder_out
    own = [v for v in after if layer[v] == "decoder.block.0"]
    x = by_name["decoder.block.0"]
    assert x.boundary_bytes == sum(_nbytes(traced, v) for v in after)
    assert x.carry_bytes == x.boundary_bytes - sum(_nbytes(traced, v) for v in own)
    assert x.carry_bytes >= sum(_nbytes(traced, v) for v in encoder_out) > 0
    # the last decoder block's cut no longer carries it: nothing after reads it
    assert not set(encoder_out) & set(cuts["decoder.block.1"])


def test_the_stage_after_a_cut_holds_what_it_carries():
    traced, cluster, costs = _t5_costs()
    order = [x.name for x in costs.layers]
    cut = order.index("decoder.block.0") + 1
    c = Candidate(mesh={"pp": 2, **SUB_MESH}, microbatch_size=4, num_microbatches=2,
                  schedule="1F1B", v=1, flavour="replicate",
                  stages=(tuple(order[:cut]), tuple(order[cut:])),
                  options={x: "none" for x in order}, costs=costs)
    chain = dataclasses.replace(costs, layers=tuple(
        dataclasses.replace(x, carry_bytes=0.0) for x in costs.layers))
    with_carry = evaluate(dataclasses.replace(c), cluster)
    without = evaluate(dataclasses.replace(c, costs=chain), cluster)
    carried = {x.name: x for x in costs.layers}["decoder.block.0"].carry_bytes
    # 1F1B on 2 stages: the second holds one microbatch in flight
    assert with_carry.rank_memory[1]["activations"] - without.rank_memory[1]["activations"] == (
        pytest.approx(carried))
    assert with_carry.rank_memory[0] == without.rank_memory[0]
    # the send after stage 0 is the whole cut, encoder output included
    sent = {x.name: x for x in costs.layers}["decoder.block.0"].boundary_bytes
    link = cluster.axis_links((2, 1, 1))[0]
    assert with_carry.p2p_s == pytest.approx(
        2 * (link.latency_s + sent / link.bandwidth_bytes_per_s), rel=1e-9)
