"""FedYogi (Reddi et al. 2021): Yogi on the server, whose second moment grows additively and so more gently."""

from __future__ import annotations

import numpy as np

from fedkeeper.core.strategy.fedadam import ADAPTIVE_PARAMS
from fedkeeper.core.strategy.serveropt import AdaptiveOptimizer


class FedYogi(AdaptiveOptimizer):
    """v ← v − (1−β₂)·Δ²·sign(v − Δ²)."""

    name = "fedyogi"
    summary = "server-side Yogi on the mean update (Reddi et al. 2021)"
    memory = "running sum + m and v (3 models) + the new model"
    PARAMS = dict(ADAPTIVE_PARAMS)

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """Yogi's additive second moment."""
        s = np.sign(v - d2)
        d2 *= np.float32(1) - np.float32(self.params["beta_2"])
        d2 *= s
        v -= d2
        return v
