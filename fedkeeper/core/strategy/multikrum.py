"""Multi-Krum (El Mhamdi et al. 2018): the example-weighted mean of the m updates with the lowest Krum scores."""

from __future__ import annotations

from fedkeeper.core.strategy.base import Param
from fedkeeper.core.strategy.blocks import BLOCK_PARAM, BlockFold, distances, krum_scores, ranked
from fedkeeper.core.strategy.krum import F_PARAM, Krum


class MultiKrum(Krum):
    """Krum's scores, then the mean of the best m (m = 0 keeps n − f)."""

    name = "multikrum"
    summary = "mean of the m client models with the best Krum scores (El Mhamdi et al. 2018)"
    memory = "N x block (block_mb) for the Gram pass + N^2 distances + 2 models"
    PARAMS = {"f": F_PARAM, "m": Param(int, 0, lo=0, help="how many updates to average; 0 keeps n - f"),
              "block_mb": BLOCK_PARAM}

    def select(self, fold: BlockFold) -> list[int]:
        """The m rows with the lowest scores (ties broken by client id)."""
        n = len(fold.ids)
        scores = krum_scores(distances(fold.gram()), range(n), int(self.params["f"]))
        m = int(self.params["m"]) or n - int(self.params["f"])
        m = max(1, min(n, m))
        return sorted(ranked(scores, fold.ids)[:m])
