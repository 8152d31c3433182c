"""Krum (Blanchard et al. 2017): the update whose n − f − 2 nearest neighbours are closest wins."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedkeeper.core.aggregate import Weights
from fedkeeper.core.strategy.base import Fold, Param
from fedkeeper.core.strategy.blocks import BLOCK_PARAM, BlockFold, RobustStrategy, distances, krum_scores, ranked

F_PARAM = Param(int, 1, lo=0, help="how many Byzantine clients to tolerate (the guarantee needs n >= 2f + 3 updates)")


class Krum(RobustStrategy):
    """Pick the single update with the lowest Krum score; distances come from a block-wise Gram matrix."""

    name = "krum"
    summary = "the one client model closest to its n - f - 2 nearest neighbours (Blanchard et al. 2017)"
    memory = "N x block (block_mb) for the Gram pass + N^2 distances + the new model"
    PARAMS = {"f": F_PARAM, "block_mb": BLOCK_PARAM}

    def select(self, fold: BlockFold) -> list[int]:
        """Rows of the chosen update(s)."""
        scores = krum_scores(distances(fold.gram()), range(len(fold.ids)), int(self.params["f"]))
        return ranked(scores, fold.ids)[:1]

    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """The chosen update (MultiKrum: the example-weighted mean of the chosen ones)."""
        assert isinstance(fold, BlockFold)
        rows = self.select(fold)
        return (fold.copy_of(rows[0]) if len(rows) == 1 else fold.mean_of(rows)), None


