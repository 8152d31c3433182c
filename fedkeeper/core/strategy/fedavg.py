"""FedAvg (McMahan et al. 2017): the example-weighted mean of the clients' models."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedkeeper.core.aggregate import Weights
from fedkeeper.core.strategy.base import Fold, Strategy, SumFold


class FedAvg(Strategy):
    """w ← Σ nᵢ·wᵢ / Σ nᵢ over the accepted updates, streamed as a running sum."""

    name = "fedavg"
    summary = "example-weighted average of the client models (McMahan et al. 2017)"
    memory = "running sum (1 model)"

    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """The weighted mean, computed in the sum's own memory."""
        assert isinstance(fold, SumFold)
        return fold.sum.result(in_place=True), None
