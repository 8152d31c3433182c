"""Round records (manifest, claim, result, state) and the round state machine, as plain JSON-ready data."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

# A federation moves READY -> OPEN (a round starts) -> AGGREGATING -> DONE or FAILED (below quorum) ->
# OPEN (the next round) ... -> FINISHED. AGGREGATING -> AGGREGATING is a lease takeover.
OPEN, AGGREGATING, DONE, FAILED = "open", "aggregating", "done", "failed"
# A federation may also stop early, from READY, DONE or FAILED, when its privacy budget would be exceeded.
_TRANSITIONS = {"ready": {OPEN, AGGREGATING, "finished"}, OPEN: {OPEN, AGGREGATING},
                AGGREGATING: {DONE, FAILED, AGGREGATING, "finished"}, DONE: {OPEN, "finished"},
                FAILED: {OPEN, "finished"}, "finished": {OPEN}}


class StateError(RuntimeError):
    """An illegal round transition was attempted."""


def transition(current: str, new: str) -> str:
    """Return `new` if the round may move from `current` to it, else raise StateError."""
    if new not in _TRANSITIONS.get(current, set()):
        raise StateError(f"round cannot go from {current!r} to {new!r}")
    return new


def dumps(obj: Any) -> bytes:
    """JSON bytes with stable key order, so rewrites of the same record are byte-identical.

    Compact, without indentation: only then does json use its C encoder, four times faster, which counts for
    records with an entry per client (manifest, result, history) at thousands of clients.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_default).encode()


def _default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def loads(data: bytes) -> Any:
    """Parse JSON bytes from the store."""
    return json.loads(data.decode("utf-8"))


@dataclass
class Manifest:
    """Round r's selection, written once by the trigger."""

    round: int
    clients: list[dict]  # [{"id": ..., "platform": ..., "data": key-or-uri}]
    model: str
    deadline: float
    quorum: int
    created: float = field(default_factory=time.time)
    config_fingerprint: str = ""
    fan_in: int = 0  # tree mode: clients are folded in fixed groups of this size (0: one aggregator folds all)
    shards: int = 1  # sharded mode: each of this many byte-balanced tensor shards is folded by its own invocation

    @cached_property
    def ids(self) -> list[str]:
        """Selected client ids, in selection order (computed once per parsed manifest: callers must not change it)."""
        return [c["id"] for c in self.clients]

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        """Parse a stored manifest."""
        raw = loads(data)
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    @cached_property
    def groups(self) -> list[list[str]]:
        """Tree mode's fixed groups: the sorted client ids cut into runs of fan_in (one group without a tree).

        Computed once per parsed manifest (shared: callers must not change the lists)."""
        ids = sorted(self.ids)
        if self.fan_in <= 0:
            return [ids]
        return [ids[i:i + self.fan_in] for i in range(0, len(ids), self.fan_in)]

    def levels(self) -> list[int]:
        """Group counts per tree level, bottom up; the last level has one group: the root."""
        n, out = len(self.clients), []
        if self.fan_in <= 0:
            return [1]
        while True:
            n = -(-n // self.fan_in)
            out.append(n)
            if n == 1:
                return out if len(out) > 1 else [1, 1]  # the root always folds partials, even of one group

    @cached_property
    def _rank(self) -> dict[str, int]:
        # Built once per parsed manifest: every update event asks for its client's group.
        return {c: i for i, c in enumerate(sorted(self.ids))}

    @cached_property
    def _by_id(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for c in self.clients:
            out.setdefault(c["id"], c)  # the first entry wins, as a scan in selection order would find
        return out

    def group_of(self, client: str) -> int:
        """Index of the group holding client (its rank among the sorted ids, divided by fan_in)."""
        if self.fan_in <= 0:
            return 0
        try:
            return self._rank[client] // self.fan_in
        except KeyError:
            raise ValueError(f"client {client!r} is not selected in round {self.round}") from None

    def entry(self, client: str) -> dict | None:
        """The manifest's entry for one client, or None if it was not selected."""
        return self._by_id.get(client)


@dataclass
class Claim:
    """An aggregator's hold on a round; an expired lease may be taken over by compare-and-swap."""

    round: int
    owner: str
    lease_until: float
    taken_over_from: str = ""

    def expired(self, now: float | None = None) -> bool:
        """True once the lease has run out."""
        return (now if now is not None else time.time()) >= self.lease_until


READY, FINISHED = "ready", "finished"
STATUSES = (READY, OPEN, AGGREGATING, DONE, FAILED, FINISHED)


@dataclass
class State:
    """state.json: where the federation is. Written by the trigger and the aggregator, read by everyone."""

    round: int = 0
    status: str = READY
    next_round: int = 0
    rounds_done: int = 0
    model: str = "models/000000.safetensors"
    updated: float = field(default_factory=time.time)
    reason: str = ""  # why the federation stopped before its last round (e.g. its privacy budget)

    @classmethod
    def parse(cls, raw: Any) -> "State":
        """A State from whatever state.json holds; fields of the wrong type fall back to their defaults."""
        st = cls()
        if not isinstance(raw, dict):
            return st
        for name in ("round", "next_round", "rounds_done"):
            v = raw.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                setattr(st, name, v)
        if raw.get("status") in STATUSES:
            st.status = raw["status"]
        if isinstance(raw.get("model"), str):
            st.model = raw["model"]
        if isinstance(raw.get("reason"), str):
            st.reason = raw["reason"][:2000]
        if isinstance(raw.get("updated"), (int, float)) and not isinstance(raw.get("updated"), bool):
            st.updated = float(raw["updated"])
        return st

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def new_state() -> dict:
    """State of a federation that has been set up but not started."""
    return State().to_dict()
