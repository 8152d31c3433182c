"""Datasets and partitions: load a dataset, split it across clients (iid, label shards, Dirichlet), pack npz blobs."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """A dataset cannot be loaded or split; the message names the fix."""


@dataclass
class Dataset:
    """Train and test arrays; x is float32 NHWC scaled to [0, 1], y is int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        """Number of distinct labels (max label + 1)."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x_train.shape[1:])


def _images(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] float32 and give a channel axis, so one model code path fits every dataset."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        if x.size and x.max() > 1.5:
            x = x / float(x.max())
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side == x.shape[1]:
            x = x.reshape(-1, side, side)
        else:
            return x.reshape(len(x), -1, 1, 1)
    if x.ndim == 3:
        x = x[..., None]
    return x


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    te, tr = idx[:n_test], idx[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _local_copy(name: str) -> str | None:
    """A pre-downloaded copy at $FEDKEEPER_DATA_DIR/<name>.npz, for machines without internet."""
    import os

    folder = os.environ.get("FEDKEEPER_DATA_DIR", os.path.expanduser("~/.fedkeeper/datasets"))
    path = os.path.join(folder, f"{name}.npz")
    return path if os.path.isfile(path) else None


def load(spec: str, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load `digits`, `mnist`, `fashion_mnist`, `cifar10` (Keras loaders) or `npz:PATH`."""
    if spec == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images / 16.0).astype(np.float32)
        xtr, ytr, xte, yte = _split(x, d.target.astype(np.int64), test_fraction, seed)
    elif spec in ("mnist", "fashion_mnist", "cifar10") and _local_copy(spec):
        return load(f"npz:{_local_copy(spec)}", seed, test_fraction)
    elif spec in ("mnist", "fashion_mnist", "cifar10"):
        try:
            import keras
        except ImportError as exc:
            raise DataError(f"dataset {spec} needs Keras: pip install 'fedkeeper[tf]'") from exc
        loader = getattr(keras.datasets, spec)
        try:
            (xtr, ytr), (xte, yte) = loader.load_data()
        except Exception as exc:  # network failures surface as many exception types
            raise DataError(f"could not load {spec} ({exc}); it downloads on first use, so check the network, "
                            f"or save it as an npz file and use npz:PATH") from exc
    elif spec.startswith("npz:"):
        path = spec[4:]
        try:
            with np.load(path, allow_pickle=False) as f:
                names = set(f.files)
                if {"x_train", "y_train", "x_test", "y_test"} <= names:
                    xtr, ytr, xte, yte = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
                elif {"x", "y"} <= names:
                    x, y = f["x"], f["y"]
                    if len(x) != len(y):  # checked before the split, which would index past the shorter one
                        raise DataError(f"{path}: x has {len(x)} examples but y has {len(y)} labels; "
                                        "save one label per example")
                    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
                else:
                    raise DataError(f"{path} holds {sorted(names)}; it needs x_train, y_train, x_test, y_test or x, y")
        except FileNotFoundError:
            raise DataError(f"dataset file {path} does not exist; check the path after npz:") from None
        except (OSError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{path} is not a readable npz file ({exc})") from None
    else:
        raise DataError(f"unknown dataset {spec!r}: use digits, mnist, fashion_mnist, cifar10 or npz:PATH")
    ytr, yte = np.asarray(ytr).reshape(-1).astype(np.int64), np.asarray(yte).reshape(-1).astype(np.int64)
    xtr, xte = _images(xtr), _images(xte)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"dataset {spec}: x and y lengths differ ({len(xtr)} vs {len(ytr)} train, {len(xte)} vs "
                        f"{len(yte)} test); save one label per example")
    if ytr.min() < 0:
        raise DataError(f"dataset {spec}: labels must be 0..K-1, found {ytr.min()}")
    return Dataset(xtr, ytr, xte, yte)


def partition(y: np.ndarray, n_clients: int, spec: str, seed: int = 0) -> list[np.ndarray]:
    """Index arrays, one per client: iid, shards[:K] (label-sorted shards, K per client, default 2), dirichlet:ALPHA."""
    if n_clients < 1:
        raise DataError("need at least one client to partition data")
    if n_clients > len(y):
        raise DataError(f"{n_clients} clients but only {len(y)} training examples; use fewer clients or more data")
    rng = np.random.default_rng(seed)
    if spec == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(len(y)), n_clients)]
    kind, _, arg = spec.partition(":")
    if kind == "shards":
        per = int(arg) if arg else 2
        n_shards = n_clients * per
        if n_shards > len(y):
            raise DataError(f"{n_shards} shards need at least as many examples; lower shards per client")
        order = np.argsort(y, kind="stable")
        shards = np.array_split(order, n_shards)
        perm = rng.permutation(n_shards)
        return [np.sort(np.concatenate([shards[s] for s in perm[i * per:(i + 1) * per]])) for i in range(n_clients)]
    if kind == "dirichlet":
        alpha = float(arg)
        classes = np.unique(y)
        for _attempt in range(100):
            parts: list[list[int]] = [[] for _ in range(n_clients)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(y == c))
                props = rng.dirichlet(np.full(n_clients, alpha))
                cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
                for i, chunk in enumerate(np.split(idx, cuts)):
                    parts[i].extend(chunk.tolist())
            if min(len(p) for p in parts) >= 2:
                return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
        raise DataError(f"dirichlet:{alpha} left a client with fewer than 2 examples in 100 tries; raise ALPHA or use fewer clients")
    raise DataError(f"unknown partition {spec!r}: use iid, shards, shards:K or dirichlet:ALPHA")


def pack(**arrays: np.ndarray) -> bytes:
    """npz bytes of the arrays (no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    """Arrays from npz bytes; pickled objects are refused."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"data blob is not a readable npz file ({exc})") from None


def client_split(x: np.ndarray, y: np.ndarray, holdout_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A client's arrays: train part and a holdout for federated evaluation."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_hold = int(round(len(x) * holdout_fraction)) if len(x) > 1 else 0
    ho, tr = idx[:n_hold], idx[n_hold:]
    return {"x_train": x[tr], "y_train": y[tr], "x_val": x[ho], "y_val": y[ho]}
