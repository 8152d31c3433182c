"""Buffered asynchronous mode (FedBuff's spirit): no round barrier, a new model version every `buffer.size` updates.

Each client is invoked to train from a model version v (a create-only dispatch record makes that exactly one
invocation) and writes rounds/<v>/updates/<client>. Its store event places the update into the first buffer
that is not full, by a create-only slot write, and invokes the client again on the newest version (or, if its
update is from the newest version, parks it until the next one is published). Buffer b is round b: once its
slots are full and model version b exists, one aggregator claims it (the round's claim), folds the updates as
staleness-weighted deltas from the versions they were trained on, and writes model version b+1 and
rounds/<b>/result.json. Slots are immutable and folded in slot order, so a takeover writes the same bytes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fedkeeper.core import blob, keys, rounds, staleness
from fedkeeper.core.config import FederationConfig
from fedkeeper.functions import protocol
from fedkeeper.functions.context import CLIENT, Context, HandlerError

log = logging.getLogger("fedkeeper.async")
SEEN_PREFIX = "async/seen/"
ALLOCATE_ATTEMPTS = 1000


def version(store) -> int:
    """The newest published model version (0 before the first buffer is folded)."""
    return protocol.read_state(store).rounds_done


def _members(store, cfg: FederationConfig) -> dict[str, dict]:
    from fedkeeper.functions import population

    return {c["id"]: c for c in population.population(store, cfg)}


def _started_at(store) -> float | None:
    rec = protocol.read_json(store, keys.ASYNC_STARTED)
    at = rec.get("at") if isinstance(rec, dict) else None
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None


def _over_budget(ctx: Context, cfg: FederationConfig) -> bool:
    at = _started_at(ctx.store)
    return bool(cfg.buffer.time_budget_s) and at is not None and ctx.now() - at >= cfg.buffer.time_budget_s


def dispatch(ctx: Context, v: int, entry: dict) -> bool:
    """Invoke a client to train from version v, exactly once per (client, version); True if this call did."""
    store, cid = ctx.store, entry["id"]
    rec = {"client": cid, "platform": entry["platform"], "data": entry.get("data") or keys.client_data(cid),
           "round": v, "at": ctx.now()}
    if not store.put_if_absent(keys.dispatch(v, cid), rounds.dumps(rec)):
        return False
    store.put_if_absent(SEEN_PREFIX + f"{cid}.json", rounds.dumps({"client": cid, "first": v}))
    ctx.invoker.invoke(CLIENT, {"store": store.url, "round": v, "client": cid, "mode": "train", "async": True,
                                "invoked_at": time.time(), "platform": entry["platform"], "attempt": 1},
                       entry["platform"])
    return True


def start(ctx: Context, cfg: FederationConfig) -> dict:
    """Start the asynchronous federation (idempotent): every member trains from the newest version."""
    store = ctx.store
    if cfg.client_access == "presigned":
        raise HandlerError("mode: async needs client_access: store (presigned URLs are issued per round)", 409)
    st = protocol.read_state(store)
    if st.status == rounds.FINISHED:
        return {"status": "finished", "round": st.rounds_done, "message": "the asynchronous federation has ended"}
    first = store.put_if_absent(keys.ASYNC_STARTED, rounds.dumps({"at": ctx.now()}))
    if first:
        protocol.write_state(store, 0, rounds.OPEN, next_round=0)
    v = st.rounds_done
    # Every member trains continuously (re-invoked as soon as it delivers), so all of them start now; the
    # platforms' concurrency bounds how many run at once.
    chosen = list(_members(store, cfg).values())
    if not chosen:
        raise HandlerError("the federation has no clients; add one with `fedkeeper clients add` or POST /clients", 409)
    n = sum(dispatch(ctx, v, c) for c in chosen)
    return {"status": "started" if first else "running", "round": v, "dispatched": n, "mode": "async"}


def _next(ctx: Context, cfg: FederationConfig, cid: str, v: int, current: int) -> None:
    """After a client's invocation on version v ended: invoke it on the newest version, or park it until one."""
    if protocol.read_state(ctx.store).status == rounds.FINISHED:
        return
    entry = _members(ctx.store, cfg).get(cid)
    if entry is None:
        return  # removed: it gets no more work
    if current > v:
        dispatch(ctx, current, entry)
    else:
        ctx.store.put_json(keys.waiting(cid), {"client": cid, "after": v, "at": ctx.now()})


def _release(ctx: Context, cfg: FederationConfig, current: int) -> list[str]:
    """Invoke the parked clients on the newest version."""
    store = ctx.store
    members = _members(store, cfg)
    out = []
    for k in store.list(keys.WAITING_PREFIX):
        cid = keys.record_client(k)
        rec = protocol.read_json(store, k)
        after = rec.get("after") if isinstance(rec, dict) else None
        if isinstance(after, int) and after >= current:
            continue
        # Removed before the dispatch: a client that delivers again parks itself anew after it.
        store.delete(k)
        if cid in members and dispatch(ctx, current, members[cid]):
            out.append(cid)
    return out


def _allocate(store, cfg: FederationConfig, key: str, v: int, cid: str, b: int) -> int:
    """Place an update in the first buffer from b on that has a free slot (create-only); returns that buffer."""
    size = cfg.buffer.size
    for _ in range(ALLOCATE_ATTEMPTS):
        n = len(store.list(keys.buffer_prefix(b)))
        if n >= size:
            b += 1
            continue
        if store.put_if_absent(keys.buffer_slot(b, n), rounds.dumps({"key": key, "round": v, "client": cid})):
            store.put_json(keys.assigned(v, cid), {"buffer": b, "slot": n})
            return b
    raise HandlerError(f"could not place {key} in a buffer after {ALLOCATE_ATTEMPTS} attempts", 503)


def on_update(ctx: Context, cfg: FederationConfig, v: int, cid: str, received: float) -> dict:
    """A client's update from version v landed: place it in a buffer, invoke the client again, fold a full buffer."""
    store = ctx.store
    if not store.exists(keys.dispatch(v, cid)):
        store.put_if_absent(keys.late(v, cid), rounds.dumps({"client": cid, "round": v, "at": received,
                                                             "reason": "not invoked on this model version"}))
        return {"status": "ignored", "round": v, "reason": f"{cid} was not invoked on version {v}"}
    st = protocol.read_state(store)
    if st.status == rounds.FINISHED:
        store.put_if_absent(keys.late(v, cid), rounds.dumps({"client": cid, "round": v, "at": received,
                                                             "reason": "the federation had ended"}))
        return {"status": "done-already", "round": v}
    current = st.rounds_done
    placed = protocol.read_json(store, keys.assigned(v, cid))
    b = placed.get("buffer") if isinstance(placed, dict) else None
    if not isinstance(placed, dict):
        if current - v > cfg.buffer.max_staleness:
            reason = (f"update from version {v} is {current - v} versions behind version {current}, over "
                      f"buffer.max_staleness {cfg.buffer.max_staleness}")
            store.put_if_absent(keys.assigned(v, cid), rounds.dumps({"buffer": None, "rejected": reason}))
            store.put_if_absent(keys.late(v, cid), rounds.dumps({"client": cid, "round": v, "at": received,
                                                                 "reason": reason}))
        else:
            b = _allocate(store, cfg, keys.update(v, cid), v, cid, current)
    _next(ctx, cfg, cid, v, current)
    if not isinstance(b, int):
        return {"status": "rejected", "round": v, "client": cid}
    return fold_ready(ctx, cfg, b, received)


def client_failed(ctx: Context, cfg: FederationConfig, v: int, cid: str, reason: str, attempt: int) -> dict:
    """A client's invocation on version v failed: record it and give the client work on the next version."""
    store = ctx.store
    if not store.exists(keys.dispatch(v, cid)):
        return {"status": "ignored", "reason": f"client {cid} was not invoked on version {v}"}
    if store.exists(keys.update(v, cid)):
        return {"status": "delivered", "round": v, "client": cid}
    rec = {"client": cid, "round": v, "reason": str(reason)[:2000], "attempt": attempt, "final": True, "at": ctx.now()}
    if not store.put_if_absent(keys.failure(v, cid), rounds.dumps(rec)):
        return {"status": "duplicate", "round": v, "client": cid}
    # Parked until the next version when it failed on the newest: a failing client cannot spin.
    _next(ctx, cfg, cid, v, version(store))
    return {"status": "failed", "round": v, "client": cid}


def fold_ready(ctx: Context, cfg: FederationConfig, b: int, received: float) -> dict:
    """Fold buffer b into version b+1 if it is full and version b exists; exactly once, by the round's claim."""
    store = ctx.store
    if store.exists(keys.result(b)):
        return {"status": "done-already", "round": b}
    slots = sorted(store.list(keys.buffer_prefix(b)))
    if len(slots) < cfg.buffer.size:
        return {"status": "waiting", "round": b, "have": len(slots), "need": cfg.buffer.size}
    if not store.exists(keys.model(b)):
        return {"status": "waiting", "round": b, "reason": f"version {b} is not published yet"}
    ok, holder = protocol.claim(ctx, b, cfg.strategy.lease_s)
    if not ok:
        return {"status": "claimed", "round": b, "by": holder}
    protocol.write_state(store, b, rounds.AGGREGATING)
    out = fold(ctx, cfg, b, slots[:cfg.buffer.size])
    out["timings"].update({"aggregation_started_at": received, "claim_takeover_from": holder or None})
    return publish(ctx, cfg, b, out)


def _prev_published(store, b: int) -> float | None:
    if b == 0:
        return _started_at(store)
    prev = protocol.read_json(store, keys.result(b - 1))
    t = prev.get("timings") if isinstance(prev, dict) and isinstance(prev.get("timings"), dict) else {}
    at = t.get("finished_at")
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None


def fold(ctx: Context, cfg: FederationConfig, b: int, slots: list[str]) -> dict:
    """Buffer b's result: each valid update's delta from the version it trained on, weighted by examples times
    the staleness weight, averaged over examples and added to version b (a deterministic function of the slots)."""
    store = ctx.store
    t0 = time.perf_counter()
    glob = blob.decode(store.get(keys.model(b)))
    chk_known = protocol.known_examples(store)
    max_bytes = int(cfg.strategy.max_update_mb * 1024 * 1024)
    weight_of = staleness.parse(cfg.buffer.staleness)
    acc = {name: np.zeros(t.shape, np.float64) for name, t in glob.tensors.items()}
    bases: dict[int, dict] = {b: glob.tensors}
    total = 0
    included, rejected, meta, entries, seen = [], [], {}, [], set()
    for slot in slots:
        rec = protocol.read_json(store, slot)
        parsed = keys.parse_update(rec.get("key", "")) if isinstance(rec, dict) and isinstance(rec.get("key"), str) else None
        if parsed is None or parsed in seen:
            continue  # a slot written twice for one update (a crash between slot and marker) counts once
        seen.add(parsed)
        v, cid = parsed
        entries.append((cid, v))
        tau = b - v
        data = protocol._fetch(store, keys.update(v, cid), max_bytes)
        if isinstance(data, Exception):
            rejected.append({"client": cid, "reason": f"update could not be read: {str(data)[:300]}"})
            continue
        try:
            upd = blob.decode(data)
        except blob.BlobError as exc:
            rejected.append({"client": cid, "reason": f"corrupt update: {str(exc)[:300]}"})
            continue
        chk = protocol.Check(round=v, fingerprint=glob.meta.get("fingerprint"), known=chk_known,
                             max_examples=cfg.strategy.max_examples, max_bytes=max_bytes)
        reason = protocol.check_update(upd, cid, chk) or protocol._finite_tensors(upd)
        if reason is None and not 0 <= tau <= cfg.buffer.max_staleness:
            reason = f"update from version {v} is {tau} versions behind, over buffer.max_staleness"
        if reason:
            rejected.append({"client": cid, "reason": reason})
            continue
        if v not in bases:
            bases[v] = blob.decode(store.get(keys.model(v))).tensors
        n = int(upd.meta["num_examples"])
        w = n * weight_of.weight(tau)
        for name, t in upd.tensors.items():
            acc[name] += w * (np.asarray(t, np.float64) - bases[v][name])
        total += n
        included.append(cid)
        m = upd.meta
        meta[cid] = {"num_examples": n, "metrics": m.get("metrics") or {}, "timings": m.get("timings") or {},
                     "platform": m.get("platform"), "version": v, "staleness": tau, "weight": weight_of.weight(tau)}
    status = rounds.DONE if included else rounds.FAILED
    new = glob.tensors
    if included:
        cand = {k: (glob.tensors[k] + cfg.buffer.server_lr * acc[k] / total).astype(glob.tensors[k].dtype)
                for k in glob.tensors}
        if all(np.isfinite(t.sum(dtype=np.float64)) for t in cand.values()):
            new = cand
        else:
            status = rounds.FAILED
            rejected.append({"client": "*", "reason": "the weighted update overflowed float32; the model stays"})
    from fedkeeper.core import strategy as strategies

    fed = strategies.from_config(cfg).metrics(meta, included)
    created = _prev_published(store, b)
    return {
        "round": b, "status": status, "mode": "async", "strategy": cfg.strategy.name,
        "selected": [c for c, _ in entries], "included": included, "rejected": sorted(rejected, key=lambda x: x["client"]),
        "stragglers": [], "failed": [], "quorum": 1, "num_examples": total,
        "federated_accuracy": fed.get("accuracy"), "federated_loss": fed.get("loss"), "train_loss": fed.get("train_loss"),
        "clients": meta, "staleness": {c: meta[c]["staleness"] for c in included},
        "aggregated_by": ctx.invocation_id, "model": keys.model(b + 1),
        "_model": blob.encode(new, {"kind": "model", "round": b + 1, "parent": keys.model(b), "clients": len(included),
                                    "strategy": cfg.strategy.name, "mode": "async"}),
        "_entries": entries,
        "timings": {"aggregation_s": time.perf_counter() - t0, "manifest_created": created, "deadline": created,
                    "groups": 0},
    }


def publish(ctx: Context, cfg: FederationConfig, b: int, out: dict) -> dict:
    """Write version b+1, the buffer's result and the state; request its evaluation; hand out work again."""
    store = ctx.store
    model_bytes, entries = out.pop("_model"), out.pop("_entries")
    store.put(keys.model(b + 1), model_bytes)
    store.put_json(keys.aggregation_marker(b, ctx.invocation_id), {"invocation": ctx.invocation_id, "at": ctx.now()})
    out["timings"]["finished_at"] = ctx.now()
    store.put_json(keys.result(b), out)
    try:
        from fedkeeper.functions import population

        members = _members(store, cfg)
        clients = [{"id": c, "platform": members.get(c, {}).get("platform", "")} for c, _ in entries]
        m = rounds.Manifest(round=b, clients=clients, model=keys.model(b), deadline=0.0, quorum=1)
        population.record_round(store, cfg, m, out)
    except Exception:  # noqa: BLE001 - history guides selection; it must never fail a published version
        log.exception("version %d: client history not updated", b + 1)
    last = b + 1 >= cfg.rounds or _over_budget(ctx, cfg)
    protocol.write_state(store, b, rounds.FINISHED if last else out["status"], next_round=b + 1,
                         rounds_done=b + 1, model=keys.model(b + 1))
    if not last:
        protocol.write_state(store, b + 1, rounds.OPEN, next_round=b + 1)
    protocol.request_evaluation(ctx, cfg, b, attempt=1)
    released = [] if last else _release(ctx, cfg, b + 1)
    if not last and len(store.list(keys.buffer_prefix(b + 1))) >= cfg.buffer.size:
        ctx.invoker.invoke("aggregator", {"store": store.url, "round": b + 1, "delivered_at": time.time()}, None)
    return {"status": out["status"], "round": b, "included": out["included"],
            "rejected": [x["client"] for x in out["rejected"]], "released": released, "finished": last}


def tick(ctx: Context, cfg: FederationConfig, event: dict) -> dict:
    """The cron entry in async mode: start, end on the time budget, release parked clients, invoke clients that
    joined, fold a full buffer whose event was lost, re-run lost evaluations."""
    store = ctx.store
    if not store.exists(keys.ASYNC_STARTED):
        if cfg.schedule and event.get("liveness"):
            return {"status": "idle"}
        return start(ctx, cfg)
    repaired = protocol.repair_evaluations(ctx, cfg)
    st = protocol.read_state(store)
    if st.status == rounds.FINISHED:
        return {"status": "finished", "evaluations": repaired}
    current = st.rounds_done
    if _over_budget(ctx, cfg) and st.status != rounds.AGGREGATING:
        # The budget ends the federation at the newest published version.
        protocol.write_state(store, st.round, rounds.AGGREGATING)
        protocol.write_state(store, st.round, rounds.FINISHED, rounds_done=current, next_round=current)
        return {"status": "finished", "round": current, "reason": "time budget", "evaluations": repaired}
    released = _release(ctx, cfg, current)
    timed_out = _time_out(ctx, cfg, current)
    members = _members(store, cfg)
    seen = {keys.record_client(k) for k in store.list(SEEN_PREFIX)}
    joined = [cid for cid, e in members.items() if cid not in seen and dispatch(ctx, current, e)]
    folded = fold_ready(ctx, cfg, current, ctx.now())
    return {"status": "running", "round": current, "released": released, "joined": joined, "timed_out": timed_out,
            "buffer": folded.get("status"), "evaluations": repaired}


def _time_out(ctx: Context, cfg: FederationConfig, current: int) -> list[str]:
    """Clients whose newest invocation outlived its platform's timeout with neither update nor failure record
    (a lost invocation, or one cut off by an interrupted run) are failed, which gives them work again."""
    store, now = ctx.store, ctx.now()
    latest: dict[str, tuple[int, str]] = {}
    for v in range(max(0, current - cfg.buffer.max_staleness - 1), current + 1):
        for k in store.list(f"{keys.round_prefix(v)}dispatch/"):
            latest[keys.record_client(k)] = (v, k)
    out = []
    for cid, (v, k) in sorted(latest.items()):
        if store.exists(keys.update(v, cid)) or store.exists(keys.failure(v, cid)):
            continue
        rec = protocol.read_json(store, k)
        at = rec.get("at") if isinstance(rec, dict) else None
        try:
            limit = cfg.platform(str(rec.get("platform"))).timeout_s
        except (KeyError, AttributeError):
            limit = cfg.deadline_bound
        if isinstance(at, (int, float)) and not isinstance(at, bool) and now > at + limit + protocol.TIMEOUT_GRACE_S:
            client_failed(ctx, cfg, v, cid, f"no update within the platform's {limit:g} s timeout (timed out)", 1)
            out.append(cid)
    return out
