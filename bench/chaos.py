"""Run the chaos suite (tests/test_chaos.py) and keep its table in bench/results/chaos.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    """Run the suite with its results pointed at bench/results/chaos.json; prints the table."""
    env = dict(os.environ, FEDKEEPER_CHAOS_RESULTS=str(ROOT / "bench" / "results" / "chaos.json"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-n", "0", "tests/test_chaos.py", *sys.argv[1:]]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
