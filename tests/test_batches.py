"""Batches as users pass them: keyword arguments, positional ones with None, the model's own
loss in a structured output; traced, run on 2 CPU ranks, and wrong batches told apart."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.batches import BatchLayout
from autopar.errors import AutoparError, TraceError
from autopar.trace import trace
from tests.helpers.distributed import run_on_ranks
from tests.helpers.models import fast_cpu_cluster

VOCAB, WIDTH = 32, 16


@dataclass
class Output:  # like a Hugging Face ModelOutput, as a plain dataclass
    loss: torch.Tensor | None
    logits: torch.Tensor


class Tagger(nn.Module):
    """Called like a Hugging Face model: keywords, an optional mask, labels for its own loss,
    a cache it would return unless use_cache=False."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=True):
        if use_cache:  # a Hugging Face decoder would build a DynamicCache: no graph output
            raise RuntimeError("use_cache=True")
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return Output(loss=loss, logits=logits)


def tagger_batch(seed: int = 0, batch: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, 8),
            "labels": torch.randint(0, VOCAB, (batch, 8), generator=g)}


def test_keyword_batch_with_the_models_own_loss_traces():
    traced = trace(Tagger(), tagger_batch())  # autopar passes use_cache=False
    assert traced.target is None
    assert len(traced.inputs) == 3  # input_ids, attention_mask, labels
    loss = traced.node(traced.loss_node).meta["val"]
    logits = traced.node(traced.output_node).meta["val"]
    assert loss.numel() == 1 and tuple(logits.shape) == (4, 8, VOCAB)


def test_positional_batch_with_none_traces():
    model = Tagger()
    ids = tagger_batch()["input_ids"]
    traced = trace(model, (ids, None), loss_fn=lambda out, y: F.cross_entropy(
        out.logits.flatten(0, 1), y.flatten()), target=ids)
    assert len(traced.inputs) == 2  # ids and the target; None is part of the graph
    assert traced.target == traced.inputs[-1]


def test_a_model_without_a_loss_and_no_loss_fn_is_told_what_to_do():
    batch = tagger_batch()
    del batch["labels"]
    with pytest.raises(TraceError, match="no scalar loss.*labels among the inputs"):
        trace(Tagger(), batch)


def test_layout_checks_the_batch_a_user_passes():
    layout = BatchLayout.of({"input_ids": torch.zeros(2), "mask": None}, has_target=False)
    assert len(layout.tensors({"input_ids": torch.ones(2), "mask": None})) == 1
    with pytest.raises(AutoparError, match=r"keywords \['input_ids'\].*keywords"):
        layout.tensors({"input_ids": torch.ones(2)})
    with pytest.raises(AutoparError, match="was None when the model was traced"):
        layout.tensors({"input_ids": torch.ones(2), "mask": 3})
    with pytest.raises(AutoparError, match="labels among the inputs"):
        layout.tensors({"input_ids": torch.ones(2), "mask": None}, torch.ones(2))
    positional = BatchLayout.of((torch.zeros(2),), has_target=True)
    assert len(positional.tensors(torch.ones(2), torch.ones(2))) == 2  # x and (x,): one call
    with pytest.raises(AutoparError, match="pass the target too"):
        positional.tensors(torch.ones(2))


STEPS = 3


def _train(parallel: bool) -> tuple[list[float], list[float]]:
    """Losses of SGD steps, and the logits' sum of an evaluation call after them."""
    torch.manual_seed(0)
    model = Tagger()
    if parallel:
        model = autopar.autoparallelize(model, fast_cpu_cluster(2), tagger_batch(),
                                        mesh={"dp": 2})
        step = model.train_step
    else:
        def step(batch):
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            return loss.detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for i in range(STEPS):
        losses.append(float(step(tagger_batch(seed=i))))
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        evaluation = tagger_batch(seed=9)
        if parallel:
            logits = model(**evaluation)  # ParallelModel returns the logits
        else:
            logits = model(**evaluation, use_cache=False).logits
    return losses, [float(logits.sum())]


def test_keyword_batches_train_and_evaluate_as_one_process():
    want = _train(parallel=False)
    for got in run_on_ranks(_train, 2, True):
        assert got[0] == pytest.approx(want[0], rel=1e-5)
        assert got[1] == pytest.approx(want[1], rel=1e-4)
