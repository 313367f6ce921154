"""Ops that no sharding rule covers, models that use them, and rules for them: the tests of
`autopar.register_rule` (tests/planning/test_op_rules.py, tests/runtime/test_registered_rules.py).

    Prototypes     distances of embedded points to learned prototypes by `torch.cdist`, whose
                   `aten._cdist_forward` has no DTensor rule in torch 2.13 (the planner falls
                   back to replicating it)
    cdist_rule     a rule for it: the batch, or the rows of either input, split
    rule_example   docs/rules.md's example (a torch.library custom op, a model, its rule), run
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard

CDIST = torch.ops.aten._cdist_forward.default
N_PROTOTYPES = 16


class Prototypes(nn.Module):
    """Logits: minus the distance of each embedded point to each of 16 learned prototypes."""

    def __init__(self, d_in: int = 64, d: int = 256):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.prototypes = nn.Parameter(torch.randn(N_PROTOTYPES, d))

    def forward(self, x):  # (B, P, d_in) -> (B, P, N_PROTOTYPES)
        h = self.embed(x)
        # at most 25 rows a side: torch.cdist computes larger ones by matmuls instead
        return -torch.cdist(h, self.prototypes.expand(x.shape[0], -1, -1))


def prototypes_loss(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def prototypes_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(points (8, 24, 64), labels (8, 24)): one global batch, always the same."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 24, 64, generator=g), torch.randint(0, N_PROTOTYPES, (8, 24), generator=g)


def cdist_rule(node):
    """_cdist_forward(x1 (B, P, M), x2 (B, R, M), p, mode) -> (B, P, R): batches are
    independent, and so are the rows of x1 (against all of x2) and those of x2."""
    return [
        ((Replicate(), Replicate()), (Replicate(),)),
        ((Shard(0), Shard(0)), (Shard(0),)),
        ((Shard(1), Replicate()), (Shard(1),)),
        ((Replicate(), Shard(1)), (Shard(2),)),
    ]


def wrong_cdist_rule(node):
    """Wrong: splits the feature dim M, over which each distance sums."""
    return [((Shard(2), Shard(2)), (Replicate(),))]


DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "rules.md"


def rule_example_code(part: str) -> str:
    """The python block after `<!-- rule-example: {part} -->` in docs/rules.md."""
    text = DOC.read_text()
    found = re.search(rf"<!-- rule-example: {re.escape(part)} -->\s*```python\n(.*?)```", text,
                      re.S)
    assert found, f"{DOC} has no ```python block after <!-- rule-example: {part} -->"
    return found.group(1)


@functools.cache
def rule_example(*, plan: bool) -> dict:
    """The namespace of docs/rules.md's example: its first part (the custom op, `Model`, the
    rule, registered), and with `plan` its second part too, which plans offline (outside
    torchrun). Run once per process: torch.library defines an op only once."""
    ns = {"__name__": "rownorm"}
    if plan:
        ns.update(rule_example(plan=False))
        exec(rule_example_code("plan or train"), ns)
    else:
        exec(rule_example_code("op, model, rule"), ns)
    return ns
