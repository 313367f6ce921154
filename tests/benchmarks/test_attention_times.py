"""benchmarks/attention_times.py's fit, on rows made from a known curve, and the device file's
curve against the committed measurements it was fitted to."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import autopar
from autopar.cluster import DeviceSpec
from autopar.planning import cost
from benchmarks import attention_times as A
from benchmarks.lib.calibration import write_device

ROOT = Path(__file__).resolve().parents[2]
TRUTH = {"tile": 128.0, "head_dim_tile": 32.0,
         "forward_efficiency": 0.7, "forward_seq_half": 304.4, "forward_head_dim_half": 38.05,
         "forward_causal": 1.1, "forward_dropout": 1.3,
         "backward_efficiency": 0.55, "backward_seq_half": 512.0,
         "backward_head_dim_half": 64.0, "backward_causal": 1.2, "backward_dropout": 1.4}
PEAK = 989e12


def _rows(noise: float) -> list[dict]:
    spec = DeviceSpec(name="t", memory_bytes=1, peak_flops={"bfloat16": PEAK},
                      hbm_bandwidth_bytes_per_s=1.0, calibration={"attention": TRUTH})
    rng = random.Random(0)
    rows = []
    for label, (b, h, s, d, hkv, p, c) in A.CASES.items():
        r = dict(label=label, batch=b, heads=h, seq=s, head_dim=d, kv_heads=hkv, dropout_p=p,
                 causal=c, backend="cudnn")
        a = A.attention_shape(r)
        f, bw = (cost.attention_time_s(a, spec, "bfloat16", part)
                 * rng.uniform(1 - noise, 1 + noise) for part in A.PARTS)
        rows.append(dict(r, forward_s=f, backward_s=bw, forward_backward_s=f + bw))
    return rows


def test_fit_recovers_the_curve_that_made_the_rows():
    got = A.fit(_rows(0.0), PEAK)
    assert got == pytest.approx(TRUTH, rel=1e-3)


def test_fixed_entries_are_kept_and_their_rows_join_the_fit():
    rows = _rows(0.0)
    fixed = {"tile": 128.0, "forward_causal": 1.1, "backward_causal": 1.2}
    got = A.fit(rows, PEAK, fixed)
    assert got == pytest.approx(TRUTH, rel=1e-3)
    # a wrong pin is kept, and the rest of the curve makes up for it as it can
    got = A.fit(rows, PEAK, {"tile": 64.0})
    assert got["tile"] == 64.0


def test_fit_prices_noisy_rows_within_the_noise():
    rows = _rows(0.03)
    curve = A.fit(rows, PEAK)
    assert curve["tile"] == 128 and curve["head_dim_tile"] == 32
    spec = DeviceSpec(name="t", memory_bytes=1, peak_flops={"bfloat16": PEAK},
                      hbm_bandwidth_bytes_per_s=1.0, calibration={"attention": curve})
    for r in rows:
        a = A.attention_shape(r)
        price = sum(cost.attention_time_s(a, spec, "bfloat16", p) for p in A.PARTS)
        assert r["forward_backward_s"] / price == pytest.approx(1.0, abs=0.06)


def test_calibrate_device_write_keeps_the_attention_curve(tmp_path):
    device = ROOT / "autopar" / "data" / "devices" / "h200-141g.json"
    path = tmp_path / "dev.json"
    data = json.loads(device.read_text())
    data["device"]["calibration"]["attention"] = TRUTH
    data["device"]["calibration"]["source"] = "ops fit; attention: attention_times.py (x)"
    path.write_text(json.dumps(data))
    new = {k: v for k, v in data["device"]["calibration"].items()
           if k not in ("attention", "pipeline_stage_s")}
    write_device(str(path), dict(new, source="new ops fit"))
    cal = json.loads(path.read_text())["device"]["calibration"]
    assert cal["attention"] == TRUTH
    assert cal["pipeline_stage_s"] == data["device"]["calibration"]["pipeline_stage_s"]
    assert cal["source"] == "new ops fit; attention: attention_times.py (x)"


def test_the_device_files_curve_is_the_fit_of_its_committed_measurements():
    for device in sorted((ROOT / "autopar" / "data" / "devices").glob("*.json")):
        cal = json.loads(device.read_text())["device"].get("calibration") or {}
        if not cal.get("attention"):
            continue
        note = cal["source"].partition("; attention: ")[2]
        name = note.split("--fit ")[1].split(" ")[0]
        (data,) = ROOT.glob(f"docs/benchmarks/*/{name}")
        rows = json.loads(data.read_text())
        spec = autopar.Cluster.preset(rows["cluster"]).device
        assert A.fit(rows["rows"], spec.peak_flops_for("bfloat16"),
                     rows.get("fixed")) == cal["attention"]
