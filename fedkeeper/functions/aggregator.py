"""The aggregator: on an update event, a tick's poke or a failure report, runs the protocol's aggregation step."""

from __future__ import annotations

from fedkeeper.functions import protocol
from fedkeeper.functions.context import Context


def handle(event: dict, ctx: Context) -> dict:
    """{"key": update key} (a store event), {"round": r} (a tick) or a failure report: aggregate if ready."""
    return protocol.on_event(ctx, event)
