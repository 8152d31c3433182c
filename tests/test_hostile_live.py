"""Hostile clients in a live local federation (real workers, real training): rounds complete with the honest
clients, each hostile update is rejected with a reason, and status, report and --resume work afterwards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedkeeper.cli import main
from fedkeeper.core import blob, keys
from fedkeeper.core.aggregate import fedavg
from fedkeeper.core.config import from_dict
from fedkeeper.runtime import run as runmod
from fedkeeper.store.local import LocalStore

pytestmark = pytest.mark.slow

HOSTILE = {"edge-000": "scaled", "edge-001": "deep_metadata", "cloud-000": "timings_list",
           "cloud-001": "examples_inflated"}


def test_hostile_clients_in_a_live_federation(tmp_path, capsys):
    # Prepare: 10 clients (defaults for quorum and the norm bound), 4 of them hostile every round
    cfg = from_dict({"rounds": 2, "seed": 3, "model": {"epochs": 1},
                     "platforms": [{"name": "edge", "clients": 5, "concurrency": 1},
                                   {"name": "cloud", "clients": 5, "concurrency": 1}]})
    store = LocalStore(tmp_path / "store")
    env = {"FEDKEEPER_FAULTS": json.dumps({"hostile": HOSTILE})}
    # Execute
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=600, log=lambda s: None,
                         env=env)
    # Assert: every round done with only honest clients; the model is exactly their average
    for r in range(cfg.rounds):
        res = store.get_json(keys.result(r))
        assert res["status"] == "done", res
        reasons = {x["client"]: x["reason"] for x in res["rejected"]}
        assert set(HOSTILE) <= set(reasons) and all(reasons[c] for c in HOSTILE)
        assert not set(HOSTILE) & set(res["included"]) and len(res["included"]) == 6
        updates = [blob.decode(store.get(keys.update(r, c))) for c in sorted(res["included"])]
        expect = fedavg([(u.tensors, u.num_examples) for u in updates])
        model = blob.decode(store.get(keys.model(r + 1))).tensors
        for k, v in model.items():
            assert np.all(np.isfinite(v))
            np.testing.assert_array_equal(v, expect[k])
    assert results["final"]["test_accuracy"] is not None and results["final"]["test_accuracy"] > 0.5
    # Readers work afterwards: status, report, and a resume that re-runs a lost evaluation
    assert main(["status", "--store", store.url]) == 0
    assert main(["status", "--store", store.url, "--json"]) == 0
    assert main(["report", "--store", store.url, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "results.json").exists()
    store.delete(keys.evaluation(0))
    again = runmod.run(cfg, store, resume=True, progress=runmod.Progress(cfg, quiet=True), timeout_s=300,
                       log=lambda s: None)
    assert again["rounds"][0]["test_accuracy"] is not None
    capsys.readouterr()
