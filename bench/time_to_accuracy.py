"""Time to accuracy on the paper's task: FedKeeper's local runtime against Flower's simulation engine, in one run.

Same model, partitions (2 label shards per client), optimizer (Adam 1e-3, fresh per round), batch size 10,
local epochs and clients per round (all of them). Wall time is counted from each system's start call.

Run (Flower lives in a separate environment):
    python3 -m venv bench-venv && bench-venv/bin/pip install -e '.[tf,bench]' psutil
    bench-venv/bin/python bench/time_to_accuracy.py --model nn --epochs 5 --rounds 10       # minutes
    bench-venv/bin/python bench/time_to_accuracy.py --model cnn --epochs 5 --rounds 12      # the full one
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from bench.common import Steal, header, write  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"


class TreeMemory(threading.Thread):
    """Samples the summed RSS of this process and all its descendants; keeps the peak."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self.stop_flag = every, 0, False

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop_flag:
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)


def run_fedkeeper(args, store_root: Path) -> dict:
    """The federation on FedKeeper's local runtime: one platform, `concurrency` warm workers."""
    from fedkeeper.core import config, keys
    from fedkeeper.runtime import run as runmod
    from fedkeeper.store.local import LocalStore

    cfg = config.from_dict({"rounds": args.rounds, "seed": args.seed,
                            "model": {"name": args.model, "epochs": args.epochs, "batch_size": 10, "learning_rate": 1e-3,
                                      "jit_compile": args.jit, "steps_per_execution": args.steps_per_execution},
                            "data": {"dataset": f"npz:{args.data}", "partition": "shards", "test_fraction": 0.2,
                                     "holdout_fraction": 0.0},
                            "strategy": {"deadline_s": 3600},
                            "platforms": [{"name": "local", "clients": args.clients, "concurrency": args.concurrency,
                                           "timeout_s": 3600, "memory_mb": 8192,
                                           "options": {"tf_threads": args.tf_threads}}]})
    store = LocalStore(store_root)
    t0 = time.time()
    runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=7200, log=lambda s: None)
    curve = []
    for r in range(args.rounds):
        ev = store.get_json(keys.evaluation(r))
        curve.append({"round": r + 1, "accuracy": ev["test_accuracy"], "wall_s": ev["finished_at"] - t0})
    return {"curve": curve}


def run_flower(args, store_root: Path) -> dict:
    """The same federation on Flower's simulation engine (Ray), clients reading the same partition files."""
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedkeeper import data as datamod
    from fedkeeper import models
    from fedkeeper.core import blob, keys
    from fedkeeper.store.local import LocalStore

    store = LocalStore(store_root)
    meta = store.get_json("data/meta.json")
    shape, classes = tuple(meta["input_shape"]), meta["num_classes"]
    names = sorted(blob.decode(store.get(keys.model(0))).tensors)
    init = blob.decode(store.get(keys.model(0))).tensors
    test = datamod.unpack(store.get(keys.TEST_DATA))
    ids = sorted(meta["client_examples"])
    curve: list[dict] = []
    t0 = time.time()
    root = str(store_root)
    cfg = {"model": args.model, "epochs": args.epochs}
    # By default Flower's client compiles the model as Flower's Keras examples do (Keras defaults);
    # --flower-same-compile gives it FedKeeper's compile flags, to separate their effect from the system's.
    compile_flags = ({"jit_compile": args.jit, "steps_per_execution": args.steps_per_execution}
                     if args.flower_same_compile else {})

    def to_list(w: dict) -> list:
        return [w[n] for n in names]

    class Client(NumPyClient):
        def __init__(self, cid: str) -> None:
            arrays = datamod.unpack(LocalStore(root).get(keys.client_data(cid)))
            self.x, self.y = arrays["x_train"], arrays["y_train"]

        def fit(self, parameters, config):
            model, _ = models.cached(cfg["model"], shape, classes, "adam", 1e-3, **compile_flags)
            models.set_weights(model, dict(zip(names, parameters)))
            models.reset_optimizer(model)
            model.fit(self.x, self.y, epochs=cfg["epochs"], batch_size=10, shuffle=True, verbose=0)
            w = models.get_weights(model)
            return to_list(w), len(self.x), {}

    def client_fn(context: Context):
        return Client(ids[int(context.node_config["partition-id"])]).to_client()

    server_model = models.build(args.model, shape, classes)

    def evaluate(server_round, parameters, config):
        if server_round == 0:
            return None
        models.set_weights(server_model, dict(zip(names, parameters)))
        loss, acc = server_model.evaluate(test["x"], test["y"], verbose=0, batch_size=256)
        curve.append({"round": server_round, "accuracy": float(acc), "wall_s": time.time() - t0})
        return float(loss), {"accuracy": float(acc)}

    def server_fn(context: Context):
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(ids), min_evaluate_clients=0,
                          min_available_clients=len(ids), evaluate_fn=evaluate,
                          initial_parameters=ndarrays_to_parameters(to_list(init)))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    t0 = time.time()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=len(ids),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False,
                                                 "_node_ip_address": "127.0.0.1", "log_to_driver": False}})
    return {"curve": curve}


def one(system: str, args, store_root: Path) -> dict:
    """Run one system in this process, measuring its wall time and the summed peak memory of its process tree."""
    mem = TreeMemory()
    mem.start()
    with Steal() as steal:
        t = time.time()
        out = (run_fedkeeper if system == "fedkeeper" else run_flower)(args, store_root)
        out["wall_s"] = time.time() - t
    mem.stop_flag = True
    out.update(peak_tree_mb=mem.peak / 2**20, steal_percent=steal.percent)
    return out


def _forward(args) -> list[str]:
    """The parent's options as arguments for a child run (booleans as --flag, --no-flag or nothing)."""
    out = []
    for k, v in vars(args).items():
        flag = "--" + k.replace("_", "-")
        if k in ("one", "flower") or v is None:
            continue
        if k == "jit":
            out.append(flag if v else "--no-jit")
        elif isinstance(v, bool):
            out += [flag] if v else []
        else:
            out.append(f"{flag}={v}")
    return out


def reached(curve: list[dict], level: float) -> dict | None:
    """The first round at or above level, with its wall time."""
    return next(({"round": c["round"], "wall_s": c["wall_s"]} for c in curve if c["accuracy"] >= level), None)


def main() -> None:
    """Run both systems one after the other in fresh processes, print curves and targets, write results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nn", choices=["nn", "cnn"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10, help="round cap")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=2, help="FedKeeper's warm workers (2 cores: 2)")
    ap.add_argument("--tf-threads", type=int, default=1, help="TensorFlow threads per FedKeeper worker")
    ap.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True,
                    help="FedKeeper clients compile training with XLA (model.jit_compile, default on)")
    ap.add_argument("--steps-per-execution", type=int, default=32, help="FedKeeper's model.steps_per_execution")
    ap.add_argument("--flower-same-compile", action="store_true",
                    help="give Flower's client FedKeeper's compile flags (default: Keras defaults, as Flower's examples)")
    ap.add_argument("--flower", action=argparse.BooleanOptionalAction, default=True,
                    help="also run Flower (--no-flower: FedKeeper alone, e.g. to try settings)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], args, Path(args.one[1]))))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        from fedkeeper.core import config
        from fedkeeper.federation import setup
        from fedkeeper.store.local import LocalStore

        # Setup once: Flower's clients read the very partitions FedKeeper's clients train on.
        for system in ("fedkeeper", "flower") if args.flower else ("fedkeeper",):
            root = Path(tmp) / system
            cfg = config.from_dict({"seed": args.seed, "model": {"name": args.model},
                                    "data": {"dataset": f"npz:{args.data}", "partition": "shards", "holdout_fraction": 0.0},
                                    "platforms": [{"name": "local", "clients": args.clients}]})
            if system == "flower":
                setup(cfg, LocalStore(root), progress=lambda s: None)
            cmd = [sys.executable, __file__, "--one", system, str(root)] + _forward(args)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{system} failed:\n{proc.stderr[-4000:]}")
            results[system] = json.loads(line[7:])
            print(f"{system}: {results[system]['wall_s']:.1f} s, final accuracy {results[system]['curve'][-1]['accuracy']:.4f}",
                  flush=True)
    if "flower" not in results:
        print(json.dumps(results["fedkeeper"]["curve"], indent=1))
        return
    fk, fl = results["fedkeeper"], results["flower"]
    top = min(max(c["accuracy"] for c in fk["curve"]), max(c["accuracy"] for c in fl["curve"]))
    levels = sorted({lvl for lvl in (0.90, 0.95, 0.97) if lvl <= top} | {round(top - 0.005, 3)})
    print()
    print(header())
    print(f"{args.model}, {args.clients} clients (2 label shards each), {args.epochs} local epochs, batch 10, Adam 1e-3, "
          f"all clients per round, {args.rounds} rounds")
    print(f"host CPU steal: FedKeeper {fk['steal_percent']:.1f}%, Flower {fl['steal_percent']:.1f}%")
    print(f"{'round':>5} {'FedKeeper acc':>14} {'wall s':>8} {'Flower acc':>11} {'wall s':>8}")
    for a, b in zip(fk["curve"], fl["curve"]):
        print(f"{a['round']:>5} {a['accuracy']:14.4f} {a['wall_s']:8.1f} {b['accuracy']:11.4f} {b['wall_s']:8.1f}")
    per_round = {s: results[s]["curve"][-1]["wall_s"] / len(results[s]["curve"]) for s in results}
    print(f"wall per round: FedKeeper {per_round['fedkeeper']:.1f} s, Flower {per_round['flower']:.1f} s "
          f"(ratio {per_round['fedkeeper'] / per_round['flower']:.2f}, target <= 0.8)")
    print(f"peak memory, all processes: FedKeeper {fk['peak_tree_mb']:.0f} MB, Flower {fl['peak_tree_mb']:.0f} MB "
          f"(ratio {fk['peak_tree_mb'] / fl['peak_tree_mb']:.2f}, target <= 0.5)")
    to_acc = {}
    for lvl in levels:
        to_acc[str(lvl)] = {"fedkeeper": reached(fk["curve"], lvl), "flower": reached(fl["curve"], lvl)}
        f1, f2 = to_acc[str(lvl)]["fedkeeper"], to_acc[str(lvl)]["flower"]
        print(f"to {lvl:.3f}: FedKeeper round {f1['round'] if f1 else '-'} at {f1['wall_s'] if f1 else float('nan'):.1f} s; "
              f"Flower round {f2['round'] if f2 else '-'} at {f2['wall_s'] if f2 else float('nan'):.1f} s")
    name = f"time_to_accuracy_{args.model}_e{args.epochs}" + ("_same_compile" if args.flower_same_compile else "")
    # Results name the data file, not where it lay on the measuring machine.
    path = write(name, {"settings": dict(vars(args), data=Path(args.data).name), "results": results, "per_round_s": per_round, "to_accuracy": to_acc})
    print(f"wrote {path}")
    _plot(results, name)


def _plot(results: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for system, style in (("fedkeeper", "o-"), ("flower", "s--")):
        c = results[system]["curve"]
        ax.plot([x["wall_s"] for x in c], [x["accuracy"] for x in c], style, label={"fedkeeper": "FedKeeper", "flower": "Flower simulation"}[system])
    ax.set(xlabel="wall time (s)", ylabel="test accuracy", title=name.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(__file__).resolve().parent / "plots"
    out.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
