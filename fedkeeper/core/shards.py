"""Sharded models: byte-balanced tensor shards and the Hugging Face style index that names them (numpy only)."""

from __future__ import annotations

from typing import Mapping


def plan(sizes: Mapping[str, int], m: int) -> list[list[str]]:
    """Split tensors into m byte-balanced shards: largest first, each to the lightest shard; names sorted inside.

    A pure function of names and sizes, so every invocation of a round (and the next round) agrees on it.
    """
    m = max(1, min(int(m), len(sizes))) if sizes else 1
    loads = [0] * m
    out: list[list[str]] = [[] for _ in range(m)]
    for name in sorted(sizes, key=lambda n: (-int(sizes[n]), n)):
        i = min(range(m), key=lambda k: (loads[k], k))
        out[i].append(name)
        loads[i] += int(sizes[name])
    return [sorted(names) for names in out]


def index(weight_map: Mapping[str, str], sizes: Mapping[str, int], meta: Mapping | None = None) -> dict:
    """model.safetensors.index.json: total size, per-tensor sizes and the file holding each tensor."""
    return {"metadata": {"total_size": int(sum(sizes.values())), "sizes": {k: int(v) for k, v in sizes.items()},
                         **dict(meta or {})},
            "weight_map": dict(sorted(weight_map.items()))}
