"""A GPT-3 175B-like stage-cut problem (embedding, equal blocks, head; per-device figures at
tp 8) for `solvers.solve_pipeline`, and one timed solve of it: the instances of
benchmarks/stage_ilp_depth.py."""

from __future__ import annotations

import time

from solvers import (
    InfeasibleProblem,
    Layer,
    LayerOption,
    NoSolutionFound,
    PipelineProblem,
    solve_pipeline,
)


def options(fwd_s: float, bwd_s: float, act_bytes: float, full_act_bytes: float):
    """none, and full checkpoint (backward reruns the forward, keeps only the input)."""
    return (
        LayerOption(name="none", fwd_s=fwd_s, bwd_s=bwd_s, activation_bytes=act_bytes),
        LayerOption(name="full", fwd_s=fwd_s, bwd_s=bwd_s + fwd_s, activation_bytes=full_act_bytes),
    )


def in_flight(pp: int, v: int, m: int) -> tuple[int, ...]:
    """Per stage, as autopar.schedules gives them (checked there for m a multiple of pp, m >= 2pp):
    1F1B min(pp - s, m); interleaved 1F1B with v = 2 min(max(2pp-1-2s, pp), 4pp-1-2s)."""
    if v == 1:
        return tuple(min(pp - s, m) for s in range(pp))
    if v == 2:
        return tuple(min(max(2 * pp - 1 - 2 * s, pp), 4 * pp - 1 - 2 * s) for s in range(2 * pp))
    raise ValueError("v must be 1 or 2")


def gpt3_problem(pp: int, v: int, m: int, budget_bytes: float, blocks: int = 96) -> PipelineProblem:
    """Per device at tp 8, microbatch 1, sequence 2048, d 12288 (bf16 compute, Adam state of
    16 bytes per parameter): a block 0.0183 s forward+backward, 3.62 GB of state, 359 MB of
    activations (50 MB checkpointed); 50 MB sent between stages over 12.5 GB/s."""
    boundary = 50.3e6
    block = options(0.0061, 0.0122, 358.6e6, 50.3e6)
    layers = [
        Layer(
            name="pre",
            options=options(0.0003, 0.0006, 50.3e6, 0.0),
            state_bytes=1.26e9,
            boundary_bytes=boundary,
        )
    ]
    layers += [
        Layer(name=f"blocks.{i}", options=block, state_bytes=3.62e9, boundary_bytes=boundary)
        for i in range(blocks)
    ]
    layers += [
        Layer(
            name="post",
            options=options(0.0017, 0.0034, 103e6, 50.3e6),
            state_bytes=1.26e9,
            boundary_bytes=0.0,
        )
    ]
    S = pp * v
    return PipelineProblem(
        layers=tuple(layers),
        num_stages=S,
        num_microbatches=m,
        in_flight=in_flight(pp, v, m),
        stage_of_rank=tuple(s % pp for s in range(S)),
        memory_budget_bytes=budget_bytes,
        p2p_s_per_byte=1 / 12.5e9,
        p2p_latency_s=5e-6,
        bubble_weight=1.0 / v,
    )


def solve_row(problem: PipelineProblem, formulation: str, limit_s: float) -> str:
    start = time.perf_counter()
    try:
        sol = solve_pipeline(problem, time_limit_s=limit_s, formulation=formulation)
        gap = f"{sol.gap:.2%}" if sol.gap is not None else "-"
        outcome = f"{sol.status:9s} {gap:>7s} {sol.step_time_s:9.4f}"
    except InfeasibleProblem as err:
        outcome = f"infeasible (least peak {err.min_peak_bytes / 1e9:.1f} GB)"
    except NoSolutionFound:
        outcome = "no plan within the limit"
    return f"{time.perf_counter() - start:7.1f}  {outcome}"
