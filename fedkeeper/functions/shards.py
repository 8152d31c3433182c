"""Sharded aggregation: each byte-balanced tensor shard is folded by its own aggregator invocation.

No invocation holds the whole model. A round with `aggregation.shards: M` is settled as usual; the
aggregator that claims it reads only the updates' headers, validates them and writes a plan (which
updates, which tensors in which shard); then M invocations of the same aggregator function each read
only their tensors' byte ranges of every update and of the global model, and write their partial sums
with each client's squared distance from the global model over those tensors. The invocation that
writes the last sum finalises: it adds the distances up, applies the norm bound (a second phase folds
the kept updates again if it rejected anyone), and writes the model one shard at a time, with a
Hugging Face style `model.safetensors.index.json`. Every step is claimed create-only, so duplicated,
reordered and lost events are handled by the same claim, lease and tick rules as a whole round.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from fedkeeper.core import blob, keys, rounds, validate
from fedkeeper.core import shards as shardplan
from fedkeeper.core import strategy as strategies
from fedkeeper.core.config import FederationConfig
from fedkeeper.functions import protocol
from fedkeeper.functions.context import AGGREGATOR, Context, HandlerError
from fedkeeper.store import NotFound, Store

MAX_PHASES = 3


# -- reading models and updates by parts ----------------------------------------------------------------
def header(store: Store, key: str, max_bytes: int | None = None, trusted: bool = False) -> blob.Header:
    """A blob's header from ranged reads (the size is checked first when max_bytes is given)."""
    total = store.size(key)
    if max_bytes is not None and total > max_bytes:
        raise blob.BlobError(f"update is {total} bytes, over the {max_bytes}-byte limit (strategy.max_update_mb)")
    return blob.read_header(lambda a, b: store.get_range(key, a, b), total, trusted=trusted)


def read_tensors(store: Store, key: str, h: blob.Header, names: list[str]) -> dict[str, np.ndarray]:
    """Only these tensors of a blob, each from its own byte range."""
    out = {}
    for name in names:
        dtype, shape, start, end = h.entries[name]
        raw = store.get_range(key, start, end)
        if len(raw) != end - start:
            raise blob.BlobError(f"tensor {name} could not be read whole; the blob changed or is truncated")
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return out


def is_index(key: str) -> bool:
    """True for a sharded model's index key."""
    return key.endswith(".index.json")


def model_parts(store: Store, key: str) -> dict[str, str]:
    """tensor name -> the store key of the file holding it, for a single-file or a sharded model."""
    if not is_index(key):
        return {name: key for name in header(store, key, trusted=True).entries}
    idx = validate.loads(store.get(key), max_bytes=64 << 20, what=key)
    folder = key.rsplit("/", 1)[0]
    return {name: f"{folder}/{file}" for name, file in idx["weight_map"].items()}


def load_model(store: Store, key: str, names: list[str] | None = None) -> blob.Blob:
    """A global model, single-file or sharded, whole or only the named tensors (mapped where the store allows)."""
    if not is_index(key) and names is None:
        return blob.decode(store.get_view(key), trusted=True)
    parts = model_parts(store, key)
    want = sorted(parts) if names is None else names
    tensors, meta = {}, {}
    for file in sorted({parts[n] for n in want}):
        h = header(store, file, trusted=True)
        tensors.update(read_tensors(store, file, h, [n for n in want if parts[n] == file]))
        meta = h.meta
    return blob.Blob(tensors=tensors, meta=meta)


def model_bytes(store: Store, key: str) -> bytes | memoryview:
    """A global model as one safetensors file (a sharded one is joined), for a client that trains all of it."""
    if not is_index(key):
        return store.get(key)
    b = load_model(store, key)
    return blob.encode(b.tensors, {k: v for k, v in b.meta.items() if k not in ("fingerprint", "shard")})


# -- the round ------------------------------------------------------------------------------------------
def step(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, client: str | None, event: dict,
         received: float) -> dict:
    """A sharded round's aggregator step: plan (once ready), fold one shard, or finalise."""
    if "shard" in event:
        i, phase = event.get("shard"), event.get("phase", 1)
        for v in (i, phase):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise HandlerError(f"'shard' and 'phase' must be non-negative integers, got {i!r}, {phase!r}")
        if not 1 <= phase <= MAX_PHASES or i >= m.shards:
            raise HandlerError(f"round {m.round} has shards 0..{m.shards - 1} and phases 1..{MAX_PHASES}")
        return fold_shard(ctx, cfg, m, phase, i)
    store, r = ctx.store, m.round
    s = protocol.settle(store, m)
    if not s.ready and received < m.deadline:
        return {"status": "waiting", "round": r, "have": len(s.delivered), "need": len(m.ids)}
    ok, holder = protocol.claim(ctx, r, cfg.strategy.lease_s)
    if not ok:
        return {"status": "claimed", "round": r, "by": holder}
    protocol.write_state(store, r, rounds.AGGREGATING)
    phase = max([p for p in range(1, MAX_PHASES + 1) if store.exists(keys.shard_plan(r, p))], default=0)
    if phase == 0:
        phase = 1
        store.put_if_absent(keys.shard_plan(r, 1), rounds.dumps(make_plan(ctx, cfg, m, s, event, received, holder)))
    plan = protocol.read_json(store, keys.shard_plan(r, phase))
    missing = [i for i in range(len(plan["shards"])) if not store.exists(keys.shard_sum(r, phase, i))]
    for i in missing:  # a takeover re-invokes only the shards whose sums are missing
        ctx.invoker.invoke(AGGREGATOR, {"store": store.url, "round": r, "shard": i, "phase": phase}, None)
    if not missing:
        return finalise(ctx, cfg, m, phase)
    return {"status": "sharding", "round": r, "phase": phase, "shards": missing}


def make_plan(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, s: protocol.Settlement, event: dict,
              received: float, holder: str) -> dict:
    """Validate every delivered update from its header alone and assign the tensors to shards."""
    store, r = ctx.store, m.round
    g = header(store, m.model, trusted=True) if not is_index(m.model) else None
    parts = model_parts(store, m.model)
    if g is not None:
        sizes = {n: e[3] - e[2] for n, e in g.entries.items()}
        fp = g.fingerprint
    else:
        idx = validate.loads(store.get(m.model), what=m.model)
        sizes = {k: int(v) for k, v in idx["metadata"]["sizes"].items()}
        fp = idx["metadata"].get("fingerprint")
    chk = protocol.Check(round=r, fingerprint=fp, known=protocol.known_examples(store),
                         max_examples=cfg.strategy.max_examples, max_bytes=int(cfg.strategy.max_update_mb * 2**20))
    order, rejected, clients = [], [], {}
    for cid in sorted(s.delivered):
        key = keys.update(r, cid)
        try:
            h = header(store, key, chk.max_bytes)
        except (blob.BlobError, NotFound) as exc:
            rejected.append({"client": cid, "reason": f"corrupt update: {str(exc)[:300]}"})
            continue
        reason = protocol.check_update(blob.Blob(tensors={}, meta=h.meta), cid, chk)
        if reason is None and h.fingerprint != fp:
            reason = "tensor names, shapes or dtypes differ from the global model"
        if reason:
            rejected.append({"client": cid, "reason": reason})
            continue
        n = h.meta["num_examples"]
        order.append([cid, n, h.digest])
        clients[cid] = {"num_examples": n, "metrics": h.meta.get("metrics") or {},
                        "timings": h.meta.get("timings") or {}, "platform": h.meta.get("platform")}
    failures = [{"client": c, "reason": str(s.failed[c].get("reason", "invocation failed"))[:2000]}
                for c in m.ids if c not in s.delivered and c in s.failed]
    return {"phase": 1, "order": order, "rejected": rejected, "clients": clients, "failed": failures,
            "stragglers": [c for c in m.ids if c not in s.delivered and c not in s.failed],
            "shards": shardplan.plan(sizes, m.shards), "sizes": sizes, "fingerprint": fp, "global": parts,
            "started_at": ctx.now(), "triggered_by": "tick" if "key" not in event else "event",
            "event_delivered_at": protocol._num(event.get("delivered_at"), received), "claim_takeover_from": holder or None}


def fold_shard(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, phase: int, i: int) -> dict:
    """Fold shard i of every planned update (its tensors' byte ranges only) into a create-only partial sum."""
    store, r = ctx.store, m.round
    out_key = keys.shard_sum(r, phase, i)
    plan = protocol.read_json(store, keys.shard_plan(r, phase))
    if not isinstance(plan, dict):
        return {"status": "ignored", "round": r, "reason": "no plan for this phase"}
    if not store.exists(out_key):
        ok, _ = protocol.claim(ctx, r, cfg.strategy.lease_s, key=keys.shard_claim(r, phase, i))
        if not ok:
            return {"status": "claimed", "round": r, "shard": i}
        names = plan["shards"][i]
        norm_on = cfg.strategy.norm_multiple > 0
        glob = load_model(store, m.model, names).tensors if norm_on else None
        fold = strategies.SumFold(np.float32)
        sq, changed = {}, {}
        for cid, n, digest in plan["order"]:
            key = keys.update(r, cid)
            try:
                h = header(store, key)
                if h.digest != digest:
                    raise blob.BlobError("the update changed while the round was being aggregated")
                tensors = read_tensors(store, key, h, names)
            except (blob.BlobError, NotFound) as exc:
                changed[cid] = str(exc)[:300]
                continue
            d = fold.sum.add(tensors, n, reference=glob)
            sq[cid] = float(d) if d is not None else 0.0
            del tensors  # release this update's mapped slice before the next one is read
        del glob  # the sums are written next: the global slice is no longer needed beside them
        meta = {"kind": "shard_sum", "round": r, "phase": phase, "shard": i, "total": fold.sum.total,
                "count": fold.sum.count, "sq": sq, "changed": changed}
        store.put_if_absent(out_key, blob.encode(fold.sum.sums or {}, meta))
        del fold  # finalising below holds one shard at a time, not this one besides
    done = all(store.exists(keys.shard_sum(r, phase, k)) for k in range(len(plan["shards"])))
    if not done:
        return {"status": "folded", "round": r, "phase": phase, "shard": i}
    return finalise(ctx, cfg, m, phase)


def finalise(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, phase: int) -> dict:
    """Add the shards' distances up, apply the norm bound (another phase if it rejects), write the model."""
    store, r = ctx.store, m.round
    if store.exists(keys.result(r)):
        return {"status": "done-already", "round": r}
    ok, _ = protocol.claim(ctx, r, cfg.strategy.lease_s, key=keys.shard_claim(r, phase, "final"))
    if not ok:
        return {"status": "claimed", "round": r, "phase": phase}
    t0 = time.perf_counter()
    plan = protocol.read_json(store, keys.shard_plan(r, phase))
    heads = [header(store, keys.shard_sum(r, phase, k), trusted=True) for k in range(len(plan["shards"]))]
    sq: dict[str, float] = {}
    changed: dict[str, str] = {}
    for h in heads:
        for cid, v in (h.meta.get("sq") or {}).items():
            sq[cid] = sq.get(cid, 0.0) + float(v)
        changed.update(h.meta.get("changed") or {})
    extra = [{"client": c, "reason": why} for c, why in sorted(changed.items())]
    norms = {c: v ** 0.5 for c, v in sq.items() if c not in changed}
    for c, d in sorted(norms.items()):
        if not np.isfinite(d):
            extra.append({"client": c, "reason": "update holds NaN or Inf (or values too large to measure)"})
    finite = {c: d for c, d in norms.items() if np.isfinite(d)}
    if cfg.strategy.norm_multiple > 0 and len(finite) >= 3:
        median = float(np.median(list(finite.values())))
        limit = cfg.strategy.norm_multiple * median
        extra += [{"client": c, "reason": f"update norm {d:.4g} exceeds {cfg.strategy.norm_multiple:g}x the round "
                                          f"median {median:.4g} (strategy.norm_multiple)"}
                  for c, d in sorted(finite.items()) if d > limit]
    if extra:
        if phase >= MAX_PHASES:
            return _conclude(ctx, cfg, m, plan, heads, plan["rejected"] + extra, phase, t0, failed=True)
        bad = {x["client"] for x in extra}
        nxt = dict(plan, phase=phase + 1, order=[o for o in plan["order"] if o[0] not in bad],
                   rejected=plan["rejected"] + extra)
        store.put_if_absent(keys.shard_plan(r, phase + 1), rounds.dumps(nxt))
        for i in range(len(plan["shards"])):
            ctx.invoker.invoke(AGGREGATOR, {"store": store.url, "round": r, "shard": i, "phase": phase + 1}, None)
        return {"status": "sharding", "round": r, "phase": phase + 1, "rejected": sorted(bad)}
    return _conclude(ctx, cfg, m, plan, heads, plan["rejected"], phase, t0)


def _conclude(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, plan: dict, heads: list, rejected: list,
              phase: int, t0: float, failed: bool = False) -> dict:
    """Write the new model shard by shard (or keep the old one below quorum) and finish the round."""
    store, r = ctx.store, m.round
    included = [o[0] for o in plan["order"]]
    accepted = [(o[0], o[1]) for o in plan["order"]]
    total = float(heads[0].meta.get("total", 0.0)) if heads else 0.0
    status = rounds.DONE if len(included) >= m.quorum and not failed and total > 0 else rounds.FAILED
    nshards = len(plan["shards"])
    weight_map, sizes = {}, {}
    for k, names in enumerate(plan["shards"]):
        b = None
        if status == rounds.DONE:
            b = blob.decode(store.get_view(keys.shard_sum(r, phase, k)), trusted=True)
            inv = np.float32(1.0 / total)
            with np.errstate(over="ignore"):  # one new array per tensor: no temporary beside it
                tensors = {n: np.multiply(t, inv, dtype=np.float32) for n, t in b.tensors.items()}
        else:  # below quorum the model stays: its shards are written again under the new round
            tensors = load_model(store, m.model, names).tensors
        if not all(np.isfinite(t.sum(dtype=np.float64)) for t in tensors.values()):
            status = rounds.FAILED
            rejected = rejected + [{"client": "*", "reason": "the averaged model overflowed float32; the model stays"}]
            return _conclude(ctx, cfg, m, plan, heads, rejected, phase, t0, failed=True)
        key = keys.model_shard(r + 1, k, nshards)
        for n, t in tensors.items():
            weight_map[n] = key.rsplit("/", 1)[1]
            sizes[n] = int(t.nbytes)
        data = blob.encode(tensors, {"kind": "model", "round": r + 1, "shard": k, "parent": m.model})
        del tensors, b  # one shard's bytes at a time: the sums' map and the mean are gone before the write
        store.put(key, data)
        del data
    index = shardplan.index(weight_map, sizes, {"format": blob.FORMAT, "round": r + 1, "parent": m.model,
                                                "clients": len(included), "fingerprint": plan["fingerprint"],
                                                "strategy": cfg.strategy.name})
    out = protocol.result_record(ctx, cfg, m, strategies.from_config(cfg), status, included,
                                 int(sum(n for _, n in accepted)), rejected, plan["clients"], plan["failed"],
                                 plan["stragglers"], keys.model_index(r + 1), t0)
    if status != rounds.DONE:  # nothing of the planned clients reached the model a failed round keeps
        out.update(included=[], num_examples=0)
    out.update({"_model_bytes": None, "_state_bytes": None,
                "_index": json.dumps(index, indent=1, sort_keys=True).encode()})
    out["timings"].update({"shards": nshards, "phases": phase, "triggered_by": plan.get("triggered_by"),
                           "event_delivered_at": plan.get("event_delivered_at"),
                           "aggregation_started_at": plan.get("started_at"),
                           "claim_takeover_from": plan.get("claim_takeover_from")})
    return protocol.finish(ctx, cfg, m, out)


def describe(store: Store, key: str) -> dict[str, Any]:
    """Files and sizes of a model (for status and tests)."""
    parts = model_parts(store, key)
    return {"files": sorted(set(parts.values())), "tensors": len(parts)}
