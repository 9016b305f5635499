"""What a Spark task pays to import the executor side: `python -X importtime`, median of runs.

    python benchmarks/bench_import_time.py                         # kerasonspark._executor
    python benchmarks/bench_import_time.py --module kerasonspark._executor \\
        --python /path/to/other/python

Prints the median total import time, the number of modules loaded, and any driver-side module
(Flask, werkzeug, trainer, driver, cluster, compare, cli) among them. TensorFlow is not counted: the
executor imports it later, when a task configures its thread pools.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile

DRIVER_SIDE = (
    "flask",
    "werkzeug",
    "kerasonspark._trainer",
    "kerasonspark._driver",
    "kerasonspark._cluster",
    "kerasonspark._compare",
    "kerasonspark.cli",
)
LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| ( *\S.*)$")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--module", default="kerasonspark._executor")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    totals, modules = [], []
    with tempfile.TemporaryDirectory() as elsewhere:  # not the checkout: import what is installed
        for _ in range(args.runs):
            err = subprocess.run(
                [args.python, "-X", "importtime", "-c", f"import {args.module}"],
                cwd=elsewhere,
                capture_output=True,
                text=True,
                check=True,
            ).stderr
            # top-level lines (no indentation) carry the cumulative time of everything below them
            matches = [m for m in map(LINE.match, err.splitlines()) if m]
            totals.append(
                sum(int(m.group(1)) for m in matches if not m.group(2).startswith(" ")) / 1e3
            )
            modules = [m.group(2).strip() for m in matches]
    driver_side = sorted({name for name in modules if name.startswith(DRIVER_SIDE)})
    print(
        f"{args.module}: {statistics.median(totals):.0f} ms median of {args.runs} "
        f"({', '.join(f'{t:.0f}' for t in totals)}), {len(modules)} modules, driver-side: "
        f"{driver_side or 'none'}"
    )


if __name__ == "__main__":
    main()
