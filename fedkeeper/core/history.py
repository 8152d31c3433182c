"""Per-client history (timings, failures, participation, last loss), folded from each round's result; pure data."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

# The phases a client reports in its update's timings, summed into its end-to-end duration.
PHASES = ("invoke_s", "download_s", "init_s", "holdout_eval_s", "train_s")
MAX_SECONDS = 1e6  # a client's timings are validated non-negative; this bounds what one can claim
OUTCOMES = ("included", "rejected", "failed", "timeout", "straggler")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _int(v: Any, default: int = 0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def empty() -> dict:
    """A history that has folded no round yet."""
    return {"round": -1, "clients": {}}


def parse(raw: Any) -> dict:
    """A history from whatever the store held (malformed entries are dropped, never trusted)."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("clients"), Mapping):
        return empty()
    r = raw.get("round")
    out = {"round": r if isinstance(r, int) and not isinstance(r, bool) and r >= -1 else -1, "clients": {}}
    for cid, rec in raw["clients"].items():
        if isinstance(cid, str) and isinstance(rec, Mapping):
            out["clients"][cid] = dict(rec)
    return out


def duration(timings: Any) -> float | None:
    """A client's end-to-end seconds (invoke wait, download, init, holdout evaluation, training) from its timings."""
    if not isinstance(timings, Mapping):
        return None
    parts = [_num(timings.get(p)) for p in PHASES]
    known = [min(max(0.0, p), MAX_SECONDS) for p in parts if p is not None]
    return sum(known) if known else None


def _entry(hist: dict, cid: str, platform: str | None) -> dict:
    rec = hist["clients"].setdefault(cid, {})
    if platform:
        rec["platform"] = str(platform)[:64]
    for k in ("selected", "included", "rejected", "failures", "timeouts", "stragglers", "streak"):
        rec[k] = _int(rec.get(k))
    if not isinstance(rec.get("durations"), list):
        rec["durations"] = []
    return rec


def fold(hist: dict, result: Mapping, platforms: Mapping[str, str], window: int = 5,
         examples: Mapping[str, int] | None = None) -> dict:
    """Fold round result `result` into `hist` (in place, and returned); a round already folded is skipped."""
    r = _int(result.get("round"), -1)
    if r < 0 or r <= hist.get("round", -1):
        return hist  # folding is idempotent: a takeover or a repeated call adds nothing twice
    t = result.get("timings") if isinstance(result.get("timings"), Mapping) else {}
    created, deadline = _num(t.get("manifest_created")), _num(t.get("deadline"))
    # A straggler ran at least until the deadline: a lower bound on its duration.
    waited = max(0.0, deadline - created) if created is not None and deadline is not None else None
    metas = result.get("clients") if isinstance(result.get("clients"), Mapping) else {}
    outcome: dict[str, str] = {}
    for c in _ids(result.get("selected")):
        outcome[c] = "straggler"
    for c in _ids(result.get("stragglers")):
        outcome[c] = "straggler"
    for x in _records(result.get("failed")):
        reason = str(x.get("reason", ""))
        outcome[str(x["client"])] = "timeout" if "timed out" in reason or "timeout" in reason else "failed"
    for x in _records(result.get("rejected")):
        if x["client"] in platforms:  # unselected writers are rejected too, but have no selection to count
            outcome[str(x["client"])] = "rejected"
    for c in _ids(result.get("included")):
        outcome[c] = "included"
    for cid, what in outcome.items():
        if cid not in platforms:
            continue  # only the round's selected clients have a history entry for it
        rec = _entry(hist, cid, platforms.get(cid))
        rec["selected"] += 1
        rec["last_selected"] = r
        rec["last_outcome"] = what
        if examples and cid in examples:
            rec["examples"] = int(examples[cid])
        d = None
        if what == "included":
            rec["included"] += 1
            rec["last_included"] = r
            rec["streak"] = 0
            meta = metas.get(cid) if isinstance(metas.get(cid), Mapping) else {}
            tim = meta.get("timings") if isinstance(meta.get("timings"), Mapping) else {}
            d = duration(tim)
            rec["phases"] = {p: round(min(max(0.0, v), MAX_SECONDS), 4) for p in PHASES
                             if (v := _num(tim.get(p))) is not None}
            rec["cold_start"] = bool(tim.get("cold_start")) if isinstance(tim.get("cold_start"), bool) else None
            n = _int(meta.get("num_examples"), 0)
            if n:
                rec["examples"] = n
            met = meta.get("metrics") if isinstance(meta.get("metrics"), Mapping) else {}
            loss = _num(met.get("train_loss"))
            if loss is not None:
                rec["last_train_loss"] = loss
        elif what == "rejected":
            rec["rejected"] += 1
            rec["streak"] = 0  # it delivered in time; the update itself was refused
        else:
            rec["streak"] += 1
            key = {"failed": "failures", "timeout": "timeouts", "straggler": "stragglers"}[what]
            rec[key] += 1
            if what in ("timeout", "straggler") and waited is not None:
                d = waited
        if d is not None:
            rec["durations"] = (rec["durations"] + [round(d, 4)])[-max(1, window):]
    hist["round"] = r
    return hist


def _ids(v: Any) -> list[str]:
    return [str(x) for x in v if isinstance(x, str)] if isinstance(v, list) else []


def _records(v: Any) -> list[Mapping]:
    return [x for x in v if isinstance(x, Mapping) and isinstance(x.get("client"), str)] if isinstance(v, list) else []


def expected_duration(rec: Mapping | None) -> float | None:
    """A client's expected seconds per round: the median of its recent durations (None without any)."""
    if not isinstance(rec, Mapping):
        return None
    ds = [d for x in rec.get("durations") or [] if (d := _num(x)) is not None and d >= 0]
    if not ds:
        return None
    ds.sort()
    mid = len(ds) // 2
    return ds[mid] if len(ds) % 2 else 0.5 * (ds[mid - 1] + ds[mid])


def reliability(rec: Mapping | None) -> float:
    """Share of a client's selections that ended in a delivered update (1.0 without history: optimistic)."""
    if not isinstance(rec, Mapping):
        return 1.0
    sel = _int(rec.get("selected"))
    if sel == 0:
        return 1.0
    return (_int(rec.get("included")) + _int(rec.get("rejected"))) / sel


def explored(rec: Mapping | None) -> bool:
    """True once a client has been selected at least once."""
    return isinstance(rec, Mapping) and _int(rec.get("selected")) > 0


def platform_priors(population: Iterable[Mapping], hist: Mapping) -> dict[str, float]:
    """Median expected duration per platform, the guess for a client of that platform without history."""
    by: dict[str, list[float]] = {}
    clients = hist.get("clients") or {}
    for c in population:
        d = expected_duration(clients.get(c["id"]))
        if d is not None:
            by.setdefault(str(c.get("platform", "")), []).append(d)
    out = {}
    for p, ds in by.items():
        ds.sort()
        out[p] = ds[len(ds) // 2]
    return out
