"""Two systems' profiles side by side, from a `benchmarks/multigpu.py --profile-out` file: each
row of the "by self device time" tables (an ATen op or a kernel) as ms per step and calls per
step for both, largest difference first. The figures of the profile paragraph in
docs/benchmarks/2026-11-30-multigpu-x2-offline-plans/ come from

    python benchmarks/compare_profiles.py \
        docs/benchmarks/2026-11-30-multigpu-x2-offline-plans/gpt-1.3b-offline-plan-vs-fsdp2-profiles.txt \
        "gpt-1.3b autopar" "gpt-1.3b fsdp2"

The tables list each system's top rows only, so a row missing on one side may be below its cut.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.lib.profiling import device_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    ap.add_argument("a", help="header of the first system, e.g. 'gpt-1.3b autopar'")
    ap.add_argument("b", help="header of the second system")
    ap.add_argument("--rows", type=int, default=40)
    args = ap.parse_args(argv)
    text = open(args.profile, encoding="utf-8").read()
    a, b = device_rows(text, args.a), device_rows(text, args.b)
    names = sorted(set(a) | set(b), key=lambda n: -abs(a.get(n, (0, 0))[0] - b.get(n, (0, 0))[0]))
    print(
        f"{'ms/step':>8} {'calls':>6} | {'ms/step':>8} {'calls':>6} | {'b/a':>5} | row"
        f"   (a = {args.a}, b = {args.b})"
    )
    for n in names[: args.rows]:
        (ta, ca), (tb, cb) = a.get(n, (0.0, 0.0)), b.get(n, (0.0, 0.0))
        ratio = f"{tb / ta:5.2f}" if ta and tb else "    -"
        print(f"{ta:8.2f} {ca:6.1f} | {tb:8.2f} {cb:6.1f} | {ratio} | {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
