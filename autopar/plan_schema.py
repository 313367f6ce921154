"""What a plan file must hold: `validate_plan` checks a plan dict's version, keys and types and
raises ValueError naming the first bad field (PlanMismatchError for a newer schema).

The format itself is documented in `autopar.plan`."""

from __future__ import annotations

import math
import re
from typing import Any

from autopar.errors import PlanMismatchError
from autopar.parallelism import PIPELINE, REPLICATE, flavour_names

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

PLACEMENT_RE = re.compile(r"^(?:R|S\((\d+)\)|P\((sum|avg)\))$")
PLACEMENT_HELP = 'expected "R", "S(<dim>)", "P(sum)" or "P(avg)"'

FIELDS = {
    "schema_version": int,
    "model": str,
    "graph_fingerprint": str,
    "cluster": dict,
    "mesh": dict,
    "parameters": dict,
    "inputs": dict,
    "ops": dict,
    "predicted": dict,
    "solver": dict,
}


def validate_plan(d: Any, *, where: str) -> None:
    """Check a plan dict's version, keys and types; raise ValueError naming the first bad field."""

    def fail(msg: str, cls: type[Exception] = ValueError) -> None:
        raise cls(f"{where}: {msg}")

    if not isinstance(d, dict):
        fail(f"a plan is a JSON object, got {type(d).__name__}")
    version = d.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        fail(
            f"plan schema version {version} is newer than this autopar reads "
            f"({SCHEMA_VERSION}): upgrade autopar, or re-plan with this one",
            PlanMismatchError,
        )
    missing = [k for k in FIELDS if k not in d]
    if missing:
        fail(f"missing field(s) {', '.join(missing)}: not a complete autopar plan")
    for key, typ in FIELDS.items():
        if not isinstance(d[key], typ) or isinstance(d[key], bool):
            fail(f"field {key!r} should be {typ.__name__}, got {type(d[key]).__name__}")
    if version not in READABLE_VERSIONS:
        fail(f"unknown plan schema version {version} (this autopar reads {READABLE_VERSIONS})")
    if not d["graph_fingerprint"]:
        fail("field 'graph_fingerprint' is empty")

    mesh = d["mesh"]
    if not mesh:
        fail("field 'mesh' is empty: a plan needs at least one mesh axis")
    for axis, size in mesh.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            fail(f"mesh axis {axis!r} has size {size!r}: sizes are integers >= 1")
    if PIPELINE in mesh and list(mesh)[0] != PIPELINE:
        fail(f"mesh {mesh}: the 'pp' axis must come first (outermost)")
    n_axes = len(mesh) - (PIPELINE in mesh)
    _validate_pipeline(d, mesh, fail)

    for group in ("parameters", "inputs"):
        for name, placements in d[group].items():
            _check_sharding(placements, n_axes, f"{group}[{name!r}]", fail)
    for name, op in d["ops"].items():
        if not isinstance(op, dict) or not {"inputs", "outputs"} <= set(op) <= _OP_KEYS:
            fail(f"ops[{name!r}] should be an object with keys 'inputs', 'outputs' and 'rule'")
        if not isinstance(op.get("rule", ""), str):
            fail(f"ops[{name!r}].rule should be a string, got {op['rule']!r}")
        for side in ("inputs", "outputs"):
            if not isinstance(op[side], list):
                fail(f"ops[{name!r}].{side} should be a list of shardings")
            for i, placements in enumerate(op[side]):
                _check_sharding(placements, n_axes, f"ops[{name!r}].{side}[{i}]", fail)
    for key, value in d["predicted"].items():
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            fail(f"predicted[{key!r}] should be a finite number, got {value!r}")
    _validate_precision(d.get("precision") or {}, fail)


def _validate_precision(precision, fail) -> None:
    from autopar.planning.training_precision import TrainingPrecision

    try:
        TrainingPrecision.from_dict(precision)
    except (TypeError, ValueError) as e:
        fail(f"precision {precision!r} is not a TrainingPrecision's fields ({e})")


_OP_KEYS = {"inputs", "outputs", "rule"}

OPTIONAL = ("pipeline", "data_parallel", "checkpoint", "made_with", "fallback_ops", "precision")
PIPELINE_KEYS = ("schedule", "stages_per_rank", "microbatch_size", "num_microbatches", "stages")


def _validate_pipeline(d: dict, mesh: dict, fail) -> None:
    """pipeline / data_parallel / checkpoint: types, and a pipeline exactly when there is pp."""
    dp = d.get("data_parallel", REPLICATE)
    if dp not in flavour_names():
        fail(f"data_parallel is {dp!r}; use one of {flavour_names()}")
    ckpt = d.get("checkpoint") or {}
    if not isinstance(ckpt, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ckpt.items()
    ):
        fail(f"checkpoint should map layer names to policies like 'full', got {ckpt!r}")
    made = d.get("made_with") or {}
    if not isinstance(made, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in made.items()
    ):
        fail(f"made_with should map names to versions like {{'torch': '2.11.0'}}, got {made!r}")
    fallback = d.get("fallback_ops") or {}
    if not isinstance(fallback, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
        for k, v in fallback.items()
    ):
        fail("fallback_ops should map ATen ops to node counts like "
             f"{{'aten._cdist_forward.default': 2}}, got {fallback!r}")
    p = d.get("pipeline")
    if p is None:
        if PIPELINE in mesh and mesh[PIPELINE] > 1:
            fail(f"mesh {mesh} has a 'pp' axis but the plan has no pipeline section")
        return
    if not isinstance(p, dict) or set(p) != set(PIPELINE_KEYS):
        fail(f"pipeline should be an object with keys {list(PIPELINE_KEYS)}, got {p!r}")
    if PIPELINE not in mesh:
        fail(f"the plan has a pipeline but its mesh {mesh} has no 'pp' axis")
    for key in ("stages_per_rank", "microbatch_size", "num_microbatches"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1:
            fail(f"pipeline.{key} should be an int >= 1, got {p[key]!r}")
    if not isinstance(p["schedule"], str):
        fail(f"pipeline.schedule should be a schedule name, got {p['schedule']!r}")
    stages = p["stages"]
    if not isinstance(stages, list) or len(stages) != mesh[PIPELINE] * p["stages_per_rank"]:
        fail(
            f"pipeline.stages should list pp x stages_per_rank = "
            f"{mesh[PIPELINE] * p['stages_per_rank']} stages, got {stages!r}"
        )
    seen: set[str] = set()
    for s, st in enumerate(stages):
        if (
            not isinstance(st, dict)
            or set(st) != {"rank", "layers"}
            or not isinstance(st["rank"], int)
            or not 0 <= st["rank"] < mesh[PIPELINE]
            or not isinstance(st["layers"], list)
            or not st["layers"]
            or not all(isinstance(x, str) for x in st["layers"])
        ):
            fail(f"pipeline.stages[{s}] should be {{'rank': 0..{mesh[PIPELINE] - 1}, 'layers': "
                 f"[layer names, at least one]}}, got {st!r}")
        twice = seen & set(st["layers"])
        if twice:
            fail(f"pipeline.stages[{s}]: layer(s) {sorted(twice)} are in more than one stage")
        seen |= set(st["layers"])


def _check_sharding(placements: Any, n_axes: int, where: str, fail) -> None:
    """One placement per mesh axis; an op's non-tensor input or output has [] instead."""
    if where.startswith("ops[") and placements == []:
        return
    if not isinstance(placements, list) or len(placements) != n_axes:
        fail(
            f"{where} should be a list of {n_axes} placement(s), one per mesh axis, got {placements!r}"
        )
    for p in placements:
        if not isinstance(p, str) or not PLACEMENT_RE.match(p):
            fail(f"{where} has unknown placement {p!r}: {PLACEMENT_HELP}")


# -- the order of a plan's JSON ------------------------------------------------------------------


def natural_key(name: str) -> tuple:
    """Sort key that orders `blocks.2` before `blocks.10`."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name))


def natural_sorted(d: dict) -> list[str]:
    return sorted(d, key=natural_key)


def _natural_items(d: dict) -> list[tuple[str, Any]]:
    return [(k, d[k]) for k in natural_sorted(d)]


def sorted_deep(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: sorted_deep(x[k]) for k in sorted(x, key=str)}
    if isinstance(x, (list, tuple)):
        return [sorted_deep(v) for v in x]
    return x
