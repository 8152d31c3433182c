"""Hostile updates: every class of bad input a client can write is rejected with a reason; the round goes on."""

from __future__ import annotations

import numpy as np
import pytest

from fedkeeper import report
from fedkeeper.core import blob, faults, keys
from fedkeeper.core.aggregate import fedavg
from fedkeeper.functions import aggregator
from fedkeeper.functions.context import Context, NullInvoker
from tests.conftest import Federation, make_weights, update_bytes

N = 10


def honest(fed: Federation, r: int, skip: set[str]) -> dict[str, tuple[dict, int]]:
    """Honest updates near the global model for every client not in skip; returns what was written."""
    out = {}
    for i, c in enumerate(fed.ids):
        if c in skip:
            continue
        w = {k: v + 0.01 * make_weights(200 + i)[k] for k, v in fed.global_weights.items()}
        n = 10 + i
        fed.store.put(keys.update(r, c), update_bytes(r, c, w, n))
        out[c] = (w, n)
    return out


def run_round(fed: Federation, r: int = 0) -> dict:
    out = aggregator.handle({"round": r}, Context(store=fed.store, invoker=NullInvoker()))
    assert out["status"] in ("done", "failed"), out
    return fed.store.get_json(keys.result(r))


def set_partition_sizes(fed: Federation, size: int = 1000) -> None:
    fed.store.put_json("data/meta.json", {"num_classes": 3, "client_examples": {c: size for c in fed.ids}})


@pytest.mark.parametrize("kind", faults.HOSTILE_KINDS)
def test_each_hostile_kind_is_rejected_and_the_round_completes(tmp_path, kind):
    # Prepare: ten clients under the default strategy settings, one of them hostile
    fed = Federation(tmp_path / "s", n_clients=N)
    set_partition_sizes(fed)
    fed.open_round(0, quorum=5)
    bad = fed.ids[3]
    good = honest(fed, 0, {bad})
    w = {k: v + 0.01 for k, v in fed.global_weights.items()}
    meta = {"kind": "update", "round": 0, "client": bad, "num_examples": 20, "metrics": {}, "timings": {}}
    fed.store.put(keys.update(0, bad), faults.hostile_update(kind, w, meta))
    # Execute
    res = run_round(fed)
    # Assert: rejected with a reason, honest clients in, model finite and equal to the honest aggregate
    assert res["status"] == "done"
    assert sorted(res["included"]) == sorted(good)
    reasons = {x["client"]: x["reason"] for x in res["rejected"]}
    assert bad in reasons and len(reasons[bad]) > 10
    model = blob.decode(fed.store.get(keys.model(1))).tensors
    expect = fedavg([good[c] for c in sorted(good)])
    for k in model:
        assert np.all(np.isfinite(model[k]))
        np.testing.assert_array_equal(model[k], expect[k])
    # Readers never break on what a client wrote
    rec = report.round_record(fed.store, 0)
    assert rec["status"] == "done" and len(rec["per_client"]) == len(good)


def test_readers_survive_records_with_wrong_types(tmp_path):
    # Prepare: a result.json as an attacker with store access (or an old version) might leave it
    fed = Federation(tmp_path / "s", n_clients=3)
    fed.open_round(0)
    fed.store.put_json(keys.result(0), {
        "status": "done", "included": "c", "rejected": [1, {"client": {"x": 1}}], "selected": None,
        "clients": {"a": {"timings": [1, 2], "platform": {"x": 1}, "metrics": "high", "num_examples": "many"},
                    "b": [], "c": {"timings": {"train_s": float("inf"), "invoke_s": "x"}}},
        "timings": [1], "federated_accuracy": "0.9"})
    fed.store.put_json(keys.evaluation(0), {"test_accuracy": [0.9], "timings": "fast"})
    # Execute
    rec = report.round_record(fed.store, 0)
    results = report.collect(fed.store)
    # Assert
    assert rec["status"] == "done" and rec["test_accuracy"] is None
    assert set(rec["per_client"]) == {"a", "c"}
    assert results["rounds"][0]["round"] == 1  # rounds are counted from 1 on every surface
    from fedkeeper.runtime.run import format_round, summary_table

    assert "round 1" in format_round(rec, 3)
    assert "final test accuracy" in summary_table(results)


def test_one_rejection_in_ten_never_voids_a_round_under_defaults(tmp_path):
    # Prepare: defaults from the config (quorum, norm bound), manifest written by the trigger
    from fedkeeper.functions import trigger

    fed = Federation(tmp_path / "s", n_clients=N)
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    bad = fed.ids[0]
    honest(fed, 0, {bad})
    fed.store.put(keys.update(0, bad), b"\x00" * 64)
    # Execute
    res = run_round(fed)
    # Assert
    assert res["status"] == "done" and len(res["included"]) == N - 1


def test_overflow_without_norm_bound_does_not_void_the_round(tmp_path):
    # Prepare: the norm bound turned off; one update holds values near float32's maximum
    fed = Federation(tmp_path / "s", n_clients=4, norm_multiple=0)
    fed.open_round(0, quorum=2)
    bad = fed.ids[1]
    honest(fed, 0, {bad})
    w = {k: np.full_like(v, 3.0e38) for k, v in fed.global_weights.items()}
    fed.store.put(keys.update(0, bad), update_bytes(0, bad, w, 10**3))
    fed.store.put_json("data/meta.json", {"client_examples": {c: 10**4 for c in fed.ids}})
    # Execute
    res = run_round(fed)
    # Assert: the sum is redone in float64; the user opted out of the bound, so the update counts
    assert res["status"] == "done" and bad in res["included"]
    model = blob.decode(fed.store.get(keys.model(1))).tensors
    assert all(np.all(np.isfinite(t)) for t in model.values())


def test_example_count_above_the_partition_is_rejected(tmp_path):
    fed = Federation(tmp_path / "s", n_clients=4)
    fed.store.put_json("data/meta.json", {"client_examples": {c: 50 for c in fed.ids}})
    fed.open_round(0, quorum=2)
    honest(fed, 0, set())
    fed.store.put(keys.update(0, fed.ids[2]), update_bytes(0, fed.ids[2], make_weights(0), 51))
    res = run_round(fed)
    reasons = {x["client"]: x["reason"] for x in res["rejected"]}
    assert "exceeds the 50 examples" in reasons[fed.ids[2]]


def test_oversized_update_is_refused_before_it_is_read(tmp_path, monkeypatch):
    # Prepare: a 2 MB update with max_update_mb 1; reading it whole would be the bug
    fed = Federation(tmp_path / "s", n_clients=3, max_update_mb=1)
    fed.open_round(0, quorum=1)
    honest(fed, 0, {fed.ids[0]})
    big = {k: v for k, v in make_weights(0).items()}
    big["hidden/kernel"] = np.zeros((6, 5), np.float32)
    fed.store.put(keys.update(0, fed.ids[0]), update_bytes(0, fed.ids[0], big, 10, pad="x" * (2 << 20)))
    seen = []
    real = type(fed.store).get_view

    def spy(self, key, max_bytes=None):
        data = real(self, key, max_bytes)
        seen.append((key, max_bytes))
        return data

    monkeypatch.setattr(type(fed.store), "get_view", spy)
    # Execute
    res = run_round(fed)
    # Assert
    reasons = {x["client"]: x["reason"] for x in res["rejected"]}
    assert "over the 1048576-byte limit" in reasons[fed.ids[0]]
    assert all(k != keys.update(0, fed.ids[0]) for k, _ in seen)


def test_every_hostile_kind_at_once_is_rejected_with_its_own_reason(tmp_path):
    # Prepare: fourteen hostile clients and six honest ones in one round, so the norm bound's second pass runs
    kinds = faults.HOSTILE_KINDS
    fed = Federation(tmp_path / "s", n_clients=len(kinds) + 6)
    set_partition_sizes(fed)
    fed.open_round(0, quorum=3)
    bad = dict(zip(fed.ids, kinds))
    good = honest(fed, 0, set(bad))
    for c, kind in bad.items():
        w = {k: v + 0.01 for k, v in fed.global_weights.items()}
        meta = {"kind": "update", "round": 0, "client": c, "num_examples": 20, "metrics": {}, "timings": {}}
        fed.store.put(keys.update(0, c), faults.hostile_update(kind, w, meta))
    # Execute
    res = run_round(fed)
    # Assert
    reasons = {x["client"]: x["reason"] for x in res["rejected"]}
    assert set(reasons) == set(bad), set(bad) - set(reasons)
    assert sorted(res["included"]) == sorted(good)
