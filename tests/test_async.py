"""Buffered asynchronous mode through the protocol: buffers, staleness weights, exactly one fold per buffer under
duplicate and reordered events, parking and re-invoking clients, the end; without TensorFlow or processes."""

from __future__ import annotations

import numpy as np
import pytest

from fedkeeper.core import blob, config, keys, rounds, staleness
from fedkeeper.functions import aggregator, asynchronous, population, protocol, trigger
from fedkeeper.functions.context import CLIENT, Context, NullInvoker
from tests.conftest import Federation, make_weights, update_bytes


def make_async(tmp_path, n: int = 5, versions: int = 3, **buffer) -> Federation:
    fed = Federation(tmp_path / "store", n_clients=n)
    fed.cfg = config.from_dict({"rounds": versions, "mode": "async", "strategy": {"norm_multiple": 0},
                                "buffer": dict({"size": 3, "staleness": "polynomial:0.5", "max_staleness": 2}, **buffer),
                                "platforms": [{"name": "p", "clients": n}]})
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    return fed


def deliver(fed: Federation, ctx: Context, v: int, cid: str, seed: int, n: int = 10) -> dict:
    """Write a client's update trained from version v and deliver its store event."""
    fed.store.put(keys.update(v, cid), update_bytes(v, cid, make_weights(seed), n))
    return aggregator.handle({"key": keys.update(v, cid)}, ctx)


def model(fed: Federation, v: int) -> dict:
    return blob.decode(fed.store.get(keys.model(v))).tensors


def expected(base: dict, parts: list[tuple[dict, dict, int, float]]) -> dict:
    """base + Σ n·s·(w - from) / Σ n, in float64 like the fold."""
    total = sum(n for _, _, n, _ in parts)
    return {k: (base[k] + sum(n * s * (w[k].astype(np.float64) - f[k]) for w, f, n, s in parts) / total)
            .astype(np.float32) for k in base}


def invoked(inv: NullInvoker) -> list[tuple[int, str]]:
    return [(p["round"], p["client"]) for f, p, _ in inv.calls if f == CLIENT and p.get("async")]


def test_buffers_fold_staleness_weighted_deltas_and_clients_keep_working(tmp_path):
    # Prepare
    fed = make_async(tmp_path)
    inv = NullInvoker()
    ctx = Context(store=fed.store, invoker=inv)
    # Execute: start; three clients deliver from version 0
    assert trigger.handle({}, ctx)["status"] == "started"
    assert sorted(invoked(inv)) == [(0, c) for c in fed.ids]
    for i, c in enumerate(fed.ids[:2]):
        assert deliver(fed, ctx, 0, c, i)["status"] == "waiting"
    out = deliver(fed, ctx, 0, fed.ids[2], 2)
    # Assert: version 1 is the example-weighted mean, the three parked clients got work on version 1
    assert out["status"] == "done" and sorted(out["released"]) == fed.ids[:3]
    m0 = model(fed, 0)
    want = expected(m0, [(make_weights(i), m0, 10, 1.0) for i in range(3)])
    for k, t in model(fed, 1).items():
        np.testing.assert_allclose(t, want[k], rtol=1e-6, atol=1e-6)
    assert sorted(x for x in invoked(inv) if x[0] == 1) == [(1, c) for c in fed.ids[:3]]
    # Execute: two stale updates from version 0 and a fresh one from version 1 fill buffer 1
    deliver(fed, ctx, 0, fed.ids[3], 3, n=20)
    assert (1, fed.ids[3]) in invoked(inv)  # a client behind the newest version is invoked at once
    deliver(fed, ctx, 0, fed.ids[4], 4)
    out = deliver(fed, ctx, 1, fed.ids[0], 5)
    # Assert: stale updates are weighted by (1 + 1)^-0.5, relative to the version they trained on
    m1 = model(fed, 1)
    s1 = staleness.parse("polynomial:0.5").weight(1)
    want = expected(m1, [(make_weights(3), m0, 20, s1), (make_weights(4), m0, 10, s1), (make_weights(5), m1, 10, 1.0)])
    for k, t in model(fed, 2).items():
        np.testing.assert_allclose(t, want[k], rtol=1e-5, atol=1e-6)
    res = fed.store.get_json(keys.result(1))
    assert res["staleness"] == {fed.ids[3]: 1, fed.ids[4]: 1, fed.ids[0]: 0} and res["mode"] == "async"
    assert protocol.read_state(fed.store).rounds_done == 2


def test_duplicate_and_reordered_events_fold_each_buffer_once(tmp_path):
    # Prepare: every client delivers from version 0; events come twice, in reverse, and with extra pokes
    fed = make_async(tmp_path, n=6, versions=5)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    trigger.handle({}, ctx)
    for i, c in enumerate(fed.ids):
        fed.store.put(keys.update(0, c), update_bytes(0, c, make_weights(i), 10))
    events = [{"key": keys.update(0, c)} for c in fed.ids]
    # Execute
    for ev in events[::-1] + events + [{"round": 0}, {"round": 1}]:
        aggregator.handle(ev, Context(store=fed.store, invoker=NullInvoker()))
    # Assert: two buffers of three, each folded by exactly one invocation, every update in exactly one
    for b in (0, 1):
        assert len(fed.store.list(f"rounds/{keys.rnd(b)}/aggregations/")) == 1
    inc = fed.store.get_json(keys.result(0))["included"] + fed.store.get_json(keys.result(1))["included"]
    assert sorted(inc) == fed.ids
    # Assert: the bytes are a function of the slots: refolding buffer 0 gives the same model
    again = asynchronous.fold(ctx, fed.cfg, 0, sorted(fed.store.list(keys.buffer_prefix(0))))
    assert again["_model"] == bytes(fed.store.get(keys.model(1)))


def test_too_stale_unknown_and_late_updates_are_recorded_and_ignored(tmp_path):
    fed = make_async(tmp_path, n=4, versions=10, size=1, max_staleness=1)
    inv = NullInvoker()
    ctx = Context(store=fed.store, invoker=inv)
    trigger.handle({}, ctx)
    a, b, c, d = fed.ids
    deliver(fed, ctx, 0, a, 0)          # version 1
    deliver(fed, ctx, 1, a, 1)          # version 2
    out = deliver(fed, ctx, 0, b, 2)    # two versions behind, max_staleness 1
    assert out["status"] == "rejected" and "max_staleness" in fed.store.get_json(keys.late(0, b))["reason"]
    assert (2, b) in invoked(inv)       # it gets fresh work all the same
    # Never invoked on version 1: ignored, recorded
    assert deliver(fed, ctx, 1, c, 3)["status"] == "ignored" and fed.store.exists(keys.late(1, c))
    assert protocol.read_state(fed.store).rounds_done == 2


def test_failures_park_the_client_and_the_federation_ends_after_its_versions(tmp_path):
    fed = make_async(tmp_path, n=3, versions=2, size=1)
    inv = NullInvoker()
    ctx = Context(store=fed.store, invoker=inv)
    trigger.handle({}, ctx)
    a, b, c = fed.ids
    out = protocol.client_failed(ctx, 0, b, "worker exited", 1)
    assert out["status"] == "failed" and fed.store.exists(keys.waiting(b))
    assert protocol.client_failed(ctx, 0, b, "worker exited", 1)["status"] == "duplicate"
    deliver(fed, ctx, 0, a, 0)                      # version 1; b is released onto it
    assert (1, b) in invoked(inv) and not fed.store.exists(keys.waiting(b))
    assert deliver(fed, ctx, 1, b, 1)["finished"]   # version 2 of 2: the end
    assert protocol.read_state(fed.store).status == rounds.FINISHED
    assert deliver(fed, ctx, 0, c, 2)["status"] == "done-already" and fed.store.exists(keys.late(0, c))
    assert trigger.handle({}, ctx)["status"] == "finished"


def test_removed_clients_get_no_more_work_and_new_ones_join_on_the_tick(tmp_path):
    fed = make_async(tmp_path, n=3, versions=5, size=2)
    inv = NullInvoker()
    ctx = Context(store=fed.store, invoker=inv)
    trigger.handle({}, ctx)
    population.remove_client(ctx, fed.ids[0])
    population.add_client(ctx, "late-joiner", "p", "data/late-joiner.npz")
    out = trigger.tick({"entry": "tick"}, ctx)
    assert out["joined"] == ["late-joiner"] and (0, "late-joiner") in invoked(inv)
    deliver(fed, ctx, 0, fed.ids[0], 0)
    deliver(fed, ctx, 0, fed.ids[1], 1)             # version 1
    assert (1, fed.ids[1]) in invoked(inv) and (1, fed.ids[0]) not in invoked(inv)


def test_lost_event_for_a_full_buffer_is_folded_by_the_tick(tmp_path):
    fed = make_async(tmp_path, n=2, versions=3, size=2)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    trigger.handle({}, ctx)
    deliver(fed, ctx, 0, fed.ids[0], 0)
    fed.store.put(keys.update(0, fed.ids[1]), update_bytes(0, fed.ids[1], make_weights(1), 10))
    asynchronous._allocate(fed.store, fed.cfg, keys.update(0, fed.ids[1]), 0, fed.ids[1], 0)  # its event then lost
    assert trigger.tick({"entry": "tick"}, ctx)["buffer"] == "done"
    assert fed.store.exists(keys.model(1))


def test_time_budget_ends_the_federation(tmp_path):
    fed = make_async(tmp_path, n=2, versions=50, size=1, time_budget_s=5)
    clock = [1000.0]
    ctx = Context(store=fed.store, invoker=NullInvoker(), now=lambda: clock[0])
    trigger.handle({}, ctx)
    deliver(fed, ctx, 0, fed.ids[0], 0)
    clock[0] += 10
    assert trigger.tick({"entry": "tick"}, ctx)["reason"] == "time budget"
    st = protocol.read_state(fed.store)
    assert st.status == rounds.FINISHED and st.rounds_done == 1


@pytest.mark.parametrize("spec,tau,want", [("constant", 7, 1.0), ("polynomial:1", 3, 0.25),
                                           ("hinge:0.5,2", 2, 1.0), ("hinge:0.5,2", 6, 1 / 3)])
def test_staleness_functions(spec, tau, want):
    assert staleness.parse(spec).weight(tau) == pytest.approx(want)


@pytest.mark.parametrize("bad", ["linear", "polynomial", "polynomial:-1", "hinge:1", "hinge:a,b", "constant:3"])
def test_bad_staleness_names_the_field(bad):
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"mode": "async", "buffer": {"staleness": bad}})
    assert err.value.field == "buffer.staleness" and "polynomial:A" in err.value.fix


def test_a_lost_invocation_is_timed_out_by_the_tick_and_the_client_gets_work_again(tmp_path):
    fed = make_async(tmp_path, n=2, versions=5, size=1)
    clock = [1000.0]
    inv = NullInvoker()
    ctx = Context(store=fed.store, invoker=inv, now=lambda: clock[0])
    trigger.handle({}, ctx)
    deliver(fed, ctx, 0, fed.ids[0], 0)                     # version 1; the other invocation is lost
    assert trigger.tick({"entry": "tick"}, ctx)["timed_out"] == []
    clock[0] += fed.cfg.platform("p").timeout_s + 10
    out = trigger.tick({"entry": "tick"}, ctx)
    assert fed.ids[1] in out["timed_out"] and "timed out" in fed.store.get_json(keys.failure(0, fed.ids[1]))["reason"]
    assert (1, fed.ids[1]) in invoked(inv)                  # behind the newest version: invoked at once
