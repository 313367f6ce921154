"""autopar.Plan: JSON round trip, determinism, clear errors on bad files and mismatches, summary."""

import json
import os

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.errors import PlanMismatchError
from autopar.plan import (
    SCHEMA_VERSION,
    OpSharding,
    Plan,
    placement_from_str,
    placement_to_str,
)
from tests.helpers.plans import FINGERPRINT, sample_plan


class TestPlacementStrings:
    @pytest.mark.parametrize(
        "placement, text",
        [
            (Replicate(), "R"),
            (Shard(0), "S(0)"),
            (Shard(3), "S(3)"),
            (Partial(), "P(sum)"),
            (Partial("avg"), "P(avg)"),
        ],
    )
    def test_round_trip(self, placement, text):
        assert placement_to_str(placement) == text
        assert placement_from_str(text) == placement

    @pytest.mark.parametrize("text", ["S", "S(-1)", "P(max)", "Shard(0)", "r", "", "S(0) "])
    def test_unknown_string_is_a_clear_error(self, text):
        with pytest.raises(ValueError, match=r'unknown placement .*expected "R", "S\(<dim>\)"'):
            placement_from_str(text)

    def test_unsupported_placement_is_a_clear_error(self):
        with pytest.raises(ValueError, match="only sum and avg"):
            placement_to_str(Partial("max"))


class TestRoundTrip:
    def test_dict_and_json_round_trip(self, tmp_path):
        plan = sample_plan()
        assert Plan.from_dict(plan.to_dict()) == plan
        path = tmp_path / "plan.json"
        plan.save(path)
        loaded = Plan.load(path)
        assert loaded == plan
        assert loaded.world_size == 4
        assert loaded.source_path == str(path)

    def test_json_is_byte_identical_and_independent_of_dict_order(self, tmp_path):
        plan = sample_plan()
        text = plan.to_json()
        assert text == plan.to_json()
        assert text.endswith("}\n")
        shuffled = sample_plan(
            parameters=dict(reversed(plan.parameters.items())),
            ops=dict(reversed(plan.ops.items())),
            predicted=dict(reversed(plan.predicted.items())),
        )
        assert shuffled.to_json() == text
        plan.save(tmp_path / "a.json")
        Plan.load(tmp_path / "a.json").save(tmp_path / "b.json")
        assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()

    def test_save_is_atomic(self, tmp_path, monkeypatch):
        # a save that fails midway leaves the plan that was there, whole, and no stray file
        path = tmp_path / "plan.json"
        old = sample_plan()
        old.save(path)
        os.chmod(path, 0o640)
        before = path.read_bytes()

        def fail(fd):
            raise OSError("disk full")

        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(OSError, match="disk full"):
            sample_plan(n_layers=12).save(path)
        assert path.read_bytes() == before and os.listdir(tmp_path) == ["plan.json"]
        monkeypatch.undo()
        new = sample_plan(n_layers=12)
        new.save(path)  # replaces it whole, keeping its mode
        assert Plan.load(path) == new and os.stat(path).st_mode & 0o777 == 0o640
        new.save(tmp_path / "fresh.json")  # a new file gets open()'s mode, not mkstemp's 0600
        umask = os.umask(0)
        os.umask(umask)
        assert os.stat(tmp_path / "fresh.json").st_mode & 0o777 == 0o666 & ~umask

    def test_mesh_order_is_kept_and_names_sort_naturally(self):
        d = json.loads(sample_plan(n_layers=12, mesh={"tp": 2, "dp": 2}).to_json())
        assert list(d["mesh"]) == ["tp", "dp"]
        names = list(d["parameters"])
        assert names.index("blocks.2.attn.proj.weight") < names.index("blocks.10.attn.proj.weight")

    def test_op_rule_and_non_tensor_outputs_round_trip(self):
        ops = {
            "split": OpSharding(inputs=[["R", "S(1)"], []], outputs=[[], ["R", "R"]], rule="split")
        }
        plan = sample_plan(ops=ops)
        loaded = Plan.from_dict(json.loads(plan.to_json()))
        assert loaded.ops["split"] == ops["split"]
        assert loaded.ops["split"].rule == "split"

    def test_the_torch_that_made_it_round_trips_and_may_be_absent(self):
        plan = sample_plan(made_with={"torch": "2.11.0+cu130"})
        assert Plan.from_dict(json.loads(plan.to_json())).made_with == {"torch": "2.11.0+cu130"}
        assert "made with  torch 2.11.0+cu130" in plan.summary()
        older = sample_plan().to_dict()
        del older["made_with"]  # plans from before 2026-11-30
        assert Plan.from_dict(older).made_with == {}

    def test_floats_keep_full_precision(self):
        plan = sample_plan(predicted={"step_time_s": 0.1 + 0.2})
        assert Plan.from_dict(json.loads(plan.to_json())).predicted["step_time_s"] == 0.1 + 0.2


class TestLoadErrors:
    def write(self, tmp_path, d) -> str:
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(d))
        return str(path)

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"no plan file at .*nope\.json"):
            Plan.load(tmp_path / "nope.json")

    def test_bad_json(self, tmp_path):
        path = tmp_path / "plan.json"
        path.write_text('{"schema_version": 1,')
        with pytest.raises(ValueError, match=r"plan\.json is not valid JSON \(line 1"):
            Plan.load(path)

    def test_newer_schema_version(self, tmp_path):
        d = sample_plan().to_dict() | {"schema_version": SCHEMA_VERSION + 1}
        path = self.write(tmp_path, d)
        with pytest.raises(PlanMismatchError) as info:
            Plan.load(path)
        assert path in str(info.value)
        assert f"schema version {SCHEMA_VERSION + 1} is newer" in str(info.value)
        assert "upgrade autopar" in str(info.value)

    def test_unknown_old_schema_version(self, tmp_path):
        path = self.write(tmp_path, sample_plan().to_dict() | {"schema_version": 0})
        with pytest.raises(ValueError, match="unknown plan schema version 0"):
            Plan.load(path)

    def test_missing_key(self, tmp_path):
        d = sample_plan().to_dict()
        del d["mesh"]
        path = self.write(tmp_path, d)
        with pytest.raises(ValueError, match=r"plan\.json: missing field\(s\) mesh"):
            Plan.load(path)

    def test_wrong_type(self, tmp_path):
        path = self.write(tmp_path, sample_plan().to_dict() | {"parameters": []})
        with pytest.raises(ValueError, match="field 'parameters' should be dict, got list"):
            Plan.load(path)

    def test_bad_made_with(self, tmp_path):
        path = self.write(tmp_path, sample_plan().to_dict() | {"made_with": {"torch": 2.11}})
        with pytest.raises(ValueError, match="made_with should map names to versions"):
            Plan.load(path)

    def test_bad_placement_string(self, tmp_path):
        d = sample_plan().to_dict()
        d["parameters"]["wte.weight"] = ["S(0)", "Shard(1)"]
        path = self.write(tmp_path, d)
        with pytest.raises(
            ValueError, match=r"parameters\['wte.weight'\] has unknown placement 'Shard\(1\)'"
        ):
            Plan.load(path)

    def test_placement_count_must_match_mesh(self, tmp_path):
        d = sample_plan().to_dict()
        d["ops"]["mm"]["outputs"] = [["S(0)"]]
        path = self.write(tmp_path, d)
        with pytest.raises(
            ValueError, match=r"ops\['mm'\]\.outputs\[0\] should be a list of 2 placement"
        ):
            Plan.load(path)

    def test_bad_mesh_size(self):
        with pytest.raises(ValueError, match="mesh axis 'tp' has size 0"):
            sample_plan(mesh={"dp": 2, "tp": 0})


class TestCheckMatches:
    def test_matching_plan_passes(self):
        sample_plan().check_matches(graph_fingerprint=FINGERPRINT, world_size=4)

    def test_other_graph(self, tmp_path):
        sample_plan().save(tmp_path / "plan.json")
        plan = Plan.load(tmp_path / "plan.json")
        with pytest.raises(PlanMismatchError) as info:
            plan.check_matches(graph_fingerprint="cd" * 32, world_size=4)
        msg = str(info.value)
        assert msg.startswith("plan.json was made for model GPT with graph fingerprint ababababab")
        assert "this model traces to cdcdcdcdcd" in msg
        assert "re-plan with autopar.plan(...)" in msg

    def test_other_world_size(self):
        with pytest.raises(PlanMismatchError) as info:
            sample_plan().check_matches(graph_fingerprint=FINGERPRINT, world_size=8)
        msg = str(info.value)
        assert "is for 4 devices (mesh dp=2 x tp=2), this job has 8" in msg
        assert "re-plan for 8 devices" in msg


class TestSummary:
    def test_header(self):
        text = sample_plan().summary()
        assert "plan for GPT" in text
        assert "dp=2 x tp=2 = 4 devices" in text
        assert "cpu, 4 devices" in text
        assert "step 12.500 ms" in text
        assert "peak memory 3.000 GiB" in text
        assert "highs: Optimal gap 0.00% in 0.31 s" in text

    def test_repeated_layers_collapse(self):
        text = sample_plan(n_layers=12).summary()
        rows = [line.split() for line in text.splitlines()]
        assert ["blocks.{0..11}.attn.qkv.weight", "R", "S(0)"] in rows
        assert ["blocks.{0..11}.attn.proj.weight", "R", "S(1)"] in rows
        assert ["wte.weight", "S(0)", "R"] in rows
        assert not any(r and r[0].startswith("blocks.3.") for r in rows)

    def test_layers_with_other_placements_stay_apart(self):
        plan = sample_plan(n_layers=4)
        plan.parameters["blocks.2.attn.qkv.weight"] = ["S(0)", "R"]
        rows = [line.split() for line in plan.summary().splitlines()]
        assert ["blocks.{0,1,3}.attn.qkv.weight", "R", "S(0)"] in rows
        assert ["blocks.2.attn.qkv.weight", "S(0)", "R"] in rows
        assert ["blocks.{0..3}.attn.proj.weight", "R", "S(1)"] in rows

    def test_nested_indices_collapse(self):
        params = {f"layers.{i}.experts.{j}.w": ["S(0)"] for i in range(2) for j in range(8)}
        plan = sample_plan(mesh={"ep": 8}, parameters=params, inputs={}, ops={})
        rows = [line.split() for line in plan.summary().splitlines()]
        assert ["layers.{0..1}.experts.{0..7}.w", "S(0)"] in rows
