"""`Plan.summary()`: a plan as a readable table, repeated layers folded into one row."""

from __future__ import annotations

from typing import Any

from autopar.plan_schema import natural_key, natural_sorted


def summary(plan) -> str:
    """Model, mesh, cluster, predictions, solver, pipeline, flavour, ops with no sharding rule,
    checkpointing, then parameter placements."""
    lines = [
        f"plan for {plan.model} (schema {plan.schema_version}, graph {short_fingerprint(plan.graph_fingerprint)})"
    ]
    lines.append(f"  mesh       {mesh_text(plan.mesh)} = {plan.world_size} devices")
    lines.append(f"  cluster    {_cluster_str(plan.cluster)}")
    lines.append(f"  predicted  {_predicted_str(plan.predicted)}")
    lines.append(f"  solver     {_solver_str(plan.solver)}")
    if plan.pipeline:
        p = plan.pipeline
        lines.append(
            f"  pipeline   {p['schedule']}, {p['num_microbatches']} microbatches of "
            f"{p['microbatch_size']}, {len(p['stages'])} stages ({p['stages_per_rank']} per rank)"
        )
        for s, st in enumerate(p["stages"]):
            lines.append(f"    stage {s} on pp rank {st['rank']}: {_layers_str(st['layers'])}")
    lines.append(f"  data par.  {plan.data_parallel}")
    lines.append(f"  precision  {_precision_str(plan.precision)}")
    if plan.made_with:
        lines.append("  made with  " + ", ".join(f"{k} {v}" for k, v in
                                                sorted(plan.made_with.items())))
    for op, count in sorted(plan.fallback_ops.items()):
        lines.append(f"  no rule    {op} ({count} node{'s' * (count != 1)}) runs replicated: "
                     "shard it with autopar.register_rule")
    if plan.checkpoint:
        lines.append(f"  checkpoint {_layers_str(sorted(plan.checkpoint, key=natural_key))} "
                     f"({', '.join(sorted(set(plan.checkpoint.values())))})")
    rows = _collapse(
        [(_split_fqn(fqn), tuple(p)) for fqn, p in natural_items(plan.parameters)]
    )
    header = ("parameter", *plan.sharding_mesh.keys())
    table = [header] + [(_join_fqn(parts), *placements) for parts, placements in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines.append("")
    for i, row in enumerate(table):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    if not rows:
        lines.append("  (no parameters)")
    return "\n".join(lines)


def _precision_str(precision: dict) -> str:
    from autopar.planning.training_precision import TrainingPrecision

    return TrainingPrecision.from_dict(precision).describe()


def _layers_str(layers: list[str]) -> str:
    """['pre', 'blocks.0', 'blocks.1', 'blocks.2'] -> 'pre, blocks.{0..2}'."""
    rows = _collapse([(_split_fqn(x), ()) for x in layers])
    return ", ".join(_join_fqn(parts) for parts, _ in rows)


def natural_items(d: dict) -> list[tuple[str, Any]]:
    return [(k, d[k]) for k in natural_sorted(d)]


def short_fingerprint(fingerprint: str) -> str:
    return fingerprint[:12] + "..." if len(fingerprint) > 12 else fingerprint


def mesh_text(mesh: dict[str, int]) -> str:
    return " x ".join(f"{axis}={size}" for axis, size in mesh.items())


def _cluster_str(cluster: dict) -> str:
    name = cluster.get("name", "unnamed cluster")
    n = cluster.get("world_size")
    if n is None and isinstance(cluster.get("nodes"), int):
        per_node = cluster.get("devices_per_node", cluster.get("gpus_per_node"))
        if isinstance(per_node, int):
            n = cluster["nodes"] * per_node
    return f"{name}, {n} devices" if n is not None else str(name)


def _predicted_str(predicted: dict[str, float]) -> str:
    if not predicted:
        return "(none)"
    parts = []
    if "step_time_s" in predicted:
        parts.append(f"step {predicted['step_time_s'] * 1e3:.3f} ms")
    detail = [
        f"{k.removesuffix('_s')} {predicted[k] * 1e3:.3f} ms"
        for k in ("compute_s", "communication_s")
        if k in predicted
    ]
    if detail:
        parts.append("(" + ", ".join(detail) + ")")
    if "peak_memory_bytes" in predicted:
        parts.append(f"peak memory {predicted['peak_memory_bytes'] / 2**30:.3f} GiB per device")
    return (
        " ".join(parts) if parts else ", ".join(f"{k}={v!r}" for k, v in sorted(predicted.items()))
    )


def _solver_str(solver: dict) -> str:
    if not solver:
        return "(none)"
    parts = [str(solver.get("name", "?")) + ":", str(solver.get("status", "?"))]
    if isinstance(solver.get("gap"), (int, float)):
        parts.append(f"gap {solver['gap'] * 100:.2f}%")
    if isinstance(solver.get("solve_time_s"), (int, float)):
        parts.append(f"in {solver['solve_time_s']:.2f} s")
    return " ".join(parts)


# FQN parts: a str, or a frozenset of layer indices once rows have been folded together.
_Part = str | frozenset


def _split_fqn(fqn: str) -> tuple[_Part, ...]:
    return tuple(frozenset([int(t)]) if t.isdigit() else t for t in fqn.split("."))


def _join_fqn(parts: tuple[_Part, ...]) -> str:
    return ".".join(p if isinstance(p, str) else _index_str(p) for p in parts)


def _index_str(indices: frozenset) -> str:
    xs = sorted(indices)
    if len(xs) == 1:
        return str(xs[0])
    if xs == list(range(xs[0], xs[-1] + 1)):
        return f"{{{xs[0]}..{xs[-1]}}}"
    return "{" + ",".join(map(str, xs)) + "}"


def _collapse(rows: list[tuple[tuple[_Part, ...], tuple[str, ...]]]) -> list:
    """Fold rows that differ only in one numeric FQN part and have equal placements.

    Folds the innermost index first (`experts.{0..7}`), then outer ones (`blocks.{0..11}`).
    Rows keep the order of their first member.
    """
    depth = max((len(parts) for parts, _ in rows), default=0)
    for pos in reversed(range(depth)):
        folded: dict[tuple, frozenset | None] = {}
        for parts, placements in rows:
            if pos < len(parts) and isinstance(parts[pos], frozenset):
                key = (parts[:pos], parts[pos + 1 :], placements)
                folded[key] = (folded.get(key) or frozenset()) | parts[pos]
            else:
                folded[(parts, None, placements)] = None
        rows = [
            ((*head, idx, *tail) if idx is not None else head, placements)
            for (head, tail, placements), idx in folded.items()
        ]
    return rows
