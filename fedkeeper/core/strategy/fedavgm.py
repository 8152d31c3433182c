"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum on the pseudo-gradient."""

from __future__ import annotations

import numpy as np

from fedkeeper.core.aggregate import Weights
from fedkeeper.core.strategy.base import Param
from fedkeeper.core.strategy.serveropt import ServerOptimizer, slot


class FedAvgM(ServerOptimizer):
    """p = w − mean(wᵢ); v ← β·v + p; w ← w − η·v. The momentum v is server state."""

    name = "fedavgm"
    summary = "FedAvg with server momentum (Hsu et al. 2019)"
    memory = "running sum + momentum (2 models) + the new model"
    PARAMS = {
        "server_learning_rate": Param(float, 1.0, lo=0.0, help="server step size eta applied to the momentum"),
        "server_momentum": Param(float, 0.9, lo=0.0, hi=1.0, help="momentum beta (0 is FedAvg with a server step size)"),
    }

    def step(self, name: str, delta: np.ndarray, weight: np.ndarray, state: Weights | None, new_state: Weights,
             t: int) -> None:
        """v ← β·v − Δ; w ← w − η·v (Δ = mean − w is the negative pseudo-gradient)."""
        v = slot(state, "v", name, delta)
        v *= np.float32(self.params["server_momentum"])
        v -= delta
        new_state[f"v/{name}"] = v
        np.multiply(v, np.float32(-self.params["server_learning_rate"]), out=delta)
        delta += weight
