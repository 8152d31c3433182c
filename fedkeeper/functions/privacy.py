"""The protocol's privacy hooks: the (ε, δ) record of each round, and the budget that stops a federation."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from fedkeeper.core import keys, rounds, validate
from fedkeeper.core.config import FederationConfig
from fedkeeper.core.strategy import Strategy
from fedkeeper.functions.context import HandlerError
from fedkeeper.store import NotFound, Store

SEED_BYTES = 32  # 256 bits: nobody can guess the noise without reading the store

MSG_BUDGET = ("privacy budget reached: round {next} would bring ε to {eps_next} (δ = {delta:g}), over "
              "privacy.dp.epsilon_budget = {budget:g}; the federation stops after {done} released rounds at ε = {eps}. "
              "Raise the budget or the noise_multiplier to train further")


def _json(store: Store, key: str) -> Any:
    try:
        return validate.loads(store.get(key), max_bytes=64 << 20, what=key, lenient=True)
    except (NotFound, validate.InputError):
        return None


def sampling_rate(cfg: FederationConfig) -> float:
    """The share of the population a round selects (fixed-size sampling, accounted as Poisson at the same rate)."""
    from fedkeeper.core import strategy as strategies

    n = len(cfg.clients)
    return strategies.from_config(cfg).sample_size(n) / n if n else 1.0


def history(store: Store, r: int) -> tuple[int, float | None]:
    """(rounds before r that released a noised model, the smallest noise multiplier they had) from round r−1's record.

    Without a readable record every earlier round counts as a release, so the budget never overshoots.
    """
    if r <= 0:
        return 0, None
    prev = _json(store, keys.result(r - 1))
    rec = prev.get("privacy") if isinstance(prev, dict) else None
    k = rec.get("releases") if isinstance(rec, dict) else None
    z = rec.get("accounting_noise_multiplier") if isinstance(rec, dict) else None
    z = float(z) if validate.finite_number(z) and z > 0 else None
    if isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= r:
        return k, z
    return r, z


def releases_before(store: Store, r: int) -> int:
    """How many rounds before r released a noised model."""
    return history(store, r)[0]


def epsilon_after(cfg: FederationConfig, releases: int, noise_multiplier: float | None = None) -> float:
    """ε after this many released rounds, each with at least this noise multiplier (the configured one by default)."""
    from fedkeeper import accounting

    dp = cfg.privacy.dp
    z = dp.noise_multiplier if noise_multiplier is None else noise_multiplier
    return accounting.epsilon(z, sampling_rate(cfg), releases, dp.delta, dp.accountant)


def _fmt(eps: float) -> str:
    return "∞ (no noise)" if math.isinf(eps) else f"{eps:.4g}"


def round_record(store: Store, cfg: FederationConfig, r: int, strategy: Strategy, released: bool,
                 noise_multiplier: float | None = None, extra: dict | None = None) -> dict | None:
    """result.json's `privacy` record for round r: ε so far, the noise used, and whether the budget allows another.

    `noise_multiplier` is this round's effective one when it fell short of the configured one (clients that shared
    the noise under secure aggregation and then dropped); ε is then accounted, conservatively, as if every round so
    far had the smallest multiplier seen.
    """
    dp = cfg.privacy.dp
    if not dp.enabled and not cfg.privacy.secure_aggregation:
        return None
    rec: dict[str, Any] = {"secure_aggregation": cfg.privacy.secure_aggregation, "dp": dp.mode}
    if not dp.enabled:
        return rec
    k, z_prev = history(store, r)
    k += int(released)
    z = dp.noise_multiplier if noise_multiplier is None else noise_multiplier
    if released and z_prev is not None:
        z = min(z, z_prev)
    elif not released and z_prev is not None:
        z = z_prev
    eps = epsilon_after(cfg, k, z)
    rec.update(delta=dp.delta, epsilon=None if math.isinf(eps) else eps, releases=k, accountant=dp.accountant,
               noise_multiplier=dp.noise_multiplier, accounting_noise_multiplier=z, sampling_rate=sampling_rate(cfg))
    rec.update(extra or {})
    if dp.mode == "local":
        rec.update(clip_norm=dp.clip_norm, noise_std=dp.noise_multiplier * dp.clip_norm,
                   note="ε is each client's own, for the updates it released")
    elif released:
        rec.update(getattr(strategy, "last", {}) or {})
    if dp.epsilon_budget > 0:
        nxt = epsilon_after(cfg, k + 1, z)
        rec["epsilon_budget"] = dp.epsilon_budget
        if nxt > dp.epsilon_budget and r + 1 < cfg.rounds:
            rec["budget_exhausted"] = True
            rec["stop_reason"] = MSG_BUDGET.format(next=r + 2, eps_next=_fmt(nxt), delta=dp.delta,
                                                   budget=dp.epsilon_budget, done=k, eps=_fmt(eps))
    return rec


def budget_stop(store: Store, cfg: FederationConfig, r: int) -> str | None:
    """Why round r must not start (one more release would exceed the ε budget), or None."""
    dp = cfg.privacy.dp
    if not dp.enabled or dp.epsilon_budget <= 0:
        return None
    k, z = history(store, r)
    nxt = epsilon_after(cfg, k + 1, z)
    if nxt <= dp.epsilon_budget:
        return None
    return MSG_BUDGET.format(next=r + 1, eps_next=_fmt(nxt), delta=dp.delta, budget=dp.epsilon_budget, done=k,
                             eps=_fmt(epsilon_after(cfg, k, z)))


def norm_bound_applies(cfg: FederationConfig) -> bool:
    """False under central DP: clipping already bounds every update, and a median-based rejection is not private."""
    return cfg.strategy.norm_multiple > 0 and cfg.privacy.dp.mode != "central"


def noise_seed(store: Store, r: int) -> bytes:
    """Round r's central-DP noise seed: drawn once from the OS by the first aggregator, kept create-only in the store.

    Whoever finishes the round (the first aggregator, or one that took over its expired lease) reads the same seed,
    so the noise, and with it the model's bytes, are the same; repeated attempts cannot draw fresh noise that
    could be averaged away. The seed lives beside the round's updates: without secure aggregation the aggregator
    and anyone who reads the store see every update in the clear already, so it tells them nothing they could not
    compute; the noise protects what is released to those who see only the models (see docs/privacy.md).
    """
    key = keys.dp_noise_seed(r)
    store.put_if_absent(key, rounds.dumps({"round": r, "seed": os.urandom(SEED_BYTES).hex()}))
    rec = _json(store, key)
    seed = rec.get("seed") if isinstance(rec, dict) and rec.get("round") == r else None
    try:
        raw = bytes.fromhex(seed) if isinstance(seed, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != SEED_BYTES:
        raise HandlerError(f"{key} does not hold round {r}'s {SEED_BYTES * 8}-bit noise seed (it was written by "
                           f"something other than an aggregator); round {r} cannot be noised reproducibly. Delete "
                           f"{key} so the next aggregation draws a new one", 409)
    return raw


def noise_rng(store: Store, r: int) -> np.random.Generator:
    """The generator round r's central-DP noise is drawn from, seeded by noise_seed."""
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(noise_seed(store, r), "big")))


def seed_noise(store: Store, r: int, strategy: Strategy) -> None:
    """Give a central-DP strategy round r's fixed noise generator (one given explicitly, as in tests, is kept)."""
    from fedkeeper.core.privacy import dp

    if isinstance(strategy, dp.DPStrategy) and strategy.rng is None:
        strategy.rng = noise_rng(store, r)
