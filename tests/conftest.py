"""Shared pytest set-up: keep the parent process to two intra-op threads (small CI machines);
fixtures that test modules of several folders share."""

import pytest
import torch

from tests.helpers import models

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def gpt_on_four_h100s():
    """(model, (tokens, targets), cluster) of tests.helpers.models.gpt_on_four_h100s, built
    once per module: planning tests read it and change nothing."""
    return models.gpt_on_four_h100s()
