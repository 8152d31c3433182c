"""Tree mode with sharded models: groups' shards folded as groups settle, merged per shard, finalised once."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedkeeper.core import blob, keys
from fedkeeper.core.aggregate import RunningSum, fedavg
from fedkeeper.core.config import from_dict
from fedkeeper.functions import aggregator, protocol, shards, trigger
from fedkeeper.functions.context import AGGREGATOR, Context, HandlerError, NullInvoker
from fedkeeper.store.local import LocalStore
from tests import test_shards as shard_tests
from tests.conftest import Federation, update_bytes


class RecordingStore(LocalStore):
    """A folder store that remembers which keys were read whole (get, get_view) and which by byte range."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.whole: list[str] = []
        self.ranges: list[tuple[str, int, int]] = []
        self._in_range = False

    def get(self, key, *a, **kw):
        self.whole.append(key)
        return super().get(key, *a, **kw)

    def get_view(self, key, *a, **kw):
        if not self._in_range:
            self.whole.append(key)
        return super().get_view(key, *a, **kw)

    def get_range(self, key, start, end):
        # The folder store serves a range from a read-only map of the file (only the touched pages are read),
        # so the map it opens for that is part of the ranged read, not a whole read.
        self.ranges.append((key, start, end))
        self._in_range = True
        try:
            return super().get_range(key, start, end)
        finally:
            self._in_range = False


def federation(root, n: int = 10, fan_in: int = 3, m: int = 3, **strategy) -> Federation:
    fed = Federation(root, n_clients=n)
    fed.store = RecordingStore(root)
    fed.cfg = from_dict({"rounds": 3, "strategy": strategy,
                         "aggregation": {"mode": "tree", "fan_in": fan_in, "shards": m},
                         "platforms": [{"name": "p", "clients": n}]})
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    return fed


def write(fed: Federation, r: int, scale: dict | None = None) -> dict:
    """Every client's update for round r, different in each round."""
    return shard_tests.write(fed, r, scale, per_round=50)


class Runner:
    """Runs aggregator events from a queue in a seeded order, losing and duplicating some, on a settable clock."""

    def __init__(self, fed: Federation, seed: int = 0, lose: float = 0.0, dup: float = 0.0) -> None:
        self.fed, self.rng, self.lose, self.dup = fed, random.Random(seed), lose, dup
        self.clock = [protocol.read_manifest(fed.store, 0).created]
        self.queue: list[dict] = []
        self.outs: list[dict] = []
        self.n = 0

    def ctx(self, inv: NullInvoker) -> Context:
        self.n += 1
        return Context(store=self.fed.store, invoker=inv, now=lambda: self.clock[0], invocation_id=f"agg-{self.n}")

    def drain(self) -> None:
        while self.queue:
            event = self.queue.pop(self.rng.randrange(len(self.queue)))
            inv = NullInvoker()
            self.outs.append(aggregator.handle(event, self.ctx(inv)))
            for f, p, _ in inv.calls:
                if f != AGGREGATOR or self.rng.random() < self.lose:
                    continue
                self.queue += [p] * (2 if self.rng.random() < self.dup else 1)

    def tick(self, advance: float) -> dict:
        """Let time pass, then run the tick; its aggregator poke is queued (never lost)."""
        self.clock[0] += advance
        inv = NullInvoker()
        out = trigger.tick({}, Context(store=self.fed.store, invoker=inv, now=lambda: self.clock[0]))
        self.queue += [p for f, p, _ in inv.calls if f == AGGREGATOR]
        return out


def tree_reference(root, written: dict, fan_in: int = 3) -> dict:
    """The model tree mode alone (one file, no shards) makes from the same updates."""
    fed = Federation(root, n_clients=len(written))
    fed.cfg = from_dict({"rounds": 3, "aggregation": {"mode": "tree", "fan_in": fan_in},
                         "platforms": [{"name": "p", "clients": len(written)}]})
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    for c, (w, n) in written.items():
        fed.store.put(keys.update(0, c), update_bytes(0, c, w, n))
    for c in written:
        aggregator.handle({"key": keys.update(0, c)}, Context(store=fed.store, invoker=NullInvoker()))
    assert fed.store.get_json(keys.result(0))["status"] == "done"
    return blob.decode(fed.store.get(keys.model(1))).tensors


def groupwise(m, written: dict) -> dict:
    """Sum each group in sorted order, then add the groups' sums up level by level, then divide (float32)."""
    level = []
    for members in m.groups:
        acc = RunningSum()
        for c in members:
            if c in written:  # a rejected client's update is not in its group's sum
                acc.add(*written[c])
        level.append(acc)
    while len(level) > 1:
        nxt = []
        for k in range(0, len(level), m.fan_in):
            acc = RunningSum()
            for part in level[k:k + m.fan_in]:
                acc.merge(part)
            nxt.append(acc)
        level = nxt
    return level[0].result()


def model_of(fed: Federation, r: int = 1) -> dict:
    return shards.load_model(fed.store, keys.model_index(r)).tensors


@pytest.mark.parametrize("seed,n,fan_in,levels", [(0, 10, 3, [4, 2, 1]), (1, 8, 2, [4, 2, 1]),
                                                  (2, 9, 2, [5, 3, 2, 1])])
def test_any_arrival_order_with_duplicated_and_lost_events_gives_the_tree_models_bytes(tmp_path, seed, n, fan_in,
                                                                                       levels):
    # Prepare: clients in groups of fan_in, 3 shards; events arrive shuffled and duplicated, and a third of
    # the aggregator invocations the handlers start are lost (until the third tick)
    fed = federation(tmp_path / "s", n=n, fan_in=fan_in, lease_s=5)
    m = protocol.read_manifest(fed.store, 0)
    assert m.fan_in == fan_in and m.shards == 3 and m.levels() == levels
    written = write(fed, 0)
    run = Runner(fed, seed=seed, lose=0.35, dup=0.3)
    events = list(fed.ids) + fed.ids[: 2 + seed]
    run.rng.shuffle(events)
    run.queue = [{"key": keys.update(0, c)} for c in events]
    # Execute: drain, then tick (past the leases) until the round is closed
    run.drain()
    ticks = 0
    while not fed.store.exists(keys.result(0)) and ticks < 12:
        ticks += 1
        run.lose = 0.0 if ticks >= 3 else run.lose
        run.tick(advance=10)
        run.drain()
    # Assert: one model, the same bytes tree mode writes, and FedAvg up to float rounding
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "done" and sorted(res["included"]) == sorted(fed.ids)
    assert res["model"] == keys.model_index(1) and res["timings"]["groups"] == levels[0]
    assert res["timings"]["shards"] == 3 and ticks > 0  # the lost events left work that only the tick closed
    assert len(fed.store.list(f"{keys.round_prefix(0)}aggregations/")) == 1
    model = model_of(fed)
    ref = tree_reference(tmp_path / "ref", written, fan_in)
    by_hand = groupwise(m, written)
    expect = fedavg([written[c] for c in sorted(written)])
    assert sorted(model) == sorted(ref)
    for k in model:
        np.testing.assert_array_equal(model[k], ref[k])
        np.testing.assert_array_equal(model[k], by_hand[k])
        np.testing.assert_allclose(model[k], expect[k], rtol=1e-5, atol=1e-6)
    # every group's shards were folded apart, exactly one sum each
    group_sums = [k for k in fed.store.list(f"{keys.round_prefix(0)}shards/") if "/g" in k and k.endswith("safetensors")]
    assert len(group_sums) == 3 * levels[0]


def test_each_group_is_folded_as_soon_as_it_settles(tmp_path):
    # Prepare
    fed = federation(tmp_path / "s")
    m = protocol.read_manifest(fed.store, 0)
    write(fed, 0)
    run = Runner(fed)
    first = m.groups[0]
    # Execute: only group 0's members' events
    run.queue = [{"key": keys.update(0, c)} for c in first]
    run.drain()
    # Assert: group 0 is planned and its three shards folded; nothing else, and no round-wide plan
    assert fed.store.exists(keys.shard_group_plan(0, 0)) and not fed.store.exists(keys.shard_group_plan(0, 1))
    assert all(fed.store.exists(keys.shard_group_sum(0, 0, i)) for i in range(3))
    assert not fed.store.exists(keys.shard_sum(0, 1, 0)) and not fed.store.exists(keys.shard_plan(0, 1))
    plan = fed.store.get_json(keys.shard_group_plan(0, 0))
    assert [o[0] for o in plan["order"]] == first
    # the rest, and the round closes on the last event without a tick; the federation moves on to round 1
    run.queue = [{"key": keys.update(0, c)} for c in fed.ids if c not in first]
    run.drain()
    assert fed.store.get_json(keys.result(0))["status"] == "done"
    state = fed.store.get_json(keys.STATE)
    assert state["status"] == "done" and state["next_round"] == 1 and state["model"] == keys.model_index(1)


def test_a_killed_shard_group_fold_and_a_killed_group_planner_are_taken_over_after_their_leases(tmp_path):
    # Prepare: the folder of group 1's shard 2 claimed it and died without writing its sum; group 2's planner
    # claimed its plan and died before writing it
    fed = federation(tmp_path / "s", lease_s=5)
    written = write(fed, 0)
    run = Runner(fed)
    for key in (keys.shard_group_claim(0, 1, 2), keys.shard_group_claim(0, 2, "plan")):
        fed.store.put_json(key, {"round": 0, "owner": "dead", "lease_until": run.clock[0] + 5})
    run.queue = [{"key": keys.update(0, c)} for c in fed.ids]
    run.drain()
    assert not fed.store.exists(keys.result(0)) and not fed.store.exists(keys.shard_group_sum(0, 1, 2))
    assert not fed.store.exists(keys.shard_group_plan(0, 2))
    # Execute: a tick within the lease changes nothing; after it, the poke re-invokes the fold, which takes over
    run.tick(advance=1)
    run.drain()
    assert not fed.store.exists(keys.result(0))
    run.tick(advance=10)
    run.drain()
    # Assert
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "done" and len(res["included"]) == 10
    assert fed.store.get_json(keys.shard_group_claim(0, 1, 2))["taken_over_from"] == "dead"
    assert fed.store.get_json(keys.shard_group_claim(0, 2, "plan"))["taken_over_from"] == "dead"
    ref = tree_reference(tmp_path / "ref", written)
    model = model_of(fed)
    assert all(np.array_equal(model[k], ref[k]) for k in ref)


def test_norm_bound_rejection_and_a_corrupt_update_still_give_fedavg_of_the_kept_updates(tmp_path):
    # Prepare: one update far from the model (the norm bound rejects it after the shards' distances are added),
    # one corrupt (rejected from its header in its group's plan)
    fed = federation(tmp_path / "s")
    bad, corrupt = fed.ids[2], fed.ids[7]
    written = write(fed, 0, scale={bad: 1e4})
    fed.store.put(keys.update(0, corrupt), b"\x01" * 40)
    run = Runner(fed, seed=3)
    run.queue = [{"key": keys.update(0, c)} for c in fed.ids]
    # Execute
    run.drain()
    # Assert: a second (plain) phase folded the kept updates in sorted order: FedAvg's bytes
    assert fed.store.exists(keys.shard_plan(0, 2))
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "done" and res["timings"]["phases"] == 2
    reasons = {x["client"]: x["reason"] for x in res["rejected"]}
    assert set(reasons) == {bad, corrupt} and "norm" in reasons[bad] and "corrupt" in reasons[corrupt]
    honest = {c: v for c, v in written.items() if c not in (bad, corrupt)}
    assert sorted(res["included"]) == sorted(honest)
    model = model_of(fed)
    expect = fedavg([honest[c] for c in sorted(honest)])
    for k in expect:
        np.testing.assert_array_equal(model[k], expect[k])


def test_the_next_round_reads_the_sharded_model_and_no_invocation_reads_a_whole_update(tmp_path):
    # Prepare
    fed = federation(tmp_path / "s")
    write(fed, 0)
    run = Runner(fed, seed=4)
    run.queue = [{"key": keys.update(0, c)} for c in fed.ids]
    run.drain()
    assert fed.store.get_json(keys.result(0))["status"] == "done"
    # Execute: round 1 starts from the sharded model and is folded the same way
    trigger.handle({"round": 1}, Context(store=fed.store, invoker=NullInvoker()))
    m1 = protocol.read_manifest(fed.store, 1)
    written = write(fed, 1)
    fed.store.whole.clear()
    fed.store.ranges.clear()
    for c in fed.ids:
        run.queue.append({"key": keys.update(1, c)})
    run.drain()
    # Assert
    assert m1.model == keys.model_index(1) and m1.fan_in == 3 and m1.shards == 3
    res = fed.store.get_json(keys.result(1))
    assert res["status"] == "done" and res["model"] == keys.model_index(2)
    model = model_of(fed, 2)
    expect = fedavg([written[c] for c in sorted(written)])
    for k in expect:
        np.testing.assert_allclose(model[k], expect[k], rtol=1e-5, atol=1e-6)
    # updates and the global model were read only by byte range: each range of an update is its header or
    # exactly one tensor, and each tensor of each update was read once in the round (by its shard's fold)
    update_keys = {keys.update(1, c) for c in fed.ids}
    assert not [k for k in fed.store.whole if k in update_keys or k.startswith("models/000001/model-")]
    assert not [k for k in fed.store.whole if k.startswith(f"{keys.round_prefix(1)}shards/g") and "plan" not in k]
    for k in update_keys:
        h = shards.header(LocalStore(tmp_path / "s"), k)
        spans = {(e[2], e[3]) for e in h.entries.values()}
        data_start = min(a for a, _ in spans)
        reads = [(a, b) for key, a, b in fed.store.ranges if key == k]
        tensor_reads = [x for x in reads if x[0] >= data_start]
        assert all(x in spans for x in tensor_reads) and all(b <= data_start for a, b in reads if a < data_start)
        assert sorted(tensor_reads) == sorted(spans)


def test_a_group_with_nothing_to_fold_adds_nothing(tmp_path):
    # Prepare: 7 clients in groups of 3, 3, 1; the last group's only update is corrupt
    fed = federation(tmp_path / "s", n=7)
    m = protocol.read_manifest(fed.store, 0)
    written = write(fed, 0)
    alone = m.groups[2][0]
    fed.store.put(keys.update(0, alone), b"\x02" * 64)
    del written[alone]
    # Execute
    run = Runner(fed, seed=5)
    run.queue = [{"key": keys.update(0, c)} for c in fed.ids]
    run.drain()
    # Assert: group 2's shard sums are empty, and the model is the other groups' sums added up
    assert not blob.decode(fed.store.get(keys.shard_group_sum(0, 2, 0))).tensors
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "done" and sorted(res["included"]) == sorted(written)
    assert [x["client"] for x in res["rejected"]] == [alone]
    model, expect = model_of(fed), groupwise(m, written)
    assert all(np.array_equal(model[k], expect[k]) for k in expect)


def test_group_folds_and_merges_hold_about_three_shards_whatever_the_number_of_groups(tmp_path):
    # Prepare: an 8 MB model of eight 1 MB tensors in 8 shards, 8 clients in groups of 2 (levels 4, 2, 1); the
    # shards are large beside the fixed scratch buffers of the running sum (under 0.4 MB)
    import tracemalloc

    fed = Federation(tmp_path / "s", n_clients=8)
    rng = np.random.default_rng(0)
    big = {f"layer{k}/kernel": rng.standard_normal((256, 1024)).astype(np.float32) for k in range(8)}
    fed.store.put(keys.model(0), blob.encode(big, {"kind": "model", "round": 0}))
    fed.cfg = from_dict({"rounds": 2, "aggregation": {"mode": "tree", "fan_in": 2, "shards": 8},
                         "platforms": [{"name": "p", "clients": 8}]})
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    for i, c in enumerate(fed.ids):
        w = {k: v + np.float32(0.01) * rng.standard_normal(v.shape).astype(np.float32) for k, v in big.items()}
        fed.store.put(keys.update(0, c), update_bytes(0, c, w, 5 + i))
    shard = sum(v.nbytes for v in big.values()) / 8
    queue = [{"key": keys.update(0, c)} for c in fed.ids]
    peaks: dict[str, list[float]] = {"folded": [], "merged": [], "done": []}
    # Execute: every invocation runs alone under tracemalloc (numpy reports its buffers to it)
    while queue:
        event, inv = queue.pop(0), NullInvoker()
        tracemalloc.start()
        try:
            out = aggregator.handle(event, Context(store=fed.store, invoker=inv))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        if "group" in event:
            peaks[out["status"]].append(peak / shard)
        queue += [p for f, p, _ in inv.calls if f == AGGREGATOR]
    # Assert: a group fold holds its running sum and what it writes (the updates and the global model are read
    # by range); the merge of four groups' sums adds no more than a tenth to that; neither comes near the model
    assert len(peaks["folded"]) == 3 * 8 and len(peaks["merged"]) == 7 and len(peaks["done"]) == 1
    assert max(peaks["folded"]) <= 3.6
    assert max(peaks["merged"]) <= 1.1 * max(peaks["folded"])
    assert fed.store.get_json(keys.result(0))["status"] == "done"


@pytest.mark.parametrize("event,why", [({"round": 0, "shard": 0, "group": 99}, "group"),
                                       ({"round": 0, "shard": 0, "group": "a"}, "group"),
                                       ({"round": 0, "shard": 0, "group": 0, "phase": 2}, "phase")])
def test_bad_group_shard_events_are_refused(tmp_path, event, why):
    fed = federation(tmp_path / "s")
    with pytest.raises(HandlerError) as err:
        aggregator.handle(event, Context(store=fed.store, invoker=NullInvoker()))
    assert why in str(err.value)


def test_a_group_event_in_a_round_without_a_tree_is_refused(tmp_path):
    fed = Federation(tmp_path / "s", n_clients=4)
    fed.cfg = from_dict({"aggregation": {"shards": 2}, "platforms": [{"name": "p", "clients": 4}]})
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    with pytest.raises(HandlerError) as err:
        aggregator.handle({"round": 0, "shard": 0, "group": 0}, Context(store=fed.store, invoker=NullInvoker()))
    assert "not folded as a tree" in str(err.value)


@pytest.mark.slow
def test_a_live_tree_and_sharded_federation_trains_and_evaluates(tmp_path):
    # Real workers and training through the local runtime: groups of 2, 2 shards, 2 rounds
    from fedkeeper.runtime import run as runmod

    cfg = from_dict({"rounds": 2, "seed": 2, "model": {"epochs": 1},
                     "aggregation": {"mode": "tree", "fan_in": 2, "shards": 2},
                     "platforms": [{"name": "p", "clients": 4, "concurrency": 2}]})
    store = LocalStore(tmp_path / "store")
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=600, log=lambda s: None)
    assert [r["status"] for r in results["rounds"]] == ["done", "done"]
    assert all(store.exists(keys.model_index(r)) for r in (1, 2))
    for r in (0, 1):
        assert store.exists(keys.shard_group_plan(r, 1))  # folded as two groups, not as one
        assert store.get_json(keys.result(r))["timings"]["groups"] == 2
    assert results["final"]["test_accuracy"] is not None and results["final"]["test_accuracy"] > 0.5


def test_a_tree_and_sharded_round_through_the_deployed_lambda_entry_gives_the_tree_models_bytes(tmp_path, monkeypatch):
    from fedkeeper.platforms import common
    from tests.test_protocol import entry

    # Prepare: the deployed Lambda aggregator, configured by FEDKEEPER_STORE (s3://b/p, served here by the folder
    # store), receives S3 ObjectCreated records; every invocation it starts goes back to it, in order.
    fed = federation(tmp_path / "s", n=7, fan_in=3)
    written = write(fed, 0)
    inv = NullInvoker()
    monkeypatch.setattr(fed.store, "url", "s3://b/p")  # the handlers name the store in what they invoke
    monkeypatch.setenv("FEDKEEPER_STORE", "s3://b/p")
    monkeypatch.setitem(common._STORES, "s3://b/p", fed.store)
    monkeypatch.setitem(common._INVOKERS, "s3://b/p", inv)
    lam = entry("aggregator", "lambda_function.py")

    # Execute: one S3 notification per update, then the group plans', shard folds' and merges' own invocations
    for c in fed.ids:
        lam.handler({"Records": [{"eventName": "ObjectCreated:Put",
                                  "s3": {"bucket": {"name": "b"}, "object": {"key": "p/" + keys.update(0, c)}}}]}, None)
    done = 0
    while done < len(inv.calls):
        fn, payload, _ = inv.calls[done]
        done += 1
        if fn == AGGREGATOR:
            lam.handler(payload, None)

    # Assert: one aggregation; the sharded model's bytes are the ones tree mode writes for these updates
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "done" and sorted(res["included"]) == sorted(fed.ids)
    assert res["model"] == keys.model_index(1) and res["timings"]["shards"] == 3
    assert len(fed.store.list(f"{keys.round_prefix(0)}aggregations/")) == 1
    model, ref = model_of(fed), tree_reference(tmp_path / "ref", written, 3)
    assert sorted(model) == sorted(ref)
    for k in model:
        np.testing.assert_array_equal(model[k], ref[k])
