"""`autopar.sweep`: models x clusters x options -> rows, each row what `autopar.plan` (or
`manual_plan`) and `simulate` say for that case; rows -> CSV, DataFrame, plot; `autopar sweep`."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import autopar
from autopar.cli import main, parse_manual
from autopar.errors import AutoparError
from autopar.models.registry import build_model
from autopar.planning.profile import TrainingPrecision
from autopar.sweep import (
    COLUMNS,
    MissingDependencyError,
    options_text,
    read_csv,
    resolve_manual,
    to_csv,
    to_dataframe,
    to_text,
)

CPU2 = autopar.Cluster.preset("cpu", nodes=1, devices_per_node=2)
FSDP = {"manual": {"zero": 3}, "label": "FSDP"}
OPTIONS = [{}, {"memory_limit": 1024}, FSDP]  # the search, a limit nothing fits in, a hand config


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return autopar.sweep(["gpt-tiny"], [CPU2], OPTIONS)


def gpt_tiny(batch: int = 8):
    with torch.device("meta"):
        return build_model("gpt-tiny", batch=batch, seq=None)


def assert_row_is(row: dict, plan: autopar.Plan) -> None:
    """The row says what the plan and its simulation say."""
    report = autopar.simulate(plan)
    assert row["status"] == "planned" and row["reason"] is None
    assert row["step_time_s"] == report.step_time_s
    assert row["samples_per_s"] == report.samples_per_s
    assert row["tokens_per_s"] == report.tokens_per_s
    assert row["tflops_per_gpu"] == report.tflops_per_gpu
    assert row["mfu"] == report.mfu
    assert row["peak_memory_gib"] == report.peak_memory_bytes / 2**30
    assert row["mesh"] == ",".join(f"{a}={n}" for a, n in plan.mesh.items() if n > 1)
    assert row["data_parallel"] == plan.data_parallel
    assert row["checkpointed_layers"] == len(plan.checkpoint)
    pipe = plan.pipeline or {}
    assert row["microbatches"] == pipe.get("num_microbatches", 1)
    assert row["microbatch_size"] == pipe.get("microbatch_size", 8)
    assert row["schedule"] == pipe.get("schedule")


class TestRows:
    def test_one_row_per_case_in_order(self, rows):
        assert [r["label"] for r in rows] == ["autopar", "autopar, memory_limit=1 KiB", "FSDP"]
        assert [r["options"] for r in rows] == [
            "autopar", "autopar, memory_limit=1 KiB", "manual(zero=3)"]
        for r in rows:
            assert list(r) == list(COLUMNS)
            assert (r["model"], r["cluster"], r["nodes"], r["gpus"], r["batch"]) == (
                "gpt-tiny", "cpu", 1, 2, 8)
            assert r["params"] == sum(p.numel() for p in gpt_tiny()[0].parameters())

    def test_the_search_row_is_autopar_plan_of_the_same_case(self, rows):
        model, example, loss_fn = gpt_tiny()
        plan = autopar.plan(model, CPU2, example, loss_fn=loss_fn)
        assert_row_is(rows[0], plan)
        assert rows[0]["plan_s"] > 0

    def test_a_hand_configuration_row_is_manual_plan(self, rows):
        model, example, loss_fn = gpt_tiny()
        plan = autopar.manual_plan(model, CPU2, example, loss_fn=loss_fn, tp=1, pp=1, dp=2,
                                   microbatch_size=4, zero=3)
        assert_row_is(rows[2], plan)
        assert rows[2]["mesh"] == "dp=2" and rows[2]["data_parallel"] == "zero3"

    def test_a_case_that_cannot_plan_is_a_row_with_its_reason(self, rows):
        r = rows[1]
        assert r["status"] == "no plan"
        assert r["reason"].startswith("no plan fits the memory limit of 1 KiB per device")
        assert "\n" not in r["reason"]
        assert r["mesh"] is None and r["step_time_s"] is None and r["params"] > 0

    def test_a_hand_configuration_over_the_memory_limit_is_no_plan_with_its_figures(self):
        [r] = autopar.sweep(["gpt-tiny"], [CPU2], [{"manual": {}, "memory_limit": 1e5}])
        assert r["status"] == "no plan"
        assert "over the limit of 97.7 KiB" in r["reason"]
        assert r["peak_memory_gib"] * 2**30 > 1e5 and r["step_time_s"] > 0

    def test_an_exception_is_an_error_row_and_the_sweep_goes_on(self):
        def broken(batch):
            raise RuntimeError(f"cannot build at batch {batch}\nsecond line")

        out = autopar.sweep([("broken", broken), "gpt-tiny"], [CPU2], [{"memory_limit": 1024}])
        assert [(r["model"], r["status"]) for r in out] == [
            ("broken", "error"), ("gpt-tiny", "no plan")]
        assert out[0]["reason"] == "RuntimeError: cannot build at batch 8"

    def test_a_factory_gets_the_batch_and_the_row_says_it(self):
        def mlp(batch):
            model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                        torch.nn.Linear(32, 1))
            return model, (torch.randn(batch, 16), torch.randn(batch, 1)), torch.nn.functional.mse_loss

        [r] = autopar.sweep([("mlp", mlp)], [CPU2], [{"mesh": {"dp": 2}}], batch=lambda g: 3 * g)
        assert (r["model"], r["status"], r["batch"], r["params"]) == ("mlp", "planned", 6, 577)
        assert r["mesh"] == "dp=2" and r["options"] == "autopar, mesh(dp=2)"

    def test_mistakes_in_the_sweep_itself_fail_before_planning(self):
        with pytest.raises(AutoparError, match="unknown model 'gpt-huge'"):
            autopar.sweep(["gpt-huge"], [CPU2])
        with pytest.raises(AutoparError, match="unknown cluster preset"):
            autopar.sweep(["gpt-tiny"], [("b200", 2)])
        with pytest.raises(AutoparError, match=r"unknown option\(s\) \['memory'\]"):
            autopar.sweep(["gpt-tiny"], [CPU2], [{"memory": 1}])
        with pytest.raises(AutoparError, match=r"unknown option\(s\) \['mesh'\]"):
            autopar.sweep(["gpt-tiny"], [CPU2], [{"manual": {}, "mesh": {"dp": 2}}])
        with pytest.raises(AutoparError, match="manual="):
            autopar.sweep(["gpt-tiny"], [CPU2], [{"manual": {"tensor": 2}}])
        with pytest.raises(AutoparError, match="takes lists"):
            autopar.sweep("gpt-tiny", [CPU2])

    def test_clusters_by_preset_name_and_node_count(self):
        out = autopar.sweep(["gpt-tiny"], ["h100-80g", ("h100-80g", 2)], [{"memory_limit": 1}])
        assert [(r["cluster"], r["nodes"], r["gpus"], r["batch"]) for r in out] == [
            ("h100-80g", 1, 8, 8), ("h100-80g", 2, 16, 16)]


def test_hand_configuration_defaults():
    assert resolve_manual({}, 8, 16) == {"tp": 1, "pp": 1, "dp": 8, "microbatch_size": 2}
    assert resolve_manual({"tp": 2, "pp": 2}, 8, 16) == {
        "tp": 2, "pp": 2, "dp": 2, "microbatch_size": 1}
    assert resolve_manual({"dp": 4, "microbatch_size": 3}, 8, 24)["tp"] == 1


def test_options_text():
    assert options_text({}) == "autopar"
    assert options_text({"memory_limit": 40 * 2**30, "label": "x"}) == "autopar, memory_limit=40 GiB"
    assert options_text({"mesh": {"pp": 2, "tp": 4}}) == "autopar, mesh(pp=2,tp=4)"
    hand = {"manual": {"tp": 8, "zero": 3}, "precision": TrainingPrecision.mixed_bf16()}
    assert options_text(hand) == "manual(tp=8, zero=3), precision=bf16-mixed"


class TestTables:
    def test_csv_round_trip(self, rows, tmp_path):
        to_csv(rows, tmp_path / "t.csv")
        assert read_csv(tmp_path / "t.csv") == rows

    def test_csv_keeps_a_users_own_column(self, rows, tmp_path):
        mine = [{**r, "note": f"n{i}"} for i, r in enumerate(rows)]
        to_csv(mine, tmp_path / "t.csv")
        back = read_csv(tmp_path / "t.csv")
        assert [r["note"] for r in back] == ["n0", "n1", "n2"]
        assert list(back[0]) == [*COLUMNS, "note"]

    def test_dataframe(self, rows):
        df = to_dataframe(rows)
        assert list(df.columns) == list(COLUMNS)
        assert len(df) == 3
        assert df.loc[0, "step_time_s"] == rows[0]["step_time_s"]
        assert list(df["status"]) == ["planned", "no plan", "planned"]

    def test_without_pandas_the_error_says_what_to_install(self, rows, monkeypatch):
        monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError
        with pytest.raises(MissingDependencyError, match=r"pip install 'autopar\[research\]'"):
            to_dataframe(rows)

    def test_without_matplotlib_the_error_says_what_to_install(self, rows, monkeypatch):
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
        with pytest.raises(MissingDependencyError, match="needs matplotlib"):
            autopar.sweep.plot(rows)

    def test_text_table(self, rows):
        text = to_text(rows).splitlines()
        assert text[0].split()[:4] == ["model", "GPUs", "label", "status"]
        assert "FSDP" in text[3] and "dp=2, zero3" in text[3]
        assert "no plan fits the memory limit" in text[2]


class TestPlot:
    def test_writes_a_png_with_a_line_per_label_of_planned_rows(self, rows, tmp_path):
        fig = autopar.sweep.plot(rows, x="gpus", y="step_time_s", path=tmp_path / "f.png")
        assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        lines = fig.axes[0].get_lines()
        assert sorted(line.get_label() for line in lines) == ["FSDP", "autopar"]
        autopar_line = next(line for line in lines if line.get_label() == "autopar")
        assert list(autopar_line.get_ydata()) == [rows[0]["step_time_s"]]
        assert fig.axes[0].get_ylabel() == "step time (s)"

    def test_by_a_column_and_an_unknown_column(self, rows):
        fig = autopar.sweep.plot(rows, x="gpus", y="mfu", by="model")
        assert [line.get_label() for line in fig.axes[0].get_lines()] == ["gpt-tiny"]
        assert len(fig.axes[0].get_lines()[0].get_xdata()) == 2  # the no-plan row left out
        with pytest.raises(AutoparError, match="no column 'speed'"):
            autopar.sweep.plot(rows, y="speed")


class TestCommandLine:
    def test_sweep_writes_the_csv_the_plot_and_json(self, rows, capsys, tmp_path):
        csv_path, png = tmp_path / "t.csv", tmp_path / "f.png"
        rc = main(["sweep", "gpt-tiny", "--cluster", "cpu", "--devices-per-node", "2",
                   "--nodes", "1", "--manual", "zero=3", "-o", str(csv_path), "--plot", str(png),
                   "--json"])
        out, err = capsys.readouterr()
        assert rc == 0
        printed = json.loads(out)  # stdout is the rows and nothing else
        assert printed == read_csv(csv_path)
        assert [r["label"] for r in printed] == ["autopar", "manual(zero=3)"]
        for mine, theirs in zip(printed, [rows[0], rows[2]]):
            assert mine["step_time_s"] == theirs["step_time_s"]
            assert mine["mesh"] == theirs["mesh"]
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert "[2/2] gpt-tiny on 2 x cpu (manual(zero=3))" in err

    def test_node_counts_and_memory_limits_multiply(self, capsys):
        rc = main(["sweep", "gpt-tiny", "bert-test", "--cluster", "h100-80g", "--nodes", "1", "2",
                   "--memory-limit", "1KiB", "2KiB"])
        out, _ = capsys.readouterr()
        assert rc == 0
        lines = out.splitlines()
        assert len(lines) == 1 + 2 * 2 * 2  # header, models x nodes x limits
        assert lines[1].split()[:2] == ["gpt-tiny", "8"] and lines[-1].split()[:2] == [
            "bert-test", "16"]
        assert all("no plan" in line for line in lines[1:])

    def test_mistakes_exit_2_before_planning(self, capsys):
        assert main(["sweep", "gpt-huge", "--cluster", "cpu"]) == 2
        assert "autopar: error: unknown model 'gpt-huge'" in capsys.readouterr().err
        assert main(["sweep", "gpt-tiny", "--cluster", "cpu", "--plot", "f.png", "--y",
                     "speed"]) == 2
        assert "no column 'speed'" in capsys.readouterr().err
        assert main(["sweep", "gpt-tiny", "--cluster", "cpu", "--manual", "tp"]) == 2
        assert "bad --manual 'tp'" in capsys.readouterr().err

    def test_parse_manual(self):
        assert parse_manual("tp=2,zero=3,checkpoint=full") == {
            "tp": 2, "zero": 3, "checkpoint": "full"}
        assert parse_manual("tp=2,sequence_parallel=true") == {"tp": 2, "sequence_parallel": True}
        assert parse_manual("tp=2,sequence_parallel=False") == {"tp": 2,
                                                                "sequence_parallel": False}


class TestProcesses:
    @pytest.mark.slow
    def test_cases_in_processes_give_the_same_rows_in_order(self, rows):
        out = autopar.sweep(["gpt-tiny"], [CPU2], [FSDP, {"memory_limit": 1024}], processes=2)
        assert [r["label"] for r in out] == ["FSDP", "autopar, memory_limit=1 KiB"]
        for mine, theirs in zip(out, [rows[2], rows[1]]):
            assert {k: v for k, v in mine.items() if k != "plan_s"} == {
                k: v for k, v in theirs.items() if k != "plan_s"}

    def test_a_case_over_the_timeout_is_a_timeout_row(self):
        [r] = autopar.sweep(["gpt-tiny"], [CPU2], [{}], timeout=0.5)
        assert r["status"] == "timeout" and r["reason"] == "over the limit of 0.5 s"
        assert r["step_time_s"] is None and 0.5 <= r["plan_s"] < 30

    def test_a_lambda_factory_cannot_go_to_a_process(self):
        with pytest.raises(AutoparError, match="define the factory at module level"):
            autopar.sweep([("x", lambda batch: None)], [CPU2], processes=2)


def test_the_sweep_module_never_imports_the_runtime():
    tree = ast.parse((Path(autopar.__file__).parent / "sweep.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert "autopar.api" in names
    assert not [n for n in names if n.startswith("autopar.runtime")]


def test_the_research_page_scripts_compile_and_name_what_exists():
    text = (Path(__file__).resolve().parents[1] / "docs" / "research.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3  # the first sweep and two studies
    for block in blocks:
        compile(block, "docs/research.md", "exec")
    used = set(re.findall(r"autopar\.sweep\.(\w+)", text))
    assert {"to_csv", "to_dataframe", "plot"} <= used
    assert [name for name in used if not hasattr(autopar.sweep, name)] == []
