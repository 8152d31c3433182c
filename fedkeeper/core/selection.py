"""Client selection from history: random, compute-aware (FedLesScan's spirit), utility (Oort's spirit); the auto deadline.

Pure functions over plain records and numpy; the protocol hands in the population and the history it read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fedkeeper.core import history

NAMES = ("random", "compute_aware", "utility")


@dataclass
class Params:
    """How clients are chosen and how an automatic deadline is derived."""

    name: str = "random"
    max_wait: int = 5               # rounds a client may go unselected before it is picked first (0: off)
    explore: float = 0.2            # utility: share of a round for clients without history
    alpha: float = 2.0              # utility: penalty exponent for clients slower than the preferred duration
    preferred_s: float = 0.0        # utility: preferred round duration (0: the median expected duration)
    deadline_percentile: float = 90.0
    deadline_margin: float = 1.5
    deadline_floor_s: float = 10.0
    deadline_cap_s: float = 600.0


def expected_durations(population: Sequence[Mapping], hist: Mapping) -> list[float | None]:
    """Each client's expected seconds: its own recent median, else its platform's median, else None."""
    clients = hist.get("clients") or {}
    priors = history.platform_priors(population, hist)
    out = []
    for c in population:
        d = history.expected_duration(clients.get(c["id"]))
        out.append(d if d is not None else priors.get(str(c.get("platform", ""))))
    return out


def auto_deadline(expected: Sequence[float | None], p: Params) -> float:
    """A high percentile of the selected clients' expected durations times a margin, within floor and cap.

    A client with no estimate at all may take anything up to the cap, so the cap is the deadline then.
    """
    known = [float(d) for d in expected if d is not None and math.isfinite(d)]
    if not known or len(known) < len(expected):
        return float(p.deadline_cap_s)
    v = float(np.percentile(np.asarray(known), p.deadline_percentile)) * p.deadline_margin
    return float(min(p.deadline_cap_s, max(p.deadline_floor_s, v)))


def _rec(hist: Mapping, cid: str) -> Mapping | None:
    return (hist.get("clients") or {}).get(cid)


def _last(rec: Mapping | None) -> int:
    v = rec.get("last_selected") if isinstance(rec, Mapping) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else -1


def _streak(rec: Mapping | None) -> int:
    v = rec.get("streak") if isinstance(rec, Mapping) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _waited(rec: Mapping | None, r: int) -> int:
    """Rounds since the client was last selected (counted from round 0 if it never was)."""
    return r - _last(rec) - 1


def _starving(population: Sequence[Mapping], hist: Mapping, r: int, p: Params, rng: np.random.Generator) -> list[int]:
    """Clients that waited max_wait rounds or more (a never-selected one counts from round 0, so exploration too
    is bounded), longest wait first (ties in seeded order)."""
    if p.max_wait <= 0:
        return []
    found = []
    for i, c in enumerate(population):
        rec = _rec(hist, c["id"])
        if _waited(rec, r) >= p.max_wait:
            found.append((-_waited(rec, r), rng.random(), i))
    return [i for *_, i in sorted(found)]


def _cooling(rec: Mapping | None, r: int, p: Params) -> bool:
    """A client that just failed sits out 1, 2, 4, ... rounds (bounded by max_wait) before it is tried again."""
    s = _streak(rec)
    if not s:
        return False
    pause = min(2 ** (s - 1), max(1, p.max_wait) if p.max_wait > 0 else 2 ** (s - 1))
    return _waited(rec, r) < pause


def clusters(values: Sequence[float], k: int = 3, iters: int = 20) -> list[int]:
    """Label each value with its cluster, 0 = fastest, by one-dimensional k-means on log durations."""
    x = np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-3))
    if len(x) == 0:
        return []
    k = max(1, min(k, len(np.unique(x))))
    # Farthest-point start (deterministic): quantile starts merge a far outlier into the middle cluster.
    centres = [float(x.min())]
    while len(centres) < k:
        centres.append(float(x[np.argmax(np.min(np.abs(x[:, None] - np.array(centres)[None, :]), axis=1))]))
    centres = np.array(centres)
    labels = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        labels = np.argmin(np.abs(x[:, None] - centres[None, :]), axis=1)
        new = np.array([x[labels == j].mean() if np.any(labels == j) else centres[j] for j in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)  # relabel so cluster 0 has the smallest centre
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    return rank[labels].tolist()


def _fill(chosen: list[int], more: Sequence[int], k: int) -> None:
    for i in more:
        if len(chosen) >= k:
            return
        if i not in chosen:
            chosen.append(i)


def compute_aware(population: Sequence[Mapping], hist: Mapping, k: int, r: int, seed: int, p: Params) -> list[int]:
    """Unexplored clients first, then those waiting too long, then the fastest reliable cluster outward."""
    rng = np.random.default_rng([seed, r, 1])
    n = len(population)
    recs = [_rec(hist, c["id"]) for c in population]
    chosen: list[int] = []
    rookies = [i for i in range(n) if not history.explored(recs[i])]
    _fill(chosen, rng.permutation(rookies).tolist() if rookies else [], k)
    _fill(chosen, _starving(population, hist, r, p, rng), k)
    rest = [i for i in range(n) if i not in chosen and not _cooling(recs[i], r, p)]
    if len(chosen) < k and rest:
        est = expected_durations(population, hist)
        known = [d for d in est if d is not None]
        fallback = float(np.median(known)) if known else 1.0
        # Expected time inflated by unreliability: a client that delivers half the time costs twice the wait.
        score = [(est[i] if est[i] is not None else fallback) / max(0.05, history.reliability(recs[i])) ** 2
                 for i in rest]
        labels = clusters(score)
        ranked = sorted(range(len(rest)), key=lambda j: (labels[j], rng.random()))
        _fill(chosen, [rest[j] for j in ranked], k)
    # Cooling clients only when nobody else is left.
    _fill(chosen, rng.permutation(n).tolist(), k)
    return sorted(chosen)


def utility(population: Sequence[Mapping], hist: Mapping, k: int, r: int, seed: int, p: Params) -> list[int]:
    """Oort's spirit: statistical utility (data size × last loss) with a staleness bonus, penalised for slowness."""
    rng = np.random.default_rng([seed, r, 2])
    n = len(population)
    recs = [_rec(hist, c["id"]) for c in population]
    chosen: list[int] = []
    _fill(chosen, _starving(population, hist, r, p, rng), k)
    unexplored = [i for i in range(n) if not history.explored(recs[i]) and i not in chosen]
    explored = [i for i in range(n) if history.explored(recs[i]) and i not in chosen]
    room = k - len(chosen)
    n_explore = min(len(unexplored), max(math.ceil(p.explore * room) if unexplored else 0, room - len(explored)))
    _fill(chosen, rng.permutation(unexplored).tolist()[:n_explore] if n_explore else [], k)
    room = k - len(chosen)
    if room > 0 and explored:
        est = expected_durations(population, hist)
        losses = [_loss(recs[i]) for i in explored]
        known_loss = [x for x in losses if x is not None]
        mean_loss = float(np.mean(known_loss)) if known_loss else 1.0
        stat = np.array([_examples(recs[i]) * (x if x is not None else mean_loss) for i, x in zip(explored, losses)])
        stat = stat / stat.max() if stat.max() > 0 else np.ones(len(explored))
        bonus = np.array([math.sqrt(0.1 * math.log(r + 1) / (_last(recs[i]) + 1)) for i in explored])
        util = stat + bonus
        durs = [est[i] for i in explored]
        known = [d for d in durs if d is not None]
        pref = p.preferred_s if p.preferred_s > 0 else (float(np.median(known)) if known else 0.0)
        for j, d in enumerate(durs):
            if pref > 0 and d is not None and d > pref:
                util[j] *= (pref / d) ** p.alpha
            util[j] *= history.reliability(recs[explored[j]])
        util = np.maximum(util, 1e-12)
        # Oort's slack: sample among clients within 95% of the room-th best, in proportion to utility.
        cut = 0.95 * np.sort(util)[::-1][min(room, len(util)) - 1]
        pool = [j for j in range(len(explored)) if util[j] >= cut]
        w = util[pool] / util[pool].sum()
        take = min(room, len(pool))
        picked = rng.choice(len(pool), size=take, replace=False, p=w).tolist()
        _fill(chosen, [explored[pool[j]] for j in picked], k)
        leftover = sorted(range(len(explored)), key=lambda j: -util[j])
        _fill(chosen, [explored[j] for j in leftover], k)
    _fill(chosen, rng.permutation(n).tolist(), k)
    return sorted(chosen)


def _loss(rec: Mapping | None) -> float | None:
    v = rec.get("last_train_loss") if isinstance(rec, Mapping) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 else None


def _examples(rec: Mapping | None) -> float:
    v = rec.get("examples") if isinstance(rec, Mapping) else None
    return float(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1.0


def select(p: Params, population: Sequence[Mapping[str, Any]], hist: Mapping, k: int, r: int, seed: int) -> list[int]:
    """Indices (sorted) of the k clients round r selects under `p.name`; `random` is the strategy's own sampling."""
    k = max(0, min(k, len(population)))
    if p.name == "compute_aware":
        return compute_aware(population, hist, k, r, seed, p)
    if p.name == "utility":
        return utility(population, hist, k, r, seed, p)
    raise ValueError(f"unknown selection {p.name!r}; use one of: {', '.join(NAMES)}")
