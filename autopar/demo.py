"""`autopar demo`: a small GPT trained on N CPU processes, step by step beside one process.

The parent (`run`) launches N workers with torchrun (gloo, one thread each). Every worker builds
the same GPT from the same seed and calls `autopar.autoparallelize`, which runs the planner's full
search on rank 0 (the mesh fixed by --mesh, if given) and shards the model as planned, pipeline
stages included; they train a few SGD steps on the same global batches. Rank 0 then trains the
unsharded model in one process on the same batches and prints both losses per step.

The cluster description is a CPU one (`device_type="cpu"`, so execution uses gloo) with fast,
GPU-like links: with the real figures of CPU processes talking over loopback TCP, any
communication costs more than this tiny model's compute and the planner rightly replicates
everything. The figures only steer the plan; the result is exact whatever they are.

    python -m autopar.demo --worker --steps 5 --mesh dp=2,tp=2   # one worker, under torchrun
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time

import torch

from autopar.cluster import Cluster, DeviceSpec, Link
from autopar.console import mesh_text, parse_mesh, solver_output_to_stderr
from autopar.models.gpt import GPT
from autopar.models.losses import lm_loss
from autopar.models.registry import BUILTIN_MODELS

CONFIG = BUILTIN_MODELS["gpt-tiny"].config
LR = 0.2
SEED = 0
REL_TOL = 1e-5  # fp32: the sharded run sums in a different order, nothing more


def demo_cluster(world_size: int) -> Cluster:
    """`world_size` CPU processes on one node, described with GPU-like links (see module doc)."""
    return Cluster(
        name="cpu-with-fast-links",
        device=DeviceSpec(
            name="cpu",
            memory_bytes=16 * 2**30,
            peak_flops={"float32": 1e11},  # 100 GFLOP/s per process
            hbm_bandwidth_bytes_per_s=2e10,  # 20 GB/s
        ),
        devices_per_node=world_size,
        nodes=1,
        intra_node=Link(bandwidth_bytes_per_s=1e11, latency_s=1e-6),  # NVLink-like
        inter_node=Link(bandwidth_bytes_per_s=1e10, latency_s=1e-5),
        device_type="cpu",
    )


def batch_size(nproc: int) -> int:
    """A global batch of about 4 that any dp axis of `nproc` processes divides."""
    return nproc * max(1, 4 // nproc)


def batches(steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same `steps` (tokens, next tokens) batches on every process, each (B, T)."""
    g = torch.Generator().manual_seed(1)
    shape = (batch, CONFIG.seq_len)
    return [
        (
            torch.randint(0, CONFIG.vocab_size, shape, generator=g),
            torch.randint(0, CONFIG.vocab_size, shape, generator=g),
        )
        for _ in range(steps)
    ]


def single_process_losses(data) -> list[float]:
    """The reference: the same model, seed and batches, trained in this one process."""
    torch.manual_seed(SEED)
    model = GPT(CONFIG)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for x, y in data:
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# -- worker (one per process, under torchrun) -----------------------------------------------------


def worker(steps: int, mesh: dict[str, int] | None, json_output: bool) -> int:
    import torch.distributed as dist

    import autopar

    torch.set_num_threads(1)
    # DTensor notes once per rank that gloo has no all-to-all (it all-gathers instead): expected.
    logging.getLogger("torch.distributed.tensor._collective_utils").setLevel(logging.ERROR)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        data = batches(steps, batch_size(world))
        torch.manual_seed(SEED)
        model = GPT(CONFIG)
        with solver_output_to_stderr(discard=True):  # the HiGHS banner
            pm = autopar.autoparallelize(
                model, demo_cluster(world), example_inputs=data[0], loss_fn=lm_loss, mesh=mesh
            )
        opt = torch.optim.SGD(pm.parameters(), lr=LR)
        t0 = time.perf_counter()
        losses = []
        for x, y in data:
            losses.append(pm.train_step(x, y).item())
            opt.step()
            opt.zero_grad()
        train_s = time.perf_counter() - t0
        split = _split_parameters(pm)
        held = (len(list(pm.parameters())), len(list(model.parameters())))
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    reference = single_process_losses(data)
    agree = all(math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0) for a, b in zip(losses, reference))
    if json_output:
        print(
            json.dumps(
                {
                    "plan": pm.plan.to_dict(),
                    "losses": losses,
                    "reference": reference,
                    "agree": agree,
                    "split_parameters": split,
                },
                indent=2,
            )
        )
    else:
        _report(pm.plan, world, split, held, losses, reference, agree, train_s)
    return 0 if agree else 1


def _split_parameters(pm) -> dict[str, dict]:
    """Parameter FQN -> local and global shape, for every parameter this rank holds a part of."""
    split = {}
    for name, p in pm.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.numel() < p.numel():
            fqn = name.removeprefix("_params.").replace("__", ".")
            split[fqn] = {"local": list(local.shape), "global": list(p.shape)}
    return split


def _report(plan, world, split, held, losses, reference, agree, train_s) -> None:
    print(
        f"cluster: {world} CPU processes (gloo), described to the planner with GPU-like links\n"
        "(100 GB/s, 1 us) so that splitting work pays; with loopback-TCP figures this tiny model\n"
        "would stay replicated. The figures steer the plan only; the losses below are exact.\n"
    )
    print(plan.summary())
    print("\nparameters split across processes (local shard on rank 0 vs whole tensor):")
    if plan.pipeline and len(plan.pipeline["stages"]) > 1:  # the layers, not tensors, are split
        print(f"  pipeline: rank 0 holds its stages' {held[0]} of the {held[1]} parameters")
    elif not split:
        print("  (none: every parameter is replicated; the batch is split over dp)")
    width = max((len(n) for n in split), default=0)
    for name, shapes in split.items():
        print(
            f"  {name.ljust(width)}  local {tuple(shapes['local'])}  of  {tuple(shapes['global'])}"
        )
    print()
    head = ("step", f"autopar loss ({world} procs)", "single-process loss", "rel. diff")
    print(" | ".join(head))
    print("-|-".join("-" * len(h) for h in head))
    for i, (a, b) in enumerate(zip(losses, reference), start=1):
        cells = (str(i), f"{a:.7f}", f"{b:.7f}", f"{abs(a - b) / abs(b):.1e}")
        print(" | ".join(c.rjust(len(h)) for c, h in zip(cells, head)))
    verdict = "agree" if agree else "DISAGREE"
    print(
        f"\nlosses {verdict} within {REL_TOL:g} relative after every one of {len(losses)} steps "
        f"({train_s:.2f} s of sharded training)"
    )


# -- parent ---------------------------------------------------------------------------------------


def run(
    *, nproc: int = 4, steps: int = 5, mesh: dict[str, int] | None = None, json_output: bool = False
) -> int:
    """Launch `nproc` workers with torchrun and return its exit status (non-zero on mismatch)."""
    if mesh is None:
        mesh = default_mesh(nproc)
    if mesh is not None and math.prod(mesh.values()) != nproc:
        raise ValueError(
            f"mesh {mesh_text(mesh)} has {math.prod(mesh.values())} devices but "
            f"the demo runs {nproc} processes; give --nproc {math.prod(mesh.values())}"
            " or a mesh whose sizes multiply to --nproc"
        )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "autopar.demo",
        "--worker",
        "--steps",
        str(steps),
    ]
    if mesh is not None:
        cmd += ["--mesh", mesh_text(mesh)]
    if json_output:
        cmd.append("--json")
    else:
        print(
            f"autopar demo: GPT ({CONFIG.n_layer} layers, d_model {CONFIG.d_model}, vocab "
            f"{CONFIG.vocab_size}, batch {batch_size(nproc)} x {CONFIG.seq_len} tokens) on "
            f"{nproc} CPU processes, mesh {mesh_text(mesh) if mesh else 'chosen by the planner'}"
            f", {steps} SGD steps\n",
            flush=True,
        )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env).returncode
    if not json_output:
        print(f"demo took {time.perf_counter() - t0:.1f} s (torchrun exit status {rc})")
    return rc


def default_mesh(nproc: int) -> dict[str, int] | None:
    """The demo's mesh when none is given: dp=2 x tp=2 for 4 processes, which shows both (the
    batch split over dp, weights over tp); for other counts the planner chooses (None)."""
    return {"dp": 2, "tp": 2} if nproc == 4 else None


def _worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autopar.demo")
    p.add_argument("--worker", action="store_true", help="run as one torchrun worker")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--mesh")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    mesh = parse_mesh(args.mesh) if args.mesh else None
    if not args.worker:
        return run(steps=args.steps, mesh=mesh, json_output=args.json)
    return worker(args.steps, mesh, args.json)


if __name__ == "__main__":
    sys.exit(_worker_main())
