"""Sharded aggregation: each tensor shard folded by its own invocation; the model written sharded with an index."""

from __future__ import annotations

import numpy as np
import pytest

from fedkeeper.core import blob, keys
from fedkeeper.core import shards as shardplan
from fedkeeper.core.aggregate import fedavg
from fedkeeper.core.config import from_dict
from fedkeeper.functions import aggregator, protocol, shards, trigger
from fedkeeper.functions.context import AGGREGATOR, Context, NullInvoker
from tests.conftest import Federation, make_weights, update_bytes


def sharded(root, n: int = 6, m: int = 3, **strategy) -> Federation:
    fed = Federation(root, n_clients=n)
    fed.cfg = from_dict({"rounds": 3, "strategy": strategy, "aggregation": {"shards": m},
                         "platforms": [{"name": "p", "clients": n}]})
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    return fed


def write(fed: Federation, r: int, scale: dict | None = None, per_round: int = 0) -> dict:
    """Every client's update for round r (scaled by `scale`; `per_round` makes each round's weights differ)."""
    out = {}
    base = shards.load_model(fed.store, protocol.read_manifest(fed.store, r).model).tensors
    for i, c in enumerate(fed.ids):
        k = (scale or {}).get(c, 1.0)
        w = {name: v + np.float32(0.01 * k) * make_weights(400 + i + per_round * r)[name] for name, v in base.items()}
        fed.store.put(keys.update(r, c), update_bytes(r, c, w, 5 + i))
        out[c] = (w, 5 + i)
    return out


def drive(fed: Federation, event: dict) -> list[dict]:
    """Run an aggregator event and every aggregator invocation it starts, until none is left."""
    queue, outs = [event], []
    while queue:
        inv = NullInvoker()
        outs.append(aggregator.handle(queue.pop(0), Context(store=fed.store, invoker=inv)))
        queue += [p for f, p, _ in inv.calls if f == AGGREGATOR]
    return outs


def test_plan_is_byte_balanced_and_deterministic():
    sizes = {"a": 100, "b": 90, "c": 50, "d": 40, "e": 10, "f": 10}
    plan = shardplan.plan(sizes, 3)
    loads = sorted(sum(sizes[n] for n in s) for s in plan)
    assert plan == shardplan.plan(dict(reversed(list(sizes.items()))), 3)
    assert sorted(n for s in plan for n in s) == sorted(sizes) and loads[-1] - loads[0] <= 50
    assert len(shardplan.plan(sizes, 10)) == len(sizes)


def test_a_sharded_round_writes_an_index_and_equals_fedavg_bit_for_bit(tmp_path):
    # Prepare
    fed = sharded(tmp_path / "s")
    m = protocol.read_manifest(fed.store, 0)
    assert m.shards == 3 and m.fan_in == 0
    written = write(fed, 0)
    # Execute: the last update's event plans, starts 3 shard folds, and the last of them finalises
    outs = drive(fed, {"key": keys.update(0, fed.ids[-1])})
    # Assert
    assert outs[0]["status"] == "sharding" and outs[-1]["status"] == "done"
    idx = fed.store.get_json(keys.model_index(1))
    files = sorted(set(idx["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for i in range(3):  # each shard's sum holds exactly its own tensors
        part = blob.decode(fed.store.get(keys.shard_sum(0, 1, i)))
        assert sorted(part.tensors) == fed.store.get_json(keys.shard_plan(0, 1))["shards"][i]
    model = shards.load_model(fed.store, keys.model_index(1)).tensors
    expect = fedavg([written[c] for c in sorted(written)])
    for k in expect:
        np.testing.assert_array_equal(model[k], expect[k])
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "done" and res["model"] == keys.model_index(1) and res["timings"]["shards"] == 3
    # The next round starts from the sharded model, and its clients get it joined into one file
    trigger.handle({"round": 1}, Context(store=fed.store, invoker=NullInvoker()))
    m1 = protocol.read_manifest(fed.store, 1)
    assert m1.model == keys.model_index(1)
    joined = blob.decode(shards.model_bytes(fed.store, m1.model)).tensors
    assert all(np.array_equal(joined[k], model[k]) for k in model)


def test_the_norm_bound_takes_a_second_phase_and_a_hostile_update_is_rejected(tmp_path):
    fed = sharded(tmp_path / "s")
    bad = fed.ids[2]
    written = write(fed, 0, scale={bad: 1e4})
    fed.store.put(keys.update(0, fed.ids[4]), b"\x01" * 40)  # corrupt: rejected from its header in the plan
    outs = drive(fed, {"round": 0})
    assert outs[-1]["status"] == "done"
    assert fed.store.exists(keys.shard_plan(0, 2))
    res = fed.store.get_json(keys.result(0))
    reasons = {x["client"]: x["reason"] for x in res["rejected"]}
    assert "norm" in reasons[bad] and "corrupt" in reasons[fed.ids[4]]
    honest = {c: v for c, v in written.items() if c not in (bad, fed.ids[4])}
    model = shards.load_model(fed.store, keys.model_index(1)).tensors
    expect = fedavg([honest[c] for c in sorted(honest)])
    for k in expect:
        np.testing.assert_array_equal(model[k], expect[k])


def test_lost_shard_invocations_are_reinvoked_after_the_lease_and_nothing_folds_twice(tmp_path):
    fed = sharded(tmp_path / "s", lease_s=5)
    write(fed, 0)
    clock = [protocol.read_manifest(fed.store, 0).created]
    inv = NullInvoker()
    first = aggregator.handle({"round": 0}, Context(store=fed.store, invoker=inv, now=lambda: clock[0]))
    assert first["status"] == "sharding" and len(inv.calls) == 3
    # Only shard 0's invocation runs; the others are lost with their events
    drive(fed, inv.calls[0][1])
    assert not fed.store.exists(keys.result(0))
    clock[0] += 10  # the coordinator's lease expires; the tick pokes the round
    tick_inv = NullInvoker()
    out = trigger.tick({}, Context(store=fed.store, invoker=tick_inv, now=lambda: clock[0]))
    assert out["status"] == "closing"
    inv2 = NullInvoker()
    again = aggregator.handle(tick_inv.calls[-1][1], Context(store=fed.store, invoker=inv2, now=lambda: clock[0]))
    assert again["status"] == "sharding" and sorted(p["shard"] for _, p, _ in inv2.calls) == [1, 2]
    for _, p, _ in inv2.calls:
        drive(fed, p)
    assert fed.store.get_json(keys.result(0))["status"] == "done"
    assert len(fed.store.list(f"{keys.round_prefix(0)}aggregations/")) == 1


@pytest.mark.parametrize("event", [{"round": 0, "shard": 9}, {"round": 0, "shard": -1}, {"round": 0, "shard": "a"},
                                   {"round": 0, "shard": 0, "phase": 7}])
def test_bad_shard_events_are_refused(tmp_path, event):
    from fedkeeper.functions.context import HandlerError

    fed = sharded(tmp_path / "s")
    with pytest.raises(HandlerError):
        aggregator.handle(event, Context(store=fed.store, invoker=NullInvoker()))


def test_presigned_clients_and_shards_is_a_config_error():
    from fedkeeper.core.config import ConfigError

    with pytest.raises(ConfigError) as err:
        from_dict({"client_access": "presigned", "aggregation": {"shards": 4}})
    assert err.value.field == "aggregation.shards"


@pytest.mark.slow
def test_a_live_sharded_federation_trains_and_evaluates(tmp_path):
    # Real workers and training: clients join the sharded model, the evaluation reads it, rounds chain
    from fedkeeper.runtime import run as runmod
    from fedkeeper.store.local import LocalStore

    cfg = from_dict({"rounds": 2, "seed": 2, "model": {"epochs": 1}, "aggregation": {"shards": 2},
                     "platforms": [{"name": "p", "clients": 4, "concurrency": 2}]})
    store = LocalStore(tmp_path / "store")
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=600, log=lambda s: None)
    assert [r["status"] for r in results["rounds"]] == ["done", "done"]
    assert all(store.exists(keys.model_index(r)) for r in (1, 2))
    assert results["final"]["test_accuracy"] is not None and results["final"]["test_accuracy"] > 0.5
