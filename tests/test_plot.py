"""`autopar explain PLAN --plot FIG` (autopar/plot.py): run as a user runs it, in a process of
its own; the PNG opened and checked to be a real picture of the plan; and its mistakes, each
exit 2 with one line and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autopar.cli import main
from autopar.plan import Plan
from autopar.plot import DPI, FIGSIZE_IN, STEP_COLOURS, step_parts
from tests.helpers.cli import REPO, assert_user_error, run_autopar

matplotlib_image = pytest.importorskip("matplotlib.image")
from matplotlib.colors import to_rgb  # noqa: E402  (after the skip: matplotlib is optional)

NOT_PIPELINED = REPO / "tests" / "golden" / "demo-4cpu.json"  # dp=2 x tp=2, no pipeline


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory) -> Path:
    """A real plan with a pipeline: gpt-tiny on pp=2 x dp=2, 1F1B, 2 microbatches a step (the
    search held to one case, so it plans in seconds)."""
    path = tmp_path_factory.mktemp("plot") / "pp2.json"
    assert main(["plan", "gpt-tiny", "--cluster", "cpu", "--devices-per-node", "4", "--mesh",
                 "pp=2,dp=2", "--schedule", "1F1B", "--microbatch-size", "2", "--data-parallel",
                 "replicate", "--checkpoint", "none", "--quiet", "-o", str(path)]) == 0
    return path


def pixels_of(png: Path, colour: str, rgb: np.ndarray) -> int:
    """How many pixels are exactly `colour` (a bar's face; antialiased edges are not)."""
    target = np.round(np.array(to_rgb(colour)) * 255).astype(int)
    return int((rgb == target).all(axis=-1).sum())


def draw(plan: Path, out: Path) -> np.ndarray:
    """Run the CLI and open its PNG: (height, width, 3) integers 0..255."""
    proc = run_autopar("explain", plan, "--plot", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith(f"wrote {out}")
    image = matplotlib_image.imread(out)
    return np.round(image[..., :3] * 255).astype(int)


@pytest.mark.parametrize("which", ["pipelined", "not-pipelined"])
def test_the_png_is_a_real_picture_of_the_plan(which, pipelined, tmp_path):
    plan = pipelined if which == "pipelined" else NOT_PIPELINED
    rgb = draw(plan, tmp_path / "out.png")
    assert rgb.shape == (FIGSIZE_IN[1] * DPI, FIGSIZE_IN[0] * DPI, 3)
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 100  # drawn, antialiased, not a fill
    assert 0.3 < (rgb == 255).all(axis=-1).mean() < 0.95  # neither blank nor a solid block
    for colour in ("#1f77b4", "#ff7f0e", "#d62728"):  # forward/parameters, backward, activations
        assert pixels_of(tmp_path / "out.png", colour, rgb) > 2000
    bubble = pixels_of(tmp_path / "out.png", STEP_COLOURS["bubble"], rgb)
    if which == "pipelined":  # 1F1B on 2 ranks, 2 microbatches: a third of the pipeline idles
        assert Plan.load(plan).predicted["bubble_fraction"] == pytest.approx(1 / 3)
        assert bubble > 2000
    else:
        assert bubble < 1000  # no bubble segment in the step's bar


def test_the_step_bar_adds_up_to_the_step(pipelined):
    for path in (pipelined, NOT_PIPELINED):
        p = Plan.load(path).predicted
        parts = step_parts(p)
        assert sum(seconds for _, _, seconds in parts) == pytest.approx(p["step_time_s"])
        assert all(seconds > 0 for _, _, seconds in parts)


def test_a_folder_that_does_not_exist_is_refused_before_anything(tmp_path):
    out = tmp_path / "no" / "such" / "folder" / "out.png"
    proc = run_autopar("explain", NOT_PIPELINED, "--plot", out)
    assert_user_error(proc, f"no folder {out.parent}")
    assert not out.parent.exists() and proc.stdout == ""


def test_without_matplotlib_one_line_and_the_old_file_kept(tmp_path):
    """matplotlib is optional: without it --plot says how to install it, and a picture already
    at the path is left as it was, with no temporary file beside it."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "matplotlib.py").write_text('raise ImportError("No module named \'matplotlib\'")\n')
    out_dir = tmp_path / "figures"
    out_dir.mkdir()
    before = b"an older picture"
    (out_dir / "out.png").write_bytes(before)
    proc = run_autopar("explain", NOT_PIPELINED, "--plot", out_dir / "out.png",
                       pythonpath=str(shadow))
    assert_user_error(proc, "pip install matplotlib")
    assert (out_dir / "out.png").read_bytes() == before
    assert [p.name for p in out_dir.iterdir()] == ["out.png"]

