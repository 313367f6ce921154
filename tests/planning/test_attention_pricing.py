"""Attention priced by shape: the profile keeps model FLOPs and the shape, the cost model prices
the kernel's work (causal blocks skipped, tiles padded) at an efficiency that depends on the key
length and the head dim (autopar/planning/cost.py: attention_time_s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.cluster import ATTENTION_KEYS, DeviceSpec
from autopar.errors import ClusterSpecError
from autopar.planning import cost
from autopar.planning.profile import Attention, profile_graph

aten = torch.ops.aten
approx = pytest.approx
DEVICES = Path(autopar.__file__).parent / "data" / "devices"

CURVE = {"tile": 128.0, "head_dim_tile": 32.0,
         "forward_efficiency": 0.7, "forward_seq_half": 256.0, "forward_head_dim_half": 32.0,
         "forward_causal": 1.1, "forward_dropout": 1.25,
         "backward_efficiency": 0.5, "backward_seq_half": 512.0,
         "backward_head_dim_half": 64.0, "backward_causal": 1.2, "backward_dropout": 1.5}
PEAK = 1000e12


def _device(curve=CURVE, ops=None):
    return DeviceSpec(name="toy", memory_bytes=10**9, hbm_bandwidth_bytes_per_s=1e12,
                      peak_flops={"bfloat16": PEAK},
                      calibration={"matmul": 0.5, "memory": 0.5, "kernel_s": 1e-6,
                                   "ops": ops or {}, "attention": curve})


def _attn(bh=64, s=2048, d=128, causal=False, dropout=0.0, s_k=None):
    return Attention(batch_heads=bh, seq_q=s, seq_k=s_k or s, head_dim=d, head_dim_v=d,
                     causal=causal, dropout_p=dropout, masked=False)


def _time(a, device=None):
    device = device or _device()
    return sum(cost.attention_time_s(a, device, "bfloat16", p) for p in ("forward", "backward"))


class _Attention(nn.Module):
    def __init__(self, causal: bool, dropout: float = 0.0):
        super().__init__()
        self.causal, self.dropout = causal, dropout
        self.w = nn.Parameter(torch.randn(32, 32))

    def forward(self, x):  # x: (B, H, S, D)
        q = x @ self.w
        return F.scaled_dot_product_attention(q, x, x, is_causal=self.causal,
                                              dropout_p=self.dropout).sum()


def _sdpa_profile(causal, dropout=0.0):
    x = torch.randn(2, 4, 16, 32)
    ep = torch.export.export(_Attention(causal, dropout).to("meta"), (x.to("meta"),),
                             strict=False)
    table = torch.export.default_decompositions()
    del table[aten.scaled_dot_product_attention.default]
    gm = ep.run_decompositions(table).graph_module
    profiles = profile_graph(gm)
    (node,) = [n for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    return profiles[node.name]


class TestProfile:
    def test_attention_node_keeps_its_shape(self):
        p = _sdpa_profile(causal=True, dropout=0.1)
        assert p.attention == Attention(batch_heads=8, seq_q=16, seq_k=16, head_dim=32,
                                        head_dim_v=32, causal=True, dropout_p=0.1, masked=False)

    def test_model_flops_count_every_block_causal_or_not(self):
        # MFU and TFLOP/s figures count attention as Megatron and PaLM do: causal not discounted
        causal, full = _sdpa_profile(causal=True), _sdpa_profile(causal=False)
        assert causal.fwd_flops == full.fwd_flops == causal.attention.fwd_flops
        assert causal.bwd_flops == full.bwd_flops == causal.attention.bwd_flops
        assert causal.fwd_flops == 4 * 8 * 16 * 16 * 32

    def test_other_ops_have_none(self):
        x = torch.randn(4, 8)
        ep = torch.export.export(nn.Linear(8, 8).to("meta"), (x.to("meta"),), strict=False)
        profiles = profile_graph(ep.graph_module)
        assert all(p.attention is None for p in profiles.values())


class TestKernelFlops:
    def test_untiled_non_causal_is_the_model_count(self):
        a = _attn()
        assert cost.attention_kernel_flops(a, "forward") == a.fwd_flops
        assert cost.attention_kernel_flops(a, "backward") == a.bwd_flops

    def test_causal_skips_the_blocks_above_the_diagonal(self):
        a, c = _attn(), _attn(causal=True)
        # 16 tiles of 128: 16 * 17 / 2 of 256 blocks
        assert cost.attention_kernel_flops(c, "forward", 128) == approx(
            a.fwd_flops * 136 / 256)
        # one token per tile: the exact triangle, diagonal included
        assert cost.attention_kernel_flops(c, "forward", 1) == approx(
            a.fwd_flops * (2048 * 2049 / 2) / 2048**2)

    def test_padding_to_tiles(self):
        # 257 tokens take three tiles of 128 in each direction, head dim 88 is done as 96
        a = _attn(s=257, d=88)
        want = 4.0 * 64 * 384 * 384 * 96
        assert cost.attention_kernel_flops(a, "forward", 128, 32) == approx(want)

    def test_causal_with_more_keys_than_queries(self):
        # top-left aligned: query tile i sees key tiles 0..i
        c = _attn(s=256, s_k=1024, causal=True)
        blocks = 1 + 2  # two query tiles of 128
        assert cost.attention_kernel_flops(c, "forward", 128) == approx(
            4.0 * 64 * blocks * 128 * 128 * 128)


class TestPrice:
    def test_causal_costs_about_half_of_non_causal_at_long_sequences(self):
        full, causal = _attn(s=4096), _attn(s=4096, causal=True)
        ratio = _time(causal) / _time(full)
        # 32 tiles: 528 of 1024 blocks, times the causal factors (per part)
        fwd = cost.attention_time_s(full, _device(), "bfloat16", "forward")
        bwd = cost.attention_time_s(full, _device(), "bfloat16", "backward")
        want = 528 / 1024 * (1.1 * fwd + 1.2 * bwd) / (fwd + bwd)
        assert ratio == approx(want)
        assert 0.5 < ratio < 0.65

    def test_short_sequences_run_at_a_lower_efficiency(self):
        dev = _device()
        short, long = _attn(s=256), _attn(s=4096)
        for part in ("forward", "backward"):
            assert (cost.attention_efficiency(short, dev, part)
                    < cost.attention_efficiency(long, dev, part))
        # per FLOP of work, short sequences cost more
        assert _time(short) / short.fwd_flops > 1.5 * _time(long) / long.fwd_flops

    def test_small_head_dims_run_at_a_lower_efficiency(self):
        dev = _device()
        assert (cost.attention_efficiency(_attn(d=64), dev, "forward")
                < cost.attention_efficiency(_attn(d=128), dev, "forward"))

    def test_the_curve_by_hand(self):
        a = _attn(s=512, d=64)
        eff = 0.7 * 512 / (512 + 256) * 64 / (64 + 32)
        assert cost.attention_time_s(a, _device(), "bfloat16", "forward") == approx(
            a.fwd_flops / (PEAK * eff))

    def test_dropout_multiplies_by_its_factor(self):
        plain, drop = _attn(s=512), _attn(s=512, dropout=0.1)
        dev = _device()
        assert cost.attention_time_s(drop, dev, "bfloat16", "forward") == approx(
            1.25 * cost.attention_time_s(plain, dev, "bfloat16", "forward"))
        assert cost.attention_time_s(drop, dev, "bfloat16", "backward") == approx(
            1.5 * cost.attention_time_s(plain, dev, "bfloat16", "backward"))

    def test_compute_time_prices_a_share_of_the_op(self):
        # a split op (its heads over 4 devices) costs a quarter of the whole
        a, dev = _attn(s=1024), _device()
        whole = a.fwd_flops + a.bwd_flops
        assert cost.compute_time_s(whole / 4, 1e6, dev, "bfloat16",
                                   op="aten.scaled_dot_product_attention.default",
                                   attention=a) == approx(_time(a) / 4)

    def test_without_a_curve_the_flat_op_efficiency_prices_it(self):
        op = "aten.scaled_dot_product_attention.default"
        flat = _device(curve={}, ops={op: 0.8})
        a = _attn()
        flops = a.fwd_flops + a.bwd_flops
        assert cost.compute_time_s(flops, 0.0, flat, "bfloat16", op=op, attention=a) == \
            approx(flops / PEAK / 0.8)
        with pytest.raises(ValueError, match="attention_times.py"):
            cost.attention_time_s(a, flat, "bfloat16", "forward")


class TestCalibrationFile:
    def test_a_curve_needs_every_key(self):
        curve = dict(CURVE)
        del curve["backward_dropout"]
        with pytest.raises(ClusterSpecError, match="backward_dropout"):
            _device(curve=curve)

    def test_an_efficiency_above_one_is_refused(self):
        with pytest.raises(ClusterSpecError, match="forward_efficiency"):
            _device(curve=dict(CURVE, forward_efficiency=1.5))

    def test_a_device_without_a_curve_writes_none(self):
        # plans made before the curve existed keep their bytes
        cal = _device(curve={}).calibration.to_dict()
        assert "attention" not in cal

    @pytest.mark.parametrize("path", sorted(DEVICES.glob("*.json")), ids=lambda p: p.stem)
    def test_device_files_load_and_round_trip(self, path):
        cluster = autopar.Cluster.from_dict(json.loads(path.read_text()))
        cal = cluster.device.calibration
        if cal and cal.attention:
            assert set(cal.attention) == set(ATTENTION_KEYS)
            again = autopar.Cluster.from_dict(cluster.to_dict())
            assert again.device.calibration.attention == cal.attention
