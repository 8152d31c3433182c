"""The round protocol: every rule of a round, the same on every platform; the handlers are thin I/O around it.

A round: the trigger selects clients through the strategy and writes the manifest; each client writes a
running marker, then its update (or a failure is recorded, by the client, the platform or the tick); a client
is settled once its update is in or its failure is final; when every selected client is settled (or the
deadline passed) an aggregator claims the round with a create-only write, validates and folds the updates,
and writes model, result and state; then the evaluation and the next round are requested. The tick (a
platform's cron, the local runtime's timer) finds timed-out clients, closes ready rounds whose event was lost,
re-runs lost evaluations and starts rounds nobody started.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from fedkeeper.core import blob, faults, history, keys, rounds, selection, validate
from fedkeeper.core import strategy as strategies
from fedkeeper.core.aggregate import global_norm
from fedkeeper.core.config import FederationConfig
from fedkeeper.functions import privacy, secagg
from fedkeeper.functions.context import AGGREGATOR, CLIENT, TRIGGER, Context, HandlerError, parsed_record
from fedkeeper.store import NotFound, Store, TooLarge

log = logging.getLogger("fedkeeper.protocol")

MSG_NO_PRESIGN = ("client_access: presigned needs a store that signs URLs, and {url} does not; "
                  "use an s3:// or gs:// store, or set client_access: store")
MSG_NOT_SET_UP = "the store at {url} holds no federation.json; run `fedkeeper setup` or `fedkeeper run` first"
# A client invocation that outlives its platform's timeout by this much has certainly ended.
TIMEOUT_GRACE_S = 5.0
# A call opening a round has this long, plus a little per client, to invoke every client before another call
# (a duplicate trigger event, the next tick, POST /rounds) takes its work over.
START_LEASE_S = 60.0
START_LEASE_PER_CLIENT_S = 0.01
EVALUATION_ATTEMPTS = 3
EVALUATION_GRACE_S = 30.0


# -- records -------------------------------------------------------------------------------------------
def read_json(store: Store, key: str) -> Any:
    """A JSON record, or None if it is missing or unreadable (records may be written by anyone)."""
    try:
        return validate.loads(store.get(key), max_bytes=64 << 20, what=key, lenient=True)
    except (NotFound, validate.InputError):
        return None


def read_state(store: Store) -> rounds.State:
    """state.json as a typed record (a fresh state if missing or malformed)."""
    return rounds.State.parse(read_json(store, keys.STATE))


def write_state(store: Store, r: int, status: str, **fields: Any) -> bool:
    """Move the federation to `status` for round r, unless that would go back in time; True if written."""
    cur = read_state(store)
    if r < cur.round:
        return False  # a stale writer (e.g. a late duplicate) must not move the federation backwards
    if r == cur.round and status != cur.status:
        try:
            rounds.transition(cur.status, status)
        except rounds.StateError:
            return False
    new = rounds.State(**{**cur.to_dict(), **fields, "round": r, "status": status, "updated": time.time()})
    store.put_json(keys.STATE, new.to_dict())
    return True


def read_manifest(store: Store, r: int) -> rounds.Manifest | None:
    """Round r's manifest, or None if the round was never opened."""
    try:
        return parsed_record(store, keys.manifest(r), rounds.Manifest.from_json)  # shared: never changed
    except NotFound:
        return None


def model_key(store: Store, r: int) -> str:
    """The global model at the start of round r: a sharded model's index if there is one, else the single file."""
    return keys.model_index(r) if store.exists(keys.model_index(r)) else keys.model(r)


def known_examples(store: Store) -> dict[str, int]:
    """Each client's partition size as setup wrote it (clients with their own data are absent).

    Shared between calls while data/meta.json is unchanged (it lists every client): callers must not change it.
    """
    try:
        return parsed_record(store, "data/meta.json", _known_examples)
    except NotFound:
        return {}


def _known_examples(raw: bytes) -> dict[str, int]:
    try:
        meta = validate.loads(raw, max_bytes=64 << 20, what="data/meta.json", lenient=True)
    except validate.InputError:
        meta = None
    sizes = meta.get("client_examples") if isinstance(meta, dict) else None
    if not isinstance(sizes, dict):
        return {}
    return {str(k): int(v) for k, v in sizes.items() if isinstance(v, int) and not isinstance(v, bool)}


# -- starting a round ------------------------------------------------------------------------------------
def select_clients(cfg: FederationConfig, r: int, store: Store | None = None, hist: dict | None = None) -> list[dict]:
    """Round r's clients and their fit config: the members (from the store, else the config) chosen by
    `selection.name` from their history, each configured by the strategy (seeded, deterministic)."""
    from fedkeeper.functions import population as pop

    if store is not None:
        members = pop.population(store, cfg)
    else:
        members = [{"id": c.id, "platform": c.platform, "data": c.data or keys.client_data(c.id)} for c in cfg.clients]
    strategy = strategies.from_config(cfg)
    if cfg.selection.name == "random" or not members:
        return strategy.configure(r, members, cfg.seed)
    hist = hist if hist is not None else (pop.read_history(store) if store is not None else history.empty())
    idx = selection.select(selection_params(cfg), members, hist, strategy.sample_size(len(members)), r, cfg.seed)
    chosen = [members[i] for i in idx]
    # The strategy still gives each chosen client its fit config; sampling all of them leaves the choice as made.
    return strategies.create(cfg.strategy.name, strategies.Settings(fraction=1.0, min_clients=1,
                                                                    quorum=cfg.strategy.quorum),
                             cfg.strategy.params).configure(r, chosen, cfg.seed)


def selection_params(cfg: FederationConfig) -> selection.Params:
    """The selection settings of a config as the pure selection functions take them."""
    s = cfg.selection
    return selection.Params(name=s.name, max_wait=s.max_wait, explore=s.explore, alpha=s.alpha,
                            preferred_s=s.preferred_s, deadline_percentile=s.deadline_percentile,
                            deadline_margin=s.deadline_margin, deadline_floor_s=s.deadline_floor_s,
                            deadline_cap_s=s.deadline_cap_s)


def round_deadline_s(cfg: FederationConfig, selected: list[dict], hist: dict) -> float:
    """Seconds round r stays open: strategy.deadline_s, or with `auto` one derived from the selected clients' history."""
    if cfg.strategy.deadline_s != "auto":
        return float(cfg.strategy.deadline_s)
    members = [{"id": c["id"], "platform": c["platform"]} for c in selected]
    est = selection.expected_durations(members, hist)
    return selection.auto_deadline(est, selection_params(cfg))


def presigned_spec(store: Store, cfg: FederationConfig) -> dict:
    """What a credential-less client needs besides its URLs: the training settings and the class count."""
    from fedkeeper.functions.client import training_spec

    meta = read_json(store, "data/meta.json") or {}
    return dict(training_spec(cfg), num_classes=meta.get("num_classes"))


def client_payload(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, c: dict, invoked_at: float,
                   attempt: int = 1) -> dict:
    """The invocation for one client; with presigned access it carries URLs for exactly its three objects."""
    payload = {"store": ctx.store.url, "round": manifest.round, "client": c["id"], "mode": "train",
               "invoked_at": invoked_at, "platform": c["platform"], "attempt": attempt}
    if secagg.enabled(cfg):  # secure aggregation hook: a client is invoked for the phase its round is in
        payload["mode"] = secagg.phase(ctx.store, manifest.round)
    if cfg.client_access != "presigned":
        return payload
    store = ctx.store
    expires = max(60, int(manifest.deadline - ctx.now()))  # valid until the round's deadline
    max_bytes = int(cfg.strategy.max_update_mb * 1024 * 1024)
    data = c["data"]
    key = keys.update(manifest.round, c["id"])
    access = {
        "model": store.presign(manifest.model, "GET", expires),
        "data": data if data.startswith(("http://", "https://")) else store.presign(data, "GET", expires),
        "update": store.presign(key, "PUT", expires, max_bytes=max_bytes),
        "update_headers": getattr(store, "presign_put_headers", lambda n: {})(max_bytes),
    }
    post = getattr(store, "presign_post", None)
    if post is not None:  # S3: a POST policy is the only signed upload that bounds the size
        access["update_post"] = post(key, expires, max_bytes)
    if (c.get("config") or {}).get("scaffold"):
        access.update(_control_access(store, manifest.round, c["id"], expires, 2 * max_bytes))
    payload["access"] = access
    payload["spec"] = dict(presigned_spec(store, cfg), selected=manifest.ids, fit=c.get("config") or {})
    return payload


def _control_access(store: Store, r: int, client: str, expires: int, max_bytes: int) -> dict:
    """SCAFFOLD: GETs for the server state and the client's own control variate (when they exist), a PUT for it."""
    out = {"control_put": store.presign(keys.control_variate(client), "PUT", expires, max_bytes=max_bytes),
           "control_headers": getattr(store, "presign_put_headers", lambda n: {})(max_bytes)}
    if store.exists(keys.server_state(r)):
        out["server_state"] = store.presign(keys.server_state(r), "GET", expires)
    if store.exists(keys.control_variate(client)):
        out["control"] = store.presign(keys.control_variate(client), "GET", expires)
    return out


def start_round(ctx: Context, r: int | None = None, reinvoke: bool = False) -> dict:
    """Open round r (or the next one unless a round is open): manifest, state, client invocations. Idempotent."""
    store = ctx.store
    try:
        cfg = ctx.config()
    except NotFound:
        raise HandlerError(MSG_NOT_SET_UP.format(url=store.url), 409) from None
    if cfg.mode == "async":  # no rounds to open: buffered asynchronous mode keeps clients busy instead
        from fedkeeper.functions import asynchronous

        return asynchronous.start(ctx, cfg)
    state = read_state(store)
    if r is None:
        current = open_round(store)
        if current is not None:
            m = current
            if start_unfinished(ctx, m):
                # The call that opened this round failed before every client was invoked; finish its work.
                return resume_round(ctx, cfg, m.round)
            overdue = ctx.now() >= m.deadline
            return {"status": "busy", "round": m.round, "overdue": overdue,
                    "message": f"round {m.round} is still open" + (" and overdue; a tick will close it" if overdue else "")}
        r = state.next_round
    repaired = repair_evaluations(ctx, cfg, force=True) if reinvoke else []
    if r >= cfg.rounds:
        return {"status": "finished", "round": r, "message": f"all {cfg.rounds} rounds are done", "evaluations": repaired}
    if cfg.client_access == "presigned" and not callable(getattr(store, "presign", None)):
        raise HandlerError(MSG_NO_PRESIGN.format(url=store.url), 409)
    stop = privacy.budget_stop(store, cfg, r)  # privacy hook: no round may overspend the ε budget
    if stop:
        write_state(store, r, rounds.FINISHED, next_round=r, reason=stop)
        return {"status": "finished", "round": r, "message": stop, "evaluations": repaired}
    model = model_key(store, r)
    if not store.exists(model):
        raise HandlerError(f"round {r} cannot start: global model {keys.model(r)} is missing "
                           f"(round {r - 1} has not produced it yet)", 409)
    strategy = strategies.from_config(cfg)
    from fedkeeper.functions import population as pop

    hist = pop.catch_up(store, cfg, r)
    selected = select_clients(cfg, r, store, hist)
    if not selected:
        raise HandlerError(f"round {r} cannot start: the federation has no clients; add one with "
                           "`fedkeeper clients add` or POST /clients", 409)
    now = ctx.now()
    # Masked rounds are not sharded (secure aggregation hook: one mask stream spans the whole model); sharding
    # needs a composing strategy. Tree mode works under masks (partial sums of masked vectors stay masked) and
    # with shards (each group's shards are folded apart, then merged per shard).
    nshards = cfg.aggregation.shards if strategy.composes and not secagg.enabled(cfg) else 1
    deadline_s = round_deadline_s(cfg, selected, hist)
    manifest = rounds.Manifest(round=r, clients=selected, model=model, deadline=now + deadline_s,
                               quorum=strategy.min_included(len(selected)), created=now,
                               fan_in=tree_fan_in(cfg, strategy, len(selected)), shards=nshards)
    if not store.put_if_absent(keys.manifest(r), rounds.dumps(manifest)):
        # A duplicate trigger event: the first one already invoked the clients (unless it failed midway).
        if not store.exists(keys.result(r)):
            m = read_manifest(store, r)
            if reinvoke or (m is not None and start_unfinished(ctx, m)):
                return resume_round(ctx, cfg, r)
        return {"status": "exists", "round": r}
    write_state(store, r, rounds.OPEN, next_round=r, model=model)
    invoked_at = time.time()
    try:
        for c in selected:
            ctx.invoker.invoke(CLIENT, client_payload(ctx, cfg, manifest, c, invoked_at), c["platform"])
    except BaseException:
        _start_failed(store, r)
        raise
    store.put_json(keys.started(r), {"at": time.time()})
    return {"status": "started", "round": r, "selected": [c["id"] for c in selected],
            "deadline": manifest.deadline, "quorum": manifest.quorum, "invoke_s": time.time() - invoked_at}


def start_lease_s(selected: int) -> float:
    """How long the call that opened a round may take to invoke its clients before another call takes over."""
    return START_LEASE_S + START_LEASE_PER_CLIENT_S * selected


def start_unfinished(ctx: Context, m: rounds.Manifest) -> bool:
    """True if the call that opened round m stopped before invoking every client: it said it failed, or it has
    been silent past the start lease. A call still invoking is left alone: resuming it would invoke every client
    it has not reached yet twice (a trigger event and a tick arriving together at a thousand clients do that)."""
    store = ctx.store
    if store.exists(keys.started(m.round)):
        return False
    last = read_json(store, keys.starting(m.round))
    last = last if isinstance(last, dict) else {}
    if last.get("failed") is True:
        return True
    since = max(v for v in (m.created, last.get("at"), 0.0) if validate.finite_number(v))
    return ctx.now() >= since + start_lease_s(len(m.ids))


def _start_failed(store: Store, r: int) -> None:
    """Record that this call failed before invoking every client, so the next call finishes its work at once
    instead of waiting out the start lease (best effort: the lease still applies if this write fails too)."""
    try:
        store.put_json(keys.starting(r), {"at": time.time(), "failed": True})
    except Exception:  # noqa: BLE001 - the invoke error is the one to report
        pass


def resume_round(ctx: Context, cfg: FederationConfig, r: int) -> dict:
    """Resume an open round: invoke again every selected client that is not settled (under secure aggregation, the
    clients the round's current phase waits for, unmask included), or poke the aggregator if none is missing."""
    m = read_manifest(ctx.store, r)
    assert m is not None
    # Another call arriving meanwhile leaves this one its lease (start_unfinished) instead of invoking twice.
    ctx.store.put_json(keys.starting(r), {"at": ctx.now(), "failed": False})
    try:
        if secagg.enabled(cfg):  # secure aggregation hook: only the clients the round's current phase waits for
            ids = secagg.resume(ctx, cfg, m)
        else:
            s = settle(ctx.store, m)
            missing = [c for c in m.clients if c["id"] not in s.delivered and c["id"] not in s.failed]
            invoked_at = time.time()
            for c in missing:
                attempt = int(s.attempts.get(c["id"], 0)) + 1
                ctx.invoker.invoke(CLIENT, client_payload(ctx, cfg, m, c, invoked_at, attempt), c["platform"])
            ids = [c["id"] for c in missing]
    except BaseException:
        _start_failed(ctx.store, r)
        raise
    if not ids:  # every client is settled; the aggregation event may have been lost
        ctx.invoker.invoke(AGGREGATOR, {"store": ctx.store.url, "round": r}, None)
    ctx.store.put_json(keys.started(r), {"at": time.time()})
    return {"status": "resumed", "round": r, "reinvoked": ids}


def open_round(store: Store) -> rounds.Manifest | None:
    """The round currently open (manifest written, no result yet), if any."""
    state = read_state(store)
    m = read_manifest(store, state.round)
    if m is None or store.exists(keys.result(state.round)):
        return None
    return m


# -- settlement ------------------------------------------------------------------------------------------
@dataclass
class Settlement:
    """Where each selected client of a round stands."""

    delivered: list[str] = field(default_factory=list)        # update present (to be accepted or rejected)
    failed: dict[str, dict] = field(default_factory=dict)      # failure is final (no retry left)
    attempts: dict[str, int] = field(default_factory=dict)     # last failed attempt per client
    running: dict[str, dict] = field(default_factory=dict)     # running markers of unsettled clients
    selected: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """True once every selected client is settled."""
        return len(self.delivered) + len(self.failed) >= len(self.selected)


def settle(store: Store, manifest: rounds.Manifest, running: bool = False) -> Settlement:
    """Read round r's updates and failure records (and, for the tick, running markers) into a Settlement."""
    r = manifest.round
    selected = manifest.ids
    chosen = set(selected)
    present = {p[1] for k in store.list(keys.updates_prefix(r)) if (p := keys.parse_update(k)) and p[0] == r}
    s = Settlement(delivered=[c for c in selected if c in present], selected=selected)
    for k in store.list(keys.invocations_prefix(r)):
        cid = keys.record_client(k)
        if cid not in chosen or cid in present:
            continue
        rec = read_json(store, k)
        if not isinstance(rec, dict):
            continue
        s.attempts[cid] = _attempt(rec.get("attempt"))
        if rec.get("final", True):
            s.failed[cid] = rec
    for k in store.list(keys.running_prefix(r)) if running else ():
        cid = keys.record_client(k)
        if cid in chosen and cid not in present and cid not in s.failed:
            rec = read_json(store, k)
            if isinstance(rec, dict):
                s.running[cid] = rec
    return s


def _attempt(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1


def client_started(ctx: Context, r: int, client: str, attempt: int) -> None:
    """A client invocation began: its running marker lets the tick find it if it never ends."""
    ctx.store.put_json(keys.running(r, client), {"client": client, "round": r, "attempt": attempt,
                                                 "started_at": ctx.now(), "platform": ctx.platform})


def client_failed(ctx: Context, r: int, client: str, reason: str, attempt: int = 1, platform: str = "") -> dict:
    """A client invocation failed or timed out: retry it while the budget and deadline allow, else settle it."""
    store = ctx.store
    cfg = ctx.config()
    if cfg.mode == "async":
        from fedkeeper.functions import asynchronous

        return asynchronous.client_failed(ctx, cfg, r, client, reason, attempt)
    m = read_manifest(store, r)
    if m is None or m.entry(client) is None:
        return {"status": "ignored", "reason": f"client {client} is not selected in round {r}"}
    if store.exists(keys.result(r)):
        return {"status": "closed", "round": r}
    if store.exists(keys.update(r, client)):
        return {"status": "delivered", "round": r, "client": client}
    key = keys.failure(r, client)
    try:
        raw, version = store.get_versioned(key)
        prev = validate.loads(raw, what=key)
    except NotFound:
        prev, version = None, None
    except validate.InputError:
        prev, version = {}, None
    if isinstance(prev, dict) and _attempt(prev.get("attempt")) >= attempt:
        return {"status": "duplicate", "round": r, "client": client, "attempt": attempt}
    retry = attempt <= cfg.strategy.retries and ctx.now() < m.deadline
    rec = {"client": client, "round": r, "reason": str(reason)[:2000], "attempt": attempt, "final": not retry,
           "platform": platform or m.entry(client)["platform"], "at": ctx.now()}
    wrote = store.put_if_absent(key, rounds.dumps(rec)) if version is None else store.put_if_match(
        key, rounds.dumps(rec), version)
    if not wrote:
        return {"status": "raced", "round": r, "client": client}
    if retry:
        entry = m.entry(client)
        ctx.invoker.invoke(CLIENT, client_payload(ctx, cfg, m, entry, time.time(), attempt + 1), entry["platform"])
        return {"status": "retrying", "round": r, "client": client, "attempt": attempt + 1}
    # The round may now be complete without this client; let the aggregator decide.
    ctx.invoker.invoke(AGGREGATOR, {"store": store.url, "round": r, "delivered_at": time.time()}, None)
    return {"status": "failed", "round": r, "client": client, "attempt": attempt}


def failure_event(event: dict) -> tuple[dict, str] | None:
    """(the failed invocation's payload, reason) from a failure event, ours or a Lambda on-failure destination's."""
    if isinstance(event.get("failure"), dict):
        f = event["failure"]
        return (f.get("payload") if isinstance(f.get("payload"), dict) else {}), str(f.get("reason", "failed"))[:2000]
    if isinstance(event.get("requestPayload"), dict) and isinstance(event.get("requestContext"), dict):
        resp = event.get("responsePayload")
        reason = resp.get("errorMessage") if isinstance(resp, dict) else None
        return event["requestPayload"], str(reason or event["requestContext"].get("condition", "failed"))[:2000]
    return None


def on_failure(ctx: Context, payload: dict, reason: str) -> dict:
    """A platform reports a failed client invocation (train or evaluate)."""
    r, client = payload.get("round"), payload.get("client")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        return {"status": "ignored", "reason": "failure event without a round"}
    if payload.get("mode") == "evaluate":
        return evaluation_failed(ctx, r, reason)
    if not isinstance(client, str) or not validate.CLIENT_ID.match(client):
        return {"status": "ignored", "reason": "failure event without a client id"}
    if payload.get("mode") == secagg.UNMASK:  # its own records: the survivor's update is in, only its answer is not
        return secagg.unmask_failed(ctx, r, client, reason, _attempt(payload.get("attempt")),
                                    str(payload.get("platform", ""))[:64])
    return client_failed(ctx, r, client, reason, _attempt(payload.get("attempt")), str(payload.get("platform", ""))[:64])


# -- aggregation -----------------------------------------------------------------------------------------
def on_event(ctx: Context, event: dict) -> dict:
    """The aggregator's entry: an update key (store event), a round (tick, failure poke) or a failure report."""
    store = ctx.store
    received = ctx.now()
    failure = failure_event(event)
    if failure is not None:
        return on_failure(ctx, *failure)
    client = None
    if "key" in event:
        parsed = keys.parse_update(str(event["key"]))
        if parsed is None:
            return {"status": "ignored", "key": str(event["key"])[:200]}
        r, client = parsed
    elif "round" in event:
        r = event["round"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise HandlerError(f"'round' must be a non-negative integer, got {r!r}")
    else:
        raise HandlerError("aggregator event needs 'key' (an update key), 'round', or 'failure'")

    if ctx.config().mode == "async":  # buffers, not rounds: an update is placed, a round poke folds a full buffer
        from fedkeeper.functions import asynchronous

        cfg = ctx.config()
        if client:
            return asynchronous.on_update(ctx, cfg, r, client, received)
        return asynchronous.fold_ready(ctx, cfg, r, received)
    result = read_json(store, keys.result(r))
    if result is not None or store.exists(keys.result(r)):
        if client:
            _record_late(store, r, client, result if isinstance(result, dict) else {}, received)
        return {"status": "done-already", "round": r}
    manifest = read_manifest(store, r)
    if manifest is None:
        return {"status": "ignored", "round": r, "reason": "no manifest for this round"}
    if client and manifest.entry(client) is None:
        store.put_if_absent(keys.late(r, client), rounds.dumps({"client": client, "round": r, "reason": "not selected"}))
    cfg = ctx.config()
    masked = secagg.enabled(cfg)
    gate = secagg.progress(ctx, cfg, manifest) if masked else None  # secure aggregation hook: its phases come first
    if masked and manifest.fan_in:  # masked partial sums: group folds during the unmask phase, then the root
        return secagg.tree_step(ctx, cfg, manifest, gate, event, client, received)
    if gate is not None:
        return gate
    if manifest.shards > 1 and not masked:
        from fedkeeper.functions import shards

        return shards.step(ctx, cfg, manifest, client, event, received)
    if manifest.fan_in and not masked:
        return tree_step(ctx, cfg, manifest, client, event, received)
    s = settle(store, manifest)
    overdue = received >= manifest.deadline
    if not s.ready and not overdue and not masked:
        return {"status": "waiting", "round": r, "have": len(s.delivered), "failed": len(s.failed),
                "need": len(manifest.ids)}
    ok, holder = claim(ctx, r, cfg.strategy.lease_s)
    if not ok:
        return {"status": "claimed", "round": r, "by": holder}
    faults.maybe_crash("aggregator_after_claim", first=not holder)
    started = ctx.now()
    write_state(store, r, rounds.AGGREGATING)
    out = secagg.aggregate(ctx, cfg, manifest, strategies.from_config(cfg)) if masked else aggregate(ctx, cfg, manifest, s)
    out["timings"].update(trigger_timings(event, client, received, started, holder))
    return finish(ctx, cfg, manifest, out)


def _num(v: Any, default: Any) -> Any:
    return float(v) if validate.finite_number(v) else default


def claim(ctx: Context, r: int, lease_s: float, key: str | None = None) -> tuple[bool, str]:
    """Create-only claim on round r (or a group's fold, by key); an expired or unreadable lease is taken over by CAS."""
    store, now = ctx.store, ctx.now()
    key = key or keys.claim(r)
    mine = rounds.Claim(round=r, owner=ctx.invocation_id, lease_until=now + lease_s)
    if store.put_if_absent(key, rounds.dumps(mine)):
        return True, ""
    try:
        data, version = store.get_versioned(key)
    except NotFound:
        return False, "claim vanished"
    try:
        raw = validate.loads(data, what="claim")
        held = rounds.Claim(round=int(raw["round"]), owner=str(raw["owner"]), lease_until=float(raw["lease_until"]))
    except (validate.InputError, KeyError, TypeError, ValueError):
        held = rounds.Claim(round=r, owner="unreadable claim", lease_until=0.0)
    if not held.expired(now):
        return False, held.owner
    mine.taken_over_from = held.owner
    if store.put_if_match(key, rounds.dumps(mine), version):
        return True, held.owner
    return False, "lost takeover race"


def _record_late(store: Store, r: int, client: str, result: dict, now: float) -> None:
    included = result.get("included") if isinstance(result.get("included"), list) else []
    rejected = result.get("rejected") if isinstance(result.get("rejected"), list) else []
    known = set(map(str, included)) | {str(x.get("client")) for x in rejected if isinstance(x, dict)}
    if client not in known:
        store.put_if_absent(keys.late(r, client), rounds.dumps({"client": client, "round": r, "at": now}))


def _fetch(store: Store, key: str, max_bytes: int) -> bytes | memoryview | Exception:
    """An update's bytes, its size checked before it is downloaded; any failure is returned, not raised."""
    try:
        return store.get_bounded(key, max_bytes)
    except TooLarge as exc:
        return ValueError(f"update is {exc.size} bytes, over the {max_bytes}-byte limit (strategy.max_update_mb)")
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable update is a rejection, not a crash
        return exc


def _prefetch(store: Store, key_list: list[str], max_bytes: int) -> Iterator[tuple[str, Any]]:
    """Yield (key, bytes or exception) in order while the next download is already under way."""
    if not key_list:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(_fetch, store, key_list[0], max_bytes)
        for i, key in enumerate(key_list):
            data = fut.result()
            if i + 1 < len(key_list):
                fut = pool.submit(_fetch, store, key_list[i + 1], max_bytes)
            yield key, data


@dataclass
class Check:
    """What the aggregator checks every update against."""

    round: int
    fingerprint: str
    known: dict[str, int]
    max_examples: int
    max_bytes: int


def check_update(b: blob.Blob, client: str, chk: Check) -> str | None:
    """Why a decoded update must be rejected (metadata schema, round, client, architecture, example count), or None."""
    meta = b.meta
    reason = validate.update_meta(meta)
    if reason:
        return reason
    if meta["round"] != chk.round:
        return f"update is for round {meta['round']}, not round {chk.round}"
    if meta["client"] != client:
        return f"update names client {meta['client']!r} but was written to {client}'s key"
    if meta.get("fingerprint") != chk.fingerprint:
        return "tensor names, shapes or dtypes differ from the global model"
    n = meta["num_examples"]
    if client in chk.known:
        if n > chk.known[client]:
            return (f"num_examples {n} exceeds the {chk.known[client]} examples setup gave this client; "
                    "an update cannot claim more data than its owner holds")
    elif n > chk.max_examples:
        return f"num_examples {n} is over strategy.max_examples ({chk.max_examples}) for a client with its own data"
    return None


def _finite_tensors(b: blob.Blob) -> str | None:
    for name, t in b.tensors.items():
        # A float64 sum is finite iff every value is (float32 inputs cannot overflow it) and allocates nothing.
        if not np.isfinite(t.sum(dtype=np.float64)):
            return f"tensor {name} holds NaN or Inf"
    return None


@dataclass
class _Pass:
    fold: strategies.Fold
    accepted: list[tuple[str, int]] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    meta: dict[str, dict] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    dirty: bool = False  # the fold holds an update that was rejected after it was added


def update_reader(store: Store, chk: Check) -> strategies.Reader:
    """Re-opens an accepted update's tensors by client id, for folds that read updates block by block."""
    def read(client: str):
        b = blob.decode(store.get_view(keys.update(chk.round, client), max_bytes=chk.max_bytes))
        reason = check_update(b, client, chk)
        if reason:  # rewritten since it was accepted: never fold what was not validated
            raise ValueError(f"update of {client} changed after it was accepted: {reason}")
        return b.tensors
    return read


def _run_pass(store: Store, strategy: strategies.Strategy, chk: Check, order: list[str], global_w, state,
              norms: bool, strict: bool, dtype: type) -> _Pass:
    """One streaming pass: read, validate and fold each update in a fixed order."""
    p = _Pass(fold=strategy.begin(global_w, state, dtype, reader=update_reader(store, chk)))
    for key, data in _prefetch(store, [keys.update(chk.round, c) for c in order], chk.max_bytes):
        cid = keys.parse_update(key)[1]
        if isinstance(data, Exception):
            p.rejected.append({"client": cid, "reason": f"update could not be read: {str(data)[:300]}"})
            continue
        try:
            b = blob.decode(data)
        except blob.BlobError as exc:
            p.rejected.append({"client": cid, "reason": f"corrupt update: {str(exc)[:300]}"})
            continue
        reason = check_update(b, cid, chk) or strategy.check(cid, b.meta)
        fused = norms and isinstance(p.fold, strategies.SumFold)
        if reason is None and norms and not fused:
            p.norms[cid] = global_norm(b.tensors, global_w)
        elif reason is None and strict:
            reason = _finite_tensors(b)
        if reason:
            p.rejected.append({"client": cid, "reason": reason})
            continue
        m = b.meta
        try:
            if fused:
                # One read of the update for both: its distance from the global model, and its share of the sum.
                p.norms[cid] = p.fold.sum.add(b.tensors, m["num_examples"], reference=global_w) ** 0.5
            else:
                p.fold.add(cid, b.tensors, m["num_examples"])
        except ValueError as exc:  # shapes agree by fingerprint; kept as a guard for folds with own rules
            p.rejected.append({"client": cid, "reason": str(exc)[:300]})
            p.norms.pop(cid, None)
            p.dirty = True
            continue
        if not np.isfinite(p.norms.get(cid, 0.0)):
            # The distance reads every value: NaN, Inf or values too large to measure show up here for free.
            p.rejected.append({"client": cid, "reason": "update holds NaN or Inf (or values too large to measure)"})
            p.norms.pop(cid)
            p.dirty = fused  # it is in the sum already: the kept updates are folded again
            continue
        p.meta[cid] = {"num_examples": m["num_examples"], "metrics": m.get("metrics") or {},
                       "timings": m.get("timings") or {}, "platform": m.get("platform")}
        p.accepted.append((cid, m["num_examples"]))
        del b, data
    return p


def fold_updates(store: Store, cfg: FederationConfig, strategy: strategies.Strategy, chk: Check, order: list[str],
                 global_w, state) -> tuple[_Pass, list[dict]]:
    """Validate and fold the updates; returns the final pass and the extra rejections (norm bound, overflow).

    Optimistic: the first pass folds while it measures. Only when the norm bound rejects someone, or the
    sum overflows, is the kept set folded again, so the model is always the fold of the included updates
    in sorted order.
    """
    norm_on = privacy.norm_bound_applies(cfg)
    p = _run_pass(store, strategy, chk, order, global_w, state, norm_on, strict=False, dtype=np.float32)
    first_rejected = p.rejected  # a later pass reads only the kept updates: these reasons must survive it
    extra: list[dict] = []
    keep = [c for c, _ in p.accepted]
    if norm_on and len(p.norms) >= 3:
        median = float(np.median(list(p.norms.values())))
        limit = cfg.strategy.norm_multiple * median
        extra = [{"client": c, "reason": f"update norm {p.norms[c]:.4g} exceeds {cfg.strategy.norm_multiple:g}x "
                                         f"the round median {median:.4g} (strategy.norm_multiple)"}
                 for c in keep if p.norms[c] > limit]
    if extra or p.dirty:
        bad = {x["client"] for x in extra}
        keep = [c for c in keep if c not in bad]
        p = _run_pass(store, strategy, chk, keep, global_w, state, False, strict=True, dtype=np.float32)
    if keep and not p.fold.finite():
        # A NaN got in past the fast path, or finite values overflowed float32: check every value and
        # sum in float64, which cannot overflow on float32 inputs.
        p = _run_pass(store, strategy, chk, keep, global_w, state, False, strict=True, dtype=np.float64)
    if p.rejected is not first_rejected:
        p.rejected = first_rejected + p.rejected
    return p, extra


@dataclass
class _Inputs:
    """What folding a round (or a group of it) needs: the strategy, the checks, the global model, the state."""

    strategy: strategies.Strategy
    chk: Check
    global_blob: blob.Blob
    state: Any


def _inputs(store: Store, cfg: FederationConfig, manifest: rounds.Manifest) -> _Inputs:
    r = manifest.round
    # Mapped, not read: the norm bound and server optimizers read it; FedAvg without the bound needs only its header.
    if manifest.model.endswith(".index.json"):
        from fedkeeper.functions import shards

        global_blob = shards.load_model(store, manifest.model)
    else:
        global_blob = blob.decode(store.get_view(manifest.model), trusted=True)
    chk = Check(round=r, fingerprint=global_blob.meta.get("fingerprint"), known=known_examples(store),
                max_examples=cfg.strategy.max_examples, max_bytes=int(cfg.strategy.max_update_mb * 1024 * 1024))
    state = None
    if store.exists(keys.server_state(r)):
        state = blob.decode(store.get(keys.server_state(r))).tensors
    return _Inputs(strategies.from_config(cfg), chk, global_blob, state)


def aggregate(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, s: Settlement) -> dict:
    """Validate and fold the delivered updates; returns the round's result record (not yet written)."""
    t0 = time.perf_counter()
    inp = _inputs(ctx.store, cfg, manifest)
    order = sorted(s.delivered)  # a fixed order makes the float sum, and so the model bytes, deterministic
    p, extra = fold_updates(ctx.store, cfg, inp.strategy, inp.chk, order, inp.global_blob.tensors, inp.state)
    failures = [{"client": c, "reason": str(s.failed[c].get("reason", "invocation failed"))[:2000]}
                for c in manifest.ids if c not in s.delivered and c in s.failed]
    stragglers = [c for c in manifest.ids if c not in s.delivered and c not in s.failed]
    return conclude(ctx, cfg, manifest, inp, p.fold, p.accepted, p.rejected + extra, p.meta, failures, stragglers, t0)


@dataclass
class NewModel:
    """A finished fold's outcome: the round's status, the model and server state to write, and why not used."""

    status: str
    model_bytes: bytes | None
    state_bytes: bytes | None
    notes: list[dict] = field(default_factory=list)  # rejections of the whole aggregate ("*")


def new_model(store: Store, cfg: FederationConfig, manifest: rounds.Manifest, inp: _Inputs, fold: strategies.Fold,
              included: int) -> NewModel:
    """The new global model from a finished fold of `included` updates (the old one below quorum)."""
    r = manifest.round
    notes: list[dict] = []
    new_state = None
    status = rounds.DONE if included >= manifest.quorum else rounds.FAILED
    if status == rounds.DONE and not fold.finite():
        status = rounds.FAILED
        notes.append({"client": "*", "reason": "the aggregate is not finite even in float64; no update was used"})
    if status == rounds.DONE:
        privacy.seed_noise(store, r, inp.strategy)  # privacy hook: the same noise whoever finishes the round
        new_weights, new_state = inp.strategy.finish(fold, inp.global_blob.tensors, inp.state)
        if not all(np.isfinite(w.sum(dtype=np.float64)) for w in new_weights.values()):
            status, new_state = rounds.FAILED, None
            notes.append({"client": "*", "reason": "the averaged model overflowed float32; the model stays"})
    if status != rounds.DONE:
        new_weights = inp.global_blob.tensors  # below quorum the global model stays as it was
    model_bytes = blob.encode(new_weights, {"kind": "model", "round": r + 1, "parent": manifest.model,
                                            "clients": included, "strategy": cfg.strategy.name})
    state_bytes = blob.encode(new_state, {"kind": "server_state", "round": r + 1}) if new_state else None
    return NewModel(status, model_bytes, state_bytes, notes)


def conclude(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, inp: _Inputs, fold: strategies.Fold,
             accepted: list[tuple[str, int]], rejected: list[dict], meta: dict[str, dict], failures: list[dict],
             stragglers: list[str], t0: float, model: NewModel | None = None) -> dict:
    """The round's result record from a finished fold: quorum, the new model (or the old one), metrics.

    `model`: the fold's outcome when the caller computed (and perhaps wrote) it already."""
    r = manifest.round
    strategy = inp.strategy
    included = [c for c, _ in accepted]
    model = model or new_model(ctx.store, cfg, manifest, inp, fold, len(included))
    status = model.status
    rejected = list(rejected) + model.notes
    dp_record = privacy.round_record(ctx.store, cfg, r, strategy, released=status == rounds.DONE)  # privacy hook
    out = result_record(ctx, cfg, manifest, strategy, status, included, int(sum(n for _, n in accepted)), rejected,
                        meta, failures, stragglers, keys.model(r + 1), t0)
    out.update({"_model_bytes": model.model_bytes, "_state_bytes": model.state_bytes})
    out["timings"]["groups"] = len(manifest.groups) if manifest.fan_in else 0
    if dp_record is not None:
        out["privacy"] = dp_record
    return out


def result_record(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, strategy: strategies.Strategy,
                  status: str, included: list[str], num_examples: int, rejected: list[dict], meta: dict[str, dict],
                  failures: list[dict], stragglers: list[str], model: str, t0: float) -> dict:
    """result.json's content, whichever way the round was folded (one place, a tree, or shards)."""
    fed = strategy.metrics(meta, included)
    return {
        "round": manifest.round, "status": status, "strategy": cfg.strategy.name, "selected": manifest.ids,
        "included": included,
        "rejected": sorted(rejected + _unselected(ctx.store, manifest.round, manifest), key=lambda x: x["client"]),
        "stragglers": stragglers, "failed": failures, "quorum": manifest.quorum, "num_examples": num_examples,
        "federated_accuracy": fed.get("accuracy"), "federated_loss": fed.get("loss"), "train_loss": fed.get("train_loss"),
        "clients": {c: meta.get(c, {}) for c in included}, "aggregated_by": ctx.invocation_id, "model": model,
        "timings": {"aggregation_s": time.perf_counter() - t0, "manifest_created": manifest.created,
                    "deadline": manifest.deadline},
    }


def trigger_timings(event: dict, client: str | None, received: float, started: float, holder: str) -> dict:
    """How an aggregation was set off: by a store event or a tick, when, and whose expired claim it took over."""
    return {"triggered_by": "event" if client else "tick", "event_delivered_at": _num(event.get("delivered_at"), received),
            "event_time": _num(event.get("event_time"), None), "aggregation_started_at": started,
            "claim_takeover_from": holder or None}


# -- tree mode -----------------------------------------------------------------------------------------
def tree_fan_in(cfg: FederationConfig, strategy: strategies.Strategy, selected: int) -> int:
    """The group size a round of `selected` clients is folded in (0: one aggregator folds them all)."""
    a = getattr(cfg, "aggregation", None)
    if a is None or not strategy.composes or a.mode == "single" or selected <= a.fan_in:
        return 0
    if a.mode == "tree" or selected > a.tree_above:
        return a.fan_in
    return 0


def _group_settled(store: Store, manifest: rounds.Manifest, members: list[str]) -> tuple[list[str], dict, list[str]]:
    """(delivered, final failures, unsettled) among one group's members, from K lookups (no round-wide listing)."""
    r = manifest.round
    delivered, failed, open_ = [], {}, []
    for c in members:
        if store.exists(keys.update(r, c)):
            delivered.append(c)
            continue
        rec = read_json(store, keys.failure(r, c))
        if isinstance(rec, dict) and rec.get("final", True):
            failed[c] = rec
        else:
            open_.append(c)
    return delivered, failed, open_


def _some_unsettled(store: Store, r: int, members: list[str], start: int) -> bool:
    """True if any member is unsettled; looks from `start` on (wrapping), where the next unsettled one most
    likely is, so an event that finds its group still waiting usually costs one or two lookups, not K."""
    for i in range(len(members)):
        c = members[(start + i) % len(members)]
        if store.exists(keys.update(r, c)):
            continue
        rec = read_json(store, keys.failure(r, c))
        if not (isinstance(rec, dict) and rec.get("final", True)):
            return True
    return False


def fold_group(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, g: int, overdue: bool,
               inp: _Inputs | None = None, after: str | None = None) -> str:
    """Fold level-1 group g (clients' updates) into its create-only partial sum once every member settled
    (`after`: the member whose event this is, settled already, so the search for an unsettled one starts next)."""
    store, r = ctx.store, manifest.round
    key = keys.partial(r, g)
    if store.exists(key):
        return "exists"
    members = manifest.groups[g]
    if not overdue and after is not None and _some_unsettled(store, r, members, members.index(after) + 1):
        return "waiting"
    delivered, failed, open_ = _group_settled(store, manifest, members)
    if open_ and not overdue:
        return "waiting"
    ok, _ = claim(ctx, r, cfg.strategy.lease_s, key=keys.partial_claim(r, g))
    if not ok:
        return "claimed"
    inp = inp or _inputs(store, cfg, manifest)
    p, extra = fold_updates(store, cfg, inp.strategy, inp.chk, sorted(delivered), inp.global_blob.tensors, inp.state)
    sums = p.fold.sum if isinstance(p.fold, strategies.SumFold) else None
    meta = {"kind": "partial", "round": r, "level": 1, "group": g, "total": sums.total if sums else 0.0,
            "count": sums.count if sums else 0, "included": len(p.accepted),
            "num_examples": int(sum(n for _, n in p.accepted)), "accepted": p.accepted, "rejected": p.rejected + extra,
            "clients": p.meta, "stragglers": open_,
            "failed": [{"client": c, "reason": str(failed[c].get("reason", "invocation failed"))[:2000]} for c in failed]}
    store.put_if_absent(key, blob.encode(sums.sums if sums and sums.sums else {}, meta))
    return "folded"


@dataclass
class _Merged:
    fold: strategies.SumFold
    included: int = 0       # accepted updates in the merged sums
    num_examples: int = 0   # their examples


@dataclass
class _Records:
    """The per-client bookkeeping of a round's level-1 groups, gathered for its result record."""

    accepted: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    clients: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)
    stragglers: list = field(default_factory=list)


def _counts(m: dict) -> tuple[int, int]:
    """(included, num_examples) of a partial; a level-1 partial of an older version has only its lists."""
    if isinstance(m.get("included"), int) and isinstance(m.get("num_examples"), int):
        return m["included"], m["num_examples"]
    acc = m.get("accepted") or []
    return len(acc), int(sum(int(x[1]) for x in acc))


def _merge_partials(store: Store, r: int, level: int, groups: range) -> _Merged:
    """Merge the partial sums of these groups of one level, in group order (the order fixes the float sum).

    Only sums and counts: the clients' records stay in the level-1 partials (see _group_records), so what a
    fold above level 1 reads and writes does not grow with the number of clients below it.
    """
    parts = [blob.decode(store.get_view(keys.partial(r, g, level)), trusted=True) for g in groups]
    wide = any(t.dtype == np.float64 for b in parts for t in b.tensors.values())
    out = _Merged(strategies.SumFold(np.float64 if wide else np.float32))
    for b in parts:
        m = b.meta
        if b.tensors:
            part = strategies.SumFold(out.fold.sum.dtype).sum
            part.sums, part.total, part.count = dict(b.tensors), float(m.get("total", 0.0)), int(m.get("count", 0))
            out.fold.sum.merge(part)
        included, examples = _counts(m)
        out.included += included
        out.num_examples += examples
    return out


def _group_records(store: Store, r: int, groups: int) -> _Records:
    """Every level-1 group's client records, in group order, from the partials' headers alone."""
    out = _Records()
    for g in range(groups):
        key = keys.partial(r, g)
        m = blob.read_header(lambda a, b, k=key: store.get_range(k, a, b), store.size(key), trusted=True).meta
        out.accepted += [tuple(x) for x in m.get("accepted") or []]
        out.rejected += list(m.get("rejected") or [])
        out.clients.update(m.get("clients") or {})
        out.failed += list(m.get("failed") or [])
        out.stragglers += list(m.get("stragglers") or [])
    return out


def _children(manifest: rounds.Manifest, level: int, g: int) -> range:
    """The level-(l-1) groups that level-l group g folds."""
    below = manifest.levels()[level - 2]
    return range(g * manifest.fan_in, min(below, (g + 1) * manifest.fan_in))


def fold_upper(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, level: int, g: int) -> str:
    """Fold group g of level l ≥ 2 (partials of the level below) once all of them exist."""
    store, r = ctx.store, manifest.round
    key = keys.partial(r, g, level)
    if store.exists(key):
        return "exists"
    kids = _children(manifest, level, g)
    if not all(store.exists(keys.partial(r, c, level - 1)) for c in kids):
        return "waiting"
    ok, _ = claim(ctx, r, cfg.strategy.lease_s, key=keys.partial_claim(r, g, level))
    if not ok:
        return "claimed"
    m = _merge_partials(store, r, level - 1, kids)
    s = m.fold.sum
    meta = {"kind": "partial", "round": r, "level": level, "group": g, "total": s.total, "count": s.count,
            "included": m.included, "num_examples": m.num_examples}
    store.put_if_absent(key, blob.encode(s.sums or {}, meta))
    return "folded"


def tree_step(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, client: str | None, event: dict,
              received: float) -> dict:
    """Tree mode: fold the event's group as soon as it settles, then each complete group above it; the fold
    that completes the top level starts the root. A poke (tick, failure, deadline) folds whatever is missing."""
    store, r = ctx.store, manifest.round
    overdue = received >= manifest.deadline
    levels = manifest.levels()
    inp = None
    if client is not None and manifest.entry(client) is not None:
        g = manifest.group_of(client)
        # The fold's inputs (global model, setup's example counts, server state) are read by fold_group only
        # once the group has settled: most events find it still waiting.
        if fold_group(ctx, cfg, manifest, g, overdue, after=client) == "waiting":
            return {"status": "waiting", "round": r, "group": g}
        for level in range(2, len(levels)):  # the groups above g, one per level
            g //= manifest.fan_in
            if fold_upper(ctx, cfg, manifest, level, g) == "waiting":
                return {"status": "waiting", "round": r, "level": level, "group": g}
    else:
        have = set(store.list(keys.partials_prefix(r)))
        for g in range(levels[0]):
            if keys.partial(r, g) not in have:
                inp = inp or _inputs(store, cfg, manifest)
                fold_group(ctx, cfg, manifest, g, overdue, inp)
        for level in range(2, len(levels)):
            for g in range(levels[level - 1]):
                fold_upper(ctx, cfg, manifest, level, g)
    top = len(levels)  # the root folds the partials of the level below it
    below = levels[-2] if top > 1 else 0
    if not all(store.exists(keys.partial(r, g, top - 1)) for g in range(below)):
        return {"status": "waiting", "round": r}
    ok, holder = claim(ctx, r, cfg.strategy.lease_s)
    if not ok:
        return {"status": "claimed", "round": r, "by": holder}
    faults.maybe_crash("aggregator_after_claim", first=not holder)
    started = ctx.now()
    t0 = time.perf_counter()
    write_state(store, r, rounds.AGGREGATING)
    m = _merge_partials(store, r, top - 1, range(below))
    inp = inp or _inputs(store, cfg, manifest)
    model = new_model(ctx.store, cfg, manifest, inp, m.fold, m.included)
    # The new model is written first, from sums and counts only: gathering the clients' records for the
    # result grows with the round's size, the model does not. The result (the truth readers trust) still
    # comes after both, as in finish.
    write_model(store, r, model.model_bytes, model.state_bytes)
    model_written = ctx.now()
    recs = _group_records(store, r, levels[0])
    out = conclude(ctx, cfg, manifest, inp, m.fold, recs.accepted, recs.rejected, recs.clients, recs.failed,
                   recs.stragglers, t0, model=NewModel(model.status, None, None, model.notes))
    out["timings"].update(trigger_timings(event, client, received, started, holder), tree_levels=levels,
                          model_written_at=model_written)
    return finish(ctx, cfg, manifest, out)


def _unselected(store: Store, r: int, manifest: rounds.Manifest) -> list[dict]:
    """Updates written under round r by clients the manifest did not select: never used, always explained."""
    selected = set(manifest.ids)
    out = []
    for k in store.list(keys.updates_prefix(r)):
        p = keys.parse_update(k)
        if p and p[1] not in selected:
            out.append({"client": p[1], "reason": f"client {p[1]} was not selected for round {r}"})
    return out


def write_model(store: Store, r: int, model_bytes: bytes | None, state_bytes: bytes | None) -> None:
    """Write round r's server state, then its new model (None: written already, or none to write)."""
    if state_bytes is not None:
        store.put(keys.server_state(r + 1), state_bytes)
    if model_bytes is not None:
        store.put(keys.model(r + 1), model_bytes)


def finish(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, out: dict) -> dict:
    """Write state blob, model, marker, result and state in that order (readers trust result.json), then go on."""
    store, r = ctx.store, manifest.round
    model_bytes, state_bytes = out.pop("_model_bytes"), out.pop("_state_bytes")
    index = out.pop("_index", None)
    t0 = time.perf_counter()
    write_model(store, r, model_bytes, state_bytes)
    if index is not None:  # a sharded model's shards are written; the index makes them the model
        store.put(keys.model_index(r + 1), index)
    store.put_json(keys.aggregation_marker(r, ctx.invocation_id), {"invocation": ctx.invocation_id, "at": ctx.now()})
    out["timings"]["write_s"] = time.perf_counter() - t0
    out["timings"]["finished_at"] = ctx.now()
    store.put_json(keys.result(r), out)
    try:  # after result.json (the truth); the next round's start folds it in if this write is lost
        from fedkeeper.functions import population as pop

        pop.record_round(store, cfg, manifest, out)
    except Exception:  # noqa: BLE001 - history guides selection; it must never fail a finished round
        log.exception("round %d: client history not updated", r)
    stop = (out.get("privacy") or {}).get("stop_reason", "")  # privacy hook: the budget allows no further round
    last = r + 1 >= cfg.rounds or bool(stop)
    write_state(store, r, rounds.FINISHED if last else out["status"], next_round=r + 1, rounds_done=r + 1,
                model=out["model"], **({"reason": stop} if stop else {}))
    request_evaluation(ctx, cfg, r, attempt=1)
    if not last and not cfg.schedule:  # with a schedule, the cron tick starts the next round
        ctx.invoker.invoke(TRIGGER, {"store": store.url, "round": r + 1}, None)
    return {"status": out["status"], "round": r, "included": out["included"],
            "rejected": [x["client"] for x in out["rejected"]], "stragglers": out["stragglers"]}


# -- evaluation ------------------------------------------------------------------------------------------
def request_evaluation(ctx: Context, cfg: FederationConfig, r: int, attempt: int) -> None:
    """Record and invoke the central evaluation of the model round r produced."""
    store = ctx.store
    model = model_key(store, r + 1)
    store.put_json(keys.evaluation_request(r), {"round": r, "attempt": attempt, "at": ctx.now(), "model": model})
    evaluation = {"store": store.url, "mode": "evaluate", "round": r, "model": model,
                  "data": keys.TEST_DATA, "output": keys.evaluation(r), "invoked_at": time.time(), "attempt": attempt}
    if cfg.client_access == "presigned":
        ttl = max(60, int(cfg.deadline_bound))
        evaluation["access"] = {"model": store.presign(model, "GET", ttl),
                                "data": store.presign(keys.TEST_DATA, "GET", ttl),
                                "output": store.presign(keys.evaluation(r), "PUT", ttl)}
        evaluation["spec"] = presigned_spec(store, cfg)
    ctx.invoker.invoke(CLIENT, evaluation, cfg.eval_platform)


def evaluation_failed(ctx: Context, r: int, reason: str) -> dict:
    """An evaluation invocation failed: request it again, or after the last attempt record why it is missing."""
    cfg = ctx.config()
    store = ctx.store
    if store.exists(keys.evaluation(r)) or not store.exists(keys.result(r)):
        return {"status": "ignored", "round": r}
    req = read_json(store, keys.evaluation_request(r))
    attempt = _attempt(req.get("attempt")) if isinstance(req, dict) else 1
    if attempt < EVALUATION_ATTEMPTS:
        request_evaluation(ctx, cfg, r, attempt + 1)
        return {"status": "evaluation-retried", "round": r, "attempt": attempt + 1}
    store.put_if_absent(keys.evaluation(r), rounds.dumps({
        "round": r, "model": keys.model(r + 1), "test_accuracy": None, "test_loss": None,
        "error": f"evaluation failed {attempt} times; last: {reason[:500]}", "finished_at": ctx.now()}))
    return {"status": "evaluation-failed", "round": r}


def repair_evaluations(ctx: Context, cfg: FederationConfig, force: bool = False) -> list[int]:
    """Request again the evaluations of finished rounds that were lost (all of them when force)."""
    store = ctx.store
    timeout = cfg.platform(cfg.eval_platform).timeout_s
    state = read_state(store)
    out = []
    for r in range(min(state.rounds_done, cfg.rounds)):
        if store.exists(keys.evaluation(r)) or not store.exists(keys.result(r)):
            continue
        req = read_json(store, keys.evaluation_request(r))
        at = req.get("at") if isinstance(req, dict) else None
        stale = not validate.finite_number(at) or ctx.now() - at > timeout + EVALUATION_GRACE_S
        if force or stale:
            attempt = _attempt(req.get("attempt")) if isinstance(req, dict) else 0
            request_evaluation(ctx, cfg, r, attempt + 1)
            out.append(r)
    return out


# -- the tick --------------------------------------------------------------------------------------------
def tick(ctx: Context, event: dict) -> dict:
    """A platform's cron (or the local timer): time out silent clients, close ready or overdue rounds,
    re-run lost evaluations, and start the next round (on a liveness tick only without a schedule)."""
    store = ctx.store
    try:
        cfg = ctx.config()
    except NotFound:
        raise HandlerError(MSG_NOT_SET_UP.format(url=store.url), 409) from None
    if cfg.mode == "async":
        from fedkeeper.functions import asynchronous

        return asynchronous.tick(ctx, cfg, event)
    now = ctx.now()
    m = open_round(store)
    if m is not None and start_unfinished(ctx, m):
        # The call that opened the round failed or died before invoking every client: finish its work now
        # rather than wait for the deadline to close the round without them.
        return resume_round(ctx, cfg, m.round)
    if m is not None:
        s = settle(store, m, running=True)
        timed_out = []
        for cid, rec in s.running.items():
            started = rec.get("started_at")
            try:
                limit = cfg.platform(m.entry(cid)["platform"]).timeout_s
            except KeyError:
                limit = cfg.deadline_bound
            if validate.finite_number(started) and now > started + limit + TIMEOUT_GRACE_S \
                    and _attempt(rec.get("attempt")) > s.attempts.get(cid, 0):
                client_failed(ctx, m.round, cid, f"no update within the platform's {limit:g} s timeout (timed out)",
                              _attempt(rec.get("attempt")))
                timed_out.append(cid)
        if timed_out:
            s = settle(store, m)
        if secagg.enabled(cfg):  # secure aggregation hook: unmask invocations time out like training ones
            timed_out += secagg.tick(ctx, cfg, m)
        if s.ready or now >= m.deadline or secagg.enabled(cfg):  # a masked round's phases have their own deadlines
            held = read_json(store, keys.claim(m.round))
            lease = held.get("lease_until") if isinstance(held, dict) else None
            if held is None or not validate.finite_number(lease) or now >= lease:
                ctx.invoker.invoke(AGGREGATOR, {"store": store.url, "round": m.round, "delivered_at": time.time()}, None)
                return {"status": "closing", "round": m.round, "timed_out": timed_out}
            return {"status": "aggregating", "round": m.round}
        return {"status": "busy", "round": m.round, "deadline_in_s": m.deadline - now, "timed_out": timed_out}
    repaired = repair_evaluations(ctx, cfg)
    if cfg.schedule and event.get("liveness"):
        return {"status": "idle", "evaluations": repaired}
    out = start_round(ctx)
    if repaired:
        out["evaluations"] = repaired
    return out
