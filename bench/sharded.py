"""Sharded aggregation's memory: a ~1 GB model (a synthetic Dense stack) aggregated from N updates with M shards.

Run: .venv/bin/python bench/sharded.py [--updates 20] [--shards 8] [--layers 16] [--width 4096]

The round is planned in this process (headers only); then each shard is folded by the aggregator function
in a fresh process, as a platform would run it, and the last one also writes the model shard by shard.
Each prints its peak resident memory above its baseline (the process after its imports), which the
target compares with 3 × (model / M): the shard's running sum, the update slice being added and the
global model's slice that the norm bound measures against.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Steal, header, write  # noqa: E402


def _peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def prepare(root: str, updates: int, shards: int, layers: int, width: int) -> float:
    """Write the federation, its ~1 GB initial model and the updates (the model plus a per-client offset)."""
    from fedkeeper.core import blob, config, keys, rounds
    from fedkeeper.functions import trigger
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    store = LocalStore(root)
    cfg = config.from_dict({"rounds": 2, "aggregation": {"shards": shards},
                            "platforms": [{"name": "p", "clients": updates}]})
    store.put_json(keys.FEDERATION, cfg.to_dict())
    store.put_json(keys.STATE, rounds.new_state())
    rng = np.random.default_rng(0)
    base = {f"dense{i:02d}/kernel": rng.standard_normal((width, width), dtype=np.float32) * 0.01 for i in range(layers)}
    store.put(keys.model(0), blob.encode(base, {"kind": "model", "round": 0}))
    trigger.handle({"round": 0}, Context(store=store, invoker=NullInvoker()))
    for i, c in enumerate(sorted(cl.id for cl in cfg.clients)):
        w = {k: v + np.float32(0.001 * (i % 5)) for k, v in base.items()}
        store.put(keys.update(0, c), blob.encode(w, {"kind": "update", "round": 0, "client": c, "num_examples": 50 + i,
                                                     "metrics": {}, "timings": {}}))
        del w
    return sum(v.nbytes for v in base.values()) / 2**20


def run_one(root: str, shard: int) -> dict:
    """In a fresh process: fold one shard (and finalise if it is the last), report seconds and peak memory."""
    from fedkeeper.functions import aggregator
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    store = LocalStore(root)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    base = _rss_mb()
    t = time.perf_counter()
    out = aggregator.handle({"round": 0, "shard": shard, "phase": 1}, Context(store=store, invoker=NullInvoker()))
    secs = time.perf_counter() - t
    return {"shard": shard, "status": out["status"], "seconds": secs, "baseline_mb": base,
            "above_baseline_mb": _peak_mb() - base}


def main() -> None:
    """Prepare the round, plan it, fold each shard in a fresh process; print and write bench/results/sharded.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--dir", default=None, help="where to write the round (default: a temporary folder)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return
    from fedkeeper.core import keys
    from fedkeeper.functions import aggregator
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    root = tempfile.mkdtemp(prefix="fk-shard-", dir=args.dir)
    need = args.layers * args.width * args.width * 4 * (args.updates + 3)
    if shutil.disk_usage(root).free < need * 1.2:
        raise SystemExit(f"needs {need / 1e9:.1f} GB of free disk under {root}")
    try:
        with Steal() as steal:
            t = time.perf_counter()
            model_mb = prepare(root, args.updates, args.shards, args.layers, args.width)
            print(f"model {model_mb:.0f} MB, {args.updates} updates written in {time.perf_counter() - t:.0f} s", flush=True)
            inv = NullInvoker()
            t = time.perf_counter()
            plan_out = aggregator.handle({"round": 0}, Context(store=LocalStore(root), invoker=inv))
            plan_s = time.perf_counter() - t
            print(f"plan (headers only): {plan_s:.2f} s, {plan_out['status']}", flush=True)
            rows = []
            for i in range(args.shards):
                with open("/proc/loadavg") as fh:
                    load = float(fh.read().split()[0])
                out = subprocess.run([sys.executable, __file__, "--one", root, str(i)], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                row = dict(json.loads(out.stdout.strip().splitlines()[-1]), load=load)
                row["models_of_a_shard"] = row["above_baseline_mb"] / (model_mb / args.shards)
                rows.append(row)
                print(f"shard {i}: {row['status']:9} {row['seconds']:7.2f} s  peak {row['above_baseline_mb']:8.1f} MB above "
                      f"baseline = {row['models_of_a_shard']:.2f} x (model / M)  (load {load:.1f})", flush=True)
            done = LocalStore(root).exists(keys.model_index(1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(header() + f"; host CPU steal during the run: {steal.percent:.1f}%; model written sharded: {done}")
    path = write("sharded", {"steal_percent": steal.percent, "model_mb": model_mb, "shards": args.shards,
                             "updates": args.updates, "plan_s": plan_s, "rows": rows, "model_written": done})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
