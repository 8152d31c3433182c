"""Worker layouts for a round of client fits: how many warm workers and TensorFlow threads each, on this machine.

Every layout trains the same 20 clients' shards (bare compiled fits, warm: each worker process builds and
compiles its model and fits once before the clock starts); the clients are dealt round-robin to the
workers, which start together. Printed per layout: wall time for all fits, CPU seconds, and the wall time
against the best layout.

A layout is WORKERSxTHREADS[xINTER][:FITS][p]. A trailing p pins worker i to CPU i (mod the CPUs this
process may use), so a worker's Python, inter-op and intra-op threads hand work to each other on one core
instead of waking on a core the other worker holds (on the Zen 5 machine of BENCHMARKS §6 pinning made fits
slower, not faster). FITS > 1 is an instance serving several invocations at once
(a platform's instance_concurrency): the worker runs FITS fits at a time, each on its own Python thread with
its own model, all sharing the process's TensorFlow runtime and its THREADS intra-op threads.

Run: .venv/bin/python bench/worker_layout.py --model cnn --epochs 5 --layouts 2x1 1x2 1x2:2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from bench.common import Load, header, write  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"


def worker(root: str, cids: list[str], threads: int, inter: int, fits: int, args: dict, ready, go, out,
           cpu: int | None = None) -> None:
    """Build and warm `fits` models with these thread counts, wait for the start, fit each client, report times."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    os.environ["FEDKEEPER_TF_THREADS"] = str(threads)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    from fedkeeper import data as datamod
    from fedkeeper import models
    from fedkeeper.core import blob, keys
    from fedkeeper.store.local import LocalStore

    store = LocalStore(root)
    meta = store.get_json("data/meta.json")
    init = blob.decode(store.get(keys.model(0))).tensors
    shards = {c: datamod.unpack(store.get(keys.client_data(c))) for c in cids}
    # One model per concurrent fit, as the client's warm cache keeps one per thread.
    built = [models.build(args["model"], tuple(meta["input_shape"]), meta["num_classes"], jit_compile=args["jit"],
                          steps_per_execution=args["spe"]) for _ in range(fits)]

    def fit(model, c: str) -> None:
        models.set_weights(model, init)
        models.reset_optimizer(model)
        models.train(model, shards[c]["x_train"], shards[c]["y_train"], 10, args["epochs"], 0)

    def serve(k: int) -> None:
        for c in cids[k::fits]:
            fit(built[k], c)

    for m in built:
        fit(m, cids[0])
    ready.release()
    go.wait()
    t, c0 = time.perf_counter(), time.process_time()
    slots = [threading.Thread(target=serve, args=(k,)) for k in range(fits)]
    for th in slots:
        th.start()
    for th in slots:
        th.join()
    out.put((time.perf_counter() - t, time.process_time() - c0))


def parse_layout(text: str) -> tuple[int, int, int, int, bool]:
    """WORKERSxTHREADS[xINTER][:FITS][p] -> (workers, intra-op threads, inter-op threads, fits per worker, pinned)."""
    pinned = text.endswith("p")
    body, colon, fits = text.removesuffix("p").partition(":")
    try:
        parts = [int(x) for x in body.split("x")]
        k = int(fits) if colon else 1
    except ValueError:
        parts, k = [], 0
    if not 2 <= len(parts) <= 3 or min(parts + [k]) < 1:
        raise SystemExit(f"layout {text!r}: write WORKERSxTHREADS[xINTER][:FITS][p] with positive integers, "
                         "e.g. 2x1, 2x1p or 1x2:2")
    return parts[0], parts[1], parts[2] if len(parts) > 2 else parts[1], k, pinned


def run_layout(root: str, ids: list[str], workers: int, threads: int, inter: int, args: dict, fits: int = 1,
               pin: bool = False) -> dict:
    """Time one layout: `workers` processes with `threads` intra-op (and `inter` inter-op) threads, `fits` at once each."""
    ctx = mp.get_context("spawn")
    cpus = sorted(os.sched_getaffinity(0))
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(root, ids[i::workers], threads, inter, fits, args, ready, go, out,
                                                  cpus[i % len(cpus)] if pin else None))
             for i in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    t = time.perf_counter()
    go.set()
    got = [out.get() for _ in procs]
    wall = time.perf_counter() - t
    for p in procs:
        p.join()
    return {"workers": workers, "threads": threads, "inter_op_threads": inter, "fits_at_once": fits, "pinned": pin,
            "wall_s": wall,
            "cpu_s": sum(g[1] for g in got), "slowest_worker_s": max(g[0] for g in got)}


def main() -> None:
    """Measure each layout in turn; print and write bench/results/worker_layout_<model>.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn", choices=["nn", "cnn"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--layouts", nargs="+", default=["2x1", "1x2", "2x2"],
                    help="WORKERSxTHREADS[xINTER][:FITS] (inter-op threads default to the intra-op count; FITS: "
                         "fits one worker runs at once on threads, default 1)")
    ap.add_argument("--no-jit", dest="jit", action="store_false")
    ap.add_argument("--steps-per-execution", type=int, default=32)
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    from fedkeeper.core import config
    from fedkeeper.federation import setup
    from fedkeeper.store.local import LocalStore

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.from_dict({"model": {"name": args.model}, "data": {"dataset": f"npz:{args.data}",
                                "partition": "shards", "holdout_fraction": 0.0},
                                "platforms": [{"name": "p", "clients": args.clients}]})
        setup(cfg, LocalStore(tmp), progress=lambda s: None)
        ids = [c.id for c in cfg.clients]
        spec = {"model": args.model, "epochs": args.epochs, "jit": args.jit, "spe": args.steps_per_execution}
        layouts = [(lay, parse_layout(lay)) for lay in args.layouts]  # all checked before the first run
        for lay, (w, th, inter, fits, pinned) in layouts:
            with Load() as load:
                row = run_layout(tmp, ids, w, th, inter, spec, fits, pinned)
            row.update(layout=lay, load=load.record(row["cpu_s"]))
            rows.append(row)
            print(f"{lay:>8}: {row['wall_s']:6.1f} s wall, {row['cpu_s']:6.1f} CPU s; {Load.describe(row['load'])}",
                  flush=True)
    best = min(r["wall_s"] for r in rows)
    print(header())
    print(f"{args.model}, {args.epochs} epochs, {args.clients} MNIST shard clients, batch 10, XLA {'on' if args.jit else 'off'}, "
          f"{args.steps_per_execution} steps per call")
    print(f"{'layout':>8} {'wall s':>7} {'x best':>7} {'CPU s':>7}  load")
    for r in rows:
        print(f"{r['layout']:>8} {r['wall_s']:7.1f} {r['wall_s'] / best:7.2f} {r['cpu_s']:7.1f}  {Load.describe(r['load'])}")
    print(f"wrote {write(f'worker_layout_{args.model}', {'settings': dict(vars(args), data=Path(args.data).name), 'layouts': rows})}")


if __name__ == "__main__":
    main()
