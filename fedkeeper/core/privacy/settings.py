"""The `privacy` config section: differential privacy and secure aggregation settings, validated field by field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

DP_MODES = ("off", "central", "local")
ACCOUNTANTS = ("rdp", "pld")
RING_BITS = (32, 64)

Error = tuple[str, str, str]  # (field, problem, fix), as config.ConfigError takes them


@dataclass
class DPConfig:
    """Differential privacy: where noise is added, how updates are clipped, and the (ε, δ) accounting."""

    mode: str = "off"                 # off | central (noise on the sum; shared among the clients under secure
                                      # aggregation) | local (each client noises its own update)
    clip_norm: float = 1.0            # L2 bound on each update's difference from the global model
    noise_multiplier: float = 1.0     # noise std = noise_multiplier × clip_norm (on the sum, or per client in local mode)
    adaptive: bool = False            # central only: the clip norm tracks a quantile of update norms
    target_quantile: float = 0.5      # adaptive: the share of updates meant to fall under the clip norm
    clip_learning_rate: float = 0.2   # adaptive: geometric step of the clip norm per round
    count_stddev: float = 0.0         # adaptive: noise on the count of unclipped updates (0: selected / 20)
    delta: float = 1e-5
    epsilon_budget: float = 0.0       # stop before ε would exceed this (0: no budget)
    accountant: str = "rdp"           # rdp | pld (dp-accounting's accountants)

    @property
    def enabled(self) -> bool:
        """True when updates are clipped and noised somewhere."""
        return self.mode != "off"


@dataclass
class SecAggConfig:
    """Secure aggregation's parameters: Shamir threshold, neighbourhood size, ring and value range."""

    threshold: float = 0.5            # a secret needs more than this share of a client's neighbours to be rebuilt
    neighbors: int = 0                # SecAgg+ sparse graph: each client masks with this many others (0: all)
    ring_bits: int = 32               # masked arithmetic modulo 2^ring_bits
    clip_range: float = 4.0           # each coordinate of an update's difference from the global model is cut to ±this
    phase_s: float = 0.0              # how long the key and unmask phases wait for stragglers (0: a quarter of the deadline)


@dataclass
class PrivacyConfig:
    """Everything under `privacy:` in a federation config."""

    dp: DPConfig = field(default_factory=DPConfig)
    secure_aggregation: bool = False
    secagg: SecAggConfig = field(default_factory=SecAggConfig)


def _num(path: str, value: Any, kind: type, lo: float, hi: float | None = None, lo_open: bool = False,
         errors: list[Error] | None = None) -> Any:
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
        kind is int and not float(value).is_integer())
    if bad_type:
        what = "a whole number" if kind is int else "a number"
        errors.append((path, f"expected {what}, got {value!r}", f"set {path} to {what}"))
        return None
    value = kind(value)
    if value < lo or (lo_open and value == lo):
        errors.append((path, f"must be {'>' if lo_open else '>='} {lo}, got {value}",
                       f"set {path} to {'more than' if lo_open else 'at least'} {lo}"))
    elif hi is not None and value > hi:
        errors.append((path, f"must be <= {hi}, got {value}", f"set {path} to at most {hi}"))
    return value


def _keys(path: str, raw: Mapping, allowed: Any, errors: list[Error]) -> None:
    for key in raw:
        if key not in allowed:
            errors.append((f"{path}.{key}", "unknown field", f"remove it or use one of: {', '.join(sorted(allowed))}"))


def _mapping(path: str, raw: Any, errors: list[Error]) -> Mapping:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errors.append((path, f"expected a mapping, got {raw!r}", f"write {path}: as a block of key: value lines"))
        return {}
    return raw


def parse(raw: Any) -> tuple[PrivacyConfig, list[Error]]:
    """(validated PrivacyConfig, errors as (field, problem, fix)) from the raw `privacy` section."""
    errors: list[Error] = []
    top = _mapping("privacy", raw, errors)
    _keys("privacy", top, PrivacyConfig.__dataclass_fields__, errors)
    out = PrivacyConfig()
    d = _mapping("privacy.dp", top.get("dp"), errors)
    _keys("privacy.dp", d, DPConfig.__dataclass_fields__, errors)
    dp, base = out.dp, DPConfig()
    mode = d.get("mode", base.mode)
    if mode is False:  # YAML reads a bare `off` as false
        mode = "off"
    if mode not in DP_MODES:
        errors.append(("privacy.dp.mode", f"unknown value {mode!r}", f"use one of: {', '.join(DP_MODES)}"))
    else:
        dp.mode = mode
    dp.clip_norm = _num("privacy.dp.clip_norm", d.get("clip_norm", base.clip_norm), float, 0, lo_open=True, errors=errors)
    dp.noise_multiplier = _num("privacy.dp.noise_multiplier", d.get("noise_multiplier", base.noise_multiplier), float,
                               0, 1e6, errors=errors)
    adaptive = d.get("adaptive", base.adaptive)
    if not isinstance(adaptive, bool):
        errors.append(("privacy.dp.adaptive", f"expected true or false, got {adaptive!r}",
                       "set privacy.dp.adaptive to true or false (unquoted)"))
    else:
        dp.adaptive = adaptive
    dp.target_quantile = _num("privacy.dp.target_quantile", d.get("target_quantile", base.target_quantile), float,
                              0, 1, lo_open=True, errors=errors)
    dp.clip_learning_rate = _num("privacy.dp.clip_learning_rate", d.get("clip_learning_rate", base.clip_learning_rate),
                                 float, 0, 10, lo_open=True, errors=errors)
    dp.count_stddev = _num("privacy.dp.count_stddev", d.get("count_stddev", base.count_stddev), float, 0, 1e6,
                           errors=errors)
    dp.delta = _num("privacy.dp.delta", d.get("delta", base.delta), float, 0, 0.1, lo_open=True, errors=errors)
    dp.epsilon_budget = _num("privacy.dp.epsilon_budget", d.get("epsilon_budget", base.epsilon_budget), float, 0, 1e6,
                             errors=errors)
    acc = d.get("accountant", base.accountant)
    if acc not in ACCOUNTANTS:
        errors.append(("privacy.dp.accountant", f"unknown value {acc!r}", f"use one of: {', '.join(ACCOUNTANTS)}"))
    else:
        dp.accountant = acc
    if not errors and dp.adaptive and dp.mode != "central":
        errors.append(("privacy.dp.adaptive", f"adaptive clipping needs mode central, got mode {dp.mode}",
                       "set privacy.dp.mode to central, or privacy.dp.adaptive to false"))
    if not errors and dp.adaptive and dp.noise_multiplier > 0 and dp.count_stddev > 0 \
            and 2 * dp.count_stddev <= dp.noise_multiplier:
        # Andrew et al.: z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2) exists only when 2σ_b > z.
        errors.append(("privacy.dp.count_stddev", f"must be more than noise_multiplier / 2 ({dp.noise_multiplier / 2:g}), "
                                                  f"got {dp.count_stddev:g}",
                       "raise privacy.dp.count_stddev or set it to 0 for the default (selected clients / 20)"))
    if not errors and dp.mode == "off" and dp.epsilon_budget > 0:
        errors.append(("privacy.dp.epsilon_budget", "a budget needs differential privacy on",
                       "set privacy.dp.mode to central or local, or remove the budget"))

    sa = top.get("secure_aggregation", False)
    if not isinstance(sa, bool):
        errors.append(("privacy.secure_aggregation", f"expected true or false, got {sa!r}",
                       "set privacy.secure_aggregation to true or false (unquoted)"))
    else:
        out.secure_aggregation = sa
    s = _mapping("privacy.secagg", top.get("secagg"), errors)
    _keys("privacy.secagg", s, SecAggConfig.__dataclass_fields__, errors)
    sbase = SecAggConfig()
    out.secagg = SecAggConfig(
        threshold=_num("privacy.secagg.threshold", s.get("threshold", sbase.threshold), float, 0, 1, lo_open=True,
                       errors=errors),
        neighbors=_num("privacy.secagg.neighbors", s.get("neighbors", sbase.neighbors), int, 0, 100000, errors=errors),
        ring_bits=_num("privacy.secagg.ring_bits", s.get("ring_bits", sbase.ring_bits), int, 32, 64, errors=errors),
        clip_range=_num("privacy.secagg.clip_range", s.get("clip_range", sbase.clip_range), float, 0, 1e6, lo_open=True,
                        errors=errors),
        phase_s=_num("privacy.secagg.phase_s", s.get("phase_s", sbase.phase_s), float, 0, errors=errors),
    )
    if out.secagg.ring_bits not in RING_BITS and out.secagg.ring_bits is not None:
        errors.append(("privacy.secagg.ring_bits", f"must be 32 or 64, got {out.secagg.ring_bits}",
                       "set privacy.secagg.ring_bits to 32 or 64"))
    if not errors and out.secure_aggregation and dp.adaptive:
        errors.append(("privacy.dp.adaptive", "adaptive clipping needs each update's norm, and under secure aggregation "
                                              "the aggregator sees only the masked sum",
                       "set privacy.dp.adaptive to false (a fixed clip_norm), or turn secure aggregation off"))
    return out, errors


def check_strategy(privacy: PrivacyConfig, strategy_name: str, linear: bool) -> list[Error]:
    """Errors for a strategy that cannot run under these privacy settings (robust ones under masking or DP)."""
    if linear:
        return []
    if privacy.secure_aggregation:
        return [("strategy.name", f"strategy {strategy_name} needs every update in the clear, and secure aggregation "
                                  "lets the aggregator see only their sum",
                 "use fedavg or another averaging strategy, or set privacy.secure_aggregation to false")]
    if privacy.dp.mode == "central":
        return [("strategy.name", f"strategy {strategy_name} does not aggregate by a sum, so central DP's noise "
                                  "calibration does not hold for it",
                 "use fedavg or another averaging strategy, or privacy.dp.mode local")]
    return []
