"""Fault points for chaos testing: each is a no-op unless the FEDKEEPER_FAULTS environment variable arms it."""

from __future__ import annotations

import json
import os
import random

_ENV = "FEDKEEPER_FAULTS"


def armed() -> dict:
    """The armed fault points, e.g. {"aggregator_after_claim": 0.3, "corrupt_update": 1}."""
    raw = os.environ.get(_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def maybe_crash(point: str, first: bool = True) -> None:
    """Kill this process outright (as a platform would on OOM or timeout) with the armed probability.

    The value "first" crashes every first attempt and none after it (e.g. every fresh claim but no
    takeover), which makes a chaos run deterministic.
    """
    value = armed().get(point, 0) or 0
    if value == "first":
        if first:
            os._exit(137)
        return
    p = float(value)
    if p > 0 and random.random() < p:
        os._exit(137)


def corrupt_target(r: int, selected: list[str]) -> str | None:
    """The one client whose update is corrupted in round r, if update corruption is armed."""
    if not armed().get("corrupt_update") or not selected:
        return None
    return sorted(selected)[r % len(selected)]
