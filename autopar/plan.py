"""`autopar.Plan`: the planner's answer as plain data, to and from JSON.

A plan names everything by string: mesh axes by name, parameters by FQN, user inputs by name and
graph nodes by node name, never by index, so a plan stays readable and survives reordering. A
placement is written as a short string per mesh axis:

    "R"        Replicate()
    "S(d)"     Shard(d)            d >= 0, the tensor dim split over that axis
    "P(sum)"   Partial("sum")      each rank holds a partial sum
    "P(avg)"   Partial("avg")

Schema version 2 adds pipeline parallelism, the data-parallel flavour and checkpointing (all
optional; a version 1 file loads as a plan without them):

    pipeline        None without a "pp" mesh axis, else
                    {"schedule": name in autopar.schedules.SCHEDULES, "stages_per_rank": v,
                     "microbatch_size": int, "num_microbatches": int,
                     "stages": [{"rank": r, "layers": [layer names]}, ...]}
                    stages in pipeline order; every layer of `layers.layer_order` in exactly one
                    stage, contiguously. The traced graph is of ONE microbatch (batch dim 0 =
                    microbatch_size), and so are `inputs` and `ops`.
    data_parallel   "replicate" | "zero2" | "zero3" | "hsdp": gradient all-reduce over "dp", or
                    FSDP2-style sharding of parameters (and their gradients and optimizer state)
                    over "dp" without / with reshard after forward. ZeRO plans show S(d) on the
                    dp axis of the sharded parameters. "hsdp" (hybrid sharding) has a 2-D data-
                    parallel mesh, "dp_replicate" x "dp": sharded as ZeRO-3 over "dp" (ranks of
                    one node), replicated over "dp_replicate" (across nodes).
    checkpoint      layer name -> "full" (absent: none).

A "pp" mesh axis is always the first; placement lists have one entry per axis OTHER than "pp".

`Plan.to_json()` is deterministic: the same plan gives byte-identical text whatever order its
dicts were built in (mesh axes keep their order, which means something; every other mapping is
sorted, names with numbers in natural order so `blocks.2` comes before `blocks.10`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from autopar.errors import PlanMismatchError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
DATA_PARALLEL = ("replicate", "zero2", "zero3", "hsdp")
PP = "pp"

_PLACEMENT_RE = re.compile(r"^(?:R|S\((\d+)\)|P\((sum|avg)\))$")
_PLACEMENT_HELP = 'expected "R", "S(<dim>)", "P(sum)" or "P(avg)"'


# -- placements -----------------------------------------------------------------------------------


def placement_to_str(p: Any) -> str:
    """Write a DTensor placement as a plan string: Shard(1) -> "S(1)", Replicate() -> "R".

    >>> from torch.distributed.tensor import Shard
    >>> placement_to_str(Shard(1))
    'S(1)'
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    # Exact types: subclasses (_StridedShard, MaskPartial) carry state a string would drop.
    if type(p) is Replicate:
        return "R"
    if type(p) is Shard:
        if p.dim < 0:
            raise ValueError(f"Shard({p.dim}) has a negative dim; normalise it before planning")
        return f"S({p.dim})"
    if type(p) is Partial:
        op = str(p.reduce_op)
        if op not in ("sum", "avg"):
            raise ValueError(f"Partial({op!r}) cannot be written in a plan: only sum and avg")
        return f"P({op})"
    raise ValueError(f"cannot write placement {p!r} in a plan: only Replicate, Shard and Partial")


def placement_from_str(s: str) -> Any:
    """Read a plan string back into a DTensor placement: "S(0)" -> Shard(0), "P(sum)" -> Partial().

    >>> placement_from_str("P(avg)")
    Partial(avg)
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    m = _PLACEMENT_RE.match(s) if isinstance(s, str) else None
    if m is None:
        raise ValueError(f"unknown placement {s!r}: {_PLACEMENT_HELP}")
    if s == "R":
        return Replicate()
    if m.group(1) is not None:
        return Shard(int(m.group(1)))
    return Partial(m.group(2))


# -- the plan -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class OpSharding:
    """The strategy chosen for one graph node."""

    inputs: list[list[str]]  # per input, one placement string per mesh axis ([] if not a tensor)
    outputs: list[list[str]]  # per output, likewise
    rule: str = ""  # where the strategy came from (the op rule's name), for explanations

    def to_dict(self) -> dict:
        return {
            "inputs": [list(p) for p in self.inputs],
            "outputs": [list(p) for p in self.outputs],
            "rule": self.rule,
        }


@dataclass(kw_only=True)
class Plan:
    """How to run one model on one cluster: mesh, placements, predictions. Plain data.

    Build it with `autopar.plan(...)`; `save`/`load` it as JSON; `summary()` prints it.
    """

    schema_version: int
    model: str  # model class name, for messages
    graph_fingerprint: str  # sha256 hex of the traced graph's structure
    cluster: dict  # Cluster.to_dict()
    mesh: dict[str, int]  # ordered axis name -> size, e.g. {"dp": 2, "tp": 2}
    parameters: dict[str, list[str]]  # parameter FQN -> placement per mesh axis
    inputs: dict[str, list[str]]  # user input name -> placement per mesh axis
    ops: dict[str, OpSharding]  # graph node name -> chosen strategy
    predicted: dict[str, float]  # step_time_s, compute_s, communication_s, peak_memory_bytes, ...
    solver: dict  # name, status, gap, objective_s, solve_time_s
    pipeline: dict | None = None  # see the module docstring; None without a "pp" axis
    data_parallel: str = "replicate"  # "replicate", "zero2", "zero3" or "hsdp"
    checkpoint: dict[str, str] = field(default_factory=dict)  # layer name -> "full"
    # what made the plan: {"torch": version}; a runtime of another torch checks the ops the plan
    # lets DTensor shard (its rules differ between releases)
    made_with: dict[str, str] = field(default_factory=dict)
    source_path: str | None = field(
        default=None, compare=False, repr=False
    )  # set by load(); not saved

    def __post_init__(self) -> None:
        raw = {key: getattr(self, key) for key in (*_FIELDS, *_OPTIONAL)}
        raw["ops"] = (
            {k: _op_to_dict(v) for k, v in self.ops.items()}
            if isinstance(self.ops, dict)
            else self.ops
        )
        _validate(raw, where=f"Plan for {self.model}")
        self.predicted = {k: float(v) for k, v in self.predicted.items()}

    @property
    def world_size(self) -> int:
        """Number of devices the plan runs on: the product of the mesh axis sizes."""
        return math.prod(self.mesh.values())

    @property
    def sharding_mesh(self) -> dict[str, int]:
        """The mesh without its "pp" axis: what placement lists index."""
        return {a: n for a, n in self.mesh.items() if a != PP}

    # -- dict / JSON --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain dict, keys in a fixed order (see module docstring), ready for json.dumps."""
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "graph_fingerprint": self.graph_fingerprint,
            "cluster": _sorted_deep(self.cluster),
            "mesh": dict(self.mesh),
            "parameters": {k: list(self.parameters[k]) for k in _natural_sorted(self.parameters)},
            "inputs": {k: list(self.inputs[k]) for k in _natural_sorted(self.inputs)},
            "ops": {k: _op_to_dict(self.ops[k]) for k in _natural_sorted(self.ops)},
            "predicted": {k: float(self.predicted[k]) for k in sorted(self.predicted)},
            "solver": _sorted_deep(self.solver),
            "pipeline": _pipeline_to_dict(self.pipeline),
            "data_parallel": self.data_parallel,
            "checkpoint": {k: self.checkpoint[k] for k in _natural_sorted(self.checkpoint)},
            "made_with": {k: self.made_with[k] for k in sorted(self.made_with)},
        }

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "plan") -> Plan:
        """Build a Plan from `to_dict()` output; a bad field raises ValueError naming it."""
        _validate(d, where=where)
        return cls(
            schema_version=d["schema_version"],
            model=d["model"],
            graph_fingerprint=d["graph_fingerprint"],
            cluster=dict(d["cluster"]),
            mesh=dict(d["mesh"]),
            parameters={k: list(v) for k, v in d["parameters"].items()},
            inputs={k: list(v) for k, v in d["inputs"].items()},
            ops={
                k: OpSharding(
                    inputs=[list(p) for p in v["inputs"]],
                    outputs=[list(p) for p in v["outputs"]],
                    rule=v.get("rule", ""),
                )
                for k, v in d["ops"].items()
            },
            predicted={k: float(v) for k, v in d["predicted"].items()},
            solver=dict(d["solver"]),
            pipeline=_pipeline_to_dict(d.get("pipeline")),
            data_parallel=d.get("data_parallel", "replicate"),
            checkpoint=dict(d.get("checkpoint") or {}),
            made_with=dict(d.get("made_with") or {}),
        )

    def to_json(self) -> str:
        """Deterministic JSON text: indent 2, fixed key order, floats by repr, trailing newline."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON to `path`."""
        text = self.to_json()
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by `save`; errors name the file and what is wrong with it."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no plan file at {path}: make one with autopar.plan(...).save({path!r}) "
                "or `autopar plan`"
            ) from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                "was it written by Plan.save?"
            ) from None
        plan = cls.from_dict(d, where=path)
        plan.source_path = path
        return plan

    # -- checks -------------------------------------------------------------------------------

    def check_matches(self, *, graph_fingerprint: str, world_size: int) -> None:
        """Raise PlanMismatchError unless this plan was made for this graph and world size."""
        name = os.path.basename(self.source_path) if self.source_path else "this plan"
        if graph_fingerprint != self.graph_fingerprint:
            raise PlanMismatchError(
                f"{name} was made for model {self.model} with graph fingerprint "
                f"{_short(self.graph_fingerprint)}, this model traces to "
                f"{_short(graph_fingerprint)}: the model, its example input shapes or the "
                "autopar version changed; re-plan with autopar.plan(...)"
            )
        if world_size != self.world_size:
            raise PlanMismatchError(
                f"{name} is for {self.world_size} devices (mesh {_mesh_str(self.mesh)}), "
                f"this job has {world_size}: launch {self.world_size} processes, or re-plan for "
                f"{world_size} devices with autopar.plan(...)"
            )

    # -- display ------------------------------------------------------------------------------

    def summary(self) -> str:
        """A readable table: model, mesh, cluster, predictions, solver, then parameter placements.

        Repeated layers whose parameters have the same placements fold into one row, e.g.
        `blocks.{0..11}.attn.qkv.weight`.
        """
        lines = [
            f"plan for {self.model} (schema {self.schema_version}, graph {_short(self.graph_fingerprint)})"
        ]
        lines.append(f"  mesh       {_mesh_str(self.mesh)} = {self.world_size} devices")
        lines.append(f"  cluster    {_cluster_str(self.cluster)}")
        lines.append(f"  predicted  {_predicted_str(self.predicted)}")
        lines.append(f"  solver     {_solver_str(self.solver)}")
        if self.pipeline:
            p = self.pipeline
            lines.append(
                f"  pipeline   {p['schedule']}, {p['num_microbatches']} microbatches of "
                f"{p['microbatch_size']}, {len(p['stages'])} stages ({p['stages_per_rank']} per rank)"
            )
            for s, st in enumerate(p["stages"]):
                lines.append(f"    stage {s} on pp rank {st['rank']}: {_layers_str(st['layers'])}")
        lines.append(f"  data par.  {self.data_parallel}")
        if self.made_with:
            lines.append("  made with  " + ", ".join(f"{k} {v}" for k, v in
                                                    sorted(self.made_with.items())))
        if self.checkpoint:
            lines.append(f"  checkpoint {_layers_str(sorted(self.checkpoint, key=_natural_key))} "
                         f"({', '.join(sorted(set(self.checkpoint.values())))})")
        rows = _collapse(
            [(_split_fqn(fqn), tuple(p)) for fqn, p in _natural_items(self.parameters)]
        )
        header = ("parameter", *self.sharding_mesh.keys())
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


# -- validation -----------------------------------------------------------------------------------

_FIELDS = {
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


def _validate(d: Any, *, where: str) -> None:
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
    missing = [k for k in _FIELDS if k not in d]
    if missing:
        fail(f"missing field(s) {', '.join(missing)}: not a complete autopar plan")
    for key, typ in _FIELDS.items():
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
    if PP in mesh and list(mesh)[0] != PP:
        fail(f"mesh {mesh}: the 'pp' axis must come first (outermost)")
    n_axes = len(mesh) - (PP in mesh)
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


_OP_KEYS = {"inputs", "outputs", "rule"}

_OPTIONAL = ("pipeline", "data_parallel", "checkpoint", "made_with")
_PIPELINE_KEYS = ("schedule", "stages_per_rank", "microbatch_size", "num_microbatches", "stages")


def _pipeline_to_dict(p: Any) -> Any:
    if not isinstance(p, dict):
        return p
    out = {k: p[k] for k in _PIPELINE_KEYS if k in p}
    if isinstance(out.get("stages"), list):
        out["stages"] = [
            {"rank": st["rank"], "layers": list(st["layers"])} if isinstance(st, dict) else st
            for st in out["stages"]
        ]
    return out


def _validate_pipeline(d: dict, mesh: dict, fail) -> None:
    """pipeline / data_parallel / checkpoint: types, and a pipeline exactly when there is pp."""
    dp = d.get("data_parallel", "replicate")
    if dp not in DATA_PARALLEL:
        fail(f"data_parallel is {dp!r}; use one of {DATA_PARALLEL}")
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
    p = d.get("pipeline")
    if p is None:
        if PP in mesh and mesh[PP] > 1:
            fail(f"mesh {mesh} has a 'pp' axis but the plan has no pipeline section")
        return
    if not isinstance(p, dict) or set(p) != set(_PIPELINE_KEYS):
        fail(f"pipeline should be an object with keys {list(_PIPELINE_KEYS)}, got {p!r}")
    if PP not in mesh:
        fail(f"the plan has a pipeline but its mesh {mesh} has no 'pp' axis")
    for key in ("stages_per_rank", "microbatch_size", "num_microbatches"):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < 1:
            fail(f"pipeline.{key} should be an int >= 1, got {p[key]!r}")
    if not isinstance(p["schedule"], str):
        fail(f"pipeline.schedule should be a schedule name, got {p['schedule']!r}")
    stages = p["stages"]
    if not isinstance(stages, list) or len(stages) != mesh[PP] * p["stages_per_rank"]:
        fail(
            f"pipeline.stages should list pp x stages_per_rank = "
            f"{mesh[PP] * p['stages_per_rank']} stages, got {stages!r}"
        )
    seen: set[str] = set()
    for s, st in enumerate(stages):
        if (
            not isinstance(st, dict)
            or set(st) != {"rank", "layers"}
            or not isinstance(st["rank"], int)
            or not 0 <= st["rank"] < mesh[PP]
            or not isinstance(st["layers"], list)
            or not st["layers"]
            or not all(isinstance(x, str) for x in st["layers"])
        ):
            fail(f"pipeline.stages[{s}] should be {{'rank': 0..{mesh[PP] - 1}, 'layers': "
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
        if not isinstance(p, str) or not _PLACEMENT_RE.match(p):
            fail(f"{where} has unknown placement {p!r}: {_PLACEMENT_HELP}")


# -- helpers --------------------------------------------------------------------------------------


def _op_to_dict(op: OpSharding | dict) -> dict:
    if isinstance(op, OpSharding):
        return op.to_dict()
    return op  # left for _validate to reject with a message


def _layers_str(layers: list[str]) -> str:
    """['pre', 'blocks.0', 'blocks.1', 'blocks.2'] -> 'pre, blocks.{0..2}'."""
    rows = _collapse([(_split_fqn(x), ()) for x in layers])
    return ", ".join(_join_fqn(parts) for parts, _ in rows)


def _natural_key(name: str) -> tuple:
    """Sort key that orders `blocks.2` before `blocks.10`."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name))


def _natural_sorted(d: dict) -> list[str]:
    return sorted(d, key=_natural_key)


def _natural_items(d: dict) -> list[tuple[str, Any]]:
    return [(k, d[k]) for k in _natural_sorted(d)]


def _sorted_deep(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _sorted_deep(x[k]) for k in sorted(x, key=str)}
    if isinstance(x, (list, tuple)):
        return [_sorted_deep(v) for v in x]
    return x


def _short(fingerprint: str) -> str:
    return fingerprint[:12] + "..." if len(fingerprint) > 12 else fingerprint


def _mesh_str(mesh: dict[str, int]) -> str:
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
