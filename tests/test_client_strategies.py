"""The client-side parts of FedProx and SCAFFOLD: the loss terms in real Keras training, the control variates
in the store and through presigned URLs, and short real federations with each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedkeeper.core import blob, config, keys
from fedkeeper.functions import client, trigger
from fedkeeper.functions.context import Context, NullInvoker
from fedkeeper.store.local import LocalStore
from tests.conftest import Federation


class SigningStore(LocalStore):
    """A folder store that hands out fake signed URLs naming the method and key."""

    def presign(self, key, method, expires_s, max_bytes=None):
        return f"https://signed.example/{method}/{key}"


def test_presigned_scaffold_clients_get_urls_for_their_own_control_variate_only(tmp_path):
    # Prepare: a scaffold federation with presigned access; one client already holds a control variate
    fed = Federation(tmp_path / "s", name="scaffold")
    store = SigningStore(fed.store.root)
    raw = store.get_json(keys.FEDERATION)
    store.put_json(keys.FEDERATION, dict(raw, client_access="presigned"))
    store.put_json("data/meta.json", {"num_classes": 3})
    store.put(keys.control_variate(fed.ids[1]), b"x")
    inv = NullInvoker()
    # Execute
    trigger.handle({"round": 0}, Context(store=store, invoker=inv))
    # Assert: each client can PUT and (if it exists) GET its own key; round 0 has no server state yet
    access = {p["client"]: p["access"] for _, p, _ in inv.calls}
    for cid, a in access.items():
        assert a["control_put"] == f"https://signed.example/PUT/{keys.control_variate(cid)}"
        assert "server_state" not in a
        assert ("control" in a) == (cid == fed.ids[1])
    assert all(p["spec"]["fit"] == {"scaffold": True} for _, p, _ in inv.calls)


def test_fit_config_keeps_only_what_training_understands():
    assert client._fit_config({"proximal_mu": 0.5, "scaffold": True, "evil": 1}) == {"proximal_mu": 0.5, "scaffold": True}
    assert client._fit_config({"proximal_mu": -1, "scaffold": "yes"}) == {}
    assert client._fit_config(None) == {}


# -- real Keras training, each in its own process so the test session never imports TensorFlow -----------------
SPEC = {"model": "nn", "optimizer": "sgd", "learning_rate": 0.05, "batch_size": 10, "epochs": 2, "seed": 0,
        "jit_compile": False, "steps_per_execution": 8}
ROOT = Path(__file__).resolve().parents[1]


def in_subprocess(probe: str, *args: str) -> None:
    """Run probe(*args) from this module in a fresh Python; its assertions fail the test with their traceback."""
    code = f"import sys; from tests.test_client_strategies import {probe}; {probe}(*sys.argv[1:])"
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]


def digits():
    """200 digits, the initial NN model and its blob."""
    from sklearn.datasets import load_digits

    from fedkeeper import models

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:200, ..., None]
    g = models.initial_weights("nn", x.shape[1:], 10, 0)
    return {"x_train": x, "y_train": d.target[:200]}, g, blob.encode(g, {"kind": "model", "round": 0})


def _train(data, fit):
    arrays, g, gb = data
    payload, metrics = client._fit(dict(SPEC), 10, gb, arrays, 0, "c1", "p", {}, 0.0, [], fit=fit)
    w = blob.decode(payload).tensors
    return w, metrics, float(np.sqrt(sum(((w[k] - g[k]) ** 2).sum() for k in g)))


def probe_terms() -> None:
    """FedProx and SCAFFOLD terms in real training (see the test below)."""
    data = digits()
    _, g, _ = data
    # Execute: plain, FedProx with a strong mu, plain again on the same warm model
    plain, metrics, d_plain = _train(data, {})
    _, _, d_prox = _train(data, {"proximal_mu": 5.0})
    again, _, _ = _train(data, {})
    # Assert: the proximal term pulls the update towards the global model; afterwards training is as before
    assert d_prox < 0.5 * d_plain, (d_prox, d_plain)
    assert all(np.array_equal(plain[k], again[k]) for k in plain)
    assert metrics["local_steps"] == SPEC["epochs"] * 20  # 200 examples in batches of 10
    # Execute: SCAFFOLD with c = cᵢ (no correction) trains as plain does
    same = {k: np.full_like(v, 0.3) for k, v in g.items()}
    fit = {"scaffold": True, "control": same, "client_control": same}
    w_same, _, _ = _train(data, fit)
    assert all(np.allclose(w_same[k], plain[k], atol=1e-6) for k in plain)
    # Assert: cᵢ⁺ = cᵢ − c + (x − y)/(K·η_l)
    k_steps = SPEC["epochs"] * 20
    for name in g:
        want = same[name] - same[name] + (g[name] - w_same[name]) / (k_steps * SPEC["learning_rate"])
        np.testing.assert_allclose(fit["new_client_control"][name], want, rtol=1e-5, atol=1e-6)
    # Execute / Assert: with SGD a constant correction δ moves the output bias by about −lr·K·δ beyond plain
    shifted = {"scaffold": True, "control": {k: np.full_like(v, 0.01) for k, v in g.items()}, "client_control": None}
    w_shift, _, _ = _train(data, shifted)
    drift = float(np.mean(w_shift["output/bias"] - plain["output/bias"]))
    assert abs(drift - (-SPEC["learning_rate"] * k_steps * 0.01)) < 0.2 * SPEC["learning_rate"] * k_steps * 0.01, drift


def probe_presigned(root: str) -> None:
    """A presigned SCAFFOLD client, its URLs mapped to a folder store (see the test below)."""
    from fedkeeper import data as datamod

    arrays, g, gb = digits()
    store = LocalStore(root)
    store.put("data/c1.npz", datamod.pack(**arrays))
    store.put(keys.model(1), gb)
    state = {"c/" + k: np.full_like(v, 0.01) for k, v in g.items()}
    store.put(keys.server_state(1), blob.encode(state, {"kind": "server_state", "round": 1}))
    calls = []

    def fake_http(method, url, data=None, timeout=120.0, headers=None):
        calls.append((method, url))
        key = url.split("/", 4)[4]
        if method == "GET":
            return store.get(key)
        store.put(key, bytes(data))
        return b""

    client._http = fake_http
    access = {"model": f"https://signed.example/GET/{keys.model(1)}", "data": "https://signed.example/GET/data/c1.npz",
              "update": f"https://signed.example/PUT/{keys.update(1, 'c1')}",
              "server_state": f"https://signed.example/GET/{keys.server_state(1)}",
              "control_put": f"https://signed.example/PUT/{keys.control_variate('c1')}"}
    event = {"mode": "train", "round": 1, "client": "c1", "access": access,
             "spec": dict(SPEC, num_classes=10, fit={"scaffold": True}, selected=["c1"])}
    # Execute: the first round of this client, then a retry of the same round that now finds its own cᵢ
    out = client.handle(event, Context(store=None, invoker=NullInvoker()))
    first = store.get(keys.control_variate("c1"))
    retry = dict(event, access=dict(access, control=f"https://signed.example/GET/{keys.control_variate('c1')}"))
    client.handle(retry, Context(store=None, invoker=NullInvoker()))
    # Assert: the update reports its steps; the retry started from the same cᵢ (zero) and wrote the same cᵢ⁺
    assert out["metrics"]["local_steps"] == 40
    a, b = blob.decode(first).tensors, blob.decode(store.get(keys.control_variate("c1"))).tensors
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not np.any(a["prev/" + k]) for k in g)
    assert ("PUT", access["control_put"]) in calls and ("GET", access["server_state"]) in calls
    assert ("GET", retry["access"]["control"]) in calls


def probe_both(root: str) -> None:
    """Both probes in one process: TensorFlow's import is paid once."""
    probe_terms()
    probe_presigned(root)


@pytest.mark.slow
def test_client_terms_change_training_and_presigned_scaffold_keeps_its_control_variate(tmp_path):
    """FedProx pulls towards the global model and SCAFFOLD shifts steps by c − cᵢ, in real Keras training, and
    nothing else changes; a presigned SCAFFOLD client reads c and its cᵢ and writes cᵢ⁺ through its own URLs."""
    in_subprocess("probe_both", str(tmp_path / "s"))


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [("fedprox", {"mu": 0.1}), ("scaffold", {})])
def test_short_federation_with_client_side_strategy(tmp_path, name, params):
    # Prepare: 3 clients on one local platform, 2 rounds of the NN on digits, SGD as SCAFFOLD assumes
    from fedkeeper.runtime import run as runmod

    cfg = config.from_dict({"rounds": 2, "seed": 1, "strategy": {"name": name, "params": params},
                            "model": {"epochs": 1, "optimizer": "sgd", "learning_rate": 0.05},
                            "platforms": [{"name": "p", "clients": 3, "concurrency": 1}]})
    store = LocalStore(tmp_path / "s")
    # Execute
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=300, log=lambda s: None)
    # Assert: both rounds aggregated every client, and the clients trained as the strategy asked
    rs = results["rounds"]
    assert [r["status"] for r in rs] == ["done", "done"]
    assert all(len(r["clients"]["included"]) == 3 for r in rs)
    assert rs[-1]["test_accuracy"] > 0.5
    ids = [c.id for c in cfg.clients]
    for r in range(2):
        manifest = store.get_json(keys.manifest(r))
        assert all(c["config"] == client._fit_config(c["config"]) != {} for c in manifest["clients"])
        for cid in ids:
            assert blob.decode(store.get(keys.update(r, cid))).meta["metrics"]["local_steps"] > 0
    if name == "scaffold":
        # With every client in every round, c stays the mean of the clients' cᵢ (Karimireddy et al., eq. after Alg. 1).
        c = blob.decode(store.get(keys.server_state(2))).tensors
        own = [blob.decode(store.get(keys.control_variate(cid))).tensors for cid in ids]
        for k in c:
            name_k = k[len("c/"):]
            np.testing.assert_allclose(c[k], np.mean([o[name_k] for o in own], axis=0), rtol=1e-3, atol=1e-5)
        assert any(np.abs(v).max() > 0 for v in c.values())
