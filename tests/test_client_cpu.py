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


@pytest.mark.slow
@pytest.mark.parametrize("holdout", [0.0, 0.2])
def test_a_zero_epoch_update_is_the_global_model_and_needs_keras_only_to_score_a_holdout(tmp_path, holdout):
    # Prepare: run the client in a fresh interpreter, so whether it imported TensorFlow can be seen
    import json
    import subprocess
    import sys

    from fedkeeper.core import config
    from fedkeeper.federation import setup
    from fedkeeper.store.local import LocalStore

    store = LocalStore(tmp_path / "store")
    cfg = config.from_dict({"model": {"name": "nn", "epochs": 0}, "data": {"holdout_fraction": holdout},
                            "platforms": [{"name": "p", "clients": 2}]})
    setup(cfg, store, progress=lambda s: None)
    cid = cfg.clients[0].id
    code = f"""
import json, sys
from fedkeeper.core import blob, keys
from fedkeeper.functions import client, trigger
from fedkeeper.functions.context import Context, NullInvoker
from fedkeeper.store.local import LocalStore
store = LocalStore({str(tmp_path / 'store')!r})
trigger.handle({{"round": 0}}, Context(store=store, invoker=NullInvoker()))
reply = client.handle({{"round": 0, "client": {cid!r}, "mode": "train"}}, Context(store=store, invoker=NullInvoker()))
up = blob.decode(bytes(store.get(keys.update(0, {cid!r}))))
model = blob.decode(bytes(store.get(keys.model(0))))
same = sorted(up.tensors) == sorted(model.tensors) and all(
    up.tensors[k].dtype == model.tensors[k].dtype and up.tensors[k].tobytes() == model.tensors[k].tobytes()
    for k in model.tensors)
print(json.dumps({{"status": reply["status"], "same": same, "tf": "tensorflow" in sys.modules,
                  "metrics": reply["metrics"], "built": up.meta["timings"]["model_built"]}}))
"""
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # Assert: the update is the global model bit for bit; Keras is loaded only when a holdout is scored
    assert got["status"] == "trained" and got["same"] is True
    assert got["metrics"]["local_steps"] == 0 and got["metrics"]["train_examples"] > 0
    if holdout:
        assert got["tf"] is True and got["metrics"]["holdout_examples"] > 0 and "holdout_accuracy" in got["metrics"]
    else:
        assert got["tf"] is False and got["built"] is False and got["metrics"]["holdout_examples"] == 0
