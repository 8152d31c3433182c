"""Staleness weighting for buffered asynchronous aggregation (FedBuff/FedAsync): constant, polynomial:a, hinge:a,b."""

from __future__ import annotations

import math
from dataclasses import dataclass

MSG_SPEC = "use constant, polynomial:A (A >= 0) or hinge:A,B (A >= 0, B >= 0)"


@dataclass(frozen=True)
class Staleness:
    """A parsed staleness function: weight(τ) for an update τ model versions behind the one it is folded into."""

    kind: str
    a: float = 0.0
    b: float = 0.0

    def weight(self, tau: int) -> float:
        """The update's weight factor, 1.0 for a fresh update, falling with staleness."""
        tau = max(0, int(tau))
        if self.kind == "polynomial":
            return (1.0 + tau) ** -self.a
        if self.kind == "hinge":
            return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)
        return 1.0


def parse(spec: str) -> Staleness:
    """Parse a staleness spec; raises ValueError with the accepted forms."""
    if not isinstance(spec, str):
        raise ValueError(f"expected text, got {spec!r}; {MSG_SPEC}")
    kind, _, args = spec.partition(":")
    try:
        nums = [float(x) for x in args.split(",")] if args else []
    except ValueError:
        raise ValueError(f"unknown staleness {spec!r}; {MSG_SPEC}") from None
    if any(not math.isfinite(x) or x < 0 for x in nums):
        raise ValueError(f"staleness parameters must be finite and >= 0 in {spec!r}; {MSG_SPEC}")
    if kind == "constant" and not nums:
        return Staleness("constant")
    if kind == "polynomial" and len(nums) == 1:
        return Staleness("polynomial", nums[0])
    if kind == "hinge" and len(nums) == 2:
        return Staleness("hinge", nums[0], nums[1])
    raise ValueError(f"unknown staleness {spec!r}; {MSG_SPEC}")
