"""Differential privacy on model updates: L2 clipping, Gaussian noise, adaptive clipping, and a strategy wrapper.

Central DP (DP-FedAvg, McMahan et al. 2018): each accepted update's difference from the global model is clipped
to the clip norm C and counts once (not by its examples, which would scale one client's influence past C); the sum
of the clipped differences gets Gaussian noise of standard deviation z·C, so one client's presence changes what is
released by at most C in L2 and the Gaussian mechanism with multiplier z applies. Adaptive clipping (Andrew et al.
2021) moves C each round towards a target quantile of the update norms, from a noised count of unclipped updates;
the noise budget z is split between the sum and the count so the round as a whole stays a Gaussian mechanism with
multiplier z.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Mapping, Sequence

import numpy as np

from fedkeeper.core.aggregate import Weights, global_norm
from fedkeeper.core.privacy.settings import DPConfig
from fedkeeper.core.strategy.base import Fold, Strategy, SumFold

CLIP_KEY = "dp.clip_norm"  # the adaptive clip norm, kept in the server-state blob


def clip(delta: Mapping[str, np.ndarray], clip_norm: float) -> tuple[Weights, float]:
    """(delta scaled to L2 norm at most clip_norm, its norm before clipping)."""
    norm = global_norm(delta)
    factor = 1.0 if norm <= clip_norm or norm == 0 else clip_norm / norm
    return {k: (np.asarray(v, dtype=np.float64) * factor).astype(np.float32) for k, v in delta.items()}, norm


def difference(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Weights:
    """weights − reference, tensor by tensor, in float32."""
    return {k: np.asarray(w, dtype=np.float32) - np.asarray(reference[k], dtype=np.float32) for k, w in weights.items()}


def make_rng(seed: Any = None) -> np.random.Generator:
    """A generator for noise: seeded only in tests; otherwise from the OS, so nobody can recompute and remove it."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


def add_noise(tensors: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> None:
    """Add N(0, std²) to every value, in place."""
    if std <= 0:
        return
    for t in tensors.values():
        flat = t.reshape(-1)
        for start in range(0, flat.size, 1 << 20):  # in slices, so the float64 draw stays small
            part = flat[start:start + (1 << 20)]
            part += rng.normal(0.0, std, size=part.size).astype(part.dtype)


def local_dp(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], clip_norm: float,
             noise_multiplier: float, rng: np.random.Generator | None = None) -> tuple[Weights, dict]:
    """A client's own release: reference + clip(weights − reference) + N(0, (z·C)²); returns (weights, report)."""
    rng = rng or make_rng()
    delta, norm = clip(difference(weights, reference), clip_norm)
    add_noise(delta, noise_multiplier * clip_norm, rng)
    out = {k: (np.asarray(reference[k], dtype=np.float32) + d).astype(np.float32) for k, d in delta.items()}
    return out, {"update_norm": float(norm), "clipped": bool(norm > clip_norm)}


def count_stddev(dp: DPConfig, clients: int) -> float:
    """σ_b, the noise on the count of unclipped updates: configured, or clients / 20 as Andrew et al. suggest."""
    return dp.count_stddev if dp.count_stddev > 0 else max(clients, 1) / 20.0


def sum_noise_multiplier(dp: DPConfig, clients: int) -> float:
    """The multiplier left for the sum once adaptive clipping's count takes its share: (z⁻² − (2σ_b)⁻²)^(-1/2)."""
    z = dp.noise_multiplier
    if not dp.adaptive or z <= 0:
        return z
    sb = count_stddev(dp, clients)
    rest = z ** -2 - (2.0 * sb) ** -2
    if rest <= 0:
        raise ValueError(f"count noise {sb:g} is too small for noise_multiplier {z:g}; "
                         "raise privacy.dp.count_stddev above noise_multiplier / 2")
    return rest ** -0.5


def next_clip_norm(clip_norm: float, unclipped: float, clients: int, dp: DPConfig) -> float:
    """Andrew et al.'s geometric update C ← C·exp(−η(b̄ − γ)), b̄ the (noised) share of unclipped updates."""
    share = unclipped / max(clients, 1)
    return float(clip_norm * math.exp(-dp.clip_learning_rate * (share - dp.target_quantile)))


class DPFold(Fold):
    """Clips each update's difference from the global model and feeds global + clipped difference, weight 1, to a sum."""

    def __init__(self, inner: SumFold, global_weights: Mapping[str, np.ndarray], clip_norm: float) -> None:
        self.inner = inner
        self.global_weights = global_weights
        self.clip_norm = clip_norm
        self.unclipped = 0
        self.norms: list[float] = []

    def add(self, client: str, tensors: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Clip, then add with weight 1: a client's influence is bounded by the clip norm, not by its data size."""
        delta, norm = clip(difference(tensors, self.global_weights), self.clip_norm)
        self.norms.append(norm)
        self.unclipped += int(norm <= self.clip_norm)
        self.inner.add(client, {k: np.asarray(self.global_weights[k], dtype=np.float32) + d for k, d in delta.items()}, 1)

    def finite(self) -> bool:
        """As the sum's."""
        return self.inner.finite()


class DPStrategy(Strategy):
    """Central DP around an averaging strategy: selection, checks and metrics are the inner one's."""

    composes = False  # its fold clips against the global model; tree mode folds plain running sums only

    def __init__(self, inner: Strategy, dp: DPConfig, rng: np.random.Generator | None = None) -> None:
        self.inner = inner
        self.dp = dp
        self.rng = rng
        self.settings = inner.settings
        self.params = inner.params
        self.name = inner.name
        self.last: dict = {}  # what the last finish() did, for the round's result record

    def configure(self, r: int, clients: Sequence[Mapping[str, Any]], seed: int) -> list[dict]:
        """The inner strategy's selection."""
        return self.inner.configure(r, clients, seed)

    def fit_config(self, r: int) -> dict:
        """The inner strategy's fit config."""
        return self.inner.fit_config(r)

    def sample_size(self, population: int) -> int:
        """The inner strategy's sample size."""
        return self.inner.sample_size(population)

    def min_included(self, selected: int) -> int:
        """The inner strategy's quorum."""
        return self.inner.min_included(selected)

    def check(self, client: str, meta: Mapping[str, Any]) -> str | None:
        """The inner strategy's check."""
        return self.inner.check(client, meta)

    def metrics(self, client_meta: Mapping[str, Mapping], included: Any) -> dict:
        """The inner strategy's metrics."""
        return self.inner.metrics(client_meta, included)

    @property
    def needs_global(self) -> bool:
        """Clipping measures each update against the global model."""
        return True

    def _split(self, state: Weights | None) -> tuple[Weights | None, float]:
        clip_norm = self.dp.clip_norm
        if not state:
            return state, clip_norm
        inner = {k: v for k, v in state.items() if k != CLIP_KEY}
        if self.dp.adaptive and CLIP_KEY in state:
            v = float(np.asarray(state[CLIP_KEY]).reshape(-1)[0])
            if math.isfinite(v) and v > 0:
                clip_norm = v
        return inner or None, clip_norm

    def begin(self, global_weights: Mapping[str, np.ndarray] | None, state: Weights | None,
              dtype: type = np.float32, *args: Any, **kwargs: Any) -> Fold:
        """A clipping fold over the inner strategy's running sum."""
        if global_weights is None:
            raise ValueError("central DP clips against the global model, which was not given")
        inner_state, clip_norm = self._split(state)
        fold = self.inner.begin(global_weights, inner_state, dtype, *args, **kwargs)
        if not isinstance(fold, SumFold):
            raise ValueError(f"strategy {self.inner.name} does not aggregate by a running sum; central DP needs one")
        return DPFold(fold, global_weights, clip_norm)

    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """Noise the sum of clipped updates, let the inner strategy finish, and move the adaptive clip norm."""
        assert isinstance(fold, DPFold)
        rng = self.rng or make_rng()
        n = fold.inner.sum.count
        z_sum = sum_noise_multiplier(self.dp, n)
        std = z_sum * fold.clip_norm
        add_noise(fold.inner.sum.sums, std, rng)
        inner_state, _ = self._split(state)
        weights, new_inner = self.inner.finish(fold.inner, global_weights, inner_state)
        new_state = dict(new_inner or {})
        report = {"mode": "central", "clip_norm": fold.clip_norm, "noise_std": std, "noise_multiplier": self.dp.noise_multiplier,
                  "sum_noise_multiplier": z_sum, "clients": n, "clipped": n - fold.unclipped,
                  "median_update_norm": float(np.median(fold.norms)) if fold.norms else None}
        if self.dp.adaptive:
            sb = count_stddev(self.dp, n) if self.dp.noise_multiplier > 0 else 0.0
            noisy = fold.unclipped + (rng.normal(0.0, sb) if sb > 0 else 0.0)
            nxt = next_clip_norm(fold.clip_norm, noisy, n, self.dp)
            new_state[CLIP_KEY] = np.array([nxt], dtype=np.float64)
            report.update(next_clip_norm=nxt, count_stddev=sb)
        self.last = report
        return weights, new_state or None


def is_linear(strategy: Strategy) -> bool:
    """True if the strategy aggregates through a running sum (FedAvg's family): masking and DP noise compose with it."""
    flag = getattr(strategy, "linear", None)
    if isinstance(flag, bool):
        return flag
    return type(strategy).begin is Strategy.begin


def wrap(strategy: Strategy, dp: DPConfig | None, rng: np.random.Generator | None = None) -> Strategy:
    """The strategy with central DP around it when the config asks for it; unchanged otherwise."""
    if dp is None or dp.mode != "central":
        return strategy
    return DPStrategy(strategy, dp, rng)
