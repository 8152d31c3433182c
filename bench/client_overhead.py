"""The client function's time against a bare `model.fit` on the same shard, cold (new process) and warm.

Warm invocations are broken down into the phases the client records (download and decode, model load,
holdout evaluation, training, upload, the rest of the handler), with the CPU seconds of training, so the
time the function adds to the bare fit is attributed, not guessed.

Run: .venv/bin/python bench/client_overhead.py [--model cnn] [--epochs 5] [--reps 5]
Data: the paper's task on ../shared/data/mnist10k.npz (or --data), 2 label shards per client.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("FEDKEEPER_TF_THREADS", "1")

from bench.common import Load, header, write  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"


def prepare(root: Path, data: Path, model: str, epochs: int) -> None:
    """A federation of 20 shard clients with round 0 open."""
    from fedkeeper.core import config
    from fedkeeper.federation import setup
    from fedkeeper.functions import trigger
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    cfg = config.from_dict({"model": {"name": model, "epochs": epochs}, "data": {"dataset": f"npz:{data}", "partition": "shards"},
                            "platforms": [{"name": "p", "clients": 20}]})
    store = LocalStore(root)
    setup(cfg, store, progress=lambda s: None)
    trigger.handle({"round": 0}, Context(store=store, invoker=NullInvoker()))


PHASES = ("download_s", "init_s", "holdout_eval_s", "train_s", "upload_s")


def client_call(root: str, phases: list | None = None) -> float:
    """One client invocation through the handler; returns its wall time (and appends its phase timings to phases)."""
    from fedkeeper.functions import client
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    t, c = time.perf_counter(), time.process_time()
    reply = client.handle({"round": 0, "client": "p-000", "mode": "train"},
                          Context(store=LocalStore(root), invoker=NullInvoker()))
    total = time.perf_counter() - t
    if phases is not None:
        tm = reply["timings"]
        row = {k: float(tm.get(k, 0.0)) for k in PHASES}
        row["other_s"] = total - sum(row.values())
        row["train_cpu_s"] = float(tm.get("train_cpu_s", 0.0))
        row["cpu_s"] = time.process_time() - c
        phases.append(row)
    return total


def bare_fit(root: str, model_cache: dict) -> float:
    """model.fit on the same shard with the same settings and compile flags, model in memory; returns the fit's time."""
    import numpy as np

    from fedkeeper import models
    from fedkeeper.core import config, keys
    from fedkeeper.store.local import LocalStore

    store = LocalStore(root)
    cfg = config.from_stored(store.get_json(keys.FEDERATION))
    if "m" not in model_cache:
        import io

        with np.load(io.BytesIO(store.get(keys.client_data("p-000")))) as f:
            model_cache["x"], model_cache["y"] = f["x_train"], f["y_train"]
        # Compiled as the client compiles it (XLA, steps per execution), so only the function's own work differs.
        model_cache["m"] = models.build(cfg.model.name, model_cache["x"].shape[1:], 10, jit_compile=cfg.model.jit_compile,
                                        steps_per_execution=cfg.model.steps_per_execution)
    t, c = time.perf_counter(), time.process_time()
    models.train(model_cache["m"], model_cache["x"], model_cache["y"], cfg.model.batch_size, cfg.model.epochs, 0)
    model_cache.setdefault("cpu", []).append(time.process_time() - c)
    return time.perf_counter() - t


def one(kind: str, root: str) -> dict:
    """A cold measurement in this fresh process, timed from interpreter start."""
    if kind == "client":
        client_call(root)
    else:
        bare_fit(root, {})
    return {"seconds_from_start": time.perf_counter() - T_START}


def main() -> None:
    """Cold (fresh processes) and warm (same process, median of reps) figures; writes bench/results/client_overhead.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn", choices=["nn", "cnn"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    with tempfile.TemporaryDirectory() as tmp, Load() as load:
        prepare(Path(tmp), Path(args.data), args.model, args.epochs)
        cold = {}
        for kind in ("client", "bare"):
            runs = [json.loads(subprocess.run([sys.executable, __file__, "--one", kind, tmp], capture_output=True,
                                              text=True, check=True).stdout.strip().splitlines()[-1])["seconds_from_start"]
                    for _ in range(max(1, args.reps // 2))]
            cold[kind] = statistics.median(runs)
        cache: dict = {}
        client_call(tmp)
        bare_fit(tmp, cache)  # warm both: traced functions, caches
        phases: list[dict] = []
        warm_client = statistics.median(client_call(tmp, phases) for _ in range(args.reps))
        warm_bare = statistics.median(bare_fit(tmp, cache) for _ in range(args.reps))
    rows = {"cold": {"client_s": cold["client"], "bare_fit_s": cold["bare"],
                     "overhead": cold["client"] / cold["bare"] - 1},
            "warm": {"client_s": warm_client, "bare_fit_s": warm_bare, "overhead": warm_client / warm_bare - 1}}
    rec = load.record()
    print(header() + f"; during the run: {Load.describe(rec)}")
    print(f"{args.model}, {args.epochs} epochs, batch 10, one 2-shard MNIST client; cold = fresh process incl. imports")
    print(f"{'':6} {'client function s':>18} {'bare model.fit s':>17} {'overhead':>9}")
    for k, r in rows.items():
        print(f"{k:6} {r['client_s']:18.3f} {r['bare_fit_s']:17.3f} {100 * r['overhead']:8.1f}%")
    med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    # CPU seconds barely depend on what else runs on the machine, unlike the wall times above.
    bare_cpu = statistics.median(cache["cpu"][-args.reps:])
    rows["warm_cpu"] = {"client_s": med["cpu_s"], "bare_fit_s": bare_cpu, "overhead": med["cpu_s"] / bare_cpu - 1}
    print(f"{'warm CPU':8} {med['cpu_s']:16.3f} {bare_cpu:17.3f} {100 * rows['warm_cpu']['overhead']:8.1f}%")
    print(f"warm invocation by phase (median of {args.reps}), against the bare fit's {warm_bare:.3f} s:")
    for k, v in med.items():
        print(f"  {k:16} {v:8.4f} s  {100 * v / warm_bare:6.1f}% of the bare fit")
    print(f"wrote {write('client_overhead', {'model': args.model, 'epochs': args.epochs, 'load': rec, **rows, 'warm_phases_s': med})}")


if __name__ == "__main__":
    main()
