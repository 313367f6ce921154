"""Hugging Face models through `autoparallelize` against the same models in plain eager
PyTorch, on one GPU (issue 15).

Three models of about a billion parameters, one per family, built as their users build them:
`transformers.AutoConfig.for_model(model_type, **sizes)`, then the task's `AutoModelFor...
.from_config`, every other config field at transformers' default (BERT's dropout included), in
bf16, training mode. Each step calls the model as `Trainer` does, `model(**batch)` with
`labels`, and trains on the loss the model computes itself:

    hf-llama-1b  LlamaForCausalLM, TinyLlama-1.1B's shapes (22 layers, 2048 wide, 32 heads over
                 4 key/value heads, SwiGLU 5632, vocabulary 32000); 8 x 2048 tokens
    hf-bert-1b   BertForMaskedLM, BERT-large's layout widened to 1B (24 layers, 1792 wide, 28
                 heads of 64, FFN 7168); 32 x 512 tokens, 15% of them masked (labels -100
                 elsewhere, as transformers' masked-LM collator makes them)
    hf-vit-1b    ViTForImageClassification, ViT-g/14's shapes (Zhai et al. 2022: 40 layers,
                 1408 wide, 16 heads, MLP 6144); 64 images of 224 x 224, 1000 classes

Two systems per model, the same seed-0 weights and the same random batches (4, rotated):

    eager    the model as built, `model(**batch).loss.backward()`, then the optimizer
    autopar  `autopar.plan(model, Cluster.detect(), batch, precision=mixed_bf16)`, then
             `autoparallelize(model, cluster, batch, plan=plan)` and `pm.train_step(batch)`

Both step `MasterAdamW` (benchmarks/lib/optim.py: AdamW on fp32 master copies of the bf16
parameters, what the plan's mixed_bf16 precision charges). Each row has the median step time
(CUDA events after warm-up), the peak memory (torch.cuda.max_memory_allocated over the warm-up
and timed steps), autopar's predicted step and peak, and with --profile the step's kernel time
by category beside what the cost model charges (benchmarks/lib/breakdown.py).

    torchrun --standalone --nproc_per_node 1 benchmarks/hf_one_gpu.py --json $OUT/hf.json
    python benchmarks/hf_one_gpu.py --device cpu --tiny --json /tmp/hf.json   # CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

import autopar
from autopar.planning.profile import TrainingPrecision, profile_graph
from autopar.runtime import attention
from autopar.trace import trace
from benchmarks.lib import breakdown
from benchmarks.lib.distributed import init_distributed
from benchmarks.lib.optim import MasterAdamW, fused_on, optimizer_step
from benchmarks.lib.profiling import profile_steps
from benchmarks.lib.run import error_text
from benchmarks.lib.timing import measure_device, time_steps

# name -> (model_type, task, config sizes, batch, sequence length or None for images)
MODELS = {
    "hf-llama-1b": ("llama", "causal-lm", dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048), 8, 2048),
    "hf-bert-1b": ("bert", "masked-lm", dict(
        hidden_size=1792, num_hidden_layers=24, num_attention_heads=28,
        intermediate_size=7168), 32, 512),
    "hf-vit-1b": ("vit", "image-classification", dict(
        hidden_size=1408, num_hidden_layers=40, num_attention_heads=16, intermediate_size=6144,
        image_size=224, patch_size=14, num_labels=1000), 64, None),
}
# --tiny: the same families and code paths at sizes a CPU runs in seconds
TINY = {
    "hf-llama-1b": ("llama", "causal-lm", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256), 4, 64),
    "hf-bert-1b": ("bert", "masked-lm", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=256), 4, 64),
    "hf-vit-1b": ("vit", "image-classification", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=10), 4, None),
}
AUTO_CLASS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "image-classification": "AutoModelForImageClassification",
}
MASKED_FRACTION = 0.15  # BERT's masked-LM recipe (Devlin et al. 2019)
SYSTEMS = ("eager", "autopar")


def build(name: str, tiny: bool, device, dtype) -> torch.nn.Module:
    """The model with seed-0 weights (transformers' own initialisation), in training mode."""
    import transformers

    model_type, task, sizes, _, _ = (TINY if tiny else MODELS)[name]
    config = transformers.AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, AUTO_CLASS[task]).from_config(config)
    return model.to(dtype).train()


def batches(name: str, tiny: bool, count: int, device, dtype) -> list[dict]:
    """`count` random batches of keyword arguments with labels, the same for every system."""
    model_type, task, sizes, batch, seq = (TINY if tiny else MODELS)[name]
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(count):
        if task == "image-classification":
            size = sizes["image_size"]
            b = {"pixel_values": torch.randn(batch, 3, size, size, generator=g).to(dtype),
                 "labels": torch.randint(0, sizes["num_labels"], (batch,), generator=g)}
        else:
            vocab = sizes.get("vocab_size", 30522)  # BERT's default vocabulary
            ids = torch.randint(0, vocab, (batch, seq), generator=g)
            labels = ids.clone()
            if task == "masked-lm":
                masked = torch.rand(batch, seq, generator=g) < MASKED_FRACTION
                labels[~masked] = -100
            b = {"input_ids": ids, "labels": labels}
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def tokens(batch: dict) -> int:
    """Tokens (image patches for a ViT, its class token left out) in one batch."""
    x = batch.get("input_ids", batch.get("pixel_values"))
    return x.shape[0] * (x.shape[1] if x.ndim == 2 else 0)


# ---- the two systems ------------------------------------------------------------------------


def eager_step(model, opt):
    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        optimizer_step(opt)
        opt.zero_grad()
        return loss.detach()

    return step


def autopar_step(pm, opt):
    def step(batch):
        loss = pm.train_step(batch)
        optimizer_step(opt)
        opt.zero_grad()
        return loss

    return step


def plan_model(ctx, name: str, data: list[dict]) -> tuple[autopar.Plan, float | None]:
    """The plan and its planning time; with --plans-dir, a plan saved there for this cluster
    is read instead (planning time None) and a new one is saved there."""
    cluster = autopar.Cluster.detect()
    path = os.path.join(ctx.args.plans_dir, f"{name}.plan.json") if ctx.args.plans_dir else None
    if path and os.path.exists(path):
        plan = autopar.Plan.load(path)
        if plan.cluster == cluster.to_dict():
            print(f"{name}: plan read from {path}", flush=True)
            return plan, None
        print(f"{name}: the plan in {path} is for another cluster; planning", flush=True)
    model = build(name, ctx.args.tiny, ctx.device, ctx.dtype)
    precision = (TrainingPrecision.mixed_bf16() if ctx.dtype == torch.bfloat16
                 else TrainingPrecision.fp32())
    t0 = time.perf_counter()
    plan = autopar.plan(model, cluster, data[0], precision=precision,
                        time_limit=ctx.args.plan_time_limit)
    plan_s = time.perf_counter() - t0
    if path:
        os.makedirs(ctx.args.plans_dir, exist_ok=True)
        plan.save(path)
    return plan, plan_s


def attention_backends() -> list[dict]:
    """The attention kernels the replay runtime chose (autopar.runtime.attention), one entry
    per layout: the backend for real tensors of that layout, and on a GPU torch's reasons
    when neither cuDNN nor flash was chosen."""
    out = []
    for key, chosen in attention.seen.items():
        shapes, strides, dtype, device, dropout, causal, mask = key
        row = dict(shapes=shapes, strides=strides, dtype=dtype, device=device,
                   dropout_p=dropout, is_causal=causal, mask=mask,
                   chosen=attention.NAMES.get(chosen, chosen))
        if device.startswith("cuda") and chosen not in (attention.CUDNN, attention.FLASH):
            try:
                row["refusals"] = fused_refusals(shapes, strides, dtype, dropout, causal, mask)
            except Exception as e:  # a diagnostic: say what failed, keep the row
                row["refusals"] = error_text(e)
        out.append(row)
    return out


def fused_refusals(shapes, strides, dtype, dropout, causal, mask) -> dict:
    """torch's own words (debug=True) on why each fused kernel refuses real tensors laid out
    as these."""
    import warnings

    dt = getattr(torch, dtype.replace("torch.", ""))
    t = [torch.empty_strided(sh, st, dtype=dt, device="cuda") for sh, st in zip(shapes, strides)]
    params = torch.backends.cuda.SDPAParams(t[0], t[1], t[2], t[3] if mask else None,
                                            dropout, causal, shapes[0][1] != shapes[1][1])
    out = {}
    for kernel in ("cudnn", "flash", "efficient"):
        check = getattr(torch.backends.cuda, f"can_use_{kernel}_attention", None)
        if check is None:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = check(params, True)
        out[kernel] = "ok" if ok else " | ".join(str(w.message)[:300] for w in caught)
    return out


def predicted_breakdown(ctx, name: str, plan: autopar.Plan, batch: dict) -> dict:
    """What the cost model charges a step of `plan`, by category: the model's graph for one
    microbatch, traced on meta and priced on the plan's device."""
    why = breakdown.predictable(plan)
    if why:
        return {"error": why}
    _, micro = breakdown.microbatches(plan)
    size = micro or next(iter(batch.values())).shape[0]
    example = {k: v[:size].to("meta") for k, v in batch.items()}
    model = build(name, ctx.args.tiny, "meta", ctx.dtype)
    traced = trace(model, example)
    gm = traced.graph_module
    profiles = profile_graph(gm, no_grad=set(traced.buffers) | set(traced.inputs))
    device = autopar.Cluster.from_dict(plan.cluster).device
    return breakdown.predicted(gm, profiles, plan, device)


def run_system(ctx, name: str, system: str, data: list[dict], plan) -> dict:
    """Build, warm up and time one system; its row."""
    args = ctx.args
    row = {"model": name, "system": system}
    ctx.free_memory()
    try:
        model = build(name, args.tiny, ctx.device, ctx.dtype)
        if system == "eager":
            opt = MasterAdamW(model.parameters(), fused=fused_on(ctx.device))
            step, keep = eager_step(model, opt), [model, opt]
        else:
            attention.seen.clear()
            pm = autopar.autoparallelize(model, autopar.Cluster.from_dict(plan.cluster),
                                         data[0], plan=plan)
            del model
            opt = MasterAdamW(pm.parameters(), fused=fused_on(ctx.device))
            step, keep = autopar_step(pm, opt), [pm, opt]
        ctx.free_memory()  # peak memory counts from the built model on
        timed = time_steps(ctx, step, [(b,) for b in data], args.warmup, args.steps)
        row.update(
            measured_step_s=statistics.median(timed["times"]),
            step_times_s=[round(t, 6) for t in timed["times"]],
            host_issue_s=statistics.median(timed["host"]),
            first_loss=timed["first_loss"],
            last_loss=timed["last_loss"],
        )
        if system == "autopar":
            row["attention_backends"] = attention_backends()
        if ctx.device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        if args.profile:
            row["profile"], text = profile_steps(ctx, step, [(b,) for b in data],
                                                 args.profile_steps, f"{name} {system}")
            ctx.profiles.append(text)
        del keep, step
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        row["error"] = error_text(e)
    gc.collect()
    return row


def run_model(ctx, name: str, state: dict) -> None:
    data = batches(name, ctx.args.tiny, ctx.args.rotate, ctx.device, ctx.dtype)
    model = build(name, ctx.args.tiny, "meta", ctx.dtype)
    params = sum(p.numel() for p in model.parameters())
    del model
    try:
        plan, plan_s = plan_model(ctx, name, data)
    except Exception as e:
        if ctx.args.verbose:
            traceback.print_exc()
        state["runs"].append({"model": name, "system": "autopar",
                              "error": "planning: " + error_text(e)})
        plan = None
    if plan is not None:
        took = f"planned in {plan_s:.1f} s" if plan_s is not None else "plan read"
        print(f"{name}: {took}\n" + plan.summary().split("\n  parameter")[0], flush=True)
    for system in ctx.args.systems:
        if system == "autopar" and plan is None:
            continue
        row = run_system(ctx, name, system, data, plan)
        row.update(parameters=params, tokens_per_step=tokens(data[0]),
                   batch=next(iter(data[0].values())).shape[0])
        if system == "autopar" and plan is not None:
            row.update(
                planning_s=plan_s,
                plan={"mesh": dict(plan.mesh), "data_parallel": plan.data_parallel,
                      "pipeline": plan.pipeline, "checkpoint": plan.checkpoint},
                predicted_step_s=plan.predicted["step_time_s"],
                predicted_peak_memory_bytes=plan.predicted["peak_memory_bytes"],
                summary=plan.summary(),
            )
            if "profile" in row and "device" in row["profile"]:
                row["predicted_breakdown"] = predicted_breakdown(ctx, name, plan, data[0])
                ctx.profiles.append(breakdown.compare(dict(row, gpus=1)) + "\n")
        state["runs"].append(row)
        print(one_line(row), flush=True)
        write(ctx, state)


def one_line(r: dict) -> str:
    if r.get("error"):
        return f"  {r['model']} {r['system']}: {r['error']}"
    pred = r.get("predicted_step_s")
    peak, ppeak = r.get("peak_memory_bytes"), r.get("predicted_peak_memory_bytes")
    return (f"  {r['model']} {r['system']}: {r['measured_step_s']:.4f} s/step"
            + (f" (predicted {pred:.4f}, {pred / r['measured_step_s']:.3f})" if pred else "")
            + (f", peak {peak / 2**30:.2f} GiB" if peak else "")
            + (f" (predicted {ppeak / 2**30:.2f}, {ppeak / peak:.3f})" if peak and ppeak else "")
            + f", loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")


def table(runs: list[dict]) -> str:
    """autopar beside eager per model: step times, their ratio (eager / autopar: above 1 is
    autopar faster), and the predictions over the measurements."""
    lines = [f"{'model':12} {'eager s':>8} {'autopar s':>9} {'speed':>6} {'pred/meas':>9} "
             f"{'peak GiB':>8} {'pred/meas':>9}"]
    for name in dict.fromkeys(r["model"] for r in runs):
        rows = {r["system"]: r for r in runs if r["model"] == name}
        e, a = rows.get("eager", {}), rows.get("autopar", {})
        es, as_ = e.get("measured_step_s"), a.get("measured_step_s")
        peak, pred = a.get("peak_memory_bytes"), a.get("predicted_peak_memory_bytes")

        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"

        lines.append(
            f"{name:12} {f(es, '8.4f')} {f(as_, '9.4f')} "
            f"{f(es / as_ if es and as_ else None, '6.3f')} "
            f"{f(a['predicted_step_s'] / as_ if as_ and a.get('predicted_step_s') else None, '9.3f')} "
            f"{f(peak / 2**30 if peak else None, '8.2f')} "
            f"{f(pred / peak if peak and pred else None, '9.3f')}"
        )
    return "\n".join(lines)


def write(ctx, state: dict) -> None:
    if ctx.args.json:
        with open(ctx.args.json, "w") as f:
            json.dump(state, f, indent=1, default=str)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/hf_one_gpu.py",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configurations (CPU checks)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--max-timing-s", type=float, default=None,
                    help="cut the timed steps so they take about this long")
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--rotate", type=int, default=4, help="distinct batches cycled through")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over --profile-steps more steps of each system")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--profile-out", default=None, help="text file for profiler tables")
    ap.add_argument("--plan-time-limit", type=float, default=None,
                    help="autopar.plan's time_limit (s) per stage-cut solve")
    ap.add_argument("--plans-dir", default=None,
                    help="read each model's plan from DIR/<model>.plan.json if it was made for "
                         "this cluster (no planning time then), else plan and save it there")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    # what benchmarks.lib's job and timing read
    args.dtype = "bf16" if args.device == "cuda" else "fp32"
    args.collective_timeout_s, args.threads, args.fp32_loss = 600, 1, False
    return args


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    ctx = init_distributed(args)
    ctx.profiles = []
    try:
        import transformers

        state = {"date": time.strftime("%Y-%m-%d"), "options": vars(args), "runs": [],
                 "environment": {"torch": torch.__version__,
                                 "transformers": transformers.__version__,
                                 "device": (torch.cuda.get_device_name()
                                            if ctx.device.type == "cuda" else "cpu")},
                 "device_measurements": measure_device(ctx)}
        ctx.free_memory()
        print(f"# hf_one_gpu.py {state['date']}: {state['environment']}, "
              f"{state['device_measurements']}", flush=True)
        for name in args.models:
            run_model(ctx, name, state)
            write(ctx, state)  # after each model too: a run cut short keeps what it measured
            if args.profile_out and ctx.profiles:  # after each model: a run cut short keeps them
                with open(args.profile_out, "w") as f:
                    f.write("\n".join(ctx.profiles))
        write(ctx, state)
        print()
        print(table(state["runs"]))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
