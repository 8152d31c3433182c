"""The client's compile settings: steps per execution and XLA change the time a client takes, not what it learns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.extras import mark

pytestmark = mark("tf")

ROOT = Path(__file__).resolve().parents[1]


def probe(root: str) -> None:
    """Train client 0 of a digits federation under several compile settings; print the results as JSON.

    Runs in its own process so the test session never imports TensorFlow.
    """
    import numpy as np

    from fedkeeper import models
    from fedkeeper.core import blob, config, keys
    from fedkeeper.federation import setup
    from fedkeeper.functions import client, trigger
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    store = LocalStore(root)
    cfg = config.from_dict({"model": {"name": "nn", "epochs": 2}, "data": {"holdout_fraction": 0.0},
                            "platforms": [{"name": "p", "clients": 2}]})
    setup(cfg, store, progress=lambda s: None)
    trigger.handle({"round": 0}, Context(store=store, invoker=NullInvoker()))
    cid = cfg.clients[0].id

    def train(jit: bool, spe: int) -> tuple[dict, dict]:
        stored = store.get_json(keys.FEDERATION)
        stored["model"].update(jit_compile=jit, steps_per_execution=spe)
        store.put_json(keys.FEDERATION, stored)
        reply = client.handle({"round": 0, "client": cid, "mode": "train"}, Context(store=store, invoker=NullInvoker()))
        return blob.decode(bytes(store.get(keys.update(0, cid)))).tensors, reply

    plain, _ = train(False, 1)
    batched, _ = train(False, 32)
    xla, xla_reply = train(True, 32)
    jit_model = next(m for key, m in models._CACHE.items() if key[-2] is True)

    good = bytes(store.get(keys.model(0)))
    store.put(keys.model(0), blob.encode({"other/kernel": np.zeros((2, 2), np.float32)}, {"kind": "model", "round": 0}))
    try:
        train(True, 32)
        bad_error = None
    except Exception as exc:  # the wrong model must fail as bad input, not as an XLA failure
        bad_error = type(exc).__name__
    xla_kept = not client._STATE.get("xla_failed")
    store.put(keys.model(0), good)

    def refuse(*args, **kwargs):
        raise RuntimeError("XLA compilation failed: unsupported op (injected)")

    # The next train call finds XLA broken on this "platform": its traced step is dropped and tracing it fails.
    jit_model.train_step = refuse
    models.forget_traces(jit_model)
    fallback, fallback_reply = train(True, 32)
    after, after_reply = train(True, 32)  # the worker remembers and no longer tries XLA

    def diff(a: dict, b: dict) -> float:
        return max(float(np.abs(a[k] - b[k]).max()) for k in a)

    print("PROBE " + json.dumps({
        "batched_equal": all(plain[k].tobytes() == batched[k].tobytes() for k in plain),
        "xla_diff": diff(plain, xla), "xla_jit_compile": bool(jit_model.jit_compile),
        "xla_fallback_recorded": "xla_fallback" in fallback_reply["timings"],
        "fallback_diff": diff(plain, fallback), "after_diff": diff(plain, after),
        "after_retried_xla": "xla_fallback" in after_reply["timings"],
        "xla_reply_fallback": "xla_fallback" in xla_reply["timings"],
        "bad_error": bad_error, "xla_kept_after_bad_input": xla_kept,
        "moved": diff(plain, blob.decode(bytes(store.get(keys.model(0)))).tensors),
    }))


@pytest.mark.slow
def test_compile_settings_keep_the_update_and_xla_failures_fall_back(tmp_path):
    # Prepare: a digits federation with round 0 open, trained in a separate process.
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_client_compile import probe; probe(sys.argv[1])"
    # Execute
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line is not None, out.stderr[-3000:]
    got = json.loads(line[6:])
    # Assert: training moved the model; batching steps into one call changes no bit of the update;
    # XLA rounds differently but learns the same; weights of another model fail as bad input; a platform
    # where XLA fails trains uncompiled instead.
    assert got["moved"] > 1e-3
    assert got["batched_equal"] is True
    assert got["xla_jit_compile"] is True and not got["xla_reply_fallback"]
    assert got["xla_diff"] < 1e-3
    assert got["bad_error"] == "ValueError" and got["xla_kept_after_bad_input"] is True
    assert got["xla_fallback_recorded"] is True
    assert got["fallback_diff"] == 0.0 and got["after_diff"] == 0.0
    assert got["after_retried_xla"] is False
