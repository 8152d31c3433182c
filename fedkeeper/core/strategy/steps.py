"""Local step counts from update metadata, for strategies that normalise by them (FedNova, SCAFFOLD)."""

from __future__ import annotations

from typing import Any, Mapping

from fedkeeper.core.validate import finite_number

MAX_STEPS = 10_000_000


def local_steps(name: str, meta: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """(steps, None) from metrics.local_steps, or (None, why the update must be rejected)."""
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    k = metrics.get("local_steps")
    if not finite_number(k) or k < 1 or k > MAX_STEPS or not float(k).is_integer():
        return None, (f"{name} needs metrics.local_steps, a whole number from 1 to {MAX_STEPS}, "
                      f"got {str(k)[:40]!r}; the client must report how many optimizer steps it took")
    return int(k), None
