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


HOSTILE_KINDS = ("deep_metadata", "deep_header", "infinity_in_shape", "metrics_list", "metrics_text", "timings_list",
                 "platform_dict", "scaled", "near_float32_max", "nan", "examples_inflated", "huge_integer",
                 "duplicate_tensor", "header_length")


def hostile_kind(client: str) -> str | None:
    """The kind of hostile update this client writes instead of its own, if armed ({"hostile": {client: kind}})."""
    table = armed().get("hostile")
    kind = table.get(client) if isinstance(table, dict) else None
    return kind if kind in HOSTILE_KINDS else None


def hostile_update(kind: str, tensors: dict, meta: dict) -> bytes:
    """An update an attacker could write, built from an honest one: each kind breaks one rule of the protocol."""
    import struct

    import numpy as np

    from fedkeeper.core import blob

    meta = dict(meta)
    if kind == "scaled":
        return blob.encode({k: v * np.float32(1e30) for k, v in tensors.items()}, meta)
    if kind == "near_float32_max":
        return blob.encode({k: np.full_like(v, 3.0e38) for k, v in tensors.items()}, meta)
    if kind == "nan":
        return blob.encode({k: np.full_like(v, np.nan) for k, v in tensors.items()}, meta)
    if kind == "examples_inflated":
        return blob.encode(tensors, dict(meta, num_examples=10**9))
    if kind in ("metrics_list", "metrics_text", "timings_list", "platform_dict"):
        field, value = {"metrics_list": ("metrics", [1, 2]), "metrics_text": ("metrics", {"holdout_accuracy": "high"}),
                        "timings_list": ("timings", [0.1]), "platform_dict": ("platform", {"a": 1})}[kind]
        return blob.encode(tensors, dict(meta, **{field: value}))
    data = bytes(blob.encode(tensors, meta))
    (hlen,) = struct.unpack("<Q", data[:8])
    head, body = data[8:8 + hlen].decode().rstrip(), data[8 + hlen:]
    if kind == "deep_metadata":
        head = head.replace('"__metadata__":{', '"__metadata__":{"deep":"' + "[" * 50000 + "]" * 50000 + '",', 1)
    elif kind == "deep_header":
        head = head[:-1] + ',"x":' + "[" * 50000 + "]" * 50000 + "}"
    elif kind == "infinity_in_shape":
        head = head.replace('"shape":[', '"shape":[Infinity,', 1)
    elif kind == "huge_integer":
        head = head.replace('"data_offsets":[0,', '"data_offsets":[' + "9" * 5000 + ",", 1)
    elif kind == "duplicate_tensor":
        import json

        pairs = json.loads(head, object_pairs_hook=lambda p: p)
        first = next(p for p in pairs if p[0] != "__metadata__")
        head = "{" + ",".join(json.dumps(k) + ":" + json.dumps(v) for k, v in pairs + [first]) + "}"
    elif kind == "header_length":
        return struct.pack("<Q", 2**63) + data[8:]
    raw = head.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body
