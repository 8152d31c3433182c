"""FedAvg as a running sum: equals the direct weighted mean, partial sums compose, bad input is refused."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkeeper.core import aggregate
from fedkeeper.core.aggregate import RunningSum, fedavg, global_norm

from tests.conftest import make_weights


def direct_mean(updates):
    total = sum(n for _, n in updates)
    return {k: sum(w[k].astype(np.float64) * n for w, n in updates) / total for k in updates[0][0]}


def test_fedavg_equals_direct_weighted_mean():
    updates = [(make_weights(i), n) for i, n in enumerate([5, 17, 1, 230])]
    got = fedavg(updates)
    want = direct_mean(updates)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
        assert got[k].dtype == np.float32


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 10_000), min_size=2, max_size=9), split=st.integers(1, 8))
def test_partial_sums_compose(counts, split):
    updates = [(make_weights(i), n) for i, n in enumerate(counts)]
    split = min(split, len(updates) - 1)
    left, right = RunningSum(), RunningSum()
    for w, n in updates[:split]:
        left.add(w, n)
    for w, n in updates[split:]:
        right.add(w, n)
    left.merge(right)
    whole = fedavg(updates)
    assert left.count == len(updates) and left.total == sum(counts)
    for k, v in left.result().items():
        np.testing.assert_allclose(v, whole[k], rtol=1e-4, atol=1e-5)


def test_single_update_is_returned_unchanged():
    w = make_weights(7)
    got = fedavg([(w, 3)])
    for k in w:
        np.testing.assert_allclose(got[k], w[k], rtol=1e-6)


def test_mismatched_update_is_refused():
    acc = RunningSum()
    acc.add(make_weights(1), 2)
    bad = make_weights(2)
    bad["output/bias"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="shape"):
        acc.add(bad, 2)
    with pytest.raises(ValueError, match="positive"):
        acc.add(make_weights(3), 0)
    with pytest.raises(ValueError):
        RunningSum().result()


def test_global_norm_of_difference():
    a = {"x": np.array([3.0, 0.0], np.float32)}
    b = {"x": np.array([0.0, 4.0], np.float32)}
    assert global_norm(a) == pytest.approx(3.0)
    assert global_norm(a, b) == pytest.approx(5.0)


@pytest.mark.parametrize("size", [1, 1000, aggregate._CHUNK + 17, 3 * aggregate._CHUNK])
def test_scaled_add_matches_float32_multiply_then_add_on_both_paths(size, monkeypatch):
    rng = np.random.default_rng(size)
    w = rng.standard_normal(size).astype(np.float32)
    start = rng.standard_normal(size).astype(np.float32)
    n = np.float32(137)
    want = start + w * n
    scratch = np.empty(aggregate._CHUNK, np.float32)
    for blas in (True, False):
        if not blas:
            monkeypatch.setattr(aggregate, "_saxpy", None)  # numpy builds without a bundled OpenBLAS
        acc = start.copy()
        aggregate._scaled_add(acc, w, n, scratch)
        # BLAS may fuse the multiply and add (one rounding instead of two): equal to float32 rounding.
        np.testing.assert_allclose(acc, want, rtol=2e-7, atol=1e-6)


def test_scaled_add_reads_non_float32_and_read_only_updates():
    w64 = np.linspace(-1, 1, 5000)  # float64: takes the casting path, not BLAS
    ro = np.frombuffer(np.linspace(-2, 2, 5000).astype(np.float32).tobytes(), dtype=np.float32)
    assert not ro.flags.writeable
    acc = RunningSum()
    acc.add({"x": w64}, 3)
    acc.add({"x": ro}, 1)
    got = acc.result()["x"]
    np.testing.assert_allclose(got, (3 * w64 + ro.astype(np.float64)) / 4, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32


def test_aggregation_is_bitwise_deterministic():
    updates = [(make_weights(i), n) for i, n in enumerate([5, 17, 1, 230, 64])]
    first = fedavg(updates)
    again = fedavg(updates)
    for k in first:
        assert first[k].tobytes() == again[k].tobytes()


@pytest.mark.parametrize("blas", [True, False])
def test_measuring_the_distance_while_adding_changes_no_bit(blas, monkeypatch):
    # Prepare: tensors longer than a slice, of odd length, and a reference model
    if not blas:
        monkeypatch.setattr(aggregate, "_saxpy", None)  # numpy builds without a bundled OpenBLAS
    rng = np.random.default_rng(7)
    shapes = {"big": (3 * aggregate._NORM_CHUNK + 123,), "mat": (301, 517), "tiny": (3,)}
    updates = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    ref = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    plain, fused = RunningSum(), RunningSum()
    # Execute
    dists = []
    for i, u in enumerate(updates):
        plain.add(u, 10 + i)
        dists.append(fused.add(u, 10 + i, reference=ref))
    # Assert: the sums are bit for bit those of adding alone, the distances those of distance_sq
    for k in shapes:
        assert plain.sums[k].tobytes() == fused.sums[k].tobytes()
    for u, got in zip(updates, dists):
        want = sum(aggregate.distance_sq(u[k].reshape(-1), ref[k].reshape(-1)) for k in shapes)
        assert got == want
