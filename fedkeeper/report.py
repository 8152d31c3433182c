"""Results from the store alone: results.json, per-round phase timings, and the PNG plots."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from fedkeeper.core import keys
from fedkeeper.store import NotFound, Store

PHASES = ("invoke", "cold_start", "download", "training", "upload", "aggregation", "evaluation")


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else 0.0


def round_record(store: Store, r: int) -> dict | None:
    """One round's entry of results.json, or None if the round has no result yet."""
    res = store.get_json_or(keys.result(r))
    if res is None:
        return None
    ev = store.get_json_or(keys.evaluation(r)) or {}
    manifest = store.get_json_or(keys.manifest(r)) or {}
    markers = store.list(f"{keys.round_prefix(r)}aggregations/")
    side = {k.rsplit("/", 1)[1][:-5]: store.get_json_or(k) or {} for k in store.list(f"{keys.round_prefix(r)}timings/")}
    late = [k.rsplit("/", 1)[1][:-5] for k in store.list(f"{keys.round_prefix(r)}late/")]
    clients = res.get("clients", {})
    per_client = {}
    for cid, m in clients.items():
        t = dict(m.get("timings") or {})
        up = side.get(cid, {}).get("upload_s")
        per_client[cid] = {
            "platform": m.get("platform"), "num_examples": m.get("num_examples"), "cold": bool(t.get("cold_start")),
            "invoke_s": t.get("invoke_s", 0.0),
            "cold_start_s": t.get("init_s", 0.0) if t.get("cold_start") else 0.0,
            "warm_init_s": 0.0 if t.get("cold_start") else t.get("init_s", 0.0),
            "download_s": t.get("download_s", 0.0), "holdout_eval_s": t.get("holdout_eval_s", 0.0),
            "train_s": t.get("train_s", 0.0), "upload_s": up if up is not None else 0.0,
            "metrics": m.get("metrics") or {},
        }
    tm = res.get("timings", {})
    eval_s = sum((ev.get("timings") or {}).get(k, 0.0) for k in ("download_s", "evaluate_s"))
    created = manifest.get("created", tm.get("manifest_created"))
    finished = tm.get("finished_at")
    # A round resumed after a pause counts from its latest resume, not across the paused gap.
    resumes = [(store.get_json_or(k) or {}).get("at") for k in store.list(f"{keys.round_prefix(r)}resumed/")]
    resumed_at = max((t for t in resumes if isinstance(t, (int, float))), default=None)
    start = max(created, resumed_at) if created and resumed_at else created
    round_s = (finished - start) if start and finished else None
    pc = list(per_client.values())
    phases = {
        "invoke": _mean([c["invoke_s"] for c in pc]),
        "cold_start": _mean([c["cold_start_s"] for c in pc]),
        "download": _mean([c["download_s"] for c in pc]),
        "training": _mean([c["train_s"] + c["holdout_eval_s"] + c["warm_init_s"] for c in pc]),
        "upload": _mean([c["upload_s"] for c in pc]),
        "aggregation": float(tm.get("aggregation_s", 0.0)) + float(tm.get("write_s", 0.0)),
        "evaluation": float(eval_s),
    }
    by_platform: dict[str, dict] = {}
    for c in pc:
        p = by_platform.setdefault(c["platform"] or "?", {"clients": 0, "cold_starts": 0, "client_s": []})
        p["clients"] += 1
        p["cold_starts"] += int(c["cold"])
        p["client_s"].append(c["invoke_s"] + c["download_s"] + c["cold_start_s"] + c["warm_init_s"]
                             + c["holdout_eval_s"] + c["train_s"] + c["upload_s"])
    for p in by_platform.values():
        xs = p.pop("client_s")
        p["mean_client_s"], p["max_client_s"] = _mean(xs), max(xs) if xs else 0.0
    return {
        "round": r + 1, "status": res.get("status"),  # counted from 1 wherever people read it
        "test_accuracy": ev.get("test_accuracy"), "test_loss": ev.get("test_loss"),
        "federated_accuracy": res.get("federated_accuracy"), "federated_loss": res.get("federated_loss"),
        "train_loss": res.get("train_loss"),
        "clients": {"selected": res.get("selected", []), "included": res.get("included", []),
                    "rejected": res.get("rejected", []), "failed": res.get("failed", []),
                    "stragglers": res.get("stragglers", []), "late": late},
        "aggregations": len(markers), "aggregated_by": res.get("aggregated_by"),
        "num_examples": res.get("num_examples"),
        "timings": {"round_s": round_s, "phases_s": phases,
                    "triggered_by": tm.get("triggered_by"), "event_delivered_at": tm.get("event_delivered_at"), "event_time": tm.get("event_time"),
                    "aggregation_started_at": tm.get("aggregation_started_at"), "finished_at": finished,
                    "manifest_created": created, "resumed_at": resumed_at, "evaluation_s": eval_s},
        "platforms": by_platform,
        "per_client": per_client,
    }


def collect(store: Store, runtime: dict | None = None) -> dict:
    """The whole results.json content, rebuilt from the store (plus optional runtime stats)."""
    fed = store.get_json_or(keys.FEDERATION)
    if fed is None:
        raise NotFound(keys.FEDERATION)
    state = store.get_json_or(keys.STATE) or {}
    out_rounds = []
    for r in range(int(fed.get("rounds", 0))):
        rec = round_record(store, r)
        if rec is None:
            break
        out_rounds.append(rec)
    evaluated = [x for x in out_rounds if x["test_accuracy"] is not None]
    final = {"test_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
             "test_loss": evaluated[-1]["test_loss"] if evaluated else None,
             "rounds": len(out_rounds), "status": state.get("status")}
    if out_rounds and out_rounds[0]["timings"]["manifest_created"] and out_rounds[-1]["timings"]["finished_at"]:
        final["wall_s"] = out_rounds[-1]["timings"]["finished_at"] - out_rounds[0]["timings"]["manifest_created"]
    result = {"federation": fed, "data": store.get_json_or("data/meta.json"), "store": store.url,
              "rounds": out_rounds, "final": final}
    if runtime:
        result["runtime"] = runtime
    return result


def write(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write results.json and the plots into out_dir; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    return [path] + plot(results, out)


def plot(results: dict, out: Path) -> list[Path]:
    """accuracy.png, loss.png, phases.png (time per round by phase) and platforms.png (client time by platform)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = results["rounds"]
    if not rs:
        return []
    x = [r["round"] for r in rs]
    files = []

    def save(fig, name):
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)

    def lines(name: str, title: str, ylabel: str, series: list[tuple[str, str, str]]) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for field, style, label in series:
            ax.plot(x, [r[field] for r in rs], style, label=label)
        ax.set(xlabel="round", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, name)

    lines("accuracy.png", "Accuracy per round", "accuracy", [
        ("test_accuracy", "o-", "test (central)"),
        ("federated_accuracy", "s--", "federated (client holdout, before training)")])
    lines("loss.png", "Loss per round", "loss", [
        ("test_loss", "o-", "test loss"), ("train_loss", "s--", "train loss (clients, last epoch)")])

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rs)
    for ph in PHASES:
        vals = [r["timings"]["phases_s"].get(ph, 0.0) for r in rs]
        ax.bar(x, vals, bottom=bottom, label=ph.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(xlabel="round", ylabel="seconds (client phases: mean over clients)", title="Time per round by phase")
    ax.legend(fontsize=8)
    save(fig, "phases.png")

    plats = sorted({p for r in rs for p in r["platforms"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(plats))
    for i, p in enumerate(plats):
        ax.bar([xx + i * width for xx in x], [r["platforms"].get(p, {}).get("mean_client_s", 0.0) for r in rs],
               width=width, label=p)
    ax.set(xlabel="round", ylabel="mean client time (s)", title="Client time per round by platform")
    ax.legend()
    save(fig, "platforms.png")
    return files
