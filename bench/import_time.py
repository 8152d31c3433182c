"""Cold import time of the trigger and the aggregator (what a function's cold start pays before any work)."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

MODULES = ("fedkeeper.functions.trigger", "fedkeeper.functions.aggregator", "fedkeeper.core.config")


def cold_import_ms(module: str) -> float:
    """Milliseconds to import `module` in a fresh interpreter (interpreter start-up excluded)."""
    code = f"import time; t = time.perf_counter(); import {module}; print((time.perf_counter() - t) * 1000)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    """Print the median of N fresh-process imports per module."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=9, help="fresh processes per module (default 9)")
    args = ap.parse_args()
    print(f"{'module':34} {'median ms':>10} {'min ms':>8}")
    for m in MODULES:
        xs = [cold_import_ms(m) for _ in range(args.n)]
        print(f"{m:34} {statistics.median(xs):10.1f} {min(xs):8.1f}")


if __name__ == "__main__":
    main()
