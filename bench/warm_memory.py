"""What a warm client worker holds after many invocations, by how it gives freed heap memory back to the OS.

Each policy runs in a fresh process, one TensorFlow thread, the client's own training loop (models.train)
and evaluation (models.evaluate), on shards of different sizes as a size-skewed federation sends one warm
worker: each new size traces a tail step, so the compiler runs now and then, not only in the first fit.

Policies, all through models.release_freed_memory at the end of each invocation:
- none: never released;
- new-trace: released only after a new trace (growth threshold off);
- default: after a new trace or once the process grew by models.RELEASE_GROWTH_BYTES;
- every: after every invocation;
- alternate: after every other invocation, so that in one process the fits that follow a release (and fault
  the returned pages in again) compare with the fits that follow none, free of the noise between processes.

Run: .venv/bin/python bench/warm_memory.py [--model cnn] [--fits 12] [--epochs 5]
Data: ../shared/data/mnist10k.npz (or --data).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("FEDKEEPER_TF_THREADS", "1")

from bench.common import Load, header, write  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"
POLICIES = ("none", "new-trace", "default", "every", "alternate")


def one(policy: str, args: argparse.Namespace) -> dict:
    """Run the fits in this process under one policy; RSS after each invocation, the sampled peak, the fits' time."""
    import numpy as np

    from fedkeeper import models

    def rss_mb() -> float:
        return (models._resident_bytes() or 0) / 2**20  # the resident set the release rule itself reads

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    d = np.load(args.data)
    x = (d["x"].astype("float32") / 255.0).reshape(-1, 28, 28, 1)
    y = d["y"].astype("int64")
    model = models.build(args.model, (28, 28, 1), 10, jit_compile=True, steps_per_execution=32)
    start = models.get_weights(model)
    growth = {"none": None, "new-trace": 2**62, "default": models.RELEASE_GROWTH_BYTES, "every": 0, "alternate": 0}[policy]
    after, releases, fit_s, fit_cpu_s, release_s = [], 0, 0.0, 0.0, 0.0
    after_release: dict[bool, list[float]] = {True: [], False: []}  # warm fit seconds by whether a release preceded
    released_last = False
    for i in range(args.fits):
        n = 450 + 17 * i  # a new size, so a new tail step, in every invocation
        lo = (i * 500) % (len(x) - n)
        models.set_weights(model, start)
        models.reset_optimizer(model)
        t, c = time.perf_counter(), time.process_time()
        models.train(model, x[lo:lo + n], y[lo:lo + n], 10, args.epochs, i)
        if i:  # the first fit compiles; its time is not the warm worker's
            fit_s += time.perf_counter() - t
            fit_cpu_s += time.process_time() - c
            after_release[released_last].append(time.perf_counter() - t)
        if i % 4 == 3:  # a central evaluation now and then, as the client function also serves
            models.evaluate(model, x[:5000], y[:5000], batch_size=256)
        released_last = False
        if growth is not None and (policy != "alternate" or i % 2 == 0):
            t = time.perf_counter()
            released_last = models.release_freed_memory(growth)
            releases += released_last
            release_s += time.perf_counter() - t
        after.append(round(rss_mb(), 1))
    stop.set()
    return {"policy": policy, "rss_after_mb": after, "final_mb": after[-1], "peak_mb": round(peak[0], 1),
            "releases": releases, "release_s": round(release_s, 3), "warm_fit_s": round(fit_s, 2),
            "warm_fit_cpu_s": round(fit_cpu_s, 2),
            "fit_s_after_release": [round(v, 3) for v in after_release[True]],
            "fit_s_after_none": [round(v, 3) for v in after_release[False]]}


def main() -> None:
    """Run each policy in a fresh process, print the table and write bench/results/warm_memory_<model>.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("nn", "cnn"), default="cnn")
    ap.add_argument("--fits", type=int, default=12, help="invocations per policy (at least 2)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--name", help="results file name (default warm_memory_<model>)")
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), help="policies to run, in order")
    ap.add_argument("--one", choices=POLICIES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fits < 2:
        raise SystemExit("--fits must be at least 2: the first fit compiles and is not counted")
    if not Path(args.data).is_file():
        raise SystemExit(f"data file {args.data} not found; pass --data path/to/mnist10k.npz")
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args)))
        return
    print(header())
    print(f"{args.model}, {args.fits} invocations of {args.epochs} epochs on shards of 450-{450 + 17 * (args.fits - 1)} "
          "examples, one TensorFlow thread, a fresh process per policy")
    rows = []
    for policy in args.policies:
        with Load() as load:
            proc = subprocess.run([sys.executable, __file__, "--one", policy, "--model", args.model, "--fits",
                                   str(args.fits), "--epochs", str(args.epochs), "--data", args.data],
                                  capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"policy {policy} failed:\n{proc.stderr[-4000:]}")
        row = dict(json.loads(line[7:]), load=load.record())
        rows.append(row)
        print(f"{policy:10} RSS after the first {row['rss_after_mb'][0]:6.0f} MB, after the last {row['final_mb']:6.0f} MB, "
              f"peak {row['peak_mb']:6.0f} MB; {row['releases']:2d} releases taking {row['release_s'] * 1e3:5.0f} ms; "
              f"warm fits {row['warm_fit_s']:6.2f} s ({row['warm_fit_cpu_s']:.2f} CPU s); {Load.describe(row['load'])}",
              flush=True)
        a, b = row["fit_s_after_release"], row["fit_s_after_none"]
        if a and b:
            print(f"{'':10} mean fit after a release {sum(a) / len(a):.3f} s ({len(a)}), after none {sum(b) / len(b):.3f} s "
                  f"({len(b)})")
    path = write(args.name or f"warm_memory_{args.model}", {"settings": dict(vars(args), data=Path(args.data).name),
                                                            "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
