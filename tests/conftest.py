"""Shared pytest set-up: keep the parent process to two intra-op threads (small CI machines);
the worker that does marked tests' slow work beside them (tests/helpers/background.py);
fixtures that test modules of several folders share."""

import pytest
import torch

from tests.helpers import background, models

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{background.MARK}(fn, *args): fn(*args), the test's slow part, is done by "
        "the session's worker process (tests/helpers/background.py); the test reads it with "
        "background.value(fn, *args)")


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        background.start(session.items)


def pytest_sessionfinish(session):
    background.stop()


@pytest.fixture(scope="module")
def gpt_on_four_h100s():
    """(model, (tokens, targets), cluster) of tests.helpers.models.gpt_on_four_h100s, built
    once per module: planning tests read it and change nothing."""
    return models.gpt_on_four_h100s()
