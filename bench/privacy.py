"""Privacy benchmarks: secure aggregation's overhead against plain FedAvg, and DP's cost in accuracy.

secagg: for the paper's NN and CNN at N clients with 0% and 10% dropouts, one masked round through the protocol's
own phase functions on a folder store (updates are synthetic: training is the same with and without masks, so only
the privacy work is timed): bytes each client uploads, its time to advertise, mask and answer the unmask request
against encoding and writing a plain update, and the aggregator's time and peak memory (each in a fresh process)
against plain FedAvg on the same survivors.

    .venv/bin/python bench/privacy.py secagg --models nn cnn --n 10 50 200

dp: test accuracy on MNIST 10k after R rounds of DP-FedAvg at target ε (δ = 1e-5), IID and label shards, against the
non-private run. Clients train the paper's NN with Keras in this process, and the round is the library's own
strategy code (central DP around FedAvg); the noise multiplier for each ε comes from dp-accounting.

    .venv/bin/python bench/privacy.py dp --rounds 20 --epsilons 1 3 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.aggregate import SHAPES, _peak_mb, _reset_peak  # noqa: E402
from bench.common import Steal, header, write  # noqa: E402


# -- secure aggregation ------------------------------------------------------------------------------------
def _config(n: int, masked: bool, neighbors: int):
    from fedkeeper.core import config

    raw = {"rounds": 2, "platforms": [{"name": "p", "clients": n}], "strategy": {"quorum": 0.5}}
    if masked:
        raw["privacy"] = {"secure_aggregation": True, "secagg": {"neighbors": neighbors, "phase_s": 3600}}
    return config.from_dict(raw)


def _open_round(store, cfg, base: dict) -> None:
    from fedkeeper.core import blob, keys, rounds

    store.put_json(keys.FEDERATION, cfg.to_dict())
    store.put_json(keys.STATE, rounds.new_state())
    store.put_json("data/meta.json", {"client_examples": {c.id: 150 for c in cfg.clients}, "num_classes": 10})
    store.put(keys.model(0), blob.encode(base, {"kind": "model", "round": 0}))
    ids = [c.id for c in cfg.clients]
    m = rounds.Manifest(round=0, clients=[{"id": c, "platform": "p", "data": ""} for c in ids], model=keys.model(0),
                        deadline=time.time() + 86400, quorum=max(1, len(ids) // 2), created=time.time())
    store.put(keys.manifest(0), rounds.dumps(m))


def _weights(base: dict, i: int) -> dict:
    rng = np.random.default_rng(1000 + i)
    return {k: v + (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}


def secagg_case(model: str, n: int, dropout: float, neighbors: int, workdir: Path) -> dict:
    """One masked round and its plain twin; returns per-client and aggregator figures."""
    from fedkeeper.core import blob, keys
    from fedkeeper.functions import protocol
    from fedkeeper.functions import secagg as phases
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store import open_store

    os.environ[phases.SECRETS_ENV] = str(workdir / "secrets")
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES[model].items()}
    masked_url, plain_url = str(workdir / "masked"), str(workdir / "plain")
    cfg, plain_cfg = _config(n, True, neighbors), _config(n, False, 0)
    ms, ps = open_store(masked_url), open_store(plain_url)
    _open_round(ms, cfg, base)
    _open_round(ps, plain_cfg, base)
    phases.register(ms, cfg)
    ids = [c.id for c in cfg.clients]
    dropped = set(ids[:: max(1, round(1 / dropout))][: round(dropout * n)]) if dropout > 0 else set()
    ctx = Context(store=ms, invoker=NullInvoker())
    pctx = Context(store=ps, invoker=NullInvoker())
    t_adv, t_mask, t_unmask, t_plain, t_put, t_put_plain, up_bytes, plain_bytes = [], [], [], [], [], [], [], []
    for cid in ids:
        t = time.perf_counter()
        phases.advertise({"round": 0, "client": cid}, ctx)
        t_adv.append(time.perf_counter() - t)
    m = protocol.read_manifest(ms, 0)
    protocol.on_event(ctx, {"round": 0})  # closes the advertise phase: the roster
    for i, cid in enumerate(ids):
        if cid in dropped:
            protocol.client_failed(ctx, 0, cid, "dropped out (benchmark)", 1)
            protocol.client_failed(pctx, 0, cid, "dropped out (benchmark)", 1)
            continue
        w = _weights(base, i)
        meta = {"kind": "update", "round": 0, "client": cid, "num_examples": 150, "metrics": {}, "timings": {}}
        t = time.perf_counter()
        payload = phases.masker(ctx, cfg, m, cid, base)(w, meta)
        t_mask.append(time.perf_counter() - t)
        t = time.perf_counter()
        ms.put(keys.update(0, cid), payload)
        t_put.append(time.perf_counter() - t)
        up_bytes.append(len(payload))
        t = time.perf_counter()
        plain = blob.encode(w, meta)
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        ps.put(keys.update(0, cid), plain)
        t_put_plain.append(time.perf_counter() - t)
        plain_bytes.append(len(plain))
    protocol.on_event(ctx, {"round": 0})  # closes the training phase: the unmask request
    survivors = [c for c in ids if c not in dropped]
    for cid in survivors:
        t = time.perf_counter()
        phases.unmask({"round": 0, "client": cid}, ctx)
        t_unmask.append(time.perf_counter() - t)
    adv_bytes = [len(ms.get(keys.secagg_advertise(0, c))) for c in ids]
    ans_bytes = [len(ms.get(keys.secagg_answer(0, c))) for c in survivors]
    agg = {kind: _fresh(kind, url) for kind, url in (("secagg", masked_url), ("fedavg", plain_url),
                                                     ("fedavg_no_norm_bound", plain_url))}
    client_s = [a + b + c for a, b, c in zip(t_adv, t_mask, t_unmask)]
    return {
        "model": model, "n": n, "dropout": dropout, "dropped": len(dropped), "neighbors": len(phases.spec_for(ms, cfg, m).graph[ids[0]]),
        "client": {"upload_bytes": float(np.mean(up_bytes)) + float(np.mean(adv_bytes)) + float(np.mean(ans_bytes)),
                   "masked_update_bytes": float(np.mean(up_bytes)), "advertise_bytes": float(np.mean(adv_bytes)),
                   "unmask_bytes": float(np.mean(ans_bytes)), "plain_update_bytes": float(np.mean(plain_bytes)),
                   "advertise_s": float(np.mean(t_adv)), "mask_s": float(np.mean(t_mask)),
                   "unmask_s": float(np.mean(t_unmask)), "secagg_s": float(np.mean(client_s)),
                   "plain_encode_s": float(np.mean(t_plain)), "upload_s": float(np.mean(t_put)),
                   "plain_upload_s": float(np.mean(t_put_plain))},
        "aggregator": agg,
    }


def _fresh(kind: str, url: str) -> dict:
    """The aggregation of a prepared round, timed in a fresh process so its peak memory is its own."""
    out = subprocess.run([sys.executable, __file__, "_aggregate", kind, url], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _aggregate(kind: str, url: str) -> None:
    from fedkeeper.core import keys
    from fedkeeper.core import strategy as strategies
    from fedkeeper.functions import protocol
    from fedkeeper.functions import secagg as phases
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store import open_store

    store = open_store(url)
    ctx = Context(store=store, invoker=NullInvoker())
    cfg = ctx.config()
    if kind == "fedavg_no_norm_bound":  # masked vectors cannot be norm-checked: this is the like-for-like baseline
        cfg.strategy.norm_multiple = 0.0
    m = protocol.read_manifest(store, 0)
    base = _reset_peak()
    t = time.perf_counter()
    if kind == "secagg":
        out = phases.aggregate(ctx, cfg, m, strategies.from_config(cfg))
    else:
        out = protocol.aggregate(ctx, cfg, m, protocol.settle(store, m))
    secs = time.perf_counter() - t
    assert out["status"] == "done", out["rejected"][:3]
    reads = len(store.list(keys.updates_prefix(0)))
    print(json.dumps({"seconds": secs, "baseline_mb": base, "peak_mb": _peak_mb(), "above_baseline_mb": _peak_mb() - base,
                      "included": len(out["included"]), "updates_in_store": reads}))


def cmd_secagg(args: argparse.Namespace) -> None:
    """Secure aggregation against plain FedAvg."""
    print(header())
    rows = []
    with Steal() as steal:
        for model in args.models:
            for n in args.n:
                for dropout in args.dropouts:
                    with tempfile.TemporaryDirectory(prefix="fk-secagg-") as d:
                        row = secagg_case(model, n, dropout, args.neighbors, Path(d))
                    rows.append(row)
                    c, a = row["client"], row["aggregator"]
                    print(f"{model} N={n:4d} drop {dropout:4.0%} k={row['neighbors']:3d}  "
                          f"client: upload {c['upload_bytes'] / 2**20:7.2f} MiB (plain {c['plain_update_bytes'] / 2**20:6.2f}), "
                          f"secagg {c['secagg_s']:.3f} s (advertise {c['advertise_s']:.3f}, mask {c['mask_s']:.3f}, "
                          f"unmask {c['unmask_s']:.3f}) vs plain encode+write {c['plain_encode_s'] + c['plain_upload_s']:.3f} s  "
                          f"aggregator: {a['secagg']['seconds']:.2f} s / {a['secagg']['above_baseline_mb']:.0f} MB "
                          f"vs fedavg {a['fedavg']['seconds']:.2f} s / {a['fedavg']['above_baseline_mb']:.0f} MB "
                          f"(no norm bound {a['fedavg_no_norm_bound']['seconds']:.2f} s / "
                          f"{a['fedavg_no_norm_bound']['above_baseline_mb']:.0f} MB)", flush=True)
    path = write(args.name, {"kind": "secagg", "neighbors_requested": args.neighbors, "steal_percent": steal.percent,
                             "load_average": os.getloadavg(), "rows": rows})
    print(f"wrote {path}")


# -- differential privacy: utility -------------------------------------------------------------------------
def noise_for(epsilon: float, q: float, rounds: int, delta: float) -> float:
    """The noise multiplier that spends exactly `epsilon` over `rounds` rounds (bisection on dp-accounting's RDP)."""
    from fedkeeper import accounting

    lo, hi = 0.3, 200.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if accounting.epsilon(mid, q, rounds, delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def dp_run(partition: str, rounds: int, z: float | None, clip: float, clients: int, per_round: int, epochs: int,
           seed: int) -> dict:
    """R rounds of (DP-)FedAvg in this process; returns test accuracy per round."""
    from fedkeeper import data as datamod
    from fedkeeper import models
    from fedkeeper.core.privacy import dp
    from fedkeeper.core.privacy.settings import DPConfig
    from fedkeeper.core.strategy import FedAvg, Settings

    ds = datamod.load(f"npz:{args_data()}", seed=seed, test_fraction=0.2)
    parts = datamod.partition(ds.y_train, clients, partition, seed=seed)
    model, _ = models.cached("nn", tuple(ds.input_shape), ds.num_classes, "sgd", 0.05, jit_compile=False,
                             steps_per_execution=16)
    g = models.initial_weights("nn", tuple(ds.input_shape), ds.num_classes, seed)
    fedavg = FedAvg(Settings(fraction=per_round / clients, min_clients=per_round))
    strategy = dp.DPStrategy(fedavg, DPConfig(mode="central", clip_norm=clip, noise_multiplier=z)) if z is not None else fedavg
    import keras

    acc_curve = []
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        chosen = sorted(rng.choice(clients, size=per_round, replace=False).tolist())
        fold = strategy.begin(g, None)
        for c in chosen:
            models.set_weights(model, g)
            models.reset_optimizer(model)
            keras.utils.set_random_seed(seed * 7919 + r * 101 + c)
            idx = parts[c]
            model.fit(ds.x_train[idx], ds.y_train[idx], epochs=epochs, batch_size=16, verbose=0, shuffle=True)
            fold.add(str(c), models.get_weights(model), len(idx))
        g, _ = strategy.finish(fold, g, None)
        g = {k: np.asarray(v, dtype=np.float32).copy() for k, v in g.items()}
        models.set_weights(model, g)
        _, acc = model.evaluate(ds.x_test, ds.y_test, verbose=0, batch_size=512)
        acc_curve.append(float(acc))
    return {"accuracy": acc_curve}


def args_data() -> str:
    """The MNIST 10k file beside the project (see its README)."""
    return str(Path(os.environ.get("FEDKEEPER_MNIST10K", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz")))


def cmd_dp(args: argparse.Namespace) -> None:
    """DP-FedAvg accuracy at target ε against the non-private run."""
    from fedkeeper import accounting

    print(header())
    q = args.per_round / args.clients
    rows = []
    with Steal() as steal:
        for partition in args.partitions:
            settings = [(None, None)] + [(eps, noise_for(eps, q, args.rounds, args.delta)) for eps in args.epsilons]
            for eps, z in settings:
                t = time.perf_counter()
                out = dp_run(partition, args.rounds, z, args.clip, args.clients, args.per_round, args.epochs, args.seed)
                spent = accounting.epsilon(z, q, args.rounds, args.delta) if z else None
                row = {"partition": partition, "target_epsilon": eps, "epsilon": spent, "noise_multiplier": z,
                       "clip_norm": args.clip if z else None, "noise_std_on_mean": z * args.clip / args.per_round if z else None,
                       "final_accuracy": out["accuracy"][-1], "accuracy": out["accuracy"],
                       "seconds": time.perf_counter() - t}
                rows.append(row)
                print(f"{partition:8s} ε {'∞' if eps is None else eps:>4}  z {'-' if z is None else f'{z:.3f}':>6}  "
                      f"acc after {args.rounds} rounds {row['final_accuracy']:.4f}  ({row['seconds']:.0f} s)", flush=True)
                # Written after every row, so a long run interrupted part-way keeps what it measured.
                path = write(args.name, {"kind": "dp", "rounds": args.rounds, "clients": args.clients,
                                         "per_round": args.per_round, "sampling_rate": q, "delta": args.delta,
                                         "epochs": args.epochs, "clip_norm": args.clip, "data": "mnist10k.npz",
                                         "rows": rows})
    path = write(args.name, {"kind": "dp", "rounds": args.rounds, "clients": args.clients, "per_round": args.per_round,
                             "sampling_rate": q, "delta": args.delta, "epochs": args.epochs, "clip_norm": args.clip,
                             "data": "mnist10k.npz", "steal_percent": steal.percent, "rows": rows})
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: `secagg` or `dp`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_aggregate":
        _aggregate(argv[1], argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("secagg")
    s.add_argument("--models", nargs="+", default=["nn", "cnn"], choices=sorted(SHAPES))
    s.add_argument("--n", nargs="+", type=int, default=[10, 50, 200])
    s.add_argument("--dropouts", nargs="+", type=float, default=[0.0, 0.1])
    s.add_argument("--neighbors", type=int, default=16, help="SecAgg+ graph degree (0: every pair)")
    s.add_argument("--name", default="privacy_secagg")
    s.set_defaults(func=cmd_secagg)
    d = sub.add_parser("dp")
    d.add_argument("--rounds", type=int, default=20)
    d.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    d.add_argument("--partitions", nargs="+", default=["iid", "shards"])
    d.add_argument("--clients", type=int, default=100)
    d.add_argument("--per-round", type=int, default=20)
    d.add_argument("--epochs", type=int, default=1)
    d.add_argument("--clip", type=float, default=1.0)
    d.add_argument("--delta", type=float, default=1e-5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--name", default="privacy_dp")
    d.set_defaults(func=cmd_dp)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
