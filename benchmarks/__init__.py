"""autopar's benchmarks: scripts that print the tables `docs/benchmarks/` quotes, over a small
library (`benchmarks.lib`).

Run a script as a file from the repository root, `python benchmarks/multigpu.py ...` (or under
`torchrun ... benchmarks/multigpu.py ...`), or as a module, `python -m benchmarks.multigpu ...`;
either way `benchmarks` must be importable: `pip install -e .` installs it beside autopar (or
set PYTHONPATH to the repository root).

Scripts, and the report each produces:

    multigpu.py          autopar's plan against eager, FSDP2, torchtitan-style TP + FSDP2 and
                         hand pipelines, measured on one torchrun job: the tokens/s, MFU,
                         memory and predicted-vs-measured table and JSON of the dated
                         docs/benchmarks/*-multigpu-* and *-single-h200* reports
    step_breakdown.py    a profiled step's kernel time by category beside the cost model's, from
                         a multigpu.py --profile JSON (docs/benchmarks/2026-12-04-single-h200-breakdown)
    compare_profiles.py  two systems' profiler tables side by side, from a multigpu.py
                         --profile-out file (docs/benchmarks/2026-11-30-multigpu-x2-offline-plans)
    compare_traces.py    whether a meta-device trace equals the accelerator's (the same report)
    plan_offline.py      one of multigpu.py's models planned offline on meta, for N H200s; -o
                         writes the plan for multigpu.py --plan-file (2026-11-29-multigpu-x2-llama)
    calibrate_device.py  op, host and link times on this machine and their fit: a device file's
                         "calibration" (docs/benchmarks/2026-11-29-single-h200-replay)
    fit_pipeline_stage.py  Calibration.pipeline_stage_s fitted to one measured pipelined step
                         (docs/benchmarks/2026-11-29-multigpu-x2)
    megatron_sc21.py     Megatron-LM SC'21 table 1 through autopar's cost model
                         (docs/benchmarks/2026-11-29-gpt3-175b-and-megatron-sc21)
    plan_gpt3_175b.py    GPT-3 175B planned for 1024 A100s, beside Megatron's hand configuration
                         (the same report)
    stage_ilp_depth.py   stage-cut ILP solve times on a deep model, per-layer against runs model
    plan_zoo.py          every zoo model planned for 1 to 1024 H100s, timed beside a GPT of its
                         depth (docs/benchmarks/2026-12-05-zoo-plans)
    hf_one_gpu.py        Hugging Face Llama, BERT and ViT of ~1B through autoparallelize against
                         the same models in eager PyTorch on one GPU (issue 15; no report yet)

Library modules (`benchmarks/lib/`), one job each:

    models          the benchmark models: shapes (MODELS, TINY), ModelSpec, losses, FLOP counts
    systems         the systems by name: System, what --systems expands to for one model
    distributed     the job: Ctx (process group, device, meshes), init_distributed
    optim           MasterAdamW (fp32 master weights), plain AdamW, the profiled optimizer step
    built           what a builder returns (Built), the gradient-accumulation step
    autopar_system  the autopar system: autoparallelize as a plan says
    baselines       eager, compiled (torch.compile + autocast) and FSDP2, and the checkpointing
                    and sharding the others share
    tensor_parallel the torchtitan-style TP + FSDP2 baseline
    pipeline        the hand 1F1B pipeline + FSDP2 baseline
    predict         autopar's predictions: plan, manual_plan per baseline, by category
    timing          random batches, the timed steps, the device's matmul and copy rates
    profiling       torch.profiler tables and the memory alive at a step's peak
    breakdown       a profiled step's device time by category, and the cost model's
    run             one model's measurements: predictions, then each system's row
    report          the per-system line, the JSON file, the final table
    op_timing       calibrate_device parts 1 and 2: op times and host time per op
    links           calibrate_device part 3: collective bandwidths and the fitted link
    calibration     the fit of op and host times, written into a device file
    megatron        Megatron-LM SC'21 table 1 rows, simulated, as markdown
    stage_ilp       the GPT-3-like stage-cut problem and one timed solve
"""
