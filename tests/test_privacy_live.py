"""Privacy on the local runtime: a masked federation with a client that dies mid-training."""

from __future__ import annotations

import pytest

from fedkeeper.core import config, keys
from fedkeeper.runtime import run as runmod
from fedkeeper.store.local import LocalStore
from tests.extras import mark

pytestmark = [pytest.mark.slow, mark("tf")]


def test_masked_federation_survives_a_client_killed_while_training(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    monkeypatch.setenv("FEDKEEPER_SECRETS_DIR", str(tmp_path / "secrets"))
    # The 'small' client advertises (no TensorFlow: well under its memory cap) but dies when training loads
    # TensorFlow: it drops out after the masks were agreed, so the survivors must reveal its mask key. Its
    # workers start fresh (preload off): one forked from the preloaded server holds TensorFlow from the start.
    cfg = config.from_dict({"rounds": 1, "seed": 3, "model": {"epochs": 1}, "strategy": {"quorum": 0.5},
                            "privacy": {"secure_aggregation": True, "secagg": {"phase_s": 60}},
                            "platforms": [{"name": "fast", "clients": 3, "concurrency": 2},
                                          {"name": "small", "clients": 1, "concurrency": 1, "memory_mb": 250,
                                           "options": {"preload": False}}]})
    store = LocalStore(tmp_path / "s")
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=500, log=lambda s: None)
    for r, rnd in enumerate(results["rounds"]):
        assert rnd["status"] == "done", rnd["clients"]["rejected"]
        assert sorted(rnd["clients"]["included"]) == ["fast-000", "fast-001", "fast-002"]
        res = store.get_json(keys.result(r))
        assert res["secure_aggregation"]["dropped"] == ["small-000"]
        assert res["secure_aggregation"]["roster"] == ["fast-000", "fast-001", "fast-002", "small-000"]
    assert results["rounds"][-1]["test_accuracy"] > 0.5
