"""Results from the store alone: results.json, per-round phase timings, and the PNG plots."""

from __future__ import annotations

import datetime as dt
import html
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
    # A round resumed after a pause counts from its latest resume, not across the paused gap.
    resumes = [_d(_json(store, k)).get("at") for k in store.list(f"{keys.round_prefix(r)}resumed/")]
    resumed_at = max((t for t in map(lambda v: _n(v, None), resumes) if t is not None), default=None)
    start = max(created, resumed_at) if created and resumed_at else created
    round_s = (finished - start) if start and finished else None
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
        "round": r + 1, "status": status[:32],  # counted from 1 wherever people read it
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
                    "manifest_created": created, "resumed_at": resumed_at, "evaluation_s": eval_s},
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


def run_label(results: dict) -> str:
    """Which run a figure shows: name, dataset, model, partition, strategy and start date."""
    fed = results.get("federation") or {}
    sec = lambda k: fed.get(k) if isinstance(fed.get(k), dict) else {}  # noqa: E731
    rs = results.get("rounds") or []
    started = rs[0]["timings"].get("manifest_created") if rs else None
    when = dt.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M") if isinstance(started, (int, float)) else "?"
    return (f"{fed.get('name', '?')}: {sec('data').get('dataset', '?')}, {sec('model').get('name', '?')}, "
            f"{sec('data').get('partition', '?')} partition, {sec('strategy').get('name', '?')}, "
            f"{len(fed.get('clients') or [])} clients, started {when}")


def plot(results: dict, out: Path) -> list[Path]:
    """accuracy.png, accuracy_time.png (against wall time: how fast a run learns, rounds or async versions
    alike), loss.png, phases.png (time per round by phase) and platforms.png (client time by platform)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rs = results["rounds"]
    if not rs:
        return []
    x = [r["round"] for r in rs]
    label = run_label(results)
    files = []

    def rounds_axis(ax) -> None:
        # Rounds are whole numbers; with few rounds matplotlib would otherwise tick at 1.5, 2.5, ...
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(x) <= 12:
            ax.set_xticks(x)
        ax.set_xlabel("round")

    def save(fig, name):
        fig.text(0.01, 0.005, label, fontsize=7, color="0.35", ha="left", va="bottom")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)

    def lines(name: str, title: str, ylabel: str, series: list[tuple[str, str, str]]) -> None:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for fld, style, lab in series:
            ys = [r.get(fld) for r in rs]
            ax.plot([a for a, y in zip(x, ys) if y is not None], [y for y in ys if y is not None], style, label=lab)
        ax.set(ylabel=ylabel, title=title)
        rounds_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, name)

    lines("accuracy.png", "Accuracy per round", "accuracy", [
        ("test_accuracy", "o-", "test (central)"),
        ("federated_accuracy", "s--", "federated (client holdout, before training)")])
    # Accuracy against wall time since the first round opened, each point named by its round (or model version,
    # in asynchronous mode): the comparison that matters between modes and selection strategies.
    start = min((r["timings"].get("manifest_created") for r in rs if r["timings"].get("manifest_created")), default=None)
    pts = [(r["timings"]["finished_at"] - start, r["test_accuracy"], r["round"]) for r in rs
           if start and r["timings"].get("finished_at") and r.get("test_accuracy") is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="test (central)")
        for t_s, acc, rnd in pts:
            ax.annotate(str(rnd), (t_s, acc), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        ax.set(xlabel="wall time since the first round opened (s)", ylabel="accuracy",
               title="Accuracy against wall time (points: round or model version)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "accuracy_time.png")
    lines("loss.png", "Loss per round", "loss", [
        ("test_loss", "o-", "test loss"), ("train_loss", "s--", "train loss (clients, last epoch)")])

    # Two panels: the stack shows where a round's time goes; the log-scale lines below keep the
    # sub-second phases (download, upload, aggregation) readable next to seconds of training.
    fig, (top, low) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    bottom = [0.0] * len(rs)
    colors = {}
    for ph in PHASES:
        vals = [float(r["timings"]["phases_s"].get(ph, 0.0) or 0.0) for r in rs]
        bars = top.bar(x, vals, bottom=bottom, label=ph.replace("_", " "))
        colors[ph] = bars.patches[0].get_facecolor() if bars.patches else None
        bottom = [b + v for b, v in zip(bottom, vals)]
        if any(v > 0 for v in vals):
            # A zero (no cold start that round) has no place on a log scale: NaN leaves a gap, not a false line.
            low.plot(x, [v if v > 0 else float("nan") for v in vals], "o-", color=colors[ph], label=ph.replace("_", " "))
    top.set(ylabel="seconds", title="Time per round by phase (client phases: mean over clients)")
    top.legend(fontsize=8, ncol=2)
    low.set_yscale("log")
    low.set(ylabel="seconds (log)")
    low.grid(alpha=0.3, which="both")
    rounds_axis(low)
    save(fig, "phases.png")

    plats = sorted({p for r in rs for p in r["platforms"]})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(1, len(plats))
    for i, p in enumerate(plats):
        # Bars of one round sit side by side, centred on that round's tick.
        offset = (i - (len(plats) - 1) / 2) * width
        ax.bar([xx + offset for xx in x], [r["platforms"].get(p, {}).get("mean_client_s", 0.0) for r in rs],
               width=width, label=p)
    ax.set(ylabel="mean client time (s)", title="Client time per round by platform")
    rounds_axis(ax)
    ax.legend()
    save(fig, "platforms.png")
    return files


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#222}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:.5rem 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right;vertical-align:top} th{background:#f4f4f4}
td.l,th.l{text-align:left} .plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1rem}
.plots img{width:100%;border:1px solid #eee} .bad{color:#a00} .ok{color:#070} pre{background:#f8f8f8;padding:.8rem;overflow:auto}
details{margin:.4rem 0} summary{cursor:pointer}
"""


def _e(v: Any) -> str:
    """Any value as escaped HTML text; clients write some of these records, so nothing is trusted."""
    return html.escape("" if v is None else str(v))


def _fmt(v: Any, nd: int = 4) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else _e(v)
    return f"{v:.{nd}f}"


def _outcomes(rec: dict) -> dict[str, str]:
    """client -> 'included' or 'rejected: reason' (and failed, straggler, late), from one round's record."""
    c = rec.get("clients") if isinstance(rec.get("clients"), dict) else {}
    out: dict[str, str] = {}
    for cid in c.get("selected") or []:
        out[str(cid)] = "selected, no update"
    for cid in c.get("included") or []:
        out[str(cid)] = "included"
    for kind in ("failed", "stragglers", "late"):
        for x in c.get(kind) or []:
            cid = x.get("client") if isinstance(x, dict) else x
            why = x.get("reason") if isinstance(x, dict) else None
            out[str(cid)] = kind.rstrip("s") + (f": {why}" if why else "")
    for x in c.get("rejected") or []:
        cid = x.get("client") if isinstance(x, dict) else x
        why = x.get("reason") if isinstance(x, dict) else None
        out[str(cid)] = "rejected" + (f": {why}" if why else "")
    return out


def _client_table(rec: dict) -> str:
    per = rec.get("per_client") if isinstance(rec.get("per_client"), dict) else {}
    outcomes = _outcomes(rec)
    rows = []
    for cid in sorted(set(outcomes) | set(per)):
        p = per.get(cid) if isinstance(per.get(cid), dict) else {}
        m = p.get("metrics") if isinstance(p.get("metrics"), dict) else {}
        verdict = outcomes.get(cid, "-")
        cls = "ok" if verdict == "included" else "bad"
        rows.append("<tr>" + f"<td class=l>{_e(cid)}</td><td class=l>{_e(p.get('platform'))}</td>"
                    f"<td class='l {cls}'>{_e(verdict)}</td><td>{_e(p.get('num_examples'))}</td>"
                    + "".join(f"<td>{_fmt(p.get(k), 3)}</td>" for k in
                              ("invoke_s", "cold_start_s", "download_s", "train_s", "upload_s"))
                    + f"<td>{_fmt(m.get('train_loss'))}</td></tr>")
    head = ("<tr><th class=l>client</th><th class=l>platform</th><th class=l>outcome</th><th>examples</th>"
            "<th>invoke s</th><th>cold start s</th><th>download s</th><th>train s</th><th>upload s</th>"
            "<th>train loss</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def write_html(results: dict, out_dir: str | os.PathLike) -> Path:
    """report.html: summary, the four plots (embedded), per-client outcomes and timings, and the config; works offline."""
    import base64

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rs = [r for r in results.get("rounds") or [] if isinstance(r, dict)]
    fin = results.get("final") if isinstance(results.get("final"), dict) else {}
    summary = []
    for r in rs:
        c = r.get("clients") if isinstance(r.get("clients"), dict) else {}
        t = r.get("timings") if isinstance(r.get("timings"), dict) else {}
        summary.append(f"<tr><td>{_e(r.get('round'))}</td><td class=l>{_e(r.get('status'))}</td>"
                       f"<td>{_fmt(r.get('test_accuracy'))}</td><td>{_fmt(r.get('test_loss'))}</td>"
                       f"<td>{_fmt(r.get('federated_accuracy'))}</td>"
                       f"<td>{len(c.get('included') or [])}/{len(c.get('selected') or [])}</td>"
                       f"<td>{len(c.get('rejected') or [])}</td><td>{len(c.get('failed') or [])}</td>"
                       f"<td>{_fmt(t.get('round_s'), 2)}</td><td>{_e(r.get('aggregations'))}</td></tr>")
    plots = []
    for name, alt in (("accuracy.png", "accuracy per round"), ("accuracy_time.png", "accuracy against wall time"),
                      ("loss.png", "loss per round"),
                      ("phases.png", "time per round by phase"), ("platforms.png", "client time by platform")):
        p = out / name
        if p.is_file():
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            plots.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>')
    plot_html = f"<div class=plots>{''.join(plots)}</div>" if plots else \
        "<p>No plots: they need matplotlib (pip install 'fedkeeper[tf]').</p>"
    clients = "".join(f"<details{' open' if i == len(rs) - 1 else ''}><summary>round {_e(r.get('round'))}: "
                      f"{_e(r.get('status'))}</summary>{_client_table(r)}</details>" for i, r in enumerate(rs))
    fed = results.get("federation") if isinstance(results.get("federation"), dict) else {}
    shown = {k: v for k, v in fed.items() if k != "clients"}
    config = html.escape(json.dumps(shown, indent=2, sort_keys=True, default=str))
    clients_cfg = html.escape(json.dumps(fed.get("clients"), indent=1, default=str))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>FedKeeper report: {_e(fed.get('name'))}</title><style>{_CSS}</style></head>
<body>
<h1>FedKeeper report: {_e(fed.get('name'))}</h1>
<p class=sub>{_e(run_label(results))}<br>store: {_e(results.get('store'))}</p>
<h2>Summary</h2>
<p>Final test accuracy <b>{_fmt(fin.get('test_accuracy'))}</b> after {_e(fin.get('rounds'))} round(s)
{f"in {fin['wall_s']:.1f} s" if isinstance(fin.get('wall_s'), (int, float)) else ""}; status {_e(fin.get('status'))}.
Rounds are counted from 1.</p>
<table><tr><th>round</th><th class=l>status</th><th>test acc</th><th>test loss</th><th>fed acc</th>
<th>included</th><th>rejected</th><th>failed</th><th>round s</th><th>aggregations</th></tr>{''.join(summary)}</table>
<h2>Plots</h2>{plot_html}
<h2>Clients per round</h2>
<p>Outcome of every selected client (rejections with the aggregator's reason) and its mean phase times.</p>
{clients}
<h2>Config</h2>
<pre>{config}</pre>
<details><summary>clients ({len(fed.get('clients') or [])})</summary><pre>{clients_cfg}</pre></details>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
