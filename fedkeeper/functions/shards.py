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

With tree mode as well, nothing waits for the whole round: as soon as one of the manifest's fixed groups
settles, its updates are validated from their headers into a create-only group plan and M invocations each
fold one shard of that group. The fold that completes shard i across all groups merges the groups' sums of
shard i along the tree (the same float additions, in the same order, as tree mode's partial sums) into the
shard sum the plain path writes; the merge that completes the last shard joins the group plans into the
round's plan and finalises as above. A second phase, if the norm bound rejected anyone, is the plain one.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import numpy as np

from fedkeeper.core import blob, faults, keys, rounds, validate
from fedkeeper.core import shards as shardplan
from fedkeeper.core import strategy as strategies
from fedkeeper.core.aggregate import RunningSum
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
        if "group" in event:
            return fold_group_shard(ctx, cfg, m, _group_of_event(m, event, phase), i)
        return fold_shard(ctx, cfg, m, phase, i)
    store, r = ctx.store, m.round
    if m.fan_in and not store.exists(keys.shard_plan(r, 1)):
        # Tree mode: groups are planned and folded as they settle; the round-wide plan of phase 1 is written
        # only once every shard's group sums are merged. From then on (a second phase) the round is plain.
        return tree_round(ctx, cfg, m, client, event, received)
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
    stragglers = [c for c in m.ids if c not in s.delivered and c not in s.failed]
    return _plan_updates(ctx, cfg, m, sorted(s.delivered), s.failed, stragglers, event, received, holder)


def _plan_updates(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, delivered: list[str], failed: dict,
                  stragglers: list[str], event: dict, received: float, holder: str) -> dict:
    """A plan over these delivered updates (each validated from its header) and the shards of the tensors."""
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
    for cid in sorted(delivered):
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
    failures = [{"client": c, "reason": str(failed[c].get("reason", "invocation failed"))[:2000]}
                for c in m.ids if c not in delivered and c in failed]
    return {"phase": 1, "order": order, "rejected": rejected, "clients": clients, "failed": failures,
            "stragglers": list(stragglers), "shards": shardplan.plan(sizes, m.shards), "sizes": sizes,
            "fingerprint": fp, "global": parts, "started_at": ctx.now(),
            "triggered_by": "tick" if "key" not in event else "event",
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
        fold, sq, changed = _fold_slices(store, cfg, m, plan["order"], plan["shards"][i])
        meta = {"kind": "shard_sum", "round": r, "phase": phase, "shard": i, "total": fold.sum.total,
                "count": fold.sum.count, "sq": sq, "changed": changed}
        store.put_if_absent(out_key, blob.encode(fold.sum.sums or {}, meta))
        del fold  # finalising below holds one shard at a time, not this one besides
    done = all(store.exists(keys.shard_sum(r, phase, k)) for k in range(len(plan["shards"])))
    if not done:
        return {"status": "folded", "round": r, "phase": phase, "shard": i}
    return finalise(ctx, cfg, m, phase)


def _fold_slices(store: Store, cfg: FederationConfig, m: rounds.Manifest, order: list, names: list[str]
                 ) -> tuple[strategies.SumFold, dict[str, float], dict[str, str]]:
    """Fold these tensors of the planned updates, in plan order, from ranged reads: (sums, squared distances,
    clients whose update changed since it was planned)."""
    r = m.round
    norm_on = cfg.strategy.norm_multiple > 0
    glob = load_model(store, m.model, names).tensors if norm_on and order else None
    fold = strategies.SumFold(np.float32)
    sq: dict[str, float] = {}
    changed: dict[str, str] = {}
    for cid, n, digest in order:
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
    return fold, sq, changed


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
    if m.fan_in:
        out["timings"].update(groups=len(m.groups), tree_levels=m.levels())
    out["timings"].update({"shards": nshards, "phases": phase, "triggered_by": plan.get("triggered_by"),
                           "event_delivered_at": plan.get("event_delivered_at"),
                           "aggregation_started_at": plan.get("started_at"),
                           "claim_takeover_from": plan.get("claim_takeover_from")})
    return protocol.finish(ctx, cfg, m, out)


# -- tree mode with shards ------------------------------------------------------------------------------
def _group_of_event(m: rounds.Manifest, event: dict, phase: int) -> int:
    """The group a shard event names, checked against the round's tree."""
    g = event.get("group")
    if not m.fan_in:
        raise HandlerError(f"round {m.round} is not folded as a tree, so a shard event cannot name a 'group'; "
                           "drop 'group' from the event")
    if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < len(m.groups):
        raise HandlerError(f"'group' must be an integer in 0..{len(m.groups) - 1} for round {m.round}, got {g!r}")
    if phase != 1:
        raise HandlerError(f"group folds belong to phase 1 of round {m.round}; later phases fold the kept updates "
                           "without groups, so drop 'group' or set 'phase': 1")
    return g


def _nshards(store: Store, r: int) -> int | None:
    """How many shards group 0's plan split the tensors into (every group's plan agrees), or None before it."""
    plan = protocol.read_json(store, keys.shard_group_plan(r, 0))
    return len(plan["shards"]) if isinstance(plan, dict) and isinstance(plan.get("shards"), list) else None


def tree_round(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, client: str | None, event: dict,
               received: float) -> dict:
    """Tree mode with shards: plan the event's group as soon as it settles (its M shard folds start at once);
    a poke (tick, failure, deadline) plans every settled group, then claims the round and invokes again the
    group folds and merges that are missing, as a takeover of a plain sharded round does."""
    store, r = ctx.store, m.round
    overdue = received >= m.deadline
    if client is not None and client in m.ids:
        g = m.group_of(client)
        return {"status": plan_group(ctx, cfg, m, g, overdue, event, received), "round": r, "group": g}
    ngroups = len(m.groups)
    fresh = set()
    for g in range(ngroups):
        if plan_group(ctx, cfg, m, g, overdue, event, received) == "planned":
            fresh.add(g)  # its planner has just invoked its shard folds
    unplanned = [g for g in range(ngroups) if not store.exists(keys.shard_group_plan(r, g))]
    if unplanned:
        return {"status": "waiting", "round": r, "groups": unplanned}
    # The round claim's lease paces these re-invocations: the tick pokes again only once it has expired.
    ok, holder = protocol.claim(ctx, r, cfg.strategy.lease_s)
    if not ok:
        return {"status": "claimed", "round": r, "by": holder}
    protocol.write_state(store, r, rounds.AGGREGATING)
    nshards = _nshards(store, r) or 0
    reinvoked = []
    for i in range(nshards):
        if store.exists(keys.shard_sum(r, 1, i)):
            continue
        lacking = [g for g in range(ngroups) if not store.exists(keys.shard_group_sum(r, g, i))]
        # With every group folded, a fold event finds its partial written and goes on to the merge.
        for g in [x for x in lacking if x not in fresh] if lacking else [0]:
            ctx.invoker.invoke(AGGREGATOR, {"store": store.url, "round": r, "shard": i, "phase": 1, "group": g}, None)
            reinvoked.append([g, i])
    if all(store.exists(keys.shard_sum(r, 1, i)) for i in range(nshards)):
        return conclude_tree(ctx, cfg, m)
    return {"status": "sharding", "round": r, "phase": 1, "reinvoked": reinvoked, "takeover_from": holder or None}


def plan_group(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, g: int, overdue: bool, event: dict,
               received: float) -> str:
    """Once group g settled (or the deadline passed), validate its updates from their headers into a create-only
    plan and invoke its M shard folds; 'exists', 'waiting', 'claimed' or 'planned'."""
    store, r = ctx.store, m.round
    key = keys.shard_group_plan(r, g)
    if store.exists(key):
        return "exists"
    delivered, failed, open_ = protocol._group_settled(store, m, m.groups[g])
    if open_ and not overdue:
        return "waiting"
    ok, holder = protocol.claim(ctx, r, cfg.strategy.lease_s, key=keys.shard_group_claim(r, g, "plan"))
    if not ok:
        return "claimed"
    plan = _plan_updates(ctx, cfg, m, delivered, failed, open_, event, received, holder)
    plan["group"] = g
    store.put_if_absent(key, rounds.dumps(plan))
    plan = protocol.read_json(store, key)  # whoever wrote first, its plan is the one folded
    for i in range(len(plan["shards"])):
        ctx.invoker.invoke(AGGREGATOR, {"store": store.url, "round": r, "shard": i, "phase": 1, "group": g}, None)
    return "planned"


def fold_group_shard(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, g: int, i: int) -> dict:
    """Fold shard i of group g's planned updates (byte ranges only) into a create-only group shard sum; the fold
    that completes shard i across all groups merges them, and the merge that completes the last shard finalises."""
    store, r = ctx.store, m.round
    plan = protocol.read_json(store, keys.shard_group_plan(r, g))
    if not isinstance(plan, dict):
        return {"status": "ignored", "round": r, "group": g, "reason": "this group has no plan yet"}
    if i >= len(plan["shards"]):
        return {"status": "ignored", "round": r, "group": g, "reason": f"the plan has {len(plan['shards'])} shards"}
    out_key = keys.shard_group_sum(r, g, i)
    if not store.exists(out_key):
        ok, holder = protocol.claim(ctx, r, cfg.strategy.lease_s, key=keys.shard_group_claim(r, g, i))
        if not ok:
            return {"status": "claimed", "round": r, "group": g, "shard": i}
        faults.maybe_crash("shard_group_after_claim", first=not holder)
        fold, sq, changed = _fold_slices(store, cfg, m, plan["order"], plan["shards"][i])
        meta = {"kind": "shard_group_sum", "round": r, "group": g, "shard": i, "total": fold.sum.total,
                "count": fold.sum.count, "sq": sq, "changed": changed}
        store.put_if_absent(out_key, blob.encode(fold.sum.sums or {}, meta))
        del fold  # the merge below reads the groups' sums one at a time, not beside this one
    return merge_shard(ctx, cfg, m, i, len(plan["shards"]))


def merge_shard(ctx: Context, cfg: FederationConfig, m: rounds.Manifest, i: int, nshards: int) -> dict:
    """Once every group's sum of shard i exists, merge them along the tree into shard i's phase-1 sum."""
    store, r = ctx.store, m.round
    out_key = keys.shard_sum(r, 1, i)
    if not store.exists(out_key):
        if not all(store.exists(keys.shard_group_sum(r, g, i)) for g in range(len(m.groups))):
            return {"status": "folded", "round": r, "shard": i}
        # The same claim a plain phase-1 fold of shard i takes: whichever way, one writer of this sum.
        ok, _ = protocol.claim(ctx, r, cfg.strategy.lease_s, key=keys.shard_claim(r, 1, i))
        if not ok:
            return {"status": "claimed", "round": r, "shard": i}
        acc, sq, changed = merge_groups(store, m, i)
        meta = {"kind": "shard_sum", "round": r, "phase": 1, "shard": i, "total": acc.total, "count": acc.count,
                "sq": sq, "changed": changed, "groups": len(m.groups)}
        store.put_if_absent(out_key, blob.encode(acc.sums or {}, meta))
        del acc
    if not all(store.exists(keys.shard_sum(r, 1, k)) for k in range(nshards)):
        return {"status": "merged", "round": r, "shard": i}
    return conclude_tree(ctx, cfg, m)


def merge_groups(store: Store, m: rounds.Manifest, i: int) -> tuple[RunningSum, dict[str, float], dict[str, str]]:
    """Shard i's group sums added up level by level, as tree mode merges its partials (the same float additions in
    the same order), one tensor at a time: beside the result it holds one tensor per level and one read."""
    r, fan_in, levels = m.round, m.fan_in, m.levels()
    keyed = [keys.shard_group_sum(r, g, i) for g in range(levels[0])]
    heads = [header(store, k, trusted=True) for k in keyed]
    sq: dict[str, float] = {}
    changed: dict[str, str] = {}
    for h in heads:
        sq.update(h.meta.get("sq") or {})
        changed.update(h.meta.get("changed") or {})

    Leaf = Callable[[int], Any]  # a level-1 group's value: a tensor or a count, None if the group folded nothing

    def node(level: int, g: int, leaf: Leaf) -> tuple[Any, bool]:
        """(value, owned) of group g at a level; leaf(g) gives a level-1 group's value, None if it folded nothing."""
        if level == 1:
            return leaf(g), False
        acc = None
        for c in range(g * fan_in, min(levels[level - 2], (g + 1) * fan_in)):
            part, owned = node(level - 1, c, leaf)
            if part is None:  # a group with nothing folded adds nothing, as RunningSum.merge skips it
                continue
            if acc is None:  # a sum of the level below is taken over; a read one is copied before it is added to
                acc = part if owned else part.copy()
            else:
                acc += part
            del part
        return acc, True

    def root(leaf: Leaf) -> Any:
        return node(len(levels), 0, leaf)[0]

    # The same order for the example counts, so the total is the float tree mode computes.
    nonempty = [bool(h.entries) for h in heads]
    out = RunningSum(np.float32)
    out.total = float(root(lambda g: np.float64(heads[g].meta.get("total", 0.0)) if nonempty[g] else None) or 0.0)
    out.count = int(root(lambda g: np.int64(heads[g].meta.get("count", 0)) if nonempty[g] else None) or 0)
    names = sorted(next((h.entries for h in heads if h.entries), {}))
    for name in names:
        out.sums[name] = root(lambda g: read_tensors(store, keyed[g], heads[g], [name])[name] if nonempty[g] else None)
    return out, sq, changed


def conclude_tree(ctx: Context, cfg: FederationConfig, m: rounds.Manifest) -> dict:
    """Join the group plans into the round's phase-1 plan (create-only), then finalise as a plain sharded round."""
    store, r = ctx.store, m.round
    if store.exists(keys.result(r)):
        return {"status": "done-already", "round": r}
    if not store.exists(keys.shard_plan(r, 1)):
        plans = [protocol.read_json(store, keys.shard_group_plan(r, g)) for g in range(len(m.groups))]
        if not all(isinstance(p, dict) for p in plans):
            return {"status": "waiting", "round": r}
        last = max(plans, key=lambda p: p.get("started_at") or 0.0)  # the group that settled last started the end
        joined = dict(plans[0], order=[o for p in plans for o in p["order"]],
                      rejected=[x for p in plans for x in p["rejected"]],
                      clients={c: v for p in plans for c, v in p["clients"].items()},
                      failed=[x for p in plans for x in p["failed"]],
                      stragglers=[c for p in plans for c in p["stragglers"]],
                      started_at=last.get("started_at"), triggered_by=last.get("triggered_by"),
                      event_delivered_at=last.get("event_delivered_at"),
                      claim_takeover_from=last.get("claim_takeover_from"), groups=len(plans))
        joined.pop("group", None)
        store.put_if_absent(keys.shard_plan(r, 1), rounds.dumps(joined))
    # Eager folds may finish a round no poke ever claimed: the state passes through aggregating, as it must.
    protocol.write_state(store, r, rounds.AGGREGATING)
    return finalise(ctx, cfg, m, 1)


def describe(store: Store, key: str) -> dict[str, Any]:
    """Files and sizes of a model (for status and tests)."""
    parts = model_parts(store, key)
    return {"files": sorted(set(parts.values())), "tensors": len(parts)}
