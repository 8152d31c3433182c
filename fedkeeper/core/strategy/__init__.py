"""Aggregation strategies behind one interface, chosen by `strategy.name` with `strategy.params`."""

from __future__ import annotations

from typing import Any, Mapping

from fedkeeper.core.strategy.base import Fold, Param, Reader, Settings, Strategy, SumFold
from fedkeeper.core.strategy.bulyan import Bulyan
from fedkeeper.core.strategy.fedadagrad import FedAdagrad
from fedkeeper.core.strategy.fedadam import FedAdam
from fedkeeper.core.strategy.fedavg import FedAvg
from fedkeeper.core.strategy.fedavgm import FedAvgM
from fedkeeper.core.strategy.fednova import FedNova
from fedkeeper.core.strategy.fedprox import FedProx
from fedkeeper.core.strategy.fedyogi import FedYogi
from fedkeeper.core.strategy.krum import Krum
from fedkeeper.core.strategy.median import Median
from fedkeeper.core.strategy.multikrum import MultiKrum
from fedkeeper.core.strategy.scaffold import Scaffold
from fedkeeper.core.strategy.trimmed_mean import TrimmedMean

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, Scaffold, FedNova,
    Median, TrimmedMean, Krum, MultiKrum, Bulyan)}


def names() -> tuple[str, ...]:
    """Every strategy name a config may use."""
    return tuple(REGISTRY)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe(prefix: str = "# ") -> str:
    """Every strategy with its parameters, defaults and memory, as comment lines (for `fedkeeper init`)."""
    lines = ["Strategies (strategy.name) and their parameters (strategy.params, defaults shown):"]
    for name, cls in REGISTRY.items():
        lines.append(f"  {name}: {cls.summary}")
        if cls.memory:
            lines.append(f"      memory: {cls.memory}")
        for key, p in cls.PARAMS.items():
            lines.append(f"      {key}: {_value(p.default)}  ({p.help})")
        if not cls.PARAMS:
            lines.append("      (no parameters)")
    return "".join(f"{prefix}{line}".rstrip() + "\n" for line in lines)


def check_params(name: str, params: Any) -> tuple[dict, list[tuple[str, str, str]]]:
    """(validated params, errors as (field, problem, fix)) for strategy `name`."""
    cls = REGISTRY[name]
    if not isinstance(params, Mapping):
        return {}, [("strategy.params", f"expected a mapping, got {params!r}", "write params as key: value lines")]
    out, errors = {}, []
    for key, value in params.items():
        spec = cls.PARAMS.get(key)
        path = f"strategy.params.{key}"
        if spec is None:
            valid = ", ".join(sorted(cls.PARAMS)) or f"none ({name} takes no parameters)"
            errors.append((path, f"unknown parameter for strategy {name}", f"remove it or use one of: {valid}"))
            continue
        ok, err = spec.check(path, value)
        if err:
            errors.append(err)
        else:
            out[key] = ok
    return out, errors


def create(name: str, settings: Settings | None = None, params: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy called `name`; raises KeyError naming the valid ones."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; use one of: {', '.join(REGISTRY)}") from None
    return cls(settings, params)


def from_config(cfg: Any) -> Strategy:
    """The strategy a FederationConfig names, with its sampling and quorum settings."""
    s = cfg.strategy
    settings = Settings(fraction=s.fraction, min_clients=s.min_clients, quorum=s.quorum,
                        population=len(getattr(cfg, "clients", None) or []),
                        client_lr=float(getattr(getattr(cfg, "model", None), "learning_rate", 0.0) or 0.0))
    strategy = create(s.name, settings, getattr(s, "params", None) or {})
    privacy = getattr(cfg, "privacy", None)
    # Under secure aggregation the clients clip and share the noise themselves: the aggregator has no updates to clip.
    if privacy is not None and privacy.dp.mode == "central" and not privacy.secure_aggregation:
        from fedkeeper.core.privacy import dp  # imported here: it builds on this package's base

        strategy = dp.wrap(strategy, privacy.dp)
    return strategy


__all__ = ["Strategy", "Fold", "SumFold", "Param", "Reader", "Settings", "REGISTRY", "names", "check_params",
           "create", "from_config", "describe"]
