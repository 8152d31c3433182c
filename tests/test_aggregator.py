"""The aggregator: waits for a complete round, aggregates it exactly once, rejects bad updates with reasons."""

import multiprocessing as mp

import numpy as np
import pytest

from fedkeeper.core import blob, keys
from fedkeeper.core.aggregate import fedavg
from fedkeeper.functions import aggregator
from fedkeeper.functions.context import Context, HandlerError, NullInvoker
from fedkeeper.store.local import LocalStore

from tests.conftest import make_weights, update_bytes


def ctx_for(store, inv=None, invocation_id=None):
    kw = {"invocation_id": invocation_id} if invocation_id else {}
    return Context(store=store, invoker=inv or NullInvoker(), **kw)


def test_waits_until_every_selected_update_is_in(federation):
    federation.open_round(0)
    store = federation.store
    store.put(keys.update(0, federation.ids[0]), update_bytes(0, federation.ids[0], make_weights(1), 5))
    out = aggregator.handle({"key": keys.update(0, federation.ids[0])}, ctx_for(store))
    assert out == {"status": "waiting", "round": 0, "have": 1, "failed": 0, "need": 4}
    assert not store.exists(keys.claim(0)) and not store.exists(keys.result(0))


def test_complete_round_is_averaged_and_chained(federation):
    # Prepare
    federation.open_round(0)
    subs = federation.submit_all(0)
    inv = NullInvoker()
    # Execute
    out = aggregator.handle({"key": keys.update(0, federation.ids[-1])}, ctx_for(federation.store, inv))
    # Assert
    assert out["status"] == "done" and sorted(out["included"]) == sorted(federation.ids)
    model = blob.decode(federation.store.get(keys.model(1)))
    want = fedavg([subs[c] for c in sorted(subs)])
    for k in want:
        np.testing.assert_array_equal(model.tensors[k], want[k])
    result = federation.store.get_json(keys.result(0))
    assert result["num_examples"] == sum(n for _, n in subs.values()) and result["rejected"] == []
    state = federation.store.get_json(keys.STATE)
    assert state["next_round"] == 1 and state["model"] == keys.model(1)
    functions = [(f, p.get("mode"), p.get("round")) for f, p, _ in inv.calls]
    assert ("client", "evaluate", 0) in functions and ("trigger", None, 1) in functions


def test_non_update_keys_are_ignored_cheaply(federation):
    for key in ("rounds/000000/result.json", "models/000001.safetensors", "rounds/000000/updates/x.tmp"):
        assert aggregator.handle({"key": key}, ctx_for(federation.store))["status"] == "ignored"
    with pytest.raises(HandlerError):
        aggregator.handle({}, ctx_for(federation.store))
    with pytest.raises(HandlerError):
        aggregator.handle({"round": -1}, ctx_for(federation.store))


def test_duplicate_event_changes_nothing(federation):
    federation.open_round(0)
    federation.submit_all(0)
    key = keys.update(0, federation.ids[0])
    aggregator.handle({"key": key}, ctx_for(federation.store))
    before = {k: federation.store.get(k) for k in federation.store.list("")}
    again = aggregator.handle({"key": key}, ctx_for(federation.store))
    after = {k: federation.store.get(k) for k in federation.store.list("")}
    assert again["status"] == "done-already"
    assert before == after
    assert len(federation.store.list("rounds/000000/aggregations/")) == 1


def _race(root, key, i, q):
    store = LocalStore(root)
    out = aggregator.handle({"key": key}, Context(store=store, invoker=NullInvoker(), invocation_id=f"agg-{i}"))
    q.put(out["status"])


def test_exactly_one_of_eight_concurrent_aggregators_aggregates(federation):
    # Prepare: a complete round, then 8 aggregator processes released on the same event.
    federation.open_round(0)
    federation.submit_all(0)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    key = keys.update(0, federation.ids[0])
    procs = [ctx.Process(target=_race, args=(str(federation.store.root), key, i, q)) for i in range(8)]
    # Execute
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    statuses = sorted(q.get(timeout=5) for _ in procs)
    # Assert
    assert statuses.count("done") == 1, statuses
    assert set(statuses) <= {"done", "claimed", "done-already"}
    assert len(federation.store.list("rounds/000000/aggregations/")) == 1


def test_bad_updates_are_rejected_with_reasons_and_round_proceeds(federation):
    # Prepare: one good update per client, then damage three of them in different ways.
    federation.open_round(0, quorum=1)
    subs = federation.submit_all(0)
    a, b, c, d = federation.ids
    store = federation.store
    store.put(keys.update(0, b), store.get(keys.update(0, b))[:-10])
    nan = make_weights(5)
    nan["hidden/bias"][0] = np.nan
    store.put(keys.update(0, c), update_bytes(0, c, nan, 10))
    store.put(keys.update(0, d), update_bytes(3, d, make_weights(6), 10))
    # Execute
    out = aggregator.handle({"round": 0}, ctx_for(store))
    # Assert
    res = store.get_json(keys.result(0))
    reasons = {x["client"]: x["reason"] for x in res["rejected"]}
    assert out["status"] == "done" and res["included"] == [a]
    assert "corrupt" in reasons[b] and "NaN" in reasons[c] and "round 3" in reasons[d]
    model = blob.decode(store.get(keys.model(1)))
    for k, v in subs[a][0].items():
        np.testing.assert_allclose(model.tensors[k], v, rtol=1e-6)


def test_wrong_architecture_and_client_are_rejected(federation):
    federation.open_round(0, quorum=1)
    federation.submit_all(0)
    a, b, c, _ = federation.ids
    store = federation.store
    other = make_weights(1)
    other["output/bias"] = np.zeros(4, np.float32)
    store.put(keys.update(0, a), update_bytes(0, a, other, 10))
    store.put(keys.update(0, b), update_bytes(0, c, make_weights(1), 10))
    store.put(keys.update(0, c), update_bytes(0, c, make_weights(1), -4))
    aggregator.handle({"round": 0}, ctx_for(store))
    reasons = {x["client"]: x["reason"] for x in store.get_json(keys.result(0))["rejected"]}
    assert "differ from the global model" in reasons[a]
    assert "written to" in reasons[b]
    assert "num_examples" in reasons[c]


def test_overdue_round_below_quorum_fails_and_keeps_model(federation):
    federation.open_round(0, deadline_s=-1, quorum=3)
    store = federation.store
    store.put(keys.update(0, federation.ids[0]), update_bytes(0, federation.ids[0], make_weights(1), 5))
    out = aggregator.handle({"round": 0}, ctx_for(store))
    assert out["status"] == "failed"
    assert blob.decode(store.get(keys.model(1))).tensors.keys() == federation.global_weights.keys()
    for k, v in federation.global_weights.items():
        np.testing.assert_array_equal(blob.decode(store.get(keys.model(1))).tensors[k], v)
    assert store.get_json(keys.result(0))["stragglers"] == federation.ids[1:]


def test_overdue_round_at_quorum_closes_with_stragglers(federation):
    federation.open_round(0, deadline_s=-1, quorum=2)
    store = federation.store
    for cid in federation.ids[:2]:
        store.put(keys.update(0, cid), update_bytes(0, cid, make_weights(1), 5))
    out = aggregator.handle({"round": 0}, ctx_for(store))
    res = store.get_json(keys.result(0))
    assert out["status"] == "done" and res["included"] == federation.ids[:2]
    assert res["stragglers"] == federation.ids[2:]


def test_late_update_after_close_is_recorded_and_changes_nothing(federation):
    federation.open_round(0, deadline_s=-1, quorum=1)
    store = federation.store
    a, b = federation.ids[:2]
    store.put(keys.update(0, a), update_bytes(0, a, make_weights(1), 5))
    aggregator.handle({"round": 0}, ctx_for(store))
    model_before = store.get(keys.model(1))
    store.put(keys.update(0, b), update_bytes(0, b, make_weights(2), 5))
    out = aggregator.handle({"key": keys.update(0, b)}, ctx_for(store))
    assert out["status"] == "done-already"
    assert store.exists(keys.late(0, b)) and store.get(keys.model(1)) == model_before


def test_recorded_failures_let_the_round_close(federation):
    federation.open_round(0, quorum=2)
    store = federation.store
    for cid in federation.ids[:3]:
        store.put(keys.update(0, cid), update_bytes(0, cid, make_weights(1), 5))
    store.put_json(keys.failure(0, federation.ids[3]), {"reason": "timed out after 300 s"})
    out = aggregator.handle({"key": keys.update(0, federation.ids[0])}, ctx_for(store))
    res = store.get_json(keys.result(0))
    assert out["status"] == "done"
    assert res["failed"] == [{"client": federation.ids[3], "reason": "timed out after 300 s"}]


def test_expired_claim_is_taken_over(federation):
    import time

    from fedkeeper.core import rounds

    federation.open_round(0)
    federation.submit_all(0)
    store = federation.store
    store.put(keys.claim(0), rounds.dumps(rounds.Claim(round=0, owner="crashed", lease_until=time.time() - 1)))
    out = aggregator.handle({"round": 0}, ctx_for(store, invocation_id="rescuer"))
    assert out["status"] == "done"
    assert store.get_json(keys.claim(0))["taken_over_from"] == "crashed"
    # A live claim, by contrast, is respected.
    store.delete(keys.result(0))
    store.put(keys.claim(0), rounds.dumps(rounds.Claim(round=0, owner="alive", lease_until=time.time() + 60)))
    assert aggregator.handle({"round": 0}, ctx_for(store))["status"] == "claimed"


def test_update_far_from_the_median_is_rejected_when_norm_check_is_on(tmp_path):
    from tests.conftest import Federation

    fed = Federation(tmp_path / "s", norm_multiple=3.0)
    fed.open_round(0, quorum=1)
    base = fed.global_weights
    for i, cid in enumerate(fed.ids):
        scale = 100.0 if i == 2 else 0.1
        w = {k: v + np.float32(scale) for k, v in base.items()}
        fed.store.put(keys.update(0, cid), update_bytes(0, cid, w, 10))
    out = aggregator.handle({"round": 0}, ctx_for(fed.store))
    res = fed.store.get_json(keys.result(0))
    assert out["status"] == "done" and fed.ids[2] not in res["included"] and len(res["included"]) == 3
    assert "median" in res["rejected"][0]["reason"]


def test_oversize_and_unselected_updates_are_rejected_with_reasons(tmp_path):
    from tests.conftest import Federation

    fed = Federation(tmp_path / "s", max_update_mb=0.0005)  # about 524 bytes: the fixture's updates are larger
    fed.open_round(0, quorum=1)
    a = fed.ids[0]
    fed.store.put(keys.update(0, a), update_bytes(0, a, make_weights(1), 10))
    fed.store.put(keys.update(0, "intruder"), update_bytes(0, "intruder", make_weights(2), 10))
    raw = fed.store.get_json(keys.manifest(0))  # overdue, so the round closes with what is there
    raw["deadline"] = 0
    fed.store.put_json(keys.manifest(0), raw)
    out = aggregator.handle({"round": 0}, ctx_for(fed.store))
    res = fed.store.get_json(keys.result(0))
    reasons = {x["client"]: x["reason"] for x in res["rejected"]}
    assert out["status"] == "failed" and res["included"] == []
    assert "over the" in reasons[a] and "max_update_mb" in reasons[a]
    assert "not selected" in reasons["intruder"]
