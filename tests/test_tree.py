"""Tree mode: groups of fan_in folded into partial sums as they settle, then one root fold; exactly once."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedkeeper.core import blob, keys
from fedkeeper.core.aggregate import fedavg
from fedkeeper.core.config import from_dict
from fedkeeper.functions import aggregator, protocol, trigger
from fedkeeper.functions.context import Context, NullInvoker
from tests.conftest import Federation, make_weights, update_bytes


def tree_federation(root, n: int = 10, fan_in: int = 3, **strategy) -> Federation:
    fed = Federation(root, n_clients=n)
    fed.cfg = from_dict({"rounds": 3, "strategy": strategy, "aggregation": {"mode": "tree", "fan_in": fan_in},
                         "platforms": [{"name": "p", "clients": n}]})
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    return fed


def write_updates(fed: Federation, order: list[str]) -> dict:
    out = {}
    for c in order:
        i = fed.ids.index(c)
        w = {k: v + 0.01 * make_weights(300 + i)[k] for k, v in fed.global_weights.items()}
        fed.store.put(keys.update(0, c), update_bytes(0, c, w, 5 + i))
        out[c] = (w, 5 + i)
    return out


def deliver(fed: Federation, events: list[str], seed: int = 0) -> list[dict]:
    return [aggregator.handle({"key": keys.update(0, c)}, Context(store=fed.store, invoker=NullInvoker(),
                                                                  invocation_id=f"agg-{seed}-{i}"))
            for i, c in enumerate(events)]


def test_groups_fold_as_they_settle_and_the_last_partial_starts_the_root(tmp_path):
    # Prepare
    fed = tree_federation(tmp_path / "s")
    m = protocol.read_manifest(fed.store, 0)
    assert m.fan_in == 3 and [len(g) for g in m.groups] == [3, 3, 3, 1]
    # Execute: every update but the last one's lands, each followed by its event
    last = m.groups[1][2]
    others = [c for c in fed.ids if c != last]
    written = write_updates(fed, others)
    deliver(fed, others)
    # Assert: eager folding left only the last group (and the root) for the critical path
    partials = fed.store.list(keys.partials_prefix(0))
    assert m.levels() == [4, 2, 1]
    assert sorted(partials) == sorted([keys.partial(0, 0), keys.partial(0, 2), keys.partial(0, 3), keys.partial(0, 1, 2)])
    assert not fed.store.exists(keys.result(0))
    written.update(write_updates(fed, [last]))
    outs = deliver(fed, [last])
    assert outs[0]["status"] == "done"
    res = fed.store.get_json(keys.result(0))
    assert sorted(res["included"]) == sorted(fed.ids) and res["timings"]["groups"] == 4
    model = blob.decode(fed.store.get(keys.model(1))).tensors
    expect = fedavg([written[c] for c in sorted(written)])
    for k in model:
        np.testing.assert_allclose(model[k], expect[k], rtol=1e-5, atol=1e-6)


def test_model_bytes_do_not_depend_on_arrival_order_duplicates_or_extra_aggregators(tmp_path):
    models = []
    for seed in range(3):
        fed = tree_federation(tmp_path / f"s{seed}")
        order = list(fed.ids)
        random.Random(seed).shuffle(order)
        write_updates(fed, order)
        events = order + order[: seed * 3]  # duplicates
        random.Random(seed + 10).shuffle(events)
        deliver(fed, events, seed)
        deliver(fed, events[:2], seed + 100)  # late duplicates after the round closed
        assert len(fed.store.list(f"{keys.round_prefix(0)}aggregations/")) == 1
        assert len(fed.store.list(keys.partials_prefix(0))) == 4 + 2  # level 1, then level 2
        models.append(bytes(fed.store.get(keys.model(1))))
    assert models[0] == models[1] == models[2]


def test_killed_group_aggregator_is_taken_over_and_a_lost_event_is_closed_by_the_tick(tmp_path):
    # Prepare: group 0's folder died after claiming (expired lease, no partial); group 2's event was lost
    fed = tree_federation(tmp_path / "s", lease_s=5)
    m = protocol.read_manifest(fed.store, 0)
    write_updates(fed, fed.ids)
    fed.store.put_json(keys.partial_claim(0, 0), {"round": 0, "owner": "dead", "lease_until": 0.0})
    lost = set(m.groups[2])
    deliver(fed, [c for c in fed.ids if c not in lost])
    assert not fed.store.exists(keys.result(0))
    # Execute: the tick sees a ready round and pokes the aggregator, which folds what is missing
    inv = NullInvoker()
    out = trigger.tick({}, Context(store=fed.store, invoker=inv))
    assert out["status"] == "closing"
    done = aggregator.handle(inv.calls[-1][1], Context(store=fed.store, invoker=NullInvoker()))
    # Assert
    assert done["status"] == "done" and len(done["included"]) == 10
    claim0 = fed.store.get_json(keys.partial_claim(0, 0))
    assert claim0["taken_over_from"] == "dead"


def test_rejections_failures_and_stragglers_survive_the_tree(tmp_path):
    # Prepare: one corrupt update, one failed client, one straggler; the deadline passes
    fed = tree_federation(tmp_path / "s")
    clock = [0.0]
    ctx = lambda: Context(store=fed.store, invoker=NullInvoker(), now=lambda: clock[0])  # noqa: E731
    m = protocol.read_manifest(fed.store, 0)
    clock[0] = m.created
    bad, failed, slow = m.groups[0][0], m.groups[1][0], m.groups[3][0]
    good = [c for c in fed.ids if c not in (bad, failed, slow)]
    write_updates(fed, good)
    fed.store.put(keys.update(0, bad), b"garbage" * 10)
    protocol.client_failed(ctx(), 0, failed, "MemoryError")
    for c in good + [bad]:
        aggregator.handle({"key": keys.update(0, c)}, ctx())
    assert not fed.store.exists(keys.result(0))
    # Execute: past the deadline
    clock[0] = m.deadline + 1
    out = aggregator.handle({"round": 0}, ctx())
    # Assert
    assert out["status"] == "done"
    res = fed.store.get_json(keys.result(0))
    assert sorted(res["included"]) == sorted(good)
    assert [x["client"] for x in res["rejected"]] == [bad] and "corrupt" in res["rejected"][0]["reason"]
    assert [x["client"] for x in res["failed"]] == [failed] and res["stragglers"] == [slow]


@pytest.mark.parametrize("n,mode,expect", [(10, "auto", 0), (200, "auto", 32), (10, "single", 0), (40, "tree", 32),
                                           (20, "tree", 0)])
def test_fan_in_follows_mode_and_size(n, mode, expect):
    from fedkeeper.core import strategy as strategies

    cfg = from_dict({"aggregation": {"mode": mode}, "platforms": [{"name": "p", "clients": n}]})
    assert protocol.tree_fan_in(cfg, strategies.from_config(cfg), n) == expect


def test_three_levels_keep_the_critical_path_to_two_folds_and_the_root(tmp_path):
    # Prepare: 30 clients in groups of 3: 10 groups, then 4, then 2, then the root
    fed = tree_federation(tmp_path / "s", n=30, fan_in=3)
    m = protocol.read_manifest(fed.store, 0)
    assert m.levels() == [10, 4, 2, 1]
    last = sorted(fed.ids)[-1]
    written = write_updates(fed, [c for c in fed.ids if c != last])
    deliver(fed, [c for c in fed.ids if c != last])
    assert not fed.store.exists(keys.result(0))
    # Execute: the last update's event folds its group, one group per level above it, then the root
    before = set(fed.store.list(keys.partials_prefix(0)))
    written.update(write_updates(fed, [last]))
    out = deliver(fed, [last])[0]
    # Assert
    new = set(fed.store.list(keys.partials_prefix(0))) - before
    assert out["status"] == "done" and len(new) <= 3
    model = blob.decode(fed.store.get(keys.model(1))).tensors
    expect = fedavg([written[c] for c in sorted(written)])
    for k in model:
        np.testing.assert_allclose(model[k], expect[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["median", "krum", "scaffold", "fednova", "fedadam", "fedavg"])
def test_only_strategies_whose_sums_compose_fold_as_a_tree(name):
    from fedkeeper.core import strategy as strategies

    cfg = from_dict({"strategy": {"name": name}, "aggregation": {"mode": "tree", "fan_in": 4},
                     "platforms": [{"name": "p", "clients": 40}]})
    s = strategies.from_config(cfg)
    fan_in = protocol.tree_fan_in(cfg, s, 40)
    fold = s.begin(None, None, reader=lambda client: {})
    assert (fan_in == 4) == isinstance(fold, strategies.SumFold)


def test_upper_partials_carry_counts_and_the_result_still_lists_every_client(tmp_path):
    # Prepare: 10 clients in groups of 3, three levels; one corrupt update
    fed = tree_federation(tmp_path / "s")
    m = protocol.read_manifest(fed.store, 0)
    bad = m.groups[2][1]
    good = [c for c in fed.ids if c != bad]
    written = write_updates(fed, good)
    fed.store.put(keys.update(0, bad), b"garbage" * 10)
    # Execute
    deliver(fed, good + [bad])
    # Assert: above level 1 a partial holds sums and counts, no per-client records
    upper = blob.decode(fed.store.get(keys.partial(0, 0, 2))).meta  # folds level-1 groups 0, 1 and 2
    below = [c for g in m.groups[:3] for c in g if c != bad]
    assert upper["included"] == 8 and upper["num_examples"] == sum(written[c][1] for c in below)
    assert not {"accepted", "clients", "rejected", "failed", "stragglers"} & set(upper)
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "done" and sorted(res["included"]) == sorted(good)
    assert sorted(res["clients"]) == sorted(good) and res["num_examples"] == sum(n for _, n in written.values())
    assert [x["client"] for x in res["rejected"]] == [bad]
    assert res["timings"]["model_written_at"] <= res["timings"]["finished_at"]


def test_a_tree_round_below_quorum_keeps_the_model(tmp_path):
    # Prepare: every client must be included, and one update is corrupt
    fed = tree_federation(tmp_path / "s", quorum=1.0)
    bad = fed.ids[4]
    good = [c for c in fed.ids if c != bad]
    write_updates(fed, good)
    fed.store.put(keys.update(0, bad), b"garbage" * 10)
    # Execute
    outs = deliver(fed, good + [bad])
    # Assert
    assert [o["status"] for o in outs if o["status"] in ("done", "failed")] == ["failed"]
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "failed" and len(res["included"]) == 9
    kept = blob.decode(fed.store.get(keys.model(1))).tensors
    for k, v in fed.global_weights.items():
        np.testing.assert_array_equal(kept[k], v)
