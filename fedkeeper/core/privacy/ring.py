"""Fixed-point arithmetic modulo 2^bits for secure aggregation: quantise, add with wrap-around, dequantise."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

DTYPES = {32: np.uint32, 64: np.uint64}


class RingError(ValueError):
    """The ring cannot hold the sum at any useful precision."""


def scale_bits(bits: int, total_examples: int, clip_range: float) -> int:
    """Fractional bits such that Σ nᵢ·|δᵢ| ≤ total_examples·clip_range stays below 2^(bits−1) (no wrap-around)."""
    room = (2 ** (bits - 1) - 1) / (max(total_examples, 1) * clip_range)
    s = math.floor(math.log2(room)) if room >= 1 else -1
    s = min(s, 52 - 1 - math.ceil(math.log2(max(total_examples * clip_range, 1))))  # float64 rounds exactly below 2^52
    if s < 4:
        raise RingError(f"a {bits}-bit ring leaves {s} fractional bits for {total_examples} examples at clip range "
                        f"{clip_range:g}; use privacy.secagg.ring_bits 64 or a smaller clip_range")
    return s


def quantise(delta: Mapping[str, np.ndarray], num_examples: int, scale: int, bits: int,
             clip_range: float) -> dict[str, np.ndarray]:
    """round(n·clip(δ, ±R)·2^scale) mod 2^bits, tensor by tensor: the example-weighted update as ring elements."""
    dtype = DTYPES[bits]
    out = {}
    for k, v in delta.items():
        x = np.clip(np.asarray(v, dtype=np.float64), -clip_range, clip_range) * (num_examples * 2.0 ** scale)
        out[k] = np.rint(x).astype(np.int64).astype(dtype)  # two's complement wraps negatives into the ring
    return out


def add(acc: np.ndarray, x: np.ndarray, sign: int = 1) -> None:
    """acc ← acc ± x mod 2^bits, in place (unsigned numpy arithmetic wraps exactly)."""
    if sign >= 0:
        np.add(acc, x, out=acc)
    else:
        np.subtract(acc, x, out=acc)


def dequantise(total: np.ndarray, scale: int, bits: int) -> np.ndarray:
    """The signed value of a ring sum, divided by 2^scale, as float64."""
    signed = total.view(np.int32 if bits == 32 else np.int64)  # two's complement read back
    return signed.astype(np.float64) / 2.0 ** scale
