"""Shared bench helpers: machine facts, host CPU steal over a run, and writing results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# The libraries whose speed the figures depend on, recorded with every result.
SPEED_LIBRARIES = ("tensorflow-cpu", "tensorflow", "keras", "numpy", "flwr")
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


def load() -> float:
    """The 1-minute load average: other work on the machine while something was measured."""
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


def bandwidth_gbs() -> float:
    """This machine's copy bandwidth (read + write of a 512 MB array), best of three: the physical limit."""
    import numpy as np

    src = np.ones(128 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)
    dst.fill(0)
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def cpu(path: str = "/proc/cpuinfo") -> dict:
    """The processor's name, family and model numbers, and whether it has AVX-512 (from /proc/cpuinfo, Linux only).

    A VM's model name can be as vague as "AMD EPYC"; family and model tell its generations apart (AMD family
    25 is Zen 3 and Zen 4, 26 is Zen 5), and the vector width changes the speed of every fit.
    """
    info: dict = {}
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    info["name"] = value
                elif key in ("cpu family", "model") and value.isdigit():
                    info["family" if key == "cpu family" else "model"] = int(value)
                elif key == "flags":
                    info["avx512"] = "avx512f" in value.split()
                elif not line.strip() and info:
                    break  # the first processor's block describes them all on these machines
    except OSError:
        pass
    return info


def machine() -> dict:
    """Cores, memory, processor, Python and the numeric libraries of this machine."""
    from fedkeeper.federation import library_versions  # here, so that importing these helpers stays light

    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu(), "libraries": library_versions(SPEED_LIBRARIES)}


def header() -> str:
    """One line naming the machine, printed beside every table."""
    m = machine()
    c = m["cpu"]
    what = f"{c.get('name', 'unknown CPU')}, family {c.get('family', '?')} model {c.get('model', '?')}" + (
        ", AVX-512" if c.get("avx512") else "")
    return f"machine: {m['cores']} cores ({what}), {m['memory_gib']} GiB, Python {m['python']} ({m['machine']})"


def write(name: str, payload: dict, out: str | None = None) -> Path:
    """Write bench/results/<name>.json (or the file out, for trial runs) with the machine and a timestamp."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload},
                               indent=1))
    return path


def _host_busy() -> tuple[float, float]:
    """Host CPU seconds spent busy (not idle, not iowait, not stolen) and the monotonic clock, now."""
    t = _cpu_times()
    hz = os.sysconf("SC_CLK_TCK")
    busy = sum(t[:8]) - t[3] - t[4] - (t[7] if len(t) > 7 else 0)
    return busy / hz, time.monotonic()


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages of /proc/loadavg."""
    with open("/proc/loadavg") as fh:
        return [float(x) for x in fh.read().split()[:3]]


class Load:
    """Steal, load average and host busy CPU over a run, so a run taken beside other work says so.

    Given the measured processes' own CPU seconds, `record` adds `others_cores`: the host's busy CPU that they
    did not use, averaged over the run, in cores (0 on a quiet machine).
    """

    def __enter__(self) -> "Load":
        self.steal = Steal().__enter__()
        self.load_start = loadavg()
        self.busy0, self.t0 = _host_busy()
        return self

    def __exit__(self, *exc) -> None:
        self.steal.__exit__(*exc)
        self.load_end = loadavg()
        busy1, t1 = _host_busy()
        self.host_busy_s, self.seconds = busy1 - self.busy0, t1 - self.t0

    def record(self, own_cpu_s: float | None = None) -> dict:
        """Steal %, load averages at start and end, host busy cores and, given our CPU seconds, other processes' cores."""
        out = {"steal_percent": round(self.steal.percent, 2), "loadavg_start": self.load_start,
               "loadavg_end": self.load_end, "host_busy_cores": round(self.host_busy_s / max(self.seconds, 1e-9), 3)}
        if own_cpu_s is not None:
            out["own_cpu_s"] = round(own_cpu_s, 1)
            out["others_cores"] = round(max(0.0, self.host_busy_s - own_cpu_s) / max(self.seconds, 1e-9), 3)
        return out

    @staticmethod
    def describe(rec: dict) -> str:
        """One line for a record: steal, load average at the start and end, other processes' CPU."""
        s = (f"steal {rec['steal_percent']:.1f}%, load average {rec['loadavg_start'][0]:.2f} -> "
             f"{rec['loadavg_end'][0]:.2f}, host busy {rec['host_busy_cores']:.2f} cores")
        if "others_cores" in rec:
            s += f" of which other processes {rec['others_cores']:.2f}"
        return s
