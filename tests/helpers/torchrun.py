"""Launch torchrun jobs from a test: start them (several at once for several "nodes"), wait with
a timeout, stop every process they started, and show their output when they fail."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_VARS = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "GROUP_RANK", "RANK",
                 "LOCAL_RANK", "ROLE_WORLD_SIZE", "ROLE_RANK")


def torchrun(launch: list[str], module: str, *args: str) -> list[str]:
    """The command that runs `python -m module args` under torchrun with `launch` options."""
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", module, *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(commands: list[list[str]], logs: list[Path], timeout_s: float,
           env: dict[str, str] | None = None) -> list[int | None]:
    """Start `commands` at once, each writing its output to its `logs` file, and wait for all;
    the exit status of each, None for one still running after `timeout_s` (then the whole job
    is stopped: torchrun starts each worker in a session of its own, so stopping torchrun's
    process group would leave the workers behind). `env`: variables to set besides."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    for var in TORCHRUN_VARS:  # a pytest itself run under torchrun must not leak its own
        env.pop(var, None)
    procs = []
    for cmd, log in zip(commands, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    if None in codes:
        stop([p for p in procs if p.poll() is None])
    return codes


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each torchrun (which stops its workers), then SIGKILL whatever of it and its
    workers is left after 10 s."""
    tree = {p.pid: descendants(p.pid) for p in procs}
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for pid in (pid for pids in tree.values() for pid in pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc; none found elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def report(codes: list[int | None], logs: list[Path]) -> str:
    return "".join(f"\n--- torchrun {i} (exit status {rc}; None: stopped at the timeout) ---\n"
                   f"{log.read_text(errors='replace')[-6000:]}"
                   for i, (rc, log) in enumerate(zip(codes, logs)))
