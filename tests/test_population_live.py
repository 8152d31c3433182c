"""Heterogeneous populations live on the local runtime (real TensorFlow, worker processes, store events): buffered
asynchronous mode with an emulated slow platform and injected invocation failures, and compute-aware selection."""

import pytest

from fedkeeper.core import config, keys
from fedkeeper.functions import population
from fedkeeper.runtime import run as runmod
from fedkeeper.runtime.local import FaultPlan
from fedkeeper.store.local import LocalStore
from tests.extras import mark

pytestmark = [pytest.mark.slow, mark("tf")]

PLATFORMS = [{"name": "fast", "clients": 3, "concurrency": 2},
             {"name": "slow", "clients": 1, "concurrency": 1, "options": {"speed": 0.25, "cold_start_s": 1.0}}]


def test_async_federation_with_a_slow_platform_and_failures(tmp_path):
    # Prepare
    cfg = config.from_dict({"rounds": 4, "seed": 2, "mode": "async", "model": {"epochs": 1},
                            "buffer": {"size": 2, "staleness": "hinge:1,1", "max_staleness": 3},
                            "platforms": PLATFORMS})
    store = LocalStore(tmp_path / "store")
    # Execute
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=600, log=lambda s: None,
                         faults=FaultPlan(fail_client=0.2, seed=3))
    # Assert: four versions, each folded once from two updates, evaluated, accuracy up
    rs = results["rounds"]
    assert [r["aggregations"] for r in rs] == [1, 1, 1, 1]
    assert all(len(store.list(keys.buffer_prefix(b))) == 2 for b in range(4))
    accs = [r["test_accuracy"] for r in rs]
    assert accs[-1] > accs[0], accs
    for b in range(4):
        res = store.get_json(keys.result(b))
        assert res["mode"] == "async" and all(0 <= t <= 3 for t in res["staleness"].values())
    hist = population.read_history(store)
    assert hist["round"] == 3 and sum(h["included"] for h in hist["clients"].values()) == 8


def test_compute_aware_sync_with_auto_deadline(tmp_path):
    cfg = config.from_dict({"rounds": 3, "seed": 1, "model": {"epochs": 1},
                            "strategy": {"fraction": 0.5, "deadline_s": "auto"},
                            "selection": {"name": "compute_aware", "max_wait": 2, "deadline_floor_s": 20,
                                          "deadline_cap_s": 300},
                            "platforms": PLATFORMS})
    store = LocalStore(tmp_path / "store")
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=600, log=lambda s: None)
    rs = results["rounds"]
    assert all(r["status"] == "done" for r in rs)
    # Rounds 1 and 2 explore all four clients; round 3 knows everyone and so has a derived deadline
    seen = set(rs[0]["clients"]["selected"]) | set(rs[1]["clients"]["selected"])
    assert seen == {c.id for c in cfg.clients}
    m = [store.get_json(keys.manifest(r)) for r in range(3)]
    assert m[0]["deadline"] - m[0]["created"] == pytest.approx(300, abs=1)
    assert 20 <= m[2]["deadline"] - m[2]["created"] < 300
