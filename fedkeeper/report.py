"""Results from the store alone: results.json, per-round phase timings, and the PNG plots."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from fedkeeper.core import keys, validate
from fedkeeper.store import NotFound, Store

PHASES = ("invoke", "cold_start", "download", "training", "upload", "aggregation", "evaluation")


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else 0.0


# Records hold what clients and earlier versions wrote: read every field through these, never trust a type.
def _d(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _l(v: Any) -> list:
    return v if isinstance(v, list) else []


def _n(v: Any, default: Any = 0.0) -> Any:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else default


def _s(v: Any) -> str | None:
    return v[:64] if isinstance(v, str) else None


def _json(store: Store, key: str) -> Any:
    try:
        return validate.loads(store.get(key), max_bytes=64 << 20, what=key, lenient=True)
    except (NotFound, validate.InputError):
        return None


def _reasons(v: Any) -> list[dict]:
    """[{client, reason}] from a record's rejected/failed list, whatever it holds."""
    return [{"client": str(x.get("client"))[:64], "reason": str(x.get("reason", ""))[:2000]}
            for x in _l(v) if isinstance(x, dict)]


def _ids(v: Any) -> list[str]:
    return [x for x in _l(v) if isinstance(x, str)]


def _privacy(v: Any) -> dict | None:
    """A round's privacy record, rendered defensively: ε, δ, released rounds, noise and clipping."""
    if not isinstance(v, dict):
        return None
    out = {k: _n(v.get(k), None) for k in ("epsilon", "delta", "releases", "noise_multiplier", "noise_std",
                                            "clip_norm", "next_clip_norm", "epsilon_budget", "sampling_rate")}
    out.update(dp=_s(v.get("dp")), secure_aggregation=v.get("secure_aggregation") is True,
               stop_reason=v["stop_reason"][:1000] if isinstance(v.get("stop_reason"), str) else None)
    return out


def round_record(store: Store, r: int) -> dict | None:
    """One round's entry of results.json, or None if the round has no result yet."""
    res = _json(store, keys.result(r))
    if res is None:
        if not store.exists(keys.result(r)):
            return None
        res = {"status": "unreadable"}
    res = _d(res)
    ev = _d(_json(store, keys.evaluation(r)))
    manifest = _d(_json(store, keys.manifest(r)))
    markers = store.list(f"{keys.round_prefix(r)}aggregations/")
    side = {keys.record_client(k): _d(_json(store, k)) for k in store.list(f"{keys.round_prefix(r)}timings/")}
    late = [keys.record_client(k) for k in store.list(f"{keys.round_prefix(r)}late/")]
    per_client = {}
    for cid, m in _d(res.get("clients")).items():
        if not isinstance(m, dict):
            continue
        t = _d(m.get("timings"))
        cold = t.get("cold_start") is True
        init = _n(t.get("init_s"))
        per_client[str(cid)[:64]] = {
            "platform": _s(m.get("platform")), "num_examples": _n(m.get("num_examples"), None), "cold": cold,
            "invoke_s": _n(t.get("invoke_s")), "cold_start_s": init if cold else 0.0,
            "warm_init_s": 0.0 if cold else init,
            "download_s": _n(t.get("download_s")), "holdout_eval_s": _n(t.get("holdout_eval_s")),
            "train_s": _n(t.get("train_s")), "upload_s": _n(_d(side.get(cid)).get("upload_s")),
            "metrics": {k: _n(v, None) for k, v in _d(m.get("metrics")).items()},
        }
    tm = _d(res.get("timings"))
    evt = _d(ev.get("timings"))
    eval_s = _n(evt.get("download_s")) + _n(evt.get("evaluate_s"))
    created = _n(manifest.get("created"), None) or _n(tm.get("manifest_created"), None)
    finished = _n(tm.get("finished_at"), None)
    round_s = (finished - created) if created and finished else None
    pc = list(per_client.values())
    phases = {
        "invoke": _mean([c["invoke_s"] for c in pc]),
        "cold_start": _mean([c["cold_start_s"] for c in pc]),
        "download": _mean([c["download_s"] for c in pc]),
        "training": _mean([c["train_s"] + c["holdout_eval_s"] + c["warm_init_s"] for c in pc]),
        "upload": _mean([c["upload_s"] for c in pc]),
        "aggregation": _n(tm.get("aggregation_s")) + _n(tm.get("write_s")),
        "evaluation": eval_s,
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
    status = res.get("status") if isinstance(res.get("status"), str) else "unknown"
    return {
        "round": r, "status": status[:32],
        "test_accuracy": _n(ev.get("test_accuracy"), None), "test_loss": _n(ev.get("test_loss"), None),
        "evaluation_error": _s(ev.get("error")),
        "federated_accuracy": _n(res.get("federated_accuracy"), None), "federated_loss": _n(res.get("federated_loss"), None),
        "train_loss": _n(res.get("train_loss"), None),
        "clients": {"selected": _ids(res.get("selected")), "included": _ids(res.get("included")),
                    "rejected": _reasons(res.get("rejected")), "failed": _reasons(res.get("failed")),
                    "stragglers": _ids(res.get("stragglers")), "late": late},
        "aggregations": len(markers), "aggregated_by": _s(res.get("aggregated_by")),
        "num_examples": _n(res.get("num_examples"), None),
        "timings": {"round_s": round_s, "phases_s": phases,
                    "triggered_by": _s(tm.get("triggered_by")), "event_delivered_at": _n(tm.get("event_delivered_at"), None),
                    "event_time": _n(tm.get("event_time"), None),
                    "aggregation_started_at": _n(tm.get("aggregation_started_at"), None), "finished_at": finished,
                    "manifest_created": created, "evaluation_s": eval_s},
        "platforms": by_platform,
        "per_client": per_client,
        "privacy": _privacy(res.get("privacy")),
    }


def collect(store: Store, runtime: dict | None = None) -> dict:
    """The whole results.json content, rebuilt from the store (plus optional runtime stats)."""
    fed = _json(store, keys.FEDERATION)
    if not isinstance(fed, dict):
        raise NotFound(keys.FEDERATION)
    state = _d(_json(store, keys.STATE))
    out_rounds = []
    for r in range(int(_n(fed.get("rounds"), 0))):
        rec = round_record(store, r)
        if rec is None:
            break
        out_rounds.append(rec)
    evaluated = [x for x in out_rounds if x["test_accuracy"] is not None]
    final = {"test_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
             "test_loss": evaluated[-1]["test_loss"] if evaluated else None,
             "rounds": len(out_rounds), "status": _s(state.get("status"))}
    private = [x["privacy"] for x in out_rounds if x.get("privacy")]
    if private:
        final["privacy"] = private[-1]
    if isinstance(state.get("reason"), str) and state["reason"]:
        final["stop_reason"] = state["reason"][:1000]
    if out_rounds and out_rounds[0]["timings"]["manifest_created"] and out_rounds[-1]["timings"]["finished_at"]:
        final["wall_s"] = out_rounds[-1]["timings"]["finished_at"] - out_rounds[0]["timings"]["manifest_created"]
    result = {"federation": fed, "data": _json(store, "data/meta.json"), "store": store.url,
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
    x = [r["round"] + 1 for r in rs]  # plots count rounds from 1, like the console lines
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
