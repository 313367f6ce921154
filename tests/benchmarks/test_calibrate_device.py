"""benchmarks/calibrate_device.py's fit: measured op times and host times -> a device file's
calibration, which the cost model then reproduces."""

from __future__ import annotations

import json
import shutil
from importlib import resources

import pytest

import autopar
from autopar.planning.cost import compute_time_s
from benchmarks.lib.calibration import fit, write_device

PEAK, BW = 100e12, 1e12


def _row(op, flops, bytes_, seconds, count=1):
    return {
        "op": op,
        "key": op,
        "count": count,
        "flops": flops,
        "bytes": bytes_,
        "seconds": seconds,
    }


@pytest.fixture
def measured(tmp_path):
    rows = [
        _row("aten.mm.default", 1e12, 1e9, 0.02, count=4),  # roofline 0.01 s: half the peak
        _row("aten.gelu.default", 0, 1e11, 0.4),  # 0.1 s: a quarter of the bandwidth
        _row("aten.add.Tensor", 0, 1e11, 0.2),  # 0.1 s: half
        _row("aten.neg.default", 0, 1e3, 2e-5),  # tiny: sets the floor, no per-op figure
        _row("aten.div.Tensor", 0, 1e2, 2e-5),
    ]
    data = {
        "peak_flops": PEAK,
        "hbm_bandwidth_bytes_per_s": BW,
        "ops": rows,
        "host": [{"runtime": "replay", "host_s_per_op": 5e-5}],
        "date": "d",
        "device": "x",
    }
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(data))
    return path


def test_fit_gives_class_and_op_fractions_and_the_floor(measured):
    cal = fit(str(measured))
    assert cal["matmul"] == pytest.approx(0.5)
    assert cal["kernel_s"] == pytest.approx(2e-5)
    assert cal["ops"]["aten.gelu.default"] == pytest.approx(0.25)
    assert cal["ops"]["aten.add.Tensor"] == pytest.approx(0.5)
    assert "aten.neg.default" not in cal["ops"]  # below the floor: would price large negs absurdly
    assert cal["host_s_per_op"] == {"replay": 5e-5}


def test_the_cost_model_reproduces_what_was_measured(measured, tmp_path):
    device_file = tmp_path / "dev.json"
    shutil.copy(resources.files("autopar") / "data/devices/cpu.json", device_file)
    data = json.loads(device_file.read_text())
    data["device"]["peak_flops"]["bfloat16"] = PEAK
    data["device"]["hbm_bandwidth_bytes_per_s"] = BW
    device_file.write_text(json.dumps(data))
    write_device(str(device_file), fit(str(measured)))
    device = autopar.Cluster.from_file(device_file).device
    for op, flops, bytes_, seconds in [
        ("aten.mm.default", 1e12, 1e9, 0.02),
        ("aten.gelu.default", 0, 1e11, 0.4),
        ("aten.neg.default", 0, 1e3, 2e-5),
    ]:
        assert compute_time_s(flops, bytes_, device, "bfloat16", op=op) == pytest.approx(seconds)
