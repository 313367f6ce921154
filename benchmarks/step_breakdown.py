"""Where a training step's device time goes, measured, beside what autopar's cost model charges.

Prints, for each row of a `benchmarks/multigpu.py --json` file that was profiled on a GPU
(`--profile SYSTEM`), its kernel time per step by category beside what the cost model charges
the same categories (`benchmarks.lib.breakdown`, which says what each figure means):

    python benchmarks/step_breakdown.py docs/benchmarks/REPORT/FILE.json   # the table of each row
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.lib.breakdown import compare


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="a benchmarks/multigpu.py --json file")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        rows = json.load(f)["runs"]
    tables = [compare(r) for r in rows if (r.get("profile") or {}).get("device")]
    if not tables:
        print(
            f"{args.json}: no row has a device breakdown (run with --profile on a GPU)",
            file=sys.stderr,
        )
        return 1
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
