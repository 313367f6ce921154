"""Run a function on N CPU processes joined by a gloo process group, for tests.

    def _sum_ranks():
        t = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(t)
        return t.item()

    assert run_on_ranks(_sum_ranks, 4) == [6.0] * 4

`fn` must be importable by the child processes (a module-level function) and its arguments and
return value picklable. The children are forked from a fork server that has imported torch and
autopar once (multiprocessing's "forkserver" start method): a fresh interpreter per rank would
import them again, about 3 s each, which on 2 cores made start-up most of an 8-rank test. The
server forks before any torch op has run, so no thread pool or process group is inherited; the
server lives as long as the test session. Each child sets the environment torchrun would (MASTER_ADDR, MASTER_PORT,
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), uses one intra-op thread, and joins a gloo group
before calling `fn`. If a rank raises, the parent raises with that rank and its traceback and
stops the others; if the ranks do not finish within `timeout_s`, it stops them all and says which
were still running.

`run_cases(fn, world_size, cases)` runs `fn(*case)` for several cases in one launch, each rank
taking them in turn, and gives each case's results apart.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

# imported once by the fork server, before it forks the ranks (an ImportError is ignored there)
PRELOAD = ["torch", "torch.distributed", "torch.export._trace", "autopar", "pytest",
           "tests.helpers.models", "tests.helpers.hf_preload"]


def run_on_ranks(fn, world_size: int, *args: Any, timeout_s: float = 300,
                 prepare=None) -> list:
    """Call `fn(*args)` on `world_size` gloo ranks; return their results in rank order.

    `prepare` (a module-level function, or a functools.partial of one): called once, in one
    process, before the ranks are forked from that process; what it leaves in memory (traces,
    see tests/helpers/traces.py) every rank has without making it again."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts, on the first call
    results_q = ctx.Queue()
    port = _free_port()
    if prepare is None:
        procs = [
            ctx.Process(
                target=_child,
                args=(fn, args, rank, world_size, port, timeout_s, results_q),
                name=f"rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
    else:  # one process prepares, then forks the ranks and reports those that die
        procs = [ctx.Process(target=_prepared, name="ranks", daemon=True,
                             args=(prepare, fn, args, world_size, port, timeout_s, results_q))]
    for p in procs:
        p.start()
    procs = procs * (world_size // len(procs))  # each rank's process, or their parent's
    try:
        results = _collect(procs, results_q, world_size, timeout_s)
    except BaseException:
        _stop(procs, grace_s=0.0)  # a rank failed or hung: the others would wait forever
        raise
    else:
        _stop(procs, grace_s=10.0)  # all returned: let them exit on their own
    finally:
        results_q.close()
    return results


def _prepared(prepare, fn, args, world_size: int, port: int, timeout_s: float,
              results_q) -> None:
    """`prepare()`, then fork the ranks (one intra-op thread here already, so no thread pool
    is forked); wait for them, and report a rank that dies without a result. Stopped
    (SIGTERM), it kills the ranks."""
    import torch

    torch.set_num_threads(1)
    try:
        prepare()
    except BaseException:
        results_q.put((0, False, "prepare raised:\n" + traceback.format_exc()))
        return
    ranks: dict[int, int] = {}

    def stop(signum, frame):
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(world_size):
        pid = os.fork()
        if pid == 0:  # the rank: report, flush the queue, exit without this process's cleanup
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 1
            try:
                _child(fn, args, rank, world_size, port, timeout_s, results_q)
                results_q.close()
                results_q.join_thread()
                code = 0
            finally:
                os._exit(code)
        ranks[pid] = rank
    while ranks:
        pid, status = os.wait()
        rank = ranks.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            results_q.put((rank, False, f"exited with code {code} without returning a result"))


def run_cases(fn, world_size: int, cases, *, timeout_s: float = 900, prepare=None) -> list[list]:
    """Call `fn(*case)` for each case in turn, in one launch of `world_size` gloo ranks; for
    each case, its result on every rank (in rank order).

    The ranks' later cases find the process's caches warm (DTensor's sharding rules, export's
    and the fake tensors'), and a `prepare` (see `run_on_ranks`) serves them all. A case that
    raises fails the launch at once, as `run_on_ranks` does: had the ranks gone on, those it
    left inside a collective would wait for it until `timeout_s`."""
    cases = [tuple(case) for case in cases]
    per_rank = run_on_ranks(_each_case, world_size, fn, cases, timeout_s=timeout_s,
                            prepare=prepare)
    return [[rank[k] for rank in per_rank] for k in range(len(cases))]


def _each_case(fn, cases: list[tuple]) -> list:
    return [fn(*case) for case in cases]


def _collect(procs, results_q, world_size: int, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    while len(results) < world_size:
        try:
            rank, ok, value = results_q.get(timeout=0.1)
        except queue.Empty:
            pass
        else:
            if not ok:
                raise RuntimeError(_failure(rank, value, procs, results_q, world_size))
            results[rank] = value
            continue
        # A rank that died without reporting (killed, segfault) never will: say so now.
        for rank, p in enumerate(procs):
            if rank not in results and p.exitcode is not None:
                # Its message may still be in flight: give the queue one last chance.
                try:
                    r, ok, value = results_q.get(timeout=1.0)
                except queue.Empty:
                    raise RuntimeError(
                        f"rank {rank} of {world_size} exited with code {p.exitcode} "
                        "without returning a result"
                    ) from None
                if not ok:
                    raise RuntimeError(f"rank {r} of {world_size} raised:\n{value}")
                results[r] = value
                break
        if time.monotonic() > deadline:
            running = [r for r in range(world_size) if r not in results]
            raise TimeoutError(
                f"ranks {running} of {world_size} did not finish within {timeout_s:g} s "
                "(a hung collective? a rank that skipped one?)"
            )
    return [results[r] for r in range(world_size)]


# what a rank raises when a peer failed or died first: never the cause
_PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "connectFullMesh",
                  "Read error", "Broken pipe")


def _failure(rank: int, value: str, procs, results_q, world_size: int) -> str:
    """The failure report: the other ranks' errors are waited for a moment (the first to
    arrive is often a peer's "connection reset", caused by the rank that failed, its error a
    moment later), and the report leads with the one that is not such an echo, its whole
    traceback, then a line for each other rank."""
    time.sleep(1.0)
    errors = [(rank, value)]
    while True:
        try:
            r, ok, v = results_q.get_nowait()
        except queue.Empty:
            break
        if not ok:
            errors.append((r, v))
    cause = next((e for e in errors if not any(m in e[1] for m in _PEER_FAILURES)), errors[0])
    lines = [f"rank {r} raised: {v.strip().splitlines()[-1]}" for r, v in errors if r != cause[0]]
    lines += [f"rank {r} exited with code {p.exitcode}" for r, p in enumerate(procs)
              if p.exitcode not in (None, 0) and procs.count(p) == 1]
    return (f"rank {cause[0]} of {world_size} raised:\n{cause[1]}"
            + "".join(f"\nalso: {line}" for line in lines))


def _stop(procs, *, grace_s: float) -> None:
    """Give the ranks `grace_s` to exit; terminate, then kill, any still running."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, args, rank: int, world_size: int, port: int, timeout_s: float, results_q) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # up to 8 ranks share a small CPU
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        try:
            result = fn(*args)
        finally:
            dist.destroy_process_group()
    except BaseException:
        results_q.put((rank, False, traceback.format_exc()))
    else:
        results_q.put((rank, True, result))
