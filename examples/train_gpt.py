"""Train a small GPT with autopar under torchrun: bf16 mixed precision, AdamW, gradient
clipping, a learning-rate schedule, evaluation, and a checkpoint every N steps that a later
launch resumes from, seeing exactly the batches an uninterrupted run would have seen.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/train_gpt.py \\
        --steps 40 --ckpt-dir ckpt --ckpt-every 10

Stop it at any point (Ctrl-C, a lost node) and run the same command again: it loads the last
checkpoint in --ckpt-dir and goes on from the step after it; with a larger --steps it trains
further. Under `torchrun --max-restarts N` a job whose rank dies restarts and resumes so by
itself (set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: docs/quickstart.md, "Checkpoints and
restarts"). On a GPU node, `--nproc-per-node 8` (NCCL, and `Cluster.detect()` describes the
GPUs).

The data is synthetic and learnable: each sequence counts up from a random token by a random
stride (mod the vocabulary), so the next token follows from the two before it and the loss
falls from ln(vocab) within a few dozen steps. Batch `step` is drawn from a generator seeded
with `step`, on every rank alike (one global batch; autopar splits it over the data-parallel
ranks), so the data order never depends on where a run started.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

import autopar
from autopar.cluster import Cluster, DeviceSpec, Link
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss

EVAL_SEED = 1_000_000_007  # the held-out batches' seeds start here, far from any step number


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="train up to this step count")
    ap.add_argument("--ckpt-dir", type=Path, default=None,
                    help="checkpoints go here (step-NNNNNN folders, `latest` names the last); "
                         "a launch resumes from the last one found")
    ap.add_argument("--ckpt-every", type=int, default=10,
                    help="save after every N-th step (0: never)")
    ap.add_argument("--keep", type=int, default=2, help="checkpoints kept (older ones deleted)")
    ap.add_argument("--precision", choices=("bf16-mixed", "fp32"), default="bf16-mixed")
    ap.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps (0: never)")
    ap.add_argument("--batch", type=int, default=8, help="global batch, in sequences")
    ap.add_argument("--seq", type=int, default=32, help="tokens a sequence")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=5, help="steps of linear learning-rate warmup")
    ap.add_argument("--max-norm", type=float, default=1.0, help="gradient clipping")
    return ap.parse_args(argv)


def batch(seed: int, args, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, next tokens), each (B, T): sequences counting from a random start by a random
    stride, the same on every rank for the same `seed`."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
    stride = torch.randint(1, 5, (args.batch, 1), generator=g)
    seq = (start + stride * torch.arange(args.seq + 1)) % args.vocab  # (B, T + 1)
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def cpu_cluster(world_size: int) -> Cluster:
    """The CPU processes of this job, described with GPU-like links and compute (as
    `autopar demo` does): with loopback TCP's real figures, communication costs more than a
    small model's compute and the planner rightly replicates everything. The figures steer
    the plan only; what runs is exact whatever they are."""
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


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    """nanoGPT's initialisation: N(0, 0.02) matrices and embeddings, zero biases (torch's
    defaults give a tied embedding's logits a spread of sqrt(d_model), a first loss of ~40)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() >= 2:
            p.normal_(0.0, 0.02)


def decay_group(fqn: str) -> dict:
    """Options of the parameter group the parameter `fqn` joins: biases and layer norms
    without weight decay."""
    return {"weight_decay": 0.0} if fqn.endswith(".bias") or "ln_" in fqn else {}


def lr_factor(step: int, warmup: int) -> float:
    """Linear warmup, then inverse-square-root decay: a schedule of the step alone, with no
    horizon, so a run extended with a larger --steps keeps the rates it already used."""
    s = step + 1
    return min(s / max(1, warmup), math.sqrt(max(1, warmup) / s))


def latest_checkpoint(ckpt_dir: Path | None) -> Path | None:
    """The checkpoint `latest` names, written only once a save is complete."""
    if ckpt_dir is None or not (ckpt_dir / "latest").exists():
        return None
    return ckpt_dir / (ckpt_dir / "latest").read_text().strip()


def save_checkpoint(args, step: int, pm, opt, sched) -> Path:
    """Every rank writes its shards; then rank 0 points `latest` at the new checkpoint (a
    file renamed into place: a save cut short leaves the previous one in force) and deletes
    the oldest beyond --keep."""
    path = args.ckpt_dir / f"step-{step:06d}"
    autopar.save(path, pm, opt, extra={"step": step, "scheduler": sched.state_dict()})
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        tmp = args.ckpt_dir / "latest.tmp"
        tmp.write_text(path.name + "\n")
        os.replace(tmp, args.ckpt_dir / "latest")
        for old in sorted(args.ckpt_dir.glob("step-*"))[: -args.keep]:
            shutil.rmtree(old)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    # gloo has no all-to-all; DTensor says once per rank that it all-gathers instead: expected
    logging.getLogger("torch.distributed.tensor._collective_utils").setLevel(logging.ERROR)
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)

    # the model as its authors ship it, in fp32, with the same initial weights on every rank
    # (rank 0's are the ones used)
    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq, n_layer=args.layers,
                    n_head=args.heads, d_model=args.d_model)
    torch.manual_seed(0)
    with device:
        model = GPT(cfg)
    init_weights(model)
    cluster = Cluster.detect() if cuda else cpu_cluster(world)
    # rank 0 plans (the full search: mesh, microbatches, ZeRO flavour, checkpointing) for
    # this precision and sends the plan to the others; each rank keeps its shards
    pm = autopar.autoparallelize(model, cluster, batch(0, args, device), loss_fn=lm_loss,
                                 precision=args.precision)
    del model
    predicted_ms = autopar.simulate(pm.plan).step_time_s * 1e3
    say(f"plan: mesh {pm.plan.mesh}, data parallel {pm.plan.data_parallel}, "
        f"{args.precision}, predicted {predicted_ms:.3g} ms a step on {world} processes")

    # fp32 masters and AdamW state, sharded as the plan shards the parameters; no weight
    # decay on biases and norms
    opt = autopar.optimizer(pm, torch.optim.AdamW, lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.1, group_of=decay_group)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup))

    start = 0
    resume = latest_checkpoint(args.ckpt_dir)
    if resume is not None:
        extra = autopar.load(resume, pm, opt)  # weights, masters, AdamW state: any plan's
        sched.load_state_dict(extra["scheduler"])
        start = extra["step"] + 1
        say(f"resumed from {resume} (step {extra['step']}): continuing at step {start}")

    for step in range(start, args.steps):
        t0 = time.perf_counter()
        x, y = batch(step, args, device)
        loss = pm.train_step(x, y)  # forward and backward of the global batch
        norm = pm.clip_grad_norm_(args.max_norm)  # the global norm, across every shard
        lr = sched.get_last_lr()[0]
        opt.step()
        opt.zero_grad()
        sched.step()
        ms = (time.perf_counter() - t0) * 1e3
        say(f"step {step:5d} | loss {loss.item():.6f} | grad norm {norm.item():.6f} | "
            f"lr {lr:.3e} | {ms:.0f} ms")
        if args.eval_every and (step + 1) % args.eval_every == 0:
            losses = [pm.eval_step(*batch(EVAL_SEED + i, args, device)).item() for i in range(2)]
            say(f"step {step:5d} | eval loss {sum(losses) / len(losses):.6f}")
        if args.ckpt_dir and args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            say(f"step {step:5d} | saved {save_checkpoint(args, step, pm, opt, sched)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
