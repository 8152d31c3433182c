"""Time to accuracy on the paper's task: FedKeeper's local runtime against Flower's simulation engine, in one run.

Same model, partitions (2 label shards per client), optimizer (Adam 1e-3, fresh per round), batch size 10,
local epochs and clients per round (all of them). Wall time is counted from each system's start call.

The same run measures the compute floor: every client's bare compiled fit (models.train, the client's own
training loop) on its own shard in a warm process (same model, batches, epochs and compile settings),
summed over the round's clients and divided by the cores (one TensorFlow thread per fit), or summed with
all cores in one fit, whichever is less. Each system's round time is printed as a multiple of that floor, beside a per-phase breakdown of the
work each system adds (download, model load, holdout evaluation, upload, central evaluation,
aggregation, and the time its worker slots sat idle).

Run (Flower lives in a separate environment):
    python3 -m venv bench-venv && bench-venv/bin/pip install -e '.[tf,bench]' psutil 'flwr[simulation]==1.42.*'
    bench-venv/bin/python bench/time_to_accuracy.py --model nn --epochs 5 --rounds 10       # minutes
    bench-venv/bin/python bench/time_to_accuracy.py --model cnn --epochs 5 --rounds 4 --flower-same-compile
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from bench.common import Load, header, write  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"


class TreeMemory(threading.Thread):
    """Samples the summed RSS of this process and all its descendants; keeps the peak, when it came and each
    process at it, and each one's CPU time."""

    def __init__(self, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self.peak_anon, self.peak_pss, self.stop_flag = every, 0, 0, 0, False
        self.peak_at = 0.0  # time.time() of the sample with the highest RSS sum
        self.peak_by: list[dict] = []  # that sample, process by process
        self._kinds: dict[int, str] = {}
        self.own_cpu = 0.0  # this sampler's CPU seconds, taken out of the driver's figure
        self.cpu: dict[int, float] = {}

    @staticmethod
    def pss(pid: int) -> tuple[int, int]:
        """(PSS, anonymous PSS) in bytes: each shared page (a library, a copy-on-write heap) divided among its users.

        Summed over a run's processes, PSS counts a library that every worker maps once, where an RSS sum counts
        it once per process.
        """
        out = [0, 0]
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        out[0] = int(line.split()[1]) * 1024
                    elif line.startswith("Pss_Anon:"):
                        out[1] = int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return out[0], out[1]

    @staticmethod
    def anon(pid: int) -> int:
        """Anonymous memory in bytes (heaps, arrays, compiled code): RSS without mapped files such as libraries.

        Library pages are shared with every process that maps the same file, including other people's on a
        shared machine, so only this part is the run's own whatever else runs.
        """
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss_Anon:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return 0

    def kind(self, p: Any, me: int) -> str:
        """What a process of the tree is, for the breakdown at the peak: driver, TensorFlow worker, Ray's parts, ..."""
        if p.pid == me:
            return "driver"
        try:
            cmd = " ".join(p.cmdline())
        except Exception:  # noqa: BLE001 - gone or unreadable: still counted, just unnamed
            return "other"
        if "resource_tracker" in cmd:
            return "multiprocessing resource tracker"
        if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "/ray/" in cmd:
            return (cmd.split()[0].rsplit("/", 1)[-1] if not cmd.startswith("ray::") else cmd.split()[0])[:48]
        tf = self.maps_tensorflow(p.pid)
        # The fork server and the workers forked from it share its command line; the server is the parent.
        forked = "multiprocessing.forkserver" in cmd
        if forked and p.ppid() == me:
            return "fork server with TensorFlow" if tf else "fork server without TensorFlow"
        if forked or "spawn_main" in cmd:
            # A worker names itself "fk-<pool>" when it starts (runtime.worker.name_process): the control pool
            # runs trigger, aggregator and evaluation, any other pool a platform's clients.
            try:
                name = p.name()
            except Exception:  # noqa: BLE001 - gone: named by its command line alone
                name = ""
            from fedkeeper.runtime.local import CONTROL
            from fedkeeper.runtime.worker import PROCESS_NAME_PREFIX

            role = ("control worker" if name == PROCESS_NAME_PREFIX + CONTROL else
                    "client worker" if name.startswith(PROCESS_NAME_PREFIX) else "worker")
            return f"{role} with TensorFlow" if tf else f"{role} without TensorFlow"
        return ("process with TensorFlow: " if tf else "process: ") + cmd.split()[0].rsplit("/", 1)[-1][:32]

    def kind_of(self, p: Any, me: int) -> str:
        """kind(), remembered once final: a worker is looked at again until it has named its pool and imported
        TensorFlow."""
        k = self._kinds.get(p.pid)
        if k is None:
            k = self.kind(p, me)
            # Final once the worker has named its pool and imported TensorFlow (if it ever will).
            if not k.endswith("without TensorFlow") and not k.startswith("worker "):
                self._kinds[p.pid] = k
        return k

    @staticmethod
    def maps_tensorflow(pid: int) -> bool:
        """True if the process has TensorFlow's library mapped (so it imported TensorFlow)."""
        try:
            with open(f"/proc/{pid}/maps") as fh:
                return any("libtensorflow" in line for line in fh)
        except OSError:
            return False

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop_flag:
            c0 = time.thread_time()
            total = total_anon = total_pss = 0
            sample = []
            for p in [me] + me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    total += rss
                    pss, pss_anon = self.pss(p.pid)
                    total_pss += pss
                    total_anon += pss_anon
                    c = p.cpu_times()
                    self.cpu[p.pid] = c.user + c.system
                    sample.append((p, rss, pss_anon))
                except psutil.Error:
                    pass
            if total > self.peak:
                self.peak_at = time.time()
                self.peak_by = [{"kind": self.kind_of(p, me.pid),
                                 "rss_mb": round(rss / 2**20, 1), "anon_mb": round(anon / 2**20, 1)}
                                for p, rss, anon in sample]
            self.peak = max(self.peak, total)
            self.peak_anon = max(self.peak_anon, total_anon)
            self.peak_pss = max(self.peak_pss, total_pss)
            self.own_cpu += time.thread_time() - c0
            time.sleep(self.every)

    def cpu_s(self) -> dict:
        """CPU seconds of this (driver) process and of all its descendants, as last sampled."""
        me = os.getpid()
        return {"driver_cpu_s": round(self.cpu.get(me, 0.0) - self.own_cpu, 1), "sampler_cpu_s": round(self.own_cpu, 1),
                "children_cpu_s": round(sum(v for k, v in self.cpu.items() if k != me), 1)}


def _spent(t: dict, keys_: tuple) -> float:
    return sum(float(t.get(k) or 0.0) for k in keys_)


def fedkeeper_rounds(store, rounds: int, t0: float) -> list[dict]:
    """Per round, from the store alone: wall time and the seconds each phase took, summed over invocations.

    Client phases come from the timing record each update carries and its upload sidecar; central evaluation
    from the evaluation record; aggregation from the round's result.
    """
    from fedkeeper.core import keys

    out, prev = [], t0
    for r in range(rounds):
        res = store.get_json_or(keys.result(r)) or {}
        ev = store.get_json_or(keys.evaluation(r)) or {}
        ph = {k: 0.0 for k in ("download", "model_load", "holdout_eval", "train", "upload", "client_other",
                               "central_eval", "aggregation")}
        busy, spans, train_cpu, cpu_shared = 0.0, [], 0.0, False
        for cid, c in (res.get("clients") or {}).items():
            t = c.get("timings") or {}
            side = store.get_json_or(keys.client_timings(r, cid)) or {}
            ph["download"] += _spent(t, ("download_s",))
            ph["model_load"] += _spent(t, ("init_s",))
            ph["holdout_eval"] += _spent(t, ("holdout_eval_s",))
            ph["train"] += _spent(t, ("train_s",))
            train_cpu += _spent(t, ("train_cpu_s",))
            cpu_shared = cpu_shared or bool(t.get("train_cpu_shared"))
            ph["upload"] += float(side.get("upload_s") or 0.0)
            if side.get("finished_at") and t.get("started_at"):
                whole = float(side["finished_at"]) - float(t["started_at"])
                busy += whole
                spans.append((float(t["started_at"]), float(side["finished_at"])))
                # Reading the manifest and config, encoding the blob, the timing sidecar: the handler's own work.
                ph["client_other"] += max(0.0, whole - _spent(t, ("download_s", "init_s", "holdout_eval_s", "train_s"))
                                          - float(side.get("upload_s") or 0.0))
        et = ev.get("timings") or {}
        ph["central_eval"] = _spent(et, ("download_s", "evaluate_s"))
        ph["aggregation"] = _spent(res.get("timings") or {}, ("aggregation_s", "write_s"))
        end = float(ev.get("finished_at") or prev)
        out.append({"round": r + 1, "wall_s": end - prev, "client_busy_s": busy, "phases_s": ph,
                    "train_cpu_s": None if cpu_shared else train_cpu,
                    "first_start": min((a for a, _ in spans), default=None),
                    "last_finish": max((b for _, b in spans), default=None)})
        prev = end
    return out


def fedkeeper_options(args) -> dict:
    """The FedKeeper platform's options: tf_threads and tf_intra_threads only where given, else the runtime decides."""
    out = {} if args.tf_threads is None else {"tf_threads": args.tf_threads}
    if args.tf_intra_threads is not None:
        out["tf_intra_threads"] = args.tf_intra_threads
    if args.preload is not None:
        out["preload"] = args.preload
    return out


def fedkeeper_threads(args) -> int:
    """TensorFlow threads per FedKeeper worker process, by the local runtime's own rule."""
    from fedkeeper.runtime.local import worker_threads

    return worker_threads(fedkeeper_options(args), min(args.instance_concurrency, args.concurrency))


def fedkeeper_intra_threads(args) -> int:
    """Intra-op threads per FedKeeper worker process, by the local runtime's own rule (it depends on the model)."""
    from fedkeeper.runtime.local import intra_op_threads

    return intra_op_threads(fedkeeper_options(args), min(args.instance_concurrency, args.concurrency), args.model)


def run_fedkeeper(args, store_root: Path) -> dict:
    """The federation on FedKeeper's local runtime: one platform, `concurrency` warm workers."""
    from fedkeeper.core import config, keys
    from fedkeeper.federation import setup
    from fedkeeper.runtime import run as runmod
    from fedkeeper.store.local import LocalStore

    cfg = config.from_dict({"rounds": args.rounds, "seed": args.seed,
                            "model": {"name": args.model, "epochs": args.epochs, "batch_size": 10, "learning_rate": 1e-3,
                                      "jit_compile": args.jit, "steps_per_execution": args.steps_per_execution},
                            "data": {"dataset": f"npz:{args.data}", "partition": "shards", "test_fraction": 0.2,
                                     "holdout_fraction": 0.0},
                            "strategy": {"deadline_s": 3600},
                            "platforms": [{"name": "local", "clients": args.clients, "concurrency": args.concurrency,
                                           "instance_concurrency": args.instance_concurrency, "timeout_s": 3600, "memory_mb": 8192,
                                           "options": fedkeeper_options(args)}]})
    cfg.events = config.resolve_events(cfg.events, LocalStore(store_root).url)
    store = LocalStore(store_root)
    # Setup (partitions, the initial model) happens before the clock starts, as it does for Flower, which
    # is handed the stored partitions and initial model; the run then resumes the set-up federation.
    setup(cfg, store, progress=lambda s: None)
    t0 = time.time()
    runmod.run(cfg, store, resume=True, progress=runmod.Progress(cfg, quiet=True), timeout_s=7200, log=lambda s: None)
    curve = []
    for r in range(args.rounds):
        ev = store.get_json(keys.evaluation(r))
        curve.append({"round": r + 1, "accuracy": ev["test_accuracy"], "wall_s": ev["finished_at"] - t0})
    return {"curve": curve, "rounds": fedkeeper_rounds(store, args.rounds, t0), "slots": args.concurrency}


def run_floor(args, store_root: Path) -> dict:
    """Each client's bare compiled fit on its own shard in this warm process, with FEDKEEPER_TF_THREADS threads.

    Nothing but `fit` is timed: the shards are decoded and the model built, compiled and warmed up first, and
    each fit starts from the initial weights with a fresh optimizer, as a client does.
    """
    from fedkeeper import data as datamod
    from fedkeeper import models
    from fedkeeper.core import blob, keys
    from fedkeeper.store.local import LocalStore

    store = LocalStore(store_root)
    meta = store.get_json("data/meta.json")
    ids = sorted(meta["client_examples"])
    shards = {cid: datamod.unpack(store.get(keys.client_data(cid))) for cid in ids}
    init = blob.decode(store.get(keys.model(0))).tensors
    test = datamod.unpack(store.get(keys.TEST_DATA))
    model = models.build(args.model, tuple(meta["input_shape"]), meta["num_classes"], jit_compile=args.jit,
                         steps_per_execution=args.steps_per_execution)

    cpu: dict[str, float] = {}

    def fit(cid: str) -> float:
        models.set_weights(model, init)
        models.reset_optimizer(model)
        t, c = time.perf_counter(), time.process_time()
        # The client's own data path and training loop: models.train, seeded batches, Keras's train_step.
        models.train(model, shards[cid]["x_train"], shards[cid]["y_train"], 10, args.epochs, args.seed)
        cpu[cid] = time.process_time() - c  # CPU seconds of all its threads: robust to other processes' load
        return time.perf_counter() - t

    fit(ids[0])  # warm-up: traces and compiles the training step (and its tail step) once
    per = {cid: fit(cid) for cid in ids}
    models.evaluate(model, test["x"], test["y"], batch_size=256)  # warm-up, as a warm worker has traced it
    t = time.perf_counter()
    models.evaluate(model, test["x"], test["y"], batch_size=256)  # the client's central evaluation
    return {"threads": int(os.environ.get("FEDKEEPER_TF_THREADS", "0")), "fit_s": per, "sum_fit_s": sum(per.values()),
            "sum_fit_cpu_s": sum(cpu.values()),
            "central_eval_s": time.perf_counter() - t}


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
    # --flower-same-compile gives it FedKeeper's compile flags and training loop (models.train), to separate
    # their effect from the system's.
    compile_flags = ({"jit_compile": args.jit, "steps_per_execution": args.steps_per_execution}
                     if args.flower_same_compile else {})

    def to_list(w: dict) -> list:
        return [w[n] for n in names]

    class Client(NumPyClient):
        def __init__(self, cid: str) -> None:
            self.created = time.time()
            arrays = datamod.unpack(LocalStore(root).get(keys.client_data(cid)))
            self.x, self.y = arrays["x_train"], arrays["y_train"]
            self.cid = cid
            self.load_s = time.time() - self.created

        def fit(self, parameters, config):
            t = time.perf_counter()
            model, _ = models.cached(cfg["model"], shape, classes, "adam", 1e-3, **compile_flags)
            models.set_weights(model, dict(zip(names, parameters)))
            models.reset_optimizer(model)
            t1, c1 = time.perf_counter(), time.process_time()
            if args.flower_same_compile:
                # FedKeeper's training function too (its loop is part of "how the client runs Keras"), seeded
                # per client and round as FedKeeper's client seeds it.
                models.train(model, self.x, self.y, 10, cfg["epochs"],
                             models.fit_seed(args.seed, int(config.get("round", 0)), self.cid))
            else:
                model.fit(self.x, self.y, epochs=cfg["epochs"], batch_size=10, shuffle=True, verbose=0)
            t2, c2 = time.perf_counter(), time.process_time()
            w = to_list(models.get_weights(model))
            # The client's own phases travel back as fit metrics (scalars), so the driver can break the round down.
            return w, len(self.x), {"download_s": self.load_s, "model_load_s": t1 - t, "train_s": t2 - t1,
                                    "upload_s": time.perf_counter() - t2, "train_cpu_s": c2 - c1, "created": self.created,
                                    "finished_at": time.time()}

    def client_fn(context: Context):
        return Client(ids[int(context.node_config["partition-id"])]).to_client()

    # Under --flower-same-compile the server evaluates as FedKeeper's evaluation function does (compiled alike,
    # models.evaluate); otherwise with Keras's evaluate on an uncompiled model, as Flower's examples.
    server_model = models.build(args.model, shape, classes, **compile_flags)

    fit_records: list[list[dict]] = []
    agg_s: list[float] = []
    eval_s: list[float] = []

    def evaluate(server_round, parameters, config):
        if server_round == 0:
            return None
        t = time.perf_counter()
        models.set_weights(server_model, dict(zip(names, parameters)))
        if args.flower_same_compile:
            scores = models.evaluate(server_model, test["x"], test["y"], batch_size=256)
            loss, acc = scores["loss"], scores["accuracy"]
        else:
            loss, acc = server_model.evaluate(test["x"], test["y"], verbose=0, batch_size=256)
        eval_s.append(time.perf_counter() - t)
        curve.append({"round": server_round, "accuracy": float(acc), "wall_s": time.time() - t0})
        return float(loss), {"accuracy": float(acc)}

    class TimedFedAvg(FedAvg):
        """Flower's FedAvg, timing its aggregation and keeping the clients' phase records."""

        def aggregate_fit(self, server_round, results, failures):
            fit_records.append([dict(res.metrics) for _, res in results])
            t = time.perf_counter()
            out = super().aggregate_fit(server_round, results, failures)
            agg_s.append(time.perf_counter() - t)
            return out

    def server_fn(context: Context):
        strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(ids),
                               min_evaluate_clients=0, min_available_clients=len(ids), evaluate_fn=evaluate,
                               initial_parameters=ndarrays_to_parameters(to_list(init)),
                               on_fit_config_fn=lambda server_round: {"round": server_round})
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    t0 = time.time()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=len(ids),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False,
                                                 "_node_ip_address": "127.0.0.1", "log_to_driver": False}})
    out_rounds, prev = [], t0
    for i, c in enumerate(curve):
        recs = fit_records[i] if i < len(fit_records) else []
        ph = {"download": sum(m["download_s"] for m in recs), "model_load": sum(m["model_load_s"] for m in recs),
              "holdout_eval": 0.0, "train": sum(m["train_s"] for m in recs), "upload": sum(m["upload_s"] for m in recs),
              "client_other": 0.0, "central_eval": eval_s[i] if i < len(eval_s) else 0.0,
              "aggregation": agg_s[i] if i < len(agg_s) else 0.0}
        busy = sum(m["finished_at"] - m["created"] for m in recs)
        out_rounds.append({"round": c["round"], "wall_s": t0 + c["wall_s"] - prev, "client_busy_s": busy, "phases_s": ph,
                           "train_cpu_s": sum(m["train_cpu_s"] for m in recs),
                           "first_start": min((m["created"] for m in recs), default=None),
                           "last_finish": max((m["finished_at"] for m in recs), default=None)})
        prev = t0 + c["wall_s"]
    # Ray runs one client per CPU at a time (client_resources num_cpus=1).
    return {"curve": curve, "rounds": out_rounds, "slots": os.cpu_count()}


def one(system: str, args, store_root: Path) -> dict:
    """Run one system in this process, measuring its wall time, the summed peak memory of its process tree and the load."""
    mem = TreeMemory()
    mem.start()
    run = {"fedkeeper": run_fedkeeper, "flower": run_flower, "floorP": run_floor_parallel}.get(system, run_floor)
    with Load() as load:
        t = time.time()
        out = run(args, store_root)
        out["wall_s"] = time.time() - t
    mem.stop_flag = True
    mem.join(timeout=5)
    cpu = mem.cpu_s()
    peak_s = mem.peak_at - t if mem.peak_at else None
    peak_round = next((c["round"] for c in out.get("curve", []) if peak_s is not None and c["wall_s"] >= peak_s), None)
    out.update(peak_tree_mb=mem.peak / 2**20, peak_tree_anon_mb=mem.peak_anon / 2**20,
               peak_tree_pss_mb=mem.peak_pss / 2**20, peak_at_s=peak_s, peak_round=peak_round,
               peak_by_process=peak_breakdown(mem.peak_by), **cpu,
               load=load.record(cpu["driver_cpu_s"] + cpu["sampler_cpu_s"] + cpu["children_cpu_s"]))
    return out


def peak_breakdown(sample: list[dict]) -> list[dict]:
    """The processes at the peak grouped by kind, largest first: how many, their RSS each and in sum."""
    groups: dict[str, list[dict]] = {}
    for row in sample:
        groups.setdefault(row["kind"], []).append(row)
    out = [{"kind": k, "count": len(rows), "rss_mb": sorted((r["rss_mb"] for r in rows), reverse=True),
            "anon_mb": sorted((r["anon_mb"] for r in rows), reverse=True),
            "sum_rss_mb": round(sum(r["rss_mb"] for r in rows), 1)} for k, rows in groups.items()]
    return sorted(out, key=lambda g: -g["sum_rss_mb"])


def describe_peak(r: dict) -> str:
    """One line: when the peak came and which processes made it up."""
    when = f"at {r['peak_at_s']:.1f} s" if r.get("peak_at_s") is not None else "at an unknown time"
    if r.get("peak_round"):
        when += f" (round {r['peak_round']})"
    parts = [f"{g['count']} x {g['kind']} " + "+".join(f"{x:.0f}" for x in g["rss_mb"]) + " MB"
             for g in r.get("peak_by_process", [])]
    return when + ": " + "; ".join(parts)


def _forward(args) -> list[str]:
    """The parent's options as arguments for a child run (booleans as --flag, --no-flag or nothing)."""
    out = []
    for k, v in vars(args).items():
        flag = "--" + k.replace("_", "-")
        if k in ("one", "flower", "floor") or v is None:
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


def floor_of(floors: dict, cores: int) -> dict:
    """The compute floor per round: Σ one-thread fits / cores, or Σ fits using every core, whichever is less."""
    options = {}
    if "floor1" in floors:
        options["1 thread per fit, / %d cores" % cores] = floors["floor1"]["sum_fit_s"] / cores
    if "floorN" in floors:
        options[f"{cores} threads per fit"] = floors["floorN"]["sum_fit_s"]
    layout = min(options, key=options.get)
    out = {"floor_s": options[layout], "layout": layout, "options_s": options}
    if "floorP" in floors:
        out["parallel_s"] = floors["floorP"]["fits_wall_s"]
    return out


def run_floor_parallel(args, store_root: Path) -> dict:
    """The same bare fits run by one one-thread process per core at once: the floor under this run's conditions.

    Unlike the summed floor, it includes what parallel fits cost each other (shared caches and memory) and
    whatever else the machine was running at the time.
    """
    from bench.worker_layout import run_layout
    from fedkeeper.store.local import LocalStore

    ids = sorted(LocalStore(store_root).get_json("data/meta.json")["client_examples"])
    cores = os.cpu_count() or 1
    spec = {"model": args.model, "epochs": args.epochs, "jit": args.jit, "spe": args.steps_per_execution}
    out = run_layout(str(store_root), ids, cores, 1, 1, spec)
    out["fits_wall_s"] = out.pop("wall_s")  # the process's own wall time is added under wall_s
    return out


# Phases in print order; "shared" phases run on the clients' worker slots, the others one at a time.
PHASES = (("train", "training (fit)"), ("download", "download + decode shard"), ("model_load", "model load (weights, optimizer)"),
          ("holdout_eval", "holdout evaluation"), ("upload", "encode + upload update"), ("client_other", "handler's other work"),
          ("central_eval", "central evaluation"), ("aggregation", "aggregation"))


def breakdown(res: dict, system: str, steady_from: int) -> dict:
    """Mean over rounds >= steady_from: wall per round and each phase's share of it; idle is what the slots did not fill.

    Client phases are summed over the round's clients and divided by the worker slots that run them in
    parallel; aggregation runs alone; FedKeeper's central evaluation is an invocation on a client slot,
    Flower's runs alone in its driver.
    """
    rows = [r for r in res["rounds"] if r["round"] >= steady_from] or res["rounds"]
    slots = res["slots"]
    serial = {"aggregation"} | ({"central_eval"} if system == "flower" else set())
    mean = {k: sum(r["phases_s"][k] for r in rows) / len(rows) for k, _ in PHASES}
    share = {k: v if k in serial else v / slots for k, v in mean.items()}
    wall = sum(r["wall_s"] for r in rows) / len(rows)
    # From the last client of one round finishing to the first client of the next starting: no client trains.
    allr = res["rounds"]
    gaps = [b["first_start"] - a["last_finish"] for a, b in zip(allr, allr[1:])
            if b["round"] >= steady_from and a.get("last_finish") and b.get("first_start")]
    return {"rounds": [r["round"] for r in rows], "wall_s": wall, "slots": slots, "phase_s": mean,
            # Fits sharing one instance's process share its CPU clock: no per-fit CPU then.
            "train_cpu_s": (None if any(r.get("train_cpu_s", 0.0) is None for r in rows)
                            else sum(r.get("train_cpu_s", 0.0) for r in rows) / len(rows)),
            "share_s": share, "idle_s": wall - sum(share.values()),
            "between_rounds_s": sum(gaps) / len(gaps) if gaps else None}


def main() -> None:
    """Run the floor and both systems one after the other in fresh processes, print curves and targets, write results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nn", choices=["nn", "cnn"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10, help="round cap")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=2, help="FedKeeper's warm workers (2 cores: 2)")
    ap.add_argument("--tf-threads", type=int, help="TensorFlow threads per FedKeeper worker process (default: the "
                    "local runtime's, one per invocation the process serves at once)")
    ap.add_argument("--tf-intra-threads", type=int, help="intra-op threads per FedKeeper worker process, where a "
                    "fit's kernels run (default: the local runtime's rule by model; with --tf-threads, that count)")
    ap.add_argument("--instance-concurrency", type=int, default=1,
                    help="FedKeeper invocations one worker process serves at once, on threads sharing its TensorFlow "
                         "runtime (2 with --concurrency 2: one process trains two clients at once)")
    ap.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True,
                    help="FedKeeper clients compile training with XLA (model.jit_compile, default on)")
    ap.add_argument("--preload", action=argparse.BooleanOptionalAction, default=None,
                    help="fork FedKeeper's workers from a process that imported TensorFlow once, or start each "
                         "in a fresh interpreter (--no-preload); default: the local runtime's default (local.PRELOAD_DEFAULT)")
    ap.add_argument("--steps-per-execution", type=int, default=32, help="FedKeeper's model.steps_per_execution")
    ap.add_argument("--flower-same-compile", action="store_true",
                    help="give Flower's client FedKeeper's compile flags and training loop, models.train (default: Keras "
                         "defaults and fit, as Flower's examples)")
    ap.add_argument("--flower", action=argparse.BooleanOptionalAction, default=True,
                    help="also run Flower (--no-flower: FedKeeper alone, e.g. to try settings)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the compute floor in the same run (--no-floor skips it)")
    ap.add_argument("--name", help="results file name (default from the settings)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], args, Path(args.one[1]))))
        return
    cores = os.cpu_count() or 1
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        from fedkeeper.core import config
        from fedkeeper.federation import setup
        from fedkeeper.store.local import LocalStore

        # Setup once for Flower and the floor: they read the very partitions FedKeeper's own setup writes.
        shared = Path(tmp) / "shared"
        cfg = config.from_dict({"seed": args.seed, "model": {"name": args.model},
                                "data": {"dataset": f"npz:{args.data}", "partition": "shards", "holdout_fraction": 0.0},
                                "platforms": [{"name": "local", "clients": args.clients}]})
        setup(cfg, LocalStore(shared), progress=lambda s: None)
        runs = []
        if args.floor:
            runs += [("floor1", shared, "1")] + ([("floorN", shared, str(cores)), ("floorP", shared, None)] if cores > 1 else [])
        runs.append(("fedkeeper", Path(tmp) / "fedkeeper", None))
        if args.flower:
            runs.append(("flower", shared, None))
        for system, root, threads in runs:
            env = dict(os.environ, **({"FEDKEEPER_TF_THREADS": threads} if threads else {}))
            cmd = [sys.executable, __file__, "--one", system, str(root)] + _forward(args)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{system} failed:\n{proc.stderr[-4000:]}")
            results[system] = json.loads(line[7:])
            r = results[system]
            what = (f"sum of fits {r['sum_fit_s']:.1f} s" if system in ("floor1", "floorN") else
                    f"{cores} parallel one-thread processes" if system == "floorP"
                    else f"final accuracy {r['curve'][-1]['accuracy']:.4f}")
            print(f"{system}: {r['wall_s']:.1f} s, {what}; {Load.describe(r['load'])}", flush=True)
    report(args, results, cores)


def report(args, results: dict, cores: int) -> None:
    """Print curves, per-round times against the floor, the phase breakdown and the targets; write the results file."""
    systems = [s for s in ("fedkeeper", "flower") if s in results]
    floor = floor_of(results, cores) if "floor1" in results else None
    print()
    print(header())
    print(f"{args.model}, {args.clients} clients (2 label shards each), {args.epochs} local epochs, batch 10, Adam 1e-3, "
          f"all clients per round, {args.rounds} rounds; FedKeeper {args.concurrency} invocation(s) at once in "
          f"{-(-args.concurrency // args.instance_concurrency)} worker process(es) x {fedkeeper_threads(args)} TensorFlow thread(s) ({fedkeeper_intra_threads(args)} intra-op), XLA {'on' if args.jit else 'off'}, {args.steps_per_execution} steps per call; Flower's "
          f"client {'with the same compile settings' if args.flower_same_compile else 'with Keras defaults'}")
    for s in results:
        print(f"load during {s}: {Load.describe(results[s]['load'])}")
    print(f"{'round':>5}" + "".join(f" {s + ' acc':>14} {'wall s':>8}" for s in systems))
    for i in range(args.rounds):
        print(f"{i + 1:>5}" + "".join(f" {results[s]['curve'][i]['accuracy']:14.4f} {results[s]['curve'][i]['wall_s']:8.1f}"
                                      for s in systems if i < len(results[s]["curve"])))
    per_round = {s: results[s]["curve"][-1]["wall_s"] / len(results[s]["curve"]) for s in systems}
    steady_from = 2 if args.rounds > 1 else 1
    parts = {s: breakdown(results[s], s, steady_from) for s in systems}
    summary: dict = {"per_round_s": per_round, "steady": parts}
    if floor:
        summary["floor"] = floor
        print(f"compute floor per round: {floor['floor_s']:.2f} s ({floor['layout']}; "
              + ", ".join(f"{k}: {v:.2f} s" for k, v in floor["options_s"].items())
              + f"); central evaluation alone {results['floor1']['central_eval_s']:.2f} s")
        if "parallel_s" in floor:
            print(f"the same fits by {cores} one-thread processes at once, in this run's conditions: "
                  f"{floor['parallel_s']:.2f} s ({floor['parallel_s'] / floor['floor_s']:.2f}x the floor)")
    for s in systems:
        line = f"{s}: {per_round[s]:.2f} s per round over all {len(results[s]['curve'])} rounds"
        line += f", {parts[s]['wall_s']:.2f} s over rounds {steady_from}-{args.rounds}"
        if floor:
            summary.setdefault("floor_multiple", {})[s] = {"all": per_round[s] / floor["floor_s"],
                                                          "steady": parts[s]["wall_s"] / floor["floor_s"]}
            line += (f" = {per_round[s] / floor['floor_s']:.2f}x / {parts[s]['wall_s'] / floor['floor_s']:.2f}x the floor"
                     " (target <= 1.15x)" if s == "fedkeeper" else
                     f" = {per_round[s] / floor['floor_s']:.2f}x / {parts[s]['wall_s'] / floor['floor_s']:.2f}x the floor")
        if floor and "parallel_s" in floor:
            summary.setdefault("parallel_floor_multiple", {})[s] = parts[s]["wall_s"] / floor["parallel_s"]
            line += f"; {parts[s]['wall_s'] / floor['parallel_s']:.2f}x the parallel fits"
        print(line)
    if floor:
        # Training inside each system against the bare fits with the same threads per fit: the cost of sharing the cores.
        for s in systems:
            # A fit's kernels run on the intra-op pool, so that count picks the bare fits to compare with; Flower
            # leaves TensorFlow its default, every core.
            threads = fedkeeper_intra_threads(args) if s == "fedkeeper" else cores
            ref = results["floorN"] if (threads == cores and "floorN" in results) else results["floor1"]
            ratio = parts[s]["phase_s"]["train"] / ref["sum_fit_s"]
            summary.setdefault("train_vs_bare_fit", {})[s] = ratio
            if parts[s]["train_cpu_s"] is None:
                print(f"{s}: its fits took {ratio:.2f}x the wall time of the bare fits with {ref['threads']} thread(s) "
                      "each, alone (fits shared an instance's process, so their CPU time is counted per run only)")
                continue
            cpu_ratio = parts[s]["train_cpu_s"] / ref["sum_fit_cpu_s"]
            summary.setdefault("train_cpu_vs_bare_fit", {})[s] = cpu_ratio
            print(f"{s}: its fits took {ratio:.2f}x the wall time and {cpu_ratio:.2f}x the CPU time of the bare fits "
                  f"with {ref['threads']} thread(s) each, alone")
    print(f"\nper-phase breakdown, mean over rounds {steady_from}-{args.rounds} (s per round; worker-seconds summed over "
          f"clients / slots, aggregation{' and Flower' + chr(39) + 's central evaluation' if 'flower' in parts else ''} "
          f"run alone)")
    print(f"{'phase':32}" + "".join(f" {s + ' Σ s':>14} {'share s':>8}" for s in systems))
    for k, label in PHASES:
        print(f"{label:32}" + "".join(f" {parts[s]['phase_s'][k]:14.2f} {parts[s]['share_s'][k]:8.2f}" for s in systems))
    print(f"{'idle slots (scheduling, barrier)':32}" + "".join(f" {'':14} {parts[s]['idle_s']:8.2f}" for s in systems))
    print(f"{'gap between rounds (no client)':32}" + "".join(
        f" {'':14} {parts[s]['between_rounds_s'] if parts[s]['between_rounds_s'] is not None else float('nan'):8.2f}"
        for s in systems))
    print(f"{'round wall':32}" + "".join(f" {'':14} {parts[s]['wall_s']:8.2f}" for s in systems))
    if floor:
        print(f"{'compute floor':32}" + "".join(f" {'':14} {floor['floor_s']:8.2f}" for s in systems))
    for s in systems:
        cpu_round = (results[s]["driver_cpu_s"] + results[s]["children_cpu_s"]) / len(results[s]["curve"])
        summary.setdefault("cpu_s_per_round", {})[s] = cpu_round
        line = (f"{s}: peak memory {results[s]['peak_tree_mb']:.0f} MB (all processes); CPU: driver "
                f"{results[s]['driver_cpu_s']:.1f} s (the memory sampler's {results[s].get('sampler_cpu_s', 0.0):.1f} s "
                f"apart), its child processes {results[s]['children_cpu_s']:.0f} s, {cpu_round:.1f} CPU s per round")
        if floor:
            # CPU seconds hardly change when other processes share the cores, unlike wall time.
            line += f" = {cpu_round / results['floor1']['sum_fit_cpu_s']:.2f}x the one-thread fits' CPU"
        print(line)
        print(f"  its peak came {describe_peak(results[s])}")
    to_acc = {}
    if "flower" in results:
        fk, fl = results["fedkeeper"], results["flower"]
        print(f"wall per round: FedKeeper {per_round['fedkeeper']:.2f} s, Flower {per_round['flower']:.2f} s "
              f"(ratio {per_round['fedkeeper'] / per_round['flower']:.2f}, target <= 0.8); over rounds {steady_from}-"
              f"{args.rounds}: ratio {parts['fedkeeper']['wall_s'] / parts['flower']['wall_s']:.2f}")
        print(f"peak memory, all processes: FedKeeper {fk['peak_tree_mb']:.0f} MB, Flower {fl['peak_tree_mb']:.0f} MB "
              f"(ratio {fk['peak_tree_mb'] / fl['peak_tree_mb']:.2f}, target <= 0.4); anonymous memory only (no library "
              f"pages): {fk['peak_tree_anon_mb']:.0f} MB against {fl['peak_tree_anon_mb']:.0f} MB "
              f"(ratio {fk['peak_tree_anon_mb'] / fl['peak_tree_anon_mb']:.2f})")
        if fk.get("peak_tree_pss_mb") and fl.get("peak_tree_pss_mb"):
            print(f"peak memory with shared pages counted once (PSS): FedKeeper {fk['peak_tree_pss_mb']:.0f} MB, "
                  f"Flower {fl['peak_tree_pss_mb']:.0f} MB (ratio {fk['peak_tree_pss_mb'] / fl['peak_tree_pss_mb']:.2f})")
        top = min(max(c["accuracy"] for c in fk["curve"]), max(c["accuracy"] for c in fl["curve"]))
        levels = sorted({lvl for lvl in (0.90, 0.95, 0.97) if lvl <= top} | {round(top - 0.005, 3)})
        for lvl in levels:
            to_acc[str(lvl)] = {"fedkeeper": reached(fk["curve"], lvl), "flower": reached(fl["curve"], lvl)}
            f1, f2 = to_acc[str(lvl)]["fedkeeper"], to_acc[str(lvl)]["flower"]
            print(f"to {lvl:.3f}: FedKeeper round {f1['round'] if f1 else '-'} at {f1['wall_s'] if f1 else float('nan'):.1f} s; "
                  f"Flower round {f2['round'] if f2 else '-'} at {f2['wall_s'] if f2 else float('nan'):.1f} s")
    name = args.name or (f"time_to_accuracy_{args.model}_e{args.epochs}"
                         + ("_same_compile" if args.flower_same_compile else "") + ("" if args.flower else "_fedkeeper")
                         + (f"_ic{args.instance_concurrency}" if args.instance_concurrency > 1 else ""))
    # Results name the data file, not where it lay on the measuring machine.
    path = write(name, {"settings": dict(vars(args), data=Path(args.data).name, fedkeeper_tf_threads=fedkeeper_threads(args),
                                      fedkeeper_tf_intra_threads=fedkeeper_intra_threads(args)), "results": results, **summary,
                        "to_accuracy": to_acc})
    print(f"wrote {path}")
    if "flower" in results:
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
