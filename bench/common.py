"""Shared bench helpers: machine facts, host CPU steal over a run, and writing results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_times() -> list[int]:
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


class Steal:
    """Share of CPU time the host stole between start and stop (the `steal` column of /proc/stat)."""

    def __enter__(self) -> "Steal":
        self.t0 = _cpu_times()
        self.percent = 0.0
        return self

    def __exit__(self, *exc) -> None:
        t1 = _cpu_times()
        d = [b - a for a, b in zip(self.t0, t1)]
        total = sum(d[:8]) or 1
        self.percent = 100.0 * (d[7] if len(d) > 7 else 0) / total


def machine() -> dict:
    """Cores, memory and Python of this machine."""
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "python": platform.python_version(),
            "machine": platform.machine()}


def header() -> str:
    """One line naming the machine, printed beside every table."""
    m = machine()
    return f"machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']} ({m['machine']})"


def write(name: str, payload: dict) -> Path:
    """Write bench/results/<name>.json with the machine and a timestamp."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload},
                               indent=1))
    return path
