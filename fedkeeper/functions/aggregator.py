"""The aggregator: on an update event, claims a complete (or overdue, quorate) round exactly once and averages it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from fedkeeper.core import blob, faults, keys, rounds
from fedkeeper.core.aggregate import RunningSum, global_norm
from fedkeeper.core.config import FederationConfig
from fedkeeper.functions.context import CLIENT, TRIGGER, Context, HandlerError
from fedkeeper.functions.trigger import presigned_spec, read_state
from fedkeeper.store import NotFound, Store


def _prefetch(store: Store, key_list: list[str]) -> Iterator[tuple[str, bytes | memoryview | Exception]]:
    """Yield (key, bytes) in order while the next download is already under way."""
    if not key_list:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(_safe_get, store, key_list[0])
        for i, key in enumerate(key_list):
            data = fut.result()
            if i + 1 < len(key_list):
                fut = pool.submit(_safe_get, store, key_list[i + 1])
            yield key, data


def _safe_get(store: Store, key: str) -> bytes | memoryview | Exception:
    try:
        return store.get_view(key)
    except Exception as exc:  # a missing or unreadable update is a rejection, not a crash
        return exc


def check_update(b: blob.Blob, r: int, client: str, fp: str, max_examples: int = 10**9,
                 check_values: bool = True) -> str | None:
    """Why an update must be rejected, or None if it is acceptable (check_values: also scan for NaN/Inf)."""
    meta = b.meta
    if meta.get("kind") != "update":
        return f"blob kind is {meta.get('kind')!r}, not 'update'"
    if meta.get("round") != r:
        return f"update is for round {meta.get('round')!r}, not round {r}"
    if meta.get("client") != client:
        return f"update names client {meta.get('client')!r} but was written to {client}'s key"
    if meta.get("fingerprint") != fp:
        return "tensor names, shapes or dtypes differ from the global model"
    n = meta.get("num_examples")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or n > max_examples:
        return f"num_examples {n!r} is not a positive count up to {max_examples}"
    for name, t in (b.tensors.items() if check_values else ()):
        # NaN and Inf survive a float64 sum, which cannot overflow on float32 inputs and allocates nothing.
        if not np.isfinite(t.sum(dtype=np.float64)):
            return f"tensor {name} holds NaN or Inf"
    return None


def _claim(ctx: Context, r: int, lease_s: float) -> tuple[bool, str]:
    """Create-only claim on round r; an expired lease is taken over by compare-and-swap."""
    store, now = ctx.store, ctx.now()
    mine = rounds.Claim(round=r, owner=ctx.invocation_id, lease_until=now + lease_s)
    if store.put_if_absent(keys.claim(r), rounds.dumps(mine)):
        return True, ""
    try:
        data, version = store.get_versioned(keys.claim(r))
    except NotFound:
        return False, "claim vanished"
    held = rounds.Claim(**rounds.loads(data))
    if not held.expired(now):
        return False, held.owner
    mine.taken_over_from = held.owner
    if store.put_if_match(keys.claim(r), rounds.dumps(mine), version):
        return True, held.owner
    return False, "lost takeover race"


def _record_late(ctx: Context, r: int, client: str, result: dict) -> None:
    known = set(result.get("included", [])) | {x["client"] for x in result.get("rejected", [])}
    if client not in known:
        ctx.store.put_if_absent(keys.late(r, client), rounds.dumps({"client": client, "round": r, "at": ctx.now()}))


def handle(event: dict, ctx: Context) -> dict:
    """Handle {"key": update key} (a store event) or {"round": r} (a tick): aggregate if the round is ready."""
    store = ctx.store
    received = ctx.now()
    client = None
    if "key" in event:
        parsed = keys.parse_update(str(event["key"]))
        if parsed is None:
            return {"status": "ignored", "key": event["key"]}
        r, client = parsed
    elif "round" in event:
        r = event["round"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise HandlerError(f"'round' must be a non-negative integer, got {r!r}")
    else:
        raise HandlerError("aggregator event needs 'key' (an update key) or 'round'")

    try:
        result = store.get_json(keys.result(r))
        if client:
            _record_late(ctx, r, client, result)
        return {"status": "done-already", "round": r}
    except NotFound:
        pass
    try:
        manifest = rounds.Manifest.from_json(store.get(keys.manifest(r)))
    except NotFound:
        return {"status": "ignored", "round": r, "reason": "no manifest for this round"}
    if client and client not in manifest.ids:
        store.put_if_absent(keys.late(r, client), rounds.dumps({"client": client, "round": r, "reason": "not selected"}))
    present = {p[1] for k in store.list(keys.updates_prefix(r)) if (p := keys.parse_update(k)) and p[0] == r}
    have = [c for c in manifest.ids if c in present]
    failed = {k.rsplit("/", 1)[1][:-5] for k in store.list(keys.invocations_prefix(r))} - set(have)
    # A client whose invocation is recorded as failed will not deliver, so the round need not wait for it.
    complete = len(have) + len(failed & set(manifest.ids)) >= len(manifest.ids)
    overdue = received >= manifest.deadline
    if not complete and not overdue:
        return {"status": "waiting", "round": r, "have": len(have), "failed": len(failed), "need": len(manifest.ids)}

    cfg = ctx.config()
    ok, holder = _claim(ctx, r, cfg.strategy.lease_s)
    if not ok:
        return {"status": "claimed", "round": r, "by": holder}
    faults.maybe_crash("aggregator_after_claim", first=not holder)
    started = ctx.now()
    store.put_json(keys.STATE, {**read_state(store), "round": r, "status": rounds.AGGREGATING, "updated": started})
    out = aggregate_round(ctx, cfg, manifest, have)
    out["timings"].update({"triggered_by": "event" if client else "tick",
                           "event_delivered_at": event.get("delivered_at", received),
                           "event_time": event.get("event_time"), "aggregation_started_at": started,
                           "claim_takeover_from": holder or None})
    return finish_round(ctx, cfg, manifest, out)


def _stream(store: Store, cfg: FederationConfig, r: int, order: list[str], fp: str, global_blob, max_bytes: int,
            strict: bool) -> tuple[RunningSum, list, list, dict]:
    """One pass over the updates in order: validate each and add the accepted ones to a running sum."""
    rejected: list[dict] = []
    accepted: list[tuple[str, int]] = []
    client_meta: dict[str, dict] = {}
    norms: dict[str, float] = {}
    acc = RunningSum()
    two_pass = cfg.strategy.norm_multiple > 0
    for key, data in _prefetch(store, [keys.update(r, c) for c in order]):
        cid = keys.parse_update(key)[1]
        if isinstance(data, Exception):
            rejected.append({"client": cid, "reason": f"update could not be read: {data}"})
            continue
        if len(data) > max_bytes:
            rejected.append({"client": cid, "reason": f"update is {len(data)} bytes, over the {max_bytes}-byte limit (strategy.max_update_mb)"})
            continue
        try:
            b = blob.decode(data)
        except blob.BlobError as exc:
            rejected.append({"client": cid, "reason": f"corrupt update: {exc}"})
            continue
        reason = check_update(b, r, cid, fp, check_values=strict or two_pass)
        if reason:
            rejected.append({"client": cid, "reason": reason})
            continue
        client_meta[cid] = {k: b.meta.get(k) for k in ("num_examples", "metrics", "timings", "platform")}
        if two_pass:
            norms[cid] = global_norm(b.tensors, global_blob.tensors)
        else:
            acc.add(b.tensors, b.num_examples)
        accepted.append((cid, b.num_examples))
        del b, data
    if two_pass and accepted:
        median = float(np.median(list(norms.values())))
        limit = cfg.strategy.norm_multiple * median
        keep = []
        for cid, n in accepted:
            if median > 0 and norms[cid] > limit:
                rejected.append({"client": cid, "reason": f"update norm {norms[cid]:.4g} exceeds {cfg.strategy.norm_multiple}x the round median {median:.4g}"})
            else:
                keep.append((cid, n))
        accepted = keep
        for key, data in _prefetch(store, [keys.update(r, c) for c, _ in accepted]):
            b = blob.decode(data)
            acc.add(b.tensors, b.num_examples)
    return acc, accepted, rejected, client_meta


def _unselected(store: Store, r: int, manifest: rounds.Manifest) -> list[dict]:
    """Updates written under round r by clients the manifest did not select: never used, always explained."""
    selected = set(manifest.ids)
    out = []
    for k in store.list(keys.updates_prefix(r)):
        p = keys.parse_update(k)
        if p and p[1] not in selected:
            out.append({"client": p[1], "reason": f"client {p[1]} was not selected for round {r}"})
    return out


def aggregate_round(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, have: list[str]) -> dict:
    """Validate and stream-average the present updates; returns the round's result record (not yet written)."""
    store, r = ctx.store, manifest.round
    t0 = time.perf_counter()
    # Mapped, not read: without the norm check only its header (the fingerprint) is ever looked at.
    global_blob = blob.decode(store.get_view(manifest.model))
    fp = global_blob.meta.get("fingerprint")
    two_pass = cfg.strategy.norm_multiple > 0
    if not two_pass:
        global_blob = None  # only the norm check needs it while streaming; O(model) memory is the point
    max_bytes = int(cfg.strategy.max_update_mb * 1024 * 1024)
    order = sorted(have)  # a fixed order makes the float sum, and so the model bytes, deterministic
    unselected = _unselected(store, r, manifest)
    acc, accepted, rejected, client_meta = _stream(store, cfg, r, order, fp, global_blob, max_bytes, strict=False)
    rejected += unselected
    if not acc.finite():
        # Some accepted update held NaN or Inf (or the sum overflowed): redo the round checking every
        # value, so the culprit is named and left out. The fast path skips that pass over each update.
        acc, accepted, rejected, client_meta = _stream(store, cfg, r, order, fp, global_blob, max_bytes, strict=True)
        rejected += unselected
        if not acc.finite():
            acc, accepted = RunningSum(), []
            rejected.append({"client": "*", "reason": "the weighted sum overflowed float32; no update was used"})
    included = [c for c, _ in accepted]
    failed = {}
    for k in store.list(keys.invocations_prefix(r)):
        try:
            rec = store.get_json(k)
        except (NotFound, ValueError):
            continue
        failed[k.rsplit("/", 1)[1][:-5]] = rec.get("reason", "invocation failed")
    stragglers = [c for c in manifest.ids if c not in have and c not in failed]
    failures = [{"client": c, "reason": failed[c]} for c in manifest.ids if c not in have and c in failed]
    status = rounds.DONE if len(included) >= manifest.quorum else rounds.FAILED
    if status == rounds.DONE:
        new_weights = acc.result(in_place=True)
    else:
        # Below quorum the global model stays as it was.
        new_weights = (global_blob or blob.decode(store.get(manifest.model))).tensors
    model_bytes = blob.encode(new_weights, {"kind": "model", "round": r + 1, "parent": manifest.model,
                                            "clients": len(included)})
    agg_s = time.perf_counter() - t0
    fed = _federated_metrics(client_meta, included)
    return {
        "round": r, "status": status, "selected": manifest.ids, "included": included,
        "rejected": sorted(rejected, key=lambda x: x["client"]), "stragglers": stragglers,
        "failed": failures, "quorum": manifest.quorum, "num_examples": int(sum(n for _, n in accepted)),
        "federated_accuracy": fed.get("accuracy"), "federated_loss": fed.get("loss"),
        "train_loss": fed.get("train_loss"),
        "clients": client_meta, "aggregated_by": ctx.invocation_id, "model": keys.model(r + 1),
        "_model_bytes": model_bytes,
        "timings": {"aggregation_s": agg_s, "manifest_created": manifest.created, "deadline": manifest.deadline},
    }


def _federated_metrics(meta: dict[str, dict], included: list[str]) -> dict:
    """Example-weighted mean of the clients' pre-training holdout metrics (federated evaluation)."""
    out = {}
    for name, field in (("accuracy", "holdout_accuracy"), ("loss", "holdout_loss"), ("train_loss", "train_loss")):
        num = den = 0.0
        for c in included:
            m = (meta[c].get("metrics") or {})
            v = m.get(field)
            n = m.get("holdout_examples" if field.startswith("holdout") else "train_examples", meta[c].get("num_examples") or 0)
            if v is not None and n:
                num += float(v) * n
                den += n
        out[name] = num / den if den else None
    return out


def finish_round(ctx: Context, cfg: FederationConfig, manifest: rounds.Manifest, out: dict) -> dict:
    """Write model, marker, result and state in that order (readers trust result.json), then start what follows."""
    store, r = ctx.store, manifest.round
    model_bytes = out.pop("_model_bytes")
    t0 = time.perf_counter()
    store.put(keys.model(r + 1), model_bytes)
    store.put_json(keys.aggregation_marker(r, ctx.invocation_id), {"invocation": ctx.invocation_id, "at": ctx.now()})
    out["timings"]["write_s"] = time.perf_counter() - t0
    out["timings"]["finished_at"] = ctx.now()
    store.put_json(keys.result(r), out)
    last = r + 1 >= cfg.rounds
    store.put_json(keys.STATE, {**read_state(store), "round": r, "next_round": r + 1, "rounds_done": r + 1,
                                "status": "finished" if last else out["status"], "model": keys.model(r + 1),
                                "updated": ctx.now()})
    evaluation = {"store": store.url, "mode": "evaluate", "round": r, "model": keys.model(r + 1),
                  "data": keys.TEST_DATA, "output": keys.evaluation(r), "invoked_at": time.time()}
    if cfg.client_access == "presigned":
        ttl = max(60, int(cfg.strategy.deadline_s))
        evaluation["access"] = {"model": store.presign(keys.model(r + 1), "GET", ttl),
                                "data": store.presign(keys.TEST_DATA, "GET", ttl),
                                "output": store.presign(keys.evaluation(r), "PUT", ttl)}
        evaluation["spec"] = presigned_spec(store, cfg)
    ctx.invoker.invoke(CLIENT, evaluation, cfg.eval_platform)
    if not last and not cfg.schedule:  # with a schedule, the cron tick starts the next round
        ctx.invoker.invoke(TRIGGER, {"store": store.url, "round": r + 1}, None)
    return {"status": out["status"], "round": r, "included": out["included"],
            "rejected": [x["client"] for x in out["rejected"]], "stragglers": out["stragglers"]}
