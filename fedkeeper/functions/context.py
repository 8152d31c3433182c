"""What a handler is handed: the store, an invoker to start other functions, and its invocation's identity."""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from fedkeeper.core import config as cfgmod
from fedkeeper.core import keys
from fedkeeper.store import Store

log = logging.getLogger("fedkeeper")

TRIGGER, CLIENT, AGGREGATOR = "trigger", "client", "aggregator"
_CONFIGS: dict[str, tuple[Any, cfgmod.FederationConfig]] = {}  # url -> (version or bytes, config)
_PARSED: "OrderedDict[tuple[str, str, Callable], tuple[Any, Any]]" = OrderedDict()
_PARSED_MAX = 32  # a warm function sees a few rounds' manifests at a time; old ones are dropped first


def _read_if_changed(store: Store, key: str, token: Any) -> tuple[Any, bytes | None]:
    """(token, bytes) of key, with bytes None when the token still matches `token` (the caller's copy is current).

    Where the store tells an object's version without downloading it (a stat, a HEAD), that version is the
    token and an unchanged record is not read at all; elsewhere the token is the bytes themselves. Raises the
    store's NotFound if key is absent.
    """
    version = store.version(key)
    if version is None:
        raw = bytes(store.get(key))
        return raw, (None if raw == token else raw)
    if version == token:
        return version, None
    raw, version = store.get_versioned(key)  # bytes and version from one read, so they belong together
    return version, bytes(raw)


def parsed_record(store: Store, key: str, parse: Callable[[bytes], Any]) -> Any:
    """parse(bytes at key), reusing this process's earlier parse while the stored object is unchanged.

    Records such as a round's manifest hold one entry per client and are read by every client invocation and
    every update event: a warm function asks for the object's version (or compares its bytes, where the store
    cannot tell a version) instead of downloading and parsing it again, which would cost O(clients) per
    invocation and O(clients²) bytes per round. Raises the store's NotFound if key is absent. The value is
    shared: callers must not change it.
    """
    slot = (store.url, key, parse)  # one record may be parsed into different values by different readers
    hit = _PARSED.get(slot)
    token, raw = _read_if_changed(store, key, hit[0] if hit is not None else None)
    if raw is None and hit is not None:
        _PARSED.move_to_end(slot)
        return hit[1]
    value = parse(raw)
    _PARSED[slot] = (token, value)
    _PARSED.move_to_end(slot)
    while len(_PARSED) > _PARSED_MAX:
        _PARSED.popitem(last=False)
    return value


class Invoker(Protocol):
    """Starts a function asynchronously; each platform implements it (HTTP, SDK or local queue)."""

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> None:
        """Fire-and-forget call of `function` on `platform` (None: the control platform)."""


class NullInvoker:
    """An invoker that records calls and starts nothing (tests, dry runs, one-shot CLI calls)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict, str | None]] = []

    def invoke(self, function: str, payload: dict, platform: str | None = None) -> None:
        """Record the call."""
        self.calls.append((function, dict(payload), platform))


@dataclass
class Context:
    """Per-invocation context: the federation's store, the invoker, and timing facts about this call."""

    store: Store
    invoker: Invoker = field(default_factory=NullInvoker)
    invocation_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    platform: str = "local"
    cold: bool = False
    now: Callable[[], float] = time.time

    def config(self) -> cfgmod.FederationConfig:
        """The federation's validated config, read from federation.json (shared: callers must not change it)."""
        hit = _CONFIGS.get(self.store.url)
        token, raw = _read_if_changed(self.store, keys.FEDERATION, hit[0] if hit is not None else None)
        if raw is None and hit is not None:
            return hit[1]
        # A warm function validates the config again only when its bytes change: with a thousand
        # clients, validating it costs more than the rest of a zero-epoch client's invocation.
        from fedkeeper.core import validate

        try:
            cfg = cfgmod.from_stored(validate.loads(raw, max_bytes=64 << 20, what=keys.FEDERATION, lenient=True))
        except (validate.InputError, cfgmod.ConfigError, TypeError, AttributeError) as exc:
            raise HandlerError(f"{keys.FEDERATION} in {self.store.url} is not a valid federation config ({exc}); "
                               "write it again with `fedkeeper setup`", 409) from None
        _CONFIGS[self.store.url] = (token, cfg)
        return cfg


class HandlerError(Exception):
    """A handler refuses an event for a reason the caller can fix; `status` is the HTTP-like code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
