"""The `autopar` command: plan, explain, demo, and clear errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autopar.cli import main
from autopar.cluster import Cluster
from autopar.console import parse_mesh
from autopar.models.registry import BUILTIN_MODELS
from autopar.plan import Plan
from autopar.units import format_count, parse_bytes
from tests.helpers.cli import assert_user_error, run_autopar

PLAN_ARGS = [
    "plan",
    "gpt-tiny",
    "--cluster",
    "cpu",
    "--devices-per-node",
    "4",
    "--mesh",
    "dp=2,tp=2",
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "plan.json"
    assert main([*PLAN_ARGS, "-o", str(path)]) == 0
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


class TestPlan:
    def test_writes_a_loadable_plan(self, plan_file):
        plan = Plan.load(plan_file)
        assert plan.mesh == {"dp": 2, "tp": 2}
        assert plan.model == "GPT"
        assert "blocks.0.attn.qkv.weight" in plan.parameters

    def test_prints_summary_and_json(self, capsys, tmp_path):
        rc, out, _ = run_cli(capsys, *PLAN_ARGS, "--json", "-o", str(tmp_path / "p.json"))
        assert rc == 0
        d = json.loads(out)  # stdout is the plan and nothing else (solver banners go to stderr)
        assert d["mesh"] == {"dp": 2, "tp": 2}
        assert Plan.from_dict(d).to_json() == (tmp_path / "p.json").read_text()


class TestPlanOptions:
    """--precision, --schedule, --data-parallel, --microbatch-size, --checkpoint: the search
    space and the precision of `autopar.plan`, from the command line."""

    def plan(self, capsys, *extra: str, args=PLAN_ARGS) -> dict:
        rc, out, _ = run_cli(capsys, *args, "--json", "--quiet", *extra)
        assert rc == 0
        return json.loads(out)

    def test_bf16_mixed_counts_state_as_zero_does_and_prices_bf16(self, capsys):
        fp32 = self.plan(capsys)["predicted"]
        mixed = self.plan(capsys, "--precision", "bf16-mixed")["predicted"]
        # bf16 weights and gradients (2 + 2 bytes), fp32 master and AdamW state (4 + 8)
        assert mixed["memory_parameters_bytes"] == fp32["memory_parameters_bytes"] / 2
        assert mixed["memory_gradients_bytes"] == fp32["memory_gradients_bytes"] / 2
        assert mixed["memory_optimizer_bytes"] == fp32["memory_optimizer_bytes"] * 1.5
        # the model is cast: its activations are bf16 too
        assert mixed["memory_activations_bytes"] < fp32["memory_activations_bytes"]

    def test_search_space_flags(self, capsys):
        args = ["plan", "gpt-tiny", "--cluster", "cpu", "--devices-per-node", "4"]
        d = self.plan(capsys, "--mesh", "pp=2,dp=2", "--schedule", "GPipe",
                      "--microbatch-size", "1", "--data-parallel", "zero3",
                      "--checkpoint", "none", args=args)
        assert d["pipeline"]["schedule"] == "GPipe"
        assert d["pipeline"]["microbatch_size"] == 2  # 1 a dp rank, 2 dp ranks
        assert d["data_parallel"] == "zero3"
        assert not d["checkpoint"]

    @pytest.mark.parametrize(("flag", "value", "message"), [
        ("--precision", "fp8", "invalid choice: 'fp8'"),
        ("--schedule", "1F2B", "invalid choice: '1F2B'"),
        ("--data-parallel", "zero4", "invalid choice: 'zero4'"),
        ("--microbatch-size", "0", "--microbatch-size"),
    ])
    def test_bad_values(self, flag, value, message):
        proc = subprocess.run([sys.executable, "-m", "autopar.cli", *PLAN_ARGS, flag, value],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2 and message in proc.stderr
        assert "Traceback" not in proc.stderr


def test_clusters_lists_every_preset(capsys):
    from autopar.cluster import PRESETS, Cluster

    rc, out, _ = run_cli(capsys, "clusters", "--json")
    rows = json.loads(out)
    assert rc == 0 and [r["name"] for r in rows] == list(PRESETS)
    for r in rows:  # each row as the preset itself says
        c = Cluster.preset(r["name"])
        assert (r["memory_bytes"], r["devices_per_node"], r["calibrated"]) == (
            c.device.memory_bytes, c.devices_per_node, c.device.calibration is not None)
    rc, out, _ = run_cli(capsys, "clusters")
    assert rc == 0 and all(name in out for name in PRESETS)
    assert "989 TFLOP/s bfloat16" in out and "calibrated" in out and "datasheet" in out


class TestSimulate:
    def test_report_text_and_json(self, capsys, plan_file):
        rc, out, _ = run_cli(capsys, "simulate", str(plan_file))
        assert rc == 0
        assert "step time" in out and "MFU" in out and "peak memory" in out
        rc, out, _ = run_cli(capsys, "simulate", str(plan_file), "--json")
        report = json.loads(out)
        assert rc == 0 and report["step_time_s"] > 0
        assert report["step_time_s"] == pytest.approx(Plan.load(plan_file).predicted["step_time_s"])

    def test_missing_plan_file(self, capsys, tmp_path):
        rc, _, err = run_cli(capsys, "simulate", str(tmp_path / "none.json"))
        assert rc == 2 and err.startswith("autopar: error:") and "Traceback" not in err


class TestExplain:
    def test_summary_and_ops(self, capsys, plan_file):
        rc, out, _ = run_cli(capsys, "explain", str(plan_file))
        assert rc == 0
        assert "mesh       dp=2 x tp=2" in out
        assert "addmm" in out

    def test_ops_by_layer(self, capsys, plan_file):
        rc, out, _ = run_cli(capsys, "explain", str(plan_file), "--model", "gpt-tiny")
        assert rc == 0
        assert "ops by layer" in out
        assert "\n  blocks.0.attn.qkv\n" in out

    def test_json(self, capsys, plan_file):
        rc, out, _ = run_cli(capsys, "explain", str(plan_file), "--json")
        assert rc == 0
        assert json.loads(out) == Plan.load(plan_file).to_dict()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "gpt-nano", "--cluster", "cpu"], "unknown model 'gpt-nano'"),
        (["plan", "gpt-tiny", "--cluster", "tpu-v9"], "unknown cluster 'tpu-v9'"),
        (["plan", "gpt-tiny", "--cluster", "cpu", "--mesh", "dp=3,tp=2"], "multiply to"),
        (["plan", "gpt-tiny", "--cluster", "cpu", "--mesh", "dp2"], "bad mesh 'dp2'"),
        (["plan", "gpt-tiny", "--cluster", "cpu", "--memory-limit", "40XB"], "bad memory size"),
        # one mesh: the error path is under test, not the search over meshes (the search's own
        # "smallest peak" over every mesh: tests/planning/test_intra_op.py); 1 KiB holds no
        # model's state, which is said before any trace
        (["plan", "gpt-tiny", "--cluster", "cpu", "--mesh", "dp=2,tp=2", "--memory-limit", "1KiB"],
         "Use at least"),
        (["plan", "no_such_module:build", "--cluster", "cpu"], "cannot import 'no_such_module'"),
        (["explain", "no/such/plan.json"], "no plan file at no/such/plan.json"),
        (["plan", "vit-test", "--cluster", "cpu", "--seq", "8"], "image model"),
        (["plan", "bert-test", "--cluster", "cpu", "--seq", "64"], "exceeds its 32 learned"),
    ],
    ids=[
        "model",
        "cluster",
        "mesh-size",
        "mesh-typo",
        "memory-unit",
        "memory-1KiB",
        "factory",
        "plan-file",
        "seq-of-an-image-model",
        "seq-beyond-positions",
    ],
)
def test_user_mistakes_exit_2_without_traceback(capsys, argv, message):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert err.startswith("autopar: error: ")
    assert message in err
    assert "Traceback" not in out + err


def test_explain_with_the_wrong_model_says_so(capsys, plan_file):
    rc, _, err = run_cli(capsys, "explain", str(plan_file), "--model", "gpt-tiny", "--seq", "4")
    assert rc == 2
    assert "graph fingerprint" in err


def test_factory_model(capsys, tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def build(batch=4):\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),\n"
        "                                torch.nn.Linear(32, 1))\n"
        "    x, y = torch.randn(batch, 16), torch.randn(batch, 1)\n"
        "    return model, (x, y), torch.nn.functional.mse_loss\n"
    )
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(
        capsys,
        "plan",
        "mymodels:build",
        "--cluster",
        "cpu",
        "--devices-per-node",
        "2",
        "--batch",
        "8",
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["model"] == "Sequential"


class TestModels:
    def test_lists_every_builtin_with_its_size_and_inputs(self, capsys):
        rc, out, _ = run_cli(capsys, "models")
        assert rc == 0
        names = [line.split()[0] for line in out.splitlines()[1:]]
        assert names == list(BUILTIN_MODELS)
        rows = {line.split()[0]: line.split(None, 3)[1:] for line in out.splitlines()[1:]}
        assert rows["gpt3-175b"] == ["GPT", "175B", "tokens (B, 2048)"]
        assert rows["t5-11b"] == ["T5", "11.3B", "tokens (B, 512), decoder tokens (B, 114)"]
        assert rows["swin-t"] == ["Swin", "28.3M", "images (B, 3, 224, 224)"]

    def test_json(self, capsys):
        rc, out, _ = run_cli(capsys, "models", "--json")
        rows = {r["name"]: r for r in json.loads(out)}
        assert rc == 0 and set(rows) == set(BUILTIN_MODELS)
        assert rows["llama3-8b"] == {"name": "llama3-8b", "family": "Llama",
                                     "parameters": 8_030_261_248, "inputs": "tokens (B, 8192)",
                                     "takes_seq": True}
        assert rows["vit-b16"]["takes_seq"] is False


class TestParsing:
    def test_mesh(self):
        assert parse_mesh("dp=2,tp=4") == {"dp": 2, "tp": 4}
        assert list(parse_mesh("tp=2, dp=2")) == ["tp", "dp"]  # order kept
        for bad in ("dp2", "dp=2,dp=2", "dp=0", "dp=x", ""):
            with pytest.raises(ValueError):
                parse_mesh(bad)

    def test_bytes(self):
        assert parse_bytes("40GiB") == 40 * 2**30
        assert parse_bytes("80GB") == 80e9
        assert parse_bytes("1e9") == 1e9
        assert parse_bytes("512 mib") == 512 * 2**20
        for bad in ("40XB", "GiB", "-1GB", "0"):
            with pytest.raises(ValueError):
                parse_bytes(bad)

    def test_counts(self):
        assert [format_count(n) for n in (6_658_596_864, 125_262_336, 90_432, 999, 1.75e14)] == [
            "6.66B", "125M", "90.4K", "999", "175T"]


@pytest.mark.slow
def test_demo_runs_and_losses_agree():
    """The README's main command, once, end to end: torchrun, 4 gloo ranks, 2 steps."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "autopar.cli", "demo", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "losses agree within 1e-05" in proc.stdout
    assert "local (" in proc.stdout  # at least one weight is split under tp
    assert "step | autopar loss (4 procs) | single-process loss | rel. diff" in proc.stdout


def test_plan_shows_its_progress_on_stderr_and_quiet_hides_it(capsys):
    """A long plan says what it solves and the best so far on stderr; stdout stays the plan."""
    args = ["plan", "gpt-tiny", "--cluster", "cpu", "--mesh", "dp=2,tp=2", "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mesh"]
    # the first pass's lines, "[k/n] mesh, ...": n pairs, none ruled out on one fixed mesh
    progress = [line for line in err.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert progress and progress[0].startswith(f"[1/{len(progress)}] ")
    assert "searched" in err
    assert main([*args, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mesh"] and "[1/" not in err and "searched" not in err


class TestBadInputAsSubprocess:
    """Issue 18's bad inputs, each run as the user runs the command (tests/helpers/cli.py): a
    one-line reason, exit 2, no traceback, and nothing written at -o. The other mistakes above
    run in this process, through `main`."""

    @pytest.fixture(scope="class")
    def files(self, tmp_path_factory) -> dict[str, Path]:
        """Broken inputs: cluster files and plan files cut short, of another kind or version."""
        d = tmp_path_factory.mktemp("bad")
        golden = (REPO / "tests" / "golden" / "demo-4cpu.json").read_text()
        newer = json.loads(golden)
        newer["schema_version"] += 1
        cluster = json.dumps(Cluster.preset("cpu").to_dict())
        texts = {
            "cluster-cut": cluster[: len(cluster) // 2],
            "cluster-no-device": json.dumps({"name": "mine", "nodes": 1, "devices_per_node": 4}),
            "plan-cut": golden[: len(golden) // 2],
            "plan-newer": json.dumps(newer),
            "plan": golden,
        }
        paths = {name: d / f"{name}.json" for name in texts}
        for name, text in texts.items():
            paths[name].write_text(text)
        paths["plan-binary"] = d / "plan-binary.json"
        paths["plan-binary"].write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")  # a picture, not a plan
        paths["folder"] = d
        return paths

    PLAN = ["plan", "gpt-tiny", "--cluster", "cpu", "--quiet"]
    CASES = {  # id: (argv, with "{name}" for a file of `files`; what the one line says)
        "unknown-model": (["plan", "gpt-nano", "--cluster", "cpu"], "unknown model 'gpt-nano'"),
        "unknown-preset": (["plan", "gpt-tiny", "--cluster", "tpu-v9"],
                           "unknown cluster 'tpu-v9'"),
        "cluster-file-cut-short": (["plan", "gpt-tiny", "--cluster", "{cluster-cut}"],
                                   "cannot read cluster file"),
        "cluster-file-without-device": (["plan", "gpt-tiny", "--cluster",
                                         "{cluster-no-device}"], "device is missing"),
        "batch-zero": ([*PLAN, "--batch", "0"], "--batch must be >= 1, got 0"),
        "batch-negative": ([*PLAN, "--batch", "-4"], "--batch must be >= 1, got -4"),
        "mesh-not-the-world": ([*PLAN, "--devices-per-node", "4", "--mesh", "dp=3"],
                               "multiply to"),
        "mesh-not-the-batch": ([*PLAN, "--devices-per-node", "4", "--batch", "6", "--mesh",
                                "dp=4"], "the batch must divide by 4"),
        "mesh-more-stages-than-layers": ([*PLAN, "--devices-per-node", "8", "--mesh", "pp=8"],
                                         "needs at least 8 layers"),
        "plan-cut-short": (["explain", "{plan-cut}"], "is not valid JSON"),
        "plan-not-text": (["simulate", "{plan-binary}"], "not UTF-8 text"),
        "plan-a-folder": (["explain", "{folder}"], "is a folder, not a plan file"),
        "plan-newer-schema": (["explain", "{plan-newer}"], "newer than this autopar reads"),
        "plan-another-model": (["explain", "{plan}", "--model", "llama-test"],
                               "graph fingerprint"),
    }

    @pytest.mark.parametrize("case", list(CASES))
    def test_one_line_exit_2_nothing_written(self, case, files, tmp_path):
        """`plan` writes to -o: a new path stays absent; where the mistake is found only after
        the trace (a mesh the model cannot take), a plan already there stays as it was."""
        argv, message = self.CASES[case]
        argv = [files[a[1:-1]] if a.startswith("{") else a for a in argv]
        out = tmp_path / "out.json"
        old = case.startswith("mesh-") and b'{"an": "older plan"}\n'
        if old:
            out.write_bytes(old)
        proc = run_autopar(*argv, *(["-o", out] if argv[0] == "plan" else []))
        assert_user_error(proc, message)
        assert (out.read_bytes() == old) if old else not out.exists()
        assert [p.name for p in tmp_path.iterdir()] == (["out.json"] if old else [])

    def test_an_output_folder_that_does_not_exist_fails_before_planning(self, tmp_path):
        out = tmp_path / "missing" / "plan.json"
        proc = run_autopar(*self.PLAN, "-o", out)
        assert_user_error(proc, f"-o {out}: no folder {out.parent}")
        assert not out.parent.exists()
        assert "searched" not in proc.stderr  # refused before the search, not after it


@pytest.mark.parametrize(("argv", "message"), [
    (["--nodes", "0"], "--nodes must be >= 1, got 0"),
    (["--devices-per-node", "0"], "--devices-per-node must be >= 1, got 0"),
])
def test_zero_nodes_is_a_mistake_not_the_default(capsys, argv, message):
    rc, _, err = run_cli(capsys, "plan", "gpt-tiny", "--cluster", "cpu", *argv)
    assert rc == 2 and message in err


def test_a_cluster_file_that_is_not_text(capsys, tmp_path):
    (tmp_path / "cluster.json").write_bytes(b"\xff\xfe\x00")
    rc, _, err = run_cli(capsys, "plan", "gpt-tiny", "--cluster", str(tmp_path / "cluster.json"))
    assert rc == 2 and "not UTF-8 text" in err and "Traceback" not in err
