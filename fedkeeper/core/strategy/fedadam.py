"""FedAdam (Reddi et al. 2021): Adam on the server, with the clients' mean update as the pseudo-gradient."""

from __future__ import annotations

import math

import numpy as np

from fedkeeper.core.strategy.base import Param
from fedkeeper.core.strategy.serveropt import AdaptiveOptimizer

ADAPTIVE_PARAMS = {
    "eta": Param(float, 0.01, lo=0.0, help="server learning rate"),
    "beta_1": Param(float, 0.9, lo=0.0, hi=0.999999, help="first-moment decay, in [0, 1)"),
    "beta_2": Param(float, 0.99, lo=0.0, hi=0.999999, help="second-moment decay, in [0, 1)"),
    "tau": Param(float, 1e-3, lo=1e-12, help="adaptivity: added to sqrt(v), so small v cannot blow up the step"),
}


class FedAdam(AdaptiveOptimizer):
    """v ← β₂v + (1−β₂)Δ²; optional Kingma–Ba bias correction of the step size."""

    name = "fedadam"
    summary = "server-side Adam on the mean update (Reddi et al. 2021)"
    memory = "running sum + m and v (3 models) + the new model"
    PARAMS = dict(ADAPTIVE_PARAMS, bias_correction=Param(
        bool, False, help="scale eta by sqrt(1-beta_2^t)/(1-beta_1^t) as Adam does (the paper's Algorithm 2 does not)"))

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """Exponential moving average of Δ²."""
        b2 = np.float32(self.params["beta_2"])
        v *= b2
        d2 *= np.float32(1) - b2
        v += d2
        return v

    def lr(self, t: int) -> float:
        """eta, bias-corrected for step t when asked."""
        eta = float(self.params["eta"])
        if not self.params["bias_correction"]:
            return eta
        return eta * math.sqrt(1 - self.params["beta_2"] ** t) / (1 - self.params["beta_1"] ** t)
