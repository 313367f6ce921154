"""Slow single-threaded work of the session's tests, done by one worker process beside them.

pytest runs one test at a time in one process, and planning is single-threaded Python: on 2
cores, while a test plans, the other core idles. A test whose slow part is a pure function of
plain arguments says so with a mark, and reads the value with `value`:

    @background.work(make_text, "gpt-small")  # pytest.mark.background, with these arguments
    def test_plan_unchanged():
        text = background.value(make_text, "gpt-small")   # make_text("gpt-small")
        ...                                               # the asserts, here as before

Once the session's tests are collected (tests/conftest.py), the work the selected tests mark is
queued, in the order the tests will run (work that several tests mark, once), to one worker
process. The worker is forked from the fork server of tests/helpers/distributed.py (torch and
autopar imported once), uses one intra-op thread, and does one piece at a time while the tests
before run. `value` waits for work the worker has begun; work it has not begun is taken off
its queue and done in this process there and then, as with no worker. So the worker only ever
takes work off this process's hands, and a test run alone runs as before. A value is kept for
the session, for the other tests that read it.

The function must be module-level, depend on nothing but its arguments (it runs in another
process, with caches of its own), take hashable arguments and return something that pickles;
the asserts stay in the test, so that a failure reads as it did.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import threading

import pytest

MARK = "background"

# a future done at once calls _done in the thread that holds the lock
_lock = threading.RLock()
_queue: list[tuple] = []  # (fn, *args) not yet sent to the worker, in the order needed
_sent: dict[tuple, cf.Future] = {}  # (fn, *args) -> the worker's future, begun or done
_made: dict[tuple, object] = {}  # (fn, *args) -> its value, made in this process
_pool: cf.ProcessPoolExecutor | None = None


def work(fn, *args):
    """The mark of a test whose slow part is `fn(*args)` (for pytest.param's marks too; a test
    may carry several)."""
    return getattr(pytest.mark, MARK).with_args(fn, *args)


def value(fn, *args):
    """`fn(*args)`: the worker's, or made here if the worker has not begun it."""
    key = (fn, *args)
    with _lock:
        future = _sent.get(key)
        if future is None and key in _queue:
            _queue.remove(key)  # not begun: this process makes it
    if future is not None:
        return future.result()
    if key not in _made:
        _made[key] = fn(*args)
    return _made[key]


def command(argv: tuple[str, ...], env: tuple[tuple[str, str], ...] = (), cwd: str | None = None,
            timeout_s: float = 300) -> tuple[int, str, str]:
    """`argv` run as a program, `env` added to this environment: its exit status, stdout and
    stderr. The work of tests whose slow part is a program (a fresh interpreter, a launch)."""
    import os
    import subprocess

    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, cwd=cwd,
                          env=dict(os.environ, **dict(env)))
    return proc.returncode, proc.stdout, proc.stderr


def start(items) -> None:
    """Queue the work the `items` (the session's selected tests, in run order) mark, and
    start the worker if there is any."""
    global _pool
    work = []
    for item in items:
        for mark in item.iter_markers(MARK):
            if mark.args not in work:
                work.append(mark.args)
    if not work:
        return
    from tests.helpers.distributed import PRELOAD

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # the same server as run_on_ranks's
    with _lock:
        _queue.extend(work)
        _pool = cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_one_thread)
        _send_next()


def stop() -> None:
    global _pool
    with _lock:
        _queue.clear()
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def _send_next() -> None:
    """Hand the worker the next piece of work (with `_lock` held): one at a time, so that
    what it has not begun stays in `_queue`, for this process to take back."""
    if _pool is None or not _queue:
        return
    key = _queue[0]
    try:
        future = _pool.submit(*key)
    except Exception:  # the worker is gone (its last work says why): this process does the rest
        return
    _queue.pop(0)
    _sent[key] = future
    future.add_done_callback(_done)


def _done(_future) -> None:
    with _lock:
        _send_next()


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
