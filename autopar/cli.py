"""The `autopar` command: plan offline, explain a plan, run the demo.

    autopar plan MODEL --cluster PRESET_OR_FILE [--mesh dp=2,tp=2] [--precision bf16-mixed]
                 [--schedule S] [--data-parallel F] [--microbatch-size N] [--checkpoint none]
                 [-o plan.json] [--json]
    autopar explain plan.json [--model MODEL] [--plot fig.png] [--json]
    autopar demo [--nproc 4] [--steps 5] [--mesh dp=2,tp=2]
    autopar models [--json]
    autopar clusters [--json]
    autopar sweep MODEL... --cluster PRESET_OR_FILE [--nodes 1 8] [-o table.csv] [--plot fig.png]

MODEL is a built-in name (`autopar models` lists them: `autopar.models.registry.BUILTIN_MODELS`)
or `module.path:factory`, a function returning `(model, example_inputs, loss_fn)`; it is called under `torch.device("meta")`, so any size plans
with no memory. A user's mistake (an `AutoparError`, a bad value, a missing file) prints
`autopar: error: <message>` on stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

import torch

from autopar.cli_explain import cmd_explain, load_plan_file
from autopar.console import check_output_path, parse_mesh, solver_output_to_stderr
from autopar.errors import AutoparError
from autopar.models.hf import parse_overrides
from autopar.models.registry import (
    BUILTIN_MODELS,
    build_model,
    is_factory,
    parameter_count,
    positive,
)
from autopar.parallelism import check_world_size, flavour_names
from autopar.planning.training_precision import PRECISION_NAMES
from autopar.schedules import SCHEDULES
from autopar.units import format_bytes, format_count, parse_bytes

EXIT_USAGE = 2  # what argparse itself uses for a bad command line


# -- reading the command line ---------------------------------------------------------------------


def load_cluster(spec: str, *, nodes: int | None, devices_per_node: int | None):
    """A preset name or a JSON cluster file, with --nodes / --devices-per-node applied."""
    from autopar.cluster import PRESETS, Cluster

    for value, flag in ((nodes, "--nodes"), (devices_per_node, "--devices-per-node")):
        if value is not None:
            positive(value, flag)  # 0 is a mistake, not "the default"
    if spec.lower() in PRESETS:
        return Cluster.preset(spec, nodes=nodes or 1, devices_per_node=devices_per_node)
    if not os.path.exists(spec):
        raise AutoparError(
            f"unknown cluster {spec!r}: not a preset ({', '.join(PRESETS)}) and no such file"
        )
    try:
        cluster = Cluster.from_file(spec)
    except UnicodeDecodeError as e:
        raise AutoparError(f"cannot read cluster file {spec}: not UTF-8 text ({e.reason}); give "
                           "a JSON file like autopar/data/devices/h100-80g.json") from None
    if nodes is None and devices_per_node is None:
        return cluster
    d = cluster.to_dict()
    d["nodes"] = nodes or d["nodes"]
    d["devices_per_node"] = devices_per_node or d["devices_per_node"]
    return Cluster.from_dict(d)


# -- output helpers -------------------------------------------------------------------------------


def _quiet_torch_warnings() -> None:
    # torch.export's own deprecation chatter; autopar's warnings (UserWarning) still show.
    warnings.filterwarnings("ignore", category=FutureWarning)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, allow_nan=False))


# -- commands -------------------------------------------------------------------------------------


def cmd_plan(args) -> int:
    import autopar

    if args.output:
        check_output_path(args.output, "-o")  # before the search, not after it
    mesh = parse_mesh(args.mesh) if args.mesh else None
    memory_limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    cluster = load_cluster(args.cluster, nodes=args.nodes, devices_per_node=args.devices_per_node)
    if mesh is not None:
        check_world_size(mesh, cluster.world_size, cluster=(
            f"cluster {cluster.name!r} ({cluster.nodes} node(s) x {cluster.devices_per_node})"))
    batch = args.batch
    if batch is None and not is_factory(args.model):
        batch = math.lcm(8, cluster.world_size)  # splits evenly over any dp axis
    microbatch = (None if args.microbatch_size is None
                  else positive(args.microbatch_size, "--microbatch-size"))
    with torch.device("meta"):
        model, example_inputs, loss_fn = build_model(args.model, batch=batch, seq=args.seq,
                                                     overrides=parse_overrides(args.set))
    with solver_output_to_stderr():
        plan = autopar.plan(
            model,
            cluster,
            example_inputs,
            loss_fn=loss_fn,
            mesh=mesh,
            memory_limit=memory_limit,
            precision=args.precision,  # traced and priced in its compute dtype
            solver=args.solver,
            time_limit=args.time_limit,
            schedule=args.schedule,
            microbatch_size=microbatch,
            data_parallel=args.data_parallel,
            checkpoint=args.checkpoint == "auto",
            log=None if args.quiet else _progress,
        )
    if args.output:
        plan.save(args.output)
    if args.json:
        sys.stdout.write(plan.to_json())
    else:
        print(plan.summary())
        if args.output:
            print(f"\nwrote {args.output}")
    return 0




def _progress(line: str) -> None:
    """The search's progress (what it solves, the best so far, elapsed) on stderr, so that
    stdout stays the plan."""
    print(line, file=sys.stderr, flush=True)


def cmd_simulate(args) -> int:
    import dataclasses

    from autopar.simulate import simulate

    report = simulate(load_plan_file(args.plan))
    if args.json:
        _print_json(dataclasses.asdict(report))
        return 0
    print(f"step time        {report.step_time_s * 1e3:.3f} ms")
    print(
        f"throughput       {report.samples_per_s:,.1f} samples/s, {report.tokens_per_s:,.0f} tokens/s"
    )
    print(f"per device       {report.tflops_per_gpu:.2f} TFLOP/s, MFU {report.mfu:.1%}")
    print(f"peak memory      {format_bytes(report.peak_memory_bytes)} (worst device)")
    for kind, n in report.memory_bytes.items():
        print(f"  {kind:<14} {format_bytes(n)}")
    for axis, t in report.communication_s.items():
        print(f"communication {axis:<3} {t * 1e3:.3f} ms")
    print(f"pipeline bubble  {report.bubble_fraction:.1%}")
    return 0


def cmd_demo(args) -> int:
    from autopar import demo

    mesh = parse_mesh(args.mesh) if args.mesh else None
    return demo.run(
        nproc=positive(args.nproc, "--nproc"),
        steps=positive(args.steps, "--steps"),
        mesh=mesh,
        json_output=args.json,
    )


def cmd_models(args) -> int:
    """Every built-in model: name, family, parameters (counted on meta) and inputs."""
    rows = [
        {"name": name, "family": entry.family.name, "parameters": parameter_count(name),
         "inputs": entry.inputs, "takes_seq": entry.family.takes_seq}
        for name, entry in BUILTIN_MODELS.items()
    ]
    if args.json:
        _print_json(rows)
        return 0
    table = [("name", "family", "params", "inputs (B: --batch)")] + [
        (r["name"], r["family"], format_count(r["parameters"]), r["inputs"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return 0


def cmd_clusters(args) -> int:
    """Every cluster preset: its device, memory, peak, node size and links, and whether its
    device is calibrated (measured op times) or priced from its datasheet."""
    from autopar.cluster import PRESETS, Cluster

    rows = []
    for name in PRESETS:
        c = Cluster.preset(name)
        rows.append({
            "name": name, "device": c.device.name, "memory_bytes": c.device.memory_bytes,
            "peak_flops": dict(c.device.peak_flops),
            "devices_per_node": c.devices_per_node,
            "intra_node_bytes_per_s": c.intra_node.bandwidth_bytes_per_s,
            "inter_node_bytes_per_s": c.inter_node.bandwidth_bytes_per_s,
            "calibrated": c.device.calibration is not None})
    if args.json:
        _print_json(rows)
        return 0
    def peak(flops: dict) -> str:  # the fastest dtype's
        dtype, value = max(flops.items(), key=lambda kv: kv[1])
        return f"{value / 1e12:,.4g} TFLOP/s {dtype}"

    table = [("name", "device", "memory", "peak", "per node", "links (in / across nodes)",
              "prices")] + [
        (r["name"], r["device"], format_bytes(r["memory_bytes"]), peak(r["peak_flops"]),
         str(r["devices_per_node"]),
         f"{r['intra_node_bytes_per_s'] / 1e9:,.0f} / {r['inter_node_bytes_per_s'] / 1e9:,.0f} "
         "GB/s", "calibrated" if r["calibrated"] else "datasheet")
        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\n--nodes N takes N of a preset; --cluster FILE.json any other "
          "(the format of autopar/data/devices/*.json)")
    return 0


def cmd_sweep(args) -> int:
    """Plan every MODEL on every --nodes count with every option; a table, a CSV, a plot."""
    from autopar.sweep import check_plot, plot, sweep, to_csv, to_text

    clusters = [load_cluster(args.cluster, nodes=n, devices_per_node=args.devices_per_node)
                for n in args.nodes or [None]]
    by = args.by.split(",") if args.by else None
    for path, flag in ((args.output, "-o"), (args.plot, "--plot")):
        if path:
            check_output_path(path, flag)
    if args.plot:
        check_plot(x=args.x, y=args.y, by=by)  # now, not after an hour of planning
    with solver_output_to_stderr():
        rows = sweep(args.models, clusters, sweep_options(args), batch=args.batch, seq=args.seq,
                     processes=positive(args.processes, "--processes"), timeout=args.timeout,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.output:
        to_csv(rows, args.output)
    if args.plot:
        plot(rows, x=args.x, y=args.y, by=by, path=args.plot, logx=args.logx, logy=args.logy)
    if args.json:
        _print_json(rows)
        return 0
    print(to_text(rows))
    for path in (args.output, args.plot):
        if path:
            print(f"wrote {path}")
    return 0


def sweep_options(args) -> list[dict]:
    """The options dicts of `autopar sweep`: the planner's search at each --memory-limit, then
    each --manual configuration at each."""
    limits = [parse_bytes(m) for m in args.memory_limit] if args.memory_limit else [None]
    solver = {"solver": args.solver} if args.solver else {}
    searched = {**solver, **({"time_limit": args.time_limit} if args.time_limit else {})}
    options = [{**searched, **_limit(m)} for m in limits]
    for text in args.manual or []:
        options += [{"manual": parse_manual(text), **solver, **_limit(m)} for m in limits]
    return options


def _limit(memory_limit: float | None) -> dict:
    return {} if memory_limit is None else {"memory_limit": memory_limit}


def parse_manual(text: str) -> dict:
    """ "tp=2,zero=3,checkpoint=full,sequence_parallel=true" -> {"tp": 2, "zero": 3,
    "checkpoint": "full", "sequence_parallel": True}."""
    hand = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"bad --manual {text!r}: {part!r} is not key=value; e.g. "
                             "--manual tp=2,zero=3 (keys: tp, pp, dp, microbatch_size, "
                             "checkpoint, schedule, zero, dp_shard, sequence_parallel, ep, "
                             "cp)")
        flag = {"true": True, "false": False}.get(value.lower())
        hand[key] = int(value) if value.isdigit() else value if flag is None else flag
    return hand


# -- argument parser ------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch",
        type=int,
        help="global batch size (built-ins: default lcm(8, devices), so any dp axis divides it)",
    )
    p.add_argument(
        "--seq",
        type=int,
        help="sequence length (built-ins: the config's; encoder-decoders: both lengths; "
        "not for image models)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="with hf:<model_type>: a config field, e.g. --set num_hidden_layers=4 "
                   "(repeatable; values are JSON, else strings)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopar",
        description="Plan how to spread a PyTorch model's training over a "
        "cluster, explain the plan, or run the demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "plan",
        help="plan a model for a cluster, offline (no GPU needed)",
        description="Trace MODEL on the meta device and plan it for a cluster.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a built-in model (`autopar models` lists them, e.g. gpt3-175b, llama3-8b), "
        "hf:<model_type> or hf:path/to/config.json (Hugging Face), or "
        "module.path:factory returning (model, example_inputs, loss_fn)",
    )
    p.add_argument(
        "--cluster",
        required=True,
        metavar="PRESET_OR_FILE",
        help="a preset (a100-40g, a100-80g, h100-80g, h200-141g, cpu) or a JSON file",
    )
    p.add_argument("--nodes", type=int, help="number of nodes (default: the preset's 1)")
    p.add_argument("--devices-per-node", type=int, help="devices per node (default: preset's)")
    p.add_argument(
        "--mesh", help="fix the mesh shape, e.g. pp=2,dp=2,tp=2 (default: search every pp x dp x tp)"
    )
    _add_model_args(p)
    p.add_argument(
        "--memory-limit",
        help="bytes per device, e.g. 40GiB, 80GB, 1e9 (default: the device's memory)",
    )
    p.add_argument("--precision", choices=tuple(PRECISION_NAMES),
                   help="fp32, or bf16-mixed: compute priced in bf16, bf16 weights and gradients, "
                        "fp32 master weights and optimizer state (default: the model's dtype's; "
                        "fp32 for the built-ins)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES),
                   help="pipeline schedule (default: search them all)")
    p.add_argument("--data-parallel", choices=flavour_names(),
                   help="data-parallel flavour (default: search them all)")
    p.add_argument("--microbatch-size", type=int, metavar="N",
                   help="samples a microbatch per data-parallel rank (default: search every "
                        "divisor of the batch)")
    p.add_argument("--checkpoint", choices=("auto", "none"), default="auto",
                   help="auto (default): each block may be checkpointed, full or selective; "
                        "none: never")
    p.add_argument("--solver", choices=("highs", "cbc"), default="highs")
    p.add_argument("--time-limit", type=float, metavar="S", help="solver time limit, seconds")
    p.add_argument("-o", "--output", metavar="PLAN_JSON", help="write the plan here")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (each mesh x microbatch solved, the best "
                        "plan so far, seconds elapsed)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "explain",
        help="show a saved plan, op by op",
        description="Print a plan's summary and every op's sharding.",
    )
    p.add_argument("plan", metavar="PLAN_JSON")
    p.add_argument(
        "--model",
        help="the MODEL the plan was made for (as given to `autopar plan`), to group ops by layer",
    )
    _add_model_args(p)
    p.add_argument("--plot", metavar="FIGURE",
                   help="also draw memory by kind, the pipeline timeline and where the step "
                   "time goes (PNG, PDF, SVG; needs matplotlib)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the plan dict (with ops_by_layer when --model is given)",
    )
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "simulate",
        help="predict a saved plan's step time, throughput, MFU and memory",
        description="Read a plan and print what the cost model predicts for it: step time, "
        "throughput, TFLOP/s and MFU per device, peak memory and its breakdown, "
        "communication per mesh axis, pipeline bubble. Needs no GPU.",
    )
    p.add_argument("plan", metavar="PLAN_JSON")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "demo",
        help="train a small GPT on N CPU processes beside one process",
        description="Plan a small GPT, train it on NPROC CPU processes (torchrun, "
        "gloo) and compare every step's loss with a single-process run.",
    )
    p.add_argument("--nproc", type=int, default=4, help="processes (default 4)")
    p.add_argument("--steps", type=int, default=5, help="SGD steps (default 5)")
    p.add_argument(
        "--mesh", help="mesh shape (default: dp=2,tp=2 for 4 processes, else the planner's choice)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "clusters",
        help="list the cluster presets",
        description="List every cluster preset (--cluster NAME): its device, memory, peak, "
        "devices a node, links, and whether its op times are calibrated.",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_clusters)

    p = sub.add_parser(
        "models",
        help="list the built-in models",
        description="List every built-in model: its family, parameter count (counted on the "
        "meta device) and the inputs it takes at its default sizes.",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "sweep",
        help="plan models x cluster sizes x options: a table, a CSV, a plot",
        description="Plan every MODEL on every --nodes count of the cluster, with the planner's "
        "search at each --memory-limit and each --manual hand configuration; print a table, "
        "write it as CSV (-o) and plot it (--plot). A case that does not plan is a row with "
        "its reason. See docs/research.md.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="built-in models (`autopar models`), hf:..., or module.path:factory")
    p.add_argument("--cluster", required=True, metavar="PRESET_OR_FILE",
                   help="a preset (a100-40g, a100-80g, h100-80g, h200-141g, cpu) or a JSON file")
    p.add_argument("--nodes", type=int, nargs="+", metavar="N",
                   help="node counts to sweep, e.g. --nodes 1 8 64 (default: the preset's 1)")
    p.add_argument("--devices-per-node", type=int, help="devices per node (default: preset's)")
    p.add_argument("--memory-limit", nargs="+", metavar="SIZE",
                   help="bytes per device, one case each, e.g. 40GiB 80GB (default: the "
                   "device's memory)")
    p.add_argument("--manual", action="append", metavar="KEY=VALUE,...",
                   help="also a hand configuration (autopar.manual_plan), e.g. zero=0 (plain "
                   "data parallel), zero=3 (FSDP), tp=8,pp=4,checkpoint=full; tp and pp "
                   "default to 1, dp to the remaining devices (repeatable)")
    p.add_argument("--batch", type=int,
                   help="global batch (built-ins: default lcm(8, devices) for each cluster)")
    p.add_argument("--seq", type=int, help="sequence length (built-ins: the config's)")
    p.add_argument("--solver", choices=("highs", "cbc"), help="ILP backend (default highs)")
    p.add_argument("--time-limit", type=float, metavar="S", help="solver time limit, seconds")
    p.add_argument("--processes", type=int, default=1,
                   help="cases planned at once, each in its own process (default 1)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds a case may take; over it the case is a 'timeout' row")
    p.add_argument("-o", "--output", metavar="TABLE_CSV", help="write the rows as CSV")
    p.add_argument("--plot", metavar="FIGURE", help="plot --y against --x (PNG, PDF, SVG)")
    p.add_argument("--x", default="gpus", help="the x axis's column (default gpus)")
    p.add_argument("--y", default="step_time_s", help="the y axis's column (default step_time_s)")
    p.add_argument("--by", metavar="COL[,COL]",
                   help="one line per value of these columns (default: those of model, label "
                   "and cluster that differ between rows)")
    p.add_argument("--logx", action="store_true", help="log scale (base 2) on x")
    p.add_argument("--logy", action="store_true", help="log scale on y")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `autopar` command; return its exit status (2 for a user's mistake)."""
    args = make_parser().parse_args(argv)
    _quiet_torch_warnings()
    try:
        return args.func(args)
    except (AutoparError, ValueError, FileNotFoundError) as e:
        sys.stdout.flush()
        print(f"autopar: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a path of the user's that cannot be read or written
        sys.stdout.flush()
        print(f"autopar: error: cannot use {e.filename or 'a file'}: {e.strerror or e}; check "
              "the path and its permissions", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
