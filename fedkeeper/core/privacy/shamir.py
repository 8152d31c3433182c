"""Shamir secret sharing of 32-byte secrets over the prime field of 2^521 − 1 (pure Python integers)."""

from __future__ import annotations

import secrets
from typing import Callable, Mapping, Sequence

PRIME = 2 ** 521 - 1  # a Mersenne prime above every 256-bit secret
SHARE_BYTES = 66      # ⌈521 / 8⌉


class ShareError(ValueError):
    """Shares that cannot rebuild a secret: too few, duplicated, out of the field, or not a 32-byte secret."""


def split(secret: bytes, xs: Sequence[int], threshold: int,
          coefficient: Callable[[int], int] | None = None) -> dict[int, int]:
    """Shares {x: f(x)} of `secret` for the points xs; any `threshold` of them rebuild it, fewer reveal nothing.

    `coefficient(k)` gives the polynomial's k-th coefficient (k ≥ 1); by default fresh random ones. A caller that
    must produce the same shares again (a retried invocation) passes coefficients derived from its own secret key.
    """
    if len(secret) != 32:
        raise ShareError(f"secrets are 32 bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ShareError(f"threshold {threshold} must be between 1 and the {len(xs)} share holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShareError("share points must be distinct and non-zero")
    draw = coefficient or (lambda _k: secrets.randbelow(PRIME))
    coeffs = [int.from_bytes(secret, "big")] + [draw(k) % PRIME for k in range(1, threshold)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least `threshold` shares {x: y} (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares cannot rebuild a secret that needs {threshold}")
    pts = sorted(shares.items())[:threshold]
    if any(not (0 < x < PRIME and 0 <= y < PRIME) for x, y in pts):
        raise ShareError("a share lies outside the field")
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num = den = 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> 256:
        raise ShareError("the shares do not rebuild a 32-byte secret (a share is wrong)")
    return secret.to_bytes(32, "big")


def encode(y: int) -> str:
    """A share value as fixed-width hex (shares of every secret look alike)."""
    return y.to_bytes(SHARE_BYTES, "big").hex()


def decode(text: object) -> int:
    """A share value from its hex form; raises ShareError on anything else."""
    if not isinstance(text, str) or len(text) != 2 * SHARE_BYTES:
        raise ShareError("a share must be hex of fixed width")
    try:
        y = int(text, 16)
    except ValueError:
        raise ShareError("a share must be hex of fixed width") from None
    if y >= PRIME:
        raise ShareError("a share lies outside the field")
    return y
