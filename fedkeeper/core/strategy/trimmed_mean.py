"""Coordinate-wise trimmed mean (Yin et al. 2018): drop the beta share of largest and smallest values, average the rest."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedkeeper.core.aggregate import Weights
from fedkeeper.core.strategy.base import Fold, Param
from fedkeeper.core.strategy.blocks import BLOCK_PARAM, BlockFold, RobustStrategy


def trimmed(x: np.ndarray, beta: float) -> np.ndarray:
    """Mean over axis 0 after cutting ⌊beta·n⌋ values from each end of every column."""
    n = x.shape[0]
    cut = int(beta * n)
    if cut == 0:
        return x.mean(axis=0)
    part = np.partition(x, (cut, n - cut - 1), axis=0)
    return part[cut:n - cut].mean(axis=0)


class TrimmedMean(RobustStrategy):
    """Each coordinate: the mean of the values left after trimming ⌊beta·N⌋ from each end (unweighted)."""

    name = "trimmed_mean"
    summary = "coordinate-wise trimmed mean of the client models (Yin et al. 2018)"
    memory = "N x block (block_mb) + the new model"
    PARAMS = {"beta": Param(float, 0.2, lo=0.0, hi=0.49, help="share of values cut from each end of every coordinate, in [0, 0.5)"),
              "block_mb": BLOCK_PARAM}

    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """The trimmed mean of every block."""
        assert isinstance(fold, BlockFold)
        beta = float(self.params["beta"])
        return fold.coordinatewise(range(len(fold.ids)), lambda x: trimmed(x, beta)), None
