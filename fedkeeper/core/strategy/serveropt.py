"""Shared engine of the server optimizers: the clients' mean minus the global model is a pseudo-gradient step."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedkeeper.core.aggregate import Weights
from fedkeeper.core.strategy.base import Fold, Strategy, SumFold


def mean_delta(fold: Fold, global_weights: Mapping[str, np.ndarray]) -> Weights:
    """Δ = Σ nᵢ·wᵢ / Σ nᵢ − w, computed in the running sum's own memory (the fold ends here)."""
    assert isinstance(fold, SumFold)
    delta = fold.sum.result(in_place=True)
    for name, d in delta.items():
        d -= np.asarray(global_weights[name], dtype=d.dtype)
    return delta


def slot(state: Mapping[str, np.ndarray] | None, prefix: str, name: str, like: np.ndarray) -> np.ndarray:
    """A server-state tensor `prefix/name` as a fresh float32 array, zeros when the state does not hold it yet."""
    if state is not None and f"{prefix}/{name}" in state:
        v = np.asarray(state[f"{prefix}/{name}"])
        if v.shape == like.shape:
            return v.astype(np.float32, copy=True)
    return np.zeros(like.shape, dtype=np.float32)


def step_count(state: Mapping[str, np.ndarray] | None) -> int:
    """How many server steps the state has taken (0 before the first)."""
    if state is not None and "step" in state:
        return int(np.asarray(state["step"]).reshape(-1)[0])
    return 0


class ServerOptimizer(Strategy):
    """FedOpt (Reddi et al. 2021, Algorithm 2): the mean update is a pseudo-gradient fed to a server optimizer."""

    @property
    def needs_global(self) -> bool:
        """The pseudo-gradient is the difference from the global model."""
        return True

    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """One optimizer step from Δ; returns the new model and the new moments."""
        if global_weights is None:
            raise ValueError(f"{self.name} needs the global model")
        delta = mean_delta(fold, global_weights)
        t = step_count(state) + 1
        new_state: Weights = {"step": np.array([t], dtype=np.int64)}
        for name, d in delta.items():
            self.step(name, d, np.asarray(global_weights[name]), state, new_state, t)
        return delta, new_state

    def step(self, name: str, delta: np.ndarray, weight: np.ndarray, state: Weights | None, new_state: Weights,
             t: int) -> None:
        """Write the new weights for one tensor into `delta` (reused as output) and its slots into new_state."""
        raise NotImplementedError


class AdaptiveOptimizer(ServerOptimizer):
    """FedAdagrad, FedAdam and FedYogi share m ← β₁m + (1−β₁)Δ and w ← w + η·m / (√v + τ); only v differs."""

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """The new v from the old one (updated in place) and Δ²."""
        raise NotImplementedError

    def lr(self, t: int) -> float:
        """The server learning rate at step t."""
        return float(self.params["eta"])

    def step(self, name: str, delta: np.ndarray, weight: np.ndarray, state: Weights | None, new_state: Weights,
             t: int) -> None:
        """Update m and v for one tensor and write w + η·m/(√v + τ) over delta."""
        b1 = np.float32(self.params["beta_1"])
        m = slot(state, "m", name, delta)
        m *= b1
        m += (np.float32(1) - b1) * delta
        v = self.second_moment(slot(state, "v", name, delta), np.square(delta))
        new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
        denom = np.sqrt(v)
        denom += np.float32(self.params["tau"])
        np.divide(m, denom, out=delta)
        delta *= np.float32(self.lr(t))
        delta += weight
