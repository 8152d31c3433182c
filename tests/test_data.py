"""Datasets and partitions: loaders from local files, and the iid, shards and Dirichlet splits."""

from pathlib import Path

import numpy as np
import pytest

from fedkeeper import data
from tests.extras import needs

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist10k.npz"


def labels(n=600, k=10, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


def test_iid_partition_is_a_disjoint_cover():
    y = labels()
    parts = data.partition(y, 7, "iid", seed=1)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(y)))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shards_give_each_client_few_labels():
    y = np.repeat(np.arange(10), 60)
    parts = data.partition(y, 10, "shards", seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    assert all(len(np.unique(y[p])) <= 2 for p in parts)
    iid_labels = [len(np.unique(y[p])) for p in data.partition(y, 10, "iid", seed=0)]
    assert min(iid_labels) > 2


def test_dirichlet_skews_with_small_alpha():
    y = labels(2000)
    skewed = data.partition(y, 5, "dirichlet:0.1", seed=0)
    even = data.partition(y, 5, "dirichlet:100", seed=0)

    def skew(parts):
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])

    assert skew(skewed) > skew(even) + 0.2
    assert sum(map(len, skewed)) == len(y)


def test_partition_errors_name_the_fix():
    with pytest.raises(data.DataError, match="fewer clients"):
        data.partition(labels(5), 10, "iid")
    with pytest.raises(data.DataError, match="unknown partition"):
        data.partition(labels(), 3, "weird")


def test_npz_with_and_without_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (50, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 50)
    p1 = tmp_path / "xy.npz"
    np.savez(p1, x=x, y=y)
    ds = data.load(f"npz:{p1}", seed=0, test_fraction=0.2)
    assert ds.x_train.shape == (40, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() <= 1.0
    p2 = tmp_path / "split.npz"
    np.savez(p2, x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    assert data.load(f"npz:{p2}").x_test.shape[0] == 20
    p3 = tmp_path / "wrong.npz"
    np.savez(p3, a=x)
    with pytest.raises(data.DataError, match="x_train"):
        data.load(f"npz:{p3}")
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(f"npz:{tmp_path / 'missing.npz'}")


def test_mnist_from_a_local_copy(tmp_path, monkeypatch):
    # The real MNIST digits shipped beside the project stand in for the download.
    if not SHARED_MNIST.exists():
        pytest.skip(f"{SHARED_MNIST} is not present")
    with np.load(SHARED_MNIST) as src:
        x, y = src["x"][:500], src["y"][:500]
    np.savez(tmp_path / "mnist.npz", x_train=x[:400].reshape(-1, 28, 28), y_train=y[:400],
             x_test=x[400:].reshape(-1, 28, 28), y_test=y[400:])
    monkeypatch.setenv("FEDKEEPER_DATA_DIR", str(tmp_path))
    ds = data.load("mnist")
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10 and len(ds.y_test) == 100
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


def test_keras_loader_is_called_for_named_datasets(monkeypatch, tmp_path):
    needs("tf", "tensorflow", "keras")
    import keras
    calls = []

    def fake_load():
        calls.append(1)
        rng = np.random.default_rng(0)
        return ((rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, (20, 1))),
                (rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, (5, 1))))

    monkeypatch.setenv("FEDKEEPER_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fake_load)
    ds = data.load("cifar10")
    assert calls and ds.input_shape == (32, 32, 3) and ds.y_train.shape == (20,)


def test_digits_ships_offline():
    needs("tf", "sklearn")
    ds = data.load("digits", seed=0, test_fraction=0.2)
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797


def test_pack_refuses_pickles():
    with pytest.raises(data.DataError):
        data.unpack(b"not an npz")
    arrays = data.unpack(data.pack(a=np.arange(3)))
    assert arrays["a"].tolist() == [0, 1, 2]
