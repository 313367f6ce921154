"""benchmarks/multigpu.py (issue 4) runs every system end to end on CPU, tiny, so that a GPU
machine is spent measuring, not debugging. Launches of about 10 s each on 2 cores: the
baselines (FSDP2, torchtitan-style TP + FSDP2, the hand pipeline) on 2 gloo ranks, autopar
beside plain eager PyTorch in one process, and (issue 19) autopar's compiled replay beside
torch.compile by hand, 18 s with Inductor's cache warm, 70 s cold. fp32, so the losses
of the different splits must agree. The names the systems take are checked without a launch."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "multigpu.py"
slow = pytest.mark.slow  # each test that launches the script: 10 s or more


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


@slow
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


@slow
def test_autopar_beside_eager_in_one_process(tmp_path):
    runs, out = _run(tmp_path, "--systems", "autopar", "eager", "--ac", "none")
    assert [r["system"] for r in runs] == ["autopar", "eager"]
    autopar, eager = runs
    assert autopar.get("error") is None and eager.get("error") is None, runs
    assert autopar["predicted_step_s"] > 0 and autopar["graph_ops"] > 0
    assert _close([autopar["first_loss"], eager["first_loss"]], 1e-5), runs
    assert _close([autopar["last_loss"], eager["last_loss"]], 1e-4), runs  # one AdamW step
    assert "x best (eager)" in out


@slow
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


@slow
def test_compiled_replay_beside_torch_compile_by_hand(tmp_path):
    """Issue 19 on one device: autopar with --runtime compile beside `torch.compile(model)`
    with fused AdamW (fp32 here, so no autocast), with and without checkpointed blocks. Same
    weights, same batches: the losses agree as autopar's and eager's do."""
    runs, out = _run(
        tmp_path, "--systems", "autopar", "compiled", "--ac", "both", "--runtime", "compile"
    )
    assert [r["system"] for r in runs] == ["autopar", "compiled", "compiled-ac"]
    for r in runs:
        assert r.get("error") is None, r
        assert r["measured_step_s"] > 0 and r["tokens_per_s"] > 0, r
    ours, *compiled = runs
    assert ours["runtime"] == "compile"
    for r in compiled:
        assert r["config"]["activation_checkpointing"] == r["system"].endswith("-ac")
        # the whole model in one Dynamo graph: a break would time a slower path than a user's
        assert r["torch_compile"] and r["dynamo_graphs"] >= 1 and r["dynamo_graph_breaks"] == 0
    assert _close([r["first_loss"] for r in runs], 1e-5), runs
    assert _close([r["last_loss"] for r in runs], 1e-4), runs  # one AdamW step
    assert "x best (compiled" in out


def test_system_names_of_the_compiled_kind():
    from benchmarks.lib.models import model_spec
    from benchmarks.lib.systems import check_system_token, expand_systems

    assert check_system_token("compiled") is None
    assert check_system_token("compiled-ac-ga2") is None
    why = check_system_token("compiled-pp")
    assert why and "'compiled-pp'" in why and "compiled-ac-ga2" in why  # and names good ones
    spec = model_spec("gpt-1.3b", True, 32)
    args = argparse.Namespace(
        systems=["compiled", "compiled-ac-ga2"],
        ac="both",
        accum=[1, 2],
        tp_sizes=None,
        pp_sizes=None,
        pp_microbatches=None,
        force_pp=False,
    )
    systems, notes = expand_systems(args, spec, 1, 1, 4)
    assert [(s.name, s.kind, s.ac, s.microbatches) for s in systems] == [
        ("compiled", "compiled", False, 1),
        ("compiled-ga2", "compiled", False, 2),
        ("compiled-ac", "compiled", True, 1),
        ("compiled-ac-ga2", "compiled", True, 2),
    ]
    assert notes == []
    systems, notes = expand_systems(args, spec, 2, 2, 8)  # one process only, as eager
    assert systems == []
    assert notes == ["gpt-1.3b: compiled runs on one device only (world size 2)"] * 2
