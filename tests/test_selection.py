"""Client history and selection as pure functions: folding results, compute-aware and utility choice, auto deadline."""

from __future__ import annotations

import numpy as np

from fedkeeper.core import history, selection


def _pop(n_fast: int, n_slow: int) -> list[dict]:
    return ([{"id": f"fast-{i:02d}", "platform": "fast"} for i in range(n_fast)]
            + [{"id": f"slow-{i:02d}", "platform": "slow"} for i in range(n_slow)])


def _result(r: int, included: dict[str, float], failed=(), stragglers=(), rejected=(), loss=None,
            created=100.0, deadline=160.0) -> dict:
    """A round result as the aggregator writes it; included maps client -> its train seconds."""
    return {"round": r, "selected": list(included) + list(failed) + list(stragglers) + list(rejected),
            "included": list(included),
            "clients": {c: {"num_examples": 10 + i, "timings": {"invoke_s": 0.5, "download_s": 0.1, "train_s": t},
                            "metrics": {"train_loss": (loss or {}).get(c, 1.0)}} for i, (c, t) in enumerate(included.items())},
            "failed": [{"client": c, "reason": why} for c, why in failed],
            "stragglers": list(stragglers), "rejected": [{"client": c, "reason": "bad"} for c in rejected],
            "timings": {"manifest_created": created, "deadline": deadline}}


def _hist_from(population: list[dict], durations: dict[str, float], r: int = 0) -> dict:
    """A history in which every client was selected in round r and delivered in its given duration."""
    h = history.empty()
    platforms = {c["id"]: c["platform"] for c in population}
    history.fold(h, _result(r, durations), platforms)
    return h


def test_fold_records_timings_outcomes_and_is_idempotent():
    # Prepare
    platforms = {"a": "p", "b": "p", "c": "q", "d": "q", "e": "q"}
    h = history.empty()
    res = _result(0, {"a": 2.0, "b": 4.0}, failed=[("c", "worker exited"), ("d", "no update within 30 s (timed out)")],
                  stragglers=["e"], loss={"a": 0.7})
    # Execute
    history.fold(h, res, platforms)
    again = history.fold(h, res, platforms)  # the same round a second time (a takeover, a repeated call)
    # Assert
    a, c, d, e = (h["clients"][k] for k in "acde")
    assert again["clients"]["a"]["selected"] == 1
    assert a["included"] == 1 and a["last_included"] == 0 and a["last_train_loss"] == 0.7
    assert abs(a["durations"][0] - 2.6) < 1e-9 and a["phases"]["train_s"] == 2.0
    assert c["failures"] == 1 and c["streak"] == 1 and c["durations"] == []
    assert d["timeouts"] == 1 and e["stragglers"] == 1
    assert e["durations"] == [60.0]  # a straggler ran at least until the deadline
    assert history.reliability(a) == 1.0 and history.reliability(c) == 0.0


def test_fold_keeps_a_window_and_rejects_nothing_unselected():
    h = history.empty()
    for r in range(8):
        history.fold(h, _result(r, {"a": float(r)}), {"a": "p"}, window=3)
    history.fold(h, _result(8, {}, rejected=["intruder"]), {"a": "p"})
    assert len(h["clients"]["a"]["durations"]) == 3 and "intruder" not in h["clients"]
    assert history.expected_duration(h["clients"]["a"]) == 6.6  # median of 5.6, 6.6, 7.6


def test_parse_drops_malformed_records():
    h = history.parse({"round": "x", "clients": {"a": {"selected": 1}, "b": "junk", "7": None}})
    assert h["round"] == -1 and list(h["clients"]) == ["a"]
    assert history.parse(["not", "a", "history"]) == history.empty()
    assert history.duration({"train_s": float("nan"), "invoke_s": -3, "download_s": 2e9}) == history.MAX_SECONDS


def test_compute_aware_prefers_fast_reliable_clients():
    # Prepare: 20 fast (1 s) and 10 slow (10 s) clients, all known
    pop = _pop(20, 10)
    h = _hist_from(pop, {c["id"]: (1.0 if c["platform"] == "fast" else 10.0) for c in pop})
    p = selection.Params(name="compute_aware", max_wait=0)
    # Execute
    picked = [pop[i]["id"] for i in selection.select(p, pop, h, 10, 1, seed=3)]
    # Assert
    assert len(picked) == 10 and all(c.startswith("fast") for c in picked)


def test_compute_aware_explores_new_clients_first():
    pop = _pop(20, 0)
    h = _hist_from(pop[:18], {c["id"]: 1.0 for c in pop[:18]})
    p = selection.Params(name="compute_aware")
    picked = {pop[i]["id"] for i in selection.select(p, pop, h, 5, 1, seed=0)}
    assert {"fast-18", "fast-19"} <= picked


def test_compute_aware_bounds_every_clients_wait():
    # Prepare: a federation of 30 (10 of them slow); selections are folded back in as rounds pass
    pop = _pop(20, 10)
    platforms = {c["id"]: c["platform"] for c in pop}
    h = history.empty()
    p = selection.Params(name="compute_aware", max_wait=4)
    last = {c["id"]: -1 for c in pop}
    worst = 0
    # Execute
    for r in range(30):
        picked = [pop[i]["id"] for i in selection.select(p, pop, h, 10, r, seed=1)]
        for c in picked:
            worst = max(worst, r - last[c] - 1)
            last[c] = r
        history.fold(h, _result(r, {c: (1.0 if c.startswith("fast") else 10.0) for c in picked}), platforms)
    # Assert: nobody waited more than max_wait rounds, and fast clients were still chosen most
    worst = max(worst, max(29 - v for v in last.values()))
    assert worst <= p.max_wait
    fast = sum(h["clients"][c]["selected"] for c in platforms if c.startswith("fast")) / 20
    slow = sum(h["clients"][c]["selected"] for c in platforms if c.startswith("slow")) / 10
    assert fast > slow


def test_utility_bounds_every_clients_wait_including_unexplored_ones():
    pop = _pop(20, 10)
    platforms = {c["id"]: c["platform"] for c in pop}
    h = history.empty()
    p = selection.Params(name="utility", max_wait=4, explore=0.2)
    last = {c["id"]: -1 for c in pop}
    worst = 0
    for r in range(12):
        picked = [pop[i]["id"] for i in selection.select(p, pop, h, 10, r, seed=2)]
        for c in picked:
            worst = max(worst, r - last[c] - 1)
            last[c] = r
        history.fold(h, _result(r, {c: (1.0 if c.startswith("fast") else 10.0) for c in picked}), platforms)
    # Starving clients are picked first, but 14 rookies reach the bound together with 10 seats: one round more.
    assert max(worst, max(11 - v for v in last.values())) <= p.max_wait + 1
    assert all(v >= 0 for v in last.values())


def test_compute_aware_lets_a_failing_client_cool_down():
    pop = _pop(6, 0)
    h = _hist_from(pop, {c["id"]: 1.0 for c in pop})
    history.fold(h, _result(1, {c["id"]: 1.0 for c in pop[1:]}, failed=[("fast-00", "boom")]),
                 {c["id"]: "fast" for c in pop})
    p = selection.Params(name="compute_aware", max_wait=5)
    picked = {pop[i]["id"] for i in selection.select(p, pop, h, 5, 2, seed=0)}
    assert "fast-00" not in picked


def test_utility_prefers_high_loss_and_penalises_slow_clients():
    # Prepare: equal data; a few clients with high loss, some slow ones with the highest loss
    pop = _pop(20, 5)
    dur = {c["id"]: (1.0 if c["platform"] == "fast" else 20.0) for c in pop}
    loss = {c["id"]: 0.1 for c in pop}
    loss.update({f"fast-{i:02d}": 2.0 for i in range(5)})
    loss.update({f"slow-{i:02d}": 3.0 for i in range(5)})
    h = history.empty()
    history.fold(h, _result(0, dur, loss=loss), {c["id"]: c["platform"] for c in pop})
    p = selection.Params(name="utility", max_wait=0, explore=0.0)
    # Execute: many seeds, since utility sampling is randomised within its slack
    counts: dict[str, int] = {}
    for seed in range(20):
        for i in selection.select(p, pop, h, 5, 1, seed):
            counts[pop[i]["id"]] = counts.get(pop[i]["id"], 0) + 1
    # Assert
    high_fast = sum(counts.get(f"fast-{i:02d}", 0) for i in range(5))
    assert high_fast > 0.8 * 100
    assert sum(counts.get(f"slow-{i:02d}", 0) for i in range(5)) < high_fast / 4


def test_utility_explores_unknown_clients():
    pop = _pop(20, 0)
    h = _hist_from(pop[:10], {c["id"]: 1.0 for c in pop[:10]})
    p = selection.Params(name="utility", explore=0.4, max_wait=0)
    picked = [pop[i]["id"] for i in selection.select(p, pop, h, 10, 1, seed=0)]
    assert sum(int(c[-2:]) >= 10 for c in picked) == 4 and len(set(picked)) == 10


def test_selection_is_deterministic_and_distinct():
    pop = _pop(15, 15)
    h = _hist_from(pop, {c["id"]: float(i % 7 + 1) for i, c in enumerate(pop)})
    for name in ("compute_aware", "utility"):
        p = selection.Params(name=name)
        a = selection.select(p, pop, h, 12, 3, seed=9)
        assert a == selection.select(p, pop, h, 12, 3, seed=9)
        assert len(set(a)) == 12 and a == sorted(a)


def test_auto_deadline_percentile_margin_floor_cap():
    p = selection.Params(deadline_percentile=90, deadline_margin=2.0, deadline_floor_s=5, deadline_cap_s=100)
    ds = [1.0, 2.0, 3.0, 4.0, 20.0]
    assert selection.auto_deadline(ds, p) == float(np.percentile(ds, 90)) * 2.0
    assert selection.auto_deadline([0.1, 0.2], p) == 5.0
    assert selection.auto_deadline([300.0], p) == 100.0
    assert selection.auto_deadline([1.0, None], p) == 100.0  # someone unknown: the cap


def test_rookies_inherit_their_platforms_median():
    pop = _pop(3, 3)
    h = _hist_from(pop[:2] + pop[3:5], {"fast-00": 1.0, "fast-01": 3.0, "slow-00": 10.0, "slow-01": 30.0})
    est = selection.expected_durations(pop, h)
    assert est[2] == est[1] and est[5] == est[4]


def test_clusters_order_fast_to_slow():
    labels = selection.clusters([1.0, 1.1, 0.9, 10.0, 11.0, 100.0])
    assert labels[:3] == [0, 0, 0] and labels[3] == labels[4] == 1 and labels[5] == 2
