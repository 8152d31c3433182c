"""A local function worker: one process, like one warm container, running handlers for the tasks it is sent."""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

from fedkeeper.interrupts import quiet_interrupts


class PipeInvoker:
    """Asks the runtime, over this worker's pipe, to start another function asynchronously."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> None:
        """Send the invoke request; the runtime queues it on the platform's pool."""
        self.conn.send(("invoke", function, payload, platform))


def main(conn: Any, platform: str, env: dict[str, str]) -> None:
    """Worker loop: receive ('task', id, function, payload), reply ('done', id, ok, reply, seconds)."""
    quiet_interrupts()
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)  # e.g. store credentials withheld from client functions
        else:
            os.environ[k] = v
    from fedkeeper.functions import registry
    from fedkeeper.functions.context import Context, HandlerError
    from fedkeeper.store import open_store

    stores: dict[str, Any] = {}
    invoker = PipeInvoker(conn)
    first = True
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        _, task_id, function, payload = msg
        if first and os.environ.get("FEDKEEPER_EMULATE_COLD_START_S"):
            # An emulated slow platform: a new container takes this much longer before its handler runs.
            time.sleep(float(os.environ["FEDKEEPER_EMULATE_COLD_START_S"]))
        t0 = time.perf_counter()
        try:
            url = payload["store"]
            if url not in stores:
                stores[url] = open_store(url)
            entry = registry.resolve(function, payload.get("entry"))
            ctx = Context(store=stores[url], invoker=invoker, invocation_id=task_id, platform=platform, cold=first)
            reply = entry(payload, ctx)
            conn.send(("done", task_id, True, reply, time.perf_counter() - t0))
        except HandlerError as exc:
            conn.send(("done", task_id, False, {"error": str(exc), "status": exc.status}, time.perf_counter() - t0))
        except Exception as exc:  # reported to the runtime as data; the worker stays warm
            conn.send(("done", task_id, False, {"error": f"{type(exc).__name__}: {exc}",
                                                "traceback": traceback.format_exc(limit=8)}, time.perf_counter() - t0))
        first = False
