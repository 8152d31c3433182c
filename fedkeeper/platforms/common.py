"""The one helper every platform adapter shares: build the context once, call a handler, map errors to a status."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Mapping

from fedkeeper.functions import registry
from fedkeeper.store.base import InvalidKey, StoreError
from fedkeeper.functions.context import AGGREGATOR, CLIENT, TRIGGER, Context, HandlerError

log = logging.getLogger("fedkeeper.platforms")

FUNCTIONS = (TRIGGER, CLIENT, AGGREGATOR)
MSG_NO_STORE = ("this function has no store configured: set its FEDKEEPER_STORE environment variable "
                "(e.g. s3://bucket/prefix); a request cannot choose the store")
MSG_OTHER_STORE = ("this function serves the store {mine}; a request cannot name another store ({theirs}): "
                   "drop 'store' from the request or call the function deployed for that store")
MAX_BODY = 1 << 20  # events and API requests are small JSON; anything larger is refused unread

_STORES: dict[str, Any] = {}
_INVOKERS: dict[str, Any] = {}
_LOCK = threading.Lock()
_COLD = {"first": True}


def store_url(event: Mapping | None) -> str:
    """The function's own store (FEDKEEPER_STORE); an event may repeat it but never name another."""
    mine = os.environ.get("FEDKEEPER_STORE", "")
    if not mine:
        raise HandlerError(MSG_NO_STORE, 503)
    theirs = event.get("store") if isinstance(event, Mapping) else None
    if theirs is not None and theirs != mine:
        raise HandlerError(MSG_OTHER_STORE.format(mine=mine, theirs=str(theirs)[:200]), 400)
    return mine


def context(event: Mapping | None, platform: str = "") -> Context:
    """A Context whose store and invoker are created once per process and reused by warm invocations."""
    from fedkeeper.store import open_store

    url = store_url(event)
    with _LOCK:
        store = _STORES.get(url)
        if store is None:
            store = _STORES[url] = open_store(url)
        invoker = _INVOKERS.get(url)
        if invoker is None:
            from fedkeeper.platforms.invokers import router_for
            from fedkeeper.store import NotFound

            try:
                invoker = _INVOKERS[url] = router_for(store)
            except NotFound:
                raise HandlerError(f"{url} holds no federation (no federation.json): run `fedkeeper setup` "
                                   "with this store first", 404) from None
        cold, _COLD["first"] = _COLD["first"], False
    return Context(store=store, invoker=invoker, platform=platform or os.environ.get("FEDKEEPER_PLATFORM", ""), cold=cold)


def call(function: str, event: Mapping | None, platform: str = "", entry: str = "handle") -> tuple[int, dict]:
    """Run a handler on a dict event; returns (HTTP-like status, JSON-ready body). Never raises."""
    if function not in FUNCTIONS:
        return 404, {"error": f"unknown function {function!r}; use one of {', '.join(FUNCTIONS)}"}
    if not isinstance(event, Mapping):
        return 400, {"error": "the event must be a JSON object"}
    t0 = time.perf_counter()
    try:
        handler = registry.resolve(function, entry)
        ctx = context(event, platform)
        body = handler(dict(event, store=ctx.store.url), ctx)
        status = 409 if isinstance(body, dict) and body.get("status") == "busy" else 200
        return status, body
    except HandlerError as exc:
        return exc.status, {"error": str(exc)}
    except InvalidKey as exc:  # a key in the event that is not a store key (e.g. ../x): the caller's to fix
        return 400, {"error": str(exc)}
    except StoreError as exc:  # the store, not the request, is at fault: say so, and let the platform retry
        return 503, {"error": f"the store is unavailable: {exc}"}
    except Exception as exc:  # reported as an error value; the platform sees a failed invocation
        log.exception("%s failed", function)
        return 500, {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}


def parse_json(body: bytes | str | None) -> dict:
    """A JSON object from a request body (bounded size and nesting); raises HandlerError(400) naming the problem."""
    from fedkeeper.core import validate

    if body in (None, b"", ""):
        return {}
    if len(body) > MAX_BODY:
        raise HandlerError(f"request body is {len(body)} bytes, over the {MAX_BODY}-byte limit; send a small JSON object", 413)
    try:
        value = validate.loads(body, max_bytes=MAX_BODY, what="request body")
    except validate.InputError as exc:
        raise HandlerError(f"{exc}; send a small JSON object", 400) from None
    if not isinstance(value, dict):
        raise HandlerError("request body must be a JSON object", 400)
    return value


def store_events(payload: Mapping, headers: Mapping | None = None) -> list[dict]:
    """Aggregator events for the update keys a store notification reports."""
    from fedkeeper.store import events

    url = store_url(payload)
    try:
        found = events.update_keys(events.translate(payload, url, headers=headers))
    except events.EventError as exc:
        raise HandlerError(str(exc), 400) from None
    now = time.time()
    return [{"store": url, "key": k, "delivered_at": now} for k in found]


def run_events(evts: list[dict], platform: str = "") -> tuple[int, dict]:
    """Run the aggregator for each translated store event; 200 with every result, or the first error status."""
    results, status = [], 200
    for ev in evts:
        code, body = call(AGGREGATOR, ev, platform)
        results.append(body)
        if code >= 500:
            status = code
    return status, {"events": len(evts), "results": results}


def wsgi_call(app: Any, method: str, path: str, headers: Mapping | None = None, body: bytes = b"",
              query: str = "") -> tuple[int, dict, bytes]:
    """Run one request through a WSGI app from platform fields (OpenWhisk web actions, OpenFaaS)."""
    from werkzeug.test import EnvironBuilder

    env = EnvironBuilder(method=method.upper(), path=path or "/", query_string=query or "",
                         headers=dict(headers or {}), data=body).get_environ()
    captured: dict = {}

    def start_response(status: str, hdrs: list, exc_info=None):
        captured["status"], captured["headers"] = int(status.split()[0]), dict(hdrs)

    out = b"".join(app(env, start_response))
    return captured["status"], captured["headers"], out
