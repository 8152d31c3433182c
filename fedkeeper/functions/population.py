"""The client population in the store: the current members (clients join and leave between rounds) and their history."""

from __future__ import annotations

import re
import time
from typing import Any

from fedkeeper.core import history, keys, rounds, validate
from fedkeeper.core.config import FederationConfig
from fedkeeper.functions.context import Context, HandlerError
from fedkeeper.store import NotFound, Store

MAX_MEMBERS = 1_000_000
MAX_CHANGES = 200          # the members record keeps this many recent joins and leaves, for people to read
CAS_ATTEMPTS = 20
_DATA_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,499}\.npz$")
MSG_DATA = ("data must be a store key ending in .npz (e.g. data/{id}.npz, no '..') or an http(s) URL of the "
            "owner's .npz, got {got!r}")


def _read(store: Store, key: str) -> tuple[Any, str | None]:
    """(parsed JSON or None, version or None) of a record written by the protocol."""
    try:
        raw, version = store.get_versioned(key)
    except NotFound:
        return None, None
    try:
        return validate.loads(raw, max_bytes=256 << 20, what=key, lenient=True), version
    except validate.InputError:
        return None, version


def config(ctx: Context) -> FederationConfig:
    """The federation's config; a store without one is a 404 for the caller, not a crash."""
    try:
        return ctx.config()
    except NotFound:
        raise HandlerError(f"{ctx.store.url} holds no federation (no federation.json); run `fedkeeper setup` "
                           "first", 404) from None


# -- members -------------------------------------------------------------------------------------------
def _config_members(cfg: FederationConfig) -> list[dict]:
    return [{"id": c.id, "platform": c.platform, "data": c.data} for c in cfg.clients]


def _clean(entries: Any, platforms: set[str]) -> list[dict] | None:
    """The members list from a stored record, or None if it is not one (then the config's list holds)."""
    if not isinstance(entries, list):
        return None
    out, seen = [], set()
    for e in entries[:MAX_MEMBERS]:
        if not isinstance(e, dict):
            continue
        cid, plat, data = e.get("id"), e.get("platform"), e.get("data", "")
        if not isinstance(cid, str) or not validate.CLIENT_ID.match(cid) or cid in seen:
            continue
        if not isinstance(plat, str) or plat not in platforms or not isinstance(data, str):
            continue
        seen.add(cid)
        out.append({"id": cid, "platform": plat, "data": data})
    return out


def members(store: Store, cfg: FederationConfig) -> list[dict]:
    """The federation's current clients [{id, platform, data}]: the stored list, or the config's initial one."""
    raw, _ = _read(store, keys.MEMBERS)
    found = _clean(raw.get("clients") if isinstance(raw, dict) else None, {p.name for p in cfg.platforms})
    return _config_members(cfg) if found is None else found


def population(store: Store, cfg: FederationConfig) -> list[dict]:
    """The members as the strategy sees them: every client with a data reference."""
    return [{"id": c["id"], "platform": c["platform"], "data": c["data"] or keys.client_data(c["id"])}
            for c in members(store, cfg)]


def check_data(cid: str, data: Any) -> str:
    """A client's data reference, validated (raises HandlerError 400)."""
    if data is None or data == "":
        return ""
    if not isinstance(data, str) or len(data) > 2000 or any(ch.isspace() or ord(ch) < 32 for ch in data):
        raise HandlerError(MSG_DATA.format(id=cid, got=str(data)[:100]), 400)
    if data.startswith(("http://", "https://")):
        return data
    if not _DATA_KEY.match(data) or ".." in data.split("/") or "//" in data:
        raise HandlerError(MSG_DATA.format(id=cid, got=data[:100]), 400)
    return data


def _change(ctx: Context, cfg: FederationConfig, apply) -> dict:
    """Read, change and write the members record with compare-and-swap, so concurrent changes are never lost."""
    store = ctx.store
    for _ in range(CAS_ATTEMPTS):
        raw, version = _read(store, keys.MEMBERS)
        rec = raw if isinstance(raw, dict) else {}
        current = _clean(rec.get("clients"), {p.name for p in cfg.platforms})
        clients = _config_members(cfg) if current is None else current
        changes = rec.get("changes") if isinstance(rec.get("changes"), list) else []
        out = apply(clients, changes)
        new = {"clients": clients, "changes": changes[-MAX_CHANGES:], "updated": ctx.now(),
               "version": (rec.get("version") if isinstance(rec.get("version"), int) else 0) + 1}
        data = rounds.dumps(new)
        ok = store.put_if_absent(keys.MEMBERS, data) if version is None else store.put_if_match(keys.MEMBERS, data, version)
        if ok:
            return out
    raise HandlerError("the client list changed under this request too often; try again", 409)


def _effective(store: Store) -> int:
    """The round a change made now first applies to (0-based): the next one to open."""
    from fedkeeper.functions import protocol

    m = protocol.open_round(store)
    return m.round + 1 if m is not None else protocol.read_state(store).next_round


def add_client(ctx: Context, cid: Any, platform: Any, data: Any = "") -> dict:
    """Add a client from the next round on; 400 for bad input, 409 if the id is taken."""
    cfg = config(ctx)
    if not isinstance(cid, str) or not validate.CLIENT_ID.match(cid):
        raise HandlerError(f"client id must be 1-64 letters, digits, '-', '_' or '.' (starting with a letter or "
                           f"digit), got {str(cid)[:100]!r}", 400)
    names = [p.name for p in cfg.platforms]
    if not isinstance(platform, str) or platform not in names:
        raise HandlerError(f"unknown platform {str(platform)[:100]!r}; use one of: {', '.join(names)}", 400)
    data = check_data(cid, data)
    if not data and not ctx.store.exists(keys.client_data(cid)):
        raise HandlerError(f"client {cid} has no data: {keys.client_data(cid)} is not in the store; give its data "
                           "as a store key or an http(s) URL", 400)
    effective = _effective(ctx.store)

    def apply(clients: list[dict], changes: list) -> dict:
        if any(c["id"] == cid for c in clients):
            raise HandlerError(f"client {cid} is already a member; remove it first to change it", 409)
        if len(clients) >= MAX_MEMBERS:
            raise HandlerError(f"the federation already has {MAX_MEMBERS} clients", 409)
        clients.append({"id": cid, "platform": platform, "data": data})
        changes.append({"op": "add", "client": cid, "platform": platform, "at": ctx.now(), "round_index": effective})
        return {"status": "added", "client": cid, "platform": platform, "data": data or keys.client_data(cid),
                "from_round": effective + 1, "members": len(clients)}

    return _change(ctx, cfg, apply)


def remove_client(ctx: Context, cid: Any) -> dict:
    """Remove a client from the next round on (a round already running keeps it); 404 if it is not a member."""
    cfg = config(ctx)
    if not isinstance(cid, str) or not validate.CLIENT_ID.match(cid):
        raise HandlerError(f"client id must be 1-64 letters, digits, '-', '_' or '.', got {str(cid)[:100]!r}", 400)
    effective = _effective(ctx.store)

    def apply(clients: list[dict], changes: list) -> dict:
        keep = [c for c in clients if c["id"] != cid]
        if len(keep) == len(clients):
            raise HandlerError(f"client {cid} is not a member of this federation", 404)
        if not keep:
            raise HandlerError(f"client {cid} is the last member; a federation needs at least one client", 409)
        clients[:] = keep
        changes.append({"op": "remove", "client": cid, "at": ctx.now(), "round_index": effective})
        return {"status": "removed", "client": cid, "from_round": effective + 1, "members": len(keep)}

    return _change(ctx, cfg, apply)


# -- history -------------------------------------------------------------------------------------------
def read_history(store: Store) -> dict:
    """The per-client history (empty if none was written yet)."""
    raw, _ = _read(store, keys.HISTORY)
    return history.parse(raw)


def record_round(store: Store, cfg: FederationConfig, manifest: rounds.Manifest, result: dict,
                 hist: dict | None = None) -> dict:
    """Fold round r's result into the history: one read and one write per round, whatever the client count."""
    hist = hist if hist is not None else read_history(store)
    if manifest.round <= hist["round"]:
        return hist
    from fedkeeper.functions import protocol

    platforms = {c["id"]: c.get("platform", "") for c in manifest.clients}
    history.fold(hist, result, platforms, cfg.selection.history_window, protocol.known_examples(store))
    hist["updated"] = time.time()
    store.put(keys.HISTORY, rounds.dumps(hist))
    return hist


def catch_up(store: Store, cfg: FederationConfig, r: int) -> dict:
    """The history as of round r's start; folds round r-1 if its aggregator ended before recording it."""
    hist = read_history(store)
    prev = r - 1
    if prev > hist["round"] and prev >= 0:
        from fedkeeper.functions import protocol

        res = protocol.read_json(store, keys.result(prev))
        m = protocol.read_manifest(store, prev)
        if isinstance(res, dict) and m is not None:
            hist = record_round(store, cfg, m, res, hist)
    return hist
