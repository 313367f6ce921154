"""What the planner knows about the machines: one device kind, how many, and the links between them.

A `Cluster` is plain, validated data: a `DeviceSpec` (memory, peak FLOP/s per dtype, memory
bandwidth), a node shape (`devices_per_node` x `nodes`) and two `Link`s (inside a node, between
nodes) for the alpha-beta collective model in `autopar.planning.cost`. Presets for common nodes are JSON
files in `autopar/data/devices/`, one per device kind, each citing where every figure comes from.

>>> c = Cluster.preset("h100-80g", nodes=2)
>>> c.world_size
16
>>> [link is c.intra_node for link in c.axis_links((2, 8))]
[False, True]
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch

from autopar.errors import ClusterSpecError

PRESETS = ("a100-40g", "a100-80g", "h100-80g", "h200-141g", "cpu")
DEVICE_TYPES = ("cuda", "cpu")
# Keys a cluster file may carry for people, not for the planner; from_dict drops them.
_DOC_KEYS = ("sources", "notes")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name of a dtype: `torch.bfloat16`, "torch.bfloat16", "bf16" -> "bfloat16"."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_ALIASES.get(name, name)


# ---- field checks: each returns the normalised value or raises naming `path` ----

def _fail(path: str, problem: str, fix: str) -> ClusterSpecError:
    return ClusterSpecError(f"{path} {problem}; {fix}")


def _number(value: Any, path: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"must be a number, got {type(value).__name__} {value!r}",
                    "write it as a plain number, e.g. 1.5e12")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise _fail(path, f"must be {bound}, got {value!r}", "give a finite positive figure")
    return float(value)


def _count(value: Any, path: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"must be an integer, got {type(value).__name__} {value!r}",
                    "write a whole number")
    if value <= 0:
        raise _fail(path, f"must be > 0, got {value!r}", "give a positive whole number")
    return value


def _text(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"must be a non-empty string, got {value!r}", "give a name")
    return value


def _flops_table(value: Any, path: str) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        raise _fail(path, f"must be a non-empty mapping of dtype name to FLOP/s, got {value!r}",
                    'e.g. {"bfloat16": 9.89e14, "float32": 6.7e13}')
    table = {}
    for key, flops in value.items():
        if not isinstance(key, str) or not isinstance(getattr(torch, key, None), torch.dtype):
            raise _fail(f"{path}.{key}", "is not a torch dtype name",
                        "use names like float32, bfloat16, float16")
        table[key] = _number(flops, f"{path}.{key}")
    return table


def _device_type(value: Any, path: str) -> str:
    if value not in DEVICE_TYPES:
        raise _fail(path, f"must be one of {DEVICE_TYPES}, got {value!r}",
                    'use "cuda" for NVIDIA GPUs (NCCL) or "cpu" (gloo)')
    return value


def _check_fields(obj: Any, checks: dict[str, Any], path: str) -> None:
    """Validate and normalise the fields of a frozen dataclass in place."""
    for name, check in checks.items():
        object.__setattr__(obj, name, check(getattr(obj, name), f"{path}{name}"))


def _build(cls, data: Any, path: str):
    """Construct `cls` from a dict, naming `path` (e.g. "device.") in every error."""
    where = path.rstrip(".") or "the cluster"
    if not isinstance(data, dict):
        raise _fail(where, f"must be a mapping, got {type(data).__name__}", "write a JSON object")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names) - (set(_DOC_KEYS) if not path else set()))
    if unknown:
        raise _fail(f"{path}{unknown[0]}", "is not a known field",
                    f"{where} takes exactly {names}")
    required = [f.name for f in fields(cls)
                if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise _fail(f"{path}{missing[0]}", "is missing", f"{where} needs all of {required}")
    values = {n: data[n] for n in names if n in data}
    for name, sub in cls._nested.items():
        if values.get(name) is not None:
            values[name] = _build(sub, data[name], f"{path}{name}.")
    for name, check in cls._checks.items():
        if name in values:
            values[name] = check(values[name], f"{path}{name}")
    return cls(**values)


def _fraction(value: Any, path: str) -> float:
    v = _number(value, path)
    if v > 1.0:
        raise _fail(path, f"is {v}, a fraction of the peak must be in (0, 1]",
                    "re-run benchmarks/calibrate_device.py --fit")
    return v


def _fractions(value: Any, path: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _fail(path, "must be a mapping of names to numbers", "write a JSON object")
    return {str(k): _fraction(v, f"{path}.{k}") for k, v in value.items()}


def _seconds_table(value: Any, path: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _fail(path, "must be a mapping of names to seconds", "write a JSON object")
    return {str(k): _number(v, f"{path}.{k}") for k, v in value.items()}


# the shape-aware price of scaled-dot-product attention (autopar.planning.cost.attention_time_s):
# the tiles the kernel pads sequences and head dims to, and per part (forward, backward) the
# efficiency on the kernel's FLOPs it tends to, the key length and head dim at which it reaches
# half of that, and the factors a causal mask and dropout multiply its time by
ATTENTION_SHAPE_KEYS = ("tile", "head_dim_tile")
ATTENTION_PART_KEYS = ("efficiency", "seq_half", "head_dim_half", "causal", "dropout")
ATTENTION_KEYS = ATTENTION_SHAPE_KEYS + tuple(
    f"{part}_{key}" for part in ("forward", "backward") for key in ATTENTION_PART_KEYS)


def _attention_curve(value: Any, path: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _fail(path, "must be a mapping of names to numbers", "write a JSON object")
    if not value:
        return {}
    missing = [k for k in ATTENTION_KEYS if k not in value]
    unknown = sorted(set(value) - set(ATTENTION_KEYS))
    if missing or unknown:
        raise _fail(f"{path}.{(missing or unknown)[0]}", "is missing" if missing else
                    "is not a known field", f"{path} takes exactly {list(ATTENTION_KEYS)} "
                    "(benchmarks/attention_times.py --write-device writes it)")
    curve = {}
    for k, v in value.items():
        check = _fraction if k.endswith("_efficiency") else (
            lambda x, p: _number(x, p, allow_zero=True))
        curve[k] = check(v, f"{path}.{k}")
    for k in ATTENTION_SHAPE_KEYS + tuple(k for k in ATTENTION_KEYS if k.endswith(
            ("_causal", "_dropout"))):
        if curve[k] <= 0:
            raise _fail(f"{path}.{k}", f"is {curve[k]}, must be > 0", "re-run the fit")
    return curve


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """What the device really does, measured there (benchmarks/calibrate_device.py): the
    fraction of the roofline its ops reach, and the host's time to issue them. Absent, the
    cost model assumes datasheet peaks and a free host."""

    matmul: float = 1.0  # fraction of the peak FLOP/s that FLOP-bound ops reach
    memory: float = 1.0  # fraction of the memory bandwidth that byte-bound ops reach
    kernel_s: float = 0.0  # the least time of any op (forward + backward): launch and latency
    ops: dict[str, float] = field(default_factory=dict)  # op -> fraction of its own roofline
    host_s_per_op: dict[str, float] = field(default_factory=dict)  # runtime -> host s per op
    # what torch's pipeline schedule costs beyond a stage's ops, per stage and microbatch
    # (forward + backward: its Python, the sends and receives, the stage's own autograd calls)
    pipeline_stage_s: float = 0.0
    # scaled-dot-product attention's price by shape (ATTENTION_KEYS); empty: `ops` prices it
    attention: dict[str, float] = field(default_factory=dict)
    source: str = ""

    _checks: ClassVar[dict] = {"matmul": _fraction, "memory": _fraction,
                               "attention": _attention_curve,
                               "kernel_s": lambda v, p: _number(v, p, allow_zero=True),
                               "pipeline_stage_s": lambda v, p: _number(v, p, allow_zero=True),
                               "ops": _fractions, "host_s_per_op": _seconds_table,
                               "source": lambda v, p: str(v)}
    _nested: ClassVar[dict] = {}

    def __post_init__(self):
        _check_fields(self, self._checks, "DeviceSpec.calibration.")

    def to_dict(self) -> dict:
        return {"matmul": self.matmul, "memory": self.memory, "kernel_s": self.kernel_s,
                "ops": dict(self.ops), "host_s_per_op": dict(self.host_s_per_op),
                "pipeline_stage_s": self.pipeline_stage_s,
                **({"attention": dict(self.attention)} if self.attention else {}),
                "source": self.source}


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator (or one CPU process) as the cost model sees it."""

    name: str  # as torch.cuda.get_device_name reports it, or a free label
    memory_bytes: int  # memory one device can hold
    peak_flops: dict[str, float]  # dense FLOP/s per dtype name ("float32", "bfloat16", "float16")
    hbm_bandwidth_bytes_per_s: float  # device memory bandwidth
    calibration: Calibration | None = None  # measured efficiencies and host time, if any

    _checks: ClassVar[dict] = {"name": _text, "memory_bytes": _count, "peak_flops": _flops_table,
               "hbm_bandwidth_bytes_per_s": _number}
    _nested: ClassVar[dict] = {"calibration": Calibration}

    def __post_init__(self):
        _check_fields(self, self._checks, "DeviceSpec.")
        if isinstance(self.calibration, dict):
            object.__setattr__(self, "calibration",
                               _build(Calibration, self.calibration, "device.calibration."))

    def __hash__(self):
        cal = json.dumps(self.calibration.to_dict(), sort_keys=True) if self.calibration else ""
        return hash((self.name, self.memory_bytes, tuple(sorted(self.peak_flops.items())),
                     self.hbm_bandwidth_bytes_per_s, cal))

    def peak_flops_for(self, dtype: torch.dtype | str) -> float:
        """Peak dense FLOP/s for `dtype` (a torch.dtype or its name)."""
        name = dtype_name(dtype)
        if name not in self.peak_flops:
            raise _fail(f"device.peak_flops.{name}", f"is not given for device {self.name!r}",
                        f"add it to the cluster file or compute in one of {sorted(self.peak_flops)}")
        return self.peak_flops[name]


@dataclass(frozen=True, kw_only=True)
class Link:
    """A collective link as the alpha-beta model sees it (see autopar.planning.cost.collective_time_s)."""

    bandwidth_bytes_per_s: float  # per-device unidirectional bus bandwidth for collectives (beta^-1)
    latency_s: float  # alpha: fixed time per ring step; 0 allowed (ideal link)

    _checks: ClassVar[dict] = {"bandwidth_bytes_per_s": _number,
               "latency_s": lambda v, p: _number(v, p, allow_zero=True)}
    _nested: ClassVar[dict] = {}

    def __post_init__(self):
        _check_fields(self, self._checks, "Link.")


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """`nodes` nodes of `devices_per_node` identical devices; ranks numbered node by node."""

    name: str
    device: DeviceSpec
    devices_per_node: int
    nodes: int
    intra_node: Link  # between devices of one node (NVLink)
    inter_node: Link  # between nodes (InfiniBand), per device
    device_type: str  # torch device type: "cuda" (NCCL) or "cpu" (gloo)

    _checks: ClassVar[dict] = {"name": _text, "devices_per_node": _count, "nodes": _count,
               "device_type": _device_type}
    _nested: ClassVar[dict] = {"device": DeviceSpec, "intra_node": Link, "inter_node": Link}

    def __post_init__(self):
        _check_fields(self, self._checks, "")
        for name, cls in self._nested.items():
            if not isinstance(getattr(self, name), cls):
                raise _fail(name, f"must be a {cls.__name__}, got {getattr(self, name)!r}",
                            f"build it with autopar.cluster.{cls.__name__}(...)")

    @property
    def world_size(self) -> int:
        """Number of devices: `nodes * devices_per_node`."""
        return self.devices_per_node * self.nodes

    def peak_flops(self, dtype: torch.dtype | str) -> float:
        """Peak dense FLOP/s of one device for `dtype` (a torch.dtype or its name)."""
        return self.device.peak_flops_for(dtype)

    def axis_links(self, mesh_shape: tuple[int, ...]) -> tuple[Link, ...]:
        """The link each mesh axis communicates over, ranks laid out row-major over `mesh_shape`.

        An axis of stride s (product of the later axes) and size n groups ranks r, r+s, ...,
        r+(n-1)s. Those groups all stay inside one node iff s*n divides devices_per_node; such an
        axis gets `intra_node`, any other `inter_node`. A size-1 axis never communicates and gets
        `intra_node`.
        """
        shape = tuple(mesh_shape)
        if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
            raise ClusterSpecError(f"mesh shape {mesh_shape!r} must be a non-empty tuple of "
                                   "positive integers, e.g. (2, 8)")
        if math.prod(shape) != self.world_size:
            raise ClusterSpecError(
                f"mesh shape {shape} holds {math.prod(shape)} devices but cluster {self.name!r} "
                f"has world_size {self.world_size} ({self.nodes} nodes x {self.devices_per_node}); "
                "pick a mesh whose sizes multiply to the world size")
        links = []
        for axis, size in enumerate(shape):
            span = math.prod(shape[axis + 1:]) * size
            inside = size == 1 or self.devices_per_node % span == 0
            links.append(self.intra_node if inside else self.inter_node)
        return tuple(links)

    # ---- construction ----

    @classmethod
    def preset(cls, name: str, *, nodes: int = 1, devices_per_node: int | None = None) -> Cluster:
        """A known node type (`PRESETS`), `nodes` of them; figures from autopar/data/devices."""
        key = name.lower()
        if key not in PRESETS:
            raise ClusterSpecError(f"unknown cluster preset {name!r}; use one of {PRESETS} or "
                                   "Cluster.from_file(path) for your own")
        text = resources.files("autopar").joinpath(f"data/devices/{key}.json").read_text()
        data = json.loads(text)
        data["nodes"] = nodes
        if devices_per_node is not None:
            data["devices_per_node"] = devices_per_node
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, d: dict) -> Cluster:
        """Build from `to_dict()`'s format (a "sources"/"notes" key is allowed and dropped)."""
        return _build(cls, d, "")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Cluster:
        """Load a JSON cluster file (the format of `to_dict()` and of the preset files)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ClusterSpecError(f"cannot read cluster file {path}: {e}; give a readable JSON "
                                   "file like autopar/data/devices/h100-80g.json") from None
        try:
            return cls.from_dict(data)
        except ClusterSpecError as e:
            raise ClusterSpecError(f"cluster file {path}: {e}") from None

    def to_dict(self) -> dict:
        """Plain JSON-able dict; `Cluster.from_dict(c.to_dict()) == c`."""
        device = self.device
        return {
            "name": self.name,
            "device": {"name": device.name, "memory_bytes": device.memory_bytes,
                       "peak_flops": dict(device.peak_flops),
                       "hbm_bandwidth_bytes_per_s": device.hbm_bandwidth_bytes_per_s,
                       **({"calibration": device.calibration.to_dict()}
                          if device.calibration else {})},
            "devices_per_node": self.devices_per_node,
            "nodes": self.nodes,
            "intra_node": _link_dict(self.intra_node),
            "inter_node": _link_dict(self.inter_node),
            "device_type": self.device_type,
        }

    @classmethod
    def detect(cls) -> Cluster:
        """The cluster this process runs in (under torchrun or an initialised process group).

        World size from torch.distributed if initialised, else WORLD_SIZE (default 1); devices per
        node from LOCAL_WORLD_SIZE (default: the visible GPUs, or the whole world size on CPU);
        nodes = world size / devices per node, checked against torchrun's GROUP_WORLD_SIZE (the
        nodes that joined the rendezvous) and GROUP_RANK where torchrun set them (see
        `_node_count`: a job whose nodes run different numbers of processes is an error). With
        CUDA, the preset matching the device name and memory, else a generic spec (with a
        warning); else the "cpu" preset.
        """
        world = _env_int("WORLD_SIZE", 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        guess = world  # without LOCAL_WORLD_SIZE: one node, or one process per visible GPU
        if torch.cuda.is_available():
            visible = min(world, max(torch.cuda.device_count(), 1))
            guess = visible if world % visible == 0 else world
        local = _env_int("LOCAL_WORLD_SIZE", guess)
        nodes = _node_count(world, local)
        if not torch.cuda.is_available():
            return cls.preset("cpu", nodes=nodes, devices_per_node=local)
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return _cuda_cluster(props.name, props.total_memory, nodes, local)


def _node_count(world: int, local: int) -> int:
    """Nodes of a job of `world` processes, `local` of them on this node.

    torchrun, with any rendezvous (c10d, etcd, static), gives every worker GROUP_WORLD_SIZE (the
    nodes, i.e. torchrun agents, that joined), GROUP_RANK (this node's index among them), RANK,
    LOCAL_RANK and LOCAL_WORLD_SIZE (this node's --nproc-per-node), and numbers ranks node after
    node: a node's first rank is the sum of the LOCAL_WORLD_SIZEs of the nodes before it
    (torch.distributed.elastic.agent.server.api.SimpleElasticAgent._assign_worker_ranks).

    A Cluster is `nodes` x `devices_per_node` with ranks numbered node by node, and the cost
    model prices a mesh axis by whether its groups of ranks stay inside a node. So when torchrun
    says how many nodes there are, it must agree with world / local, and this node's first rank
    must be GROUP_RANK x local; otherwise the nodes run different numbers of processes (an
    elastic job can: --nproc-per-node is each node's own), and this raises rather than plan for
    a topology that is not there: one cluster shape cannot describe such a job, and no mesh
    could keep its axes inside nodes of different sizes. Only this node's counts are known here
    (a collective would hang a caller that runs detect() on one rank only), so a node whose own
    count happens to fit may pass, but every node cannot: some node of an uneven job raises.
    Without GROUP_WORLD_SIZE (not torchrun), nodes = world / local, which must divide.
    """
    groups = _env_int("GROUP_WORLD_SIZE", None)
    if groups is not None and groups * local != world:
        raise ClusterSpecError(
            f"this node runs LOCAL_WORLD_SIZE={local} processes but the job has {world} on "
            f"GROUP_WORLD_SIZE={groups} nodes: its nodes run different numbers of processes, "
            "which autopar cannot describe (a Cluster is nodes of equal size); launch every node "
            "with the same torchrun --nproc-per-node")
    if local > world or world % local:
        raise ClusterSpecError(
            f"LOCAL_WORLD_SIZE={local} does not divide the world size {world}; launch with "
            "torchrun --nproc-per-node N so every node runs the same number of processes")
    nodes = world // local
    group_rank, rank, local_rank = (_env_index(v) for v in ("GROUP_RANK", "RANK", "LOCAL_RANK"))
    known = None not in (groups, group_rank, rank, local_rank)
    if known and rank - local_rank != group_rank * local:
        raise ClusterSpecError(
            f"this node (GROUP_RANK={group_rank}, LOCAL_WORLD_SIZE={local}) starts at rank "
            f"{rank - local_rank}, not {group_rank * local}: the nodes before it run different "
            "numbers of processes, which autopar cannot describe (a Cluster is nodes of equal "
            "size, ranks numbered node by node); launch every node with the same torchrun "
            "--nproc-per-node")
    return nodes


def _link_dict(link: Link) -> dict:
    return {"bandwidth_bytes_per_s": link.bandwidth_bytes_per_s, "latency_s": link.latency_s}


def _env_int(var: str, default: int | None) -> int | None:
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        return _count(int(raw), var)
    except ValueError:
        raise ClusterSpecError(f"environment variable {var}={raw!r} must be a positive integer; "
                               "launch with torchrun, which sets it") from None


def _env_index(var: str) -> int | None:
    """A rank-like environment variable (0 or more), or None where it is unset."""
    raw = os.environ.get(var)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ClusterSpecError(f"environment variable {var}={raw!r} must be a whole number >= 0; "
                               "launch with torchrun, which sets it")
    return value


def _cuda_cluster(device_name: str, total_memory: int, nodes: int, local: int) -> Cluster:
    """The preset whose model (A100/H100/H200) is in `device_name`, nearest in memory."""
    model = next((m for m in ("A100", "H100", "H200") if m in device_name.upper()), None)
    if model is not None:
        candidates = [Cluster.preset(p, nodes=nodes, devices_per_node=local)
                      for p in PRESETS if p.startswith(model.lower())]
        return min(candidates, key=lambda c: abs(c.device.memory_bytes - total_memory))
    base = Cluster.preset("a100-40g", nodes=nodes, devices_per_node=local)
    warnings.warn(f"autopar has no figures for GPU {device_name!r}; using A100-40GB compute and "
                  f"link figures with the reported {total_memory / 2**30:.1f} GiB. Write a cluster "
                  "file (see autopar/data/devices/*.json) and use Cluster.from_file for real "
                  "figures.", stacklevel=3)
    device = DeviceSpec(name=device_name, memory_bytes=total_memory,
                        peak_flops=dict(base.device.peak_flops),
                        hbm_bandwidth_bytes_per_s=base.device.hbm_bandwidth_bytes_per_s)
    return Cluster(name=f"generic-{device_name}", device=device, devices_per_node=local,
                   nodes=nodes, intra_node=base.intra_node, inter_node=base.inter_node,
                   device_type="cuda")


__all__ = ["PRESETS", "Cluster", "DeviceSpec", "Link", "dtype_name"]
