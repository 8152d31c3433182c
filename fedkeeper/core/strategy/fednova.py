"""FedNova (Wang et al. 2020): average the clients' progress normalised by their local steps, then rescale."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedkeeper.core.aggregate import RunningSum, Weights
from fedkeeper.core.strategy.base import Fold, Param, Reader, Strategy
from fedkeeper.core.strategy.steps import local_steps


def norm_a(tau: int, rho: float) -> float:
    """‖aᵢ‖₁ for τ local steps of SGD with momentum ρ (τ itself without momentum)."""
    if rho == 0:
        return float(tau)
    return (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)


class NovaFold(Fold):
    """Σ (nᵢ/aᵢ)·wᵢ as a running sum, with the scalars Σ nᵢ/aᵢ, Σ nᵢ·aᵢ and Σ nᵢ."""

    def __init__(self, a: Mapping[str, float], dtype: type) -> None:
        self.a = a
        self.sum = RunningSum(dtype)
        self.n_a = 0.0
        self.n = 0.0

    def add(self, client: str, tensors: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Add wᵢ weighted by nᵢ/aᵢ."""
        a = self.a[client]
        self.sum.add(tensors, num_examples / a)
        self.n_a += num_examples * a
        self.n += num_examples

    def finite(self) -> bool:
        """True unless the sum holds NaN or Inf."""
        return self.sum.finite()


class FedNova(Strategy):
    """w ← w − η·τ_eff·Σ pᵢ·(w − wᵢ)/aᵢ with pᵢ = nᵢ/Σn and τ_eff = Σ pᵢ·aᵢ."""

    composes = False  # its fold is not a plain sum: tree mode folds it in one place

    name = "fednova"
    summary = "normalised averaging by each client's local steps (Wang et al. 2020)"
    memory = "running sum (1 model) + the new model"
    PARAMS = {
        "server_lr": Param(float, 1.0, lo=0.0, help="server step size eta on the normalised update"),
        "local_momentum": Param(float, 0.0, lo=0.0, hi=0.99, help="the clients' SGD momentum rho, which sets a_i"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # check() sees each update's metadata before its fold receives the tensors: it records a_i here.
        self._a: dict[str, float] = {}

    def check(self, client: str, meta: Mapping[str, Any]) -> str | None:
        """Reject an update without a valid local step count; remember aᵢ for the fold."""
        k, why = local_steps(self.name, meta)
        if why:
            return why
        self._a[client] = norm_a(k, float(self.params["local_momentum"]))
        return None

    def begin(self, global_weights: Mapping[str, np.ndarray] | None, state: Weights | None,
              dtype: type = np.float32, reader: Reader | None = None) -> Fold:
        """A running sum weighted by nᵢ/aᵢ."""
        return NovaFold(self._a, dtype)

    @property
    def needs_global(self) -> bool:
        """The normalised step is taken from the global model."""
        return True

    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """w + η·τ_eff·(T/Σn)·(S/T − w), where S/T is the nᵢ/aᵢ-weighted mean of the client models."""
        assert isinstance(fold, NovaFold) and global_weights is not None
        t_sum = fold.sum.total
        scale = np.float32(self.params["server_lr"] * (fold.n_a / fold.n) * (t_sum / fold.n))
        out = fold.sum.result(in_place=True)
        for name, m in out.items():
            w = np.asarray(global_weights[name], dtype=m.dtype)
            m -= w
            m *= scale
            m += w
        return out, None
