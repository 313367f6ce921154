"""The scripts in examples/, run as a user runs them (torchrun or python, from the repository
root, one thread a process), with small sizes through their flags; each test checks what the
script is for, not only that it exits 0.

- train_gpt.py: 2 processes, bf16-mixed; a first launch trains steps 0-2 and checkpoints
  after step 1; a second launch resumes from that checkpoint and trains steps 2-3. Step 2's
  loss and gradient norm are printed by both: the resumed run must print the same digits,
  which it does only if weights, fp32 masters, AdamW state, scheduler and data order all
  came back.
- plan_offline.py: a tensor-parallel plan (tp=2) made offline loads under torchrun on 2
  processes and trains (4 processes, as the script's docstring runs it, take twice the time
  on 2 cores and test nothing more here).
- compare_hand_config.py: the search and a hand configuration, both step times printed.

About 60-90 s together on the 2-core machine, as busy as it is (each launch pays torch's
import and a first step that traces the replay; 79 s measured with other work running).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

from autopar.plan import Plan
from tests.helpers.torchrun import launch, report

TIMEOUT_S = 300  # one launch; ~10-20 s alone, more while other tests share the 2 cores
SMALL_GPT = ("--batch", "4", "--seq", "16", "--layers", "2", "--d-model", "32",
             "--warmup", "1", "--eval-every", "2")
STEP_LINE = re.compile(r"^step +(\d+) \| loss (\S+) \| grad norm (\S+) \|", re.M)


def _run(log: Path, *argv) -> str:
    """`python ARGV...` from the repository root as `tests/helpers/torchrun.launch` runs it
    (one thread a process; the whole process tree stopped after TIMEOUT_S); its output, once
    it exited 0."""
    codes = launch([[sys.executable, *map(str, argv)]], [log], TIMEOUT_S)
    assert codes == [0], f"{log.stem} failed{report(codes, [log])}"
    return log.read_text()


def _torchrun(log: Path, nproc: int, *argv) -> str:
    """`torchrun --standalone --nproc-per-node NPROC ARGV...`, as `_run`."""
    return _run(log, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", nproc,
                *argv)


def _steps(out: str) -> dict[int, tuple[str, str]]:
    """Step -> (loss, gradient norm) as train_gpt.py printed them."""
    return {int(s): (loss, norm) for s, loss, norm in STEP_LINE.findall(out)}


@pytest.mark.slow
def test_train_gpt_checkpoints_and_resumes_exactly(tmp_path):
    ckpt = tmp_path / "ckpt"
    train = ("examples/train_gpt.py", "--ckpt-dir", ckpt, "--ckpt-every", "2", *SMALL_GPT)
    first = _torchrun(tmp_path / "first.log", 2, *train, "--steps", "3")
    assert re.search(r"^plan: mesh .*, bf16-mixed, predicted", first, re.M), first
    before = _steps(first)
    assert sorted(before) == [0, 1, 2]
    assert re.search(r"^step +1 \| eval loss \d", first, re.M)
    assert (ckpt / "latest").read_text().strip() == "step-000001"  # after step 1, not 2

    second = _torchrun(tmp_path / "resumed.log", 2, *train, "--steps", "4")
    assert "continuing at step 2" in second
    after = _steps(second)
    assert sorted(after) == [2, 3]  # no step lost or repeated beyond the checkpoint's
    assert after[2] == before[2], "the resumed run's step 2 differs from the first run's"
    assert (ckpt / "latest").read_text().strip() == "step-000003"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000001", "step-000003"]

    losses = [float(before[s][0]) for s in (0, 1, 2)] + [float(after[3][0])]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_plan_offline_then_load_it_at_launch(tmp_path):
    path = tmp_path / "plan.json"
    sizes = ("--batch", "4", "--seq", "16", "--d-model", "32")
    out = _run(tmp_path / "plan.log", "examples/plan_offline.py", "plan", "--nproc", "2",
               "--mesh", "tp=2", *sizes, "-o", path)
    assert f"wrote {path}" in out
    saved = Plan.load(path)
    assert saved.mesh == {"tp": 2}
    assert any("S(" in placements[0] for placements in saved.parameters.values())  # split

    out = _torchrun(tmp_path / "train.log", 2, "examples/plan_offline.py", "train", "--plan",
                    path, "--steps", "3", *sizes)
    assert f"loaded {path}: mesh {{'tp': 2}}" in out
    losses = [float(v) for v in re.findall(r"^step \d+ \| loss (\S+)$", out, re.M)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_compare_hand_config_prints_both_step_times(tmp_path):
    out = _run(tmp_path / "compare.log", "examples/compare_hand_config.py", "--model",
               "gpt-tiny", "--nodes", "1", "--gpus-per-node", "4", "--batch", "8")
    header = next(line for line in out.splitlines() if "autopar.plan" in line)
    assert "hand: tp=2 pp=1 dp=2 mbs=4 zero=1" in header
    times = re.search(r"^step time +([\d.]+) ms +([\d.]+) ms$", out, re.M)
    assert times, out
    plan_ms, hand_ms = map(float, times.groups())
    assert plan_ms > 0 and hand_ms > 0
    ratio = re.search(r"^autopar's plan: ([\d.]+)x the hand configuration's", out, re.M)
    assert ratio and float(ratio.group(1)) == pytest.approx(hand_ms / plan_ms, rel=0.05)
