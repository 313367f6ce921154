"""autopar's plan against FSDP2, torchtitan-style TP + FSDP2 and hand pipelines, measured (issue 4).

One torchrun launch measures, for each model and the job's GPU count (the world size), every
system on the same machine in the same run:

    autopar         `autopar.plan` for this cluster (Cluster.detect()), then
                    `autopar.autoparallelize(..., plan=plan)`; bf16 parameters and gradients,
                    AdamW on fp32 master copies of the local shards (`MasterAdamW`)
    eager           one GPU only: the plain model in bf16 with the same MasterAdamW, so the gap
                    to `autopar` is the cost of autopar's runtime (op-by-op on DTensors)
    fsdp2           torch's `fully_shard` on every block and on the root (ZeRO-3),
                    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), fused AdamW
    tpT-fsdp2       torchtitan style: `parallelize_module` (Megatron column/row splits of
                    attention and MLP, vocabulary-split embedding and head with loss_parallel)
                    on a tp axis of T ranks inside the node, FSDP2 over the dp axis
    ppP-fsdp2       pipeline parallel by hand (torch.distributed.pipelining, 1F1B), equal runs
                    of blocks per stage, FSDP2 over dp; run only where memory forces it (every
                    other baseline of the model ran out of memory) unless --force-pp

Each baseline kind runs without and with activation checkpointing of every block (`-ac`;
--ac) and with gradient accumulation over N microbatches where asked (`-gaN`; --accum); a
concrete name (`eager-ac-ga4`, `tp4-fsdp2`, `pp2-fsdp2-ac`) runs just that configuration.
For each: tokens/s, MFU (model FLOPs 6 N_matmul + 12 L d T per token over --peak-tflops,
989 TFLOP/s = H200 bf16 dense datasheet; also against the bf16 matmul rate measured at the
start), peak memory (max over ranks of torch.cuda.max_memory_allocated), the median step time
(CUDA events after warm-up; random token batches rotated) and autopar's prediction of that
step (`plan.predicted["step_time_s"]` for autopar, `autopar.manual_plan` of the same
configuration for the baselines). A system that fails (out of memory, error) gets a row with
the error text and the run goes on; the first and last losses of every system are recorded
(same weights, same batches: the first agrees across systems to bf16 rounding).

    torchrun --standalone --nproc_per_node 8 benchmarks/multigpu.py --json $OUT/multigpu.json
    torchrun --standalone --nproc_per_node 2 benchmarks/multigpu.py --device cpu --tiny \
        --json /tmp/multigpu.json            # every system end to end on CPU (gloo)

Planning runs on rank 0 before each model's measurements: `autopar.plan` on the real model (a
plan is fingerprinted against the graph traced from the model it runs, and a meta-device trace
differs), the baselines' `manual_plan`s on meta models in --plan-workers processes meanwhile;
nothing else runs while a system is timed. The JSON is rewritten after every row, so a run
stopped by a time limit keeps what it measured; --time-budget-s skips the systems that would
start after that many seconds (a row says so), --max-timing-s shortens each system's timing.
A rank that fails inside a step while the others wait in a collective stalls the job until
--collective-timeout-s; the rows written so far stay. autopar runs with its default runtime
("replay": each layer traced once, then replayed); --runtime eager runs it op by op.

--profile SYSTEM runs torch.profiler over --profile-steps more steps of those systems: top ops
by host and device time (--profile-out), and on GPUs the step's kernel time by category beside
what the cost model charges (benchmarks/step_breakdown.py; its table ends the profile file, and
`python benchmarks/step_breakdown.py RESULTS.json` prints it again from the JSON).

--memory-peak SYSTEM runs one more step of those systems under the CUDA allocator's history and
lists what is alive at its peak by the op that allocated it (a replayed graph's line names its
ATen op), and what the build and the first step left alive between steps: the table that found
the planning leak and the over-counted ZeRO-2 copies of 2026-11-29
(docs/benchmarks/2026-11-29-multigpu-x2-llama/). Plans predicted near the device's memory are
best run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, for every system alike.

Single-GPU run of 2026-11-29 (docs/benchmarks/2026-11-29-single-h200/):

    torchrun --standalone --nproc_per_node 1 benchmarks/multigpu.py --models gpt-1.3b gpt-2.7b \
        --systems autopar eager fsdp2 --ac none --max-timing-s 20 --profile autopar eager \
        --profile-out $OUT/profile.txt --json $OUT/singlegpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass, field
from datetime import timedelta

# NVLink multicast must stay off on the shared multi-GPU hosts (docs: GPU.md); every process
# this script starts inherits these.
for _var, _val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                   ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_var] = _val

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import autopar  # noqa: E402
from autopar.models.gpt import GPT, GPTConfig  # noqa: E402
from autopar.models.llama import Llama, LlamaConfig, apply_rope  # noqa: E402
from autopar.planning.profile import TrainingPrecision  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import step_breakdown  # noqa: E402

H200_BF16_PEAK_TFLOPS = 989.0  # datasheet, dense (autopar/data/devices/h200-141g.json)
LR, WEIGHT_DECAY = 1e-4, 0.1

# ---- models ---------------------------------------------------------------------------------

# GPT-3 paper (Brown et al. 2020, table 2.1) shapes, GPT-2 vocabulary padded to 50304 (nanoGPT);
# Llama 3 8B (Meta's params.json: 32 layers, 4096 wide, 32 heads, 8 kv heads, SwiGLU 14336,
# vocabulary 128256, rope theta 500000).
MODELS = {
    "gpt-1.3b": ("gpt", dict(vocab_size=50304, n_layer=24, n_head=16, d_model=2048)),
    "gpt-2.7b": ("gpt", dict(vocab_size=50304, n_layer=32, n_head=32, d_model=2560)),
    "gpt-6.7b": ("gpt", dict(vocab_size=50304, n_layer=32, n_head=32, d_model=4096)),
    "llama-8b": ("llama", dict(vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8,
                               d_model=4096, ffn_hidden=14336, rope_theta=500000.0)),
}
# --tiny: the same families and code paths, sizes a CPU runs in seconds
TINY = {
    "gpt-1.3b": ("gpt", dict(vocab_size=256, n_layer=2, n_head=4, d_model=64)),
    "gpt-2.7b": ("gpt", dict(vocab_size=256, n_layer=4, n_head=4, d_model=64)),
    "gpt-6.7b": ("gpt", dict(vocab_size=256, n_layer=2, n_head=8, d_model=128)),
    "llama-8b": ("llama", dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                               ffn_hidden=172)),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "gpt" or "llama"
    config: dict  # GPTConfig / LlamaConfig fields, seq_len included

    def make_config(self):
        return (GPTConfig if self.family == "gpt" else LlamaConfig)(**self.config)

    def build(self, device, dtype=torch.float32) -> nn.Module:
        """The model with seed-0 weights made on `device` (identical for every system):
        GPT-2's initialisation, N(0, 0.02) for every matmul and embedding weight, zero biases
        (the model classes keep torch's defaults, whose tied N(0, 1) embedding starts GPT at
        a loss far above log(vocab))."""
        torch.manual_seed(0)
        with torch.device(device):
            model = (GPT if self.family == "gpt" else Llama)(self.make_config())
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
        return model.to(dtype)

    @property
    def heads(self) -> int:
        return self.config["n_head"]

    @property
    def kv_heads(self) -> int:
        return self.config.get("n_kv_head", self.config["n_head"])


def model_spec(name: str, tiny: bool, seq_len: int) -> ModelSpec:
    family, cfg = (TINY if tiny else MODELS)[name]
    return ModelSpec(name, family, dict(cfg, seq_len=seq_len))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the logits as they come (bf16 under bf16), as autopar's
    CLI computes it."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def lm_loss_fp32(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The same with the logits upcast first, as torchtitan computes it (--fp32-loss)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


LOSS = {"model": lm_loss, "fp32": lm_loss_fp32}


def model_flops_per_token(spec: ModelSpec) -> float:
    """6 x (weights that take part in a matmul, the output head included, embedding lookups
    not) + 12 L d T for attention scores and values (PaLM, Chowdhery et al. 2022, app. B;
    causal masking not discounted)."""
    with torch.device("meta"):
        model = (GPT if spec.family == "gpt" else Llama)(spec.make_config())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    c = spec.config
    return 6.0 * matmul + 12.0 * c["n_layer"] * c["d_model"] * c["seq_len"]


def parameter_count(spec: ModelSpec) -> int:
    with torch.device("meta"):
        model = (GPT if spec.family == "gpt" else Llama)(spec.make_config())
    return sum(p.numel() for p in model.parameters())  # tied weights once


# ---- systems --------------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # autopar | eager | fsdp2 | tp | pp
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ac: bool = False
    microbatches: int = 1  # pp: the schedule's; eager, fsdp2, tp: gradient accumulation
    forced: bool = False  # pp named explicitly: run even where a baseline fits

    def config(self) -> dict:
        out = {"kind": self.kind, "tp": self.tp, "pp": self.pp, "dp": self.dp,
               "activation_checkpointing": self.ac, "microbatches": self.microbatches}
        if self.kind == "pp":
            out["schedule"] = "1F1B"
        return out


KINDS = ("autopar", "eager", "fsdp2", "tp", "pp")
# a concrete system: eager, fsdp2, tpT-fsdp2 or ppP-fsdp2, then -ac, then -gaN
_NAME = re.compile(r"^(eager|fsdp2|tp(\d+)-fsdp2|pp(\d+)-fsdp2)(-ac)?(-ga(\d+))?$")


def check_system_token(token: str) -> str | None:
    """None if `token` names a kind or a concrete system, else what is wrong."""
    if token in KINDS:
        return None
    m = _NAME.match(token)
    if not m:
        return (f"{token!r} is neither a kind ({', '.join(KINDS)}) nor a system name such as "
                "eager-ac, fsdp2-ga4, tp4-fsdp2-ac, pp2-fsdp2")
    if m.group(3) and m.group(5):
        return f"{token!r}: a pipeline has its own microbatches (--pp-microbatches), no -ga"
    if m.group(6) and int(m.group(6)) < 1:
        return f"{token!r}: -gaN needs N >= 1"
    return None


def tp_sizes(spec: ModelSpec, local_world: int, wanted: list[int] | None) -> list[int]:
    """tp sizes > 1 inside one node that split heads, kv heads, vocabulary and widths evenly."""
    sizes = wanted or [t for t in range(2, local_world + 1) if local_world % t == 0]
    return [t for t in sizes if _tp_unfit(spec, local_world, t) is None]


def _tp_unfit(spec: ModelSpec, local_world: int, t: int) -> str | None:
    c = spec.config
    widths = {"d_model": c["d_model"], "vocab": c["vocab_size"],
              "ffn": c.get("ffn_hidden", 4 * c["d_model"]), "heads": spec.heads,
              "kv heads": spec.kv_heads}
    if t < 2 or local_world % t:
        return f"tp {t} must be > 1 and divide the {local_world} devices of a node"
    bad = [k for k, v in widths.items() if v % t]
    return f"tp {t} does not divide {', '.join(bad)}" if bad else None


def expand_systems(args, spec: ModelSpec, world: int, local_world: int, batch: int):
    """The systems to run for one model, in --systems order (hand pipelines last: whether
    they run depends on the others), and notes on what was left out and why."""
    acs = {"none": [False], "full": [True], "both": [False, True]}[args.ac]
    accums = args.accum
    out, notes, pipes = [], [], []

    def name(base, ac, ga):
        return base + ("-ac" if ac else "") + (f"-ga{ga}" if ga > 1 else "")

    def add(base, kind, ga, **kw):
        dp = kw.get("dp", 1)
        if batch % (dp * ga):
            notes.append(f"{spec.name}: {name(base, kw.get('ac', False), ga)} left out: batch "
                         f"{batch} does not split into dp {dp} x {ga} microbatches")
            return
        out.append(System(name(base, kw.get("ac", False), ga), kind, microbatches=ga, **kw))

    def add_pp(p, ac, forced):
        why = _pp_unfit(spec, world, p, batch, args.pp_microbatches)
        if isinstance(why, str):
            notes.append(f"{spec.name}: pp{p} left out: {why}")
            return
        pipes.append(System(name(f"pp{p}-fsdp2", ac, 1), "pp", pp=p, dp=world // p, ac=ac,
                            microbatches=why, forced=forced))

    for token in args.systems:
        m = _NAME.match(token)
        if token == "autopar":
            out.append(System("autopar", "autopar", dp=world))
        elif token == "eager" or (m and m.group(1) == "eager"):
            if world > 1:
                notes.append(f"{spec.name}: eager runs on one device only (world size {world})")
                continue
            for ac in (acs if token == "eager" else [bool(m.group(4))]):
                for ga in (accums if token == "eager" else [int(m.group(6) or 1)]):
                    add("eager", "eager", ga, ac=ac)
        elif token == "fsdp2" or (m and m.group(1) == "fsdp2"):
            for ac in (acs if token == "fsdp2" else [bool(m.group(4))]):
                for ga in (accums if token == "fsdp2" else [int(m.group(6) or 1)]):
                    add("fsdp2", "fsdp2", ga, dp=world, ac=ac)
        elif token == "tp" or (m and m.group(2)):
            sizes = tp_sizes(spec, local_world, args.tp_sizes) if token == "tp" \
                else [int(m.group(2))]
            if not sizes:
                notes.append(f"{spec.name}: no tensor-parallel configuration (world {world}, "
                             f"{local_world} per node, --tp-sizes {args.tp_sizes})")
            for t in sizes:
                why = _tp_unfit(spec, local_world, t)
                if why:
                    notes.append(f"{spec.name}: {token} left out: {why}")
                    continue
                for ac in (acs if token == "tp" else [bool(m.group(4))]):
                    for ga in (accums if token == "tp" else [int(m.group(6) or 1)]):
                        add(f"tp{t}-fsdp2", "tp", ga, tp=t, dp=world // t, ac=ac)
        elif token == "pp":
            if world == 1:
                notes.append(f"{spec.name}: no pipeline on one device")
            for p in args.pp_sizes or ([world] if world > 1 else []):
                for ac in acs:
                    add_pp(p, ac, args.force_pp)
        else:  # ppP-fsdp2[-ac], named: run whatever the others do
            add_pp(int(m.group(3)), bool(m.group(4)), True)
    seen, unique = set(), []
    for s in out + pipes:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    return unique, notes


def _pp_unfit(spec, world, pp, batch, microbatches):
    """The number of microbatches for pp, or why pp cannot run."""
    if pp < 2 or world % pp:
        return f"pp must be > 1 and divide the world size {world}"
    if spec.config["n_layer"] < pp:
        return f"{spec.config['n_layer']} blocks cannot fill {pp} stages"
    dp = world // pp
    if batch % dp:
        return f"batch {batch} does not split over dp {dp}"
    local = batch // dp
    if microbatches:
        if local % microbatches or microbatches < pp:
            return (f"--pp-microbatches {microbatches} must divide the {local} samples per dp "
                    f"rank and be >= pp {pp}")
        return microbatches
    fits = [m for m in range(pp, 2 * pp + 1) if local % m == 0]
    if not fits:
        return (f"{local} samples per dp rank split into no number of microbatches in "
                f"[{pp}, {2 * pp}]; give --pp-microbatches or another batch")
    return fits[-1]


# ---- predictions (rank 0; in worker processes when --plan-workers > 0) ------------------------


def predicted_breakdown(ctx: Ctx, spec: ModelSpec, plan_json: str, batch: int, seq: int
                        ) -> dict:
    """What the cost model charges one step of the plan, by category (step_breakdown): the
    graph of one dp rank's microbatch, traced on meta and priced on the plan's device."""
    from autopar.planning.profile import profile_graph
    from autopar.trace import trace

    plan = autopar.Plan.from_dict(json.loads(plan_json))
    why = step_breakdown.predictable(plan)
    if why:
        return {"error": why}
    _, micro = step_breakdown.microbatches(plan)
    x = torch.zeros((micro or batch) // plan.mesh.get("dp", 1), seq, dtype=torch.long,
                    device="meta")
    traced = trace(_meta_model(spec, ctx.dtype), (x,), loss_fn=ctx.loss, target=x.clone())
    gm = traced.graph_module
    profiles = profile_graph(gm, no_grad=set(traced.buffers) | set(traced.inputs))
    device = autopar.Cluster.from_dict(plan.cluster).device
    return step_breakdown.predicted(gm, profiles, plan, device)


def _meta_model(spec: ModelSpec, dtype):
    with torch.device("meta"):
        return (GPT if spec.family == "gpt" else Llama)(spec.make_config()).to(dtype)


def predict(task: dict, model: nn.Module | None = None, example=None) -> dict:
    """One planning task. Without "system": `autopar.plan` of `model` (a real model on the
    device it runs on, with a real global batch `example`: a plan is fingerprinted against
    the traced graph; a plan made from a meta model runs too, see --plan-file). With "system":
    `autopar.manual_plan` of that configuration on a meta model (a prediction only).
    Returns plain data (picklable, JSON-able)."""
    import logging
    logging.getLogger("torch.distributed.tensor._collective_utils").setLevel(logging.ERROR)
    spec = ModelSpec(**task["spec"])
    dtype = getattr(torch, task["dtype"])
    batch = task["batch"]
    cluster = autopar.Cluster.from_dict(task["cluster"])
    precision = (TrainingPrecision.mixed_bf16() if dtype != torch.float32
                 else TrainingPrecision.fp32())
    t0 = time.perf_counter()
    try:
        with _quiet_solver():
            if task["system"] is None:
                plan = autopar.plan(model, cluster, example, loss_fn=LOSS[task["loss"]],
                                    precision=precision, time_limit=task.get("time_limit"),
                                    memory_limit=task.get("memory_limit"),
                                    **task.get("plan_options", {}))
            else:
                model = _meta_model(spec, dtype)
                x = torch.zeros(batch, spec.config["seq_len"], dtype=torch.long, device="meta")
                s = System(**task["system"])
                dp = s.dp
                micro = batch // (dp * s.microbatches)
                plan = autopar.manual_plan(
                    model, cluster, (x, x.clone()), loss_fn=LOSS[task["loss"]], tp=s.tp,
                    pp=s.pp, dp=dp,
                    microbatch_size=micro, checkpoint="full" if s.ac else "none",
                    zero=3 if (s.kind != "eager" and dp > 1) else 0, precision=precision)
    except Exception as e:  # a prediction that fails must not stop the measurement
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                "planning_s": time.perf_counter() - t0}
    out = {"predicted": {k: float(v) for k, v in plan.predicted.items()},
           "planning_s": time.perf_counter() - t0}
    return _with_plan(out, plan) if task["system"] is None else out


def _with_plan(out: dict, plan) -> dict:
    """A prediction with the plan itself, for the autopar system to run."""
    return dict(out, plan_json=plan.to_json(), summary=plan.summary())


def _offline_prediction(path: str) -> dict:
    """predict()'s output for a plan made elsewhere (--plan-file): its own prediction, made
    for the cluster it was planned for."""
    plan = autopar.Plan.load(path)
    return _with_plan({"predicted": {k: float(v) for k, v in plan.predicted.items()},
                       "planning_s": None, "plan_file": path}, plan)


@contextlib.contextmanager
def _quiet_solver():
    """HiGHS prints its banner on file descriptor 1: send it to stderr, keep stdout a report."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def start_predictions(tasks: list[dict], workers: int):
    """manual_plan predictions in `workers` processes (spawned: no CUDA state is inherited);
    returns a function that waits for them. workers=0: computed when waited for."""
    if workers <= 0 or not tasks:
        return lambda: [predict(t) for t in tasks]
    import concurrent.futures as cf
    import multiprocessing as mp

    pool = cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("spawn"))
    futures = [pool.submit(predict, t) for t in tasks]

    def wait():
        try:
            return [f.result() for f in futures]
        finally:
            pool.shutdown()

    return wait


# ---- the mixed-precision optimizer of autopar and eager --------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class MasterAdamW:
    """AdamW on fp32 master copies of bf16 parameters, mixed precision as in ZeRO (2 + 2 + 12
    bytes per parameter, what `TrainingPrecision.mixed_bf16` charges): the bf16 gradients
    are cast to fp32 a chunk of parameters at a time (CHUNK elements, fused AdamW per chunk),
    so no fp32 gradient copy of the whole model is ever held.

    Works on the local shards: a DTensor parameter's gradient has the parameter's placements
    (ParallelModel settles them so), so the element-wise AdamW update of each shard is the
    update of the whole tensor. fp32 parameters get plain AdamW."""

    CHUNK = 2**28  # fp32 gradient elements alive at once: 1 GiB

    def __init__(self, params, *, fused: bool):
        self.params = [p for p in params if p.requires_grad]
        with torch.no_grad():
            self.local = [_local(p) for p in self.params]
        self.low = any(p.dtype != torch.float32 for p in self.local)
        kw = {"fused": True} if fused else {"foreach": True}
        if not self.low:
            self.chunks = [list(range(len(self.params)))]
            self.opts = [torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY, **kw)]
            return
        self.master = [p.detach().float().clone() for p in self.local]
        self.chunks, size = [[]], 0
        for i, m in enumerate(self.master):
            if self.chunks[-1] and size + m.numel() > self.CHUNK:
                self.chunks.append([])
                size = 0
            self.chunks[-1].append(i)
            size += m.numel()
        self.opts = [torch.optim.AdamW([self.master[i] for i in c], lr=LR,
                                       weight_decay=WEIGHT_DECAY, **kw) for c in self.chunks]

    @torch.no_grad()
    def step(self):
        if not self.low:
            self.opts[0].step()
            return
        for chunk, opt in zip(self.chunks, self.opts):
            for i in chunk:
                g = self.params[i].grad
                self.master[i].grad = None if g is None else _local(g).float()
            opt.step()
            for i in chunk:
                self.master[i].grad = None
            torch._foreach_copy_([self.local[i] for i in chunk], [self.master[i] for i in chunk])

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def optimizer_step(opt) -> None:
    """`opt.step()`, under the range a profile counts as the optimizer (step_breakdown.py)."""
    with torch.profiler.record_function(step_breakdown.OPTIMIZER_RANGE):
        opt.step()


# ---- distributed context ------------------------------------------------------------------------


@dataclass
class Ctx:
    device: torch.device
    rank: int
    world: int
    local_world: int
    cpu_group: object  # gloo group for objects and decisions
    dtype: torch.dtype
    args: argparse.Namespace
    meshes: dict = field(default_factory=dict)

    @property
    def loss(self):
        return LOSS["fp32" if self.args.fp32_loss else "model"]

    def mesh(self, shape: tuple[int, ...], names: tuple[str, ...]):
        """One DeviceMesh per shape (a new mesh makes new communicators)."""
        from torch.distributed.device_mesh import init_device_mesh

        key = (shape, names)
        if key not in self.meshes:
            self.meshes[key] = init_device_mesh(self.device.type, shape, mesh_dim_names=names)
        return self.meshes[key]

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def bcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def init_distributed(args) -> Ctx:
    if "RANK" not in os.environ:  # plain `python benchmarks/multigpu.py`: a job of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    timeout = timedelta(seconds=args.collective_timeout_s)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("multigpu.py: error: --device cuda but torch sees no GPU "
                             f"(torch {torch.__version__}); use --device cpu")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    # objects and decisions travel on their own gloo group, with room for rank 0's planning
    cpu_group = dist.new_group(backend="gloo",
                               timeout=max(timeout, timedelta(seconds=3600)))
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return Ctx(device=device, rank=dist.get_rank(), world=world, local_world=local_world,
               cpu_group=cpu_group, dtype=dtype, args=args)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- building each system -------------------------------------------------------------------
# Each builder returns (step, info): step(x, y) runs one training step on this rank's part of
# the global batch (x, y) and returns the loss tensor (or None on ranks that hold no loss);
# `slice_batch` says which part of the global batch a rank feeds.


class Built:
    def __init__(self, step, *, dp_rank: int, dp: int, info: dict | None = None, keep=()):
        self.step, self.dp_rank, self.dp = step, dp_rank, dp
        self.info = info or {}
        self.keep = list(keep)  # modules/optimizers to drop after the run

    def slice_batch(self, x, y):
        n = x.shape[0] // self.dp
        lo = self.dp_rank * n
        return x[lo:lo + n].contiguous(), y[lo:lo + n].contiguous()


def _fused(ctx: Ctx) -> bool:
    return ctx.device.type == "cuda"


def build_autopar(ctx: Ctx, spec: ModelSpec, system: System, plan_json: str, example) -> Built:
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    model = spec.build(ctx.device, torch.float32).to(ctx.dtype)
    pm = autopar.autoparallelize(model, autopar.Cluster.from_dict(plan.cluster),
                                 example_inputs=example, loss_fn=ctx.loss, plan=plan,
                                 runtime=ctx.args.runtime)
    del model
    opt = MasterAdamW(pm.parameters(), fused=_fused(ctx))

    def step(x, y):
        loss = pm.train_step(x, y)
        optimizer_step(opt)
        opt.zero_grad()
        return loss

    info = {"plan": _plan_brief(plan), "graph_ops": len(plan.ops), "runtime": ctx.args.runtime,
            "plan_memory_limit_bytes": (ctx.args.memory_limit_gib * 2**30
                                        if ctx.args.memory_limit_gib else None)}
    return Built(step, dp_rank=0, dp=1, info=info, keep=[pm, opt])  # train_step takes it all


def _plan_brief(plan) -> dict:
    pipe = plan.pipeline or {}
    return {"mesh": dict(plan.mesh), "data_parallel": plan.data_parallel,
            "schedule": pipe.get("schedule"), "microbatch_size": pipe.get("microbatch_size"),
            "num_microbatches": pipe.get("num_microbatches"),
            "checkpoint": _count_values(plan.checkpoint or {})}


def _count_values(d: dict) -> dict:
    out: dict = {}
    for v in d.values():
        out[v] = out.get(v, 0) + 1
    return out


def _blocks(model) -> nn.ModuleList:
    return model.blocks if isinstance(model, GPT) else model.layers


def _checkpoint_blocks(model) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def build_eager(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    if ctx.world != 1:
        raise ValueError("eager runs on a job of one process")
    model = spec.build(ctx.device, torch.float32).to(ctx.dtype)
    if system.ac:
        _checkpoint_blocks(model)
    opt = MasterAdamW(model.parameters(), fused=_fused(ctx))

    def fwd_bwd(x, y, scale):
        loss = ctx.loss(model(x), y)
        (loss * scale if scale != 1 else loss).backward()
        return loss.detach()

    return Built(_train_step(fwd_bwd, opt, system.microbatches), dp_rank=0, dp=1,
                 keep=[model, opt])


def _train_step(fwd_bwd, opt, microbatches: int):
    """One optimizer step over the batch in `microbatches` pieces (gradient accumulation;
    FSDP2 reduce-scatters after each, its default); returns the mean loss."""
    def step(x, y):
        if microbatches == 1:
            loss = fwd_bwd(x, y, 1.0)
        else:
            loss = torch.stack([fwd_bwd(a, b, 1.0 / microbatches) for a, b in
                                zip(x.chunk(microbatches), y.chunk(microbatches))]).mean()
        optimizer_step(opt)
        opt.zero_grad()
        return loss

    return step


def _mp_policy(ctx: Ctx):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if ctx.dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=ctx.dtype, reduce_dtype=torch.float32)


def _fully_shard(model, blocks, mesh, ctx: Ctx, *, reshard_after_forward=True) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=_mp_policy(ctx),
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=_mp_policy(ctx),
                reshard_after_forward=reshard_after_forward)


def _adamw(model, ctx):
    kw = {"fused": True} if _fused(ctx) else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **kw)


def build_fsdp2(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    mesh = ctx.mesh((ctx.world,), ("dp",))
    model = spec.build(ctx.device, torch.float32)  # fp32 shards; bf16 compute (MixedPrecision)
    if system.ac:
        _checkpoint_blocks(model)
    _fully_shard(model, _blocks(model), mesh, ctx)
    opt = _adamw(model, ctx)

    def fwd_bwd(x, y, scale):
        loss = ctx.loss(model(x), y)
        (loss * scale if scale != 1 else loss).backward()
        return loss.detach()

    return Built(_train_step(fwd_bwd, opt, system.microbatches), dp_rank=ctx.rank,
                 dp=ctx.world, keep=[model, opt])


# -- tensor parallel, torchtitan style: forwards that work with the local heads ---------------


def _gpt_attention_tp(self, x):
    """CausalSelfAttention.forward on a column-split qkv: each rank holds [q_r; k_r; v_r]
    (see _interleave_qkv), so its heads are n_head / tp; the same function as the model's."""
    B, T, C = x.shape
    head_dim = C // self.n_head
    q, k, v = self.qkv(x).chunk(3, dim=2)
    q = q.view(B, T, -1, head_dim).transpose(1, 2)
    k = k.view(B, T, -1, head_dim).transpose(1, 2)
    v = v.view(B, T, -1, head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).reshape(B, T, -1))


def _llama_attention_tp(self, x, cos, sin):
    """llama.Attention.forward with the local number of heads."""
    B, T, C = x.shape
    q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
    k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
    v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    repeat = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(repeat, dim=1)
    v = v.repeat_interleave(repeat, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.wo(y.transpose(1, 2).reshape(B, T, -1))


@torch.no_grad()
def _interleave_qkv(linear: nn.Linear, tp: int) -> None:
    """Reorder the fused qkv rows [q; k; v] to [q_0; k_0; v_0; q_1; ...] so that a column
    split into tp pieces gives each rank whole heads of q, k and v."""
    def order(t):
        q, k, v = t.chunk(3, dim=0)
        parts = [torch.cat([a, b, c], dim=0)
                 for a, b, c in zip(q.chunk(tp), k.chunk(tp), v.chunk(tp))]
        return torch.cat(parts, dim=0)

    linear.weight.copy_(order(linear.weight))
    if linear.bias is not None:
        linear.bias.copy_(order(linear.bias))


def _parallelize_tp(model, tp_mesh, tp: int) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    col, row = ColwiseParallel(), RowwiseParallel()
    if isinstance(model, GPT):
        for block in model.blocks:
            _interleave_qkv(block.attn.qkv, tp)
            block.attn.forward = types.MethodType(_gpt_attention_tp, block.attn)
            parallelize_module(block, tp_mesh, {"attn.qkv": col, "attn.proj": row,
                                                "mlp.fc": col, "mlp.proj": row})
        top = {"wte": RowwiseParallel(input_layouts=Replicate()),
               "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    else:
        for block in model.layers:
            block.attention.forward = types.MethodType(_llama_attention_tp, block.attention)
            parallelize_module(block, tp_mesh, {
                "attention.wq": col, "attention.wk": col, "attention.wv": col,
                "attention.wo": row, "feed_forward.w1": col, "feed_forward.w3": col,
                "feed_forward.w2": row})
        top = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
               "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    parallelize_module(model, tp_mesh, top)
    if isinstance(model, GPT):
        # both halves of the tied weight are split over the vocabulary (Shard(0)): tie again
        model.lm_head.weight = model.wte.weight


def build_tp(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = ctx.mesh((system.dp, system.tp), ("dp", "tp"))
    model = spec.build(ctx.device, torch.float32)
    _parallelize_tp(model, mesh["tp"], system.tp)
    if system.ac:
        _checkpoint_blocks(model)
    _fully_shard(model, _blocks(model), mesh["dp"], ctx)
    opt = _adamw(model, ctx)

    def fwd_bwd(x, y, scale):
        with loss_parallel():
            loss = ctx.loss(model(x), y)
            (loss * scale if scale != 1 else loss).backward()
        return loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()

    return Built(_train_step(fwd_bwd, opt, system.microbatches),
                 dp_rank=mesh.get_local_rank("dp"), dp=system.dp, keep=[model, opt])


# -- pipeline parallel by hand ----------------------------------------------------------------


class _Stage(nn.Module):
    """Blocks [lo, hi) of a GPT or Llama; the first stage embeds, the last one ends in logits.
    A GPT's tied head is a copy on the last stage whose gradient is summed with the
    embedding's after each step (Megatron-LM's embedding group)."""

    def __init__(self, model, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.gpt = isinstance(model, GPT)
        self.first, self.last = first, last
        self.blocks = nn.ModuleList(list(_blocks(model))[lo:hi])
        if self.gpt:
            if first:
                self.wte, self.wpe = model.wte, model.wpe
            if last:
                self.ln_f = model.ln_f
                head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False,
                                 device=model.wte.weight.device)
                with torch.no_grad():
                    head.weight.copy_(model.wte.weight)
                self.lm_head = model.lm_head if first else head
        else:
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)
            if first:
                self.tok_embeddings = model.tok_embeddings
            if last:
                self.norm, self.output = model.norm, model.output

    def forward(self, x):
        if self.first:
            if self.gpt:
                pos = torch.arange(x.shape[1], device=x.device)
                x = self.wte(x) + self.wpe(pos)
            else:
                x = self.tok_embeddings(x)
        if self.gpt:
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x)) if self.last else x
        T = x.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.output(self.norm(x)) if self.last else x


def build_pp(ctx: Ctx, spec: ModelSpec, system: System) -> Built:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    pp, dp = system.pp, system.dp
    mesh = ctx.mesh((pp, dp), ("pp", "dp"))
    pp_rank, dp_rank = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    model = spec.build(ctx.device, torch.float32)
    if system.ac:
        _checkpoint_blocks(model)
    n = spec.config["n_layer"]
    cuts = [round(i * n / pp) for i in range(pp + 1)]
    first, last = pp_rank == 0, pp_rank == pp - 1
    stage_mod = _Stage(model, cuts[pp_rank], cuts[pp_rank + 1], first, last)
    del model
    # torchtitan: no reshard after forward under a pipeline (each microbatch would regather)
    _fully_shard(stage_mod, stage_mod.blocks, mesh["dp"], ctx, reshard_after_forward=False)
    stage = PipelineStage(stage_mod, pp_rank, pp, ctx.device, group=mesh.get_group("pp"))
    sched = Schedule1F1B(stage, n_microbatches=system.microbatches, loss_fn=ctx.loss)
    opt = _adamw(stage_mod, ctx)
    tied = None
    if stage_mod.gpt:  # one group per dp coordinate: pp rank 0 and pp rank pp-1
        for d in range(dp):
            g = dist.new_group([d, (pp - 1) * dp + d])
            if d == dp_rank:
                tied = g
    tied_weight = (stage_mod.wte.weight if first else stage_mod.lm_head.weight
                   if last else None) if stage_mod.gpt else None

    def step(x, y):
        losses = [] if last else None
        if first:
            sched.step(x, target=y if last else None, losses=losses)
        elif last:
            sched.step(target=y, losses=losses)
        else:
            sched.step()
        if tied_weight is not None and tied_weight.grad is not None:
            dist.all_reduce(_local(tied_weight.grad), group=tied)
        optimizer_step(opt)
        opt.zero_grad()
        return torch.stack(losses).mean().detach() if losses else None

    info = {"stages": [[cuts[i], cuts[i + 1]] for i in range(pp)]}
    return Built(step, dp_rank=dp_rank, dp=dp, info=info, keep=[stage_mod, opt, sched, stage])


# ---- measuring ------------------------------------------------------------------------------


def make_batches(spec: ModelSpec, batch: int, count: int, device) -> list:
    """`count` global batches of random tokens (the same on every rank), targets the next
    token."""
    g = torch.Generator().manual_seed(1234)
    seq, vocab = spec.config["seq_len"], spec.config["vocab_size"]
    out = []
    for _ in range(count):
        tok = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((tok[:, :-1].contiguous().to(device), tok[:, 1:].contiguous().to(device)))
    return out


def time_steps(ctx: Ctx, step, batches, warmup: int, steps: int) -> dict:
    """Median step time after warm-up: CUDA events on GPUs, wall clock on CPU. Also the host
    time to issue each step (no synchronisation inside): near the step time when the CPU is
    what limits. With --max-timing-s, the timed steps are cut to fit it (every rank runs the
    slowest rank's count)."""
    first, last_warm = None, None
    for i in range(warmup):
        ctx.sync()
        t0 = time.perf_counter()
        loss = step(*batches[i % len(batches)])
        ctx.sync()
        last_warm = time.perf_counter() - t0
        if first is None:
            first = loss
    cap = ctx.args.max_timing_s
    if cap and last_warm:
        slowest = max(ctx.gather(last_warm))
        steps = max(min(ctx.args.min_steps, steps), min(steps, int(cap / slowest)))
    dist.barrier(group=ctx.cpu_group)
    times, host, last = [], [], None
    cuda = ctx.device.type == "cuda"
    events = []
    for i in range(steps):
        x, y = batches[(warmup + i) % len(batches)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        last = step(x, y)
        host.append(time.perf_counter() - t0)
        if cuda:
            end.record()
            events.append((start, end))
        else:
            times.append(time.perf_counter() - t0)
    ctx.sync()
    if cuda:
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    if first is None:
        first = last
    return {"times": times, "host": host,
            "first_loss": None if first is None else float(first.float().mean()),
            "last_loss": None if last is None else float(last.float().mean())}


def profile_steps(ctx: Ctx, step, batches, n: int, label: str) -> tuple[dict, str]:
    """torch.profiler over n steps: where the time goes (top ops by host and device time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda"
                                     else [])
    ctx.sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(n):
            step(*batches[i % len(batches)])
        ctx.sync()
    wall = (time.perf_counter() - t0) / n
    ka = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") \
        else "self_cuda_time_total"
    aten_calls = sum(e.count for e in ka if e.key.startswith("aten::"))
    kernels = sum(e.count for e in ka if (getattr(e, dev_attr, 0) or 0) > 0
                  and not e.key.startswith(("aten::", "cuda", "Memcpy", "Memset")))
    summary = {"profiled_wall_s_per_step": wall,
               "aten_calls_per_step": aten_calls / n,
               "kernel_launches_per_step": kernels / n}
    if ctx.device.type == "cuda":
        # kernel time by category, and the time the device is busy at all (step_breakdown)
        summary["device"] = step_breakdown.measured(prof, n)
        summary["device_busy_s_per_step"] = summary["device"]["busy_s"]
    sort_dev = dev_attr if ctx.device.type == "cuda" else "self_cpu_time_total"

    def top(key, rows=25):
        try:
            return ka.table(sort_by=key, row_limit=rows)
        except Exception as e:  # sort keys were renamed across torch releases
            return f"(no table sorted by {key}: {type(e).__name__}: {e})"

    busy = summary.get("device_busy_s_per_step")
    busy_text = f"device busy {busy * 1e3:.1f} ms per step, " if busy is not None else ""
    text = (f"==== {label}: {n} profiled steps, {wall * 1e3:.1f} ms wall per step, {busy_text}"
            f"{summary['aten_calls_per_step']:.0f} aten calls per step\n"
            f"-- by self CPU time\n{top('self_cpu_time_total')}\n"
            f"-- by self device time\n{top(sort_dev, 45)}\n")
    return summary, text


def memory_at_peak(ctx: Ctx, step, batch, label: str, top: int = 30) -> tuple[dict, str]:
    """One step under the CUDA allocator's history: what is alive at the step's peak, grouped
    by the op that allocated it. Tensors alive before the step (parameters, optimizer state)
    are `before_step_bytes`; the rest are grouped by the innermost line outside torch's own
    files: in a replayed graph that is the graph's generated code, whose line names the ATen
    op (fx registers it with linecache). Rank 0's figures."""
    import linecache
    import re

    ctx.sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=5_000_000)
    try:
        step(*batch)
        ctx.sync()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]
    live, total, peak, at_peak, gone_at_peak = {}, 0, 0, {}, 0
    gone = 0  # bytes of tensors made before the step and freed in it
    for e in events:  # replay allocations and frees up to the highest point
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_requested":
            if e["addr"] in live:
                total -= live.pop(e["addr"])["size"]
            else:
                gone += e["size"]
        if total - gone > peak:
            peak, at_peak, gone_at_peak = total - gone, dict(live), gone

    def where(frames) -> str:
        for f in frames:
            name = f["filename"]
            if "/torch/" in name or name.startswith("<frozen"):
                continue
            text = linecache.getline(name, f["line"]).strip()
            op = re.search(r"torch\.ops\.([\w.]+)", text)
            if op:
                return f"graph op {op.group(1)}"
            return f"{os.path.basename(name)}:{f['line']} {f['name']}: {text[:60]}"
        return "torch internals"

    def by_allocator(blocks) -> list[tuple[str, list[int]]]:
        """(where, [bytes, blocks]), most bytes first."""
        groups: dict[str, list[int]] = {}
        for b in blocks:
            g = groups.setdefault(where(b.get("frames", [])), [0, 0])
            g[0] += b["size"]
            g[1] += 1
        return sorted(groups.items(), key=lambda kv: -kv[1][0])

    ranked = by_allocator(at_peak.values())
    # alive after the step: the state made at build and in the first step (when watched)
    after_ranked = by_allocator(b for seg in snap["segments"] for b in seg["blocks"]
                                if b["state"] == "active_allocated")
    made = sum(e["size"] for e in at_peak.values())
    summary = {"before_step_bytes": before, "step_peak_bytes": before + peak,
               "alive_from_before_at_peak_bytes": before - gone_at_peak,
               "allocated_in_step_at_peak_bytes": made,
               "at_peak_by_op": {k: v[0] for k, v in ranked[:top]},
               "after_step_by_op": {k: v[0] for k, v in after_ranked[:top]}}
    lines = [f"==== {label}: memory at the step's peak (rank 0): "
             f"{(before + peak) / 2**30:.2f} GiB = {(before - gone_at_peak) / 2**30:.2f} GiB "
             f"made before the step (of {before / 2**30:.2f} GiB then) + {made / 2**30:.2f} GiB "
             "made in it",
             f"{'GiB':>8}  {'blocks':>6}  allocated by"]
    lines += [f"{b / 2**30:8.3f}  {n:6d}  {k}" for k, (b, n) in ranked[:top]]
    lines += ["-- alive after the step (allocations made while the system was built are named "
              "when --memory-peak watched its build)", f"{'GiB':>8}  {'blocks':>6}  allocated by"]
    lines += [f"{b / 2**30:8.3f}  {n:6d}  {k}" for k, (b, n) in after_ranked[:top]]
    return summary, "\n".join(lines) + "\n"


def measure_device(ctx: Ctx) -> dict:
    """bf16 8192^3 matmul on random data and a device-to-device copy, medians of CUDA-event
    timings after warm-up (GPU.md's ceilings, re-measured)."""
    if ctx.device.type != "cuda":
        return {}
    n = 8192
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)

    def med(fn, reps=20, warm=5):
        for _ in range(warm):
            fn()
        ev = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            ev.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in ev)

    t_mm = med(lambda: a @ b)
    src = torch.randn(2**29, device=ctx.device)  # 2 GiB fp32
    dst = torch.empty_like(src)
    t_cp = med(lambda: dst.copy_(src), reps=10, warm=3)
    out = {"bf16_matmul_8192_tflops": 2 * n**3 / t_mm / 1e12,
           "d2d_copy_tb_per_s": 2 * src.numel() * 4 / t_cp / 1e12}
    return out  # the caller's _cleanup frees the buffers


# ---- one model ------------------------------------------------------------------------------


def _error_text(e: BaseException) -> str:
    """The first line that says something, of the error or of what caused it (torch's
    pipelining wraps a backward's failure in a RuntimeError whose message starts with a
    newline); "OOM: ..." when any error of the chain ran out of memory."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        chain.append((e, f"{type(e).__name__}: {lines[0] if lines else ''}".strip()))
        e = e.__cause__ or e.__context__
    for exc, text in chain:
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
            return ("OOM: " + text)[:400]
    texts = [t for _, t in chain if not t.endswith(":")]
    return " <- ".join(texts or [chain[0][1]])[:400]


def _is_oom(row: dict) -> bool:
    return (row.get("error") or "").startswith("OOM")


def _cleanup(ctx: Ctx) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _plan_option(item: str) -> tuple[str, object]:
    """--plan-option KEY=VALUE: an integer value (microbatch_size=2) as an int, else the text."""
    key, value = item.split("=", 1)
    return key, int(value) if value.lstrip("-").isdigit() else value


def run_system(ctx: Ctx, spec: ModelSpec, system: System, batches, pred: dict, state) -> dict:
    """Build, warm up, time (and maybe profile) one system; a row for the JSON (rank 0's)."""
    args = ctx.args
    batch, seq = batches[0][0].shape
    row = {"model": spec.name, "gpus": ctx.world, "system": system.name,
           "tokens_per_s": None, "mfu": None, "peak_memory_bytes": None,
           "predicted_step_s": pred.get("predicted", {}).get("step_time_s"),
           "measured_step_s": None,
           "config": system.config(), "global_batch": batch, "seq_len": seq,
           "parameters": state["parameters"], "gc_disabled_while_timed": args.no_gc,
           "predicted_peak_memory_bytes": pred.get("predicted", {}).get("peak_memory_bytes"),
           "planning_s": pred.get("planning_s")}
    if pred.get("plan_file"):
        row["plan_file"] = pred["plan_file"]
    if "error" in pred:
        row["prediction_error"] = pred["error"]
    over = time.perf_counter() - state["t0"] > args.time_budget_s if args.time_budget_s else False
    if ctx.bcast(over):
        row["error"] = f"skipped: --time-budget-s {args.time_budget_s:g} s spent"
        return row
    built, failure = None, None
    t_build = time.perf_counter()
    watch = system.kind in args.memory_kinds and ctx.device.type == "cuda"
    if watch:  # who allocates what the system holds between steps (memory_at_peak's table)
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    try:
        if system.kind == "autopar":
            if "plan_json" not in pred:
                raise RuntimeError(f"no plan: {pred.get('error', 'planning failed')}")
            built = build_autopar(ctx, spec, system, pred["plan_json"], batches[0])
        else:
            built = {"eager": build_eager, "fsdp2": build_fsdp2, "tp": build_tp,
                     "pp": build_pp}[system.kind](ctx, spec, system)
    except Exception as e:
        failure = _error_text(e)
        if args.verbose:
            traceback.print_exc()
    build_s = time.perf_counter() - t_build
    failures = ctx.gather(failure)
    if any(failures):
        if watch:
            torch.cuda.memory._record_memory_history(enabled=None)
        row["error"] = "build: " + next(f for f in failures if f)
        del built
        _cleanup(ctx)
        return row
    _cleanup(ctx)  # drops the full models the builders made; peak memory counts from here
    mine = [built.slice_batch(x, y) for x, y in batches]
    result, failure, prof, mem = None, None, None, None
    try:
        if watch:  # and its first step: what the optimizer and the runtime make once
            built.step(*mine[0])
            ctx.sync()
            torch.cuda.memory._record_memory_history(enabled=None)
        if args.no_gc:
            gc.collect()
            gc.disable()
        result = time_steps(ctx, built.step, mine, args.warmup, args.steps)
        gc.enable()
        if system.kind in args.profile_kinds:
            prof = profile_steps(ctx, built.step, mine, args.profile_steps,
                                 f"{spec.name} {system.name} ({ctx.world} x {ctx.device.type})")
        if watch:
            mem = memory_at_peak(ctx, built.step, mine[0],
                                 f"{spec.name} {system.name} ({ctx.world} x cuda)")
    except Exception as e:
        failure = _error_text(e)
        if args.verbose:
            traceback.print_exc()
    gc.enable()
    if watch:  # off already, unless the first step failed
        torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated() if ctx.device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved() if ctx.device.type == "cuda" else None
    local = {"failure": failure, "peak": peak, "reserved": reserved,
             "median": statistics.median(result["times"]) if result else None,
             "host": statistics.median(result["host"]) if result else None,
             "result": result, "prof": prof, "mem": mem}
    every = ctx.gather(local)
    info = dict(built.info)
    del built, mine, result, prof, mem
    _cleanup(ctx)
    if any(r["failure"] for r in every):
        row["error"] = next(r["failure"] for r in every if r["failure"])
        return row
    step_s = max(r["median"] for r in every)  # the slowest rank sets the pace
    tokens = batch * seq
    flops = state["flops_per_token"] * tokens
    row.update(
        tokens_per_s=tokens / step_s,
        mfu=flops / (step_s * ctx.world * args.peak_tflops * 1e12),
        measured_step_s=step_s,
        peak_memory_bytes=max(r["peak"] for r in every) if peak is not None else None,
        peak_reserved_bytes=max(r["reserved"] for r in every) if reserved is not None else None,
        mean_step_s=statistics.fmean(t for r in every for t in r["result"]["times"]),
        step_times_s=[round(t, 6) for t in every[0]["result"]["times"]],
        timed_steps=len(every[0]["result"]["times"]),
        host_issue_s=max(r["host"] for r in every),
        build_s=build_s,
        model_flops_per_step=flops,
        first_loss=_mean_loss(every, "first_loss"),
        last_loss=_mean_loss(every, "last_loss"),
        **info,
    )
    if state.get("matmul_tflops"):
        row["mfu_vs_measured_matmul"] = flops / (step_s * ctx.world
                                                 * state["matmul_tflops"] * 1e12)
    if pred.get("predicted", {}).get("flops_per_step"):
        row["autopar_flops_per_step"] = pred["predicted"]["flops_per_step"]
    if row["predicted_step_s"]:
        row["predicted_over_measured"] = row["predicted_step_s"] / step_s
    if every[0]["prof"] is not None:
        row["profile"] = every[0]["prof"][0]
        state["profiles"].append(every[0]["prof"][1])
        if system.kind == "autopar" and "device" in row["profile"] and ctx.rank == 0:
            row["predicted_breakdown"] = predicted_breakdown(ctx, spec, pred["plan_json"],
                                                             batch, seq)
            state["profiles"].append(step_breakdown.compare(row) + "\n")
    if every[0]["mem"] is not None:
        row["memory_at_peak"] = every[0]["mem"][0]
        state["profiles"].append(every[0]["mem"][1])
    return row


def _mean_loss(every: list[dict], key: str) -> float | None:
    """The global batch's loss: ranks hold the loss of their dp part (FSDP), the same value
    per dp group (TP, autopar), or nothing (pipeline stages before the last); equal parts,
    so the mean over the ranks that hold one is the whole batch's."""
    vals = [r["result"][key] for r in every if r["result"][key] is not None]
    return statistics.fmean(vals) if vals else None


def run_model(ctx: Ctx, name: str, state) -> list[dict]:
    args = ctx.args
    seq = args.seq_len or (32 if args.tiny else 2048)
    spec = model_spec(name, args.tiny, seq)
    batch = args.global_batch or (4 if args.tiny else 8) * ctx.world
    systems, notes = expand_systems(args, spec, ctx.world, ctx.local_world, batch)
    state["notes"] += notes
    state["flops_per_token"] = model_flops_per_token(spec)
    state["parameters"] = parameter_count(spec)
    cluster = autopar.Cluster.detect()
    batches = make_batches(spec, batch, args.rotate, ctx.device)
    # predictions: rank 0 plans before anything is timed; the baselines' manual plans in
    # worker processes meanwhile
    preds = None
    if ctx.rank == 0:
        base = {"spec": asdict(spec), "dtype": str(ctx.dtype).removeprefix("torch."),
                "batch": batch, "cluster": cluster.to_dict(),
                "time_limit": args.plan_time_limit,
                "memory_limit": args.memory_limit_gib * 2**30 if args.memory_limit_gib else None,
                "loss": "fp32" if args.fp32_loss else "model",
                "plan_options": dict(_plan_option(o) for o in args.plan_option)}
        manual = [] if args.no_predict_baselines else \
            [s for s in systems if s.kind != "autopar"]
        t0 = time.perf_counter()
        wait = start_predictions([dict(base, system=asdict(s)) for s in manual],
                                 args.plan_workers)
        preds = {}
        if any(s.kind == "autopar" for s in systems) and spec.name in args.plan_files:
            preds["autopar"] = _offline_prediction(args.plan_files[spec.name])
            log(ctx, f"{spec.name}: autopar runs the plan of --plan-file (made offline)")
            log(ctx, preds["autopar"]["summary"].split("\n  parameter")[0])
        elif any(s.kind == "autopar" for s in systems):
            try:
                model = spec.build(ctx.device, torch.float32).to(ctx.dtype)
            except Exception as e:
                preds["autopar"] = {"error": "building the model to plan: " + _error_text(e)}
            else:
                preds["autopar"] = predict(dict(base, system=None), model, batches[0])
                del model
                _cleanup(ctx)
            t_plan = preds["autopar"].get("planning_s", 0.0)
            log(ctx, f"{spec.name}: autopar.plan took {t_plan:.1f} s")
            if "summary" in preds["autopar"]:
                log(ctx, preds["autopar"]["summary"].split("\n  parameter")[0])
        preds.update(zip([s.name for s in manual], wait()))
        log(ctx, f"{spec.name}: planning and {len(manual)} manual plan(s) done in "
                 f"{time.perf_counter() - t0:.1f} s ({args.plan_workers} worker process(es))")
    preds = ctx.bcast(preds)
    rows = []
    for s in systems:
        if s.kind == "pp" and not s.forced:
            # a hand pipeline only where memory forces it: every other baseline ran out
            others = [r for r in rows if r["config"]["kind"] not in ("autopar", "pp")]
            if others and not all(_is_oom(r) for r in others):
                state["notes"].append(
                    f"{spec.name}: {s.name} not run: a baseline without a pipeline fits "
                    "(--force-pp runs it anyway)")
                continue
        row = run_system(ctx, spec, s, batches, preds.get(s.name, {}), state)
        rows.append(row)
        state["runs"].append(row)
        log(ctx, _one_line(row))
        write_json(ctx, state)
    return rows


# ---- output ---------------------------------------------------------------------------------


def log(ctx: Ctx, msg: str) -> None:
    if ctx.rank == 0:
        print(msg, flush=True)


def _one_line(r: dict) -> str:
    if r.get("error"):
        return f"  {r['model']} x{r['gpus']} {r['system']}: {r['error']}"
    pred = f"{r['predicted_step_s']:.4f}" if r["predicted_step_s"] else "-"
    mem = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] else "-"
    return (f"  {r['model']} x{r['gpus']} {r['system']}: {r['measured_step_s']:.4f} s/step "
            f"(predicted {pred}), {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu'] * 100:.1f}%, "
            f"peak {mem}, host issue {r['host_issue_s']:.4f} s, loss {r['first_loss']:.4f} -> "
            f"{r['last_loss']:.4f}")


def write_json(ctx: Ctx, state) -> None:
    if ctx.rank != 0 or not ctx.args.json:
        return
    doc = {k: state[k] for k in ("date", "meta", "environment", "device_measurements",
                                 "options", "notes", "earlier")}
    doc["runs"] = state["previous_runs"] + state["runs"]
    tmp = ctx.args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, ctx.args.json)


def table(runs: list[dict]) -> str:
    head = ("model", "gpus", "system", "tokens/s", "MFU", "peak GiB", "pred s", "meas s",
            "pred/meas", "note")
    lines = []
    best: dict = {}
    for r in runs:
        if r.get("error") or r["system"] == "autopar":
            continue
        key = (r["model"], r["gpus"])
        if key not in best or r["measured_step_s"] < best[key]["measured_step_s"]:
            best[key] = r
    for r in runs:
        if r.get("error"):
            cells = (r["model"], str(r["gpus"]), r["system"], "-", "-", "-",
                     f"{r['predicted_step_s']:.4f}" if r.get("predicted_step_s") else "-",
                     "-", "-", r["error"][:60])
        else:
            note = ""
            b = best.get((r["model"], r["gpus"]))
            if r["system"] == "autopar" and b:
                note = f"{b['measured_step_s'] / r['measured_step_s']:.2f}x best ({b['system']})"
            elif b is r:
                note = "best baseline"
            cells = (r["model"], str(r["gpus"]), r["system"], f"{r['tokens_per_s']:.0f}",
                     f"{r['mfu'] * 100:.1f}%",
                     f"{r['peak_memory_bytes'] / 2**30:.1f}" if r["peak_memory_bytes"] else "-",
                     f"{r['predicted_step_s']:.4f}" if r["predicted_step_s"] else "-",
                     f"{r['measured_step_s']:.4f}",
                     f"{r['predicted_step_s'] / r['measured_step_s']:.2f}"
                     if r["predicted_step_s"] else "-", note)
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), "-|-".join("-" * w for w in widths)] + [fmt(c) for c in lines])


# ---- command line ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N benchmarks/multigpu.py",
        description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny configurations of the same model families (CPU checks)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                    help=f"from {', '.join(MODELS)} (default: all)")
    ap.add_argument("--systems", nargs="+", default=list(KINDS), metavar="SYSTEM",
                    help=f"kinds from {', '.join(KINDS)} (default: all; each baseline kind "
                         "expands over --ac, --accum and --tp-sizes; pp only where memory "
                         "forces it, see --force-pp; eager only on one device), or concrete "
                         "names: eager-ac, fsdp2-ga4, tp4-fsdp2-ac, pp2-fsdp2 (always run)")
    ap.add_argument("--ac", choices=("none", "full", "both"), default="both",
                    help="activation checkpointing of every block for the baseline kinds")
    ap.add_argument("--accum", type=int, nargs="+", default=[1], metavar="N",
                    help="gradient accumulation over N microbatches for the eager, fsdp2 and "
                         "tp kinds (default 1)")
    ap.add_argument("--tp-sizes", type=int, nargs="+", default=None,
                    help="tp sizes to try (default: every divisor > 1 of the GPUs per node)")
    ap.add_argument("--pp-sizes", type=int, nargs="+", default=None,
                    help="pp sizes for the hand pipeline (default: the world size)")
    ap.add_argument("--pp-microbatches", type=int, default=None,
                    help="microbatches of the hand pipeline (default: the largest in "
                         "[pp, 2 pp] that divides the per-dp-rank batch)")
    ap.add_argument("--force-pp", action="store_true",
                    help="run the hand pipeline even when another baseline fits")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="sequences per step (default 8 per GPU; --tiny: 4 per process)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (--tiny: 32)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--max-timing-s", type=float, default=None,
                    help="cut the timed steps of a system so they take about this long, from "
                         "the last warm-up step's time (never fewer than --min-steps)")
    ap.add_argument("--min-steps", type=int, default=5)
    ap.add_argument("--rotate", type=int, default=4,
                    help="distinct random batches cycled through (default 4)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="compute dtype (bf16 mixed precision; fp32 for CPUs without bf16)")
    ap.add_argument("--fp32-loss", action="store_true",
                    help="upcast the logits before the cross-entropy (torchtitan's loss)")
    ap.add_argument("--plan-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an autopar.plan option fixed for the autopar system (string values: "
                         "data_parallel=replicate, schedule=1F1B)")
    ap.add_argument("--plan-file", action="append", default=[], metavar="MODEL=PATH",
                    help="run this plan (a JSON file from benchmarks/plan_offline.py -o, or "
                         "autopar plan -o) as the autopar system of MODEL instead of planning "
                         "on the real model: checks that a plan made offline runs here")
    ap.add_argument("--runtime", choices=("replay", "eager"), default="replay",
                    help="autopar's runtime (autoparallelize(runtime=...)); default replay")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS,
                    help="per-device peak for MFU (default 989, H200 bf16 dense datasheet)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs already in --json and add these")
    ap.add_argument("--profile", nargs="*", default=None, metavar="SYSTEM",
                    help="torch.profiler over --profile-steps steps of these system kinds "
                         "(default with no names: autopar eager fsdp2); tables to "
                         "--profile-out, figures in the row")
    ap.add_argument("--memory-peak", nargs="+", default=[], metavar="SYSTEM",
                    help="one more step of these system kinds under the CUDA allocator's "
                         "history: what is alive at its peak, by the op that allocated it "
                         "(to --profile-out, figures in the row)")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--profile-out", default=None, help="text file for profiler tables")
    ap.add_argument("--plan-workers", type=int, default=None,
                    help="processes for planning on rank 0 (default: half the CPUs, <= 8; "
                         "0 plans in the main process)")
    ap.add_argument("--plan-time-limit", type=float, default=None,
                    help="autopar.plan's time_limit (s) per stage-cut solve")
    ap.add_argument("--memory-limit-gib", type=float, default=None,
                    help="autopar.plan's per-device memory limit (default: the device's "
                         "memory as the cluster preset gives it)")
    ap.add_argument("--no-gc", action="store_true",
                    help="Python's garbage collector off while a system is timed")
    ap.add_argument("--no-predict-baselines", action="store_true",
                    help="skip the manual_plan prediction of each baseline")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="skip the systems that would start after this many seconds")
    ap.add_argument("--collective-timeout-s", type=float, default=600,
                    help="process-group timeout: a rank that fails inside a step leaves the "
                         "others waiting this long (default 600)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU process")
    ap.add_argument("--meta", nargs="*", default=[], metavar="KEY=VALUE",
                    help="free labels for the JSON (commit=..., machine=...)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)

    def fail(msg):
        ap.error(msg)

    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        fail(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    for token in args.systems:
        why = check_system_token(token)
        if why:
            fail(f"--systems: {why}")
    if any(n < 1 for n in args.accum):
        fail(f"--accum takes positive integers, got {args.accum}")
    for name in ("tp_sizes", "pp_sizes"):
        if any(n < 2 for n in getattr(args, name) or []):
            fail(f"--{name.replace('_', '-')} takes integers >= 2, got {getattr(args, name)}")
    if args.memory_limit_gib is not None and args.memory_limit_gib <= 0:
        fail("--memory-limit-gib must be > 0")
    if args.max_timing_s is not None and args.max_timing_s <= 0:
        fail("--max-timing-s must be > 0")
    for name in ("steps", "warmup", "rotate", "profile_steps", "threads", "min_steps"):
        v = getattr(args, name)
        if v < (0 if name == "warmup" else 1):
            fail(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {v}")
    for name in ("global_batch", "seq_len", "pp_microbatches"):
        v = getattr(args, name)
        if v is not None and v < 1:
            fail(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.seq_len is not None and args.seq_len % 2:
        fail(f"--seq-len must be even (rotary tables split the head dim), got {args.seq_len}")
    if args.append and not args.json:
        fail("--append needs --json PATH")
    if args.peak_tflops <= 0:
        fail("--peak-tflops must be > 0")
    if args.profile is not None:
        bad = [s for s in args.profile if s not in KINDS]
        if bad:
            fail(f"--profile: unknown system kind(s) {bad}: choose from {', '.join(KINDS)}")
        args.profile_kinds = set(args.profile or ("autopar", "eager", "fsdp2"))
    else:
        args.profile_kinds = set()
    bad = [s for s in args.memory_peak if s not in KINDS]
    if bad:
        fail(f"--memory-peak: unknown system kind(s) {bad}: choose from {', '.join(KINDS)}")
    args.memory_kinds = set(args.memory_peak)
    args.plan_files = {}
    for item in args.plan_file:
        name, sep, path = item.partition("=")
        if not sep or name not in MODELS:
            fail(f"--plan-file takes MODEL=PATH with MODEL from {', '.join(MODELS)}, got {item!r}")
        try:
            autopar.Plan.load(path)  # a bad file is an error now, not after the baselines ran
        except (OSError, ValueError) as e:
            fail(f"--plan-file {item}: {e}")
        args.plan_files[name] = path  # a path: args go into the JSON as they are
    if args.profile_out and args.profile is None and not args.memory_peak:
        fail("--profile-out needs --profile or --memory-peak")
    for item in args.meta:
        if "=" not in item:
            fail(f"--meta takes KEY=VALUE, got {item!r}")
    if args.plan_workers is None:
        args.plan_workers = min(8, max(0, (os.cpu_count() or 2) // 2))
        if args.plan_workers < 2:
            args.plan_workers = 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.distributed.tensor._collective_utils").setLevel(logging.ERROR)
    ctx = init_distributed(args)
    state = {"t0": time.perf_counter(), "runs": [], "notes": [], "profiles": [],
             "date": time.strftime("%Y-%m-%d"),
             "meta": dict(item.split("=", 1) for item in args.meta),
             "options": {k: (sorted(v) if isinstance(v, set) else v)
                         for k, v in vars(args).items()},
             "previous_runs": []}
    state["earlier"] = []
    if args.append and ctx.rank == 0 and os.path.exists(args.json):
        with open(args.json) as f:
            before = json.load(f)
        state["previous_runs"] = before.pop("runs", [])
        state["earlier"] = before.pop("earlier", []) + [before]  # their settings and readings
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpus": os.cpu_count(), "world_size": ctx.world,
           "local_world_size": ctx.local_world, "device_type": ctx.device.type,
           "backend": dist.get_backend(), "dtype": str(ctx.dtype)}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(device_name=props.name, device_memory_bytes=props.total_memory,
                   cuda=torch.version.cuda)
    state["environment"] = env
    try:
        measured = measure_device(ctx)
        _cleanup(ctx)
        state["device_measurements"] = {"per_rank": ctx.gather(measured)} if measured else {}
        if measured:
            state["matmul_tflops"] = measured["bf16_matmul_8192_tflops"]
            state["device_measurements"].update(measured)  # rank 0's, at the top
        log(ctx, f"# multigpu.py {state['date']}: {ctx.world} x "
                 f"{env.get('device_name', 'CPU process')}, torch {torch.__version__}, "
                 f"{args.dtype}, batch {args.global_batch or 'default'}"
                 + (f"; bf16 matmul {measured['bf16_matmul_8192_tflops']:.0f} TFLOP/s, "
                    f"copy {measured['d2d_copy_tb_per_s']:.2f} TB/s" if measured else ""))
        for name in args.models:
            run_model(ctx, name, state)
        if ctx.rank == 0 and args.profile_out and state["profiles"]:
            with open(args.profile_out, "w") as f:
                f.write("\n".join(state["profiles"]))
        if ctx.device.type == "cpu":
            state["notes"].append(f"CPU run: MFU is against --peak-tflops ({args.peak_tflops:g}"
                                  " TFLOP/s), meaningless for CPUs; peak memory is not measured")
        write_json(ctx, state)
        if ctx.rank == 0:
            print()
            for n in state["notes"]:
                print(f"note: {n}")
            print()
            print(table(state["runs"]))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
