"""Round overhead on the local runtime: round time minus the slowest client's own work, with zero-epoch clients.

Run: .venv/bin/python bench/round_overhead.py [--clients 10 100 1000] [--concurrency 2]
The round is timed from the manifest's creation to the aggregator's result; a client's own work is its
download, model load, holdout evaluation and (zero-epoch) training, as its update's metadata records.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Steal, header, loadavg, write  # noqa: E402
from fedkeeper import report  # noqa: E402
from fedkeeper.core import config  # noqa: E402
from fedkeeper.runtime import run as runmod  # noqa: E402
from fedkeeper.store.local import LocalStore  # noqa: E402


def dataset(n: int, folder: str) -> str:
    """`digits` while it has a training example per client; beyond that, its training images repeated to two per
    client (zero-epoch clients only load their data, so its content does not matter) and its test set as is."""
    from fedkeeper import data

    d = data.load("digits")
    if len(d.y_train) >= n:
        return "digits"
    reps = -(-2 * n // len(d.y_train))
    path = f"{folder}/digits_x{reps}.npz"
    np.savez(path, x_train=np.concatenate([d.x_train] * reps), y_train=np.concatenate([d.y_train] * reps),
             x_test=d.x_test, y_test=d.y_test)
    return f"npz:{path}"


def one(n: int, concurrency: int, rounds: int) -> dict:
    """Run a federation of n zero-epoch clients; report the last round's overhead (workers are warm by then)."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as data_dir:
        # The previous round's central evaluation runs on its own pool, as a platform runs it in its own
        # instance: on the clients' pool it would hold one of their workers during the next round's first second.
        cfg = config.from_dict({"rounds": rounds, "model": {"epochs": 0},
                                "data": {"holdout_fraction": 0.0, "dataset": dataset(n, data_dir)},
                                "evaluation_platform": "eval",
                                "platforms": [{"name": "local", "clients": n, "concurrency": concurrency},
                                              {"name": "eval", "clients": 0, "concurrency": 1}]})
        store = LocalStore(tmp)
        t = time.perf_counter()
        res = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=3600, log=lambda s: None)
        wall = time.perf_counter() - t
        out = []
        for r in res["rounds"]:
            clients = r["per_client"].values()
            work = [c["download_s"] + c["cold_start_s"] + c["warm_init_s"] + c["holdout_eval_s"] + c["train_s"]
                    for c in clients]
            total_work = sum(work)
            # With `concurrency` workers the clients' own work takes at least sum/concurrency here, where a
            # platform would run every client at once; what the round takes beyond that is orchestration.
            spread = total_work / concurrency
            out.append({"round": r["round"], "round_s": r["timings"]["round_s"], "slowest_client_s": max(work),
                        "overhead_s": r["timings"]["round_s"] - max(work), "sum_client_work_s": total_work,
                        "client_work_spread_s": spread, "orchestration_s": r["timings"]["round_s"] - spread,
                        "aggregation_s": r["timings"]["phases_s"]["aggregation"],
                        "cold_starts": sum(1 for c in clients if c["cold"])})
    last = out[-1]
    return {"clients": n, "concurrency": concurrency, "rounds": out, "wall_s": wall, "warm_round": last,
            "dataset": "digits" if cfg.data.dataset == "digits" else "digits, training images repeated"}


def main() -> None:
    """Measure each client count, print a table, write bench/results/round_overhead.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--concurrency", type=int, default=2, help="worker processes (2 cores: 2)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="the last round is the one reported: by round 3 the clients' workers and the evaluation's "
                         "worker (which scores round 2's model during it) are all warm")
    ap.add_argument("--out", default=None, help="write the JSON here instead of bench/results/round_overhead.json")
    args = ap.parse_args()
    rows = []
    with Steal() as steal:
        for n in args.clients:
            rows.append(one(n, args.concurrency, args.rounds))
            w = rows[-1]["warm_round"]
            print(f"N={n}: round {w['round_s']:.2f} s, slowest client {w['slowest_client_s']:.3f} s, "
                  f"overhead {w['overhead_s']:.2f} s, of which the clients' own work spread over the workers "
                  f"{w['client_work_spread_s']:.2f} s and orchestration {w['orchestration_s']:.2f} s", flush=True)
    targets = {10: 0.2, 100: 0.5, 1000: 2.0, 10000: 15.0}  # issue 12, target 2
    print()
    print(header() + f"; host CPU steal during the run: {steal.percent:.1f}%; load average {loadavg()}")
    print("overhead = round - slowest client; work/workers = the clients' own work (download, model load, "
          "evaluation, training) summed and divided by the workers; orchestration = round - work/workers")
    print(f"{'clients':>7} {'round s':>8} {'slowest client s':>17} {'overhead s':>11} {'work/workers s':>15} "
          f"{'orchestration s':>16} {'per client ms':>14} {'target s':>9}")
    for row in rows:
        w = row["warm_round"]
        print(f"{row['clients']:>7} {w['round_s']:8.2f} {w['slowest_client_s']:17.3f} {w['overhead_s']:11.2f} "
              f"{w['client_work_spread_s']:15.2f} {w['orchestration_s']:16.2f} "
              f"{1000 * w['orchestration_s'] / row['clients']:14.1f} {targets.get(row['clients'], float('nan')):9.1f}")
    print(f"wrote {write('round_overhead', {'steal_percent': steal.percent, 'loadavg_after': loadavg(), 'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
