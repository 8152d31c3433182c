"""A warm client worker keeps its compiled model between invocations; nothing of one invocation leaks into the next."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_federation(root: str, seed: int) -> list[str]:
    """A digits federation of three NN clients (XLA and 32 steps per call, as by default) with round 0 open."""
    from fedkeeper.core import config
    from fedkeeper.federation import setup
    from fedkeeper.functions import trigger
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    store = LocalStore(root)
    cfg = config.from_dict({"seed": seed, "model": {"name": "nn", "epochs": 2},
                            "platforms": [{"name": "p", "clients": 3}]})
    setup(cfg, store, progress=lambda s: None)
    trigger.handle({"round": 0}, Context(store=store, invoker=NullInvoker()))
    return [c.id for c in cfg.clients]


def train_sequence(calls: list[list[str]], out: str) -> None:
    """In this one process (one warm worker), train each (store root, client) in turn; save every update's tensors."""
    import numpy as np

    from fedkeeper.core import blob, keys
    from fedkeeper.functions import client
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    saved, info = {}, []
    for i, (root, cid) in enumerate(calls):
        store = LocalStore(root)
        reply = client.handle({"round": 0, "client": cid, "mode": "train"}, Context(store=store, invoker=NullInvoker()))
        update = blob.decode(bytes(store.get(keys.update(0, cid))))
        for name, arr in update.tensors.items():
            saved[f"{i}|{name}"] = arr
        from fedkeeper import models

        # True if the invocation left programs it traced without giving the compiler's freed heap back.
        info.append({"metrics": reply["metrics"], "model_built": reply["timings"].get("model_built"),
                     "left_to_release": models.release_freed_memory(2**62)})
    np.savez(out, **saved)
    Path(out + ".json").write_text(json.dumps(info))


def train_concurrently(calls: list[list[str]], out: str) -> None:
    """In this one process, train all (store root, client) calls at once, each on its own thread; save the updates."""
    import threading

    import numpy as np

    from fedkeeper.core import blob, keys
    from fedkeeper.functions import client
    from fedkeeper.functions.context import Context, NullInvoker
    from fedkeeper.store.local import LocalStore

    saved: dict = {}
    start = threading.Barrier(len(calls))
    errors: list = []

    def one(i: int, root: str, cid: str) -> None:
        try:
            store = LocalStore(root)
            start.wait()
            client.handle({"round": 0, "client": cid, "mode": "train"}, Context(store=store, invoker=NullInvoker()))
            for name, arr in blob.decode(bytes(store.get(keys.update(0, cid)))).tensors.items():
                saved[f"{i}|{name}"] = arr
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i, root, cid)) for i, (root, cid) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    np.savez(out, **saved)


def _python(code: str, *args: str) -> None:
    prefix = f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
    proc = subprocess.run([sys.executable, "-c", prefix + code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_update_from_a_warm_worker_is_bit_identical_to_a_cold_one(tmp_path):
    import numpy as np

    # Prepare: two federations with the same model settings (so a warm worker reuses one compiled model for
    # both) but different seeds, hence different initial weights and data splits.
    fed_a, fed_b = str(tmp_path / "a"), str(tmp_path / "b")
    target = [fed_a, "p-000"]
    cold_out, warm_out = str(tmp_path / "cold.npz"), str(tmp_path / "warm.npz")
    run = ("from tests.test_client_warm import make_federation, train_sequence; import json, sys; "
           "[make_federation(r, s) for r, s in json.loads(sys.argv[3])]; train_sequence(json.loads(sys.argv[1]), sys.argv[2])")

    # Execute: a cold worker (setup takes the initial models from child processes or their cache, so this
    # process has not imported TensorFlow before) trains only the target client;
    # a warm worker first trains a client of the other federation and another client of this one (leaving
    # trained weights, optimizer moments and their data behind), then the target client, then it again.
    _python(run, json.dumps([target]), cold_out, json.dumps([[fed_a, 0], [fed_b, 7]]))
    _python(run, json.dumps([[fed_b, "p-001"], [fed_a, "p-002"], target, target]), warm_out, "[]")

    # Assert: the target's update from the warm worker equals the cold one bit for bit, both times; the warm
    # worker did reuse its compiled model; the earlier clients' updates differ from the target's.
    cold = np.load(cold_out)
    warm = np.load(warm_out)
    names = sorted(k.split("|", 1)[1] for k in cold.files)
    for i in (2, 3):
        for n in names:
            assert warm[f"{i}|{n}"].tobytes() == cold[f"0|{n}"].tobytes(), (i, n)
    for i in (0, 1):
        assert any(warm[f"{i}|{n}"].tobytes() != cold[f"0|{n}"].tobytes() for n in names)
    info_cold = json.loads(Path(cold_out + ".json").read_text())
    info_warm = json.loads(Path(warm_out + ".json").read_text())
    assert info_warm[2]["metrics"] == info_cold[0]["metrics"] == info_warm[3]["metrics"]
    assert info_cold[0]["model_built"] is True
    assert [x["model_built"] for x in info_warm] == [True, False, False, False]
    # Each invocation gave back the compiler's freed heap itself (the warm updates above are after that).
    assert not any(x["left_to_release"] for x in info_cold + info_warm)


@pytest.mark.slow
def test_updates_trained_at_once_on_threads_of_one_instance_equal_cold_ones(tmp_path):
    import numpy as np

    # Prepare: two federations with the same model settings; the cold references train one client each alone.
    fed_a, fed_b = str(tmp_path / "a"), str(tmp_path / "b")
    a, b = [fed_a, "p-000"], [fed_b, "p-001"]
    outs = {k: str(tmp_path / f"{k}.npz") for k in ("cold_a", "cold_b", "both")}
    seq = ("from tests.test_client_warm import make_federation, train_sequence; import json, sys; "
           "[make_federation(r, s) for r, s in json.loads(sys.argv[3])]; train_sequence(json.loads(sys.argv[1]), sys.argv[2])")
    both = ("from tests.test_client_warm import train_concurrently; import json, sys; "
            "train_concurrently(json.loads(sys.argv[1]), sys.argv[2])")
    _python(seq, json.dumps([a]), outs["cold_a"], json.dumps([[fed_a, 0], [fed_b, 7]]))
    _python(seq, json.dumps([b]), outs["cold_b"], "[]")

    # Execute: one process trains both clients at the same time, each invocation on its own thread, twice over
    # (the second time on the models the first left behind).
    _python(both, json.dumps([a, b, a, b][:2]), outs["both"])
    both2 = str(tmp_path / "both2.npz")
    _python("from tests.test_client_warm import train_concurrently, train_sequence; import json, sys; "
            "train_sequence([json.loads(sys.argv[1])[1]], sys.argv[2] + '.warmup.npz'); "
            "train_concurrently(json.loads(sys.argv[1]), sys.argv[2])", json.dumps([a, b]), both2)

    # Assert: each concurrent update equals its client's cold update bit for bit; the two clients differ.
    cold_a, cold_b = np.load(outs["cold_a"]), np.load(outs["cold_b"])
    names = sorted(k.split("|", 1)[1] for k in cold_a.files)
    for got in (np.load(outs["both"]), np.load(both2)):
        for n in names:
            assert got[f"0|{n}"].tobytes() == cold_a[f"0|{n}"].tobytes(), n
            assert got[f"1|{n}"].tobytes() == cold_b[f"0|{n}"].tobytes(), n
    assert any(cold_a[f"0|{n}"].tobytes() != cold_b[f"0|{n}"].tobytes() for n in names)


def test_a_failing_memory_release_never_replaces_the_invocations_outcome(tmp_path, monkeypatch):
    # Prepare: a models module whose release raises, as a missing or broken libc would make it.
    import types

    from fedkeeper.functions import client
    from fedkeeper.functions.context import Context, HandlerError, NullInvoker
    from fedkeeper.store.local import LocalStore

    calls = []

    def release() -> bool:
        calls.append(1)
        raise OSError("malloc_trim unavailable")

    monkeypatch.setitem(sys.modules, "fedkeeper.models", types.SimpleNamespace(release_freed_memory=release))
    ctx = Context(store=LocalStore(tmp_path), invoker=NullInvoker())
    # Execute
    with pytest.raises(HandlerError) as refused:
        client.handle({"mode": "no-such-mode"}, ctx)
    # Assert: the release ran and failed, and the caller still sees the handler's own refusal that names the fix.
    assert calls == [1]
    assert "unknown mode 'no-such-mode'" in str(refused.value) and "use train or evaluate" in str(refused.value)
