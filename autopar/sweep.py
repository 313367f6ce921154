"""`autopar.sweep`: plan models x clusters x options, one row of plain data per case.

    rows = autopar.sweep(["gpt3-1.3b", "llama2-7b"], [("h100-80g", 1), ("h100-80g", 8)],
                         [{}, {"memory_limit": 40e9}, {"manual": {"zero": 3}, "label": "FSDP"}])
    autopar.sweep.to_csv(rows, "table.csv")          # csv module, no pandas
    df = autopar.sweep.to_dataframe(rows)             # pandas (pip install 'autopar[research]')
    autopar.sweep.plot(rows, x="gpus", y="step_time_s", path="fig.png")   # matplotlib

A row is a dict with the keys of `COLUMNS`, in that order (see `COLUMNS` for what each holds).
A case that cannot be planned (an `AutoparError`: no plan fits, a mesh that does not divide) is a
row with status "no plan" and the error's first line as its reason; any other exception is a row
with status "error"; neither stops the sweep. `docs/research.md` has two complete studies.

This module plans offline (`autopar.plan`, `autopar.manual_plan`, `autopar.simulate`); it never
imports the runtime. `sweep` is the function; `to_csv`, `read_csv`, `to_dataframe`, `plot` and
`to_text` are attributes of it too, so `autopar.sweep.to_csv` works after `import autopar`.
"""

from __future__ import annotations

import csv
import inspect
import math
import multiprocessing
import pickle
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for

import torch

from autopar.api import manual_plan, plan
from autopar.batches import batch_size, floating_to
from autopar.cluster import Cluster
from autopar.console import mesh_text
from autopar.errors import AutoparError
from autopar.models.registry import build_model, entry, is_factory
from autopar.planning.profile import TrainingPrecision
from autopar.simulate import simulate
from autopar.units import format_bytes

# The columns of a row, in order, with the type `read_csv` gives them back as.
COLUMNS: dict[str, type] = {
    "model": str,               # a zoo name, or the name given with a factory
    "params": int,              # parameters (a tied weight once)
    "cluster": str,             # the cluster's name (the preset's)
    "nodes": int,
    "gpus": int,                # devices in all
    "batch": int,               # global batch (samples per step)
    "label": str,               # the options' "label", else the options as text
    "options": str,             # what was asked, as text ("autopar" for the default search)
    "status": str,              # "planned", "no plan", "error" or "timeout"
    "reason": str,              # why not planned: the error's first line
    "mesh": str,                # "pp=2,dp=4,tp=8" (axes of size 1 left out)
    "microbatch_size": int,     # samples per microbatch over all data-parallel ranks
    "microbatches": int,        # microbatches per step (1: none)
    "schedule": str,            # pipeline schedule, when there is a pipeline
    "data_parallel": str,       # "replicate", "zero2", "zero3" or "hsdp"
    "checkpointed_layers": int,  # layers recomputed in backward
    "step_time_s": float,       # predicted seconds per step
    "samples_per_s": float,
    "tokens_per_s": float,      # 0 for a model without a sequence dim
    "tflops_per_gpu": float,
    "mfu": float,               # model FLOPs utilisation, 0..1
    "peak_memory_gib": float,   # the worst device's predicted peak
    "plan_s": float,            # seconds autopar.plan (or manual_plan) took
}

# autopar.plan's keywords a sweep's options may give; manual_plan's for "manual"
_NOT_OPTIONS = ("model", "cluster", "example_inputs", "loss_fn", "log")
PLAN_OPTIONS = tuple(p for p in inspect.signature(plan).parameters if p not in _NOT_OPTIONS)
MANUAL_KEYS = tuple(p for p in inspect.signature(manual_plan).parameters
                    if p not in (*_NOT_OPTIONS, "precision", "solver"))
# what options with "manual" may hold beside it (memory_limit: checked against the plan's peak)
MANUAL_OPTIONS = ("label", "manual", "memory_limit", "precision", "solver")


class MissingDependencyError(AutoparError, ImportError):
    """An optional package (pandas, matplotlib) is not installed."""


@dataclass(frozen=True)
class Case:
    """One plan to make: plain, picklable data (sent to a worker process as it is)."""

    model: str
    factory: Callable | None  # None: `model` is a name `build_model` knows
    cluster: Cluster
    options: dict
    batch: int | None
    seq: int | None
    dtype: torch.dtype | None


# -- the sweep ------------------------------------------------------------------------------------


def sweep(models, clusters, options: Sequence[dict] = ({},), *, batch=None, seq: int | None = None,
          dtype: torch.dtype | None = None, processes: int = 1, timeout: float | None = None,
          log: Callable[[str], None] | None = None) -> list[dict]:
    """Plan every model on every cluster with every options dict; one row per case, in that
    order (models outermost, options innermost).

    models: zoo names (`autopar models`; also `hf:...` and `module.path:factory`, as the command
        line takes them), or `(name, factory)` pairs; a factory returns `(model, example_inputs,
        loss_fn)` (or `(model, example_inputs)`), is called under `torch.device("meta")`, and
        gets `batch=` and `seq=` if it takes them.
    clusters: `Cluster` objects, preset names (one node), or `(preset, nodes)` pairs.
    options: dicts of `autopar.plan` keywords (`memory_limit`, `mesh`, `schedule`,
        `data_parallel`, `precision`, ...), plus "label" (the row's name for them) and
        "manual": a hand configuration, keywords of `autopar.manual_plan` (tp, pp, dp,
        microbatch_size, checkpoint, schedule, zero, dp_shard); tp and pp default to 1, dp to
        the remaining devices, microbatch_size to batch / dp without pp, else 1. With "manual",
        `memory_limit` (default: the device's memory) is checked against the plan's peak: over
        it, the row is "no plan" with its figures kept.
    batch: the global batch, an int or a function of the GPU count (default lcm(8, GPUs), as
        `autopar plan`; a `module.path:factory` string decides its own). seq: sequence length.
    dtype: cast each model and its floating inputs (e.g. torch.bfloat16); compute is priced in
        the model's dtype, memory by the `precision` option.
    processes: cases planned at once, each in a fresh process (spawned: factories must be
        module-level functions, and a script must guard its code with
        `if __name__ == "__main__":`). timeout: seconds a case may take (it then runs in a
        process of its own, killed at the limit: a "timeout" row).
    log: called with one line per finished case (e.g. `print`).
    """
    cases = make_cases(models, clusters, options, batch=batch, seq=seq, dtype=dtype)
    if processes < 1:
        raise AutoparError(f"processes={processes}: give 1 or more")
    if processes == 1 and timeout is None:
        rows = []
        for i, case in enumerate(cases):
            rows.append(plan_case(case))
            _report(log, i, len(cases), rows[-1])
        return rows
    for case in cases:
        _check_picklable(case)
    return _run_in_processes(cases, processes, timeout, log)


def make_cases(models, clusters, options: Sequence[dict], *, batch=None, seq=None,
               dtype=None) -> list[Case]:
    """Every (model, cluster, options) case, checked: an unknown model name, preset or option
    is an AutoparError now, before any planning."""
    if isinstance(models, str) or isinstance(clusters, (str, Cluster)) or isinstance(options, dict):
        raise AutoparError("sweep takes lists: models=[...], clusters=[...], options=[{...}]")
    model_specs = [_model_spec(m) for m in models]
    cluster_objs = [_cluster(c) for c in clusters]
    for opts in options:
        _check_options(opts)
    return [Case(name, factory, c, dict(opts), _batch_for(batch, c.world_size), seq, dtype)
            for name, factory in model_specs for c in cluster_objs for opts in options]


def _model_spec(m) -> tuple[str, Callable | None]:
    if isinstance(m, str):
        if ":" not in m:
            entry(m)  # an unknown name fails here, listing where to look
        return m, None
    if isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], str) and callable(m[1]):
        return m
    raise AutoparError(f"model {m!r}: give a zoo name or a (name, factory) pair")


def _cluster(c) -> Cluster:
    if isinstance(c, Cluster):
        return c
    if isinstance(c, str):
        return Cluster.preset(c)
    if isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], str):
        return Cluster.preset(c[0], nodes=c[1])
    raise AutoparError(f"cluster {c!r}: give a Cluster, a preset name or (preset, nodes)")


def _check_options(opts: dict) -> None:
    if not isinstance(opts, dict):
        raise AutoparError(f"options {opts!r}: each must be a dict of autopar.plan keywords")
    allowed = MANUAL_OPTIONS if "manual" in opts else (*PLAN_OPTIONS, "label")
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise AutoparError(f"unknown option(s) {unknown} in {opts!r}; allowed here: "
                           f"{', '.join(allowed)}")
    manual = opts.get("manual")
    if manual is not None:
        if not isinstance(manual, dict) or set(manual) - set(MANUAL_KEYS):
            raise AutoparError(f"manual={manual!r}: a dict of {', '.join(MANUAL_KEYS)}")


def _batch_for(batch, gpus: int) -> int | None:
    return batch(gpus) if callable(batch) else batch


def _check_picklable(case: Case) -> None:
    try:
        pickle.dumps(case)
    except Exception as e:
        raise AutoparError(
            f"model {case.model!r}: its factory cannot be sent to another process ({e}); with "
            "processes= or timeout=, define the factory at module level (no lambda)") from None


# -- one case -------------------------------------------------------------------------------------


def plan_case(case: Case) -> dict:
    """Plan one case; its row. Never raises for the case's own failure (see the module doc)."""
    row = _blank_row(case)
    t0 = None
    try:
        model, example_inputs, loss_fn = _build(case)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["batch"] = batch_size(example_inputs[0] if loss_fn is not None else example_inputs)
        t0 = time.perf_counter()
        made = _make_plan(case, model, example_inputs, loss_fn, row["batch"])
        row["plan_s"] = time.perf_counter() - t0
        row.update(plan_figures(made, row["batch"]), status="planned")
        if "manual" in case.options:
            row.update(_memory_verdict(made, case))
    except AutoparError as e:
        row.update(status="no plan", reason=_first_line(e))
    except Exception as e:  # a bug or a broken model: recorded, the sweep goes on
        row.update(status="error", reason=f"{type(e).__name__}: {_first_line(e)}")
    if row["plan_s"] is None and t0 is not None:
        row["plan_s"] = time.perf_counter() - t0
    return row


def _blank_row(case: Case) -> dict:
    """A row that says which case it is, every other column None."""
    c, text = case.cluster, options_text(case.options)
    return {**dict.fromkeys(COLUMNS), "model": case.model, "cluster": c.name, "nodes": c.nodes,
            "gpus": c.world_size, "label": case.options.get("label") or text, "options": text}


def _build(case: Case):
    gpus = case.cluster.world_size
    with torch.device("meta"):
        if case.factory is None:
            b = case.batch
            if b is None and not is_factory(case.model):
                b = math.lcm(8, gpus)  # splits evenly over any dp axis, as `autopar plan`
            built = build_model(case.model, batch=b, seq=case.seq)
        else:
            wanted = {"batch": case.batch or math.lcm(8, gpus), "seq": case.seq}
            built = case.factory(**_accepted(case.factory, wanted))
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        raise AutoparError(f"model {case.model!r}: its factory must return "
                           "(model, example_inputs, loss_fn) or (model, example_inputs)")
    model, example_inputs, loss_fn = built if len(built) == 3 else (*built, None)
    if case.dtype is not None:
        model, example_inputs = model.to(case.dtype), floating_to(example_inputs, case.dtype)
    return model, example_inputs, loss_fn


def _accepted(fn: Callable, kwargs: dict) -> dict:
    """Those of `kwargs` (not None) that `fn` takes."""
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in kwargs.items() if v is not None and (takes_all or k in params)}


def _make_plan(case: Case, model, example_inputs, loss_fn, batch: int):
    opts = {k: v for k, v in case.options.items() if k != "label"}
    if "manual" not in opts:
        return plan(model, case.cluster, example_inputs, loss_fn=loss_fn, **opts)
    hand = resolve_manual(opts["manual"], case.cluster.world_size, batch)
    extra = {k: opts[k] for k in ("precision", "solver") if k in opts}
    return manual_plan(model, case.cluster, example_inputs, loss_fn=loss_fn, **hand, **extra)


def resolve_manual(manual: dict, gpus: int, batch: int) -> dict:
    """A hand configuration with its defaults filled in: tp = pp = ep = cp = 1, dp the
    remaining GPUs, microbatch_size batch / (dp x ep) without pp, else 1."""
    hand = dict(manual)
    hand.setdefault("tp", 1)
    hand.setdefault("pp", 1)
    ep = hand.get("ep", 1)
    hand.setdefault("dp", max(1, gpus // (hand["tp"] * hand["pp"] * ep * hand.get("cp", 1))))
    hand.setdefault("microbatch_size",
                    max(1, batch // (hand["dp"] * ep)) if hand["pp"] == 1 else 1)
    return hand


def _memory_verdict(made, case: Case) -> dict:
    limit = case.options.get("memory_limit") or case.cluster.device.memory_bytes
    peak = made.predicted["peak_memory_bytes"]
    if peak <= limit:
        return {}
    return {"status": "no plan",
            "reason": f"the hand configuration's peak memory {format_bytes(peak)} per device "
                      f"is over the limit of {format_bytes(limit)}"}


def plan_figures(made, batch: int) -> dict:
    """What a row says of a plan: its shape and `autopar.simulate`'s predictions."""
    report = simulate(made)
    pipe = made.pipeline or {}
    return {
        "mesh": mesh_text({a: n for a, n in made.mesh.items() if n > 1}) or "dp=1",
        "microbatch_size": pipe.get("microbatch_size", batch),
        "microbatches": pipe.get("num_microbatches", 1),
        "schedule": pipe.get("schedule"),
        "data_parallel": made.data_parallel,
        "checkpointed_layers": len(made.checkpoint),
        "step_time_s": report.step_time_s,
        "samples_per_s": report.samples_per_s,
        "tokens_per_s": report.tokens_per_s,
        "tflops_per_gpu": report.tflops_per_gpu,
        "mfu": report.mfu,
        "peak_memory_gib": report.peak_memory_bytes / 2**30,
    }


def options_text(options: dict) -> str:
    """Options as short text: "autopar" (the search, no options), "autopar, memory_limit=40 GiB",
    "manual(zero=3)"."""
    manual = options.get("manual")
    parts = ["autopar" if manual is None else
             "manual(" + ", ".join(f"{k}={v}" for k, v in manual.items()) + ")"]
    for key, value in options.items():
        if key in ("label", "manual"):
            continue
        if key == "memory_limit" and isinstance(value, (int, float)):
            parts.append(f"memory_limit={format_bytes(value)}")
        elif key == "mesh" and isinstance(value, dict):
            parts.append(f"mesh({mesh_text(value)})")
        elif key == "precision" and isinstance(value, TrainingPrecision):
            parts.append(f"precision={_precision_name(value)}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def _precision_name(p: TrainingPrecision) -> str:
    known = {"fp32": TrainingPrecision.fp32(), "bf16-mixed": TrainingPrecision.mixed_bf16()}
    return next((name for name, q in known.items() if q == p), repr(p))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _report(log, i: int, n: int, row: dict) -> None:
    if log is None:
        return
    what = row["mesh"] if row["status"] == "planned" else row["reason"]
    step = f", {row['step_time_s']:.4g} s a step" if row["status"] == "planned" else ""
    log(f"[{i + 1}/{n}] {row['model']} on {row['gpus']} x {row['cluster']} ({row['label']}): "
        f"{row['status']}, {what}{step} ({row['plan_s'] or 0:.1f} s)")


# -- cases in worker processes --------------------------------------------------------------------


def _worker(case: Case, conn) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's, as the CLI does
    conn.send(plan_case(case))
    conn.close()


def _run_in_processes(cases: list[Case], processes: int, timeout: float | None,
                      log) -> list[dict]:
    """Each case in a fresh spawned process, at most `processes` at a time; a case over
    `timeout` seconds is killed and becomes a "timeout" row, a process that dies an "error"."""
    ctx = multiprocessing.get_context("spawn")
    rows: list[dict | None] = [None] * len(cases)
    waiting = list(range(len(cases)))
    running: dict = {}  # receiving end -> (case index, process, start time)
    done = 0
    while waiting or running:
        while waiting and len(running) < processes:
            i = waiting.pop(0)
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(cases[i], send), daemon=True)
            proc.start()
            send.close()
            running[receive] = (i, proc, time.perf_counter())
        for conn in wait_for(list(running), timeout=_next_deadline(running, timeout)):
            i, proc, start = running.pop(conn)
            rows[i] = _receive(conn, proc, cases[i], time.perf_counter() - start)
            _report(log, done, len(cases), rows[i])
            done += 1
        for conn, (i, proc, start) in list(running.items()):
            if timeout is not None and time.perf_counter() - start > timeout:
                proc.kill()
                proc.join()
                del running[conn]
                rows[i] = _failed_row(cases[i], "timeout", f"over the limit of {timeout:g} s",
                                      time.perf_counter() - start)
                _report(log, done, len(cases), rows[i])
                done += 1
    return rows


def _next_deadline(running: dict, timeout: float | None) -> float | None:
    if timeout is None:
        return None
    now = time.perf_counter()
    return max(0.0, min(start + timeout - now for _, _, start in running.values()))


def _receive(conn, proc, case: Case, elapsed: float) -> dict:
    try:
        row = conn.recv()
    except EOFError:  # the process died without a row: killed for memory, a crash
        proc.join()
        return _failed_row(case, "error", f"the worker process died (exit code {proc.exitcode})",
                           elapsed)
    proc.join()
    return row


def _failed_row(case: Case, status: str, reason: str, elapsed: float) -> dict:
    return {**_blank_row(case), "status": status, "reason": reason, "plan_s": elapsed}


# -- rows -> table, text, plot --------------------------------------------------------------------


def _columns(rows: Iterable[dict]) -> list[str]:
    """COLUMNS, then any other keys the rows carry (a user's own columns), first seen first."""
    names = dict.fromkeys(COLUMNS)
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names)


def to_csv(rows: list[dict], path) -> None:
    """Write rows as CSV (the csv module; None as an empty cell, floats exactly)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def read_csv(path) -> list[dict]:
    """Rows back from `to_csv`'s file, typed as `COLUMNS` says (other columns stay text)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(column: str, text: str):
    if text == "":
        return None
    kind = COLUMNS.get(column, str)
    return kind(float(text)) if kind is int else kind(text)


def to_dataframe(rows: list[dict]):
    """A pandas DataFrame of the rows, columns in `COLUMNS` order."""
    try:
        import pandas as pd
    except ImportError:
        raise _missing("pandas", "to_dataframe") from None
    return pd.DataFrame(rows, columns=_columns(rows))


def to_text(rows: list[dict]) -> str:
    """A plain-text table of the columns one reads first."""
    head = ("model", "GPUs", "label", "status", "mesh / reason", "step s", "MFU", "peak GiB",
            "plan s")
    table = [head]
    for r in rows:
        ok = r["status"] == "planned"
        table.append((
            r["model"], str(r["gpus"]), r["label"], r["status"],
            _plan_shape(r) if ok else (r["reason"] or "")[:70],
            f"{r['step_time_s']:.4g}" if r["step_time_s"] is not None else "-",
            f"{r['mfu']:.1%}" if r["mfu"] is not None else "-",
            f"{r['peak_memory_gib']:.3g}" if r["peak_memory_gib"] is not None else "-",
            f"{r['plan_s']:.1f}" if r["plan_s"] is not None else "-",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in table)


def _plan_shape(r: dict) -> str:
    parts = [r["mesh"]]
    if r["microbatches"] and r["microbatches"] > 1:
        parts.append(f"{r['microbatches']} mb" + (f" {r['schedule']}" if r["schedule"] else ""))
    if r["data_parallel"] and r["data_parallel"] != "replicate":
        parts.append(r["data_parallel"])
    if r["checkpointed_layers"]:
        parts.append(f"ckpt {r['checkpointed_layers']}")
    return ", ".join(parts)


AXIS_TITLES = {
    "gpus": "GPUs", "params": "parameters", "batch": "global batch",
    "step_time_s": "step time (s)", "samples_per_s": "samples/s", "tokens_per_s": "tokens/s",
    "tflops_per_gpu": "TFLOP/s per GPU", "mfu": "MFU", "peak_memory_gib": "peak memory (GiB)",
    "plan_s": "planning time (s)",
}


def plot(rows: list[dict], *, x: str = "gpus", y: str = "step_time_s", by=None, path=None,
         ax=None, logx: bool = False, logy: bool = False, title: str | None = None):
    """`y` against `x` for the rows that planned, one line per group of rows (`by`: a column
    or a list of columns; default those of model, label and cluster that differ between rows).
    Draws on `ax` if given, else on a new matplotlib Figure (no pyplot); writes it to `path` if
    given (the format from its suffix: png, pdf, svg). Returns the Figure."""
    Figure = _figure_class()
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 64 and 0.004, not 2^6 and 4x10^-3
    # between powers of ten, label 2 and 5 x 10^k only
    some = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")

    groups = [by] if isinstance(by, str) else list(by) if by is not None else [
        c for c in ("model", "label", "cluster") if len({r.get(c) for r in rows}) > 1]
    _check_columns((x, y, *groups), _columns(rows))
    lines: dict[str, list[tuple]] = {}
    for r in rows:
        if r.get("status") == "planned" and r.get(x) is not None and r.get(y) is not None:
            key = ", ".join(str(r.get(g)) for g in groups)
            lines.setdefault(key, []).append((r[x], r[y]))
    fig = ax.figure if ax is not None else Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = ax if ax is not None else fig.subplots()
    for key, points in lines.items():
        points.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key or None)
    ax.set_xlabel(AXIS_TITLES.get(x, x))
    ax.set_ylabel(AXIS_TITLES.get(y, y))
    if logx:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plain)
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(some)
    if title:
        ax.set_title(title)
    if groups and lines:
        ax.legend(title=", ".join(groups), fontsize="small")
    ax.grid(True, alpha=0.3)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def check_plot(*, x: str, y: str, by=None) -> None:
    """Fail now, not after a long sweep, when `plot` could not draw these sweep columns (or
    matplotlib is missing)."""
    _figure_class()
    _check_columns((x, y, *([by] if isinstance(by, str) else by or [])), list(COLUMNS))


def _check_columns(names, columns: list[str]) -> None:
    for name in names:
        if name not in columns:
            raise AutoparError(f"no column {name!r}; the columns are {', '.join(columns)}")


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise _missing("matplotlib", "plot") from None
    return Figure


def _missing(package: str, what: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"autopar.sweep.{what} needs {package}, which is not installed: "
        f"pip install 'autopar[research]' (pandas and matplotlib), or pip install {package}")


# `autopar.sweep` is this function once `autopar` is imported; its helpers ride along on it
for _helper in (to_csv, read_csv, to_dataframe, plot, to_text):
    setattr(sweep, _helper.__name__, _helper)
sweep.COLUMNS = COLUMNS
