"""Plan every model of the zoo (`autopar models`, less the `-test` sizes) for 1 GPU, one 8-GPU
node, 8 nodes and 128 nodes of H100-80GB, offline on meta tensors, and time each plan; plan a
GPT of the same depth and width beside each other family's model, for the "as fast as a GPT"
comparison. The figures of docs/benchmarks/2026-12-05-zoo-plans/ and docs/models.md.

    python benchmarks/plan_zoo.py -o plans.jsonl                 # every case (hours on 2 cores)
    python benchmarks/plan_zoo.py -o plans.jsonl --models t5-11b swin-l --gpus 8 64
    python benchmarks/plan_zoo.py --report plans.jsonl           # the markdown tables

Each case runs in its own process (a fresh interpreter: no cache carries over from another
plan) under a wall-clock limit, `--timeout` (default 900 s); a case over it is recorded as
such (with the last (mesh, microbatch) its search began and its best plan so far). Cases
already in the output file are skipped, so an interrupted run resumes (`--redo` plans them
again; the report reads a case's last row).

What a case plans is what `autopar plan NAME --cluster h100-80g --nodes N --precision
bf16-mixed` plans (the model cast to bf16, bf16 mixed precision: the way these models are
trained; the command line's default is fp32): the global batch is lcm(8, GPUs) (one sequence or image a GPU
at 64 GPUs and up), the search is the default one (every pp x dp x tp, microbatch size,
schedule, ZeRO flavour and checkpointing), each stage-cut solve limited to `--time-limit` s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

GPU_COUNTS = (1, 8, 64, 1024)
NODE = 8  # GPUs a node


def _zoo() -> list[str]:
    from autopar.models.registry import BUILTIN_MODELS

    return [n for n in BUILTIN_MODELS if not n.endswith("-test") and not n.startswith("gpt-")]


def depth_and_width(name: str) -> tuple[int, int]:
    """Blocks (every stack's, summed) and model width of a zoo model."""
    from autopar.models.registry import entry

    cfg = entry(name).config
    fields = dataclasses.asdict(cfg)
    if "depths" in fields:  # Swin: blocks of every stage; its widest stage's width
        return sum(cfg.depths), cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
    stacks = 2 if entry(name).family.name in ("T5", "Switch") else 1  # encoder and decoder
    return stacks * cfg.n_layer, cfg.d_model


def reference_gpt(name: str) -> str:
    """The GPT of `name`'s depth: the GPT-3 of that depth nearest in width, else a GPT of that
    depth and width, as a case name (`gpt@<layers>x<width>`)."""
    from autopar.models.registry import BUILTIN_MODELS

    layers, width = depth_and_width(name)
    same = [n for n in BUILTIN_MODELS if n.startswith("gpt3-") and depth_and_width(n)[0] == layers]
    if same:
        return min(same, key=lambda n: abs(depth_and_width(n)[1] - width))
    return f"gpt@{layers}x{width}"


def _build(case: str, batch: int):
    import torch

    from autopar.batches import floating_to
    from autopar.models.gpt import GPT, GPTConfig
    from autopar.models.inputs import next_token_batch
    from autopar.models.losses import lm_loss
    from autopar.models.registry import build_model

    with torch.device("meta"):
        if case.startswith("gpt@"):
            layers, width = map(int, case[4:].split("x"))
            cfg = GPTConfig(vocab_size=50304, seq_len=2048, n_layer=layers,
                            n_head=max(1, width // 128), d_model=width)
            model, example, loss = GPT(cfg), next_token_batch(cfg, batch), lm_loss
        else:
            model, example, loss = build_model(case, batch=batch, seq=None)
        # bf16 weights take bf16 images (token ids and labels stay integers)
        return model.to(torch.bfloat16), floating_to(example, torch.bfloat16), loss


def plan_one(case: str, gpus: int, time_limit: float) -> dict:
    """Plan `case` for `gpus` H100s; the row of the report."""
    import torch

    import autopar
    from autopar.errors import AutoparError
    from autopar.planning.profile import TrainingPrecision

    nodes = max(1, gpus // NODE)
    cluster = autopar.Cluster.preset("h100-80g", nodes=nodes, devices_per_node=min(gpus, NODE))
    batch = math.lcm(8, gpus)
    model, example, loss_fn = _build(case, batch)
    row = {"model": case, "gpus": gpus, "batch": batch,
           "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    said: list[str] = []

    def log(line: str) -> None:  # kept for the row, and on stderr as it comes: a case stopped
        said.append(line)        # by the timeout still says how far its search got
        print(line, file=sys.stderr, flush=True)

    try:
        plan = autopar.plan(model, cluster, example, loss_fn=loss_fn, log=log,
                            precision=TrainingPrecision.mixed_bf16(), time_limit=time_limit)
    except AutoparError as e:  # no plan fits: a finding, recorded
        row.update(status="no plan", plan_s=round(time.perf_counter() - t0, 1),
                   why=str(e).split("\n")[0])
        return row
    row["plan_s"] = round(time.perf_counter() - t0, 1)
    pipe = plan.pipeline or {}
    p = plan.predicted
    row.update(
        status="planned",
        mesh=dict(plan.mesh),
        data_parallel=plan.data_parallel,
        microbatch_size=pipe.get("microbatch_size", batch),  # over all dp ranks
        microbatches=pipe.get("num_microbatches", 1),
        schedule=pipe.get("schedule"),
        checkpointed=len(plan.checkpoint),
        step_time_s=p.get("step_time_s"),
        peak_memory_gib=round(p.get("peak_memory_bytes", 0) / 2**30, 1),
        candidates=plan.solver.get("candidates"),
        # scored candidates with pp > 1, and (mesh, microbatch)s a bound ruled out before
        # solving (the search's last line says how many)
        pipelined_candidates=next((int(m.group(1)) for m in map(
            re.compile(r"\((\d+) with pipeline stages[;)]").search, said) if m), None),
        pruned=next((int(m.group(1)) for m in map(
            re.compile(r"(\d+) meshes x microbatches ruled out").search, said) if m), None),
        stage_cut=plan.solver.get("stage_cut"),
        torch=torch.__version__,
    )
    return row


def _commit() -> str | None:
    """The short hash of the checkout this script runs in (its planner is what a row records),
    "-dirty" added where autopar/ or solvers/ has uncommitted changes; None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "../autopar", "../solvers")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_all(out: str, names: list[str], gpus: list[int], timeout: float, time_limit: float,
            redo: bool = False):
    commit = _commit()
    done = set()
    if os.path.exists(out) and not redo:
        with open(out) as f:
            done = {(r["model"], r["gpus"]) for r in map(json.loads, f)}
    cases = []
    for name in names:
        cases.append(name)
        if not name.startswith("gpt3-"):
            cases.append(reference_gpt(name))  # planned right after, on the same machine state
    for n in gpus:
        for case in dict.fromkeys(cases):  # a reference shared by models of one shape once
            if (case, n) in done:
                continue
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--one", case, str(n), "--time-limit", str(time_limit)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                if res.returncode == 0:
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                else:
                    row = {"model": case, "gpus": n, "status": "error",
                           "why": res.stderr.strip().splitlines()[-1][:300]}
            except subprocess.TimeoutExpired as e:
                row = {"model": case, "gpus": n, "status": "timeout", "plan_s": timeout,
                       **_progress(e.stderr)}
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
            row["commit"] = commit
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{case:>18} {n:>5} GPUs  {row['status']:>8}  {row.get('plan_s', '-')} s  "
                  f"{row.get('mesh', row.get('why', ''))}", flush=True)


def _progress(stderr) -> dict:
    """How far a stopped search got, from its log on stderr: the last (mesh, microbatch) it
    began (`[i/n] ...`) and the last best plan it had found."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    lines = text.splitlines()
    began = [ln for ln in lines if re.match(r"\[\d+/\d+\] ", ln)]
    best = [ln for ln in lines if ln.startswith("best so far: ")]
    return {"progress": began[-1] if began else None,
            "best_so_far": best[-1][len("best so far: "):] if best else None}


# -- report ---------------------------------------------------------------------------------------


def _mesh(row: dict) -> str:
    if row["status"] == "no plan":
        peak = re.search(r"smallest peak found is ([0-9.e+]+ \w+)", row["why"])
        if peak:
            return f"does not fit (least peak {peak.group(1)})"
        state = re.search(r"([0-9.e+]+ \w+) per device even sharded", row["why"])  # no search
        return f"does not fit (its state alone {state.group(1)} a GPU)" if state else row["why"]
    if row["status"] == "timeout" and row.get("progress"):
        reached = row["progress"].split("]")[0].lstrip("[")
        best = row.get("best_so_far")
        return (f"timeout at (mesh, microbatch) {reached}; best so far {best}" if best
                else f"timeout at (mesh, microbatch) {reached}, none fits yet")
    if row["status"] != "planned":
        return f"{row['status']} ({row.get('why', '')})" if row.get("why") else row["status"]
    m = {k: v for k, v in row["mesh"].items() if v > 1}
    s = " x ".join(f"{k}{v}" for k, v in m.items()) or "one device"
    if row["mesh"].get("pp", 1) > 1:
        s += f", {row['microbatches']} mb of {row['microbatch_size']} ({row['schedule']})"
    elif row.get("microbatches") and row["microbatches"] > 1:
        s += f", {row['microbatches']} mb"
    if row["data_parallel"] != "replicate" and row["mesh"].get("dp", 1) > 1:
        s += f", {row['data_parallel']}"
    if row["checkpointed"]:
        s += f", ckpt {row['checkpointed']}"
    return s


def _params(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def report(path: str) -> str:
    """Two markdown tables: what the planner chose for each model and cluster, and how long it
    took beside a GPT of the same depth."""
    with open(path) as f:
        rows = {(r["model"], r["gpus"]): r for r in map(json.loads, f)}
    names = [n for n in _zoo() if any((n, g) in rows for g in GPU_COUNTS)]
    sizes = [g for g in GPU_COUNTS if any((n, g) in rows for n in names)]
    heads = " | ".join(f"{g} GPU{'s' * (g > 1)}" for g in sizes)
    chose = [f"| model | parameters | {heads} |", "|---" * (2 + len(sizes)) + "|"]
    timed = [f"| model | blocks | GPT of that depth | {heads} |", "|---" * (3 + len(sizes)) + "|"]
    for name in names:
        first = next(rows[(name, g)] for g in sizes if (name, g) in rows)
        cells, times = [], []
        for g in sizes:
            r = rows.get((name, g))
            if r is None:
                cells.append("")
                times.append("")
                continue
            cell = _mesh(r)
            if r.get("step_time_s"):
                cell += f"; {r['step_time_s']:.3g} s, {r['peak_memory_gib']} GiB"
            cells.append(cell)
            over = ">" if r["status"] == "timeout" else ""  # stopped: a lower bound
            t = f"{over}{r['plan_s']} s" if r.get("plan_s") is not None else r["status"]
            ref = rows.get((reference_gpt(name), g))
            if ref is not None and ref is not r and ref.get("plan_s"):
                t += f" ({ref['plan_s']} s, {over}{r['plan_s'] / ref['plan_s']:.1f}x)"
            if r.get("pipelined_candidates") is not None and g > 1:
                t += f"; {r['candidates']} scored, {r['pipelined_candidates']} with pp"
                if r.get("pruned") is not None:
                    t += f", {r['pruned']} ruled out"
            times.append(t)
        params = _params(first["params"]) if "params" in first else ""
        chose.append(f"| {name} | {params} | " + " | ".join(cells) + " |")
        depth = depth_and_width(name)[0]
        timed.append(f"| {name} | {depth} | {reference_gpt(name)} | " + " | ".join(times) + " |")
    return "\n".join(chose) + "\n\n" + "\n".join(timed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default="plans.jsonl", help="rows are appended here")
    ap.add_argument("--models", nargs="*", default=None, help="zoo names (default: all)")
    ap.add_argument("--gpus", nargs="*", type=int, default=list(GPU_COUNTS))
    ap.add_argument("--timeout", type=float, default=900, help="wall-clock seconds a case")
    ap.add_argument("--time-limit", type=float, default=30, help="seconds a stage-cut solve")
    ap.add_argument("--redo", action="store_true",
                    help="plan the cases again even where the output has them (appended; the "
                         "report reads a case's last row)")
    ap.add_argument("--one", nargs=2, metavar=("CASE", "GPUS"), help=argparse.SUPPRESS)
    ap.add_argument("--report", metavar="JSONL", help="print the tables of a finished run")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
    elif args.one:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(plan_one(args.one[0], int(args.one[1]), args.time_limit)))
    else:
        run_all(args.output, args.models or _zoo(), args.gpus, args.timeout, args.time_limit,
                args.redo)


if __name__ == "__main__":
    main()
