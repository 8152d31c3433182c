"""Every strategy against Flower's implementation of the same strategy on the same arrays (max abs difference),
and aggregation time and peak memory at N updates of the paper's CNN, FedKeeper's aggregator against Flower's.

Run (Flower lives in a separate environment, never in the functions' requirements):
    python3 -m venv bench-venv && bench-venv/bin/pip install -e '.[bench]'
    bench-venv/bin/python bench/strategies.py correctness            # -> bench/results/strategies_correctness.json
    bench-venv/bin/python bench/strategies.py perf --n 10 100        # -> bench/results/strategies_perf.json
    .venv/bin/python bench/strategies.py accuracy --rounds 10 --epochs 5   # -> strategies_accuracy_nn.json
    .venv/bin/python bench/strategies.py robustness --rounds 5 --epochs 1  # -> strategies_robustness_nn.json
Correctness feeds both implementations the same float32 arrays (CNN shapes, N = 10, three rounds for the
stateful server optimizers, each carrying its own state). Perf runs each measurement in a fresh process:
FedKeeper's is the aggregator's whole step on a folder store (settle, validate, norm bound, fold, finish,
encode); Flower's is its strategy's `aggregate_fit` on FitRes objects already in memory (deserialising
included, building them not). Peak memory is the high-water RSS above the process's baseline.

accuracy and robustness run federations in one process through the real handlers (trigger, client in
store mode, aggregator, evaluation), calling each invocation in turn instead of through worker pools:
the same code and bytes as `fedkeeper run`, without its process and scheduling overhead. Data: MNIST 10k
(../shared/data/mnist10k.npz), 20 clients with 2 label shards each, batch 10, Adam 1e-3 unless stated.
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

from bench.aggregate import SHAPES, _peak_mb, _reset_peak, model_bytes  # noqa: E402
from bench.common import Steal, header, write  # noqa: E402

F = 1  # Byzantine clients tolerated by krum, multikrum and bulyan in both implementations
# FedKeeper's name and params; Flower's counterpart (None: Flower has none) and how to build it.
CASES = {
    "fedavg": ({}, "FedAvg"),
    "fedavgm": ({"server_learning_rate": 0.8, "server_momentum": 0.9}, "FedAvgM"),
    "fedprox": ({"mu": 0.1}, "FedProx"),
    "fedadam": ({"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3, "bias_correction": True}, "FedAdam"),
    "fedyogi": ({"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}, "FedYogi"),
    "fedadagrad": ({"eta": 0.01, "beta_1": 0.0, "tau": 1e-3}, "FedAdagrad"),
    "scaffold": ({}, None),
    "fednova": ({}, None),
    "median": ({}, "FedMedian"),
    "trimmed_mean": ({"beta": 0.2}, "FedTrimmedAvg"),
    "krum": ({"f": F}, "Krum"),
    "multikrum": ({"f": F, "m": 5}, "MultiKrum"),
    "bulyan": ({"f": F}, "Bulyan"),
}
STATEFUL = {"fedavgm", "fedadam", "fedyogi", "fedadagrad"}


def make_updates(model: str, n: int, seed: int) -> tuple[dict, list[tuple[str, dict, int, int]]]:
    """A global model and n client models near it: (id, weights, num_examples, local_steps)."""
    rng = np.random.default_rng(seed)
    g = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in SHAPES[model].items()}
    out = []
    for i in range(n):
        w = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.01 * (1 + i % 3)))
             for k, v in g.items()}
        out.append((f"c{i:04d}", w, int(50 + (i * 37) % 100), int(5 + i % 11)))
    return g, out


# -- Flower --------------------------------------------------------------------------------------------------
def flower_strategy(name: str, params: dict, global_w: dict):
    """Flower's strategy object matching FedKeeper's name and params."""
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)  # its per-round notice about metrics functions
    from flwr.common import ndarrays_to_parameters
    from flwr.server import strategy as fs

    init = ndarrays_to_parameters([global_w[k] for k in sorted(global_w)])
    if name == "fedavg":
        return fs.FedAvg()
    if name == "fedprox":
        return fs.FedProx(proximal_mu=params["mu"])
    if name == "fedavgm":
        return fs.FedAvgM(initial_parameters=init, server_learning_rate=params["server_learning_rate"],
                          server_momentum=params["server_momentum"])
    if name in ("fedadam", "fedyogi"):
        cls = fs.FedAdam if name == "fedadam" else fs.FedYogi
        return cls(initial_parameters=init, eta=params["eta"], beta_1=params["beta_1"], beta_2=params["beta_2"],
                   tau=params["tau"])
    if name == "fedadagrad":
        return fs.FedAdagrad(initial_parameters=init, eta=params["eta"], tau=params["tau"])
    if name == "median":
        return fs.FedMedian()
    if name == "trimmed_mean":
        return fs.FedTrimmedAvg(beta=params["beta"])
    if name == "krum":
        return fs.Krum(num_malicious_clients=params["f"], num_clients_to_keep=0)
    if name == "multikrum":
        return fs.Krum(num_malicious_clients=params["f"], num_clients_to_keep=params["m"])
    if name == "bulyan":
        return fs.Bulyan(num_malicious_clients=params["f"], to_keep=0)
    raise ValueError(name)


def flower_results(updates) -> list:
    """(ClientProxy, FitRes) pairs as Flower's server hands them to aggregate_fit."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    return [(None, FitRes(status=Status(code=Code.OK, message=""),
                          parameters=ndarrays_to_parameters([w[k] for k in sorted(w)]), num_examples=n, metrics={}))
            for _, w, n, _ in updates]


def flower_round(strategy, name: str, r: int, results) -> list[np.ndarray]:
    """One aggregate_fit; FedAdam's bias correction uses server_round + 1 as its step, so round r (0-based) passes r."""
    from flwr.common import parameters_to_ndarrays

    server_round = r if name == "fedadam" else r + 1
    params, _ = strategy.aggregate_fit(server_round, results, [])
    return parameters_to_ndarrays(params)


# -- FedKeeper in memory (for correctness) ---------------------------------------------------------------------
def fedkeeper_round(strategy, updates, global_w, state):
    """Check, fold and finish as the protocol does, reading updates back from memory."""
    by_id = {c: w for c, w, _, _ in updates}
    fold = strategy.begin(global_w, state, np.float32, reader=lambda c: by_id[c])
    for cid, w, n, steps in updates:
        reason = strategy.check(cid, {"metrics": {"local_steps": steps}})
        assert reason is None, reason
        fold.add(cid, w, n)
    return strategy.finish(fold, global_w, state)


def correctness(args) -> None:
    """Max abs and relative difference from Flower, per strategy, over rounds."""
    from fedkeeper.core import strategy as strategies

    rows = []
    for name, (params, flower_name) in CASES.items():
        if flower_name is None:
            rows.append({"strategy": name, "flower": None, "note": "Flower has no implementation"})
            print(f"{name:13} Flower has none", flush=True)
            continue
        g, _ = make_updates(args.model, args.n, 0)
        ours = strategies.create(name, strategies.Settings(population=args.n, client_lr=0.01), params)
        theirs = flower_strategy(name, params, g)
        x, state = g, None
        worst_abs = worst_rel = 0.0
        rounds = 3 if name in STATEFUL else 1
        for r in range(rounds):
            _, updates = make_updates(args.model, args.n, 100 + r)
            mine, state = fedkeeper_round(ours, updates, x, state)
            flw = flower_round(theirs, name, r, flower_results(updates))
            for k, arr in zip(sorted(mine), flw):
                diff = float(np.max(np.abs(mine[k].astype(np.float64) - arr.astype(np.float64))))
                scale = float(np.max(np.abs(arr))) or 1.0
                worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
            x = {k: v.copy() for k, v in mine.items()}
        row = {"strategy": name, "flower": flower_name, "params": params, "n": args.n, "model": args.model,
               "rounds": rounds, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel}
        rows.append(row)
        print(f"{name:13} vs Flower {flower_name:13} rounds {rounds}  max abs diff {worst_abs:.3g}  "
              f"relative {worst_rel:.3g}", flush=True)
    import flwr

    path = write("strategies_correctness", {"flower_version": flwr.__version__, "rows": rows, "load": load()})
    print(f"wrote {path}")


# -- perf ----------------------------------------------------------------------------------------------------
def prepare(root: str, model: str, n: int) -> None:
    """A folder store holding one complete round of n updates with their example counts and local steps."""
    from fedkeeper.core import blob, config, keys, rounds
    from fedkeeper.store import open_store

    store = open_store(root)
    cfg = config.from_dict({"rounds": 2, "platforms": [{"name": "p", "clients": n}]})
    store.put_json(keys.FEDERATION, cfg.to_dict())
    g, updates = make_updates(model, n, 0)
    store.put(keys.model(0), blob.encode(g, {"kind": "model", "round": 0}))
    ids = [c.id for c in cfg.clients]
    m = rounds.Manifest(round=0, clients=[{"id": c, "platform": "p", "data": ""} for c in ids], model=keys.model(0),
                        deadline=time.time() + 86400, quorum=1)
    store.put(keys.manifest(0), rounds.dumps(m))
    for cid, (_, w, ex, steps) in zip(ids, updates):
        store.put(keys.update(0, cid), blob.encode(w, {"kind": "update", "round": 0, "client": cid,
                                                      "num_examples": ex, "metrics": {"local_steps": steps},
                                                      "timings": {}}))


def run_one(system: str, name: str, root: str) -> dict:
    """One measurement in this fresh process."""
    from fedkeeper.core import blob, config, keys
    from fedkeeper.store import open_store

    store = open_store(root)
    params = CASES[name][0]
    if system == "fedkeeper":
        from fedkeeper.functions import protocol
        from fedkeeper.functions.context import Context, NullInvoker

        ctx = Context(store=store, invoker=NullInvoker())
        raw = store.get_json(keys.FEDERATION)
        raw["strategy"] = dict(raw["strategy"], name=name, params=params)
        cfg = config.from_stored(raw)
        manifest = protocol.read_manifest(store, 0)
        base = _reset_peak()
        t, c = time.perf_counter(), time.process_time()
        out = protocol.aggregate(ctx, cfg, manifest, protocol.settle(store, manifest))
        secs, cpu = time.perf_counter() - t, time.process_time() - c
        assert out["status"] == "done" and not out["rejected"], out["rejected"][:3]
    else:
        keys_list = store.list("rounds/000000/updates/")
        updates = []
        for k in keys_list:
            b = blob.decode(store.get(k))
            updates.append((k, {n: np.array(v) for n, v in b.tensors.items()}, b.num_examples, 1))
        g = {n: np.array(v) for n, v in blob.decode(store.get(keys.model(0))).tensors.items()}
        strategy = flower_strategy(name, params, g)
        results = flower_results(updates)
        del updates
        base = _reset_peak()  # Flower's input must all be in memory: that part is not counted against it
        t, c = time.perf_counter(), time.process_time()
        flower_round(strategy, name, 0, results)
        secs, cpu = time.perf_counter() - t, time.process_time() - c
    # CPU seconds (all threads) beside wall seconds: on a shared, loaded machine they vary far less.
    return {"seconds": secs, "cpu_seconds": cpu, "baseline_mb": base, "peak_mb": _peak_mb(),
            "above_baseline_mb": _peak_mb() - base}


def perf(args) -> None:
    """Time and peak memory per strategy and N, each in a fresh process."""
    try:
        import flwr  # noqa: F401
        have_flower = True
    except ImportError:
        have_flower = False
        print("flwr is not installed here: Flower's column is skipped")
    names = args.strategies or list(CASES)
    mb = model_bytes(args.model) / 2**20
    rows = []
    with Steal() as steal:
        for n in args.n:
            root = tempfile.mkdtemp(prefix=f"fk-strat-{n}-", dir=args.tmp)
            try:
                prepare(root, args.model, n)
                for name in names:
                    row = {"strategy": name, "model": args.model, "n": n, "model_mb": mb}
                    systems = ["fedkeeper"] + (["flower"] if have_flower and CASES[name][1] else [])
                    if "flower" in systems and (n * mb > args.flower_max_mb or
                                                (name == "bulyan" and n > args.flower_bulyan_max_n)):
                        # Flower's Bulyan recomputes every pairwise distance for each of its N − 2f Krum
                        # picks, O(N³·d): at N = 100 CNN updates that is hours on this machine.
                        systems.remove("flower")
                        row["flower"] = {"skipped": "over --flower-max-mb or --flower-bulyan-max-n"}
                    for system in systems:
                        out = subprocess.run([sys.executable, __file__, "one", system, name, root],
                                             capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))
                        if out.returncode:
                            tail = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
                            row[system] = {"error": tail[:300]}
                        else:
                            row[system] = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(line(row), flush=True)
                    write(args.name, {"partial": True, "rows": rows, "load": load()})  # kept if interrupted
            finally:
                shutil.rmtree(root, ignore_errors=True)
    print()
    print(header() + f"; host CPU steal during the run: {steal.percent:.1f}%; load {load()}")
    for row in rows:
        print(line(row))
    path = write(args.name, {"steal_percent": steal.percent, "load": load(), "rows": rows})
    print(f"wrote {path}")


# -- federations in one process -------------------------------------------------------------------------------
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"
ATTACKS = ("sign_flip", "scale_100", "gaussian", "same_value")


def attack(kind: str, w: dict, g: dict, rng: np.random.Generator) -> dict:
    """A malicious client's model from its honest one and the global model."""
    if kind == "sign_flip":  # the update's direction reversed
        return {k: g[k] - (w[k] - g[k]) for k in w}
    if kind == "scale_100":  # the update blown up a hundredfold
        return {k: g[k] + np.float32(100) * (w[k] - g[k]) for k in w}
    if kind == "gaussian":  # noise in place of training
        return {k: g[k] + rng.standard_normal(g[k].shape).astype(np.float32) for k in w}
    if kind == "same_value":  # colluders all send the same model: every coordinate moved by the same amount
        return {k: g[k] + np.float32(0.5) for k in w}
    raise ValueError(kind)


def federate(root: str, strategy: str, params: dict, rounds: int, epochs: int, clients: int = 20,
             malicious: int = 0, kind: str | None = None, norm_multiple: float = 4.0, seed: int = 0,
             optimizer: str = "adam", lr: float = 1e-3, model: str = "nn") -> dict:
    """One federation through the real handlers; returns per-round test accuracy and wall time."""
    from fedkeeper.core import blob, config, keys
    from fedkeeper.federation import setup
    from fedkeeper.functions import aggregator, client, trigger
    from fedkeeper.functions.context import CLIENT, Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    cfg = config.from_dict({
        "rounds": rounds, "seed": seed,
        "model": {"name": model, "epochs": epochs, "batch_size": 10, "optimizer": optimizer, "learning_rate": lr},
        "data": {"dataset": f"npz:{DATA}", "partition": "shards", "test_fraction": 0.2, "holdout_fraction": 0.0},
        "strategy": {"name": strategy, "params": params, "deadline_s": 3600, "norm_multiple": norm_multiple},
        "platforms": [{"name": "local", "clients": clients}]})
    store = LocalStore(root)
    setup(cfg, store, progress=lambda s: None)
    bad = {c.id for c in cfg.clients[:malicious]}
    rng = np.random.default_rng(seed)
    curve, t0 = [], time.perf_counter()
    for r in range(rounds):
        inv = NullInvoker()
        trigger.handle({"round": r}, Context(store=store, invoker=inv))
        g = blob.decode(store.get(keys.model(r))).tensors
        for fn, payload, _ in inv.calls:
            if fn != CLIENT:
                continue
            client.handle(payload, Context(store=store, invoker=NullInvoker()))
            cid = payload["client"]
            if cid in bad:  # the attacker writes what it likes to its own key
                b = blob.decode(store.get(keys.update(r, cid)))
                store.put(keys.update(r, cid), blob.encode(attack(kind, b.tensors, g, rng), b.meta))
        after = NullInvoker()
        res = aggregator.handle({"round": r}, Context(store=store, invoker=after))
        for fn, payload, _ in after.calls:
            if fn == CLIENT and payload.get("mode") == "evaluate":
                client.handle(payload, Context(store=store, invoker=NullInvoker()))
        ev = store.get_json(keys.evaluation(r))
        curve.append({"round": r + 1, "accuracy": ev["test_accuracy"], "wall_s": time.perf_counter() - t0,
                      "status": res.get("status"), "rejected": len(res.get("rejected", []))})
    return {"curve": curve}


def _sim_settings(args) -> dict:
    return {"rounds": args.rounds, "epochs": args.epochs, "clients": 20, "partition": "shards (2 per client)",
            "batch_size": 10, "data": "mnist10k.npz", "model": args.model}


def accuracy(args) -> None:
    """Accuracy per round and wall time per strategy, on the non-IID split."""
    runs = {"fedavg": ({}, "adam", 1e-3), "fedprox": ({"mu": 0.01}, "adam", 1e-3),
            "fedadam": ({"eta": 0.01, "tau": 1e-3}, "adam", 1e-3), "fedyogi": ({"eta": 0.01, "tau": 1e-3}, "adam", 1e-3),
            "scaffold": ({}, "sgd", 0.05), "fednova": ({}, "adam", 1e-3), "fedavg_sgd": ({}, "sgd", 0.05)}
    results = {}
    with Steal() as steal:
        for label in args.strategies or list(runs):
            params, opt, lr = runs[label]
            name = label.replace("_sgd", "")
            with tempfile.TemporaryDirectory(dir=args.tmp) as root:
                out = federate(root, name, params, args.rounds, args.epochs, optimizer=opt, lr=lr, model=args.model)
            out.update(strategy=name, params=params, optimizer=opt, learning_rate=lr, load=load())
            results[label] = out
            accs = " ".join(f"{p['accuracy']:.3f}" for p in out["curve"])
            print(f"{label:11} {opt}/{lr:g}  acc by round: {accs}  wall {out['curve'][-1]['wall_s']:.0f}s  "
                  f"load {load()}", flush=True)
    target = results.get("fedavg", {}).get("curve", [{}])[-1].get("accuracy")
    summary = {}
    for label, out in results.items():
        hit = next((p["round"] for p in out["curve"] if target is not None and p["accuracy"] >= target), None)
        summary[label] = {"final_accuracy": out["curve"][-1]["accuracy"], "rounds_to_fedavg_final": hit}
    print(header() + f"; host CPU steal {steal.percent:.1f}%; load {load()}")
    for label, row in summary.items():
        print(f"{label:11} final {row['final_accuracy']:.4f}  reaches FedAvg's final ({target}) at round "
              f"{row['rounds_to_fedavg_final']}")
    path = write(f"strategies_accuracy_{args.model}", {"settings": _sim_settings(args), "steal_percent": steal.percent,
                                                       "results": results, "summary": summary, "load": load()})
    print(f"wrote {path}")


def robustness(args) -> None:
    """Final accuracy per strategy under each attack (4 of 20 malicious), protections on and off."""
    f = 4
    strategies_ = {"fedavg": {}, "median": {}, "trimmed_mean": {"beta": 0.2}, "krum": {"f": f},
                   "multikrum": {"f": f}, "bulyan": {"f": f}}
    rows = []
    with Steal() as steal:
        with tempfile.TemporaryDirectory(dir=args.tmp) as root:
            base = federate(root, "fedavg", {}, args.rounds, args.epochs, model=args.model)
        clean = base["curve"][-1]["accuracy"]
        print(f"attack-free fedavg: {clean:.4f}  load {load()}", flush=True)
        for kind in args.attacks or ATTACKS:
            for name in args.strategies or list(strategies_):
                norms = (4.0, 0.0) if args.protected is None or name in args.protected else (0.0,)
                for norm in norms:
                    with tempfile.TemporaryDirectory(dir=args.tmp) as root:
                        out = federate(root, name, strategies_[name], args.rounds, args.epochs, malicious=4, kind=kind,
                                       norm_multiple=norm, model=args.model)
                    final = out["curve"][-1]["accuracy"]
                    row = {"attack": kind, "strategy": name, "params": strategies_[name], "norm_multiple": norm,
                           "final_accuracy": final, "gap_to_clean_fedavg": clean - final, "curve": out["curve"]}
                    rows.append(row)
                    write(f"strategies_robustness_{args.model}", {"partial": True, "clean_fedavg": clean, "rows": rows,
                                                                  "settings": dict(_sim_settings(args), malicious=4, f=f)})
                    print(f"{kind:10} {name:12} protections {'on ' if norm else 'off'}  final {final:.4f}  "
                          f"gap {clean - final:+.4f}  load {load()}", flush=True)
    print(header() + f"; host CPU steal {steal.percent:.1f}%; load {load()}")
    path = write(f"strategies_robustness_{args.model}", {"settings": dict(_sim_settings(args), malicious=4, f=f),
                                                         "clean_fedavg": clean, "steal_percent": steal.percent,
                                                         "rows": rows, "load": load()})
    print(f"wrote {path}")


def line(row: dict) -> str:
    """One printed row: seconds and peak memory above baseline (in models) for each system."""
    out = f"{row['strategy']:13} N={row['n']:<5}"
    for system in ("fedkeeper", "flower"):
        r = row.get(system)
        if not r or "skipped" in r:
            out += f"  {system} -"
        elif "error" in r:
            out += f"  {system} error: {r['error'][:60]}"
        else:
            out += (f"  {system} {r['seconds']:7.3f}s wall {r['cpu_seconds']:7.3f}s cpu "
                    f"{r['above_baseline_mb'] / row['model_mb']:6.1f} models")
    return out


def load() -> str:
    """The load averages, as /proc/loadavg gives them."""
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def main() -> None:
    """correctness | perf | one (internal)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("correctness")
    c.add_argument("--n", type=int, default=10)
    c.add_argument("--model", default="cnn", choices=list(SHAPES))
    p = sub.add_parser("perf")
    p.add_argument("--n", type=int, nargs="+", default=[10, 100])
    p.add_argument("--model", default="cnn", choices=list(SHAPES))
    p.add_argument("--strategies", nargs="+", choices=list(CASES))
    p.add_argument("--flower-max-mb", type=float, default=8000)
    p.add_argument("--flower-bulyan-max-n", type=int, default=20)
    p.add_argument("--tmp", default=None, help="folder for the generated rounds (default: the system's temp)")
    p.add_argument("--name", default="strategies_perf")
    for cmd in ("accuracy", "robustness"):
        q = sub.add_parser(cmd)
        q.add_argument("--rounds", type=int, default=10 if cmd == "accuracy" else 5)
        q.add_argument("--epochs", type=int, default=5 if cmd == "accuracy" else 1)
        q.add_argument("--model", default="nn", choices=["nn", "cnn"])
        q.add_argument("--strategies", nargs="+")
        q.add_argument("--tmp", default=None)
        if cmd == "robustness":
            q.add_argument("--attacks", nargs="+", choices=ATTACKS)
            q.add_argument("--protected", nargs="*", default=None,
                           help="strategies also run with the protocol's norm bound on (default: all)")
    o = sub.add_parser("one")
    o.add_argument("system")
    o.add_argument("strategy")
    o.add_argument("root")
    args = ap.parse_args()
    if args.cmd == "correctness":
        correctness(args)
    elif args.cmd == "perf":
        perf(args)
    elif args.cmd == "accuracy":
        accuracy(args)
    elif args.cmd == "robustness":
        robustness(args)
    else:
        print(json.dumps(run_one(args.system, args.strategy, args.root)))


if __name__ == "__main__":
    main()
