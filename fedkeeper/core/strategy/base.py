"""The Strategy interface: configure a round, accept updates, fold them as a stream, finish, report metrics."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from fedkeeper.core.aggregate import RunningSum, Weights

# Re-opens an accepted update's tensors by client id (mapped on the folder store, downloaded again elsewhere):
# folds that need every update per coordinate read them block by block instead of holding them.
Reader = Callable[[str], Mapping[str, np.ndarray]]

MSG_UNKNOWN_PARAM = "unknown parameter for strategy {name}"
MSG_FIX_PARAM = "remove it or use one of: {valid}"


@dataclass(frozen=True)
class Param:
    """One strategy parameter: its type, default, bounds and a line of help for `fedkeeper init`."""

    kind: type
    default: Any
    lo: float | None = None
    hi: float | None = None
    help: str = ""

    def check(self, path: str, value: Any) -> tuple[Any, tuple[str, str, str] | None]:
        """(value, None) if valid, else (None, (field, problem, fix))."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value, None
            return None, (path, f"expected true or false, got {value!r}", f"set {path} to true or false")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                self.kind is int and not float(value).is_integer()):
            what = "a whole number" if self.kind is int else "a number"
            return None, (path, f"expected {what}, got {value!r}", f"set {path} to {what}")
        value = self.kind(value)
        if self.lo is not None and value < self.lo:
            return None, (path, f"must be >= {self.lo}, got {value}", f"set {path} to {self.lo} or more")
        if self.hi is not None and value > self.hi:
            return None, (path, f"must be <= {self.hi}, got {value}", f"set {path} to {self.hi} or less")
        return value, None


@dataclass
class Settings:
    """The protocol's share of the strategy config that every strategy sees (sampling and quorum)."""

    fraction: float = 1.0
    min_clients: int = 1
    quorum: float = 0.5
    population: int = 0  # clients in the federation (SCAFFOLD averages its control variate over all of them)
    client_lr: float = 0.0  # the clients' learning rate (SCAFFOLD turns model displacement into a gradient estimate)


class Fold(abc.ABC):
    """A strategy's accumulator for one round: updates are added one at a time, in a fixed order."""

    @abc.abstractmethod
    def add(self, client: str, tensors: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Take one accepted update into the fold."""

    @abc.abstractmethod
    def finite(self) -> bool:
        """False if the fold holds NaN or Inf (an overflow or a bad value got in)."""


class SumFold(Fold):
    """The running sum Σ nᵢ·wᵢ, the engine of every linear strategy: O(model) memory."""

    def __init__(self, dtype: type = np.float32) -> None:
        self.sum = RunningSum(dtype)

    def add(self, client: str, tensors: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Add nᵢ·wᵢ."""
        self.sum.add(tensors, num_examples)

    def finite(self) -> bool:
        """True unless the sum overflowed or took a non-finite value."""
        return self.sum.finite()


class Strategy(abc.ABC):
    """One aggregation algorithm, pure and numpy-only; server state travels as tensors the protocol stores."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    memory: ClassVar[str] = ""  # what one aggregation holds in memory, for the docs and `fedkeeper init`
    PARAMS: ClassVar[dict[str, Param]] = {}
    # True when begin() returns a SumFold whose partial sums compose: tree mode may fold it in groups.
    composes: ClassVar[bool] = True

    def __init__(self, settings: Settings | None = None, params: Mapping[str, Any] | None = None) -> None:
        self.settings = settings or Settings()
        self.params = {k: p.default for k, p in self.PARAMS.items()}
        self.params.update(params or {})

    # -- configure -------------------------------------------------------------------------------
    def sample_size(self, population: int) -> int:
        """How many clients a round selects: max(min_clients, ⌈fraction·N⌉), at most N."""
        return min(population, max(self.settings.min_clients, math.ceil(self.settings.fraction * population)))

    def configure(self, r: int, clients: Sequence[Mapping[str, Any]], seed: int) -> list[dict]:
        """Select round r's clients (seeded, deterministic) and give each its fit config."""
        n = len(clients)
        k = self.sample_size(n)
        rng = np.random.default_rng([seed, r])
        idx = sorted(rng.choice(n, size=k, replace=False).tolist()) if k < n else list(range(n))
        fit = self.fit_config(r)
        return [dict(clients[i], config=dict(fit)) for i in idx]

    def fit_config(self, r: int) -> dict:
        """Settings a client's training needs from this strategy (e.g. a proximal term); none by default."""
        return {}

    def min_included(self, selected: int) -> int:
        """The quorum: how many accepted updates a round needs to produce a new model."""
        return max(1, math.ceil(self.settings.quorum * selected))

    # -- accept and aggregate --------------------------------------------------------------------
    def check(self, client: str, meta: Mapping[str, Any]) -> str | None:
        """Why this strategy refuses an update the protocol accepted, or None (the default accepts)."""
        return None

    def begin(self, global_weights: Mapping[str, np.ndarray] | None, state: Weights | None,
              dtype: type = np.float32, reader: Reader | None = None) -> Fold:
        """A fresh fold for one round; `reader` re-opens an accepted update by client id (robust folds use it)."""
        return SumFold(dtype)

    @abc.abstractmethod
    def finish(self, fold: Fold, global_weights: Mapping[str, np.ndarray] | None,
               state: Weights | None) -> tuple[Weights, Weights | None]:
        """(new global weights, new server state or None) from a fold holding at least one update."""

    @property
    def needs_global(self) -> bool:
        """True if finish() reads the global model (server optimizers); FedAvg does not."""
        return False

    # -- metrics ---------------------------------------------------------------------------------
    def metrics(self, client_meta: Mapping[str, Mapping], included: Iterable[str]) -> dict:
        """Federated metrics: example-weighted means of what the clients reported (holdout before training)."""
        out: dict[str, float | None] = {}
        pairs = (("accuracy", "holdout_accuracy", "holdout_examples"), ("loss", "holdout_loss", "holdout_examples"),
                 ("train_loss", "train_loss", "train_examples"))
        included = list(included)
        for name, field, weight in pairs:
            num = den = 0.0
            for c in included:
                m = client_meta.get(c) or {}
                metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
                v = metrics.get(field)
                n = metrics.get(weight, m.get("num_examples") or 0)
                if _finite(v) and _finite(n) and n > 0:
                    num += float(v) * float(n)
                    den += float(n)
            out[name] = num / den if den else None
        return out


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
