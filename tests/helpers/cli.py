"""Run the `autopar` command as a user does, in a process of its own, and check its answer to
a mistake: exit status 2, a last line `autopar: error: ...`, no traceback.

A subprocess, not `autopar.cli.main` in this process, because what is under test includes
what only a fresh interpreter shows: an exception that escapes `main` (a traceback and exit
status 1), an optional package that is missing, stdout and stderr as the user sees them. Each
run imports torch and autopar again, about 3 s on the 2-core CI machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_autopar(*argv: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    """`python -m autopar.cli ARGV...` from the repository root; `pythonpath` goes first on
    the child's module path (to shadow a package with one that fails to import)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "autopar.cli", *map(str, argv)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def assert_user_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """The CLI refused a user's mistake as it promises: exit 2, no traceback, and a last line
    on stderr that starts `autopar: error:` and says `message`."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("autopar: error: "), proc.stderr
    assert message in lines[-1], lines[-1]
