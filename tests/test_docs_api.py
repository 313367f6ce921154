"""docs/api.md is what docs/make_api.py writes from today's code, so the API reference cannot
fall behind the docstrings or `autopar.__all__`; and the generator's Markdown is right on small
docstrings whose output is known."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

import autopar

ROOT = Path(__file__).resolve().parent.parent
API_MD = ROOT / "docs" / "api.md"


def _load_make_api():
    spec = importlib.util.spec_from_file_location("docs_make_api", ROOT / "docs" / "make_api.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_api = _load_make_api()


@pytest.fixture(scope="module")
def rendered() -> str:
    return make_api.render()


def test_api_md_is_up_to_date(rendered):
    committed = API_MD.read_text()
    if committed != rendered:
        diff = "".join(list(difflib.unified_diff(
            committed.splitlines(True), rendered.splitlines(True), "docs/api.md (committed)",
            "docs/api.md (from the code)"))[:60])
        pytest.fail(f"docs/api.md is out of date: run `{make_api.COMMAND}` and commit it\n{diff}")


def test_the_output_is_the_same_twice(rendered):
    assert make_api.render() == rendered


def test_every_public_name_has_an_entry(rendered):
    headings = set(re.findall(r"^### `([^`]+)`$", rendered, flags=re.M))
    missing = [n for n in autopar.__all__ if f"autopar.{n}" not in headings]
    assert not missing, f"no entry for {missing} in docs/api.md"


def test_what_users_call_on_returned_objects_is_documented(rendered):
    members = set(re.findall(r"^#### `([^`]+)`$", rendered, flags=re.M))
    for cls in ("ParallelModel", "PipelinedModel"):
        for name in ("train_step", "eval_step", "__call__", "clip_grad_norm_", "plan"):
            assert f"{cls}.{name}" in members
    assert {"Plan.save", "Plan.load", "Plan.summary", "Plan.to_json", "Cluster.preset",
            "Cluster.from_file", "Cluster.detect", "TrainingPrecision.named",
            "TrainingPrecision.fp32", "TrainingPrecision.mixed_bf16", "Report.summary",
            "ShardedOptimizer.step", "ShardedOptimizer.zero_grad"} <= members
    assert "(no docstring)" not in rendered


def test_index_links_lead_to_headings(rendered):
    lines = rendered.splitlines()
    anchors = set(make_api.anchors(lines).values())
    links = re.findall(r"\]\(#([^)]+)\)", rendered)
    assert len(links) >= len(autopar.__all__)
    assert set(links) <= anchors
    # `autopar.plan` and `autopar.Plan` are one anchor lower-cased: GitHub numbers the second
    assert {"autoparplan", "autoparplan-1"} <= anchors


def test_a_name_not_in_the_sections_still_gets_an_entry(monkeypatch):
    def newly_public(x: int) -> int:
        """A function made public after make_api's SECTIONS were written."""
        return x

    class NewError(autopar.AutoparError):
        """An error made public later."""

    monkeypatch.setattr(autopar, "newly_public", newly_public, raising=False)
    monkeypatch.setattr(autopar, "NewError", NewError, raising=False)
    monkeypatch.setattr(autopar, "__all__", [*autopar.__all__, "newly_public", "NewError"])
    text = make_api.render()
    assert "## Other public names" in text
    assert "autopar.newly_public(x: int) -> int" in text
    errors = text.index("## Errors and warnings")
    assert text.index("### `autopar.NewError`") > errors


def test_markdown_of_docstrings():
    doc = "\n".join([
        "What it does.",
        "",
        "Attributes",
        "----------",
        "step_time_s : float",
        "    One training step.",
        "a, b : int",
        "    Two at once.",
        "",
        "models: zoo names, or pairs",
        "    of names and factories.",
        "clusters: presets.",
        "",
        "    pm = autopar.autoparallelize(model)",
        "    pm.train_step(x, y)",
        "",
        ">>> 1 + 1",
        "2",
    ])
    assert make_api.markdown(doc) == "\n".join([
        "What it does.",
        "",
        "**Attributes**",
        "",
        "- `step_time_s` (*float*): One training step.",
        "- `a`, `b` (*int*): Two at once.",
        "",
        "- `models`: zoo names, or pairs of names and factories.",
        "- `clusters`: presets.",
        "",
        "```python",
        "pm = autopar.autoparallelize(model)",
        "pm.train_step(x, y)",
        "```",
        "",
        "```python",
        ">>> 1 + 1",
        "2",
        "```",
        "",
    ])


def test_a_plain_paragraph_stays_a_paragraph():
    doc = "tp, pp, dp: the mesh (pp outermost, tp innermost, so tp stays inside a\nnode). More."
    assert make_api.markdown(doc) == doc + "\n"


def test_wrap_never_starts_a_line_with_a_list_marker():
    text = "bytes " * 15 + "2 + 2 + 12 bytes a parameter " + "word " * 20
    for width_line in make_api.wrap(text, "  ")[1:]:
        assert not re.match(r"\s*([-+*>#]|\d+[.)])\s", width_line), width_line
    assert all(len(line) <= 100 for line in make_api.wrap(text, "  "))


def test_signature_is_one_line_or_one_parameter_a_line():
    def short(a: int, *, b: str = "x") -> None: ...

    def long(first_parameter_name: int, second_parameter_name: str = "a default value",
             *, third: float = 1.0, fourth: dict | None = None) -> None: ...

    assert make_api.signature("f", short) == "f(a: int, *, b: str = 'x') -> None"
    assert make_api.signature("f", long).splitlines() == [
        "f(",
        "    first_parameter_name: int,",
        "    second_parameter_name: str = 'a default value',",
        "    *,",
        "    third: float = 1.0,",
        "    fourth: dict | None = None,",
        ") -> None",
    ]


def test_check_mode_says_whether_the_file_is_current(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "api.md"
    stale.write_text("old\n")
    monkeypatch.setattr(make_api, "OUT", stale)
    assert make_api.main(["--check"]) == 1
    assert "python docs/make_api.py" in capsys.readouterr().err
    assert make_api.main([]) == 0
    assert make_api.main(["--check"]) == 0
