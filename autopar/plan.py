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
    precision       what the plan assumed (`autopar.TrainingPrecision.to_dict()`): the dtype
                    the graph computes in ("compute_dtype") and the bytes a parameter element of
                    parameters, gradients and optimizer state; absent in older files: fp32.
    fallback_ops    ATen op -> how many of its nodes run whole on every rank (all "R") because
                    no sharding rule covers them: neither DTensor's, nor autopar's own, nor one
                    registered with `autopar.register_rule`. Left out when there are none (and
                    absent from files written before it existed).

A "pp" mesh axis is always the first; placement lists have one entry per axis OTHER than "pp".

`Plan.to_json()` is deterministic: the same plan gives byte-identical text whatever order its
dicts were built in (mesh axes keep their order, which means something; every other mapping is
sorted, names with numbers in natural order so `blocks.2` comes before `blocks.10`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from autopar.errors import PlanMismatchError
from autopar.files import write_atomically
from autopar.parallelism import PIPELINE, REPLICATE
from autopar.plan_schema import (
    FIELDS,
    OPTIONAL,
    PIPELINE_KEYS,
    PLACEMENT_HELP,
    PLACEMENT_RE,
    SCHEMA_VERSION,
    natural_sorted,
    sorted_deep,
    validate_plan,
)
from autopar.plan_summary import mesh_text, short_fingerprint, summary

__all__ = ["SCHEMA_VERSION", "OpSharding", "Plan", "placement_from_str", "placement_to_str"]


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

    m = PLACEMENT_RE.match(s) if isinstance(s, str) else None
    if m is None:
        raise ValueError(f"unknown placement {s!r}: {PLACEMENT_HELP}")
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
    data_parallel: str = REPLICATE  # a name in autopar.parallelism.FLAVOURS
    checkpoint: dict[str, str] = field(default_factory=dict)  # layer name -> "full"
    # what made the plan: {"torch": version}; a runtime of another torch checks the ops the plan
    # lets DTensor shard (its rules differ between releases)
    made_with: dict[str, str] = field(default_factory=dict)
    # ATen op -> number of its nodes replicated for want of a sharding rule (see the docstring)
    fallback_ops: dict[str, int] = field(default_factory=dict)
    # TrainingPrecision.to_dict() of what the plan assumed: compute dtype and bytes a parameter
    # (empty in files written before plans said it: fp32)
    precision: dict = field(default_factory=dict)
    source_path: str | None = field(
        default=None, compare=False, repr=False
    )  # set by load(); not saved

    def __post_init__(self) -> None:
        raw = {key: getattr(self, key) for key in (*FIELDS, *OPTIONAL)}
        raw["ops"] = (
            {k: _op_to_dict(v) for k, v in self.ops.items()}
            if isinstance(self.ops, dict)
            else self.ops
        )
        validate_plan(raw, where=f"Plan for {self.model}")
        self.predicted = {k: float(v) for k, v in self.predicted.items()}

    @property
    def world_size(self) -> int:
        """Number of devices the plan runs on: the product of the mesh axis sizes."""
        return math.prod(self.mesh.values())

    @property
    def sharding_mesh(self) -> dict[str, int]:
        """The mesh without its "pp" axis: what placement lists index."""
        return {a: n for a, n in self.mesh.items() if a != PIPELINE}

    # -- dict / JSON --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain dict, keys in a fixed order (see module docstring), ready for json.dumps."""
        d = {
            "schema_version": self.schema_version,
            "model": self.model,
            "graph_fingerprint": self.graph_fingerprint,
            "cluster": sorted_deep(self.cluster),
            "mesh": dict(self.mesh),
            "parameters": {k: list(self.parameters[k]) for k in natural_sorted(self.parameters)},
            "inputs": {k: list(self.inputs[k]) for k in natural_sorted(self.inputs)},
            "ops": {k: _op_to_dict(self.ops[k]) for k in natural_sorted(self.ops)},
            "predicted": {k: float(self.predicted[k]) for k in sorted(self.predicted)},
            "solver": sorted_deep(self.solver),
            "pipeline": _pipeline_to_dict(self.pipeline),
            "data_parallel": self.data_parallel,
            "checkpoint": {k: self.checkpoint[k] for k in natural_sorted(self.checkpoint)},
            "made_with": {k: self.made_with[k] for k in sorted(self.made_with)},
            "precision": {k: self.precision[k] for k in sorted(self.precision)},
        }
        if self.fallback_ops:  # left out when empty: plans without fallbacks read as before
            d["fallback_ops"] = {k: self.fallback_ops[k] for k in sorted(self.fallback_ops)}
        return d

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "plan") -> Plan:
        """Build a Plan from `to_dict()` output; a bad field raises ValueError naming it."""
        validate_plan(d, where=where)
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
            data_parallel=d.get("data_parallel", REPLICATE),
            checkpoint=dict(d.get("checkpoint") or {}),
            made_with=dict(d.get("made_with") or {}),
            fallback_ops=dict(d.get("fallback_ops") or {}),
            precision=dict(d.get("precision") or {}),
        )

    def to_json(self) -> str:
        """Deterministic JSON text: indent 2, fixed key order, floats by repr, trailing newline."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON to `path`, atomically: a file beside it is written whole and
        then renamed over `path`, so an interrupted save leaves the old file (or none), never a
        truncated plan."""
        text = self.to_json().encode("utf-8")
        write_atomically(path, lambda f: f.write(text))

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
                f"{short_fingerprint(self.graph_fingerprint)}, this model traces to "
                f"{short_fingerprint(graph_fingerprint)}: the model, its example input shapes or the "
                "autopar version changed; re-plan with autopar.plan(...)"
            )
        if world_size != self.world_size:
            raise PlanMismatchError(
                f"{name} is for {self.world_size} devices (mesh {mesh_text(self.mesh)}), "
                f"this job has {world_size}: launch {self.world_size} processes, or re-plan for "
                f"{world_size} devices with autopar.plan(...)"
            )

    # -- display ------------------------------------------------------------------------------

    def summary(self) -> str:
        """A readable table: model, mesh, cluster, predictions, solver, then parameter placements.

        Repeated layers whose parameters have the same placements fold into one row, e.g.
        `blocks.{0..11}.attn.qkv.weight`.
        """
        return summary(self)


def _pipeline_to_dict(p: Any) -> Any:
    if not isinstance(p, dict):
        return p
    out = {k: p[k] for k in PIPELINE_KEYS if k in p}
    if isinstance(out.get("stages"), list):
        out["stages"] = [
            {"rank": st["rank"], "layers": list(st["layers"])} if isinstance(st, dict) else st
            for st in out["stages"]
        ]
    return out


def _op_to_dict(op: OpSharding | dict) -> dict:
    if isinstance(op, OpSharding):
        return op.to_dict()
    return op  # left for _validate to reject with a message
