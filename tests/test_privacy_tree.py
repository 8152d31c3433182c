"""Secure aggregation in tree mode: group folds sum masked uploads mod the ring, the root unmasks; the model is
the single aggregator's, bit for bit, and no fold ever holds an update in the clear."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cryptography")

from fedkeeper.core import blob, keys  # noqa: E402
from fedkeeper.core.config import from_dict  # noqa: E402
from fedkeeper.core.privacy import ring  # noqa: E402
from fedkeeper.functions import aggregator, client, protocol  # noqa: E402
from tests.conftest import Federation  # noqa: E402
from tests.test_privacy_secagg import RecordingStore, _drive, _masked_federation, _trained  # noqa: E402
from tests.test_privacy_unmask import _drive as _drive_unmask  # noqa: E402


def _masked(tmp_path, monkeypatch, name: str, n: int, fan_in: int = 0) -> Federation:
    # One secrets folder for every federation of a test (each keeps its keys under its own federation id)
    (tmp_path / "secrets").mkdir(exist_ok=True)
    (tmp_path / name).mkdir()
    (tmp_path / name / "secrets").symlink_to(tmp_path / "secrets")
    fed = _masked_federation(tmp_path / name, monkeypatch, n=n)
    if fan_in:
        raw = fed.cfg.to_dict()
        raw["platforms"] = [dict(p, clients=0) for p in raw["platforms"]]
        raw["aggregation"] = {"mode": "tree", "fan_in": fan_in}
        fed.cfg = from_dict(raw)
        fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    return fed


@pytest.mark.parametrize("n, fan_in, drop", [(6, 2, set()), (6, 2, {"p-001", "p-004"}), (7, 3, {"p-006"})])
def test_tree_and_single_masked_rounds_write_the_same_model_bit_for_bit(tmp_path, monkeypatch, n, fan_in, drop):
    # Prepare: two federations with the same clients, model and trained weights; one sums in one aggregator, the
    # other in a tree (each with its own keys and masks)
    single = _masked(tmp_path, monkeypatch, "single", n)
    tree = _masked(tmp_path, monkeypatch, "tree", n, fan_in)
    trained = _trained(single)
    spy = RecordingStore(tree.store)

    # Execute
    res_single = _drive(single, 0, trained, drop)
    res_tree = _drive(tree, 0, trained, drop, agg_store=spy)

    # Assert: the same included set and the same model bytes
    assert res_single["status"] == res_tree["status"] == "done", res_tree["rejected"]
    assert res_tree["included"] == res_single["included"] == [c for c in tree.ids if c not in drop]
    assert res_tree["secure_aggregation"]["dropped"] == sorted(drop)
    assert bytes(tree.store.get(keys.model(1))) == bytes(single.store.get(keys.model(1)))
    m = protocol.read_manifest(tree.store, 0)
    assert m.fan_in == fan_in and res_tree["timings"]["tree_levels"] == m.levels()
    assert len(tree.store.list(keys.partials_prefix(0))) == sum(m.levels()[:-1])
    # The aggregator side read each survivor's masked upload once (in its group's fold), never a plain one, and
    # every partial it read is still masked: it differs from the plain ring sum of its group's updates
    survivors = res_tree["included"]
    updates_read = [k for k in spy.read if keys.parse_update(k)]
    assert sorted(updates_read) == sorted(keys.update(0, c) for c in survivors)
    scale = res_tree["secure_aggregation"]["scale"]
    partials_read = sorted({k for k in spy.read if k.startswith(keys.partials_prefix(0))})
    assert partials_read
    for k in partials_read:
        b = blob.decode(tree.store.get(k))
        assert all(t.dtype == np.uint32 for t in b.tensors.values())
        members = b.meta["survivors"]
        if not members:
            continue
        plain = {name: np.zeros(t.shape, dtype=np.uint32) for name, t in b.tensors.items()}
        for c in members:
            q = ring.quantise({name: trained[c][0][name] - tree.global_weights[name] for name in plain},
                              trained[c][1], scale, 32, 4.0)
            for name in plain:
                ring.add(plain[name], q[name])
        assert not any(np.array_equal(b.tensors[name], plain[name]) for name in plain), k


def test_groups_fold_while_the_unmask_answers_are_awaited(tmp_path, monkeypatch):
    # Prepare: a tree federation whose unmask invocations have not run yet
    fed = _masked(tmp_path, monkeypatch, "tree", 6, 2)
    inv, ctx = _drive_unmask(fed, 0, _trained(fed), {"p-002"}, lambda p: "lose")
    m = protocol.read_manifest(fed.store, 0)

    # Assert: the request fanned out one fold per group; every partial below the root is written, and no result
    assert len([p for fn, p, _ in inv.calls if "group" in p]) == m.levels()[0]
    assert len(fed.store.list(keys.partials_prefix(0))) == sum(m.levels()[:-1])
    assert not fed.store.exists(keys.result(0))

    # Execute: the survivors answer; the last answer's poke runs the root
    for c in fed.ids:
        if c != "p-002":
            client.handle({"round": 0, "client": c, "mode": "unmask"}, ctx)
    aggregator.handle({"round": 0}, ctx)

    # Assert
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "done" and res["included"] == [c for c in fed.ids if c != "p-002"]


@pytest.mark.parametrize("forge", ["garbage bytes", "a partial that leaves a survivor out"])
def test_a_forged_partial_fails_the_round_and_reveals_nothing(tmp_path, monkeypatch, forge):
    # Prepare: before group 0 is folded, a store writer puts its own partial under the group's key
    fed = _masked(tmp_path, monkeypatch, "tree", 6, 2)
    trained = _trained(fed)
    g = fed.global_weights
    if forge == "garbage bytes":
        data = b"not a partial"
    else:
        zeros = {k: np.zeros(v.shape, dtype=np.uint32) for k, v in g.items()}
        data = blob.encode(zeros, {"kind": "partial", "masked": True, "round": 0, "level": 1, "group": 0,
                                   "survivors": ["p-000"], "num_examples": 100, "weight": 100,
                                   "clients": {"p-000": {}}, "error": ""})
    fed.store.put(keys.partial(0, 0), data)

    # Execute
    res = _drive(fed, 0, trained, set())

    # Assert: the round failed, naming the partial; the global model stays
    assert res["status"] == "failed" and res["included"] == []
    why = [x["reason"] for x in res["rejected"] if x["client"] == "*"][0]
    assert keys.partial(0, 0) in why
    assert blob.decode(fed.store.get(keys.model(1))).tensors["hidden/bias"].tolist() == g["hidden/bias"].tolist()


def test_a_malformed_masked_upload_fails_a_tree_round_as_it_fails_a_single_one(tmp_path, monkeypatch):
    # Prepare: p-003 uploads a plain float update where its masked one belongs
    fed = _masked(tmp_path, monkeypatch, "tree", 6, 2)
    trained = _trained(fed)
    from fedkeeper.functions import secagg as phases

    real_masker = phases.masker

    def masker(ctx, cfg, manifest, cid, global_weights):
        mask = real_masker(ctx, cfg, manifest, cid, global_weights)
        return (lambda w, meta: blob.encode(w, meta)) if cid == "p-003" else mask

    monkeypatch.setattr(phases, "masker", masker)

    # Execute
    res = _drive(fed, 0, trained, set())

    # Assert: the group fold recorded why, and the root failed the round with that reason
    assert res["status"] == "failed"
    why = [x["reason"] for x in res["rejected"] if x["client"] == "*"][0]
    assert "p-003's masked update is invalid" in why
    part = blob.decode(fed.store.get(keys.partial(0, 1)))
    assert "p-003" in part.meta["error"]
