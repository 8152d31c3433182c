"""The trigger: opens a round (HTTP call, cron, or the aggregator's chain) and is the cron's tick entry."""

from __future__ import annotations

from fedkeeper.functions import protocol
from fedkeeper.functions.context import Context, HandlerError

select_clients = protocol.select_clients


def handle(event: dict, ctx: Context) -> dict:
    """Start a round: {"round": r} starts r (idempotent); without it the next round starts unless one is open."""
    r = event.get("round")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
        raise HandlerError(f"'round' must be a non-negative integer, got {r!r}")
    return protocol.start_round(ctx, r, reinvoke=bool(event.get("reinvoke")))


def tick(event: dict, ctx: Context) -> dict:
    """The cron entry: time out silent clients, close ready or overdue rounds, re-run lost evaluations, start rounds."""
    return protocol.tick(ctx, event)
