"""Plans do not change by accident: the README's offline plan and the demo's plan, re-made now,
equal byte for byte the files in tests/golden/ (written by `python -m tests.golden.make_golden`,
first at 26f9232, before issue 14's renovation)."""

import difflib

import pytest

from tests.golden import make_golden


def _assert_same(golden, made) -> None:
    want, got = golden.read_text(), made.read_text()
    if want != got:
        diff = "".join(list(difflib.unified_diff(
            want.splitlines(True), got.splitlines(True), str(golden), "re-made", n=1))[:60])
        pytest.fail(f"the plan differs from {golden.name} (re-make the golden files only when a "
                    f"change is meant to change plans):\n{diff}")


def test_demo_plan_unchanged(tmp_path):
    made = tmp_path / "demo.json"
    make_golden.demo_plan_json(made)
    _assert_same(make_golden.DEMO_4CPU, made)


@pytest.mark.slow
def test_gpt_small_two_h100_nodes_plan_unchanged(tmp_path):
    made = tmp_path / "gpt-small.json"
    make_golden.gpt_small_plan_json(made)
    _assert_same(make_golden.GPT_SMALL_16XH100, made)
