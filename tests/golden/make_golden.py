"""Write the plans that `tests/test_golden_plans.py` compares byte for byte.

Run it only when a change is meant to change plans (and say so in the commit):

    python -m tests.golden.make_golden

The files were first written at 26f9232, before the renovation of issue 14, which must leave
every plan as it was.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

HERE = Path(__file__).parent
GPT_SMALL_16XH100 = HERE / "gpt-small-2xh100-80g.json"
DEMO_4CPU = HERE / "demo-4cpu.json"
# the CLI line whose plan GPT_SMALL_16XH100 holds (README's "Command line")
GPT_SMALL_ARGS = ["plan", "gpt-small", "--cluster", "h100-80g", "--nodes", "2"]


def gpt_small_plan_json(path: Path) -> None:
    from autopar.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*GPT_SMALL_ARGS, "-o", str(path)]) == 0


def demo_plan_json(path: Path) -> None:
    """The plan `autopar demo` makes on rank 0 as it runs by default: 4 processes, its default
    mesh for 4 (dp=2 x tp=2), the rest searched."""
    import torch

    import autopar
    from autopar import demo

    world = 4
    data = demo.batches(1, demo.batch_size(world))
    torch.manual_seed(demo.SEED)
    model = demo.GPT(demo.CONFIG)
    plan = autopar.plan(model, demo.demo_cluster(world), data[0], loss_fn=demo.lm_loss,
                        mesh=demo.default_mesh(world))
    plan.save(path)


if __name__ == "__main__":
    gpt_small_plan_json(GPT_SMALL_16XH100)
    demo_plan_json(DEMO_4CPU)
    print(f"wrote {GPT_SMALL_16XH100} and {DEMO_4CPU}")
