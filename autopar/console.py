"""What the `autopar` command and the demo's workers share: a mesh as text, both ways, a
solver's banner kept off stdout, and an output path checked before any work."""

from __future__ import annotations

import contextlib
import os
import re
import sys

from autopar.errors import AutoparError

_AXIS_RE = re.compile(r"^([A-Za-z_]\w*)=(\d+)$")


def parse_mesh(text: str) -> dict[str, int]:
    """ "dp=2,tp=2" -> {"dp": 2, "tp": 2}; axes keep their order (the last is innermost)."""
    mesh: dict[str, int] = {}
    for part in text.split(","):
        m = _AXIS_RE.match(part.strip())
        if m is None:
            raise ValueError(
                f"bad mesh {text!r}: {part.strip()!r} is not axis=size; write comma-separated "
                "axis=size pairs, e.g. dp=2,tp=2"
            )
        axis, size = m.group(1), int(m.group(2))
        if axis in mesh:
            raise ValueError(f"bad mesh {text!r}: axis {axis!r} appears twice")
        if size < 1:
            raise ValueError(f"bad mesh {text!r}: axis {axis!r} has size {size}; sizes are >= 1")
        mesh[axis] = size
    return mesh


def mesh_text(mesh: dict[str, int]) -> str:
    """{"dp": 2, "tp": 2} -> "dp=2,tp=2" (what `parse_mesh` reads)."""
    return ",".join(f"{k}={v}" for k, v in mesh.items())


@contextlib.contextmanager
def solver_output_to_stderr(*, discard: bool = False):
    """Send what C libraries print on stdout (HiGHS prints a banner) to stderr meanwhile.

    Keeps stdout for our own output, so `--json` output parses. `discard=True` drops it instead.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (some embedded runners): nothing to protect
        yield
        return
    target = os.open(os.devnull, os.O_WRONLY) if discard else os.dup(2)
    try:
        os.dup2(target, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(target)


def check_output_path(path: str, option: str) -> None:
    """Fail at once, before any planning or drawing, when `path` could not be written: its
    folder does not exist, or it is a folder itself. A mistake found after an hour's sweep
    costs the hour, and a write that fails half way must not leave half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise AutoparError(f"{option} {path} is a folder: give a file name inside it")
    if not os.path.isdir(folder):
        raise AutoparError(f"{option} {path}: no folder {folder}; create it first "
                           f"(mkdir -p {folder}) or write somewhere else")
