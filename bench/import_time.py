"""Cold import time of the trigger and the aggregator (what a function's cold start pays before any work)."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

MODULES = ("fedkeeper.functions.trigger", "fedkeeper.functions.aggregator", "fedkeeper.core.config")


def cold_import_ms(module: str) -> tuple[float, float]:
    """(wall, CPU) milliseconds to import `module` in a fresh interpreter, start-up excluded.

    CPU time is the steadier figure on a shared machine: it leaves out the time spent waiting for a core.
    """
    code = (f"import time; t, c = time.perf_counter(), time.process_time(); import {module}; "
            "print((time.perf_counter() - t) * 1000, (time.process_time() - c) * 1000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    """Print the median of N fresh-process imports per module."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=9, help="fresh processes per module (default 9)")
    args = ap.parse_args()
    print(f"{'module':34} {'wall median ms':>15} {'CPU median ms':>14} {'CPU min ms':>11}")
    for m in MODULES:
        runs = [cold_import_ms(m) for _ in range(args.n)]
        wall, cpu = [w for w, _ in runs], [c for _, c in runs]
        print(f"{m:34} {statistics.median(wall):15.1f} {statistics.median(cpu):14.1f} {min(cpu):11.1f}")


if __name__ == "__main__":
    main()
