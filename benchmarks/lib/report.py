"""What a benchmark run shows and keeps: a line per measured system as it finishes, the JSON
file (rewritten after every row, so a stopped run keeps what it measured), and the final table
of every system beside the best baseline."""

from __future__ import annotations

import json
import os

from benchmarks.lib.distributed import Ctx


def log(ctx: Ctx, msg: str) -> None:
    if ctx.rank == 0:
        print(msg, flush=True)


def one_line(r: dict) -> str:
    if r.get("error"):
        return f"  {r['model']} x{r['gpus']} {r['system']}: {r['error']}"
    pred = f"{r['predicted_step_s']:.4f}" if r["predicted_step_s"] else "-"
    mem = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] else "-"
    return (
        f"  {r['model']} x{r['gpus']} {r['system']}: {r['measured_step_s']:.4f} s/step "
        f"(predicted {pred}), {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu'] * 100:.1f}%, "
        f"peak {mem}, host issue {r['host_issue_s']:.4f} s, loss {r['first_loss']:.4f} -> "
        f"{r['last_loss']:.4f}"
    )


def write_json(ctx: Ctx, state) -> None:
    if ctx.rank != 0 or not ctx.args.json:
        return
    doc = {
        k: state[k]
        for k in (
            "date",
            "meta",
            "environment",
            "device_measurements",
            "options",
            "notes",
            "earlier",
        )
    }
    doc["runs"] = state["previous_runs"] + state["runs"]
    tmp = ctx.args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, ctx.args.json)


def _best_baselines(runs: list[dict]) -> dict:
    """(model, gpus) -> the fastest baseline row that ran."""
    best: dict = {}
    for r in runs:
        if r.get("error") or r["system"] == "autopar":
            continue
        key = (r["model"], r["gpus"])
        if key not in best or r["measured_step_s"] < best[key]["measured_step_s"]:
            best[key] = r
    return best


def _cells(r: dict, best: dict) -> tuple[str, ...]:
    if r.get("error"):
        return (
            r["model"],
            str(r["gpus"]),
            r["system"],
            "-",
            "-",
            "-",
            f"{r['predicted_step_s']:.4f}" if r.get("predicted_step_s") else "-",
            "-",
            "-",
            r["error"][:60],
        )
    note = ""
    b = best.get((r["model"], r["gpus"]))
    if r["system"] == "autopar" and b:
        note = f"{b['measured_step_s'] / r['measured_step_s']:.2f}x best ({b['system']})"
    elif b is r:
        note = "best baseline"
    return (
        r["model"],
        str(r["gpus"]),
        r["system"],
        f"{r['tokens_per_s']:.0f}",
        f"{r['mfu'] * 100:.1f}%",
        f"{r['peak_memory_bytes'] / 2**30:.1f}" if r["peak_memory_bytes"] else "-",
        f"{r['predicted_step_s']:.4f}" if r["predicted_step_s"] else "-",
        f"{r['measured_step_s']:.4f}",
        f"{r['predicted_step_s'] / r['measured_step_s']:.2f}" if r["predicted_step_s"] else "-",
        note,
    )


def table(runs: list[dict]) -> str:
    head = (
        "model",
        "gpus",
        "system",
        "tokens/s",
        "MFU",
        "peak GiB",
        "pred s",
        "meas s",
        "pred/meas",
        "note",
    )
    best = _best_baselines(runs)
    lines = [_cells(r, best) for r in runs]
    widths = [
        max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)
    ]

    def fmt(cells):
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths))

    return "\n".join([fmt(head), "-|-".join("-" * w for w in widths)] + [fmt(c) for c in lines])
