"""Restarts (issue 18, item 3): under `torchrun --max-restarts 1`, a rank killed mid-training
(SIGKILL, no goodbye) restarts the job, which resumes from the last checkpoint with no step lost
or repeated, data order included.

This file is also the training script (`main`): 4 gloo ranks train a dp=2 x tp=2 plan with
`autopar.optimizer` (AdamW) for STEPS steps, the batch of step s drawn from a generator seeded
by s, saving `autopar.save` every EVERY steps and then naming it in `latest` (written after
every rank has saved, so `latest` never names a half-written checkpoint). On its first attempt
rank 1 kills itself before step DIE_AT; torchrun stops the others and starts all four again,
which load `latest` and go on from its step. Every rank logs each step it trains, per attempt.

The test runs it so, and once without the kill, and checks: the first attempt died before
DIE_AT, the second started from the checkpoint's step, the steps that count (the first
attempt's up to the checkpoint, then the second's) are 0..STEPS-1 each once, and their losses
are those of the uninterrupted run, to the bit (same plan, same ranks, checkpoints bit-exact).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.helpers.torchrun import free_port, launch, report, torchrun

STEPS, EVERY, DIE_AT = 6, 2, 3  # checkpoints after steps 1 and 3 (as step counts 2 and 4)
LAUNCH_TIMEOUT_S = 240
# torchrun's agent shares its rendezvous store with the workers, and a restarted worker then
# reads the addresses the dead attempt left there and cannot connect (pytorch issues 135712,
# 167288; seen with torch 2.13 and gloo): a store of their own for every attempt
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    import autopar
    from autopar.models.losses import lm_loss
    from tests.helpers.models import MODELS, fast_cpu_cluster

    with torch.device("meta"):
        model = MODELS["gpt"]()
    plan = autopar.manual_plan(model, fast_cpu_cluster(4), batch(0), loss_fn=lm_loss, tp=2,
                               pp=1, dp=2, microbatch_size=2)
    path = tmp_path_factory.mktemp("plan") / "gpt-dp2-tp2.json"
    plan.save(path)
    return path


def run_job(tmp: Path, name: str, plan: Path, *, die_at: int, restarts: int) -> dict:
    """Each attempt's steps and losses, as rank 0 logged them: {attempt: [(step, loss)]}."""
    out = tmp / name
    out.mkdir()
    options = ["--standalone", "--nproc-per-node", "4", "--max-restarts", str(restarts),
               "--master-port", str(free_port())]
    command = torchrun(options, "tests.runtime.test_restart", "--plan", str(plan), "--out",
                       str(out), "--die-at", str(die_at))
    log = out / "torchrun.log"
    codes = launch([command], [log], LAUNCH_TIMEOUT_S, env=RESTARTABLE)
    assert codes == [0], f"{name} failed{report(codes, [log])}"
    attempts = {}
    for f in sorted(out.glob("attempt*-rank0.jsonl")):
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        attempts[int(f.name[len("attempt"):].split("-")[0])] = [(r["step"], r["loss"])
                                                               for r in lines]
    return attempts


@pytest.mark.slow
def test_a_killed_rank_restarts_the_job_which_resumes_from_the_last_checkpoint(plan_file,
                                                                               tmp_path):
    killed = run_job(tmp_path, "killed", plan_file, die_at=DIE_AT, restarts=1)
    whole = run_job(tmp_path, "whole", plan_file, die_at=-1, restarts=0)
    assert sorted(whole) == [0] and [s for s, _ in whole[0]] == list(range(STEPS))
    assert sorted(killed) == [0, 1], "the job was not restarted"
    first, second = killed[0], killed[1]
    assert [s for s, _ in first] == list(range(DIE_AT))  # it died before step DIE_AT
    resumed_at = (DIE_AT // EVERY) * EVERY  # the last checkpoint before the kill
    assert second[0][0] == resumed_at
    counted = [(s, loss) for s, loss in first if s < resumed_at] + second
    assert [s for s, _ in counted] == list(range(STEPS))  # none lost, none repeated
    assert [loss for _, loss in counted] == [loss for _, loss in whole[0]]


# -- the training script each rank runs -------------------------------------------------------


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s batch, the same whenever it is drawn: the data order survives a restart."""
    from tests.helpers.models import CONFIG

    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.seq_len), generator=g)
    return x, torch.randint(0, CONFIG.vocab_size, (4, CONFIG.seq_len), generator=g)


def worker(plan_path: str, out: Path, die_at: int) -> None:
    import torch.distributed as dist

    import autopar
    from autopar.models.losses import lm_loss
    from tests.helpers.models import MODELS

    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    rank = dist.get_rank()
    torch.manual_seed(0)
    pm = autopar.autoparallelize(MODELS["gpt"](), example_inputs=batch(0), loss_fn=lm_loss,
                                 plan=autopar.Plan.load(plan_path), runtime="eager")
    opt = autopar.optimizer(pm, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    checkpoints, latest = out / "checkpoints", out / "checkpoints" / "latest"
    start = 0
    if latest.exists():
        start = autopar.load(checkpoints / latest.read_text(), pm, opt)["step"]
    with open(out / f"attempt{attempt}-rank{rank}.jsonl", "a") as log:
        for step in range(start, STEPS):
            if step == die_at and attempt == 0 and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            loss = float(pm.train_step(*batch(step)))
            opt.step()
            opt.zero_grad()
            log.write(json.dumps({"step": step, "loss": loss}) + "\n")
            log.flush()
            if (step + 1) % EVERY == 0:
                name = f"step-{step + 1}"
                autopar.save(checkpoints / name, pm, opt, extra={"step": step + 1})
                dist.barrier()  # every rank has written its part: now it may be named
                if rank == 0:
                    tmp = latest.with_suffix(".tmp")
                    tmp.write_text(name)
                    os.replace(tmp, latest)
                dist.barrier()


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--die-at", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=LAUNCH_TIMEOUT_S))
    try:
        worker(args.plan, Path(args.out), args.die_at)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
