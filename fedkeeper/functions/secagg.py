"""Secure aggregation's phases in the round protocol: keys at setup, advertise, masked training, unmask, the sum.

A round under secure aggregation runs three client invocations through the same protocol (deadline, failure
records, retries, the tick): `advertise` (mask key and sealed shares), `train` (the masked update) and `unmask`
(the survivors' shares). Between them the aggregator writes create-only records that fix each phase's outcome for
everyone: the roster (who advertised in time), then the unmask request (who delivered). It then sums the masked
uploads, rebuilds only the secrets the request allows, and removes their masks; it never reads an unmasked update.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fedkeeper import secagg
from fedkeeper.core import blob, keys, rounds, validate
from fedkeeper.core.config import FederationConfig
from fedkeeper.core.privacy import ring
from fedkeeper.functions.context import AGGREGATOR, CLIENT, Context, HandlerError
from fedkeeper.store import NotFound, Store

ADVERTISE, TRAIN, UNMASK = "advertise", "train", "unmask"
SECRETS_ENV = "FEDKEEPER_SECRETS_DIR"


def enabled(cfg: FederationConfig) -> bool:
    """True when the federation aggregates under masks."""
    privacy = getattr(cfg, "privacy", None)
    return bool(privacy is not None and privacy.secure_aggregation)


def _json(store: Store, key: str) -> Any:
    try:
        return validate.loads(store.get(key), max_bytes=1 << 20, what=key)
    except (NotFound, validate.InputError):
        return None


# -- identities ------------------------------------------------------------------------------------------
def secrets_dir() -> Path:
    """Where clients keep their private keys in the local runtime: $FEDKEEPER_SECRETS_DIR or ~/.fedkeeper/secrets."""
    return Path(os.environ.get(SECRETS_ENV) or Path.home() / ".fedkeeper" / "secrets")


def key_path(federation: str, client: str) -> Path:
    """A client's private key file, outside the federation's store."""
    return secrets_dir() / federation / f"{client}.key"


def federation_id(store: Store) -> str:
    """The federation's random id from the store (written once at setup)."""
    rec = _json(store, keys.SECAGG_FEDERATION)
    fid = rec.get("id") if isinstance(rec, dict) else None
    if not isinstance(fid, str) or not 8 <= len(fid) <= 64:
        raise HandlerError("secure aggregation is on but the store holds no federation id; run setup again", 409)
    return fid


def register(store: Store, cfg: FederationConfig, client_ids: list[str] | None = None) -> str:
    """Give each client a long-term key pair: private key to its own file, public key into the store (create-only)."""
    store.put_if_absent(keys.SECAGG_FEDERATION, rounds.dumps({"id": uuid.uuid4().hex}))
    fid = federation_id(store)
    for cid in client_ids or [c.id for c in cfg.clients]:
        path = key_path(fid, cid)
        if path.exists():
            private = path.read_bytes()
        else:
            private, _ = secagg.generate_identity()
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
            with os.fdopen(fd, "wb") as fh:
                fh.write(private)
        store.put_if_absent(keys.secagg_public(cid), rounds.dumps({"client": cid, "public": secagg.public_of(private).hex()}))
    return fid


def identity(fid: str, client: str) -> bytes:
    """A client's own private key from its secret file."""
    path = key_path(fid, client)
    try:
        data = path.read_bytes()
    except OSError:
        raise HandlerError(f"client {client} has no private key at {path}; set {SECRETS_ENV} to the folder setup "
                           "wrote the keys to", 409) from None
    if len(data) != 32:
        raise HandlerError(f"{path} does not hold a 32-byte X25519 private key", 409)
    return data


def identities(store: Store, ids: list[str]) -> dict[str, bytes]:
    """The registered public keys of these clients; a missing or malformed one is an error naming the client."""
    out = {}
    for cid in ids:
        rec = _json(store, keys.secagg_public(cid))
        try:
            if not isinstance(rec, dict) or rec.get("client") != cid:
                raise secagg.SecAggError("no registered public key")
            out[cid] = secagg.hex32(rec.get("public"), "public key")
        except secagg.SecAggError as exc:
            raise HandlerError(f"client {cid}: {exc}; register it with setup", 409) from None
    return out


def spec_for(store: Store, cfg: FederationConfig, manifest: rounds.Manifest) -> secagg.RoundSpec:
    """Round r's agreed shape (ids, graph, thresholds, ring) from the manifest and the config."""
    s = cfg.privacy.secagg
    return secagg.RoundSpec(federation=federation_id(store), round=manifest.round, selected=tuple(manifest.ids),
                            neighbors=s.neighbors, threshold=s.threshold, bits=s.ring_bits, clip_range=s.clip_range)


def distributed_dp(cfg: FederationConfig) -> bool:
    """Central DP under masks: each client clips its update and adds its share of the noise; each counts once."""
    return enabled(cfg) and cfg.privacy.dp.mode == "central"


def phase(store: Store, r: int) -> str:
    """The phase round r is in: advertise until the roster is written, train until the request is, then unmask."""
    if store.exists(keys.secagg_request(r)):
        return UNMASK
    if store.exists(keys.secagg_roster(r)):
        return TRAIN
    return ADVERTISE


def phase_s(cfg: FederationConfig) -> float:
    """How long the advertise and unmask phases wait for late clients."""
    return cfg.privacy.secagg.phase_s or cfg.deadline_bound / 4


def _roster(store: Store, r: int) -> dict:
    rec = _json(store, keys.secagg_roster(r))
    if not isinstance(rec, dict) or rec.get("round") != r or not isinstance(rec.get("roster"), list):
        raise HandlerError(f"round {r}'s roster is missing or malformed", 409)
    return rec


def _advertised(store: Store, spec: secagg.RoundSpec, ids: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """({client: valid advertise record}, {client: why its record was refused}) for these clients."""
    ok, bad = {}, {}
    for cid in ids:
        rec = _json(store, keys.secagg_advertise(spec.round, cid))
        if rec is None:
            continue
        try:
            secagg.check_advertise(spec, cid, rec)
            ok[cid] = rec
        except secagg.SecAggError as exc:
            bad[cid] = str(exc)
    return ok, bad


# -- the client's invocations ----------------------------------------------------------------------------
def _client_round(ctx: Context, event: dict) -> tuple[FederationConfig, rounds.Manifest, secagg.RoundSpec, str, bytes]:
    from fedkeeper.functions import protocol

    try:
        r, cid = int(event["round"]), str(event["client"])
    except (KeyError, TypeError, ValueError):
        raise HandlerError("secure aggregation event needs integer 'round' and string 'client'") from None
    cfg = ctx.config()
    if not enabled(cfg):
        raise HandlerError("this federation does not use secure aggregation", 409)
    m = protocol.read_manifest(ctx.store, r)
    if m is None:
        raise HandlerError(f"round {r} has no manifest", 404)
    if m.entry(cid) is None:
        raise HandlerError(f"client {cid} was not selected for round {r}", 403)
    spec = spec_for(ctx.store, cfg, m)
    return cfg, m, spec, cid, identity(spec.federation, cid)


def advertise(event: dict, ctx: Context) -> dict:
    """Client, phase 1: write this round's mask public key and a sealed share box for each holder, then poke."""
    cfg, m, spec, cid, ident = _client_round(ctx, event)
    if ctx.store.exists(keys.secagg_roster(m.round)):
        return {"status": "closed", "phase": ADVERTISE, "round": m.round, "client": cid}
    me = secagg.ClientRound(spec, cid, ident)
    record = me.advertise(identities(ctx.store, spec.holders(cid)))
    ctx.store.put(keys.secagg_advertise(m.round, cid), rounds.dumps(record))
    ctx.invoker.invoke(AGGREGATOR, {"store": ctx.store.url, "round": m.round, "phase": ADVERTISE}, None)
    return {"status": "advertised", "round": m.round, "client": cid}


def masker(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, cid: str,
           global_weights: Mapping[str, np.ndarray]) -> Callable[[dict, dict], bytes]:
    """Client, phase 2: a function turning trained weights and update metadata into the masked update blob."""
    store = ctx.store
    spec = spec_for(store, cfg, manifest)
    rec = _roster(store, manifest.round)
    roster = sorted(rec["roster"])
    if cid not in roster:
        raise HandlerError(f"client {cid} is not in round {manifest.round}'s roster (it did not advertise in time)", 403)
    scale = rec.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, int) or not 4 <= scale <= 60:
        raise HandlerError(f"round {manifest.round}'s roster holds no valid fixed-point scale", 409)
    peers = [j for j in spec.graph[cid] if j in roster]
    records, bad = _advertised(store, spec, peers)
    if bad or len(records) != len(peers):
        raise HandlerError(f"advertise records of roster clients are missing or invalid: {sorted(set(peers) - set(records))}", 409)
    publics = {j: bytes.fromhex(records[j]["mask_public"]) for j in peers}
    me = secagg.ClientRound(spec, cid, identity(spec.federation, cid))
    shared_noise = distributed_dp(cfg)

    def mask(weights: dict, meta: dict) -> bytes:
        delta = {k: np.asarray(w, dtype=np.float64) - np.asarray(global_weights[k], dtype=np.float64) for k, w in weights.items()}
        weight = int(meta["num_examples"])
        if shared_noise:
            # Distributed DP: clip to C and add N(0, (z·C)²/m); the m roster clients' shares sum to N(0, (z·C)²),
            # and nobody ever holds the un-noised sum. Each client counts once, as in central DP.
            from fedkeeper.core.privacy import dp as dpmod

            d = cfg.privacy.dp
            delta, _ = dpmod.clip(delta, d.clip_norm)
            dpmod.add_noise(delta, d.noise_multiplier * d.clip_norm / np.sqrt(len(roster)), dpmod.make_rng())
            weight = 1
        masked = me.mask(delta, weight, scale, roster, publics)
        return blob.encode(masked, dict(meta, secagg={"ring_bits": spec.bits, "scale": scale, "weight": weight,
                                                      "roster": secagg.digest(roster)}))

    return mask


def unmask(event: dict, ctx: Context) -> dict:
    """Client, phase 3: answer the unmask request with exactly the shares it allows, then poke the aggregator."""
    cfg, m, spec, cid, ident = _client_round(ctx, event)
    store = ctx.store
    request = _json(store, keys.secagg_request(m.round))
    if request is None:
        raise HandlerError(f"round {m.round} has no unmask request", 409)
    poke = {"store": store.url, "round": m.round, "phase": UNMASK}
    if store.exists(keys.result(m.round)):
        return {"status": "closed", "phase": UNMASK, "round": m.round, "client": cid}
    if store.exists(keys.secagg_answer(m.round, cid)):
        # Exactly once: a retry or a duplicate finds the answer in place; the first poke may have been lost.
        ctx.invoker.invoke(AGGREGATOR, poke, None)
        return {"status": "answered-already", "round": m.round, "client": cid}
    attempt = _attempt(event.get("attempt"))
    store.put_json(keys.secagg_unmask_running(m.round, cid), {"client": cid, "round": m.round, "attempt": attempt,
                                                               "started_at": ctx.now(), "platform": ctx.platform})
    roster = sorted(_roster(store, m.round)["roster"])
    senders = [s for s in spec.holders(cid) if s in roster]
    records, bad = _advertised(store, spec, senders)
    if bad or len(records) != len(senders):
        raise HandlerError(f"advertise records missing or invalid for {sorted(set(senders) - set(records))}", 409)
    delivered = {p[1] for k in store.list(keys.updates_prefix(m.round)) if (p := keys.parse_update(k))}
    me = secagg.ClientRound(spec, cid, ident)
    try:
        answer = me.reveal(request, roster, records, identities(store, senders), delivered)
    except secagg.SecAggError as exc:
        raise HandlerError(f"unmask refused: {exc}", 409) from None
    # Create-only: the shares a request allows are fixed, so a concurrent duplicate would write the same bytes.
    store.put_if_absent(keys.secagg_answer(m.round, cid), rounds.dumps(answer))
    ctx.invoker.invoke(AGGREGATOR, poke, None)
    return {"status": "answered", "round": m.round, "client": cid,
            "revealed": {"self": sorted(answer["self_shares"]), "key": sorted(answer["key_shares"])}}


def report_failure(ctx: Context, event: dict, reason: str) -> dict:
    """An advertise or unmask invocation raised: record it through the protocol (retry, or settle the client)."""
    from fedkeeper.functions import protocol

    r, cid = event.get("round"), event.get("client")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0 or not isinstance(cid, str) \
            or not validate.CLIENT_ID.match(cid):
        return {"status": "ignored", "reason": "failure without a round or client"}
    attempt, platform = _attempt(event.get("attempt")), str(event.get("platform", ""))[:64]
    if event.get("mode") == UNMASK:
        return unmask_failed(ctx, r, cid, reason, attempt, platform)
    return protocol.client_failed(ctx, r, cid, reason, attempt, platform)


def _attempt(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1


def _request_survivors(request: Any) -> list[str] | None:
    survivors = request.get("survivors") if isinstance(request, dict) else None
    return [c for c in survivors if isinstance(c, str)] if isinstance(survivors, list) else None


def unmask_deadline(store: Store, cfg: FederationConfig, m: rounds.Manifest, request: Any) -> float:
    """Until when the unmask phase waits for answers: phase_s after the request, or after the latest resume."""
    at = request.get("at") if isinstance(request, dict) else None
    start = float(at) if validate.finite_number(at) else m.created
    resumed = _json(store, keys.secagg_unmask_resumed(m.round))
    again = resumed.get("at") if isinstance(resumed, dict) else None
    if validate.finite_number(again) and again > start:
        start = float(again)
    return start + phase_s(cfg)


def unmask_status(store: Store, r: int) -> tuple[set[str], dict[str, dict], dict[str, int]]:
    """(who answered, {survivor: final failure record}, {survivor: last attempt seen}) of round r's unmask phase."""
    answered = {keys.record_client(k) for k in store.list(keys.secagg_answer_prefix(r))}
    failed: dict[str, dict] = {}
    attempts: dict[str, int] = {}
    for prefix, is_failure in ((keys.secagg_unmask_failure_prefix(r), True), (keys.secagg_unmask_running_prefix(r), False)):
        for k in store.list(prefix):
            cid = keys.record_client(k)
            if cid in answered:
                continue
            rec = _json(store, k)
            if not isinstance(rec, dict):
                continue
            attempts[cid] = max(attempts.get(cid, 0), _attempt(rec.get("attempt")))
            if is_failure and rec.get("final", True):
                failed[cid] = rec
    return answered, failed, attempts


def unmask_failed(ctx: Context, r: int, client: str, reason: str, attempt: int = 1, platform: str = "") -> dict:
    """A survivor's unmask invocation failed or timed out: retry it while retries and the phase allow, else settle it."""
    from fedkeeper.functions import protocol

    store = ctx.store
    cfg = ctx.config()
    m = protocol.read_manifest(store, r)
    if m is None or m.entry(client) is None:
        return {"status": "ignored", "reason": f"client {client} is not selected in round {r}"}
    if store.exists(keys.result(r)):
        return {"status": "closed", "round": r}
    request = _json(store, keys.secagg_request(r))
    survivors = _request_survivors(request)
    if survivors is None or client not in survivors:
        return {"status": "ignored", "reason": f"client {client} was not asked to unmask in round {r}"}
    if store.exists(keys.secagg_answer(r, client)):
        return {"status": "answered", "round": r, "client": client}
    key = keys.secagg_unmask_failure(r, client)
    try:
        raw, version = store.get_versioned(key)
    except NotFound:
        prev, version = None, None
    else:
        try:
            prev = validate.loads(raw, max_bytes=1 << 20, what=key)
        except validate.InputError:
            prev = {}  # unreadable: replaced below by compare-and-swap, like any older attempt
    if isinstance(prev, dict) and _attempt(prev.get("attempt")) >= attempt:
        return {"status": "duplicate", "round": r, "client": client, "attempt": attempt}
    retry = attempt <= cfg.strategy.retries and ctx.now() < unmask_deadline(store, cfg, m, request)
    rec = {"client": client, "round": r, "phase": UNMASK, "reason": str(reason)[:2000], "attempt": attempt,
           "final": not retry, "platform": platform or m.entry(client)["platform"], "at": ctx.now()}
    wrote = store.put_if_absent(key, rounds.dumps(rec)) if version is None else store.put_if_match(
        key, rounds.dumps(rec), version)
    if not wrote:
        return {"status": "raced", "round": r, "client": client}
    if retry:
        _invoke_phase(ctx, cfg, m, [client], UNMASK, {client: attempt + 1})
        return {"status": "retrying", "phase": UNMASK, "round": r, "client": client, "attempt": attempt + 1}
    # Settled without an answer: the phase may now be complete; the aggregator decides (and fails if too few).
    ctx.invoker.invoke(AGGREGATOR, {"store": store.url, "round": r, "phase": UNMASK}, None)
    return {"status": "failed", "phase": UNMASK, "round": r, "client": client, "attempt": attempt}


def tick(ctx: Context, cfg: FederationConfig, m: rounds.Manifest) -> list[str]:
    """The cron's part in the unmask phase: time out survivors whose invocation outlived its platform's timeout."""
    from fedkeeper.functions import protocol

    store, r, now = ctx.store, m.round, ctx.now()
    if phase(store, r) != UNMASK or store.exists(keys.result(r)):
        return []
    answered, failed, _ = unmask_status(store, r)
    out = []
    for k in store.list(keys.secagg_unmask_running_prefix(r)):
        cid = keys.record_client(k)
        if cid in answered or cid in failed or m.entry(cid) is None:
            continue
        rec = _json(store, k)
        if not isinstance(rec, dict):
            continue
        started, attempt = rec.get("started_at"), _attempt(rec.get("attempt"))
        try:
            limit = cfg.platform(m.entry(cid)["platform"]).timeout_s
        except KeyError:
            limit = cfg.deadline_bound
        prev = _json(store, keys.secagg_unmask_failure(r, cid))
        seen = _attempt(prev.get("attempt")) if isinstance(prev, dict) else 0
        if validate.finite_number(started) and now > started + limit + protocol.TIMEOUT_GRACE_S and attempt > seen:
            unmask_failed(ctx, r, cid, f"no unmask answer within the platform's {limit:g} s timeout (timed out)", attempt)
            out.append(cid)
    return out


def resume(ctx: Context, cfg: FederationConfig, m: rounds.Manifest) -> list[str]:
    """Invoke again every client the round's current phase still waits for; returns their ids.

    Advertise: selected clients with no record and no final failure; train: roster clients that neither delivered
    nor finally failed; unmask: survivors with neither an answer nor a final failure, whose wait restarts now.
    """
    from fedkeeper.functions import protocol

    store, r = ctx.store, m.round
    current = phase(store, r)
    s = protocol.settle(store, m)
    attempts = dict(s.attempts)
    if current == ADVERTISE:
        present = {keys.record_client(k) for k in store.list(keys.secagg_advertise_prefix(r))}
        missing = [c for c in m.ids if c not in present and c not in s.failed]
    elif current == TRAIN:
        missing = [c for c in sorted(_roster(store, r)["roster"]) if c not in s.delivered and c not in s.failed]
    else:
        survivors = _request_survivors(_json(store, keys.secagg_request(r))) or []
        answered, failed, attempts = unmask_status(store, r)
        missing = [c for c in survivors if c not in answered and c not in failed and m.entry(c) is not None]
        if missing:
            store.put_json(keys.secagg_unmask_resumed(r), {"round": r, "at": ctx.now(), "clients": missing})
    _invoke_phase(ctx, cfg, m, missing, current, {c: attempts.get(c, 0) + 1 for c in missing})
    return missing


# -- the protocol's side ----------------------------------------------------------------------------------
def _invoke_phase(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, ids: list[str], mode: str,
                  attempts: Mapping[str, int] | None = None) -> None:
    from fedkeeper.functions import protocol

    invoked_at = time.time()
    for cid in ids:
        entry = m.entry(cid)
        payload = protocol.client_payload(ctx, cfg, m, entry, invoked_at, (attempts or {}).get(cid, 1))
        payload["mode"] = mode
        ctx.invoker.invoke(CLIENT, payload, entry["platform"])


def total_examples_bound(store: Store, cfg: FederationConfig, ids: list[str]) -> int:
    """An upper bound on the round's Σ nᵢ: setup's partition sizes, or strategy.max_examples for own data."""
    from fedkeeper.functions import protocol

    known = protocol.known_examples(store)
    return sum(known.get(c, cfg.strategy.max_examples) for c in ids)


def progress(ctx: Context, cfg: FederationConfig, m: rounds.Manifest) -> dict | None:
    """Move round r through its phases; None once every survivor answered (or the unmask phase timed out)."""
    from fedkeeper.functions import protocol

    store, r, now = ctx.store, m.round, ctx.now()
    spec = spec_for(store, cfg, m)
    if not store.exists(keys.secagg_roster(r)):
        # A listing decides whether to wait; the records are read and checked once, when the roster is written.
        present = {keys.record_client(k) for k in store.list(keys.secagg_advertise_prefix(r))}
        st = protocol.settle(store, m)
        failed = st.failed
        if any(c not in present and c not in failed for c in m.ids) and now < m.created + phase_s(cfg):
            return {"status": "waiting", "phase": ADVERTISE, "round": r, "have": len(present), "need": len(m.ids)}
        ok, bad = _advertised(store, spec, [c for c in m.ids if c in present])
        pending = [c for c in m.ids if c not in present and c not in failed]
        roster = sorted(ok)
        total = len(roster) if distributed_dp(cfg) else total_examples_bound(store, cfg, roster)
        try:
            scale = ring.scale_bits(spec.bits, total, spec.clip_range)
        except ring.RingError as exc:
            raise HandlerError(str(exc), 409) from None
        rec = {"round": r, "roster": roster, "scale": scale, "total_examples_bound": total, "at": now,
               "refused": bad, "late": pending}
        if store.put_if_absent(keys.secagg_roster(r), rounds.dumps(rec)):
            # After a failed advertise attempt the failure record holds that attempt: training counts on from it,
            # so a training failure is never taken for a duplicate of the advertise one.
            _invoke_phase(ctx, cfg, m, roster, TRAIN, {c: st.attempts.get(c, 0) + 1 for c in roster})
        return {"status": "roster", "phase": TRAIN, "round": r, "roster": roster}
    roster = sorted(_roster(store, r)["roster"])
    request = _json(store, keys.secagg_request(r))
    if request is None:
        s = protocol.settle(store, m)
        settled = set(s.delivered) | set(s.failed)
        if any(c not in settled for c in roster) and now < m.deadline:
            return {"status": "waiting", "phase": TRAIN, "round": r, "have": len(s.delivered), "need": len(roster)}
        survivors = [c for c in roster if c in s.delivered]
        request = {"round": r, "survivors": survivors, "dropped": [c for c in roster if c not in survivors], "at": now}
        if store.put_if_absent(keys.secagg_request(r), rounds.dumps(request)):
            _invoke_phase(ctx, cfg, m, survivors, UNMASK)
            for g in range(len(m.groups) if m.fan_in else 0):
                # Tree mode: the survivors are fixed now, so each group's masked sum can be folded while the
                # unmask answers come in, one aggregator invocation per group.
                ctx.invoker.invoke(AGGREGATOR, {"store": store.url, "round": r, "group": g}, None)
        return {"status": "unmasking", "phase": UNMASK, "round": r, "survivors": survivors}
    survivors = _request_survivors(request) or []
    answered, failed, _ = unmask_status(store, r)
    # A survivor is settled once it answered or its unmask invocation failed for good (retries spent); the phase
    # ends when all are, or at its deadline. Too few answers then fail the round in the sum, never reveal.
    if any(c not in answered and c not in failed for c in survivors) and now < unmask_deadline(store, cfg, m, request):
        return {"status": "waiting", "phase": UNMASK, "round": r, "have": len(answered & set(survivors)),
                "failed": len(set(failed) & set(survivors)), "need": len(survivors)}
    return None


def aggregate(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, strategy: Any) -> dict:
    """Sum the survivors' masked updates, remove the masks the answers allow, and return the round's result record."""
    from fedkeeper.functions import protocol

    store, r = ctx.store, manifest.round
    t0 = time.perf_counter()
    spec = spec_for(store, cfg, manifest)
    roster_rec = _roster(store, r)
    roster, scale = sorted(roster_rec["roster"]), int(roster_rec["scale"])
    request = _json(store, keys.secagg_request(r))
    survivors, dropped = secagg.check_request(spec, request, roster)
    records, _ = _advertised(store, spec, roster)
    publics = {c: bytes.fromhex(rec["mask_public"]) for c, rec in records.items()}
    answers = {}
    want = secagg.digest(dict(request))
    rejected: list[dict] = []
    for k in store.list(keys.secagg_answer_prefix(r)):
        holder = keys.record_client(k)
        ans = _json(store, k)
        if holder not in survivors:
            rejected.append({"client": holder, "reason": "unmask answer from a client that is not a survivor"})
        elif not isinstance(ans, dict) or ans.get("request") != want:
            rejected.append({"client": holder, "reason": "unmask answer does not answer this round's request"})
        else:
            answers[holder] = ans
    from fedkeeper.functions import shards

    g = shards.load_model(store, manifest.model).tensors  # the protocol's own model (single-file under masks)
    status, reason = rounds.DONE, ""
    meta: dict[str, dict] = {}
    total_n = total_w = 0
    weight_one = distributed_dp(cfg)
    try:
        lost = sorted(set(roster) - set(records))
        if lost:  # rewritten or deleted after the roster fixed them: their commitments and mask keys are gone
            raise secagg.RoundFailed(f"advertise records of {', '.join(lost)} changed or vanished after the roster "
                                     "was written; the masks cannot be checked or removed")
        seeds, mask_keys, bad = secagg.rebuild(spec, survivors, dropped, answers, records)
        rejected += bad
        if manifest.fan_in:  # tree mode: the group folds summed the masked uploads; merge their partial sums
            levels = manifest.levels()
            part = _merge_partials(store, manifest, spec, scale, request, g, len(levels) - 1, range(levels[-2]))
        else:
            part = _sum_masked(store, cfg, manifest, spec, scale, roster, survivors, g)
        if not part.error and part.survivors != survivors:
            part.error = "the partial sums do not hold every survivor's masked update exactly once"
        if part.error:
            raise secagg.RoundFailed(part.error)
        acc, total_n, total_w, meta = part.acc, part.num_examples, part.weight, part.clients
        offset_of, offset = {}, 0
        for k in sorted(acc):
            offset_of[k] = offset
            offset += acc[k].size
        for seed, sign in secagg.unmask_masks(spec, survivors, dropped, seeds, mask_keys, publics):
            for k in sorted(acc):
                secagg.apply_mask(acc[k].reshape(-1), seed, -sign, spec.bits, offset_of[k])
    except secagg.RoundFailed as exc:
        status, reason = rounds.FAILED, str(exc)
    _, unmask_failures, _ = unmask_status(store, r)
    unanswered = [{"client": c, "reason": str(unmask_failures[c].get("reason", "unmask invocation failed"))[:500]
                   if c in unmask_failures else "no unmask answer before the phase ended"}
                  for c in survivors if c not in answers]
    if status == rounds.FAILED and unanswered:
        reason += "; survivors without an unmask answer: " + ", ".join(f"{u['client']} ({u['reason']})"
                                                                         for u in unanswered)
    included = survivors if status == rounds.DONE else []
    if status == rounds.DONE and len(included) < manifest.quorum:
        status, reason = rounds.FAILED, f"{len(included)} survivors are below the quorum of {manifest.quorum}"
    new_weights, new_state = g, None
    if status == rounds.DONE:
        mean = {}
        for k in sorted(g):  # tensor by tensor and in slices, releasing each ring sum once it is read
            total, base = acc.pop(k).reshape(-1), np.asarray(g[k]).reshape(-1)
            out = np.empty(total.size, dtype=np.float32)
            for s0 in range(0, total.size, secagg.MASK_CHUNK):
                s1 = s0 + secagg.MASK_CHUNK
                out[s0:s1] = base[s0:s1].astype(np.float64) + ring.dequantise(total[s0:s1], scale, spec.bits) / total_w
            mean[k] = out.reshape(g[k].shape)
        new_weights, new_state = _finish(strategy, mean, g, store, r, len(included))
    if reason:
        rejected.append({"client": "*", "reason": reason})
    failures = [{"client": c, "reason": "did not deliver a masked update" if c in roster else "did not advertise in time"}
                for c in manifest.ids if c not in survivors]
    fed = strategy.metrics(meta, included)
    from fedkeeper.functions import privacy

    z_eff, extra = None, None
    if weight_one and roster:
        # Only the survivors' noise shares are in the sum: the multiplier falls to z·√(survivors / roster).
        d = cfg.privacy.dp
        z_eff = d.noise_multiplier * float(np.sqrt(len(survivors) / len(roster)))
        extra = {"clip_norm": d.clip_norm, "noise_std": z_eff * d.clip_norm, "noise": "shared among the clients"}
    dp_record = privacy.round_record(store, cfg, r, strategy, released=status == rounds.DONE, noise_multiplier=z_eff,
                                     extra=extra)
    out = {
        "round": r, "status": status, "strategy": cfg.strategy.name, "selected": manifest.ids, "included": included,
        "rejected": sorted(rejected, key=lambda x: x["client"]), "stragglers": [], "failed": failures,
        "quorum": manifest.quorum, "num_examples": int(total_n if included else 0),
        "federated_accuracy": fed.get("accuracy"), "federated_loss": fed.get("loss"), "train_loss": fed.get("train_loss"),
        "clients": {c: meta[c] for c in included}, "aggregated_by": ctx.invocation_id, "model": keys.model(r + 1),
        "_model_bytes": blob.encode(new_weights, {"kind": "model", "round": r + 1, "parent": manifest.model,
                                                  "clients": len(included), "strategy": cfg.strategy.name}),
        "_state_bytes": blob.encode(new_state, {"kind": "server_state", "round": r + 1}) if new_state else None,
        "timings": {"aggregation_s": time.perf_counter() - t0, "manifest_created": manifest.created,
                    "deadline": manifest.deadline},
        "secure_aggregation": {"roster": roster, "survivors": survivors, "dropped": dropped, "ring_bits": spec.bits,
                               "scale": scale, "answers": sorted(answers), "unanswered": unanswered,
                               "graph_degree": len(spec.graph[roster[0]]) if roster else 0},
    }
    if dp_record is not None:
        out["privacy"] = dp_record
    return out


def _finish(strategy: Any, mean: dict, g: Mapping[str, np.ndarray], store: Store, r: int, n: int) -> tuple[dict, dict | None]:
    """Let an averaging strategy (server momentum, adaptive optimizers) finish from the unmasked mean."""
    from fedkeeper.core.strategy import SumFold

    state = None
    if store.exists(keys.server_state(r)):
        state = blob.decode(store.get(keys.server_state(r))).tensors
    fold = strategy.begin(g, state)
    if not isinstance(fold, SumFold):
        raise HandlerError(f"strategy {strategy.name} cannot run under secure aggregation", 409)
    fold.sum.sums, fold.sum.total, fold.sum.count = mean, 1.0, n  # the mean as a sum of weight 1
    return strategy.finish(fold, g, state)


@dataclass
class _Masked:
    """A sum of masked uploads in the ring (one client's, a group's, or everyone's) and what it is made of."""

    acc: dict[str, np.ndarray]
    survivors: list[str] = field(default_factory=list)
    num_examples: int = 0
    weight: int = 0
    clients: dict[str, dict] = field(default_factory=dict)
    error: str = ""  # why the masks cannot cancel (an upload that is missing or malformed); the round fails


def _zeros(g: Mapping[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    return {k: np.zeros(v.shape, dtype=ring.DTYPES[bits]) for k, v in g.items()}


def _sum_masked(store: Store, cfg: FederationConfig, m: rounds.Manifest, spec: secagg.RoundSpec, scale: int,
                roster: list[str], members: list[str], g: Mapping[str, np.ndarray]) -> _Masked:
    """The ring sum of these survivors' masked uploads, each checked; nothing here is an update in the clear."""
    from fedkeeper.functions import protocol

    r = m.round
    known = protocol.known_examples(store)
    out = _Masked(_zeros(g, spec.bits), survivors=sorted(members))
    for cid in out.survivors:
        try:
            b = blob.decode(store.get_view(keys.update(r, cid), max_bytes=int(cfg.strategy.max_update_mb * 2 ** 20)))
        except (blob.BlobError, NotFound) as exc:
            return _Masked(_zeros(g, spec.bits), out.survivors, error=f"{cid}'s masked update cannot be read "
                           f"({str(exc)[:200]}); without it the masks do not cancel")
        why = _check_masked(b, cid, r, spec, scale, roster, g, known, cfg.strategy.max_examples, distributed_dp(cfg))
        if why:
            return _Masked(_zeros(g, spec.bits), out.survivors,
                           error=f"{cid}'s masked update is invalid ({why}); without it the masks do not cancel")
        for k, t in b.tensors.items():
            ring.add(out.acc[k], t)
        meta = b.meta
        out.num_examples += meta["num_examples"]
        out.weight += meta["secagg"]["weight"]
        out.clients[cid] = {"num_examples": meta["num_examples"], "metrics": meta.get("metrics") or {},
                            "timings": meta.get("timings") or {}, "platform": meta.get("platform")}
    return out


# -- tree mode under masks -------------------------------------------------------------------------------
# Masks cancel only in the full sum, so a group's ring sum of masked uploads is itself masked (every member's
# self mask is still in it): partials reveal nothing, and the root's merge mod 2^bits is exactly the single
# aggregator's sum, whatever the grouping. Group folds start once the unmask request fixes the survivors.
def _expected(m: rounds.Manifest, survivors: set[str], level: int, group: int) -> list[str]:
    """The survivors a partial of this level and group must hold: its members' (level 1) or its children's."""
    from fedkeeper.functions import protocol

    if level == 1:
        return sorted(set(m.groups[group]) & survivors)
    return sorted(c for kid in protocol._children(m, level, group) for c in _expected(m, survivors, level - 1, kid))


def _partial_meta(r: int, level: int, group: int, request: Mapping, spec: secagg.RoundSpec, scale: int,
                  part: _Masked) -> dict:
    return {"kind": "partial", "masked": True, "round": r, "level": level, "group": group,
            "request": secagg.digest(dict(request)), "ring_bits": spec.bits, "scale": scale,
            "survivors": part.survivors, "num_examples": part.num_examples, "weight": part.weight,
            "clients": part.clients, "error": part.error}


def _read_partial(store: Store, m: rounds.Manifest, spec: secagg.RoundSpec, scale: int, request: Mapping,
                  g: Mapping[str, np.ndarray], level: int, group: int) -> _Masked:
    """A masked partial as a _Masked, checked against what it must hold; a bad one fails the round, naming it."""
    key = keys.partial(m.round, group, level)
    bad = _Masked(_zeros(g, spec.bits))
    try:
        b = blob.decode(store.get_view(key))
    except (blob.BlobError, NotFound) as exc:
        bad.error = f"partial sum {key} cannot be read ({str(exc)[:200]})"
        return bad
    meta = b.meta
    if isinstance(meta.get("error"), str) and meta["error"]:
        # A fold below found an upload or partial that cannot be used: its reason is the round's (failing is safe).
        bad.error = meta["error"][:2000]
        return bad
    survivors = set(_request_survivors(request) or [])
    want = _expected(m, survivors, level, group)
    dtype = np.dtype(ring.DTYPES[spec.bits])
    counts = [meta.get(f) for f in ("num_examples", "weight")]
    if (meta.get("kind") != "partial" or meta.get("masked") is not True or meta.get("round") != m.round
            or meta.get("level") != level or meta.get("group") != group
            or meta.get("request") != secagg.digest(dict(request)) or meta.get("ring_bits") != spec.bits
            or meta.get("scale") != scale or meta.get("survivors") != want
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts)
            or not isinstance(meta.get("clients"), dict) or sorted(meta["clients"]) != want):
        bad.error = f"partial sum {key} does not hold the masked sum of {want} for this request"
        return bad
    if set(b.tensors) != set(g) or any(b.tensors[k].shape != g[k].shape or b.tensors[k].dtype != dtype for k in g):
        bad.error = f"partial sum {key}'s tensor names, shapes or ring dtype differ from the global model's"
        return bad
    return _Masked(dict(b.tensors), want, counts[0], counts[1], dict(meta["clients"]))


def _merge_partials(store: Store, m: rounds.Manifest, spec: secagg.RoundSpec, scale: int,
                    request: Mapping, g: Mapping[str, np.ndarray], level: int, groups: range) -> _Masked:
    """The ring sum of these masked partials of one level (addition mod 2^bits: their order does not matter)."""
    out = _Masked(_zeros(g, spec.bits))
    for group in groups:
        part = _read_partial(store, m, spec, scale, request, g, level, group)
        if part.error:
            return _Masked(_zeros(g, spec.bits), error=part.error)
        for k, t in part.acc.items():
            ring.add(out.acc[k], t)
        out.survivors += part.survivors
        out.num_examples += part.num_examples
        out.weight += part.weight
        out.clients.update(part.clients)
        del part
    out.survivors.sort()
    return out


def _tree_inputs(store: Store, cfg: FederationConfig, m: rounds.Manifest) -> tuple:
    from fedkeeper.functions import shards

    spec = spec_for(store, cfg, m)
    rec = _roster(store, m.round)
    request = _json(store, keys.secagg_request(m.round))
    try:
        survivors, _ = secagg.check_request(spec, request, sorted(rec["roster"]))
    except secagg.SecAggError as exc:
        raise HandlerError(f"round {m.round}'s unmask request is malformed: {exc}", 409) from None
    g = shards.load_model(store, m.model).tensors
    return spec, sorted(rec["roster"]), int(rec["scale"]), request, survivors, g


def fold_group(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, group: int, inputs: tuple | None = None) -> str:
    """Fold level-1 group g's survivors' masked uploads into its create-only masked partial sum."""
    from fedkeeper.functions import protocol

    store, r = ctx.store, m.round
    key = keys.partial(r, group)
    if store.exists(key):
        return "exists"
    if not protocol.claim(ctx, r, cfg.strategy.lease_s, key=keys.partial_claim(r, group))[0]:
        return "claimed"
    spec, roster, scale, request, survivors, g = inputs or _tree_inputs(store, cfg, m)
    members = _expected(m, set(survivors), 1, group)
    part = _sum_masked(store, cfg, m, spec, scale, roster, members, g)
    store.put_if_absent(key, blob.encode(part.acc, _partial_meta(r, 1, group, request, spec, scale, part)))
    return "folded"


def fold_upper(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, level: int, group: int,
               inputs: tuple | None = None) -> str:
    """Fold group g of level l ≥ 2 (masked partials of the level below) once all of them exist."""
    from fedkeeper.functions import protocol

    store, r = ctx.store, m.round
    key = keys.partial(r, group, level)
    if store.exists(key):
        return "exists"
    kids = protocol._children(m, level, group)
    if not all(store.exists(keys.partial(r, c, level - 1)) for c in kids):
        return "waiting"
    if not protocol.claim(ctx, r, cfg.strategy.lease_s, key=keys.partial_claim(r, group, level))[0]:
        return "claimed"
    spec, roster, scale, request, survivors, g = inputs or _tree_inputs(store, cfg, m)
    part = _merge_partials(store, m, spec, scale, request, g, level - 1, kids)
    part.survivors = _expected(m, set(survivors), level, group)
    store.put_if_absent(key, blob.encode(part.acc, _partial_meta(r, level, group, request, spec, scale, part)))
    return "folded"


def tree_step(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, gate: dict | None, event: dict,
              client: str | None, received: float) -> dict:
    """Tree mode under masks: once the request fixed the survivors, each group's event folds its group and the
    complete groups above it; when the unmask phase is over, the root folds whatever is still missing, merges the
    top partials mod the ring, and removes the masks exactly as the single aggregator does."""
    from fedkeeper.core import faults
    from fedkeeper.core import strategy as strategies
    from fedkeeper.functions import protocol

    store, r = ctx.store, m.round
    if phase(store, r) != UNMASK:
        return gate or {"status": "waiting", "round": r}
    levels = m.levels()
    group = event.get("group")
    if gate is not None:  # answers still awaited: fold the group this event names, if any
        if isinstance(group, int) and not isinstance(group, bool) and 0 <= group < levels[0]:
            if fold_group(ctx, cfg, m, group) in ("folded", "exists"):
                for level in range(2, len(levels)):
                    group //= m.fan_in
                    if fold_upper(ctx, cfg, m, level, group) == "waiting":
                        break
        return gate
    inputs = None
    have = set(store.list(keys.partials_prefix(r)))
    for g in range(levels[0]):
        if keys.partial(r, g) not in have:
            inputs = inputs or _tree_inputs(store, cfg, m)
            fold_group(ctx, cfg, m, g, inputs)
    for level in range(2, len(levels)):
        for g in range(levels[level - 1]):
            fold_upper(ctx, cfg, m, level, g, inputs)
    if not all(store.exists(keys.partial(r, g, len(levels) - 1)) for g in range(levels[-2])):
        return {"status": "waiting", "round": r}
    ok, holder = protocol.claim(ctx, r, cfg.strategy.lease_s)
    if not ok:
        return {"status": "claimed", "round": r, "by": holder}
    faults.maybe_crash("aggregator_after_claim", first=not holder)
    started = ctx.now()
    protocol.write_state(store, r, rounds.AGGREGATING)
    out = aggregate(ctx, cfg, m, strategies.from_config(cfg))
    out["timings"].update(protocol.trigger_timings(event, client, received, started, holder), tree_levels=levels,
                          groups=levels[0])
    return protocol.finish(ctx, cfg, m, out)


def _check_masked(b: blob.Blob, cid: str, r: int, spec: secagg.RoundSpec, scale: int, roster: list[str],
                  g: Mapping[str, np.ndarray], known: Mapping[str, int], max_examples: int,
                  weight_one: bool) -> str | None:
    meta = b.meta
    why = validate.update_meta(meta)
    if why:
        return why
    if meta["round"] != r or meta["client"] != cid:
        return f"it names round {meta['round']} client {meta['client']!r}"
    tag = meta.get("secagg")
    if not isinstance(tag, dict) or tag.get("ring_bits") != spec.bits or tag.get("scale") != scale \
            or tag.get("roster") != secagg.digest(roster):
        return "it was masked for another roster, ring or scale"
    if meta["num_examples"] > known.get(cid, max_examples):
        return f"num_examples {meta['num_examples']} exceeds what this client holds"
    # The weight the client quantised with: its example count, or 1 when each client counts once (DP).
    if tag.get("weight") != (1 if weight_one else meta["num_examples"]):
        return "its weight is not its example count (or 1 under differential privacy)"
    dtype = np.dtype(ring.DTYPES[spec.bits])
    if set(b.tensors) != set(g) or any(b.tensors[k].shape != g[k].shape or b.tensors[k].dtype != dtype for k in g):
        return "tensor names, shapes or ring dtype differ from the global model's"
    return None
