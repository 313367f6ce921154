"""`autopar.simulate(plan) -> Report`: what a plan predicts, read from the plan alone.

The planner stores every figure the report needs in `plan.predicted` (so a plan for a cluster
that is not here can be judged). Keys of `plan.predicted` written by `autopar.planning.search`:

    step_time_s            pipeline_s + dp_sync_s
    pipeline_s             the stage model's step (compute, resharding, p2p, bubble)
    dp_sync_s              per-step data-parallel gradient all-reduce (replicate), optimizer step
                           and gradient accumulation
    gradient_accumulation_s  of dp_sync_s: adding up the microbatches' gradients
    bubble_fraction        the schedule's idle fraction (equal stages)
    peak_memory_bytes      the worst device
    memory_<kind>_bytes    that device's parameters, gradients, optimizer, activations,
                           temporaries
    communication_<axis>_s seconds per step on each mesh axis: pp (p2p sends, all
                           microbatches), dp (gradient reductions and ZeRO gathers), tp
                           (intra-op resharding and op collectives, all microbatches; on a
                           dp-only mesh they count as dp)
    flops_per_step         model FLOPs of one step (forward + backward, no recompute)
    samples_per_step, tokens_per_step, peak_flops_per_device, world_size
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.plan import Plan

MEMORY_KINDS = ("parameters", "gradients", "optimizer", "activations", "temporaries")


@dataclass(frozen=True, kw_only=True)
class Report:
    """Predicted performance of one plan (per device unless said otherwise).

    Attributes
    ----------
    step_time_s : float
        One training step (one global batch).
    samples_per_s, tokens_per_s : float
        Throughput; tokens only when the first input has a sequence dim (else 0).
    flops_per_step : float
        Model FLOPs of a step, forward + backward, without recompute.
    tflops_per_gpu : float
        flops_per_step / step_time_s / world_size / 1e12.
    mfu : float
        Model FLOPs utilisation: achieved FLOP/s per device over the device's peak for the
        compute dtype (PaLM, Chowdhery et al. 2022, appendix B).
    peak_memory_bytes : float
        The worst device.
    memory_bytes : dict
        That device's breakdown: parameters, gradients, optimizer, activations, temporaries.
    communication_s : dict
        Seconds per step on each mesh axis (see the module docstring).
    bubble_fraction : float
        Idle fraction of the pipeline schedule (0 without pp).
    """

    step_time_s: float
    samples_per_s: float
    tokens_per_s: float
    flops_per_step: float
    tflops_per_gpu: float
    mfu: float
    peak_memory_bytes: float
    memory_bytes: dict[str, float] = field(default_factory=dict)
    communication_s: dict[str, float] = field(default_factory=dict)
    bubble_fraction: float = 0.0

    def summary(self) -> str:
        """The report as a few readable lines: step time, throughput, compute and MFU, peak
        memory and its breakdown (GiB), communication per mesh axis, pipeline bubble."""
        gib = 2**30
        mem = ", ".join(f"{k} {v / gib:.2f}" for k, v in self.memory_bytes.items())
        comm = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.communication_s.items())
        return "\n".join([
            f"step time      {self.step_time_s:.4g} s",
            f"throughput     {self.samples_per_s:.4g} samples/s, {self.tokens_per_s:.4g} tokens/s",
            f"compute        {self.flops_per_step:.4g} FLOP/step, "
            f"{self.tflops_per_gpu:.1f} TFLOP/s per GPU, MFU {self.mfu * 100:.1f}%",
            f"peak memory    {self.peak_memory_bytes / gib:.2f} GiB ({mem} GiB)",
            f"communication  {comm}",
            f"bubble         {self.bubble_fraction * 100:.1f}%",
        ])


def simulate(plan: Plan) -> Report:
    """Predicted step time, throughput, MFU and memory of `plan`, from the plan alone."""
    p = plan.predicted
    if "flops_per_step" not in p:
        raise ValueError(
            "this plan has no search predictions (flops_per_step, ...): it was made by the "
            "intra-op planner alone; re-plan with autopar.plan(...) or autopar.manual_plan(...)"
        )
    step = p["step_time_s"]
    world = p.get("world_size", plan.world_size)
    flops_s = p["flops_per_step"] / step / world if step > 0 else 0.0
    peak = p.get("peak_flops_per_device", 0.0)
    return Report(
        step_time_s=step,
        samples_per_s=p["samples_per_step"] / step,
        tokens_per_s=p.get("tokens_per_step", 0.0) / step,
        flops_per_step=p["flops_per_step"],
        tflops_per_gpu=flops_s / 1e12,
        mfu=flops_s / peak if peak else 0.0,
        peak_memory_bytes=p["peak_memory_bytes"],
        memory_bytes={k: p.get(f"memory_{k}_bytes", 0.0) for k in MEMORY_KINDS},
        communication_s={k.removeprefix("communication_").removesuffix("_s"): v
                         for k, v in sorted(p.items()) if k.startswith("communication_")},
        bubble_fraction=p.get("bubble_fraction", 0.0),
    )
