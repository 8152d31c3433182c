"""Drive a whole federation on the local runtime: setup, first trigger, progress, results."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from fedkeeper import report
from fedkeeper.core import keys, rounds
from fedkeeper.core.config import FederationConfig, resolve_events
from fedkeeper.federation import existing, setup
from fedkeeper.runtime.local import PRELOAD, LocalRuntime, preloads
from fedkeeper.store import Store


class RunError(RuntimeError):
    """The federation could not complete; the message says why and what to do."""


@dataclass
class Progress:
    """Draws a live bar per round (per-platform finished/selected) and a line per finished round."""

    cfg: FederationConfig
    stream: TextIO = sys.stderr
    quiet: bool = False
    printed: set = field(default_factory=set)
    _last: str = ""
    _t_last: float = 0.0

    @property
    def tty(self) -> bool:
        """True when drawing a redrawn bar makes sense."""
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, store: Store, out: TextIO) -> None:
        """Refresh from the store (throttled)."""
        now = time.time()
        if now - self._t_last < 0.25:
            return
        self._t_last = now
        state = store.get_json_or(keys.STATE) or {}
        r = int(state.get("round", 0))
        for done in range(self.cfg.rounds):
            if done not in self.printed and store.exists(keys.evaluation(done)):
                rec = report.round_record(store, done)
                if rec is not None:
                    self._clear()
                    self.printed.add(done)
                    out.write(format_round(rec, self.cfg.rounds) + "\n")
                    out.flush()
        if self.quiet or not self.tty or r in self.printed:
            return
        m = store.get_json_or(keys.manifest(r))
        if not m:
            return
        have = {p[1] for k in store.list(keys.updates_prefix(r)) if (p := keys.parse_update(k))}
        per: dict[str, list[int]] = {}
        for c in m["clients"]:
            cnt = per.setdefault(c["platform"], [0, 0])
            cnt[1] += 1
            cnt[0] += c["id"] in have
        total = sum(v[1] for v in per.values())
        got = sum(v[0] for v in per.values())
        width = 20
        fill = int(width * got / max(1, total))
        bar = "█" * fill + "░" * (width - fill)
        parts = "  ".join(f"{p} {a}/{b}" for p, (a, b) in per.items())
        status = "aggregating" if state.get("status") == rounds.AGGREGATING or got == total else "training"
        line = f"round {r + 1}/{self.cfg.rounds} {bar} {got}/{total}  {parts}  [{status} {now - m['created']:.0f}s]"
        if line != self._last:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
            self._last = line

    def _clear(self) -> None:
        if self._last and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._last = ""


def format_round(rec: dict, total: int) -> str:
    """One line per finished round: accuracy, loss, federated accuracy, clients, time."""
    acc = rec.get("test_accuracy")
    loss = rec.get("test_loss")
    fed = rec.get("federated_accuracy")
    cl = rec["clients"]
    extra = ""
    if cl["rejected"] or cl["failed"] or cl["stragglers"]:
        extra = f"  rejected {len(cl['rejected'])} failed {len(cl['failed'])} stragglers {len(cl['stragglers'])}"
    rs = rec["timings"].get("round_s")
    resumed = " (since resume)" if rec["timings"].get("resumed_at") else ""
    return (f"round {rec['round']}/{total}  test acc {_f(acc)}  test loss {_f(loss)}  "
            f"fed acc {'-' if fed is None else f'{fed:.4f}'}  clients {len(cl['included'])}/{len(cl['selected'])}"
            f"  time {'-' if rs is None else f'{rs:.1f}s'}{resumed}{'  [' + rec['status'] + ']' if rec['status'] != 'done' else ''}{extra}"
            f"{_epsilon(rec.get('privacy'))}")


def _epsilon(p: dict | None) -> str:
    """'  ε 1.23 (δ 1e-05)' for a round under differential privacy, else ''."""
    if not isinstance(p, dict) or not p.get("dp") or p.get("dp") == "off":
        return ""
    eps = p.get("epsilon")
    return f"  ε {'∞' if eps is None else f'{eps:.3g}'} (δ {p.get('delta') or 0:g})"


def summary_table(results: dict) -> str:
    """The closing table: one row per round plus totals and cold/warm starts per platform."""
    rows = [("round", "status", "test acc", "test loss", "fed acc", "included", "rejected", "round s", "aggs")]
    for r in results["rounds"]:
        c = r["clients"]
        rows.append((str(r["round"]), r["status"], _f(r["test_accuracy"]), _f(r["test_loss"]),
                     _f(r["federated_accuracy"]), f"{len(c['included'])}/{len(c['selected'])}",
                     str(len(c["rejected"])), _f(r["timings"]["round_s"], 2), str(r["aggregations"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    fin = results["final"]
    lines.append(f"final test accuracy {_f(fin['test_accuracy'])} after {fin['rounds']} rounds"
                 + (f" in {fin['wall_s']:.1f} s" if fin.get("wall_s") else ""))
    if fin.get("privacy") and fin["privacy"].get("dp") not in (None, "off"):
        lines.append("privacy:" + _epsilon(fin["privacy"]) + f" after {fin['privacy'].get('releases') or 0:.0f} released rounds"
                     + (f" (budget {fin['privacy']['epsilon_budget']:g})" if fin["privacy"].get("epsilon_budget") else ""))
    if fin.get("stop_reason"):
        lines.append(f"stopped early: {fin['stop_reason']}")
    rt = results.get("runtime", {}).get("pools")
    if rt:
        lines.append("starts: " + ", ".join(f"{p} {v['cold_starts']} cold / {v['warm_starts']} warm" for p, v in rt.items()))
    return "\n".join(lines)


def _translator(store_url: str):
    """Event bodies -> update keys for this store, by the store's own event shapes."""
    def translate(payload: dict, headers: dict) -> list[str]:
        from fedkeeper.store import events

        return events.translate(payload, store_url, headers=headers)

    return translate


def _deaths(errors: list[dict]) -> dict:
    """Invocations whose process died (killed, timed out, out of memory), per function."""
    out: dict[str, int] = {}
    for e in errors:
        if not e.get("raised"):
            out[e["function"]] = out.get(e["function"], 0) + 1
    return out


def _f(v, nd: int = 4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def run(cfg: FederationConfig, store: Store, *, resume: bool = False, out: TextIO = sys.stdout,
        progress: Progress | None = None, timeout_s: float = 3600.0, log: Callable[[str], None] | None = None,
        extra_events=None, faults=None, env: dict | None = None, control_concurrency: int = 2,
        events_port: int = 0) -> dict:
    """Set up (or resume) the federation in `store`, run every round on the local runtime, return results."""
    log = log or (lambda s: print(s, file=sys.stderr))
    cfg.events = resolve_events(cfg.events, store.url)
    if any(preloads(p.options) for p in cfg.platforms):
        PRELOAD.start()  # client workers fork from it; its imports overlap the setup
    if resume:
        if existing(store) is None:
            raise RunError(f"--resume: {store.url} holds no federation to resume; drop --resume to start one")
    else:
        setup(cfg, store, progress=log)
    state = store.get_json_or(keys.STATE) or {}
    if resume and state.get("status") == rounds.OPEN:
        # Marks when the open round continues, so its time leaves out the pause.
        r_open = int(state.get("round", 0))
        store.put_json(f"{keys.round_prefix(r_open)}resumed/{int(time.time() * 1000)}.json", {"at": time.time()})
    receiver = None
    if extra_events is None and cfg.events == "store" and not hasattr(store, "enable_events"):
        # A remote store posts its object events to this receiver (see `fedkeeper events-config`).
        from fedkeeper.runtime.webhook import EventReceiver

        receiver = EventReceiver(_translator(store.url), port=events_port).start()
        extra_events = receiver.drain
        log(f"store events: POST them to {receiver.url} (ready rounds are also closed by a 1 s tick)")
    rt = LocalRuntime(cfg, store, extra_events=extra_events, faults=faults, env=env,
                      control_concurrency=control_concurrency)
    rt.start()
    t0 = time.time()
    progress = progress or Progress(cfg)

    def finished() -> bool:
        # Every round's evaluation too: a lost one is re-run by the protocol (or recorded as failed).
        st = store.get_json_or(keys.STATE) or {}
        # A federation stopped early (its privacy budget, an async time budget) has evaluations only for the
        # rounds (model versions) it made.
        made = st.get("rounds_done") if isinstance(st.get("rounds_done"), int) else cfg.rounds
        return st.get("status") == "finished" and all(store.exists(keys.evaluation(r))
                                                      for r in range(min(cfg.rounds, made)))

    def fatal() -> str | None:
        # A handler that raised is a bug or bad input and will fail again; a killed or timed-out
        # process is an infrastructure fault that ticks and leases recover from.
        for e in rt.errors:
            if e["function"] in ("trigger", "aggregator") and e.get("raised"):
                return f"{e['function']} failed: {e['error']}"
        return None

    if finished():
        log("the federation in this store has finished all its rounds (extend it with --resume --rounds N)")
    try:
        if cfg.schedule:
            log(f"rounds start on the schedule '{cfg.schedule}'; the first tick is at "
                f"{time.strftime('%H:%M:%S', time.localtime(rt._next_cron))}")
        elif not finished():
            from fedkeeper.functions.protocol import read_state

            rt.invoke("trigger", {"round": read_state(store).next_round, "reinvoke": resume})
        error = None

        def step() -> None:
            nonlocal error
            progress.update(store, out)
            error = error or fatal()

        ok = rt.run_until(lambda: finished() or error is not None, timeout_s, step)
        progress.update(store, out)
        progress._t_last = 0
        progress.update(store, out)
        if error:
            raise RunError(error)
        if not ok:
            raise RunError(f"the federation did not finish within {timeout_s:.0f} s; its state is kept in "
                           f"{store.url}: resume with --resume or inspect with `fedkeeper status`")
    finally:
        stats = rt.stats()
        rt.stop()
        if receiver is not None:
            receiver.stop()
    results = report.collect(store, runtime={"pools": stats, "wall_s": time.time() - t0,
                                             "events_delivered": rt.events_delivered,
                                             "faults_injected": dict(rt.faults.injected),
                                             "process_deaths": _deaths(rt.errors)})
    return results
