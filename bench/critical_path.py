"""Tree mode's critical path: from the round's last update landing to the new model, at N = 100 to 10,000.

Run: .venv/bin/python bench/critical_path.py [--n 100 1000 10000] [--fan-in 32] [--model cnn]

Only the path after the last upload is timed, so only what it reads is written for real: the last
group's updates (real update blobs), and every partial sum that exists by then (every group of every
level except the last update's ancestors). The last update's store event is then handled by the
aggregator in a fresh process, as a function would run: `to the new model` is from the last update's
write to the new model's (the file's own time); `warm s` is the whole handler (result, history and
state come after the model), as in a warm instance (modules imported, federation.json validated and the
manifest and example counts parsed at earlier events); `cold s` adds the interpreter start, the
imports, that validation and those parses. Beside them: the bytes the path reads and
the machine's memory bandwidth (a numpy copy of a 512 MB array), which bound it from below.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.aggregate import SHAPES, model_bytes  # noqa: E402
from bench.common import Steal, bandwidth_gbs, header, load, write  # noqa: E402


def prepare(root: str, model: str, n: int, fan_in: int) -> dict:
    """A round of n clients in tree mode with everything before the last update already folded."""
    from fedkeeper.core import blob, config, keys, rounds
    from fedkeeper.store.local import LocalStore

    store = LocalStore(root)
    cfg = config.from_dict({"rounds": 2, "aggregation": {"mode": "tree", "fan_in": fan_in},
                            "platforms": [{"name": "p", "clients": n}]})
    store.put_json(keys.FEDERATION, cfg.to_dict())
    store.put_json(keys.STATE, rounds.new_state())
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES[model].items()}
    store.put(keys.model(0), blob.encode(base, {"kind": "model", "round": 0}))
    ids = sorted(c.id for c in cfg.clients)
    m = rounds.Manifest(round=0, clients=[{"id": c, "platform": "p", "data": ""} for c in ids], model=keys.model(0),
                        deadline=time.time() + 86400, quorum=1, fan_in=fan_in)
    store.put(keys.manifest(0), rounds.dumps(m))
    levels = m.levels()
    last = ids[fan_in - 1]  # the last member of the first group: a full group, and a full group at every level
    ancestors = [m.group_of(last)]
    for _ in levels[1:-1]:
        ancestors.append(ancestors[-1] // fan_in)
    # A partial sum as a group fold writes it: the members' weighted sums and their bookkeeping.
    sums = {k: v * np.float32(50 * fan_in) for k, v in base.items()}
    for g in range(levels[0]):
        if g == ancestors[0]:
            continue
        members = m.groups[g]
        meta = {"kind": "partial", "round": 0, "level": 1, "group": g, "total": 50.0 * len(members),
                "count": len(members), "accepted": [[c, 50] for c in members], "rejected": [], "stragglers": [],
                "failed": [], "clients": {c: {"num_examples": 50, "metrics": {"train_loss": 0.5}, "timings": {
                    "download_s": 0.01, "train_s": 0.1, "started_at": 1e9}, "platform": "p"} for c in members}}
        store.put(keys.partial(0, g, 1), blob.encode(sums, meta))
    # The partials above level 1 are folded by the aggregator's own code, so they carry what it would carry.
    from fedkeeper.functions import protocol
    from fedkeeper.functions.context import Context, NullInvoker

    ctx = Context(store=store, invoker=NullInvoker())
    for level, count in enumerate(levels[1:-1], start=2):
        for g in range(count):
            if g != ancestors[level - 1]:
                assert protocol.fold_upper(ctx, cfg, m, level, g) == "folded"
    group = m.groups[ancestors[0]]
    for c in group:
        if c != last:
            w = {k: v + np.float32(0.01) for k, v in base.items()}
            store.put(keys.update(0, c), blob.encode(w, {"kind": "update", "round": 0, "client": c, "num_examples": 50,
                                                         "metrics": {}, "timings": {}}))
    # Level i's ancestor a folds its children of level i - 1 (the root, level len(levels), folds them all).
    reads = len(group) + sum(min(fan_in, levels[i - 2] - a * fan_in) for i, a in
                             zip(range(2, len(levels) + 1), ancestors[1:] + [0]))
    return {"last": last, "levels": levels, "reads_models": reads}


def run_one(root: str, last: str) -> dict:
    """In a fresh process: write the last update, handle its event, report warm and cold seconds."""
    t_start = time.time()
    from fedkeeper.core import blob, keys
    from fedkeeper.functions import aggregator
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    store = LocalStore(root)
    ctx = Context(store=store, invoker=NullInvoker())
    ctx.config()  # a warm function instance has validated federation.json at an earlier event
    # ... and has parsed the round's manifest and setup's example counts there (both list every client; a warm
    # instance parses them again only if their bytes change). `cold s` includes both parses.
    from fedkeeper.functions import protocol

    protocol.read_manifest(store, 0).group_of(last)
    protocol.known_examples(store)
    base = blob.decode(store.get(keys.model(0))).tensors
    w = {k: v + np.float32(0.01) for k, v in base.items()}
    data = blob.encode(w, {"kind": "update", "round": 0, "client": last, "num_examples": 50, "metrics": {}, "timings": {}})
    store.put(keys.update(0, last), data)
    landed, landed_wall = time.perf_counter(), time.time()
    out = aggregator.handle({"key": keys.update(0, last)}, ctx)
    warm = time.perf_counter() - landed
    assert out["status"] == "done", out
    # The new model's write time, from the file itself: the path to it may end before the handler returns.
    model_s = os.stat(Path(root) / keys.model(1)).st_mtime - landed_wall
    return {"warm_s": warm, "model_s": model_s, "cold_s": time.time() - t_start, "status": out["status"]}


def main() -> None:
    """Measure the critical path at each N; print a table and write bench/results/critical_path.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--fan-in", type=int, default=32)
    ap.add_argument("--model", default="cnn", choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the JSON here instead of bench/results/critical_path.json")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    bw = bandwidth_gbs()
    rows = []
    with Steal() as steal:
        for n in args.n:
            runs = []
            for _ in range(args.reps):
                with tempfile.TemporaryDirectory(prefix="fk-cp-") as root:
                    info = prepare(root, args.model, n, args.fan_in)
                    la = load()
                    out = subprocess.run([sys.executable, __file__, "--one", root, info["last"]], capture_output=True,
                                         text=True)
                    if out.returncode:
                        raise SystemExit(f"the measured aggregator failed:\n{out.stderr[-3000:]}")
                    runs.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), load=la))
            runs.sort(key=lambda x: x["warm_s"])
            mid = runs[len(runs) // 2]
            read_gb = info["reads_models"] * model_bytes(args.model) / 1e9
            row = {"n": n, "fan_in": args.fan_in, "model": args.model, "levels": info["levels"],
                   "reads_models": info["reads_models"], "warm_s": mid["warm_s"], "model_s": mid["model_s"],
                   "cold_s": mid["cold_s"],
                   "all_warm_s": [x["warm_s"] for x in runs], "load": mid["load"],
                   "bandwidth_floor_s": read_gb / bw}
            rows.append(row)
            print(f"N={n:6d} levels={info['levels']} reads {info['reads_models']} models: to the new model "
                  f"{row['model_s']:.3f} s, warm handler {row['warm_s']:.3f} s, "
                  f"cold {row['cold_s']:.3f} s (read-at-bandwidth floor {row['bandwidth_floor_s']:.3f} s, load {mid['load']:.1f})",
                  flush=True)
    print(header() + f"; memory bandwidth {bw:.1f} GB/s; host CPU steal during the run: {steal.percent:.1f}%")
    path = write("critical_path", {"steal_percent": steal.percent, "bandwidth_gbs": bw, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
