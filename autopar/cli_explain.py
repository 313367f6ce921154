"""`autopar explain PLAN_JSON`: a saved plan as text (its summary and every op's sharding, by
layer with --model), as JSON, or drawn (--plot, `autopar.plot`); and the one way the command
line reads a plan file, which `autopar simulate` shares."""

from __future__ import annotations

import json
import math
import os

import torch

from autopar.models.hf import parse_overrides
from autopar.models.registry import build_model, is_factory
from autopar.plan import Plan


def load_plan_file(path: str) -> Plan:
    """`Plan.load`, with the two mistakes it reports as a bare OS or codec error said in full:
    a folder given for the file, and a file that is not text."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a plan file: give the JSON file that "
                         "`autopar plan -o` wrote")
    try:
        return Plan.load(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a plan file: it is not UTF-8 text ({e.reason} at byte "
                         f"{e.start}); give the JSON file that `autopar plan -o` wrote") from None


def cmd_explain(args) -> int:
    """Print the plan's summary and its ops (or JSON); with --plot, draw it first."""
    if args.plot:
        from autopar.plot import check_plot

        check_plot(args.plot)  # before any work: matplotlib, the format, the folder
    plan = load_plan_file(args.plan)
    layers = ops_by_layer(plan, args) if args.model else None
    if args.plot:
        from autopar.plot import plot_plan

        plot_plan(plan, args.plot)
    if args.json:
        d = plan.to_dict()
        if layers is not None:
            d["ops_by_layer"] = {layer: list(ops) for layer, ops in layers.items()}
        print(json.dumps(d, indent=2, allow_nan=False))
        return 0
    print(plan.summary())
    print()
    if layers is None:
        print(f"ops ({len(plan.ops)}; give --model to group them by layer)")
        _print_ops(plan, list(plan.ops), indent="  ")
    else:
        print(f"ops by layer ({len(plan.ops)} ops; placements per mesh axis "
              f"{'x'.join(plan.mesh)})")
        for layer, ops in layers.items():
            print(f"  {layer or '(model)'}")
            _print_ops(plan, ops, indent="    ")
    if args.plot:
        print(f"\nwrote {args.plot}")
    return 0


def _print_ops(plan: Plan, names: list[str], indent: str) -> None:
    def sharding(placements: list[str]) -> str:
        return ",".join(placements) if placements else "-"

    rows = []
    for name in names:
        op = plan.ops[name]
        ins = " ".join(sharding(p) for p in op.inputs) or "-"
        outs = " ".join(sharding(p) for p in op.outputs) or "-"
        rows.append((name, op.rule, ins, outs))
    w = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    for name, rule, ins, outs in rows:
        print(f"{indent}{name.ljust(w[0])}  {rule.ljust(w[1])}  {ins.ljust(w[2])} -> {outs}")


def ops_by_layer(plan: Plan, args) -> dict[str, list[str]]:
    """Retrace the model (on meta) to map each planned op to its layer, in graph order."""
    from autopar.trace import layer_of, trace_for_training

    batch = args.batch
    if batch is None and not is_factory(args.model):
        batch = math.lcm(8, plan.world_size)  # as `autopar plan` defaults it
    with torch.device("meta"):
        model, example_inputs, loss_fn = build_model(args.model, batch=batch, seq=args.seq,
                                                     overrides=parse_overrides(args.set))
    traced = trace_for_training(model, example_inputs, loss_fn)
    plan.check_matches(graph_fingerprint=traced.fingerprint, world_size=plan.world_size)
    layers: dict[str, list[str]] = {}
    for node in traced.graph_module.graph.nodes:
        if node.name in plan.ops:
            layers.setdefault(layer_of(node), []).append(node.name)
    return layers
