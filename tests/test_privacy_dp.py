"""Differential privacy: clipping, noise calibration, adaptive clipping, local DP, accounting and the budget stop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedkeeper.core import blob, keys, rounds
from fedkeeper.core.aggregate import global_norm
from fedkeeper.core.config import ConfigError, from_dict
from fedkeeper.core.privacy import dp
from fedkeeper.core.privacy.settings import DPConfig
from fedkeeper.core.strategy import FedAvg
from fedkeeper.functions import aggregator, trigger
from fedkeeper.functions.context import Context, NullInvoker
from tests.conftest import Federation, make_weights, update_bytes


def _private(fed: Federation, rounds_total: int = 3, fraction: float = 1.0, **dp_fields) -> None:
    """Give a hand-made federation a privacy section (and write its config back)."""
    raw = fed.cfg.to_dict()
    raw["rounds"] = rounds_total
    raw["strategy"]["fraction"] = fraction
    raw["privacy"] = {"dp": dict({"mode": "central"}, **dp_fields)}
    raw["platforms"] = [dict(p, clients=0) for p in raw["platforms"]]
    fed.cfg = from_dict(raw)
    fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())


def _fold(strategy, global_w, updates, state=None):
    fold = strategy.begin(global_w, state)
    for i, (w, n) in enumerate(updates):
        fold.add(f"c{i}", w, n)
    return strategy.finish(fold, global_w, state)


def test_clipping_bounds_every_contribution():
    # Prepare: three honest updates and one scaled by 1e6 (a model-replacement attempt), no noise
    g = make_weights(0)
    cfg = DPConfig(mode="central", clip_norm=0.5, noise_multiplier=0.0)
    honest = [({k: v + 0.01 * make_weights(10 + i)[k] for k, v in g.items()}, 50) for i in range(3)]
    attack = ({k: v + 1e6 * make_weights(99)[k] for k, v in g.items()}, 5000)
    # Execute
    with_attack, _ = _fold(dp.DPStrategy(FedAvg(), cfg), g, honest + [attack])
    without, _ = _fold(dp.DPStrategy(FedAvg(), cfg), g, honest + [(g, 1)])
    # Assert: swapping one client's update moves the mean by at most clip_norm / n, whatever it claims
    moved = global_norm(with_attack, without)
    assert moved <= cfg.clip_norm / 4 + 1e-5
    assert moved > 0.9 * cfg.clip_norm / 4  # the attack was clipped to the bound, not dropped
    for w, _ in honest + [attack]:
        clipped, norm = dp.clip(dp.difference(w, g), cfg.clip_norm)
        assert global_norm(clipped) <= cfg.clip_norm * (1 + 1e-6)
    # Each client counts once: the honest mean is the plain mean of clipped deltas, not example-weighted
    deltas = [dp.clip(dp.difference(w, g), cfg.clip_norm)[0] for w, _ in honest + [(g, 1)]]
    expect = {k: g[k] + sum(d[k] for d in deltas) / 4 for k in g}
    assert global_norm(without, expect) < 1e-5


def test_noise_standard_deviation_matches_the_calibration():
    # Prepare: a large model so the sample standard deviation is tight; updates equal to the global model
    g = {"w": np.zeros(400_000, dtype=np.float32)}
    cfg = DPConfig(mode="central", clip_norm=2.0, noise_multiplier=1.3)
    n = 5
    # Execute
    out, _ = _fold(dp.DPStrategy(FedAvg(), cfg, rng=np.random.default_rng(7)), g, [(g, 10)] * n)
    # Assert: the sum carries N(0, (z·C)²); the mean divides it by the n included clients
    noise_on_sum = out["w"].astype(np.float64) * n
    expected = cfg.noise_multiplier * cfg.clip_norm
    # the sample std of 400k normals is within 4 standard errors (std·/√(2N)) of the truth
    assert abs(noise_on_sum.std() - expected) < 4 * expected / math.sqrt(2 * noise_on_sum.size)
    assert abs(noise_on_sum.mean()) < 4 * expected / math.sqrt(noise_on_sum.size)
    # and a wrong calibration (noise not scaled by C) would be far outside that band
    assert abs(noise_on_sum.std() - cfg.noise_multiplier) > 0.5


def test_local_dp_clips_and_noises_at_the_client():
    g = {"w": np.zeros(200_000, dtype=np.float32)}
    trained = {"w": np.full(200_000, 0.1, dtype=np.float32)}  # norm ≈ 44.7, far above the clip norm
    out, rep = dp.local_dp(trained, g, clip_norm=1.0, noise_multiplier=0.8, rng=np.random.default_rng(3))
    noise = out["w"].astype(np.float64) - 1.0 / math.sqrt(200_000)  # the clipped update is uniform at C/√d
    assert rep["clipped"] and rep["update_norm"] > 40
    assert abs(noise.std() - 0.8) < 4 * 0.8 / math.sqrt(2 * noise.size)


def test_adaptive_clip_norm_follows_the_target_quantile_and_lives_in_server_state():
    # Prepare: every update's norm is far above the initial clip norm; no noise, so the step is exact
    g = make_weights(0)
    cfg = DPConfig(mode="central", clip_norm=0.1, noise_multiplier=0.0, adaptive=True, target_quantile=0.5,
                   clip_learning_rate=0.2)
    ups = [({k: v + make_weights(20 + i)[k] for k, v in g.items()}, 10) for i in range(4)]
    strat = dp.DPStrategy(FedAvg(), cfg)
    # Execute: two rounds, the second starting from the first's state
    _, s1 = _fold(strat, g, ups)
    _, s2 = _fold(strat, g, ups, state=s1)
    # Assert: no update was under C, so b̄ = 0 and C grows by exp(η·γ) each round
    c1 = float(s1[dp.CLIP_KEY][0])
    c2 = float(s2[dp.CLIP_KEY][0])
    assert c1 == pytest.approx(0.1 * math.exp(0.2 * 0.5))
    assert c2 == pytest.approx(c1 * math.exp(0.2 * 0.5))
    # all updates under C: it shrinks
    _, s3 = _fold(strat, g, [(g, 1)] * 4, state={dp.CLIP_KEY: np.array([5.0])})
    assert float(s3[dp.CLIP_KEY][0]) == pytest.approx(5.0 * math.exp(-0.2 * 0.5))


def test_adaptive_noise_split_keeps_the_total_multiplier():
    cfg = DPConfig(mode="central", noise_multiplier=1.0, adaptive=True, count_stddev=2.0)
    z_sum = dp.sum_noise_multiplier(cfg, 10)
    # Gaussian mechanisms compose as 1/z² = 1/z_sum² + 1/(2σ_b)²
    assert 1 / z_sum ** 2 + 1 / (2 * 2.0) ** 2 == pytest.approx(1 / 1.0 ** 2)


def _run_round(fed: Federation, r: int) -> dict:
    ctx = Context(store=fed.store, invoker=NullInvoker())
    started = trigger.handle({"round": r}, ctx)
    if started["status"] != "started":
        return started
    for i, c in enumerate(started["selected"]):
        w = {k: v + 0.05 * make_weights(1000 * r + i)[k] for k, v in fed.global_weights.items()}
        fed.store.put(keys.update(r, c), update_bytes(r, c, w, 10 + i))
    return aggregator.handle({"round": r}, ctx)


def test_epsilon_in_result_matches_a_direct_dp_accounting_computation(tmp_path):
    dpa = pytest.importorskip("dp_accounting")
    fed = Federation(tmp_path / "s", n_clients=10)
    _private(fed, rounds_total=3, fraction=0.3, noise_multiplier=1.1, clip_norm=1.0, delta=1e-5)
    for r in range(2):
        assert _run_round(fed, r)["status"] == "done"
    rec = fed.store.get_json(keys.result(1))["privacy"]
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.3, dpa.GaussianDpEvent(1.1)), 2))
    assert rec["releases"] == 2 and rec["sampling_rate"] == pytest.approx(0.3)
    assert rec["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert fed.store.get_json(keys.result(0))["privacy"]["epsilon"] < rec["epsilon"]
    assert rec["clip_norm"] == 1.0 and rec["noise_std"] == pytest.approx(1.1)


def test_budget_stops_the_federation_before_it_is_exceeded(tmp_path):
    pytest.importorskip("dp_accounting")
    from fedkeeper import accounting

    fed = Federation(tmp_path / "s", n_clients=4)
    eps = [accounting.epsilon(2.0, 1.0, k, 1e-5) for k in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2  # two rounds fit, a third would overspend
    _private(fed, rounds_total=6, noise_multiplier=2.0, epsilon_budget=budget)
    # Execute
    outs = [_run_round(fed, r) for r in range(3)]
    # Assert: two rounds ran, the second recorded the stop, and no third round was opened
    assert [o["status"] for o in outs[:2]] == ["done", "done"]
    assert outs[2]["status"] == "finished" and "privacy budget" in outs[2]["message"]
    state = rounds.State.parse(fed.store.get_json(keys.STATE))
    assert state.status == rounds.FINISHED and state.rounds_done == 2
    assert "epsilon_budget" in state.reason and f"{budget:g}" in state.reason
    assert not fed.store.exists(keys.manifest(2))
    last = fed.store.get_json(keys.result(1))["privacy"]
    assert last["epsilon"] <= budget and last["budget_exhausted"]


def test_budget_too_small_for_one_round_never_starts(tmp_path):
    pytest.importorskip("dp_accounting")
    fed = Federation(tmp_path / "s", n_clients=4)
    _private(fed, noise_multiplier=0.5, epsilon_budget=0.01)
    out = trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    assert out["status"] == "finished" and "privacy budget" in out["message"]
    assert not fed.store.exists(keys.manifest(0))
    assert rounds.State.parse(fed.store.get_json(keys.STATE)).status == rounds.FINISHED


def test_central_dp_turns_the_median_norm_bound_off_and_clips_instead(tmp_path):
    pytest.importorskip("dp_accounting")
    fed = Federation(tmp_path / "s", n_clients=4)
    _private(fed, noise_multiplier=0.0, clip_norm=0.2)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    trigger.handle({"round": 0}, ctx)
    g = fed.global_weights
    for i, c in enumerate(fed.ids):
        scale = 1000.0 if i == 0 else 0.01
        fed.store.put(keys.update(0, c), update_bytes(0, c, {k: v + scale * make_weights(i)[k] for k, v in g.items()}, 5))
    aggregator.handle({"round": 0}, ctx)
    res = fed.store.get_json(keys.result(0))
    assert len(res["included"]) == 4 and res["privacy"]["clipped"] >= 1
    model = blob.decode(fed.store.get(keys.model(1))).tensors
    assert global_norm(model, g) <= 0.2 + 1e-5


@pytest.mark.parametrize("section, field", [
    ({"dp": {"mode": "global"}}, "privacy.dp.mode"),
    ({"dp": {"mode": "central", "noise_multiplier": -1}}, "privacy.dp.noise_multiplier"),
    ({"dp": {"mode": "local", "adaptive": True}}, "privacy.dp.adaptive"),
    ({"dp": {"epsilon_budget": 3}}, "privacy.dp.epsilon_budget"),
    ({"dp": {"mode": "central", "delta": 0.5}}, "privacy.dp.delta"),
    ({"dp": {"mode": "central", "adaptive": True, "noise_multiplier": 2, "count_stddev": 0.5}}, "privacy.dp.count_stddev"),
    ({"secure_aggregation": "on"}, "privacy.secure_aggregation"),
    ({"secagg": {"ring_bits": 48}}, "privacy.secagg.ring_bits"),
    ({"nope": 1}, "privacy.nope"),
])
def test_privacy_config_errors_name_the_field_and_the_fix(section, field):
    with pytest.raises(ConfigError) as err:
        from_dict({"privacy": section})
    assert err.value.field == field and err.value.fix


def test_status_and_report_show_epsilon_and_why_the_federation_stopped(tmp_path, capsys):
    pytest.importorskip("dp_accounting")
    from fedkeeper import cli, report

    fed = Federation(tmp_path / "s", n_clients=4)
    _private(fed, rounds_total=4, noise_multiplier=1.0, epsilon_budget=8.0)
    for r in range(4):
        if _run_round(fed, r).get("status") != "done":
            break
    results = report.collect(fed.store)
    eps = results["final"]["privacy"]["epsilon"]
    assert eps is not None and 0 < eps <= 8.0
    assert "epsilon_budget" in results["final"]["stop_reason"]
    assert cli.main(["status", "--store", fed.store.url]) == 0
    out = capsys.readouterr().out
    assert f"ε {eps:.3g}" in out and "stopped: privacy budget reached" in out


def test_the_client_never_loads_the_accountant():
    import subprocess
    import sys

    code = ("import sys\n"
            "import fedkeeper.functions.client, fedkeeper.core.privacy.dp\n"
            "print('dp_accounting' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_central_dp_rounds_are_folded_by_one_aggregator_and_masked_rounds_as_a_tree(tmp_path, monkeypatch):
    from fedkeeper.functions import protocol

    monkeypatch.setenv("FEDKEEPER_SECRETS_DIR", str(tmp_path / "secrets"))
    for privacy in ({"dp": {"mode": "central"}}, {"secure_aggregation": True}):
        fed = Federation(tmp_path / f"s{len(privacy)}-{'dp' in privacy}", n_clients=6)
        raw = fed.cfg.to_dict()
        raw["platforms"] = [dict(p, clients=0) for p in raw["platforms"]]
        raw["privacy"] = privacy
        raw["aggregation"] = {"mode": "tree", "fan_in": 2}
        fed.cfg = from_dict(raw)
        fed.store.put_json(keys.FEDERATION, fed.cfg.to_dict())
        if "secure_aggregation" in privacy:
            from fedkeeper.functions import secagg

            secagg.register(fed.store, fed.cfg)
        trigger.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
        m = protocol.read_manifest(fed.store, 0)
        # Central DP's fold clips against the global model (no plain running sum); masked sums compose mod the ring
        assert m.fan_in == (2 if "secure_aggregation" in privacy else 0) and m.shards == 1


# -- the noise is fixed once per round ---------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.t = 2_000_000.0

    def __call__(self) -> float:
        return self.t


def _dp_round_inputs(fed: Federation, r: int, ctx: Context) -> dict:
    """Open round r and write the same four updates any federation built this way gets; returns {client: w}."""
    trigger.handle({"round": r}, ctx)
    g = blob.decode(fed.store.get(keys.model(r))).tensors
    out = {}
    for i, c in enumerate(fed.ids):
        w = {k: v + 0.05 * make_weights(1000 * r + i)[k] for k, v in g.items()}
        fed.store.put(keys.update(r, c), update_bytes(r, c, w, 10 + i))
        out[c] = w
    return out


def _noise_of_round(fed: Federation, r: int, updates: dict) -> dict:
    """model(r+1) − (global + mean clipped difference): the noise the round added, divided by the clients."""
    g = blob.decode(fed.store.get(keys.model(r))).tensors
    new = blob.decode(fed.store.get(keys.model(r + 1))).tensors
    clipped = [dp.clip(dp.difference(updates[c], g), fed.cfg.privacy.dp.clip_norm)[0] for c in sorted(updates)]
    return {k: new[k].astype(np.float64) - g[k] - sum(d[k] for d in clipped) / len(clipped) for k in g}


def test_a_takeover_writes_the_same_noised_model_as_the_aggregator_it_replaced(tmp_path):
    from fedkeeper.functions import protocol

    pytest.importorskip("dp_accounting")
    # Prepare: central DP with real noise; aggregator A claims the round and computes its result, noise included,
    # then dies before it writes anything
    fed = Federation(tmp_path / "s", n_clients=4)
    _private(fed, noise_multiplier=1.0, clip_norm=0.5)
    clock = _Clock()
    a = Context(store=fed.store, invoker=NullInvoker(), invocation_id="agg-a", now=clock)
    updates = _dp_round_inputs(fed, 0, a)
    assert protocol.claim(a, 0, fed.cfg.strategy.lease_s)[0]
    m = protocol.read_manifest(fed.store, 0)
    died_with = protocol.aggregate(a, fed.cfg, m, protocol.settle(fed.store, m))["_model_bytes"]
    assert not fed.store.exists(keys.model(1))

    # Execute: once A's lease has expired, B takes the round over and finishes it
    clock.t += fed.cfg.strategy.lease_s + 1
    b = Context(store=fed.store, invoker=NullInvoker(), invocation_id="agg-b", now=clock)
    out = aggregator.handle({"round": 0}, b)

    # Assert: B's model is A's, byte for byte; the noise is really there (not a noiseless model twice)
    res = fed.store.get_json(keys.result(0))
    assert out["status"] == "done" and res["timings"]["claim_takeover_from"] == "agg-a"
    assert bytes(fed.store.get(keys.model(1))) == bytes(died_with)
    noise = _noise_of_round(fed, 0, updates)
    per_value = np.concatenate([v.reshape(-1) for v in noise.values()])
    # std of the mean's noise is z·C / n = 1.0 · 0.5 / 4; far above float32 rounding of the mean
    assert 0.05 < per_value.std() < 0.3
    seed = fed.store.get_json(keys.dp_noise_seed(0))
    assert seed["round"] == 0 and len(bytes.fromhex(seed["seed"])) == 32


def test_the_noise_differs_between_rounds_and_between_federations(tmp_path):
    pytest.importorskip("dp_accounting")
    # Prepare: two federations with identical configs, models and updates
    noises, seeds = [], []
    for name in ("one", "two"):
        fed = Federation(tmp_path / name, n_clients=4)
        _private(fed, noise_multiplier=1.0, clip_norm=0.5)
        ctx = Context(store=fed.store, invoker=NullInvoker())
        per_round = []
        for r in range(2):
            updates = _dp_round_inputs(fed, r, ctx)
            # Execute
            assert aggregator.handle({"round": r}, ctx)["status"] == "done"
            per_round.append(_noise_of_round(fed, r, updates))
            seeds.append(fed.store.get_json(keys.dp_noise_seed(r))["seed"])
        noises.append(per_round)
    # Assert: four fresh seeds, and no two rounds' noise vectors alike (nor correlated)
    assert len(set(seeds)) == 4
    flat = [np.concatenate([n[k].reshape(-1) for k in sorted(n)]) for per_round in noises for n in per_round]
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(np.corrcoef(flat[i], flat[j])[0, 1]) < 0.5, (i, j)


def test_a_malformed_noise_seed_stops_the_round_with_the_key_and_the_fix(tmp_path):
    from fedkeeper.functions.context import HandlerError

    # Prepare: someone other than an aggregator wrote round 0's seed first
    fed = Federation(tmp_path / "s", n_clients=4)
    _private(fed, noise_multiplier=1.0, clip_norm=0.5)
    ctx = Context(store=fed.store, invoker=NullInvoker())
    _dp_round_inputs(fed, 0, ctx)
    fed.store.put(keys.dp_noise_seed(0), b'{"round": 0, "seed": "00"}')
    # Execute / Assert: no model is noised with a seed that is not 256 random bits
    with pytest.raises(HandlerError, match="dp_noise_seed.json does not hold round 0's 256-bit noise seed.*Delete"):
        aggregator.handle({"round": 0}, ctx)
    assert not fed.store.exists(keys.model(1))


@pytest.mark.parametrize("privacy, field", [
    ({"secure_aggregation": True}, "privacy.secure_aggregation"),
    ({"dp": {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0}}, "privacy.dp.mode"),
    ({"dp": {"mode": "local", "epsilon_budget": 3.0}}, "privacy.dp.epsilon_budget"),
])
def test_async_mode_refuses_privacy_it_cannot_apply(privacy, field):
    # Execute: an asynchronous federation asks for masking, central noise or a budget, none of which it can honour.
    with pytest.raises(ConfigError) as err:
        from_dict({"mode": "async", "privacy": privacy, "platforms": [{"name": "p", "clients": 4}]})

    # Assert: the field is named and the fix points at sync mode.
    assert err.value.field == field and "mode: sync" in err.value.fix


def test_async_mode_keeps_local_dp_without_a_budget():
    cfg = from_dict({"mode": "async", "privacy": {"dp": {"mode": "local"}},
                            "platforms": [{"name": "p", "clients": 4}]})
    assert cfg.privacy.dp.mode == "local"
