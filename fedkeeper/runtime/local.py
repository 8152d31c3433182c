"""Local FaaS emulation: warm worker pools per platform, async invoke, store events, timeouts, memory caps, timers.

It emulates a platform and holds no rule of the round protocol: failures are reported to the aggregator
as a platform's on-failure destination would, and its timer calls the same tick entry as a deployed cron.
"""

from __future__ import annotations

import atexit
import collections
import multiprocessing as mp
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable

from fedkeeper.core import keys
from fedkeeper.core.config import FederationConfig
from fedkeeper.interrupts import interrupts_held, start_quietly
from fedkeeper.store import Store
from fedkeeper.store.local import EventReader

CONTROL = "control"
MEMORY_SAMPLE_S = 0.1
MAX_MESSAGES_PER_TURN = 10000  # bounds one worker's share of a turn of the loop


def _ready(conn: Any) -> bool:
    """True if the worker's pipe holds another message now (a closed pipe counts: recv reports it)."""
    try:
        return conn.poll(0)
    except (EOFError, OSError):
        return True
EVENT_SUFFIX = ".safetensors"  # as in platforms/deploy.py's S3 notification rules
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
PRELOAD_MODULE = "fedkeeper.runtime.preload"
PRELOAD_READY_ENV = "FEDKEEPER_PRELOAD_READY"  # where the fork server marks that its imports are done
PRELOAD_WAIT_S = 120.0  # new workers wait this long for the fork server at most, then fork anyway
CONTROL_MEMORY_MB = 1024  # a control worker's limit; its resident set counts the pages it shares with the fork server
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0", "FEDKEEPER_TF_THREADS": "1",
              "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@dataclass
class FaultPlan:
    """Faults the runtime injects for chaos runs; all off by default."""

    kill_client: float = 0.0          # probability that a client worker is killed mid-training
    fail_client: float = 0.0          # probability that a client invocation fails at once (the worker stays warm)
    drop_event: float = 0.0           # probability that a store event is never delivered
    duplicate_event: float = 0.0      # probability that an event is delivered twice
    reorder_events: bool = False      # shuffle each batch of events
    aggregators_per_event: int = 1    # invocations fired for every delivered event
    seed: int = 0
    injected: dict = field(default_factory=lambda: collections.Counter())


@dataclass
class Invocation:
    """One asynchronous function call and what became of it."""

    id: str
    function: str
    payload: dict
    pool: str
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    ok: bool | None = None
    reply: Any = None
    cold: bool = False
    attempt: int = 1


def worker_environment(overrides: dict[str, str | None]) -> dict[str, str]:
    """The whole environment of a new worker: this process's, as it is now, with the pool's overrides (None: unset).

    Sent whole because a forked worker's own environment is its fork server's, as it was when that started.
    """
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# Whether a local platform's workers fork from the preloaded server unless its options say. Forked workers
# start without an import and share the server's pages; their fits were as fast as fresh workers' for both
# models (CNN rounds alternated with and without: 73.0 and 66.9 s against 68.0 and 68.4 s, with
# bench/time_to_accuracy.py --preload / --no-preload).
PRELOAD_DEFAULT = True


def preloads(options: dict) -> bool:
    """Whether a platform's workers fork from the preloaded server: options.preload, else PRELOAD_DEFAULT."""
    return bool(options.get("preload", PRELOAD_DEFAULT))


class PreloadServer:
    """The fork server that preloading workers are forked from: one per process, started once, ready once imported.

    multiprocessing starts the server itself at the first fork if nothing started it before, but then the
    caller waits in Process.start until the server has imported TensorFlow (4-5 s), and the runtime's loop
    with it. Started here, the import runs in the background, and the runtime holds new workers back until
    the server says it is ready (the marker file), so the loop keeps serving the other functions meanwhile.
    """

    def __init__(self) -> None:
        self.marker: str | None = None
        self.started_at = 0.0
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        """True where processes can be forked from a server (POSIX)."""
        return "forkserver" in mp.get_all_start_methods()

    def context(self) -> Any:
        """The multiprocessing context whose processes fork from this server."""
        ctx = mp.get_context("forkserver")
        # Only takes effect when the server starts; every caller in this process asks for the same list.
        ctx.set_forkserver_preload([PRELOAD_MODULE])
        return ctx

    def start(self) -> None:
        """Start the server if it is not running (returns at once; its imports go on in the background)."""
        if not self.available():
            return
        with self._lock:
            if self.marker is not None:
                return
            from multiprocessing import forkserver

            self.context()
            folder = tempfile.mkdtemp(prefix="fedkeeper-preload-")
            atexit.register(shutil.rmtree, folder, True)
            marker = os.path.join(folder, "ready")
            before = os.environ.get(PRELOAD_READY_ENV)
            os.environ[PRELOAD_READY_ENV] = marker  # the server's environment is this process's, at its start
            try:
                with interrupts_held():  # it inherits the block, and its workers inherit it from it
                    forkserver.ensure_running()
            finally:
                if before is None:
                    os.environ.pop(PRELOAD_READY_ENV, None)
                else:
                    os.environ[PRELOAD_READY_ENV] = before
            self.marker, self.started_at = marker, time.time()

    def ready(self) -> bool:
        """True once a fork will not wait for the server's imports (or they took over PRELOAD_WAIT_S, or it was
        started elsewhere: then the fork waits, as multiprocessing does)."""
        if self.marker is None or os.path.exists(self.marker):
            return True
        return time.time() - self.started_at > PRELOAD_WAIT_S


PRELOAD = PreloadServer()


def _context(preload: bool) -> Any:
    """Spawn a fresh interpreter per worker, or fork it from the server that has imported TensorFlow once."""
    if not preload or not PRELOAD.available():
        return mp.get_context("spawn")
    return PRELOAD.context()


class _Worker:
    def __init__(self, pool: "_Pool", ctx: Any) -> None:
        from fedkeeper.runtime import worker

        parent, child = ctx.Pipe()
        self.conn = parent
        self.slots = pool.instance_concurrency
        self.proc = ctx.Process(target=worker.main, args=(child, pool.name, worker_environment(pool.env), self.slots),
                                daemon=True, name=f"fedkeeper-{pool.name}")
        start_quietly(self.proc)  # Ctrl-C held back until the worker can end quietly
        child.close()
        self.tasks: dict[str, Invocation] = {}  # running invocations by id, at most `slots`
        self.started_at: dict[str, float] = {}
        self.kill_at: float | None = None
        self.sent = 0
        self.done = 0

    def free(self) -> bool:
        """True if this instance can take one more invocation now."""
        return len(self.tasks) < self.slots

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as fh:
                return int(fh.read().split()[1]) * _PAGE / 2**20
        except (OSError, ValueError, IndexError):
            return 0.0


@dataclass
class _Pool:
    name: str
    concurrency: int
    timeout_s: float
    memory_mb: int
    env: dict
    instance_concurrency: int = 1
    preload: bool = False
    workers: list = field(default_factory=list)
    pending: collections.deque = field(default_factory=collections.deque)
    cold: int = 0
    warm: int = 0
    peak_running: int = 0

    @property
    def instances(self) -> int:
        """Instances the pool may run: enough for `concurrency` invocations at `instance_concurrency` each."""
        return -(-self.concurrency // self.instance_concurrency)


SPEED_ENV, COLD_START_ENV = "FEDKEEPER_EMULATE_SPEED", "FEDKEEPER_EMULATE_COLD_START_S"


def emulation_env(options: dict) -> dict[str, str]:
    """Worker environment that makes a local platform emulate a slower device (speed) and slower cold starts."""
    out = {}
    speed = options.get("speed", 1.0)
    if speed != 1.0:
        out[SPEED_ENV] = repr(float(speed))
    cold = options.get("cold_start_s", 0.0)
    if cold:
        out[COLD_START_ENV] = repr(float(cold))
    return out


def worker_threads(options: dict, fits_at_once: int) -> int:
    """TensorFlow threads of a worker process: options.tf_threads, else one per invocation it serves at once.

    Never more threads than fits, so workers do not oversubscribe the cores, and never fewer, since the fits
    of one process otherwise queue on its single thread (BENCHMARKS §6).
    """
    return int(options.get("tf_threads", fits_at_once))


# Models whose fits run their matrix products inside XLA's own loops, so a second intra-op thread only hands
# work between threads: two NN fits in one process took 1.06-1.07 s a round with one intra-op thread and
# 1.18-1.79 s with two, against 1.00-1.01 s in two processes (BENCHMARKS §6). The CNN's convolutions run on
# the intra-op pool, and with one thread there two CNN fits queued on it (1.1 cores busy of 2).
ONE_INTRA_OP_THREAD = frozenset({"nn"})


def intra_op_threads(options: dict, fits_at_once: int, model: str) -> int:
    """Intra-op threads of a worker process: options.tf_intra_threads, else options.tf_threads, else by model.

    By model: one for the models in ONE_INTRA_OP_THREAD, otherwise one per invocation the process serves at once.
    """
    if "tf_intra_threads" in options:
        return int(options["tf_intra_threads"])
    if "tf_threads" in options:
        return int(options["tf_threads"])
    return 1 if model in ONE_INTRA_OP_THREAD else fits_at_once


class LocalRuntime:
    """Runs the federation's functions in local worker pools; only this object lives for the run."""

    def __init__(self, cfg: FederationConfig, store: Store, control_concurrency: int = 2,
                 extra_events: Callable[[], list[dict]] | None = None, faults: FaultPlan | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.pools: dict[str, _Pool] = {}
        worker_env = dict(WORKER_ENV, **(env or {}))
        client_env = dict(worker_env)
        if cfg.client_access == "presigned":
            # Client functions get no store credentials at all: only the URLs in their invocation.
            client_env.update({k: None for k in CREDENTIAL_VARS})
        for p in cfg.platforms:
            per_instance = min(p.instance_concurrency, p.concurrency)
            env_p = dict(client_env, FEDKEEPER_TF_THREADS=str(worker_threads(p.options, per_instance)),
                         FEDKEEPER_TF_INTRA_THREADS=str(intra_op_threads(p.options, per_instance, cfg.model.name)))
            # Heterogeneous devices on one machine: options.speed scales a client's compute time (0.2: five
            # times slower) and options.cold_start_s adds latency to each new worker's first invocation.
            env_p.update(emulation_env(p.options))
            self.pools[p.name] = _Pool(p.name, p.concurrency, p.timeout_s, p.memory_mb, env_p,
                                       instance_concurrency=per_instance, preload=preloads(p.options))
        # Control workers fork from the server too when a client pool does: a fresh interpreter with NumPy is
        # 50 MB of its own, a forked one shares the server's pages and keeps only what it writes. They then
        # wait for the server's import like the client workers, which the round's first step waits for anyway.
        control_preload = any(p.preload for p in self.pools.values())
        self.pools[CONTROL] = _Pool(CONTROL, control_concurrency, 120.0, CONTROL_MEMORY_MB, worker_env,
                                    preload=control_preload)
        self.faults = faults or FaultPlan()
        self._rng = random.Random(self.faults.seed)
        self._tick_id: str | None = None
        self._cron = None
        if cfg.schedule:
            from croniter import croniter

            self._cron = croniter(cfg.schedule, time.time())
            self._next_cron = self._cron.get_next(float)
        self.invocations: dict[str, Invocation] = {}
        self._inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._events: EventReader | None = None
        self._extra_events = extra_events
        self._last_tick = 0.0
        self._next_memory_sample = 0.0
        self.events_delivered = 0
        self.cron_ticks = 0
        self.errors: list[dict] = []

    # -- public API -------------------------------------------------------------------------------
    def start(self) -> None:
        """Turn on the folder store's events (remote stores deliver theirs through extra_events)."""
        if any(p.preload for p in self.pools.values()):
            PRELOAD.start()  # its imports overlap the first control invocations
        enable = getattr(self.store, "enable_events", None)
        if enable is not None:
            # The deploy plans' bucket notification rule (rounds/ prefix, .safetensors suffix): markers, sidecars
            # and claims fire no event, as on a deployed store.
            self._events = EventReader(enable(prefix="rounds/", suffix=EVENT_SUFFIX))

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> str:
        """Queue an asynchronous invocation; returns its id."""
        pool = CONTROL if function in ("trigger", "aggregator") else (platform or self.cfg.platforms[0].name)
        if pool not in self.pools:
            raise ValueError(f"no platform named {pool!r}; the config defines {', '.join(self.pools)}")
        inv = Invocation(id=uuid.uuid4().hex[:12], function=function, payload=dict(payload, store=payload.get("store", self.store.url)), pool=pool)
        with self._lock:
            self.invocations[inv.id] = inv
            self.pools[pool].pending.append(inv)
        return inv.id

    def step(self, timeout: float = 0.05) -> None:
        """One turn of the loop: receive worker messages, deliver events, dispatch, enforce limits, tick deadlines."""
        conns = {w.conn: w for p in self.pools.values() for w in p.workers}
        if conns:
            for conn in wait(list(conns), timeout=timeout):
                # Everything a worker has sent so far, not one message per turn: a trigger that invokes a
                # thousand clients sends a thousand messages at once.
                w = conns[conn]
                for _ in range(MAX_MESSAGES_PER_TURN):
                    if not self._receive(w) or not _ready(conn):
                        break
        else:
            time.sleep(timeout)
        self._deliver_events()
        self._dispatch()
        self._enforce_limits()
        self._tick()
        self._cron_tick()

    def run_until(self, done: Callable[[], bool], timeout_s: float = 3600, on_step: Callable[[], None] | None = None) -> bool:
        """Step until done() is true or timeout; returns done()."""
        end = time.time() + timeout_s
        while time.time() < end:
            self.step()
            if on_step:
                on_step()
            if done():
                return True
        return done()

    def stop(self) -> None:
        """Stop every worker (by PID if it does not exit)."""
        for p in self.pools.values():
            for w in p.workers:
                try:
                    w.conn.send(("stop",))
                except (OSError, BrokenPipeError):
                    pass
            for w in p.workers:
                w.proc.join(timeout=2)
                w.kill()
            p.workers.clear()
        if self._events is not None:  # undelivered events stay in the store for the next runtime
            self._events.close()
            self._events = None

    def stats(self) -> dict:
        """Cold and warm starts and invocation counts per pool."""
        out = {}
        for name, p in self.pools.items():
            invs = [i for i in self.invocations.values() if i.pool == name]
            out[name] = {"cold_starts": p.cold, "warm_starts": p.warm, "invocations": len(invs),
                         "failed": sum(1 for i in invs if i.ok is False), "peak_running": p.peak_running,
                         "instance_concurrency": p.instance_concurrency}
        return out

    # -- internals --------------------------------------------------------------------------------
    def _receive(self, w: _Worker) -> bool:
        """Handle one message from a worker; False if the worker is gone."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            self._worker_died(w, "worker process exited unexpectedly")
            return False
        kind = msg[0]
        if kind == "invoke":
            _, function, payload, platform = msg
            self.invoke(function, payload, platform)
        elif kind == "done":
            _, task_id, ok, reply, _secs = msg
            inv = self.invocations.get(task_id)
            w.tasks.pop(task_id, None)
            w.started_at.pop(task_id, None)
            w.done += 1
            if inv is not None:
                inv.finished, inv.ok, inv.reply = time.time(), ok, reply
                if not ok:
                    self._failed(inv, reply.get("error", "failed") if isinstance(reply, dict) else str(reply), raised=True)
        return True

    def _worker_died(self, w: _Worker, reason: str) -> None:
        pool = self.pools[next(n for n, p in self.pools.items() if w in p.workers)]
        pool.workers.remove(w)
        w.kill()
        # Every invocation the instance was serving is lost with it, as when a container dies.
        for inv in list(w.tasks.values()):
            if inv.ok is None:
                inv.finished, inv.ok, inv.reply = time.time(), False, {"error": reason}
                self._failed(inv, reason)
        w.tasks.clear()

    def _failed(self, inv: Invocation, reason: str, raised: bool = False) -> None:
        """Like a platform's on-failure destination: a failed client invocation is reported to the aggregator."""
        self.errors.append({"function": inv.function, "payload": inv.payload, "error": reason, "pool": inv.pool,
                            "raised": raised})
        if inv.function == "client":
            self.invoke("aggregator", {"failure": {"payload": inv.payload, "reason": reason[:2000]},
                                       "delivered_at": time.time()})

    def _dispatch(self) -> None:
        refused: list[Invocation] = []
        self._dispatch_locked(refused)
        for inv in refused:  # reported outside the lock: the report is itself an invocation
            self._failed(inv, "invocation failed (injected fault)")

    def _dispatch_locked(self, refused: list) -> None:
        with self._lock:
            for pool in self.pools.values():
                while pool.pending:
                    running = sum(len(w.tasks) for w in pool.workers)
                    if running >= pool.concurrency:
                        break
                    idle = next((w for w in pool.workers if w.free()), None)
                    if idle is None and len(pool.workers) < pool.instances:
                        if pool.preload and not PRELOAD.ready():
                            PRELOAD.start()
                            break  # held until the fork server has imported, so this loop never waits on it
                        idle = _Worker(pool, _context(pool.preload))
                        pool.workers.append(idle)
                    if idle is None:
                        break
                    inv = pool.pending.popleft()
                    if (inv.function == "client" and inv.payload.get("mode", "train") == "train"
                            and self.faults.fail_client and self._rng.random() < self.faults.fail_client):
                        # Like a platform refusing or losing an invocation: it fails without running.
                        self.faults.injected["client_failed"] += 1
                        inv.started = inv.finished = time.time()
                        inv.ok, inv.reply = False, {"error": "invocation failed (injected fault)"}
                        refused.append(inv)
                        continue
                    inv.started = time.time()
                    inv.cold = idle.sent == 0
                    idle.sent += 1
                    if inv.cold:
                        pool.cold += 1
                    else:
                        pool.warm += 1
                    idle.tasks[inv.id], idle.started_at[inv.id] = inv, time.time()
                    pool.peak_running = max(pool.peak_running, running + 1)
                    if (inv.function == "client" and inv.payload.get("mode", "train") == "train"
                            and self._rng.random() < self.faults.kill_client):
                        # Killed after a random share of its work, like a node lost mid-training.
                        kill_at = time.time() + self._rng.uniform(0.02, 0.4)
                        idle.kill_at = kill_at if idle.kill_at is None else min(idle.kill_at, kill_at)
                    try:
                        idle.conn.send(("task", inv.id, inv.function, inv.payload))
                    except (OSError, BrokenPipeError):
                        self._worker_died(idle, "worker pipe closed")

    def _enforce_limits(self) -> None:
        now = time.time()
        # Memory is sampled every MEMORY_SAMPLE_S, not on every turn of the loop (a /proc read per busy worker
        # per event adds up over thousands of invocations); timeouts and kills are checked every turn.
        sample = now >= self._next_memory_sample
        if sample:
            self._next_memory_sample = now + MEMORY_SAMPLE_S
        for pool in list(self.pools.values()):
            for w in list(pool.workers):
                if not w.tasks:
                    w.kill_at = None
                    if not w.proc.is_alive():
                        pool.workers.remove(w)
                    continue
                if w.kill_at is not None and now >= w.kill_at:
                    self.faults.injected["client_killed"] += 1
                    self._worker_died(w, "worker killed mid-invocation (injected fault)")
                elif now - min(w.started_at.values()) > pool.timeout_s:
                    self._worker_died(w, f"timed out after {pool.timeout_s:g} s (platform {pool.name} timeout_s)")
                elif sample and pool.memory_mb and w.rss_mb() > pool.memory_mb:
                    self._worker_died(w, f"exceeded the {pool.memory_mb} MB memory limit (platform {pool.name} memory_mb)")
                elif not w.proc.is_alive():
                    self._worker_died(w, f"worker exited with code {w.proc.exitcode}")

    def _deliver_events(self) -> None:
        found: list[dict] = self._events.drain() if self._events is not None else []
        if self._extra_events is not None:
            found.extend(self._extra_events())
        now = time.time()
        fp = self.faults
        if fp.reorder_events and len(found) > 1:
            self._rng.shuffle(found)
            fp.injected["events_reordered"] += len(found)
        for ev in found:
            key = ev.get("key", "")
            if keys.parse_update(key) is None:
                continue  # only update keys can complete a round
            if self._rng.random() < fp.drop_event:
                fp.injected["event_dropped"] += 1
                continue
            copies = 2 if self._rng.random() < fp.duplicate_event else 1
            if copies == 2:
                fp.injected["event_duplicated"] += 1
            if fp.aggregators_per_event > 1:
                fp.injected["extra_aggregator_invocations"] += copies * fp.aggregators_per_event - copies
            for _ in range(copies * fp.aggregators_per_event):
                self.events_delivered += 1
                self.invoke("aggregator", {"key": key, "event_time": ev.get("time"), "delivered_at": now})

    def _cron_tick(self) -> None:
        """On the config's cron schedule, invoke the trigger's tick entry (as a platform's cron would)."""
        if self._cron is None or time.time() < self._next_cron:
            return
        self._next_cron = self._cron.get_next(float)
        self.cron_ticks += 1
        self.invoke("trigger", {"entry": "tick"})

    def _tick(self) -> None:
        """Once a second, invoke the trigger's tick entry as a platform's cron would (never two at once)."""
        now = time.time()
        if now - self._last_tick < 1.0:
            return
        self._last_tick = now
        pending = self._tick_id is not None and self.invocations[self._tick_id].finished is None
        if not pending:
            self._tick_id = self.invoke("trigger", {"entry": "tick", "liveness": True})
