"""Plan offline, save the plan, and load it at launch: the search runs once, on any machine,
and the training job starts from the file.

1. Plan (no GPU, no process group: the model is traced on the meta device, so no weights are
   made, at any size), print the plan and write it:

       python examples/plan_offline.py plan --nproc 4 -o gpt-4proc.json

   `--nproc 4` plans for 4 CPU processes on this machine (described with GPU-like links, as
   `autopar demo` does); `--cluster h100-80g --nodes 2` plans for 16 H100s you need not have.
   The command line does the same for this model (`build` below is a `module:factory`):

       autopar plan examples.plan_offline:build --cluster cpu --devices-per-node 4 \\
           --precision bf16-mixed -o gpt-4proc.json

2. Launch with as many processes as the plan has devices; every rank loads the plan, so no
   rank searches, and trains:

       OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 examples/plan_offline.py \\
           train --plan gpt-4proc.json --steps 5

   The plan is checked against the model's traced graph and the world size: a plan for
   another model, other batch shapes or another number of processes is refused with a
   `PlanMismatchError` that says which.

Both parts must build the same model and batch shapes (the same --layers, --d-model, --seq,
--batch).
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

import autopar
from autopar.cluster import Cluster, DeviceSpec, Link
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss


def build(batch: int = 8, seq: int = 16, layers: int = 2, d_model: int = 64):
    """(model, one global batch (tokens, next tokens), loss): what `autopar.plan` and
    `autoparallelize` take, and what `autopar plan module:factory` calls (under
    `torch.device("meta")`, with `batch=` and `seq=` when given)."""
    cfg = GPTConfig(vocab_size=64, seq_len=seq, n_layer=layers, n_head=4, d_model=d_model)
    model = GPT(cfg)
    with torch.no_grad():  # nanoGPT's initialisation: N(0, 0.02) matrices, zero biases
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02)
    x, y = counting_batch(0, batch, cfg)
    return model, (x, y), lm_loss


def counting_batch(seed: int, batch: int, cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that count from a random token by a random stride: a learnable next token.
    Made on the CPU and moved to the current default device (meta while planning)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g, device="cpu")
    stride = torch.randint(1, 5, (batch, 1), generator=g, device="cpu")
    seq = (start + stride * torch.arange(cfg.seq_len + 1, device="cpu")) % cfg.vocab_size
    device = torch.get_default_device()
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def cpu_cluster(world_size: int) -> Cluster:
    """`world_size` CPU processes with GPU-like links and compute, so that splitting a model
    this small pays in the cost model (with loopback TCP's figures, the `cpu` preset, the
    planner rightly replicates everything). The figures steer the plan only."""
    return Cluster(
        name="cpu-with-fast-links",
        device=DeviceSpec(name="cpu", memory_bytes=16 * 2**30,
                          peak_flops={"float32": 1e11, "bfloat16": 1e11},
                          hbm_bandwidth_bytes_per_s=2e10),
        devices_per_node=world_size, nodes=1,
        intra_node=Link(bandwidth_bytes_per_s=1e11, latency_s=1e-6),
        inter_node=Link(bandwidth_bytes_per_s=1e10, latency_s=1e-5),
        device_type="cpu",
    )


def plan(args) -> None:
    """Part 1: plan on the meta device and write the plan."""
    if args.cluster:
        cluster = autopar.Cluster.preset(args.cluster, nodes=args.nodes)
    else:
        cluster = cpu_cluster(args.nproc)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model, example, loss_fn = build(args.batch, args.seq, args.layers, args.d_model)
    made = autopar.plan(model, cluster, example, loss_fn=loss_fn, precision=args.precision,
                        mesh=dict(args.mesh) if args.mesh else None)
    print(made.summary())
    made.save(args.output)
    report = autopar.simulate(made)
    print(f"\nwrote {args.output}: mesh {made.mesh} for {made.world_size} devices of "
          f"{cluster.name}, predicted {report.step_time_s * 1e3:.3g} ms a step, "
          f"{report.peak_memory_bytes / 2**20:.1f} MiB peak a device")


def train(args) -> None:
    """Part 2: under torchrun, load the plan and train; no planning at launch."""
    import torch.distributed as dist

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.set_default_device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    logging.getLogger("torch.distributed.tensor._collective_utils").setLevel(logging.ERROR)
    rank = dist.get_rank()
    try:
        saved = autopar.Plan.load(args.plan)
        torch.manual_seed(0)  # every rank builds the same weights (rank 0's are used)
        model, example, loss_fn = build(args.batch, args.seq, args.layers, args.d_model)
        pm = autopar.autoparallelize(model, example_inputs=example, loss_fn=loss_fn,
                                     plan=saved)
        opt = autopar.optimizer(pm, torch.optim.AdamW, lr=args.lr)  # the plan's precision
        precision = autopar.TrainingPrecision.from_dict(pm.plan.precision).name
        if rank == 0:
            print(f"loaded {args.plan}: mesh {pm.plan.mesh}, data parallel "
                  f"{pm.plan.data_parallel}, precision {precision}")
        for step in range(args.steps):
            x, y = counting_batch(step + 1, args.batch, model.cfg)
            loss = pm.train_step(x, y)
            pm.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
            if rank == 0:
                print(f"step {step} | loss {loss.item():.6f}")
    finally:
        dist.destroy_process_group()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("plan", help="part 1: plan offline and write the plan")
    p.add_argument("--nproc", type=int, default=4,
                   help="plan for this many CPU processes (default 4)")
    p.add_argument("--cluster", default=None,
                   help="plan for a preset's GPUs instead (h100-80g, a100-80g, ...)")
    p.add_argument("--nodes", type=int, default=1, help="nodes of --cluster (default 1)")
    p.add_argument("--mesh", type=lambda s: [(k, int(v)) for k, v in
                                             (kv.split("=") for kv in s.split(","))],
                   default=None, help="fix the mesh, e.g. dp=2,tp=2 (default: searched)")
    p.add_argument("--precision", choices=("bf16-mixed", "fp32"), default="bf16-mixed")
    p.add_argument("-o", "--output", default="plan.json")
    t = sub.add_parser("train", help="part 2 (under torchrun): load the plan and train")
    t.add_argument("--plan", required=True)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--lr", type=float, default=3e-3)
    for q in (p, t):
        q.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
        q.add_argument("--seq", type=int, default=16)
        q.add_argument("--layers", type=int, default=2)
        q.add_argument("--d-model", type=int, default=64)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.part == "plan":
        plan(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
