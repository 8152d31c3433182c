"""The trigger: opens round r, writes its manifest, and invokes the selected clients asynchronously."""

from __future__ import annotations

import math
import time

import numpy as np

from fedkeeper.core import keys, rounds
from fedkeeper.core.config import FederationConfig
from fedkeeper.functions.client import training_spec
from fedkeeper.functions.context import AGGREGATOR, CLIENT, Context, HandlerError
from fedkeeper.store import NotFound

MSG_NO_PRESIGN = ("client_access: presigned needs a store that signs URLs, and {url} does not; "
                  "use an s3:// or gs:// store, or set client_access: store")
MSG_NOT_SET_UP = "the store at {url} holds no federation.json; run `fedkeeper setup` or `fedkeeper run` first"


def select_clients(cfg: FederationConfig, r: int) -> list[dict]:
    """Sample max(min_clients, ceil(fraction·N)) clients for round r, deterministically from the seed."""
    n = len(cfg.clients)
    k = min(n, max(cfg.strategy.min_clients, math.ceil(cfg.strategy.fraction * n)))
    rng = np.random.default_rng([cfg.seed, r])
    idx = sorted(rng.choice(n, size=k, replace=False).tolist()) if k < n else list(range(n))
    out = []
    for i in idx:
        c = cfg.clients[i]
        out.append({"id": c.id, "platform": c.platform, "data": c.data or keys.client_data(c.id)})
    return out


def client_payload(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, c: dict, invoked_at: float) -> dict:
    """The invocation for one client; with presigned access it carries URLs for exactly its three objects."""
    payload = {"store": ctx.store.url, "round": manifest.round, "client": c["id"], "mode": "train",
               "invoked_at": invoked_at, "platform": c["platform"]}
    if cfg.client_access != "presigned":
        return payload
    store = ctx.store
    expires = max(60, int(manifest.deadline - ctx.now()))  # valid until the round's deadline
    max_bytes = int(cfg.strategy.max_update_mb * 1024 * 1024)
    data = c["data"]
    payload["access"] = {
        "model": store.presign(manifest.model, "GET", expires),
        "data": data if data.startswith(("http://", "https://")) else store.presign(data, "GET", expires),
        "update": store.presign(keys.update(manifest.round, c["id"]), "PUT", expires, max_bytes=max_bytes),
        "update_headers": getattr(store, "presign_put_headers", lambda n: {})(max_bytes),
    }
    payload["spec"] = dict(presigned_spec(store, cfg), selected=manifest.ids)
    return payload


def presigned_spec(store, cfg: FederationConfig) -> dict:
    """What a credential-less client needs to know besides its URLs: model settings and class count."""
    return dict(training_spec(cfg), num_classes=store.get_json("data/meta.json")["num_classes"])


def started_key(r: int) -> str:
    """Written once every selected client of round r was invoked; its absence means the opening call failed."""
    return f"{keys.round_prefix(r)}started.json"


def read_state(store) -> dict:
    """state.json, or a fresh state if the federation has not started."""
    return store.get_json_or(keys.STATE) or rounds.new_state()


def open_round(ctx: Context) -> tuple[int, rounds.Manifest] | None:
    """The round currently open (manifest written, no result yet), if any."""
    state = read_state(ctx.store)
    r = int(state.get("round", 0))
    try:
        m = rounds.Manifest.from_json(ctx.store.get(keys.manifest(r)))
    except NotFound:
        return None
    if ctx.store.exists(keys.result(r)):
        return None
    return r, m


def handle(event: dict, ctx: Context) -> dict:
    """Start a round: event {"round": r} starts r (idempotent); without it the next round starts unless one is open."""
    store = ctx.store
    try:
        cfg = ctx.config()
    except NotFound:
        raise HandlerError(MSG_NOT_SET_UP.format(url=store.url), 409) from None
    state = read_state(store)
    requested = event.get("round")
    if requested is None:
        current = open_round(ctx)
        if current is not None:
            r_open, m = current
            if not ctx.store.exists(started_key(r_open)):
                # The call that opened this round failed before every client was invoked; finish its work.
                return _reinvoke(ctx, cfg, r_open)
            overdue = ctx.now() >= m.deadline
            return {"status": "busy", "round": r_open, "overdue": overdue,
                    "message": f"round {r_open} is still open" + (" and overdue; a tick will close it" if overdue else "")}
        r = int(state.get("next_round", 0))
    else:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
            raise HandlerError(f"'round' must be a non-negative integer, got {requested!r}")
        r = requested
    if r >= cfg.rounds:
        return {"status": "finished", "round": r, "message": f"all {cfg.rounds} rounds are done"}
    if cfg.client_access == "presigned" and not callable(getattr(store, "presign", None)):
        raise HandlerError(MSG_NO_PRESIGN.format(url=store.url), 409)
    if not store.exists(keys.model(r)):
        raise HandlerError(f"round {r} cannot start: global model {keys.model(r)} is missing "
                           f"(round {r - 1} has not produced it yet)", 409)

    selected = select_clients(cfg, r)
    now = ctx.now()
    quorum = max(1, math.ceil(cfg.strategy.quorum * len(selected)))
    manifest = rounds.Manifest(round=r, clients=selected, model=keys.model(r),
                               deadline=now + cfg.strategy.deadline_s, quorum=quorum, created=now)
    if not store.put_if_absent(keys.manifest(r), rounds.dumps(manifest)):
        # A duplicate trigger event: the first one already invoked the clients.
        if (event.get("reinvoke") or not store.exists(started_key(r))) and not store.exists(keys.result(r)):
            return _reinvoke(ctx, cfg, r)
        return {"status": "exists", "round": r}
    store.put_json(keys.STATE, dict(state, round=r, next_round=r, status=rounds.OPEN, updated=now,
                                    model=keys.model(r)))
    invoked_at = time.time()
    for c in selected:
        ctx.invoker.invoke(CLIENT, client_payload(ctx, cfg, manifest, c, invoked_at), c["platform"])
    store.put_json(started_key(r), {"at": time.time()})
    return {"status": "started", "round": r, "selected": [c["id"] for c in selected],
            "deadline": manifest.deadline, "quorum": quorum, "invoke_s": time.time() - invoked_at}


def _reinvoke(ctx: Context, cfg: FederationConfig, r: int) -> dict:
    """Resume an open round: invoke again every selected client whose update is not in the store."""
    m = rounds.Manifest.from_json(ctx.store.get(keys.manifest(r)))
    missing = [c for c in m.clients if not ctx.store.exists(keys.update(r, c["id"]))]
    invoked_at = time.time()
    for c in missing:
        ctx.invoker.invoke(CLIENT, client_payload(ctx, cfg, m, c, invoked_at), c["platform"])
    if not missing:  # every update is in; the aggregation event may have been lost
        ctx.invoker.invoke(AGGREGATOR, {"store": ctx.store.url, "round": r}, None)
    ctx.store.put_json(started_key(r), {"at": time.time()})
    return {"status": "resumed", "round": r, "reinvoked": [c["id"] for c in missing]}


def tick(event: dict, ctx: Context) -> dict:
    """The cron entry: close an overdue round (the aggregator applies the quorum), else start the next round."""
    current = open_round(ctx)
    if current is not None:
        r, m = current
        if ctx.now() >= m.deadline:
            ctx.invoker.invoke(AGGREGATOR, {"store": ctx.store.url, "round": r}, None)
            return {"status": "closing", "round": r}
        return {"status": "busy", "round": r, "deadline_in_s": m.deadline - ctx.now()}
    return handle({}, ctx)
