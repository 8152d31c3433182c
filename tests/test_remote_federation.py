"""Whole federations against real object-store servers, aggregation fired by the server's own events."""

import pytest

from fedkeeper.core import config
from fedkeeper.runtime import run as runmod
from fedkeeper.store import open_store
from tests import servers
from tests.extras import mark

pytestmark = [pytest.mark.slow, mark("tf")]

CFG = {"rounds": 3, "seed": 2, "model": {"epochs": 2},
       "platforms": [{"name": "openwhisk", "clients": 2, "concurrency": 1},
                     {"name": "gcf", "clients": 2, "concurrency": 1}]}


def check(results):
    rs = results["rounds"]
    assert [r["aggregations"] for r in rs] == [1, 1, 1]
    assert all(r["status"] == "done" and len(r["clients"]["included"]) == 4 for r in rs)
    accs = [r["test_accuracy"] for r in rs]
    assert accs[-1] >= 0.85 and accs[-1] > accs[0], accs
    return rs


def test_seaweedfs_federation_driven_by_its_webhook(monkeypatch):
    # Prepare: SeaweedFS posts its filer events to the runtime's receiver port.
    port = servers.free_port()
    srv = servers.start_seaweedfs(bucket="fedweb", webhook=f"http://127.0.0.1:{port}/events", webhook_prefix="fed1/")
    try:
        for k, v in srv.env.items():
            monkeypatch.setenv(k, v)
        store = open_store(srv.url("fed1"))
        cfg = config.from_dict(CFG)
        # Execute
        results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=600,
                             log=lambda s: None, events_port=port)
    finally:
        srv.stop()
    # Assert: every round was aggregated by an event from the server, not by the fallback tick.
    rs = check(results)
    for r in rs:
        t = r["timings"]
        assert t["triggered_by"] == "event"
        assert t["manifest_created"] <= t["event_delivered_at"] <= t["aggregation_started_at"] <= t["finished_at"]
    assert results["runtime"]["events_delivered"] >= 12


def test_gcs_federation_with_client_notify(fake_gcs):
    """fake-gcs-server sends no notifications, so clients notify the aggregator after their upload."""
    store = open_store(fake_gcs.url("fed2"))
    cfg = config.from_dict(CFG)
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=600, log=lambda s: None)
    rs = check(results)
    assert results["federation"]["events"] == "client"
    assert all(r["timings"]["triggered_by"] == "event" for r in rs)


def test_presigned_clients_hold_no_credentials(seaweedfs, monkeypatch):
    """With client_access: presigned, client workers run without store credentials, on URLs alone."""
    store = open_store(seaweedfs.url("fed3"))
    cfg = config.from_dict(dict(CFG, rounds=2, client_access="presigned", model={"epochs": 1}))
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=600, log=lambda s: None)
    rs = results["rounds"]
    assert [r["aggregations"] for r in rs] == [1, 1]
    assert all(len(r["clients"]["included"]) == 4 for r in rs)
    assert rs[-1]["test_accuracy"] > 0.5
