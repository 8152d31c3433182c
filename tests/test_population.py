"""The client population through the protocol: history in the store, selection by history, auto deadlines, clients
joining and leaving (CLI and HTTP), without TensorFlow or processes."""

from __future__ import annotations

import json

import pytest

from fedkeeper import cli
from fedkeeper.core import config, keys
from fedkeeper.functions import aggregator, population, protocol, trigger
from fedkeeper.functions.context import CLIENT, Context, HandlerError, NullInvoker
from fedkeeper.platforms import common
from fedkeeper.platforms.http import create_app
from tests.conftest import Federation, make_weights, update_bytes

TOKEN = "members-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_fed(tmp_path, n: int = 6, selection: dict | None = None, **strategy) -> Federation:
    """A federation of n clients on platform p with the given selection and strategy settings."""
    fed = Federation(tmp_path / "store", n_clients=n, rounds_total=20)
    fed.cfg = config.from_dict({"rounds": 20, "strategy": strategy, "selection": selection or {},
                                "platforms": [{"name": "p", "clients": n}, {"name": "q", "clients": 0}]})
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    return fed


def play_round(fed: Federation, r: int, train_s: dict[str, float] | None = None, fail: tuple = (),
               loss: float = 0.5) -> dict:
    """Start round r through the trigger, deliver an update from each selected client not in `fail`, aggregate."""
    inv = NullInvoker()
    out = trigger.handle({"round": r}, Context(store=fed.store, invoker=inv))
    assert out["status"] == "started", out
    m = protocol.read_manifest(fed.store, r)
    for i, c in enumerate(m.ids):
        if c in fail:
            protocol.client_failed(Context(store=fed.store, invoker=inv), r, c, "worker exited", 1)
            continue
        t = (train_s or {}).get(c, 1.0)
        fed.store.put(keys.update(r, c), update_bytes(r, c, make_weights(i), 10, timings={"train_s": t, "invoke_s": 0.1},
                                                      metrics={"train_loss": loss}))
    res = aggregator.handle({"round": r}, Context(store=fed.store, invoker=inv))
    assert res["status"] in ("done", "failed"), res
    return res


def test_history_is_kept_per_client_and_listed(tmp_path, capsys):
    # Prepare
    fed = make_fed(tmp_path, n=4)
    # Execute: two rounds, one client failing in the second
    play_round(fed, 0, {"p-000": 2.0})
    play_round(fed, 1, {"p-000": 4.0}, fail=("p-003",), loss=0.25)
    # Assert: the store's history
    h = population.read_history(fed.store)
    assert h["round"] == 1
    a, d = h["clients"]["p-000"], h["clients"]["p-003"]
    assert a["selected"] == 2 and a["included"] == 2 and a["last_included"] == 1 and a["platform"] == "p"
    assert a["durations"] == [2.1, 4.1] and a["last_train_loss"] == 0.25
    assert d["failures"] == 1 and d["last_outcome"] == "failed" and d["last_included"] == 0
    # Assert: the CLI shows it, rounds counted from 1
    assert cli.main(["clients", "list", "--store", fed.store.url, "--json"]) == 0
    rows = {c["id"]: c for c in json.loads(capsys.readouterr().out)["clients"]}
    assert rows["p-000"]["last_selected"] == 2 and rows["p-000"]["expected_s"] == pytest.approx(3.1)
    assert rows["p-003"]["failures"] == 1 and rows["p-003"]["member"]
    assert cli.main(["clients", "list", "--store", fed.store.url]) == 0
    text = capsys.readouterr().out
    assert "p-003" in text and "4 members" in text


def test_history_costs_one_write_per_round(tmp_path, monkeypatch):
    fed = make_fed(tmp_path, n=6)
    writes = []
    real_put = fed.store.put
    monkeypatch.setattr(fed.store, "put", lambda k, d, *a, **kw: (writes.append(k), real_put(k, d, *a, **kw))[1])
    play_round(fed, 0)
    assert writes.count(keys.HISTORY) == 1 and not any(k.startswith("population/") and k != keys.HISTORY for k in writes)


def test_a_lost_history_write_is_folded_in_by_the_next_round(tmp_path):
    fed = make_fed(tmp_path, n=3)
    play_round(fed, 0)
    fed.store.delete(keys.HISTORY)
    trigger.handle({"round": 1}, Context(store=fed.store, invoker=NullInvoker()))
    assert population.read_history(fed.store)["clients"]["p-000"]["included"] == 1


def test_compute_aware_selection_and_auto_deadline_through_the_trigger(tmp_path):
    # Prepare: 8 clients, half of them slow; every one known after a full first round
    fed = make_fed(tmp_path, n=8, selection={"name": "compute_aware", "max_wait": 0, "deadline_margin": 2.0,
                                             "deadline_percentile": 100, "deadline_floor_s": 1, "deadline_cap_s": 500},
                   fraction=0.5, deadline_s="auto")
    slow = {f"p-{i:03d}": 30.0 for i in range(4, 8)}
    play_round(fed, 0, slow)  # round 0: nobody is known, so the deadline is the cap
    m0 = protocol.read_manifest(fed.store, 0)
    assert m0.deadline - m0.created == pytest.approx(500, abs=1)
    play_round(fed, 1, slow)  # round 1 explores the other half
    assert sorted(m0.ids + protocol.read_manifest(fed.store, 1).ids) == fed.ids
    # Execute
    trigger.handle({"round": 2}, Context(store=fed.store, invoker=NullInvoker()))
    # Assert: the fast half, and a deadline of the slowest selected (1.1 s) times the margin
    m1 = protocol.read_manifest(fed.store, 2)
    assert sorted(m1.ids) == [f"p-{i:03d}" for i in range(4)]
    assert m1.deadline - m1.created == pytest.approx(2.2, abs=0.05)


def test_deadline_auto_is_validated(tmp_path):
    for bad in ("soon", 0, -1, True):
        with pytest.raises(config.ConfigError) as err:
            config.from_dict({"strategy": {"deadline_s": bad}})
        assert [f for f, _, _ in err.value.errors] == ["strategy.deadline_s"] and "auto" in err.value.fix
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"selection": {"deadline_floor_s": 50, "deadline_cap_s": 5}})
    assert err.value.field == "selection.deadline_floor_s"
    assert config.from_dict({"strategy": {"deadline_s": "auto"}}).deadline_bound == 600.0
    assert config.from_dict({"strategy": {"deadline_s": 30}}).deadline_bound == 30.0


def test_membership_changes_apply_from_the_next_round(tmp_path):
    # Prepare: round 0 is open
    fed = make_fed(tmp_path, n=4)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    trigger.handle({"round": 0}, ctx)
    before = protocol.read_manifest(fed.store, 0).ids
    # Execute: one client joins on another platform, one leaves, while round 0 runs
    added = population.add_client(ctx, "new-1", "q", "data/new-1.npz")
    removed = population.remove_client(ctx, "p-001")
    # Assert: round 0 is untouched and still completes with the removed client; round 1 has the new set
    assert added["from_round"] == 2 and removed["from_round"] == 2
    assert protocol.read_manifest(fed.store, 0).ids == before
    for i, c in enumerate(before):
        fed.store.put(keys.update(0, c), update_bytes(0, c, make_weights(i), 10))
    assert "p-001" in aggregator.handle({"round": 0}, ctx)["included"]
    trigger.handle({"round": 1}, ctx)
    m1 = protocol.read_manifest(fed.store, 1)
    assert sorted(m1.ids) == ["new-1", "p-000", "p-002", "p-003"]
    assert m1.entry("new-1") == {"id": "new-1", "platform": "q", "data": "data/new-1.npz", "config": {}}
    assert ("q", "new-1") in [(plat, p.get("client")) for f, p, plat in ctx.invoker.calls if f == CLIENT]


def test_a_removed_clients_late_update_is_recorded_and_ignored(tmp_path):
    fed = make_fed(tmp_path, n=3)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    play_round(fed, 0)
    population.remove_client(ctx, "p-002")
    trigger.handle({"round": 1}, ctx)
    # The removed client still runs (an old invocation) and writes its update before the others
    for i, c in enumerate(["p-002", "p-000", "p-001"]):
        fed.store.put(keys.update(1, c), update_bytes(1, c, make_weights(i), 10))
        aggregator.handle({"key": keys.update(1, c)}, ctx)
    res = fed.store.get_json(keys.result(1))
    assert res["included"] == ["p-000", "p-001"]
    assert {"client": "p-002", "reason": "client p-002 was not selected for round 1"} in res["rejected"]
    assert fed.store.exists(keys.late(1, "p-002"))
    assert population.read_history(fed.store)["clients"]["p-002"]["selected"] == 1  # round 1 did not count it


def test_an_added_client_without_history_is_explored(tmp_path):
    fed = make_fed(tmp_path, n=6, selection={"name": "compute_aware"}, fraction=0.34)
    for r in range(2):
        play_round(fed, r)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    population.add_client(ctx, "newbie", "p", "data/newbie.npz")
    play_round(fed, 2)
    assert "newbie" in protocol.read_manifest(fed.store, 2).ids


def test_membership_input_is_checked(tmp_path):
    fed = make_fed(tmp_path, n=2)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    cases = [(("bad id!", "p", "data/x.npz"), 400), (("x", "nowhere", "data/x.npz"), 400),
             (("x", "p", "../secrets.npz"), 400), (("x", "p", "data/x.txt"), 400), (("x", "p", ""), 400),
             (("x", "p", "file:///etc/passwd"), 400), (("p-000", "p", "data/x.npz"), 409), ((7, "p", ""), 400)]
    for args, status in cases:
        with pytest.raises(HandlerError) as err:
            population.add_client(ctx, *args)
        assert err.value.status == status, args
    with pytest.raises(HandlerError) as err:
        population.remove_client(ctx, "ghost")
    assert err.value.status == 404
    population.remove_client(ctx, "p-000")
    with pytest.raises(HandlerError) as err:
        population.remove_client(ctx, "p-001")
    assert err.value.status == 409  # the last member stays
    assert [c["id"] for c in population.members(fed.store, fed.cfg)] == ["p-001"]


def test_concurrent_changes_are_not_lost(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    fed = make_fed(tmp_path, n=2)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: population.add_client(ctx, f"c{i}", "p", f"data/c{i}.npz"), range(16)))
    assert len(population.members(fed.store, fed.cfg)) == 18


def test_cli_add_and_remove(tmp_path, capsys):
    fed = make_fed(tmp_path, n=2)
    assert cli.main(["clients", "add", "edge-9", "--platform", "q", "--data", "data/edge-9.npz",
                     "--store", fed.store.url]) == 0
    assert "round 1" in capsys.readouterr().out
    assert cli.main(["clients", "add", "edge-10", "--platform", "q", "--store", fed.store.url]) == 2
    assert "has no data" in capsys.readouterr().err
    assert cli.main(["clients", "remove", "p-000", "--store", fed.store.url]) == 0
    assert [c["id"] for c in population.members(fed.store, fed.cfg)] == ["p-001", "edge-9"]
    assert cli.main(["clients", "list", "--store", str(tmp_path / "nowhere")]) == 2


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The trigger's HTTP app over a federation, invocations recorded."""
    fed = make_fed(tmp_path, n=3)
    monkeypatch.setenv("FEDKEEPER_STORE", fed.store.url)
    monkeypatch.setenv("FEDKEEPER_TOKEN", TOKEN)
    monkeypatch.setitem(common._STORES, fed.store.url, fed.store)
    monkeypatch.setitem(common._INVOKERS, fed.store.url, NullInvoker())
    return create_app("trigger").test_client(), fed


def test_http_add_and_remove_clients(api):
    client, fed = api
    resp = client.post("/clients", headers=AUTH, json={"id": "gcf-77", "platform": "q", "data": "data/gcf-77.npz"})
    assert resp.status_code == 201 and resp.get_json()["status"] == "added"
    assert client.post("/clients", headers=AUTH, json={"id": "gcf-77", "platform": "q",
                                                       "data": "data/gcf-77.npz"}).status_code == 409
    assert client.delete("/clients/p-000", headers=AUTH).status_code == 200
    assert client.delete("/clients/p-000", headers=AUTH).status_code == 404
    listed = client.get("/clients", headers=AUTH).get_json()
    assert {c["id"]: c["member"] for c in listed["clients"]} == {"p-001": True, "p-002": True, "gcf-77": True}
    assert client.post("/clients", json={"id": "x", "platform": "p"}).status_code == 401
    assert client.delete("/clients/p-001").status_code == 401
    assert len(population.members(fed.store, fed.cfg)) == 3


@pytest.mark.parametrize("body", [
    {}, {"id": "a"}, {"platform": "p"}, {"id": "a", "platform": "p", "extra": 1}, {"id": None, "platform": "p"},
    {"id": ["a"], "platform": "p", "data": "data/a.npz"}, {"id": "a", "platform": {"x": 1}, "data": "data/a.npz"},
    {"id": "a", "platform": "p", "data": 5}, {"id": "a" * 65, "platform": "p", "data": "data/a.npz"},
    {"id": "a", "platform": "p", "data": "data/a.npz\n"}, {"id": "a", "platform": "p", "store": "s3://other/x"},
])
def test_http_bad_bodies_are_4xx_with_a_reason(api, body):
    client, fed = api
    resp = client.post("/clients", headers=AUTH, json=body)
    assert 400 <= resp.status_code < 500 and resp.get_json()["error"]
    assert len(population.members(fed.store, fed.cfg)) == 3


def test_http_bad_requests_never_500(api):
    client, _ = api
    for resp in (client.post("/clients", headers=AUTH, data="[1,2]", content_type="application/json"),
                 client.post("/clients", headers=AUTH, data="{bad", content_type="application/json"),
                 client.post("/clients", headers=AUTH, data=b"\xff" * 10),
                 client.post("/clients", headers=AUTH, data="x" * (common.MAX_BODY + 1)),
                 client.delete("/clients/..%2F..%2Fetc", headers=AUTH),
                 client.delete("/clients/" + "a" * 300, headers=AUTH),
                 client.delete("/clients/a/b", headers=AUTH)):
        assert 400 <= resp.status_code < 500, resp.get_data()
