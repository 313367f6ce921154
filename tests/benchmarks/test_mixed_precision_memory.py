"""benchmarks/mixed_precision_memory.py (issue 18) end to end on CPU with the tiny GPT: both
precisions, each in a child process of its own, planned, trained with autopar.optimizer and
clipped, one JSON each; under a minute on 2 cores. Peaks are measured on GPUs only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "mixed_precision_memory.py"
pytestmark = pytest.mark.slow  # launches the script: two children, ~20 s each


def test_smoke_both_precisions(tmp_path):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--smoke",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--phase-steps",
        "1",
        "--precisions",
        "bf16-mixed",
        "fp32",
        "--out-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for precision in ("bf16-mixed", "fp32"):
        row = json.loads((tmp_path / f"smoke-gpt-1.3b-{precision}-memory.json").read_text())[
            "result"
        ]
        assert "error" not in row, row["error"]
        assert row["plan"]["precision"]["compute_dtype"] == (
            "bfloat16" if precision == "bf16-mixed" else "float32"
        )
        assert row["predicted"]["peak_memory_bytes"] > 0
        assert len(row["losses"]) == 3 and row["step_s"] > 0
        assert set(row["peak_by_phase"][0]) == {
            "train_step",
            "clip_grad_norm_",
            "optimizer_step",
            "zero_grad",
        }
    assert proc.stdout.rstrip().splitlines()[-1].startswith("  median step")  # the table last
