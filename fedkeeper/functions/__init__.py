"""Platform-neutral function handlers: trigger, client, aggregator, each `handle(event: dict, ctx) -> dict`."""
