"""Secure aggregation: masks cancel, dropouts are recovered up to n − t, the aggregator sees only masked vectors,
and shares are bound to their round, sender and addressee."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("cryptography")

from fedkeeper import secagg  # noqa: E402
from fedkeeper.core import blob, keys, rounds  # noqa: E402
from fedkeeper.core.aggregate import fedavg  # noqa: E402
from fedkeeper.core.config import ConfigError, from_dict  # noqa: E402
from fedkeeper.core.privacy import ring, shamir  # noqa: E402
from fedkeeper.functions import aggregator, client, protocol, trigger  # noqa: E402
from fedkeeper.functions import secagg as phases  # noqa: E402
from fedkeeper.functions.context import AGGREGATOR, CLIENT, Context, HandlerError, NullInvoker  # noqa: E402
from tests.conftest import Federation, make_weights  # noqa: E402


# -- the cryptographic core ----------------------------------------------------------------------------------
def test_shamir_rebuilds_from_any_t_shares_and_not_from_fewer():
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5, 6], 4)
    assert shamir.combine({x: shares[x] for x in (6, 2, 5, 1)}, 4) == secret
    assert shamir.combine({x: shares[x] for x in (3, 4, 5, 6)}, 4) == secret
    with pytest.raises(shamir.ShareError):
        shamir.combine({x: shares[x] for x in (1, 2, 3)}, 4)
    # three shares with a guessed fourth point give an unrelated field element, not a 32-byte secret
    forged = {**{x: shares[x] for x in (1, 2, 3)}, 7: 12345}
    with pytest.raises(shamir.ShareError, match="a share is wrong"):
        shamir.combine(forged, 4)


def _clients(n: int, neighbors: int = 0, threshold: float = 0.5, r: int = 3, bits: int = 32):
    ids = [f"c{i:02d}" for i in range(n)]
    spec = secagg.RoundSpec(federation="fed-test", round=r, selected=tuple(ids), neighbors=neighbors,
                            threshold=threshold, bits=bits, clip_range=4.0)
    ident = {c: secagg.generate_identity() for c in ids}
    pub = {c: ident[c][1] for c in ids}
    me = {c: secagg.ClientRound(spec, c, ident[c][0]) for c in ids}
    recs = {c: me[c].advertise(pub) for c in ids}
    return spec, ids, me, pub, recs


def _simulate(n: int, dropped: list[str], neighbors: int = 0, bits: int = 32, size: int = 2000):
    """One masked round without a store: returns (unmasked mean delta, plain FedAvg mean delta, n_i)."""
    spec, ids, me, pub, recs = _clients(n, neighbors, bits=bits)
    rng = np.random.default_rng(1)
    deltas = {c: {"a": rng.normal(0, 0.2, size), "b": rng.normal(0, 0.2, (7, 3))} for c in ids}
    ns = {c: 10 + 7 * i for i, c in enumerate(ids)}
    scale = secagg.scale_for(spec, sum(ns.values()))
    publics = {c: bytes.fromhex(recs[c]["mask_public"]) for c in ids}
    masked = {c: me[c].mask(deltas[c], ns[c], scale, ids, publics) for c in ids if c not in dropped}
    survivors = sorted(masked)
    request = {"round": spec.round, "survivors": survivors, "dropped": sorted(dropped)}
    answers = {c: me[c].reveal(request, ids, recs, pub, delivered=survivors) for c in survivors}
    seeds, mask_keys, bad = secagg.rebuild(spec, survivors, sorted(dropped), answers, recs)
    assert not bad
    acc = {k: np.zeros(v.shape, dtype=ring.DTYPES[bits]) for k, v in deltas[ids[0]].items()}
    for c in survivors:
        for k in acc:
            ring.add(acc[k], masked[c][k])
    off = {"a": 0, "b": size}
    for seed, sign in secagg.unmask_masks(spec, survivors, sorted(dropped), seeds, mask_keys, publics):
        for k in acc:
            ring.add(acc[k].reshape(-1), secagg.expand(seed, acc[k].size, bits, off[k]), -sign)
    total = sum(ns[c] for c in survivors)
    got = {k: ring.dequantise(acc[k], scale, bits) / total for k in acc}
    want = fedavg([(deltas[c], ns[c]) for c in survivors])
    return got, want, scale, len(survivors)


@pytest.mark.parametrize("n, dropped, neighbors, bits", [
    (6, [], 0, 32), (6, ["c01"], 0, 32), (6, ["c00", "c04"], 0, 32),  # n − t = 6 − 4 = 2 dropouts
    (9, ["c03", "c07"], 4, 32), (5, ["c02"], 0, 64)])
def test_unmasked_sum_equals_fedavg_within_quantisation(n, dropped, neighbors, bits):
    got, want, scale, m = _simulate(n, dropped, neighbors, bits)
    # each client's rounding is at most half a unit of 2^-scale per value, before the division by Σ nᵢ
    for k in want:
        err = np.abs(got[k] - want[k]).max()
        assert err <= m * 0.5 / 2 ** scale + 1e-7, (k, err)


def test_below_threshold_the_secret_is_not_rebuilt():
    spec, ids, me, pub, recs = _clients(6)  # t = 4 of 6
    dropped = ["c00", "c01", "c02"]
    survivors = [c for c in ids if c not in dropped]
    request = {"round": spec.round, "survivors": survivors, "dropped": dropped}
    answers = {c: me[c].reveal(request, ids, recs, pub, delivered=survivors) for c in survivors}
    with pytest.raises(secagg.RoundFailed, match="3 of 6 holders answered .* 4 are needed"):
        secagg.rebuild(spec, survivors, dropped, answers, recs)


def test_a_masked_update_is_uniform_whatever_the_update():
    spec, ids, me, pub, recs = _clients(4)
    publics = {c: bytes.fromhex(recs[c]["mask_public"]) for c in ids}
    zeros = {"w": np.zeros(60_000)}  # the most structured update there is
    y = me["c00"].mask(zeros, 50, 10, ids, publics)["w"]
    # chi-square over 64 equal bins of the 32-bit ring: uniform at the 0.1% level (critical value 103.4 for 63 dof)
    counts = np.bincount((y >> np.uint32(26)).astype(np.int64), minlength=64)
    expected = y.size / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 103.4
    # and bits are balanced: every bit position is set about half the time
    bits = np.unpackbits(y.view(np.uint8)).reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 4 * 0.5 / math.sqrt(y.size))


def test_replayed_or_mixed_round_shares_are_rejected():
    spec, ids, me, pub, recs = _clients(4, r=3)
    _, _, me5, _, _ = _clients(4, r=5)
    # A box sealed in round 3 does not open as a round-5 share, even for the same ids (the keys differ here
    # too; with the same identity keys the round in the key derivation and the AAD refuse it)
    same_keys = secagg.ClientRound(secagg.RoundSpec("fed-test", 5, tuple(ids)), "c01", me["c01"].identity)
    with pytest.raises(secagg.SecAggError, match="does not open"):
        same_keys.open_box("c00", pub["c00"], recs["c00"])
    # a box moved to another addressee's slot does not open for it either
    moved = json.loads(json.dumps(recs["c00"]))
    moved["boxes"]["c02"] = moved["boxes"]["c01"]
    with pytest.raises(secagg.SecAggError, match="does not open"):
        me["c02"].open_box("c00", pub["c00"], moved)
    # an answer bound to another round's request is refused
    request = {"round": 5, "survivors": ids, "dropped": []}
    with pytest.raises(secagg.SecAggError, match="not for round 3"):
        me["c01"].reveal(request, ids, recs, pub, delivered=ids)


def test_a_client_cannot_open_another_clients_shares():
    spec, ids, me, pub, recs = _clients(4)
    # c03 reads the box c00 sealed for c01 and tries it as if it were c01 (with its own identity key)
    impostor = secagg.ClientRound(spec, "c01", me["c03"].identity)
    with pytest.raises(secagg.SecAggError, match="does not open"):
        impostor.open_box("c00", pub["c00"], recs["c00"])


def test_a_mask_key_of_a_delivered_client_is_never_revealed():
    spec, ids, me, pub, recs = _clients(5)
    lie = {"round": spec.round, "survivors": ids[1:], "dropped": [ids[0]]}
    with pytest.raises(secagg.SecAggError, match="updates are in the store"):
        me["c01"].reveal(lie, ids, recs, pub, delivered=ids)
    # an honest request reveals each client's self seed or mask key, never both
    honest = {"round": spec.round, "survivors": ids[1:], "dropped": [ids[0]]}
    ans = me["c01"].reveal(honest, ids, recs, pub, delivered=ids[1:])
    assert set(ans["key_shares"]) == {"c00"} and "c00" not in ans["self_shares"]
    assert not set(ans["key_shares"]) & set(ans["self_shares"])


def test_sparse_graph_is_symmetric_and_regular():
    spec, ids, *_ = _clients(12, neighbors=4)
    for c, ns in spec.graph.items():
        assert len(ns) == 4 and c not in ns
        assert all(c in spec.graph[d] for d in ns)
    assert spec.t("c00") == 3  # more than half of its 5 holders


# -- through the protocol ------------------------------------------------------------------------------------
class RecordingStore:
    """A store wrapper that records every key read, to check what the aggregator's process saw."""

    def __init__(self, inner) -> None:
        self.inner, self.read = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get(self, key, *a, **kw):
        self.read.append(key)
        return self.inner.get(key, *a, **kw)

    def get_view(self, key, *a, **kw):
        self.read.append(key)
        return self.inner.get_view(key, *a, **kw)


def _masked_federation(tmp_path, monkeypatch, n: int = 6, **secagg_fields) -> Federation:
    monkeypatch.setenv(phases.SECRETS_ENV, str(tmp_path / "secrets"))
    fed = Federation(tmp_path / "store", n_clients=n)
    raw = fed.cfg.to_dict()
    raw["platforms"] = [dict(p, clients=0) for p in raw["platforms"]]
    raw["privacy"] = {"secure_aggregation": True, "secagg": dict({"phase_s": 30}, **secagg_fields)}
    raw["strategy"]["quorum"] = 0.3
    fed.cfg = from_dict(raw)
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    fed.store.put_json("data/meta.json", {"client_examples": {c: 1000 for c in fed.ids}, "num_classes": 3})
    phases.register(fed.store, fed.cfg)
    return fed


def _drive(fed: Federation, r: int, trained: dict, drop: set[str], agg_store=None) -> dict:
    """Run round r: clients answer every phase except the train phase of `drop`, whose failures are reported."""
    inv = NullInvoker()
    ctx = Context(store=fed.store, invoker=inv)
    actx = Context(store=agg_store or fed.store, invoker=inv)
    trigger.handle({"round": r}, ctx)
    done = 0
    while done < len(inv.calls):
        fn, payload, _ = inv.calls[done]
        done += 1
        if fn == AGGREGATOR:
            aggregator.handle(payload, actx)
        elif fn == CLIENT and payload.get("mode") in ("advertise", "unmask"):
            client.handle(payload, ctx)
        elif fn == CLIENT and payload.get("mode") == "train":
            cid = payload["client"]
            if cid in drop:
                protocol.client_failed(ctx, r, cid, "worker lost", 1)
                continue
            m = protocol.read_manifest(fed.store, r)
            w, n = trained[cid]
            mask = phases.masker(ctx, fed.cfg, m, cid, fed.global_weights)
            meta = {"kind": "update", "round": r, "client": cid, "num_examples": n, "metrics": {}, "timings": {}}
            fed.store.put(keys.update(r, cid), mask(w, meta))
            aggregator.handle({"key": keys.update(r, cid)}, actx)
    return fed.store.get_json(keys.result(r))


def _masked_uploads(fed: Federation, tamper: dict | None = None) -> Context:
    """Round 0 opened, every key advertised, the roster written, and every client's trained update uploaded masked
    (`tamper[client](masked bytes, weights, meta)` replaces that client's upload); the context that drove it."""
    trained = _trained(fed)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    trigger.handle({"round": 0}, ctx)
    for c in fed.ids:
        client.handle({"round": 0, "client": c, "mode": "advertise"}, ctx)
    aggregator.handle({"round": 0}, ctx)
    m = protocol.read_manifest(fed.store, 0)
    for c in fed.ids:
        w, n = trained[c]
        meta = {"kind": "update", "round": 0, "client": c, "num_examples": n, "metrics": {}, "timings": {}}
        data = phases.masker(ctx, fed.cfg, m, c, fed.global_weights)(w, meta)
        if tamper and c in tamper:
            data = tamper[c](data, w, meta)
        fed.store.put(keys.update(0, c), data)
    return ctx


def _trained(fed: Federation) -> dict:
    return {c: ({k: v + 0.1 * make_weights(50 + i)[k] for k, v in fed.global_weights.items()}, 100 + 50 * i)
            for i, c in enumerate(fed.ids)}


@pytest.mark.parametrize("drop", [set(), {"p-001", "p-004"}])
def test_masked_round_through_the_protocol_matches_fedavg(tmp_path, monkeypatch, drop):
    fed = _masked_federation(tmp_path, monkeypatch)
    trained = _trained(fed)
    spy = RecordingStore(fed.store)
    res = _drive(fed, 0, trained, drop, agg_store=spy)
    assert res["status"] == "done", res["rejected"]
    survivors = [c for c in fed.ids if c not in drop]
    assert res["included"] == survivors and res["secure_aggregation"]["dropped"] == sorted(drop)
    model = blob.decode(fed.store.get(keys.model(1))).tensors
    want = fedavg([trained[c] for c in survivors])
    scale = res["secure_aggregation"]["scale"]
    for k in want:
        assert np.abs(model[k] - want[k]).max() <= 1e-5 + len(survivors) * 0.5 / 2 ** scale
    # The aggregator read masked uploads, public records and shares, and no individual update in the clear:
    updates_read = [k for k in spy.read if keys.parse_update(k)]
    assert sorted(set(updates_read)) == sorted(keys.update(0, c) for c in survivors)
    for k in set(updates_read):
        b = blob.decode(fed.store.get(k))
        assert all(t.dtype == np.uint32 for t in b.tensors.values())
        cid = keys.parse_update(k)[1]
        plain = ring.quantise({n: trained[cid][0][n] - fed.global_weights[n] for n in want}, trained[cid][1], scale,
                              32, 4.0)
        assert not any(np.array_equal(b.tensors[n], plain[n]) for n in want)
    # and the next round runs with fresh masks
    res1 = _drive(fed, 1, trained, set())
    assert res1["status"] == "done"


def test_round_fails_with_a_reason_below_the_threshold(tmp_path, monkeypatch):
    fed = _masked_federation(tmp_path, monkeypatch)  # t = 4 of 6
    res = _drive(fed, 0, _trained(fed), {"p-000", "p-002", "p-005"})
    assert res["status"] == "failed"
    why = [x["reason"] for x in res["rejected"] if x["client"] == "*"][0]
    assert "4 are needed" in why and "stays masked" in why
    # the global model stays
    assert blob.decode(fed.store.get(keys.model(1))).tensors["hidden/bias"].tolist() == \
        fed.global_weights["hidden/bias"].tolist()


def test_unmask_refuses_a_request_naming_a_delivered_client_as_dropped(tmp_path, monkeypatch):
    fed = _masked_federation(tmp_path, monkeypatch, n=4)
    ctx = _masked_uploads(fed)
    # a forged request (as a rogue writer would put it) claims p-000 dropped although its update is in
    fed.store.put(keys.secagg_request(0), rounds.dumps({"round": 0, "survivors": fed.ids[1:], "dropped": ["p-000"]}))
    with pytest.raises(HandlerError, match="updates are in the store"):
        client.handle({"round": 0, "client": "p-001", "mode": "unmask"}, ctx)
    assert not fed.store.list(keys.secagg_answer_prefix(0))


def test_presigned_clients_and_adaptive_clipping_are_refused_with_secure_aggregation():
    with pytest.raises(ConfigError) as err:
        from_dict({"privacy": {"secure_aggregation": True}, "client_access": "presigned"})
    assert err.value.field == "privacy.secure_aggregation" and "client_access" in err.value.fix
    with pytest.raises(ConfigError) as err:
        from_dict({"privacy": {"secure_aggregation": True, "dp": {"mode": "central", "adaptive": True}}})
    assert err.value.field == "privacy.dp.adaptive"


def _masked_dp(tmp_path, monkeypatch, **dp_fields) -> Federation:
    fed = _masked_federation(tmp_path, monkeypatch)
    raw = fed.cfg.to_dict()
    raw["platforms"] = [dict(p, clients=0) for p in raw["platforms"]]
    raw["privacy"]["dp"] = dict({"mode": "central"}, **dp_fields)
    fed.cfg = from_dict(raw)
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
    return fed


def test_central_dp_under_masks_clips_each_client_once_and_shares_the_noise(tmp_path, monkeypatch):
    from fedkeeper.core.privacy import dp

    # Prepare: no noise, so the masked result must be exactly the unweighted mean of clipped differences
    fed = _masked_dp(tmp_path, monkeypatch, clip_norm=0.05, noise_multiplier=0.0)
    trained = _trained(fed)
    # Execute
    res = _drive(fed, 0, trained, set())
    # Assert
    assert res["status"] == "done"
    model = blob.decode(fed.store.get(keys.model(1))).tensors
    clipped = [dp.clip(dp.difference(trained[c][0], fed.global_weights), 0.05)[0] for c in fed.ids]
    scale = res["secure_aggregation"]["scale"]
    for k in model:
        want = fed.global_weights[k] + sum(d[k] for d in clipped) / len(clipped)
        assert np.abs(model[k] - want).max() <= 1e-6 + len(clipped) * 0.5 / 2 ** scale


def test_dropouts_under_shared_noise_are_accounted_with_the_noise_that_arrived(tmp_path, monkeypatch):
    pytest.importorskip("dp_accounting")
    from fedkeeper import accounting

    fed = _masked_dp(tmp_path, monkeypatch, clip_norm=1.0, noise_multiplier=2.0)
    res = _drive(fed, 0, _trained(fed), {"p-003"})
    rec = res["privacy"]
    z_eff = 2.0 * math.sqrt(5 / 6)  # five of six noise shares made it into the sum
    assert rec["accounting_noise_multiplier"] == pytest.approx(z_eff)
    assert rec["noise_std"] == pytest.approx(z_eff * 1.0)
    assert rec["epsilon"] == pytest.approx(accounting.epsilon(z_eff, 1.0, 1, 1e-5))
    # the next round, with everyone back, still accounts with the smaller multiplier
    res1 = _drive(fed, 1, _trained(fed), set())
    assert res1["privacy"]["accounting_noise_multiplier"] == pytest.approx(z_eff)
    assert res1["privacy"]["epsilon"] == pytest.approx(accounting.epsilon(z_eff, 1.0, 2, 1e-5))


@pytest.mark.parametrize("tamper, match", [
    (lambda rec: rec.update(round=2), "for round 2"),
    (lambda rec: rec.update(client="c01"), "names 'c01'"),
    (lambda rec: rec.update(mask_public="zz" * 32), "64 hex digits"),
    (lambda rec: rec["boxes"].pop("c02"), "one share box per holder"),
    (lambda rec: rec.update(threshold=1), "threshold"),
    (lambda rec: rec.update(kind="update"), "not an advertise record"),
])
def test_hostile_advertise_records_are_refused(tamper, match):
    spec, ids, me, pub, recs = _clients(4)
    rec = json.loads(json.dumps(recs["c00"]))
    tamper(rec)
    with pytest.raises(secagg.SecAggError, match=match):
        secagg.check_advertise(spec, "c00", rec)


def test_unmask_answers_with_shares_nobody_asked_for_are_dropped_and_the_rest_suffice():
    spec, ids, me, pub, recs = _clients(6)
    request = {"round": spec.round, "survivors": ids[1:], "dropped": ids[:1]}
    answers = {c: me[c].reveal(request, ids, recs, pub, delivered=ids[1:]) for c in ids[1:]}
    # c05 also hands in a "self" share of the dropped c00 (which would expose its update with the key shares)
    answers["c05"]["self_shares"]["c00"] = answers["c05"]["key_shares"]["c00"]
    seeds, mask_keys, bad = secagg.rebuild(spec, ids[1:], ids[:1], answers, recs)
    assert [b["client"] for b in bad] == ["c05"] and "not asked for" in bad[0]["reason"]
    assert "c00" not in seeds and set(mask_keys) == {"c00"}
    # a wrong share is caught by the commitment and the others still rebuild the secret
    answers = {c: me[c].reveal(request, ids, recs, pub, delivered=ids[1:]) for c in ids[1:]}
    answers["c03"]["self_shares"]["c02"] = shamir.encode(7)  # a middle point of the five
    seeds, _, _ = secagg.rebuild(spec, ids[1:], ids[:1], answers, recs)
    assert seeds["c02"] == me["c02"].self_seed


@pytest.mark.parametrize("bits", [32, 64])
def test_a_mask_slice_is_the_same_stream_from_any_offset(bits):
    seed = bytes(range(32))
    whole = secagg.expand(seed, 1000, bits)
    for offset in (0, 1, 15, 16, 17, 333):
        assert np.array_equal(secagg.expand(seed, 200, bits, offset), whole[offset:offset + 200])
    acc = np.zeros(1000, dtype=ring.DTYPES[bits])
    secagg.apply_mask(acc[100:], seed, 1, bits, 100)
    assert np.array_equal(acc[100:], whole[100:])


def test_a_malformed_masked_upload_fails_the_round_with_its_reason(tmp_path, monkeypatch):
    fed = _masked_federation(tmp_path, monkeypatch, n=4)
    # a plain float update where a masked one belongs
    ctx = _masked_uploads(fed, tamper={"p-002": lambda masked, w, meta: blob.encode(w, meta)})
    aggregator.handle({"round": 0}, ctx)  # the unmask request
    for c in fed.ids:
        client.handle({"round": 0, "client": c, "mode": "unmask"}, ctx)
    aggregator.handle({"round": 0}, ctx)
    res = fed.store.get_json(keys.result(0))
    assert res["status"] == "failed"
    why = [x["reason"] for x in res["rejected"] if x["client"] == "*"][0]
    assert "p-002's masked update is invalid" in why


def test_a_masked_update_is_written_once_per_round(tmp_path, monkeypatch):
    from fedkeeper.functions import client as client_fn

    fed = _masked_federation(tmp_path, monkeypatch, n=3)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    trigger.handle({"round": 0}, ctx)
    for c in fed.ids:
        client.handle({"round": 0, "client": c, "mode": "advertise"}, ctx)
    aggregator.handle({"round": 0}, ctx)
    # Training stands in for Keras: each attempt "trains" a different model, masked by the real mask function.
    attempt = {"n": 0}

    def fit(spec, num_classes, global_bytes, arrays, r, cid, platform, timings, t, selected, *rest, **kw):
        mask = kw.get("mask", rest[-1] if rest else None)
        attempt["n"] += 1
        w = {k: v + 0.1 * attempt["n"] for k, v in fed.global_weights.items()}
        meta = {"kind": "update", "round": r, "client": cid, "num_examples": 10, "metrics": {}, "timings": {}}
        return mask(w, meta), {"train_examples": 10}

    monkeypatch.setattr(client_fn, "_fit", fit)
    monkeypatch.setattr(client_fn, "_fetch_data", lambda ctx, ref: {})
    monkeypatch.setattr(client_fn, "_num_classes", lambda ctx: 3)
    event = {"round": 0, "client": "p-000", "mode": "train"}
    first = client.handle(event, ctx)
    stored = bytes(fed.store.get(keys.update(0, "p-000")))
    again = client.handle(dict(event, attempt=2), ctx)
    # Assert: the retry trained a different model but the store still holds the first masked vector only
    assert first["status"] == "trained" and again["status"] == "delivered" and attempt["n"] == 2
    assert bytes(fed.store.get(keys.update(0, "p-000"))) == stored


def test_an_advertise_record_rewritten_after_the_roster_fails_the_round_not_the_aggregator(tmp_path, monkeypatch):
    fed = _masked_federation(tmp_path, monkeypatch, n=4)
    ctx = _masked_uploads(fed)
    aggregator.handle({"round": 0}, ctx)
    for c in fed.ids:
        client.handle({"round": 0, "client": c, "mode": "unmask"}, ctx)
    fed.store.put(keys.secagg_advertise(0, "p-003"), b'{"kind": "junk"}')
    out = aggregator.handle({"round": 0}, ctx)
    res = fed.store.get_json(keys.result(0))
    assert out["status"] == "failed" and res["status"] == "failed"
    assert any("p-003" in x["reason"] and "vanished" in x["reason"] for x in res["rejected"])
