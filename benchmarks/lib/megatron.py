"""Megatron-LM's weak-scaling study (Narayanan et al., SC'21, table 1) as meta-device GPTs and
hand configurations, scored by `autopar.simulate` (benchmarks/megatron_sc21.py says which
assumptions fill the table's gaps), and the markdown table of published beside simulated."""

from __future__ import annotations

import time

import torch

import autopar
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from autopar.planning.profile import TrainingPrecision

VOCAB, SEQ = 51200, 2048

# Table 1 of Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
# Using Megatron-LM", SC'21 (arXiv:2104.04473): parameters (billions), attention heads, hidden
# size, layers, tensor-parallel size, pipeline-parallel size, GPUs, batch size, achieved
# TFLOP/s per GPU, percentage of theoretical peak.
TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52),
]


def megatron_flops(batch: int, layers: int, hidden: int) -> float:
    """FLOPs per step as the paper counts them (forward, backward and recomputation)."""
    s, h, n = SEQ, hidden, layers
    return 96 * batch * s * n * h * h * (1 + s / (6 * h) + VOCAB / (16 * n * h))


def setup(row):
    params_b, heads, hidden, layers, tp, pp, gpus, batch, tflops, pct = row
    with torch.device("meta"):
        model = GPT(
            GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=layers, n_head=heads, d_model=hidden)
        ).to(torch.bfloat16)
    x = torch.zeros(batch, SEQ, dtype=torch.long, device="meta")
    cluster = autopar.Cluster.preset("a100-80g", nodes=gpus // 8)
    return model, (x, x), cluster


def simulate_row(row, *, plan_too: bool, log) -> dict:
    params_b, heads, hidden, layers, tp, pp, gpus, batch, tflops, pct = row
    model, inputs, cluster = setup(row)
    precision = TrainingPrecision.mixed_bf16()
    dp = gpus // (tp * pp)
    microbatch = 1
    flops = megatron_flops(batch, layers, hidden)
    published_step = flops / (tflops * 1e12 * gpus)
    start = time.perf_counter()
    manual = autopar.manual_plan(
        model,
        cluster,
        inputs,
        loss_fn=lm_loss,
        tp=tp,
        pp=pp,
        dp=dp,
        microbatch_size=microbatch,
        schedule="1F1B",
        checkpoint="full",
        zero=0,
        precision=precision,
    )
    report = autopar.simulate(manual)
    out = {
        "params_b": params_b,
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "gpus": gpus,
        "batch": batch,
        "tp": tp,
        "pp": pp,
        "dp": dp,
        "microbatch": microbatch,
        "published_tflops_per_gpu": tflops,
        "published_pct_peak": pct,
        "published_step_s": published_step,
        "simulated_step_s": report.step_time_s,
        "simulated_tflops_per_gpu": flops / report.step_time_s / gpus / 1e12,
        "simulated_peak_memory_gib": report.peak_memory_bytes / 2**30,
        "simulate_seconds": time.perf_counter() - start,
    }
    log(
        f"{params_b}B: published {published_step:.2f} s/step, simulated "
        f"{report.step_time_s:.2f} s, peak {out['simulated_peak_memory_gib']:.1f} GiB"
    )
    if plan_too:
        start = time.perf_counter()
        plan = autopar.plan(
            model,
            cluster,
            inputs,
            loss_fn=lm_loss,
            precision=precision,
            memory_limit=cluster.device.memory_bytes,
            microbatch_size=1,
        )
        mine = autopar.simulate(plan)
        pipe = plan.pipeline or {}
        out["planner"] = {
            "mesh": dict(plan.mesh),
            "data_parallel": plan.data_parallel,
            "schedule": pipe.get("schedule"),
            "microbatch": (pipe.get("microbatch_size", 0) // max(plan.mesh.get("dp", 1), 1)),
            "checkpointed_layers": len(plan.checkpoint),
            "stage_cut": plan.solver.get("stage_cut"),
            "step_s": mine.step_time_s,
            "tflops_per_gpu": flops / mine.step_time_s / gpus / 1e12,
            "peak_memory_gib": mine.peak_memory_bytes / 2**30,
            "planning_seconds": time.perf_counter() - start,
        }
        log(f"   planner: {out['planner']}")
    return out


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | GPUs | tp x pp x dp | batch | published TFLOP/s/GPU | published s/step "
        "| simulated s/step | simulated TFLOP/s/GPU | simulated / published time "
        "| simulated peak GiB | planner's plan | planner s/step | planner peak GiB |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        p = r.get("planner")
        plan_cols = (
            "| - | - | - |"
            if p is None
            else f"| pp {p['mesh'].get('pp', 1)} x dp {p['mesh'].get('dp', 1)} x tp "
            f"{p['mesh'].get('tp', 1)}, {p['data_parallel']}, mb {p['microbatch']}, "
            f"{p['checkpointed_layers']} ckpt | {p['step_s']:.2f} "
            f"| {p['peak_memory_gib']:.1f} |"
        )
        lines.append(
            f"| {r['params_b']}B ({r['layers']} x {r['hidden']}) | {r['gpus']} "
            f"| {r['tp']} x {r['pp']} x {r['dp']} | {r['batch']} "
            f"| {r['published_tflops_per_gpu']} | {r['published_step_s']:.2f} "
            f"| {r['simulated_step_s']:.2f} | {r['simulated_tflops_per_gpu']:.0f} "
            f"| {r['simulated_step_s'] / r['published_step_s']:.2f} "
            f"| {r['simulated_peak_memory_gib']:.1f} " + plan_cols
        )
    return "\n".join(lines)
