"""The pure core: config schema, key layout, blob format, aggregation and round records (numpy only)."""
