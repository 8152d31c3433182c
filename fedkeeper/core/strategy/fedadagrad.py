"""FedAdagrad (Reddi et al. 2021): Adagrad on the server; the second moment is the running sum of Δ²."""

from __future__ import annotations

import numpy as np

from fedkeeper.core.strategy.fedadam import ADAPTIVE_PARAMS
from fedkeeper.core.strategy.serveropt import AdaptiveOptimizer


class FedAdagrad(AdaptiveOptimizer):
    """v ← v + Δ² (beta_2 is not used by Adagrad)."""

    name = "fedadagrad"
    summary = "server-side Adagrad on the mean update (Reddi et al. 2021)"
    memory = "running sum + m and v (3 models) + the new model"
    PARAMS = {k: p for k, p in ADAPTIVE_PARAMS.items() if k != "beta_2"}

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """Sum of squares."""
        v += d2
        return v
