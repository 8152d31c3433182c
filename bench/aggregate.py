"""Aggregation time and peak memory for N updates of the paper's CNN and NN: FedKeeper's aggregator against
Flower's `aggregate` on the same arrays and against the floor (read the same bytes and sum them in numpy).

Run (Flower lives in a separate environment, never in the functions' requirements):
    python3 -m venv bench-venv && bench-venv/bin/pip install -e '.[tf,bench]'
    bench-venv/bin/python bench/aggregate.py --n 10 100 1000
    .venv/bin/python bench/aggregate.py --stores seaweedfs --n 10 100 1000 --name aggregate_seaweedfs  # needs .[all]
Each measurement runs in a fresh process, so peak memory (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Steal, bandwidth_gbs, header, write  # noqa: E402
from bench.common import load as _load  # noqa: E402

SHAPES = {
    "cnn": {"conv1/kernel": (5, 5, 1, 32), "conv1/bias": (32,), "conv2/kernel": (5, 5, 32, 64), "conv2/bias": (64,),
            "dense/kernel": (3136, 512), "dense/bias": (512,), "output/kernel": (512, 10), "output/bias": (10,)},
    "nn": {"hidden/kernel": (784, 500), "hidden/bias": (500,), "output/kernel": (500, 10), "output/bias": (10,)},
}


def model_bytes(model: str) -> int:
    """Size of one model's float32 tensors."""
    return 4 * sum(int(np.prod(s)) for s in SHAPES[model].values())


def prepare(url: str, model: str, n: int, norm_multiple: float | None = None) -> None:
    """A store holding a complete round of n updates (random weights, 50-150 examples each)."""
    from fedkeeper.core import blob, config, keys, rounds
    from fedkeeper.store import open_store

    store = open_store(url)
    strategy = {} if norm_multiple is None else {"norm_multiple": norm_multiple}
    cfg = config.from_dict({"rounds": 2, "platforms": [{"name": "p", "clients": n}], "strategy": strategy})
    store.put_json(keys.FEDERATION, cfg.to_dict())
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES[model].items()}
    store.put(keys.model(0), blob.encode(base, {"kind": "model", "round": 0}))
    ids = [c.id for c in cfg.clients]
    m = rounds.Manifest(round=0, clients=[{"id": c, "platform": "p", "data": ""} for c in ids], model=keys.model(0),
                        deadline=time.time() + 86400, quorum=n)
    store.put(keys.manifest(0), rounds.dumps(m))
    for i, cid in enumerate(ids):
        w = {k: v + np.float32(0.01 * (i % 7)) for k, v in base.items()}
        store.put(keys.update(0, cid), blob.encode(w, {"kind": "update", "round": 0, "client": cid,
                                                      "num_examples": int(50 + i % 100), "metrics": {}, "timings": {}}))


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """The process's high-water RSS (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> float:
    """Reset the high-water mark to the current RSS (Linux clear_refs 5), so the peak is the measured part's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _rss_mb()


def run_one(kind: str, url: str) -> dict:
    """One measurement in this (fresh) process: returns seconds, baseline and peak RSS."""
    from fedkeeper.core import blob, keys
    from fedkeeper.store import open_store

    store = open_store(url)
    update_keys = store.list("rounds/000000/updates/")
    if kind == "fedkeeper":
        from fedkeeper.functions import protocol
        from fedkeeper.functions.context import Context, NullInvoker

        ctx = Context(store=store, invoker=NullInvoker())
        cfg = ctx.config()
        manifest = protocol.read_manifest(store, 0)
        base = _reset_peak()
        t = time.perf_counter()
        # The aggregator's whole step: settle the round (list, records), validate and fold every update.
        out = protocol.aggregate(ctx, cfg, manifest, protocol.settle(store, manifest))
        secs = time.perf_counter() - t
        assert len(out["included"]) == len(update_keys), out["rejected"][:3]
    elif kind == "floor":
        # Read the same bytes and sum the float32 payloads: no parsing, checks or weighting.
        base = _reset_peak()
        t = time.perf_counter()
        acc = None
        for k in update_keys:
            data = store.get(k)
            hlen = int.from_bytes(data[:8], "little")
            arr = np.frombuffer(data, dtype=np.float32, offset=8 + hlen)
            if acc is None:
                acc = arr.copy()
            else:
                acc += arr
        secs = time.perf_counter() - t
    elif kind in ("flower", "flower_warm"):
        # Flower's legacy `aggregate` on in-memory arrays; warm: a second call in the same process.
        from flwr.server.strategy.aggregate import aggregate

        results = []
        for k in update_keys:
            b = blob.decode(store.get(k))
            results.append(([b.tensors[name] for name in sorted(b.tensors)], b.num_examples))
        base = _reset_peak()  # Flower's input must all be in memory: that part is not counted against it
        if kind == "flower_warm":
            aggregate(results)
            base = _reset_peak()
        t = time.perf_counter()
        aggregate(results)
        secs = time.perf_counter() - t
    elif kind in ("flower_default", "flower_default_warm"):
        # Flower 1.42's default FedAvg path: the replies' ArrayRecords (serialised arrays, as they arrive over
        # the wire) averaged by aggregate_arrayrecords, deserialisation included.
        from flwr.common import Array, ArrayRecord, MetricRecord, RecordDict
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

        records = []
        for k in update_keys:
            b = blob.decode(store.get(k))
            arrays = ArrayRecord({name: Array(np.ascontiguousarray(b.tensors[name])) for name in sorted(b.tensors)})
            records.append(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": b.num_examples})}))
        base = _reset_peak()
        if kind == "flower_default_warm":
            aggregate_arrayrecords(records, "num-examples")
            base = _reset_peak()
        t = time.perf_counter()
        aggregate_arrayrecords(records, "num-examples")
        secs = time.perf_counter() - t
    else:
        raise ValueError(kind)
    return {"seconds": secs, "baseline_mb": base, "peak_mb": _peak_mb(), "above_baseline_mb": _peak_mb() - base}


def measure(kind: str, url: str, reps: int) -> dict:
    """Median of reps fresh-process runs."""
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, __file__, "--one", kind, url], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["seconds"])
    return runs[len(runs) // 2] | {"all_seconds": [r["seconds"] for r in runs]}


def main() -> None:
    """Prepare rounds, measure each contender, print tables, write bench/results/aggregate.json and a plot."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--models", nargs="+", default=["cnn", "nn"], choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stores", nargs="+", default=["folder"], choices=["folder", "seaweedfs"],
                    help="where the updates lie: the folder store, and/or SeaweedFS's S3 API on loopback "
                         "(Flower's figure is the same there: its input is already in memory)")
    ap.add_argument("--flower-max-bytes", type=float, default=8e9,
                    help="skip Flower where its in-memory input and copies would exceed this (default 8 GB)")
    ap.add_argument("--name", default="aggregate",
                    help="results file bench/results/NAME.json (and plot, for the default name)")
    ap.add_argument("--norm-multiple", type=float, default=None,
                    help="strategy.norm_multiple of the measured federation (default: the config default; 0 = off)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    try:
        import flwr  # noqa: F401
        have_flower = True
    except ImportError:
        have_flower = False
        print("flwr is not installed here: Flower's column is skipped (see the module docstring)")
    args.bandwidth_gbs = bandwidth_gbs()
    print(f"memory copy bandwidth: {args.bandwidth_gbs:.1f} GB/s")
    rows = []
    with Steal() as steal, contextlib.ExitStack() as servers_up:
        weed = _seaweedfs(servers_up) if "seaweedfs" in args.stores else None
        for store_kind in args.stores:
            for model in args.models:
                for n in args.n:
                    row = _round_on(store_kind, weed, model, n, args, have_flower and store_kind == "folder")
                    if row:
                        rows.append(row)
                        print(_line(row), flush=True)
    print()
    print(header() + f"; host CPU steal during the run: {steal.percent:.1f}%")
    print(f"{'store':9} {'model':5} {'N':>5} {'fedkeeper s':>12} {'floor s':>8} {'bw s':>8} {'flwr old':>9} "
          f"{'old warm':>9} {'flwr 1.42':>9} {'1.42 warm':>9} {'vs floor':>9} {'vs bw':>9} {'peak (mod)':>10} {'load':>5}")
    print("fedkeeper: our aggregator's whole step in a fresh process, as a function runs; floor: read the same bytes "
          "and sum them in numpy; bw s: the updates' bytes at the machine's copy bandwidth; flwr old: Flower's legacy "
          "aggregate on in-memory arrays (fresh process, first call); old warm: its second call; flwr 1.42: Flower "
          "1.42's default FedAvg path (aggregate_arrayrecords, deserialisation included), fresh; 1.42 warm: second call")
    for row in rows:
        print(_line(row))
    path = write(args.name, {"steal_percent": steal.percent, "bandwidth_gbs": args.bandwidth_gbs, "rows": rows})
    print(f"wrote {path}")
    if args.name == "aggregate":
        _plot(rows)


def _round_on(store_kind: str, weed, model: str, n: int, args, with_flower: bool) -> dict | None:
    """Write a round of n updates into the store, measure each contender on it, then delete it."""
    need = model_bytes(model) * n
    with contextlib.ExitStack() as cleanup:
        if store_kind == "folder":
            url = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fk-agg-"))
            if shutil.disk_usage(url).free < need * 1.3:
                print(f"skip {model} N={n}: needs {need / 1e9:.1f} GB of free disk")
                return None
        else:
            url = weed.url(f"{model}-{n}")
            cleanup.callback(_empty, url)
        t = time.perf_counter()
        prepare(url, model, n, args.norm_multiple)
        print(f"{store_kind} {model} N={n}: wrote {need / 1e9:.2f} GB of updates in {time.perf_counter() - t:.1f} s",
              flush=True)
        row = {"store": store_kind, "model": model, "n": n, "model_mb": model_bytes(model) / 2**20,
               "fedkeeper": measure("fedkeeper", url, args.reps), "floor": measure("floor", url, args.reps),
               "bandwidth_s": need / (args.bandwidth_gbs * 1e9), "load": _load()}
        if with_flower and need * 3 < args.flower_max_bytes:
            for kind in ("flower", "flower_warm", "flower_default", "flower_default_warm"):
                row[kind] = measure(kind, url, args.reps)
        return row


def _empty(url: str) -> None:
    """Delete every object under a store URL."""
    from fedkeeper.store import open_store

    store = open_store(url)
    for key in store.list(""):
        store.delete(key)


def _seaweedfs(servers_up):
    """SeaweedFS on loopback for the whole run, stopped by PID when the run ends."""
    from tests import servers

    weed = servers.start_seaweedfs(bucket="bench")
    servers_up.callback(weed.stop)
    os.environ.update(weed.env)  # the measuring subprocesses inherit the credentials
    return weed


def _line(row: dict) -> str:
    fk, fl = row["fedkeeper"], row["floor"]
    fw = row.get("flower")
    models = fk["above_baseline_mb"] / row["model_mb"]
    nan = float("nan")
    sec = lambda k: row[k]["seconds"] if k in row else nan  # noqa: E731
    bw = row.get("bandwidth_s", nan)
    return (f"{row.get('store', 'folder'):9} {row['model']:5} {row['n']:>5} {fk['seconds']:12.3f} {fl['seconds']:8.3f} "
            f"{bw:8.3f} {fw['seconds'] if fw else nan:9.3f} {sec('flower_warm'):9.3f} {sec('flower_default'):9.3f} "
            f"{sec('flower_default_warm'):9.3f} {fk['seconds'] / fl['seconds']:8.2f}x {fk['seconds'] / bw:8.2f}x "
            f"{models:10.2f} {row.get('load', nan):5.1f}")


def _plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in rows if r.get("store", "folder") == "folder"]
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        ns = [r["n"] for r in rs]
        ax1.plot(ns, [r["fedkeeper"]["seconds"] for r in rs], "o-", label=f"FedKeeper {model}")
        ax1.plot(ns, [r["floor"]["seconds"] for r in rs], "k:", label=f"floor {model}")
        fw = [r for r in rs if "flower" in r]
        if fw:
            ax1.plot([r["n"] for r in fw], [r["flower"]["seconds"] for r in fw], "s--", label=f"Flower aggregate {model}")
        ax2.plot(ns, [r["fedkeeper"]["above_baseline_mb"] / r["model_mb"] for r in rs], "o-", label=f"FedKeeper {model}")
        if fw:
            ax2.plot([r["n"] for r in fw], [r["flower"]["above_baseline_mb"] / r["model_mb"] for r in fw], "s--",
                     label=f"Flower aggregate {model}")
    ax1.set(xscale="log", yscale="log", xlabel="updates N", ylabel="seconds", title="Aggregation time")
    ax2.set(xscale="log", yscale="log", xlabel="updates N", ylabel="peak memory above baseline (models)",
            title="Aggregation memory")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out = Path(__file__).resolve().parent / "plots"
    out.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "aggregate.png", dpi=110)


if __name__ == "__main__":
    main()
