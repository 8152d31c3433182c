"""Every strategy against a direct implementation of its paper's formula, on small random inputs, in any order."""

from __future__ import annotations

import numpy as np
import pytest

from fedkeeper.core import keys
from fedkeeper.core import strategy as strategies
from fedkeeper.core.config import ConfigError, from_dict
from fedkeeper.core.strategy import blocks
from fedkeeper.functions import aggregator
from fedkeeper.functions.context import Context, NullInvoker
from tests.conftest import SHAPES, Federation, make_weights, update_bytes

NAMES = sorted(SHAPES)


def flat(w: dict) -> np.ndarray:
    """All tensors as one float64 vector, in sorted name order."""
    return np.concatenate([np.asarray(w[k], dtype=np.float64).reshape(-1) for k in NAMES])


def unflat(v: np.ndarray) -> dict:
    """The inverse of flat()."""
    out, off = {}, 0
    for k in NAMES:
        size = int(np.prod(SHAPES[k]))
        out[k] = v[off:off + size].reshape(SHAPES[k])
        off += size
    return out


def clients(seed: int, n: int, spread: float = 0.1) -> list[tuple[str, dict, int, dict]]:
    """n updates near a common point: (id, weights, num_examples, metadata with local steps)."""
    rng = np.random.default_rng(seed)
    base = make_weights(seed)
    out = []
    for i in range(n):
        w = {k: (v + spread * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
        out.append((f"c{i:02d}", w, int(rng.integers(5, 60)), {"metrics": {"local_steps": int(rng.integers(3, 30))}}))
    return out


def run(strategy: strategies.Strategy, updates, global_w: dict, state=None, order=None):
    """Fold updates as the protocol does (check, then add, in the given order) and finish."""
    by_id = {c: w for c, w, _, _ in updates}
    fold = strategy.begin(global_w, state, np.float32, reader=lambda c: by_id[c])
    for idx in (order if order is not None else range(len(updates))):
        cid, w, n, meta = updates[idx]
        assert strategy.check(cid, meta) is None
        fold.add(cid, w, n)
    return strategy.finish(fold, global_w, state)


def make(name: str, population: int = 0, client_lr: float = 0.01, **params) -> strategies.Strategy:
    """A strategy with validated params."""
    ok, errors = strategies.check_params(name, params)
    assert not errors, errors
    return strategies.create(name, strategies.Settings(population=population, client_lr=client_lr), ok)


# -- references: the papers' formulas on flat float64 vectors -------------------------------------------------
def ref_fedavg(ups):
    n = np.array([u[2] for u in ups], dtype=np.float64)
    return sum(ni * flat(u[1]) for ni, u in zip(n, ups)) / n.sum()


def ref_serveropt(kind: str, ups, x, st, p):
    """Reddi et al. 2021 Algorithm 2 (FedAdagrad, FedAdam, FedYogi) and Hsu et al. 2019 (FedAvgM)."""
    d = ref_fedavg(ups) - x
    t = st["t"] + 1
    if kind == "fedavgm":
        v = p["server_momentum"] * st["v"] - d
        return x - p["server_learning_rate"] * v, {"v": v, "t": t}
    m = p["beta_1"] * st["m"] + (1 - p["beta_1"]) * d
    if kind == "fedadagrad":
        v = st["v"] + d * d
    elif kind == "fedadam":
        v = p["beta_2"] * st["v"] + (1 - p["beta_2"]) * d * d
    else:
        v = st["v"] - (1 - p["beta_2"]) * d * d * np.sign(st["v"] - d * d)
    eta = p["eta"]
    if p.get("bias_correction"):
        eta = eta * np.sqrt(1 - p["beta_2"] ** t) / (1 - p["beta_1"] ** t)
    return x + eta * m / (np.sqrt(v) + p["tau"]), {"m": m, "v": v, "t": t}


def ref_scaffold(ups, x, c, population, lr_l, eta_g):
    """Karimireddy et al. 2020, Algorithm 1 with option II: client by client."""
    dy, dc = [], []
    for _, w, _, meta in ups:
        y, k = flat(w), meta["metrics"]["local_steps"]
        ci = np.zeros_like(x)  # the client's own c_i cancels out of Δc_i
        ci_new = ci - c + (x - y) / (k * lr_l)
        dy.append(y - x)
        dc.append(ci_new - ci)
    return x + eta_g * np.mean(dy, axis=0), c + np.sum(dc, axis=0) / population


def ref_fednova(ups, x, eta, rho):
    """Wang et al. 2020: d_i = (x − y_i)/‖a_i‖₁, x ← x − η·τ_eff·Σ p_i d_i."""
    n = np.array([u[2] for u in ups], dtype=np.float64)
    p = n / n.sum()
    a = []
    for _, _, _, meta in ups:
        tau = meta["metrics"]["local_steps"]
        a.append(sum((1 - rho ** j) / (1 - rho) for j in range(1, tau + 1)) if rho else float(tau))
    tau_eff = float(np.dot(p, a))
    step = sum(pi * (x - flat(u[1])) / ai for pi, ai, u in zip(p, a, ups))
    return x - eta * tau_eff * step


def ref_krum_scores(vs, f):
    n = len(vs)
    k = max(1, n - f - 2)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((vs[i] - vs[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:k]))
    return scores


def ref_bulyan(vs, f):
    """El Mhamdi et al. 2018: θ = n − 2f picks by Krum (recomputed on what is left), β = θ − 2f nearest the median."""
    left = list(range(len(vs)))
    chosen = []
    for _ in range(len(vs) - 2 * f):
        scores = ref_krum_scores([vs[i] for i in left], f)
        chosen.append(left.pop(int(np.argmin(scores))))
    sel = np.stack([vs[i] for i in chosen])
    beta = len(chosen) - 2 * f
    med = np.median(sel, axis=0)
    out = np.empty(sel.shape[1])
    for j in range(sel.shape[1]):
        near = sorted(sel[:, j], key=lambda v: abs(v - med[j]))[:beta]
        out[j] = np.mean(near)
    return out


def close(got: dict, want: np.ndarray) -> None:
    np.testing.assert_allclose(flat(got), want, rtol=1e-5, atol=1e-6)


# -- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [
    ("fedavgm", {"server_learning_rate": 0.7, "server_momentum": 0.9}),
    ("fedadam", {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    ("fedadam", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.9, "tau": 1e-2, "bias_correction": True}),
    ("fedyogi", {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    ("fedadagrad", {"eta": 0.05, "beta_1": 0.5, "tau": 1e-3}),
])
def test_server_optimizers_match_their_formulas_over_three_rounds(name, params):
    # Prepare: three rounds, the server state carried from one to the next as the protocol stores it
    s = make(name, **params)
    full = dict({k: p.default for k, p in s.PARAMS.items()}, **params)
    x = make_weights(1)
    zeros = np.zeros_like(flat(x))
    ref_x, ref_state, state = flat(x), {"m": zeros, "v": zeros, "t": 0}, None
    for r in range(3):
        ups = clients(10 + r, 6)
        # Execute
        x, state = run(s, ups, x, state)
        ref_x, ref_state = ref_serveropt(name, ups, ref_x, ref_state, full)
        # Assert: the model and the state follow the reference round by round
        close(x, ref_x)
        assert int(state["step"][0]) == r + 1
    shuffled, _ = run(s, ups, unflat(ref_x).copy(), state, order=[5, 2, 0, 4, 1, 3])
    again, _ = run(s, ups, unflat(ref_x).copy(), state)
    np.testing.assert_allclose(flat(shuffled), flat(again), rtol=1e-6, atol=1e-7)


def test_fedprox_averages_like_fedavg_and_asks_clients_for_the_proximal_term():
    s = make("fedprox", mu=0.3)
    ups = clients(3, 5)
    out, state = run(s, ups, make_weights(0))
    close(out, ref_fedavg(ups))
    assert state is None
    picked = s.configure(0, [{"id": f"c{i}"} for i in range(4)], seed=0)
    assert all(c["config"] == {"proximal_mu": 0.3} for c in picked)


def test_scaffold_matches_the_paper_over_two_rounds():
    # Prepare: 6 of 10 clients take part; c starts at zero
    s = make("scaffold", population=10, client_lr=0.05, server_lr=0.8)
    x = make_weights(2)
    ref_x, ref_c, state = flat(x), np.zeros_like(flat(x)), None
    for r in range(2):
        ups = clients(20 + r, 6)
        # Execute
        x, state = run(s, ups, x, state)
        ref_x, ref_c = ref_scaffold(ups, ref_x, ref_c, 10, 0.05, 0.8)
        # Assert
        close(x, ref_x)
        close({k: state["c/" + k] for k in NAMES}, ref_c)
    assert s.configure(0, [{"id": "a"}], 0)[0]["config"] == {"scaffold": True}


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_fednova_matches_the_paper(rho):
    ups = clients(4, 7)
    x = make_weights(4)
    s = make("fednova", server_lr=0.9, local_momentum=rho)
    out, _ = run(s, ups, x)
    close(out, ref_fednova(ups, flat(x), 0.9, rho))
    shuffled, _ = run(s, ups, x, order=[6, 3, 1, 0, 5, 2, 4])
    close(shuffled, flat(out))


def test_fednova_with_equal_steps_is_fedavg():
    ups = [(c, w, n, {"metrics": {"local_steps": 12}}) for c, w, n, _ in clients(5, 4)]
    out, _ = run(make("fednova"), ups, make_weights(5))
    close(out, ref_fedavg(ups))


def test_step_counting_strategies_reject_updates_without_local_steps():
    for name in ("fednova", "scaffold"):
        s = make(name)
        for bad in ({}, {"local_steps": 0}, {"local_steps": 2.5}, {"local_steps": True}):
            reason = s.check("c", {"metrics": bad})
            assert reason and "local_steps" in reason


@pytest.fixture(params=[False, True], ids=["one-block", "many-blocks"])
def tiny_blocks(request, monkeypatch):
    """Robust folds with their natural block, and with 7-coordinate blocks that cut across tensors."""
    if request.param:
        monkeypatch.setattr(blocks, "block_size", lambda rows, budget, per_coord=12: 7)
    return request.param


def test_median_and_trimmed_mean_match_their_formulas(tiny_blocks):
    ups = clients(6, 9)
    vs = np.stack([flat(u[1]) for u in ups])
    order = [8, 1, 4, 0, 7, 2, 6, 3, 5]
    out, _ = run(make("median"), ups, make_weights(6))
    close(out, np.median(vs, axis=0))
    assert flat(run(make("median"), ups, make_weights(6), order=order)[0]).tolist() == flat(out).tolist()
    for beta in (0.0, 0.1, 0.25, 0.4):
        cut = int(beta * len(ups))
        want = np.sort(vs, axis=0)[cut:len(ups) - cut].mean(axis=0)
        got, _ = run(make("trimmed_mean", beta=beta), ups, make_weights(6))
        close(got, want)
        close(run(make("trimmed_mean", beta=beta), ups, make_weights(6), order=order)[0], want)


@pytest.mark.parametrize("f", [0, 1, 2])
def test_krum_and_multikrum_match_their_formulas(f, tiny_blocks):
    # Prepare: honest updates and f outliers far away
    ups = clients(7, 9)
    rng = np.random.default_rng(f)
    for i in range(f):
        c, w, n, meta = ups[i]
        ups[i] = (c, {k: v + rng.standard_normal(v.shape).astype(np.float32) * 5 for k, v in w.items()}, n, meta)
    vs = [flat(u[1]) for u in ups]
    scores = ref_krum_scores(vs, f)
    order = list(reversed(range(len(ups))))
    # Execute / Assert: Krum returns exactly the best-scored update, in any order
    out, _ = run(make("krum", f=f), ups, make_weights(7))
    assert flat(out).tolist() == vs[int(np.argmin(scores))].tolist()
    assert flat(run(make("krum", f=f), ups, make_weights(7), order=order)[0]).tolist() == flat(out).tolist()
    for m in (0, 1, 4):
        keep = m or len(ups) - f
        best = np.argsort(scores, kind="stable")[:keep]
        want = ref_fedavg([ups[i] for i in best])
        close(run(make("multikrum", f=f, m=m), ups, make_weights(7))[0], want)
        close(run(make("multikrum", f=f, m=m), ups, make_weights(7), order=order)[0], want)
        if f:  # the outliers are never among the kept
            assert not set(best.tolist()) & set(range(f))


@pytest.mark.parametrize("f", [0, 1, 2])
def test_bulyan_matches_its_formula(f, tiny_blocks):
    ups = clients(8, 4 * f + 3 + 2)
    vs = [flat(u[1]) for u in ups]
    want = ref_bulyan(vs, f)
    close(run(make("bulyan", f=f), ups, make_weights(8))[0], want)
    order = list(np.random.default_rng(f).permutation(len(ups)))
    close(run(make("bulyan", f=f), ups, make_weights(8), order=order)[0], want)


def test_krum_distances_survive_large_weights_with_small_differences():
    # Prepare: models far from zero that differ by little: distances from the global model keep precision
    ups = clients(9, 6, spread=1e-3)
    big = {k: v + 1000.0 for k, v in make_weights(9).items()}
    ups = [(c, {k: (w[k] + 1000.0).astype(np.float32) for k in w}, n, m) for c, w, n, m in ups]
    vs = [flat(u[1]) for u in ups]
    out, _ = run(make("krum", f=1), ups, big)
    assert flat(out).tolist() == vs[int(np.argmin(ref_krum_scores(vs, 1)))].tolist()


def test_robust_folds_flag_non_finite_updates():
    ups = clients(10, 4)
    s = make("median")
    fold = s.begin(make_weights(0), None, np.float32, reader=lambda c: {})
    fold.add("a", ups[0][1], 5)
    assert fold.finite()
    bad = {k: v.copy() for k, v in ups[1][1].items()}
    bad["hidden/bias"][0] = np.nan
    fold.add("b", bad, 5)
    assert not fold.finite()


def test_block_plan_covers_every_coordinate_once():
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2, 2)}
    for size in (1, 4, 7, 12, 25, 1000):
        plan = blocks.plan(shapes, size)
        assert all(sum(hi - lo for _, lo, hi in segs) <= size for segs in plan)
        seen = {n: [] for n in shapes}
        for segs in plan:
            for n, lo, hi in segs:
                seen[n].extend(range(lo, hi))
        assert all(seen[n] == list(range(int(np.prod(s)))) for n, s in shapes.items())


def test_bulyan_lowers_f_when_too_few_updates_arrive():
    # Prepare: f = 2 needs 11 updates; 8 arrive (say the norm bound rejected the rest)
    ups = clients(11, 8)
    vs = [flat(u[1]) for u in ups]
    s = make("bulyan", f=2)
    # Execute / Assert: aggregated as with the largest f that 8 updates support, (8 - 3) // 4 = 1
    assert s.tolerated(8) == 1 and s.tolerated(11) == 2 and s.tolerated(2) == 0
    close(run(s, ups, make_weights(11))[0], ref_bulyan(vs, 1))
    assert make("bulyan", f=2).min_included(8) == make("median").min_included(8) == 4


def test_every_strategy_validates_its_params_naming_the_field_and_the_fix():
    with pytest.raises(ConfigError) as err:
        from_dict({"strategy": {"name": "trimmed_mean", "params": {"beta": 0.7}}})
    assert err.value.field == "strategy.params.beta" and "0.49" in err.value.fix
    with pytest.raises(ConfigError) as err:
        from_dict({"strategy": {"name": "krum", "params": {"f": 1.5}}})
    assert err.value.field == "strategy.params.f" and "whole number" in err.value.fix
    with pytest.raises(ConfigError) as err:
        from_dict({"strategy": {"name": "fedadam", "params": {"momentum": 0.9}}})
    assert err.value.field == "strategy.params.momentum" and "beta_1" in err.value.fix
    with pytest.raises(ConfigError) as err:
        from_dict({"strategy": {"name": "fedadam", "params": {"bias_correction": 1}}})
    assert "true or false" in err.value.fix
    for name, cls in strategies.REGISTRY.items():
        cfg = from_dict({"strategy": {"name": name, "params": {k: p.default for k, p in cls.PARAMS.items()}}})
        assert cfg.strategy.name == name


def test_init_text_documents_every_strategy_and_parameter():
    text = strategies.describe()
    for name, cls in strategies.REGISTRY.items():
        assert f"  {name}: " in text
        for key in cls.PARAMS:
            assert f"      {key}: " in text
    assert all(line.startswith("#") for line in text.splitlines())


@pytest.mark.parametrize("name", ["median", "krum", "bulyan", "fedadam", "fednova"])
def test_aggregator_runs_each_kind_of_strategy_and_rejects_the_hostile(tmp_path, name):
    # Prepare: 7 clients, one sending a huge update, under the default norm bound
    fed = Federation(tmp_path / "s", n_clients=7, name=name, quorum=0.5)
    fed.open_round(0, quorum=3)
    rng = np.random.default_rng(0)
    for i, c in enumerate(fed.ids):
        w = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in fed.global_weights.items()}
        if i == 3:
            w = {k: v * 1e6 for k, v in w.items()}
        fed.store.put(keys.update(0, c), update_bytes(0, c, w, 10 + i, metrics={"local_steps": 5 + i}))
    # Execute
    res = aggregator.handle({"round": 0}, Context(store=fed.store, invoker=NullInvoker()))
    # Assert: the hostile one was rejected by the norm bound, the rest aggregated, the state stored if any
    assert res["status"] == "done" and fed.ids[3] in res["rejected"] and len(res["included"]) == 6
    model = fed.store.get(keys.model(1))
    from fedkeeper.core import blob

    new = blob.decode(model).tensors
    assert max(float(np.abs(new[k] - fed.global_weights[k]).max()) for k in new) < 0.2
    assert fed.store.exists(keys.server_state(1)) == (name == "fedadam")


def test_cli_strategy_shortcut_and_init_listing(tmp_path, capsys):
    from fedkeeper import cli

    args = cli.parser().parse_args(["run", "--strategy", "krum"])
    assert cli.build_config(args).strategy.name == "krum"
    with pytest.raises(ConfigError) as err:
        cli.build_config(cli.parser().parse_args(["run", "--strategy", "fedmagic"]))
    assert err.value.field == "strategy.name" and "multikrum" in err.value.fix
    path = tmp_path / "fed.yaml"
    assert cli.main(["init", str(path)]) == 0
    text = path.read_text()
    assert strategies.describe() in text
    from fedkeeper.core import config

    assert config.from_dict(config.load_file(str(path))).strategy.name == "fedavg"
