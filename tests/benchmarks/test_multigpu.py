"""benchmarks/multigpu.py (issue 4) runs every system end to end on CPU, tiny, so that a GPU
machine is spent measuring, not debugging. Two launches, about 20 s on 2 cores: the baselines
(FSDP2, torchtitan-style TP + FSDP2, the hand pipeline) on 2 gloo ranks, and autopar beside
plain eager PyTorch in one process. fp32, so the losses of the different splits must agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "multigpu.py"
pytestmark = pytest.mark.slow  # each test launches the script: ~10 s


def _run(tmp_path, *args, nproc: int | None = None):
    out = tmp_path / "runs.json"
    launch = [sys.executable]
    if nproc is not None:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launch + [
        str(SCRIPT),
        "--device",
        "cpu",
        "--tiny",
        "--dtype",
        "fp32",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--no-predict-baselines",
        "--models",
        "gpt-1.3b",
        "--json",
        str(out),
        *args,
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())["runs"], proc.stdout


def _close(values, rel):
    return max(values) - min(values) <= rel * abs(values[0])


def test_baselines_on_two_gloo_ranks(tmp_path):
    runs, out = _run(tmp_path, "--systems", "fsdp2", "tp", "pp2-fsdp2", "--ac", "none", nproc=2)
    assert [r["system"] for r in runs] == ["fsdp2", "tp2-fsdp2", "pp2-fsdp2"]
    for r in runs:
        assert r.get("error") is None, r
        assert r["measured_step_s"] > 0 and r["tokens_per_s"] > 0 and r["gpus"] == 2
    # same weights, same batches: ZeRO-3, tensor and pipeline splits compute the same losses
    assert _close([r["first_loss"] for r in runs], 1e-5), runs
    assert _close([r["last_loss"] for r in runs], 1e-4), runs
    assert "best baseline" in out


def test_autopar_beside_eager_in_one_process(tmp_path):
    runs, out = _run(tmp_path, "--systems", "autopar", "eager", "--ac", "none")
    assert [r["system"] for r in runs] == ["autopar", "eager"]
    autopar, eager = runs
    assert autopar.get("error") is None and eager.get("error") is None, runs
    assert autopar["predicted_step_s"] > 0 and autopar["graph_ops"] > 0
    assert _close([autopar["first_loss"], eager["first_loss"]], 1e-5), runs
    assert _close([autopar["last_loss"], eager["last_loss"]], 1e-4), runs  # one AdamW step
    assert "x best (eager)" in out


def test_a_plan_made_offline_on_meta_runs_as_the_autopar_system(tmp_path):
    """--plan-file: the plan is made here, from a meta-device model (as benchmarks/plan_offline.py
    makes one with no GPU), and the script runs it on the real model without planning again."""
    import torch

    import autopar
    from autopar.planning.profile import TrainingPrecision
    from benchmarks.lib.models import LOSS, meta_model, model_spec

    spec = model_spec("gpt-1.3b", True, 32)
    x = torch.zeros(4, 32, dtype=torch.long, device="meta")  # the script's tiny global batch
    plan = autopar.plan(
        meta_model(spec, torch.float32),
        autopar.Cluster.preset("cpu", devices_per_node=1),
        (x, x.clone()),
        loss_fn=LOSS["model"],
        precision=TrainingPrecision.fp32(),
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    runs, out = _run(
        tmp_path, "--systems", "autopar", "eager", "--ac", "none", "--plan-file", f"gpt-1.3b={path}"
    )
    ours, eager = runs
    assert ours.get("error") is None and eager.get("error") is None, runs
    assert ours["plan_file"] == str(path) and ours["planning_s"] is None
    assert ours["predicted_step_s"] == plan.predicted["step_time_s"]
    assert "made offline" in out
    assert _close([ours["first_loss"], eager["first_loss"]], 1e-5), runs
    assert _close([ours["last_loss"], eager["last_loss"]], 1e-4), runs
