"""SCAFFOLD (Karimireddy et al. 2020): control variates correct each client's drift; option II for the client's."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedkeeper.core.aggregate import RunningSum, Weights
from fedkeeper.core.strategy.base import Fold, Param, Reader, Strategy
from fedkeeper.core.strategy.steps import local_steps

PREFIX = "c/"


class ScaffoldFold(Fold):
    """Two running sums: Σ yᵢ (for the model) and Σ yᵢ/Kᵢ (for the control variate)."""

    def __init__(self, steps: Mapping[str, int], dtype: type) -> None:
        self.steps = steps
        self.models = RunningSum(dtype)
        self.scaled = RunningSum(dtype)

    def add(self, client: str, tensors: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Add yᵢ with weight 1 and with weight 1/Kᵢ (the paper averages clients, not examples)."""
        self.models.add(tensors, 1.0)
        self.scaled.add(tensors, 1.0 / self.steps[client])

    def finite(self) -> bool:
        """True unless a sum holds NaN or Inf."""
        return self.models.finite() and self.scaled.finite()


class Scaffold(Strategy):
    """x ← x + η_g·mean(yᵢ − x); c ← c + (1/N)·Σ Δcᵢ with Δcᵢ = −c + (x − yᵢ)/(Kᵢ·η_l).

    Clients train with the gradient corrected by c − cᵢ and keep cᵢ in the store under their own key;
    the server needs no Δcᵢ upload, since Δcᵢ follows from x, yᵢ, Kᵢ and the clients' learning rate η_l.
    """

    composes = False  # its fold is not a plain sum: tree mode folds it in one place

    name = "scaffold"
    summary = "control variates correct client drift (Karimireddy et al. 2020); clients keep their own c_i"
    memory = "two running sums + control variate c (3 models) + the new model"
    PARAMS = {"server_lr": Param(float, 1.0, lo=0.0, help="global step size eta_g on the mean client displacement")}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steps: dict[str, int] = {}  # K_i, recorded by check() before the fold receives the update

    def fit_config(self, r: int) -> dict:
        """Clients correct their gradients with the control variates and report their local steps."""
        return {"scaffold": True}

    def check(self, client: str, meta: Mapping[str, Any]) -> str | None:
        """Reject an update without a valid local step count; remember Kᵢ."""
        k, why = local_steps(self.name, meta)
        if why:
            return why
        self._steps[client] = k
        return None

    def begin(self, global_weights: Mapping[str, np.ndarray] | None, state: Weights | None,
              dtype: type = np.float32, reader: Reader | None = None) -> Fold:
        """Two running sums."""
        return ScaffoldFold(self._steps, dtype)

    @property
    def needs_global(self) -> bool:
        """Both updates are taken from the global model."""
        return True

    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """The new model and the new server control variate c (state tensors c/<name>)."""
        assert isinstance(fold, ScaffoldFold) and global_weights is not None
        lr = self.settings.client_lr
        if lr <= 0:
            raise ValueError("scaffold needs the clients' learning rate (model.learning_rate > 0)")
        s = fold.models.count
        population = max(self.settings.population, s)
        inv_k = fold.scaled.total  # Σ 1/Kᵢ
        eta = np.float32(self.params["server_lr"])
        keep = np.float32(1.0 - s / population)
        c_scale = np.float32(inv_k / (population * lr))
        mean_scaled = fold.scaled.result(in_place=True)  # Σ (yᵢ/Kᵢ) / Σ 1/Kᵢ
        out = fold.models.result(in_place=True)  # mean(yᵢ)
        new_state: Weights = {}
        for name, y in out.items():
            x = np.asarray(global_weights[name], dtype=np.float32)
            c = np.zeros(x.shape, np.float32)
            if state is not None and PREFIX + name in state and np.shape(state[PREFIX + name]) == x.shape:
                c = np.asarray(state[PREFIX + name], dtype=np.float32).copy()
            # Σ (x − yᵢ)/Kᵢ = (x − mean_scaled)·Σ 1/Kᵢ
            c *= keep
            d = mean_scaled[name]
            np.subtract(x, d, out=d)
            d *= c_scale
            c += d
            new_state[PREFIX + name] = c
            y -= x
            y *= eta
            y += x
        return out, new_state
