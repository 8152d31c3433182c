"""Put/get throughput of one CNN-sized update (6.7 MB) per store backend: folder, SeaweedFS, fake-gcs-server, moto.

Run: .venv/bin/python bench/store_throughput.py [--reps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Steal, header, write  # noqa: E402
from fedkeeper.store import open_store  # noqa: E402
from tests import servers  # noqa: E402

CNN_PARAMS = 1_663_370


def measure(store, data: bytes, reps: int) -> dict:
    """Median put and get MB/s over reps, each on its own key."""
    puts, gets = [], []
    for i in range(reps):
        key = f"bench/update-{i}.safetensors"
        t = time.perf_counter()
        store.put(key, data)
        puts.append(time.perf_counter() - t)
        t = time.perf_counter()
        got = store.get(key)
        gets.append(time.perf_counter() - t)
        assert len(got) == len(data)
    mb = len(data) / 1e6
    return {"put_MBps": mb / statistics.median(puts), "get_MBps": mb / statistics.median(gets),
            "put_s_median": statistics.median(puts), "get_s_median": statistics.median(gets), "reps": reps}


def main() -> None:
    """Start each server, measure, print a table and write bench/results/store_throughput.json."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    data = os.urandom(CNN_PARAMS * 4 + 600)
    rows = {}
    with Steal() as steal:
        with tempfile.TemporaryDirectory() as tmp:
            rows["folder"] = measure(open_store(tmp), data, args.reps)
        weed = servers.start_seaweedfs(bucket="bench")
        try:
            os.environ.update(weed.env)
            rows["seaweedfs"] = measure(open_store(weed.url("b")), data, args.reps)
        finally:
            weed.stop()
        gcs = servers.start_fake_gcs(bucket="bench")
        try:
            os.environ["STORAGE_EMULATOR_HOST"] = gcs.host
            rows["fake-gcs-server"] = measure(open_store(gcs.url("b")), data, args.reps)
        finally:
            gcs.stop()
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        moto = servers.start_moto(bucket="bench")
        try:
            rows["moto"] = measure(open_store(moto.url("b")), data, args.reps)
        finally:
            moto.stop()
    print(header())
    print(f"one update of {len(data) / 1e6:.1f} MB, median of {args.reps}; host CPU steal during the run: {steal.percent:.1f}%")
    print(f"{'backend':18} {'put MB/s':>10} {'get MB/s':>10}")
    for name, r in rows.items():
        print(f"{name:18} {r['put_MBps']:10.1f} {r['get_MBps']:10.1f}")
    path = write("store_throughput", {"blob_bytes": len(data), "steal_percent": steal.percent, "backends": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
