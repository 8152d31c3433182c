"""FedProx (Li et al. 2020): clients add a proximal term (mu/2)·‖w − w_global‖² to their loss; the server averages."""

from __future__ import annotations

from fedkeeper.core.strategy.base import Param
from fedkeeper.core.strategy.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg's aggregation; the difference is in client training, asked for through the fit config."""

    name = "fedprox"
    summary = "FedAvg whose clients add a proximal term to their training loss (Li et al. 2020)"
    memory = "running sum (1 model), as FedAvg"
    PARAMS = {"mu": Param(float, 0.01, lo=0.0, help="weight of the proximal term (mu/2)*||w - w_global||^2 in each client's loss")}

    def fit_config(self, r: int) -> dict:
        """Each client's training adds the proximal term with this mu."""
        return {"proximal_mu": float(self.params["mu"])}
