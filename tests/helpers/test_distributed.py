"""`run_on_ranks` runs a function on N gloo ranks and surfaces a failing rank's traceback."""

import functools
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import run_on_ranks


def _sum_of_ranks() -> tuple[int, int, float]:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _fail_on_rank(bad_rank: int) -> int:
    if dist.get_rank() == bad_rank:
        raise ValueError(f"boom from the test on rank {bad_rank}")
    return dist.get_rank()


def _hang_on_rank_0() -> None:
    if dist.get_rank() == 0:
        time.sleep(120)  # far past the timeout: the parent must stop it


def test_all_reduce_of_rank_ids_on_4_ranks():
    assert run_on_ranks(_sum_of_ranks, 4) == [(r, 4, 6.0) for r in range(4)]


def test_exception_on_rank_2_names_the_rank_and_the_original_message():
    with pytest.raises(RuntimeError) as info:
        run_on_ranks(_fail_on_rank, 4, 2)
    message = str(info.value)
    assert "rank 2" in message
    assert "ValueError: boom from the test on rank 2" in message
    assert "_fail_on_rank" in message  # the child's traceback, not just the message


@pytest.mark.slow
def test_timeout_names_the_ranks_still_running():
    # Rank 1 may still be starting on a slow machine, so only rank 0 is certain to be named.
    with pytest.raises(TimeoutError, match=r"ranks \[0[,\]].* of 2 did not finish within 3 s"):
        run_on_ranks(_hang_on_rank_0, 2, timeout_s=3)


def _fail_late_on_rank_0() -> None:
    if dist.get_rank() == 0:
        time.sleep(0.3)  # the root cause arrives after a peer's complaint about it
        raise ValueError("the root cause")
    raise ConnectionResetError("a peer went away")


def test_a_later_error_of_another_rank_is_reported_too():
    with pytest.raises(RuntimeError) as info:
        run_on_ranks(_fail_late_on_rank_0, 2)
    message = str(info.value)
    assert "ConnectionResetError: a peer went away" in message
    assert "also: rank 0 raised: ValueError: the root cause" in message


# `prepare`: once, in the process the ranks fork from
_PREPARED: list = []


def _prepare(value) -> None:
    _PREPARED.append((value, os.getpid()))


def _what_was_prepared() -> list:
    return [(value, pid != os.getpid()) for value, pid in _PREPARED]


def test_prepare_runs_once_and_every_rank_has_what_it_made():
    results = run_on_ranks(_what_was_prepared, 4, prepare=functools.partial(_prepare, 7))
    assert results == [[(7, True)]] * 4  # made once, in another process (the ranks' parent)
    assert _PREPARED == []  # not in this one


def _raise_in_prepare() -> None:
    raise ValueError("boom in prepare")


def _die_on_rank_1() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    time.sleep(120)  # far past the test: the parent must stop it once rank 1 is reported


def test_a_prepared_launch_reports_a_failing_prepare_and_a_rank_that_dies():
    with pytest.raises(RuntimeError, match="prepare raised:(.|\n)*ValueError: boom in prepare"):
        run_on_ranks(_sum_of_ranks, 2, prepare=_raise_in_prepare)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 of 2 raised:\nexited with code 3"):
        run_on_ranks(_die_on_rank_1, 2, prepare=functools.partial(_prepare, 0), timeout_s=60)
    assert time.monotonic() - start < 30  # reported when it died, not at the timeout
