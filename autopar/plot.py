"""`autopar explain PLAN --plot FIG`: what a plan predicts, drawn from the plan file alone.

One figure, three panels, top to bottom, each showing what the plan records and no more:

    memory     the busiest device's predicted bytes by kind (`predicted["memory_<kind>_bytes"]`).
               A plan keeps only the device with the highest peak (for a pipeline, the busiest
               pp rank: `planning/assemble.py`), so that is the one bar drawn, and said so.
    timeline   each pp rank's forwards and backwards, microbatch by microbatch, in the order
               torch runs the plan's schedule (`schedules.unit_timeline`). The plan holds no
               per-stage times, so the widths are the schedule's unit times (F = 1, B = 2,
               I = W = 1), the ones its bubble fraction is measured in; a plan without a
               pipeline is one forward and one backward of the whole batch.
    step time  where a step's predicted seconds go: the stages busy (compute, resharding,
               sends, ZeRO gathers), the bubble, the data-parallel sync and the gradient
               accumulation, which add up to `step_time_s` (the serial model of
               `planning/candidate.py`); then, not to be added, the communication on each mesh
               axis (inside those bars, over all microbatches and stages) and the model's
               FLOPs at the device's peak rate, the compute time of an ideal device.

matplotlib is optional (`autopar[research]`) and imported only here, through
`matplotlib.figure.Figure` rather than pyplot: no GUI backend and no global figure state.
"""

from __future__ import annotations

import os

from autopar.console import check_output_path
from autopar.files import write_atomically
from autopar.parallelism import PIPELINE
from autopar.plan import Plan
from autopar.schedules import get_schedule, unit_timeline
from autopar.simulate import MEMORY_KINDS
from autopar.sweep import MissingDependencyError
from autopar.units import format_bytes

DPI = 100
FIGSIZE_IN = (11.0, 10.0)  # 1100 x 1000 pixels at DPI
# one colour per thing drawn, from matplotlib's tab10, so no two panels' keys can be mistaken
MEMORY_COLOURS = {"parameters": "#1f77b4", "gradients": "#ff7f0e", "optimizer": "#2ca02c",
                  "activations": "#d62728", "temporaries": "#9467bd"}
ACTION_COLOURS = {"F": "#1f77b4", "B": "#ff7f0e", "I": "#d62728", "W": "#2ca02c"}
ACTION_NAMES = {"F": "forward", "B": "backward", "I": "backward, input gradients",
                "W": "backward, weight gradients"}
STEP_COLOURS = {"busy": "#1f77b4", "bubble": "#c7c7c7", "sync": "#ff7f0e",
                "accumulate": "#bcbd22", "communication": "#17becf", "ideal": "#8c564b"}
LABELLED_ACTIONS = 32  # a rank with more actions than this gets no microbatch numbers


def check_plot(path: str) -> None:
    """Fail before any work when `plot_plan` could not write `path`: matplotlib missing, a
    format it does not write, or a folder that does not exist."""
    _figure_class()
    image_format(path)
    check_output_path(path, "--plot")


def plot_plan(plan: Plan, path: str) -> None:
    """Draw `plan`'s memory, pipeline timeline and step time (module docstring) and write the
    figure to `path`, in the format of its suffix (png when it has none), atomically."""
    check_plot(path)
    fig = _figure_class()(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    memory_ax, timeline_ax, step_ax = fig.subplots(3, 1, height_ratios=(1.0, 1.6, 1.4))
    draw_memory(memory_ax, plan)
    draw_timeline(timeline_ax, plan)
    draw_step_time(step_ax, plan)
    mesh = " x ".join(f"{axis}={size}" for axis, size in plan.mesh.items())
    fig.suptitle(f"{plan.model}: {mesh} = {plan.world_size} devices of "
                 f"{plan.cluster.get('name', 'an unnamed cluster')} (predicted)")
    save_atomically(fig, path)


def image_format(path: str) -> str:
    """The format `path`'s suffix names ("png" without one); a ValueError for one matplotlib
    cannot write, listing those it can."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = os.path.splitext(path)[1].lower().lstrip(".") or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if suffix not in known:
        raise ValueError(f"--plot {path}: matplotlib cannot write .{suffix} files; use one of "
                         f"{', '.join('.' + k for k in sorted(known))}")
    return suffix


# -- the panels ----------------------------------------------------------------------------------


def draw_memory(ax, plan: Plan) -> None:
    """One bar: the busiest device's bytes by kind, the only device a plan records."""
    p = plan.predicted
    recorded = [key.removeprefix("memory_").removesuffix("_bytes") for key in sorted(p)
                if key.startswith("memory_") and key.endswith("_bytes") and p[key] > 0]
    kinds = [k for k in MEMORY_KINDS if k in recorded] + [
        k for k in recorded if k not in MEMORY_KINDS]
    if not kinds:
        _nothing(ax, "memory: this plan records no memory predictions (memory_<kind>_bytes)")
        return
    total = sum(p[f"memory_{k}_bytes"] for k in kinds)
    unit, size = _byte_unit(total)
    who = "pp rank" if plan.mesh.get(PIPELINE, 1) > 1 else "device"
    left = 0.0
    for i, kind in enumerate(kinds):
        n = p[f"memory_{kind}_bytes"]
        ax.barh(0, n / size, left=left, height=0.5, color=MEMORY_COLOURS.get(kind, f"C{i}"),
                label=f"{kind} {format_bytes(n)}")
        left += n / size
    ax.set_yticks([0], [f"busiest {who}"])
    ax.set_ylim(0.6, -0.6)
    capacity = plan.cluster.get("device", {}).get("memory_bytes")
    share = ""
    if capacity:
        fraction = total / capacity
        share = (f", {fraction:.1%}" if fraction >= 0.001 else ", under 0.1%") + (
            f" of the device's {format_bytes(capacity)}")
    ax.set_title(f"memory of the busiest {who}: peak "
                 f"{format_bytes(p.get('peak_memory_bytes', total))}{share}\n(the plan records "
                 f"only its busiest {who}, not every {who})", fontsize="medium")
    ax.set_xlabel(unit)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncols=min(len(kinds), 5),
              fontsize="small", frameon=False)


def draw_timeline(ax, plan: Plan) -> None:
    """Each pp rank's compute actions as torch's schedule orders them, in unit times."""
    spans, v, title = timeline_of(plan)
    pp = len(spans)
    for rank, actions in enumerate(spans):
        for kind in ACTION_COLOURS:
            mine = [a for a in actions if a[0] == kind]
            if mine:  # a rank's later stages paler: stage s is the (s // pp)-th of its rank
                faces = [_paler(ACTION_COLOURS[kind], (stage // pp) / max(v - 1, 1))
                         for _, stage, *_ in mine]
                ax.broken_barh([(start, end - start) for *_, start, end in mine],
                               (rank - 0.4, 0.8), facecolors=faces, edgecolor="white",
                               linewidth=0.5)
        if len(actions) <= LABELLED_ACTIONS:
            for kind, _, microbatch, start, end in actions:
                ax.text((start + end) / 2, rank, f"{kind}{microbatch}", ha="center",
                        va="center", fontsize="x-small", color="white")
    ax.set_ylim(pp - 0.5, -0.5)  # rank 0 on top
    if pp == 1:
        ax.set_yticks([0], ["every device"])
    elif pp <= 16:
        ax.set_yticks(range(pp), [f"pp rank {r}" for r in range(pp)])
    ax.set_xlabel("time (schedule units)")
    kinds = sorted({a[0] for actions in spans for a in actions}, key=list(ACTION_COLOURS).index)
    ax.legend(handles=[_patch(ACTION_COLOURS[k], ACTION_NAMES[k]) for k in kinds],
              loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=len(kinds),
              fontsize="small", frameon=False)
    ax.set_title(title, fontsize="medium")


def timeline_of(plan: Plan) -> tuple[list[list[tuple[str, int, int, float, float]]], int, str]:
    """(per pp rank, its actions as (kind, stage, microbatch, start, end); stages per rank; the
    panel's title). Unit times: the plan records each stage's layers but not their seconds."""
    if not plan.pipeline:
        return [[("F", 0, 0, 0.0, 1.0), ("B", 0, 0, 1.0, 3.0)]], 1, (
            "timeline: no pipeline; every device runs the whole batch's forward and backward\n"
            "(widths in equal units, F = 1, B = 2)")
    pipe = plan.pipeline
    pp, m, v = plan.mesh.get(PIPELINE, 1), pipe["num_microbatches"], pipe["stages_per_rank"]
    schedule = get_schedule(pipe["schedule"])
    spans = [[(a.kind, a.stage, a.microbatch, start, end) for a, start, end in rank]
             for rank in unit_timeline(schedule.name, pp, m, v)]
    if pp == 1:  # microbatches without stages: gradient accumulation
        return spans, v, (
            f"timeline: no pipeline; {m} microbatches of {pipe['microbatch_size']} one after "
            "another, gradients accumulated\n(widths in equal units, F = 1, B = 2)")
    title = (f"timeline: {schedule.name}, {pp} pp ranks x {m} microbatch(es) of "
             f"{pipe['microbatch_size']}, {v} stage(s) a rank, bubble "
             f"{schedule.bubble_fraction(pp, m, v):.0%}\nwidths in equal units (F = 1, B = 2, "
             "I = W = 1): the plan holds no per-stage times")
    return spans, v, title + ("; paler: a rank's later stage" if v > 1 else "")


def draw_step_time(ax, plan: Plan) -> None:
    """A stacked bar that adds up to the step, then bars not to be added: communication per
    mesh axis and the model's FLOPs at peak."""
    p = plan.predicted
    if "step_time_s" not in p:
        _nothing(ax, "step time: this plan records no time predictions (step_time_s)")
        return
    unit, scale = _time_unit(p["step_time_s"])
    parts = step_parts(p)
    rows = [f"step {p['step_time_s'] * scale:.3g} {unit}"]
    left = 0.0
    for key, label, seconds in parts:
        ax.barh(0, seconds * scale, left=left, color=STEP_COLOURS[key],
                label=f"{label} {seconds * scale:.3g} {unit}")
        left += seconds * scale
    for key, label, seconds in other_times(p):
        ax.barh(len(rows), seconds * scale, color=STEP_COLOURS[key])
        ax.text(seconds * scale, len(rows), f" {seconds * scale:.3g} {unit}", va="center",
                fontsize="small")
        rows.append(label)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(unit)
    ax.set_title("step time: the top bar adds up to the step (serial model: pipeline + dp sync);"
                 "\nbelow, not to be added: each mesh axis's communication (over all stages and "
                 "microbatches)\nand the model's FLOPs at the device's peak rate",
                 fontsize="medium")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=min(len(parts), 4),
              fontsize="small", frameon=False)


def step_parts(p: dict[str, float]) -> list[tuple[str, str, float]]:
    """(colour key, label, seconds) that add up to step_time_s = pipeline_s + dp_sync_s: the
    pipeline split by its schedule's idle fraction (measured on equal stages, so an estimate
    for uneven ones), the sync split into gradient accumulation and the rest."""
    if "pipeline_s" not in p or "dp_sync_s" not in p:
        return [("busy", "step", p["step_time_s"])]
    bubble = p.get("bubble_fraction", 0.0)
    accumulate = p.get("gradient_accumulation_s", 0.0)
    parts = [("busy", "busy: compute and communication", p["pipeline_s"] * (1 - bubble)),
             ("bubble", "pipeline bubble", p["pipeline_s"] * bubble),
             ("sync", "dp sync and optimizer step", p["dp_sync_s"] - accumulate),
             ("accumulate", "gradient accumulation", accumulate)]
    return [part for part in parts if part[2] > 0]


def other_times(p: dict[str, float]) -> list[tuple[str, str, float]]:
    """(colour key, label, seconds) shown beside the step, not part of its sum: each mesh
    axis's communication (`communication_<axis>_s`, within the step's bars) and the model's
    FLOPs on one device at its peak rate, the step of a device that never waits."""
    rows = [("communication", f"communication {key.removeprefix('communication_')[:-2]}",
             seconds) for key, seconds in sorted(p.items())
            if key.startswith("communication_") and key.endswith("_s") and seconds > 0]
    if p.get("peak_flops_per_device") and p.get("world_size") and "flops_per_step" in p:
        rows.append(("ideal", "model FLOPs at peak",
                     p["flops_per_step"] / p["world_size"] / p["peak_flops_per_device"]))
    return rows


# -- helpers -------------------------------------------------------------------------------------


def save_atomically(fig, path: str) -> None:
    """Write `fig` to `path` whole or not at all: a failed or interrupted draw leaves the old
    file (or none), never half a picture."""
    write_atomically(path, lambda f: fig.savefig(f, format=image_format(path), dpi=DPI))


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "autopar explain --plot needs matplotlib, which is not installed: pip install "
            "matplotlib (or pip install 'autopar[research]')") from None
    return Figure


def _nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _patch(colour: str, label: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, label=label)


def _paler(colour: str, amount: float) -> tuple[float, float, float]:
    """`colour` mixed with `amount` (0 to 1) x 60% white: a rank's later stages, paler."""
    from matplotlib.colors import to_rgb

    return tuple(c + (1 - c) * 0.6 * amount for c in to_rgb(colour))


def _byte_unit(n: float) -> tuple[str, float]:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return unit, size
    return "bytes", 1


def _time_unit(seconds: float) -> tuple[str, float]:
    for unit, scale in (("s", 1.0), ("ms", 1e3)):
        if seconds * scale >= 1:
            return unit, scale
    return "µs", 1e6
