"""Coordinate-wise median (Yin et al. 2018), computed over coordinate blocks of every update."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedkeeper.core.aggregate import Weights
from fedkeeper.core.strategy.base import Fold
from fedkeeper.core.strategy.blocks import BLOCK_PARAM, BlockFold, RobustStrategy


class Median(RobustStrategy):
    """Each coordinate of the model is the median of that coordinate over the accepted updates (unweighted)."""

    name = "median"
    summary = "coordinate-wise median of the client models (Yin et al. 2018)"
    memory = "N x block (block_mb) + the new model"
    PARAMS = {"block_mb": BLOCK_PARAM}

    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """The median of every block."""
        assert isinstance(fold, BlockFold)
        return fold.coordinatewise(range(len(fold.ids)), lambda x: np.median(x, axis=0)), None
