"""FedAvg as a running sum (Σ nᵢ·wᵢ, Σ nᵢ): O(model) memory, and partial sums compose."""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

Weights = dict[str, np.ndarray]


class RunningSum:
    """Accumulates example-weighted tensors one update at a time; merge() combines partial sums."""

    def __init__(self) -> None:
        self.sums: Weights = {}
        self.total: float = 0.0
        self.count: int = 0
        self._scratch: Weights = {}

    def add(self, weights: Mapping[str, np.ndarray], num_examples: float, consume: bool = False) -> None:
        """Add n·w for one update; with consume=True, writable float32 tensors are scaled in place (no scratch).

        Raises ValueError if names or shapes differ from earlier updates. Both paths compute the
        same float32 products, so the result does not depend on which one ran.
        """
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        n = np.float32(num_examples)
        if self.sums and weights.keys() != self.sums.keys():
            raise ValueError("update tensor names differ from the first update's")
        for name, w in weights.items():
            acc = self.sums.get(name)
            if acc is not None and w.shape != acc.shape:
                raise ValueError(f"tensor {name} has shape {w.shape}, expected {acc.shape}")
            if consume and w.dtype == np.float32 and w.flags.writeable:
                np.multiply(w, n, out=w)
                scaled = w
            elif acc is None:
                scaled = np.empty(w.shape, dtype=np.float32)
                np.multiply(w, n, out=scaled, casting="unsafe")
            else:
                # One reusable scratch buffer per tensor keeps memory flat, whatever the count.
                scaled = self._scratch.get(name)
                if scaled is None:
                    scaled = self._scratch[name] = np.empty_like(acc)
                np.multiply(w, n, out=scaled, casting="unsafe")
            if acc is None:
                self.sums[name] = scaled.copy() if scaled is w else scaled
            else:
                acc += scaled
        self.total += float(num_examples)
        self.count += 1

    def merge(self, other: "RunningSum") -> None:
        """Fold another partial sum into this one (tree aggregation)."""
        if not other.sums:
            return
        if not self.sums:
            self.sums = {k: v.copy() for k, v in other.sums.items()}
        else:
            if other.sums.keys() != self.sums.keys():
                raise ValueError("partial sums hold different tensors")
            for name, v in other.sums.items():
                self.sums[name] += v
        self.total += other.total
        self.count += other.count

    def finite(self) -> bool:
        """True unless some sum holds NaN or Inf (a float64 reduction: no overflow, no allocation)."""
        return all(np.isfinite(acc.sum(dtype=np.float64)) for acc in self.sums.values())

    def result(self, in_place: bool = False) -> Weights:
        """The weighted mean Σ nᵢ·wᵢ / Σ nᵢ (in_place reuses the sums' memory and ends this accumulator)."""
        if self.total <= 0:
            raise ValueError("no updates were added")
        inv = np.float32(1.0 / self.total)
        if in_place:
            for acc in self.sums.values():
                acc *= inv
            self._scratch = {}
            return self.sums
        return {name: (acc * inv).astype(np.float32) for name, acc in self.sums.items()}


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """Example-weighted mean of (weights, num_examples) pairs."""
    acc = RunningSum()
    for weights, n in updates:
        acc.add(weights, n)
    return acc.result()


def global_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None) -> float:
    """L2 norm of all tensors together, or of their difference from `reference`."""
    total = 0.0
    for name, w in weights.items():
        d = w.astype(np.float64) - reference[name] if reference is not None else w.astype(np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return total ** 0.5
