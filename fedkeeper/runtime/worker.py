"""A local function worker: one process, like one warm container, running handlers for the tasks it is sent."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fedkeeper.interrupts import quiet_interrupts


# Libraries the environment may hold that no deployed function has (functions/*/requirements*.txt).
# Keras imports scikit-learn and pandas whenever it finds them (its scikit-learn wrapper, its DataFrame
# input), about 3 s of a local worker's cold start that its deployed twin never pays.
NOT_DEPLOYED = ("sklearn", "pandas", "matplotlib")


def hide_undeployed() -> None:
    """Make the libraries no deployed function has unimportable in this worker, as they are in the function."""
    for name in NOT_DEPLOYED:
        sys.modules.setdefault(name, None)  # None: `import name` raises ImportError, which Keras handles


def apply_environment(env: dict[str, str | None]) -> None:
    """Make this process's environment exactly `env` (a None value unsets its key).

    The runtime sends a worker its whole environment (local.worker_environment): a worker forked from the
    fork server would otherwise keep that server's environment, as it was when the server started, with
    store credentials a client function must not hold, and without variables set since.
    """
    for key in [k for k in os.environ if env.get(k) is None]:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if v is not None})


PROCESS_NAME_PREFIX = "fk-"  # ps, top and the benchmarks tell a worker's pool by this name


def name_process(name: str) -> bool:
    """Name this process `name` (Linux keeps 15 bytes) as ps and top show it; False where that is not possible.

    Workers forked from the fork server share its command line, so without a name of their own a client worker
    and a control worker look the same from outside.
    """
    try:
        with open("/proc/self/comm", "w") as fh:
            fh.write(name.encode()[:15].decode(errors="ignore"))
        return True
    except OSError:
        return False


class PipeInvoker:
    """Asks the runtime, over this worker's pipe, to start another function asynchronously."""

    def __init__(self, conn: Any, lock: threading.Lock | None = None) -> None:
        self.conn = conn
        self.lock = lock or threading.Lock()

    def send(self, msg: tuple) -> None:
        """Send one message; threads of one instance share the pipe, so sends are serialised."""
        with self.lock:
            self.conn.send(msg)

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> None:
        """Send the invoke request; the runtime queues it on the platform's pool."""
        self.send(("invoke", function, payload, platform))


def main(conn: Any, platform: str, env: dict[str, str], slots: int = 1) -> None:
    """Worker loop: receive ('task', id, function, payload), reply ('done', id, ok, reply, seconds).

    env is the worker's whole environment (local.worker_environment). With slots > 1 the instance serves
    that many invocations at once, each on its own thread, as a platform with per-instance concurrency
    does; the runtime never sends more than `slots` at a time.
    """
    quiet_interrupts()
    name_process(PROCESS_NAME_PREFIX + platform)
    hide_undeployed()
    apply_environment(env)
    from fedkeeper.functions import registry
    from fedkeeper.functions.context import Context, HandlerError
    from fedkeeper.store import open_store

    stores: dict[str, Any] = {}
    stores_lock = threading.Lock()
    invoker = PipeInvoker(conn)

    def store_for(url: str) -> Any:
        with stores_lock:
            if url not in stores:
                stores[url] = open_store(url)
            return stores[url]

    def run(task_id: str, function: str, payload: dict, cold: bool) -> None:
        t0 = time.perf_counter()
        try:
            entry = registry.resolve(function, payload.get("entry"))
            ctx = Context(store=store_for(payload["store"]), invoker=invoker, invocation_id=task_id,
                          platform=platform, cold=cold)
            reply = entry(payload, ctx)
            invoker.send(("done", task_id, True, reply, time.perf_counter() - t0))
        except HandlerError as exc:
            invoker.send(("done", task_id, False, {"error": str(exc), "status": exc.status}, time.perf_counter() - t0))
        except Exception as exc:  # reported to the runtime as data; the worker stays warm
            invoker.send(("done", task_id, False, {"error": f"{type(exc).__name__}: {exc}",
                                                   "traceback": traceback.format_exc(limit=8)},
                          time.perf_counter() - t0))

    pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="invocation") if slots > 1 else None
    first = True
    invoker.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            return
        _, task_id, function, payload = msg
        if first and os.environ.get("FEDKEEPER_EMULATE_COLD_START_S"):
            # An emulated slow platform: a new container takes this much longer before its handler runs.
            time.sleep(float(os.environ["FEDKEEPER_EMULATE_COLD_START_S"]))
        if pool is None:
            run(task_id, function, payload, first)
        else:
            pool.submit(run, task_id, function, payload, first)
        first = False
