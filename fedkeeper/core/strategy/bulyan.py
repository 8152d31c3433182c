"""Bulyan (El Mhamdi et al. 2018): Krum picks θ = n − 2f updates, then a trimmed mean around their median."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedkeeper.core.aggregate import Weights
from fedkeeper.core.strategy.base import Fold, Param
from fedkeeper.core.strategy.blocks import BLOCK_PARAM, BlockFold, RobustStrategy, distances, krum_scores, ranked


def closest_mean(x: np.ndarray, beta: int) -> np.ndarray:
    """Per column, the mean of the beta values closest to the column's median."""
    med = np.median(x, axis=0)
    # Which beta are nearest is all that matters, not their order: a partition is enough.
    idx = np.argpartition(np.abs(x - med), beta - 1, axis=0)[:beta]
    return np.take_along_axis(x, idx, axis=0).mean(axis=0)


class Bulyan(RobustStrategy):
    """Recursive Krum selects θ = n − 2f updates; each coordinate averages the β = θ − 2f values nearest its median."""

    name = "bulyan"
    summary = "Krum selection, then a coordinate-wise trimmed mean around the median (El Mhamdi et al. 2018)"
    memory = "N x block (block_mb) + N^2 distances + the new model"
    # The block, |x − median|, the partition's int64 indices and the gathered values.
    bytes_per_coord = 28
    PARAMS = {"f": Param(int, 1, lo=0, help="how many Byzantine clients to tolerate; needs n >= 4f + 3 updates, else f is lowered to (n - 3) // 4"),
              "block_mb": BLOCK_PARAM}

    def tolerated(self, n: int) -> int:
        """f, lowered to (n − 3) // 4 when fewer than 4f + 3 updates were accepted (e.g. after the norm bound
        rejected some), so that a round with fewer updates still aggregates rather than failing."""
        return max(0, min(int(self.params["f"]), (n - 3) // 4))

    def select(self, fold: BlockFold) -> list[int]:
        """θ rows chosen one at a time by Krum over the rows not yet chosen."""
        f = self.tolerated(len(fold.ids))
        dist = distances(fold.gram())
        left = list(range(len(fold.ids)))
        chosen = []
        for _ in range(max(1, len(left) - 2 * f)):
            best = left[ranked(krum_scores(dist, left, f), [fold.ids[i] for i in left])[0]]
            chosen.append(best)
            left.remove(best)
        return chosen

    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """The coordinate-wise mean of the β values closest to the median of the selected updates."""
        assert isinstance(fold, BlockFold)
        rows = sorted(self.select(fold))
        beta = max(1, len(rows) - 2 * self.tolerated(len(fold.ids)))
        return fold.coordinatewise(rows, lambda x: closest_mean(x, beta)), None
