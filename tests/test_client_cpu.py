"""A client reports the CPU its training used; a zero-epoch client, which trains nothing, reports none."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [0, 1])
def test_training_cpu_is_measured_only_around_a_fit(tmp_path, epochs):
    # Prepare
    from fedkeeper.core import blob, config, keys
    from fedkeeper.federation import setup
    from fedkeeper.functions import client, trigger
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    store = LocalStore(tmp_path)
    cfg = config.from_dict({"model": {"name": "nn", "epochs": epochs}, "platforms": [{"name": "p", "clients": 2}]})
    setup(cfg, store, progress=lambda s: None)
    trigger.handle({"round": 0}, Context(store=store, invoker=NullInvoker()))
    cid = cfg.clients[0].id
    # Execute
    reply = client.handle({"round": 0, "client": cid, "mode": "train"}, Context(store=store, invoker=NullInvoker()))
    # Assert
    timings = blob.decode(bytes(store.get(keys.update(0, cid)))).meta["timings"]
    assert reply["status"] == "trained"
    if epochs == 0:
        assert timings["train_cpu_s"] == 0.0 and reply["metrics"]["local_steps"] == 0
    else:
        assert timings["train_cpu_s"] > 0.0 and reply["metrics"]["local_steps"] > 0
