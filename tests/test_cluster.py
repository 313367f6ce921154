"""Cluster: presets, validation (every error names its field), axis links, detection."""

import copy
import json
import math
import types
from importlib import resources

import pytest
import torch

from autopar.cluster import PRESETS, Cluster, DeviceSpec, Link
from autopar.errors import ClusterSpecError


def preset_file(name):
    return json.loads(resources.files("autopar").joinpath(f"data/devices/{name}.json").read_text())


class TestPresets:
    @pytest.mark.parametrize("name", PRESETS)
    def test_round_trip(self, name, tmp_path):
        c = Cluster.preset(name, nodes=2)
        d = c.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert Cluster.from_dict(d) == c and Cluster.from_dict(d).to_dict() == d
        path = tmp_path / "c.json"
        path.write_text(json.dumps(d))
        assert Cluster.from_file(path) == c
        assert hash(Cluster.from_file(path)) == hash(c)

    @pytest.mark.parametrize("name", PRESETS)
    def test_every_figure_has_a_source(self, name):
        data = preset_file(name)

        def leaves(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    yield from leaves(v, f"{prefix}{k}.")
                elif isinstance(v, (int, float)) and k != "nodes":
                    yield f"{prefix}{k}"

        figures = set(leaves({k: v for k, v in data.items() if k != "sources"}))
        # a measured calibration names the script and data it came from, as one source
        calibration = data["device"].get("calibration")
        if calibration is not None:
            assert calibration["source"].startswith("benchmarks/calibrate_device.py --fit ")
            figures = {f for f in figures if not f.startswith("device.calibration.")}
        assert figures <= set(data["sources"]), figures - set(data["sources"])
        for text in data["sources"].values():
            assert text.startswith(("datasheet:", "assumption", "8 GPUs", "4 processes",
                                    "measured"))
        assert Cluster.from_file(resources.files("autopar") / f"data/devices/{name}.json").nodes == 1

    def test_datasheet_figures(self):
        a40, a80 = Cluster.preset("a100-40g"), Cluster.preset("a100-80g")
        h100, h200 = Cluster.preset("h100-80g"), Cluster.preset("h200-141g")
        assert a40.peak_flops(torch.bfloat16) == 312e12 and a40.peak_flops("float32") == 19.5e12
        assert a40.device.hbm_bandwidth_bytes_per_s == 1555e9
        assert a80.device.hbm_bandwidth_bytes_per_s == 2039e9
        assert a80.intra_node.bandwidth_bytes_per_s == 300e9  # 600 GB/s bidirectional
        assert a80.inter_node.bandwidth_bytes_per_s == 25e9  # 200 Gb/s HDR per GPU
        assert h100.peak_flops("bf16") == 989e12 and h100.peak_flops(torch.float32) == 67e12
        assert h100.device.hbm_bandwidth_bytes_per_s == 3.35e12
        assert h100.intra_node.bandwidth_bytes_per_s == 450e9
        assert h200.device.memory_bytes == 141_000_000_000
        assert h200.device.hbm_bandwidth_bytes_per_s == 4.8e12
        assert h200.inter_node.bandwidth_bytes_per_s == 50e9
        assert {c.device_type for c in (a40, a80, h100, h200)} == {"cuda"}
        assert (h200.world_size, Cluster.preset("h200-141g", nodes=4).world_size) == (8, 32)

    def test_cpu_preset(self):
        c = Cluster.preset("cpu")
        assert (c.device_type, c.devices_per_node, c.world_size) == ("cpu", 4, 4)
        assert c.device.memory_bytes == 16 * 2**30 and c.peak_flops("float32") == 100e9
        assert Cluster.preset("cpu", devices_per_node=2, nodes=3).world_size == 6

    def test_unknown_preset(self):
        with pytest.raises(ClusterSpecError, match="a100-40g"):
            Cluster.preset("tpu-v5")

    def test_missing_dtype(self):
        with pytest.raises(ClusterSpecError, match=r"device\.peak_flops\.float64 .*bfloat16"):
            Cluster.preset("h100-80g").peak_flops(torch.float64)

    def test_doc_keys_are_dropped(self):
        d = Cluster.preset("cpu").to_dict() | {"sources": {"x": "y"}, "notes": "mine"}
        assert Cluster.from_dict(d) == Cluster.preset("cpu")


def _set(d, path, value):
    *parents, last = path.split(".")
    for p in parents:
        d = d[p]
    if value is DELETE:
        del d[last]
    else:
        d[last] = value


class _Delete:
    """Marks a field to remove (its repr is stable: test ids must match across processes)."""

    def __repr__(self):
        return "DELETE"


DELETE = _Delete()
BAD = [  # (field path, bad value, what the message must say)
    ("device.peak_flops.bfloat16", -1, "device.peak_flops.bfloat16 must be > 0, got -1"),
    ("device.peak_flops.fp8", 1.0, "device.peak_flops.fp8 is not a torch dtype name"),
    ("device.peak_flops", {}, "device.peak_flops must be a non-empty mapping"),
    ("device.memory_bytes", "80GB", "device.memory_bytes must be an integer, got str"),
    ("device.memory_bytes", 0, "device.memory_bytes must be > 0"),
    ("device.hbm_bandwidth_bytes_per_s", True, "device.hbm_bandwidth_bytes_per_s must be a number"),
    ("device.hbm_bandwidth_bytes_per_s", DELETE, "device.hbm_bandwidth_bytes_per_s is missing"),
    ("device.name", "", "device.name must be a non-empty string"),
    ("device.clock_hz", 1e9, "device.clock_hz is not a known field"),
    ("device", [], "device must be a mapping"),
    ("intra_node.bandwidth_bytes_per_s", 0, "intra_node.bandwidth_bytes_per_s must be > 0"),
    ("intra_node.latency_s", float("nan"), "intra_node.latency_s must be >= 0"),
    ("inter_node.latency_s", -1e-6, "inter_node.latency_s must be >= 0, got -1e-06"),
    ("inter_node.jitter_s", 1e-6, "inter_node.jitter_s is not a known field"),
    ("inter_node", DELETE, "inter_node is missing"),
    ("nodes", 0, "nodes must be > 0, got 0"),
    ("devices_per_node", 2.5, "devices_per_node must be an integer, got float"),
    ("device_type", "tpu", "device_type must be one of ('cuda', 'cpu'), got 'tpu'"),
    ("name", None, "name must be a non-empty string"),
    ("gpus", 8, "gpus is not a known field"),
]


class TestValidation:
    @pytest.mark.parametrize("path,value,message", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
    def test_from_dict_names_field(self, path, value, message):
        d = copy.deepcopy(Cluster.preset("h100-80g").to_dict())
        _set(d, path, value)
        with pytest.raises(ClusterSpecError) as err:
            Cluster.from_dict(d)
        assert str(err.value).startswith(message)
        assert "; " in str(err.value)  # followed by the fix

    def test_from_file_names_file_and_field(self, tmp_path):
        d = Cluster.preset("cpu").to_dict()
        d["nodes"] = -2
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(d))
        with pytest.raises(ClusterSpecError, match=r"bad\.json: nodes must be > 0"):
            Cluster.from_file(path)

    def test_from_file_unreadable(self, tmp_path):
        path = tmp_path / "broken.json"
        path.write_text("{not json")
        with pytest.raises(ClusterSpecError, match="broken.json"):
            Cluster.from_file(path)
        with pytest.raises(ClusterSpecError, match="missing.json"):
            Cluster.from_file(tmp_path / "missing.json")

    def test_direct_construction(self):
        with pytest.raises(ClusterSpecError, match=r"^DeviceSpec\.memory_bytes must be > 0"):
            DeviceSpec(name="x", memory_bytes=-5, peak_flops={"float32": 1.0},
                       hbm_bandwidth_bytes_per_s=1.0)
        with pytest.raises(ClusterSpecError, match=r"^Link\.bandwidth_bytes_per_s must be > 0"):
            Link(bandwidth_bytes_per_s=0, latency_s=0)
        good = Cluster.preset("cpu")
        with pytest.raises(ClusterSpecError, match="^device must be a DeviceSpec"):
            Cluster(name="c", device=good.to_dict()["device"], devices_per_node=1, nodes=1,
                    intra_node=good.intra_node, inter_node=good.inter_node, device_type="cpu")

    def test_normalises_numbers(self):
        d = Cluster.preset("cpu").to_dict()
        d["device"]["memory_bytes"] = 16e9  # JSON writers may emit integral floats
        d["intra_node"]["latency_s"] = 0
        c = Cluster.from_dict(d)
        assert c.device.memory_bytes == 16_000_000_000 and type(c.device.memory_bytes) is int
        assert type(c.intra_node.latency_s) is float


class TestAxisLinks:
    @pytest.mark.parametrize("nodes,per_node,mesh,expect", [
        (2, 8, (2, 8), ("inter", "intra")),
        (2, 8, (16,), ("inter",)),
        (2, 8, (4, 4), ("inter", "intra")),
        (2, 8, (8, 2), ("inter", "intra")),  # stride 2 x 8 = 16 ranks span both nodes
        (2, 8, (2, 2, 4), ("inter", "intra", "intra")),
        (2, 8, (1, 16), ("intra", "inter")),  # a size-1 axis never communicates
        (1, 8, (2, 4), ("intra", "intra")),
        (1, 8, (8,), ("intra",)),
        (2, 4, (2, 4), ("inter", "intra")),
        (2, 4, (4, 2), ("inter", "intra")),
        (4, 4, (2, 2, 4), ("inter", "inter", "intra")),
        (2, 6, (4, 3), ("inter", "intra")),  # 3 divides 6
        (2, 6, (3, 4), ("inter", "inter")),  # groups {4..7} straddle the node boundary at 6
    ])
    def test_rule(self, nodes, per_node, mesh, expect):
        c = Cluster.preset("h100-80g", nodes=nodes, devices_per_node=per_node)
        names = {id(c.intra_node): "intra", id(c.inter_node): "inter"}
        assert tuple(names[id(link)] for link in c.axis_links(mesh)) == expect

    def test_wrong_size(self):
        c = Cluster.preset("h100-80g", nodes=2)
        with pytest.raises(ClusterSpecError, match="world_size 16"):
            c.axis_links((4, 8))
        with pytest.raises(ClusterSpecError, match="positive integers"):
            c.axis_links((16, 0))


class TestDetect:
    @pytest.fixture(autouse=True)
    def no_gpu(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert not (torch.distributed.is_available() and torch.distributed.is_initialized())

    def test_env_vars(self, monkeypatch):
        monkeypatch.setenv("WORLD_SIZE", "8")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        c = Cluster.detect()
        assert (c.name, c.device_type, c.world_size, c.nodes, c.devices_per_node) == (
            "cpu", "cpu", 8, 2, 4)

    def test_defaults_to_one_process(self):
        c = Cluster.detect()
        assert (c.device_type, c.world_size) == ("cpu", 1)

    def test_world_without_local_is_one_node(self, monkeypatch):
        monkeypatch.setenv("WORLD_SIZE", "6")
        assert (Cluster.detect().nodes, Cluster.detect().devices_per_node) == (1, 6)

    @pytest.mark.parametrize("world,local", [("8", "3"), ("2", "4"), ("x", "1")])
    def test_bad_env(self, monkeypatch, world, local):
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        with pytest.raises(ClusterSpecError, match="WORLD_SIZE"):
            Cluster.detect()

    @pytest.mark.parametrize("device_name,memory,preset", [
        ("NVIDIA A100-SXM4-40GB", 42_505_273_344, "a100-40g"),
        ("NVIDIA A100-SXM4-80GB", 85_089_304_576, "a100-80g"),
        ("NVIDIA H100 80GB HBM3", 85_045_837_824, "h100-80g"),
        ("NVIDIA H200", 150_109_880_320, "h200-141g"),
    ])
    def test_cuda_matches_preset(self, monkeypatch, device_name, memory, preset):
        self._fake_gpu(monkeypatch, device_name, memory)
        monkeypatch.setenv("WORLD_SIZE", "16")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
        assert Cluster.detect() == Cluster.preset(preset, nodes=2)

    def test_cuda_without_local_world_size_uses_visible_gpus(self, monkeypatch):
        self._fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 85_045_837_824)
        monkeypatch.setenv("WORLD_SIZE", "32")
        c = Cluster.detect()
        assert (c.name, c.nodes, c.devices_per_node) == ("h100-80g", 4, 8)

    def test_cuda_unknown_gpu_warns(self, monkeypatch):
        self._fake_gpu(monkeypatch, "NVIDIA L4", 23_000_000_000)
        with pytest.warns(UserWarning, match="NVIDIA L4"):
            c = Cluster.detect()
        assert (c.device_type, c.device.name, c.device.memory_bytes) == (
            "cuda", "NVIDIA L4", 23_000_000_000)
        assert math.isfinite(c.peak_flops(torch.bfloat16))

    @staticmethod
    def _fake_gpu(monkeypatch, name, memory):
        props = types.SimpleNamespace(name=name, total_memory=memory)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
