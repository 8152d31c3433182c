"""The round protocol without TensorFlow or processes: ticks, failures, retries, evaluations, state, takeover."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from fedkeeper.core import keys, rounds
from fedkeeper.core import strategy as strategies
from fedkeeper.core.config import ConfigError, from_dict
from fedkeeper.functions import aggregator, protocol, trigger
from fedkeeper.functions.context import AGGREGATOR, CLIENT, Context, NullInvoker
from fedkeeper.platforms import common
from tests.conftest import Federation, make_weights, update_bytes

ROOT = Path(__file__).resolve().parents[1]


def entry(function: str, platform_file: str):
    """Load a deployable entry file (functions/<function>/<file>) as the platform would."""
    spec = importlib.util.spec_from_file_location(f"{function}_{platform_file}", ROOT / "functions" / function / platform_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def deployed(tmp_path, monkeypatch):
    """A federation whose functions are configured by FEDKEEPER_STORE, with the invoker recording calls."""
    fed = Federation(tmp_path / "store", n_clients=4, retries=1)
    monkeypatch.setenv("FEDKEEPER_STORE", fed.store.url)
    inv = NullInvoker()
    monkeypatch.setitem(common._STORES, fed.store.url, fed.store)
    monkeypatch.setitem(common._INVOKERS, fed.store.url, inv)
    return fed, inv


def test_lost_event_is_closed_by_a_lambda_schedule_tick_before_the_deadline(deployed):
    # Prepare: a round whose updates are all in, but whose store events were lost
    fed, inv = deployed
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    for i, c in enumerate(fed.ids):
        fed.store.put(keys.update(0, c), update_bytes(0, c, make_weights(i), 5))
    lam = entry("trigger", "lambda_function.py")
    # Execute: EventBridge fires the trigger's schedule
    out = lam.handler({"source": "aws.events", "detail-type": "Scheduled Event"}, None)
    # Assert: the tick asked the aggregator to close round 0 long before its 600 s deadline
    assert out["status"] == "closing" and out["round"] == 0
    assert (AGGREGATOR, 0) in [(f, p.get("round")) for f, p, _ in inv.calls]
    res = aggregator.handle({"round": 0}, Context(store=fed.store, invoker=inv))
    assert res["status"] == "done" and len(res["included"]) == 4


def test_failed_client_is_retried_then_settled_through_a_lambda_failure_destination(deployed):
    # Prepare
    fed, inv = deployed
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    bad = fed.ids[1]
    for i, c in enumerate(fed.ids):
        if c != bad:
            fed.store.put(keys.update(0, c), update_bytes(0, c, make_weights(i), 5))
    lam = entry("aggregator", "lambda_function.py")
    destination = {"version": "1.0", "requestContext": {"condition": "RetriesExhausted", "approximateInvokeCount": 3},
                   "requestPayload": {"round": 0, "client": bad, "mode": "train", "attempt": 1},
                   "responsePayload": {"errorMessage": "MemoryError"}}
    # Execute: the first failure is retried (retries: 1), the second settles the client
    first = lam.handler(destination, None)
    again = lam.handler(destination, None)  # a duplicate report of the same attempt
    second = lam.handler(dict(destination, requestPayload=dict(destination["requestPayload"], attempt=2)), None)
    # Assert
    assert first["status"] == "retrying" and first["attempt"] == 2
    assert again["status"] == "duplicate"
    assert [(f, p["attempt"]) for f, p, _ in inv.calls if f == CLIENT] == [(CLIENT, 2)]
    assert second["status"] == "failed"
    rec = fed.store.get_json(keys.failure(0, bad))
    assert rec["final"] and "MemoryError" in rec["reason"]
    res = aggregator.handle({"round": 0}, Context(store=fed.store, invoker=inv))
    assert res["status"] == "done" and bad not in res["included"]
    assert fed.store.get_json(keys.result(0))["failed"][0]["client"] == bad


def test_tick_times_out_a_silent_client_from_its_running_marker(deployed):
    # Prepare: one client started 400 s ago on a platform with a 300 s timeout and never wrote
    fed, inv = deployed
    clock = [1000.0]
    ctx = Context(store=fed.store, invoker=inv, now=lambda: clock[0])
    trigger.handle({"round": 0}, ctx)
    silent = fed.ids[0]
    protocol.client_started(ctx, 0, silent, attempt=2)  # the retry is running
    for i, c in enumerate(fed.ids[1:]):
        fed.store.put(keys.update(0, c), update_bytes(0, c, make_weights(i), 5))
    clock[0] += 400
    # Execute
    out = trigger.tick({}, ctx)
    # Assert: attempt 2 exceeds retries (1), so the client is settled and the round closes
    assert out["timed_out"] == [silent] and out["status"] == "closing"
    rec = fed.store.get_json(keys.failure(0, silent))
    assert rec["final"] and "timed out" in rec["reason"]


def test_client_ids_with_dots_settle(tmp_path):
    cfg = {"rounds": 1, "clients": [{"id": "edge.board-1", "platform": "p"}, {"id": "a.b", "platform": "p"}],
           "platforms": [{"name": "p", "clients": 0}]}
    fed = Federation(tmp_path / "s", n_clients=1)
    fed.cfg = from_dict(cfg)
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    fed.ids = ["a.b", "edge.board-1"]
    m = fed.open_round(0)
    fed.store.put(keys.update(0, "a.b"), update_bytes(0, "a.b", make_weights(1), 3))
    fed.store.put_json(keys.failure(0, "edge.board-1"), {"attempt": 1, "final": True, "reason": "x"})
    assert protocol.settle(fed.store, m).ready


def test_lost_evaluation_is_requested_again_by_the_tick_and_by_resume(federation):
    # Prepare: round 0 done, its evaluation requested long ago and never written
    fed = federation
    clock = [1000.0]
    inv = NullInvoker()
    ctx = Context(store=fed.store, invoker=inv, now=lambda: clock[0])
    trigger.handle({"round": 0}, ctx)
    fed.submit_all(0)
    aggregator.handle({"round": 0}, ctx)
    assert fed.store.get_json(keys.evaluation_request(0))["attempt"] == 1
    evals = lambda: [p for f, p, _ in inv.calls if f == CLIENT and p.get("mode") == "evaluate"]  # noqa: E731
    assert len(evals()) == 1
    fed.store.delete(keys.manifest(1))  # keep the tick from starting round 1 in this test
    # Execute: a tick within the platform timeout does nothing; after it, the evaluation is re-run
    protocol.repair_evaluations(ctx, ctx.config())
    assert len(evals()) == 1
    clock[0] += 400
    assert protocol.repair_evaluations(ctx, ctx.config()) == [0]
    # Assert
    assert len(evals()) == 2 and fed.store.get_json(keys.evaluation_request(0))["attempt"] == 2
    assert protocol.repair_evaluations(ctx, ctx.config(), force=True) == [0]
    for _ in range(3):
        protocol.evaluation_failed(ctx, 0, "killed")
    assert fed.store.get_json(keys.evaluation(0))["test_accuracy"] is None


def test_duplicate_and_reordered_events_aggregate_once(federation):
    fed = federation
    fed.open_round(0)
    fed.submit_all(0)
    evs = [{"key": keys.update(0, c)} for c in reversed(fed.ids)] * 2
    outs = [aggregator.handle(e, Context(store=fed.store, invoker=NullInvoker(), invocation_id=f"a{i}"))
            for i, e in enumerate(evs)]
    assert sum(o["status"] in ("done", "failed") for o in outs) == 1
    assert len(fed.store.list(f"{keys.round_prefix(0)}aggregations/")) == 1


def test_state_never_moves_backwards(federation):
    store = federation.store
    assert protocol.write_state(store, 2, rounds.OPEN)
    assert not protocol.write_state(store, 1, rounds.DONE)
    assert protocol.write_state(store, 2, rounds.AGGREGATING)
    assert not protocol.write_state(store, 2, rounds.OPEN)
    assert protocol.read_state(store).status == rounds.AGGREGATING
    store.put(keys.STATE, b'{"round": [1], "status": {"x": 1}}')
    assert protocol.read_state(store).round == 0


def test_client_exception_settles_the_client(federation, monkeypatch):
    # Prepare: a selected client whose data is missing from the store
    from fedkeeper.functions import client

    fed = federation
    ctx = Context(store=fed.store, invoker=NullInvoker())
    trigger.handle({"round": 0}, ctx)
    # Execute
    with pytest.raises(Exception):
        client.handle({"round": 0, "client": fed.ids[0], "mode": "train"}, ctx)
    # Assert: the failure is recorded as final (retries 0) and the aggregator is poked
    rec = fed.store.get_json(keys.failure(0, fed.ids[0]))
    assert rec["final"] and "missing" in rec["reason"]
    assert fed.store.exists(keys.running(0, fed.ids[0]))
    assert ctx.invoker.calls[-1][0] == AGGREGATOR


def test_strategy_names_and_params_are_validated():
    with pytest.raises(ConfigError) as err:
        from_dict({"strategy": {"name": "fedmagic"}})
    assert "fedavg" in err.value.fix
    with pytest.raises(ConfigError) as err:
        from_dict({"strategy": {"params": {"mu": 0.1}}})
    assert err.value.field == "strategy.params.mu"
    assert "fedavg" in strategies.names()
    s = strategies.create("fedavg", strategies.Settings(fraction=0.5, min_clients=1, quorum=0.5))
    chosen = s.configure(3, [{"id": f"c{i}"} for i in range(10)], seed=1)
    assert len(chosen) == 5 and chosen == s.configure(3, [{"id": f"c{i}"} for i in range(10)], seed=1)
    assert all(c["config"] == {} for c in chosen) and s.min_included(10) == 5


def test_unreadable_claim_is_taken_over(federation):
    fed = federation
    fed.open_round(0)
    fed.submit_all(0)
    fed.store.put(keys.claim(0), b"[[[not json")
    out = aggregator.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    assert out["status"] == "done"


def test_gcs_missing_object_is_not_found_whatever_the_bucket_is_called():
    pytest.importorskip("google.cloud.storage", reason="needs the gcp extra: pip install 'fedkeeper[gcp]'")
    from google.api_core import exceptions as gexc

    from fedkeeper.store import NotFound, StoreError
    from fedkeeper.store.gcs import GCSStore

    class Bucket:
        """Stands in for the SDK's bucket: only exists() is asked."""

        name = "my-bucket-of-buckets"

        def __init__(self, exists: bool) -> None:
            self._exists = exists

        def exists(self) -> bool:
            return self._exists

    store = GCSStore.__new__(GCSStore)
    store.bucket = Bucket(True)
    err = store._fail(gexc.NotFound("bucket my-bucket-of-buckets: 404 No such bucket or key"), "k", "get")
    assert isinstance(err, NotFound)
    store = GCSStore.__new__(GCSStore)
    store.bucket = Bucket(False)
    err = store._fail(gexc.NotFound("object k not found"), "k", "get")
    assert isinstance(err, StoreError) and "does not exist" in str(err)


def test_hostile_updates_through_the_lambda_s3_entry_are_rejected_with_reasons(deployed):
    # Prepare: a deployed aggregator fired by S3 ObjectCreated records; every class of hostile update in one round
    from fedkeeper.core import faults

    fed, inv = deployed
    # 14 hostile of 18: a quorum of 0.2 lets the four honest clients make the round
    fed.cfg = from_dict({"rounds": 3, "strategy": {"quorum": 0.2},
                         "platforms": [{"name": "p", "clients": len(faults.HOSTILE_KINDS) + 4}]})
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    fed.ids = [c.id for c in fed.cfg.clients]
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    bad = dict(zip(fed.ids, faults.HOSTILE_KINDS))
    for i, c in enumerate(fed.ids):
        w = {k: v + 0.01 * make_weights(500 + i)[k] for k, v in fed.global_weights.items()}
        meta = {"kind": "update", "round": 0, "client": c, "num_examples": 10, "metrics": {}, "timings": {}}
        data = faults.hostile_update(bad[c], w, meta) if c in bad else update_bytes(0, c, w, 10)
        fed.store.put(keys.update(0, c), data)
    records = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"},
                                                                     "object": {"key": "p/" + keys.update(0, c)}}}
                           for c in fed.ids]}
    import os

    os.environ["FEDKEEPER_STORE"] = "s3://b/p"
    common._STORES["s3://b/p"] = fed.store
    common._INVOKERS["s3://b/p"] = inv
    try:
        lam = entry("aggregator", "lambda_function.py")
        # Execute
        out = lam.handler(records, None)
    finally:
        os.environ["FEDKEEPER_STORE"] = fed.store.url
        common._STORES.pop("s3://b/p", None)
        common._INVOKERS.pop("s3://b/p", None)
    # Assert: exactly one aggregation; every hostile client rejected with a reason; the honest four included
    assert sum(r.get("status") == "done" for r in out["results"]) == 1, out["results"][:3]
    res = fed.store.get_json(keys.result(0))
    assert {x["client"] for x in res["rejected"] if x["reason"]} == set(bad)
    assert sorted(res["included"]) == sorted(c for c in fed.ids if c not in bad)
