"""Federation setup: validate the config, split the data, and write federation.json, data and the initial model."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from fedkeeper import data as datamod
from fedkeeper import heap
from fedkeeper.core import blob, keys, rounds
from fedkeeper.core.config import FederationConfig
from fedkeeper.store import NotFound, Store


class SetupError(RuntimeError):
    """The store cannot take this federation; the message names the fix."""


def existing(store: Store) -> dict | None:
    """The federation.json already in the store, if any."""
    try:
        return store.get_json(keys.FEDERATION)
    except NotFound:
        return None


# Where seeded initial models are kept between runs; "off" (or empty) disables the cache.
CACHE_ENV = "FEDKEEPER_CACHE_DIR"


def cache_dir() -> Path | None:
    """The folder of cached initial models: $FEDKEEPER_CACHE_DIR, else $XDG_CACHE_HOME/fedkeeper or ~/.cache/fedkeeper."""
    v = os.environ.get(CACHE_ENV)
    if v is not None:
        return None if v.strip().lower() in ("", "off", "none", "0") else Path(v)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedkeeper"


def library_versions(dists: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each distribution, None where it is not installed."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def initial_key(model: str, input_shape: tuple, num_classes: int, seed: int) -> str:
    """What determines a seeded initial model: the architecture's code, its inputs, and the libraries that draw it."""
    from fedkeeper import models

    versions = library_versions(("tensorflow", "tensorflow-cpu", "keras", "numpy"))
    spec = json.dumps({"model": model, "input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes),
                       "seed": int(seed), "versions": versions}, sort_keys=True)
    h = hashlib.sha256(Path(models.__file__).read_bytes())
    h.update(spec.encode())
    return h.hexdigest()[:32]


def _cached_initial(folder: Path, name: str, key: str) -> dict | None:
    """The cached model `name` if it is whole and was stored for key; None otherwise (it is then rebuilt)."""
    from fedkeeper.store.local import LocalStore

    try:
        b = blob.decode(LocalStore(folder).get(name), copy=True)
    except (OSError, NotFound, blob.BlobError, ValueError):
        return None
    if b.meta.get("kind") != "initial-model" or b.meta.get("cache_key") != key or not b.tensors:
        return None
    return dict(b.tensors)


def _store_initial(folder: Path, name: str, key: str, weights: dict) -> None:
    """Keep weights for the next run (the folder store writes atomically); a cache that cannot be written
    only costs that run's rebuild."""
    from fedkeeper.store.local import LocalStore

    try:
        LocalStore(folder).put(name, blob.encode(weights, {"kind": "initial-model", "cache_key": key}))
    except OSError:
        pass


def initial_weights(model: str, input_shape: tuple, num_classes: int, seed: int) -> dict:
    """The seeded initial model: from the cache when an earlier run built the same one, else built and cached."""
    folder = cache_dir()
    if folder is None:
        return build_initial_weights(model, input_shape, num_classes, seed)
    key = initial_key(model, input_shape, num_classes, seed)
    name = f"initial/{model}-{key}.blob"
    cached = _cached_initial(folder, name, key)
    if cached is not None:
        return cached
    weights = build_initial_weights(model, input_shape, num_classes, seed)
    _store_initial(folder, name, key, weights)
    return weights


def _builder_start() -> None:
    """Start of the model-building process: quiet Ctrl-C, and refuse the libraries no function imports."""
    from fedkeeper.interrupts import quiet_interrupts
    from fedkeeper.runtime.worker import hide_undeployed

    quiet_interrupts()
    hide_undeployed()  # Keras would import scikit-learn and pandas, ~3 s of this process's start


def build_initial_weights(model: str, input_shape: tuple, num_classes: int, seed: int) -> dict:
    """Build the initial model in a short-lived process, so the caller (the CLI, the runtime) never holds TensorFlow."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from fedkeeper import models
    from fedkeeper.interrupts import interrupts_held

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), initializer=_builder_start) as pool:
        with interrupts_held():  # the pool starts its process here
            future = pool.submit(models.initial_weights, model, tuple(input_shape), num_classes, seed)
        return future.result()


def setup(cfg: FederationConfig, store: Store, progress=print) -> dict:
    """Write everything a federation needs before round 0; returns data/meta.json's content."""
    if existing(store) is not None:
        raise SetupError(f"{store.url} already holds a federation; use another --store, or --resume to continue it")
    t0 = time.perf_counter()
    ds = datamod.load(cfg.data.dataset, seed=cfg.seed, test_fraction=cfg.data.test_fraction)
    own = [c for c in cfg.clients if not c.data]
    parts = datamod.partition(ds.y_train, max(1, len(own)), cfg.data.partition, seed=cfg.seed) if own else []
    sizes, arrays = {}, {}
    for i, (c, idx) in enumerate(zip(own, parts)):
        arrays = datamod.client_split(ds.x_train[idx], ds.y_train[idx], cfg.data.holdout_fraction, seed=cfg.seed + i)
        store.put(keys.client_data(c.id), datamod.pack(**arrays))
        sizes[c.id] = int(len(idx))
    store.put(keys.TEST_DATA, datamod.pack(x=ds.x_test, y=ds.y_test))
    meta = {"dataset": cfg.data.dataset, "num_classes": ds.num_classes, "input_shape": list(ds.input_shape),
            "train_examples": int(len(ds.y_train)), "test_examples": int(len(ds.y_test)), "partition": cfg.data.partition,
            "client_examples": sizes}
    store.put_json("data/meta.json", meta)
    progress(f"data: {cfg.data.dataset}, {len(ds.y_train)} train / {len(ds.y_test)} test examples, "
             f"{cfg.data.partition} over {len(own)} clients")
    weights = initial_weights(cfg.model.name, ds.input_shape, ds.num_classes, cfg.seed)
    store.put(keys.model(0), blob.encode(weights, {"kind": "model", "round": 0, "model": cfg.model.name}))
    store.put_json(keys.FEDERATION, cfg.to_dict())
    if cfg.privacy.secure_aggregation:  # each client's long-term key: public half in the store, private in its own file
        from fedkeeper.functions import secagg

        secagg.register(store, cfg)
    store.put_json(keys.STATE, rounds.new_state())
    n_params = sum(int(w.size) for w in weights.values())
    progress(f"model: {cfg.model.name}, {n_params:,} parameters; setup took {time.perf_counter() - t0:.1f} s")
    # The dataset and its partitions are garbage now; the process that set up often drives the whole run, and
    # would otherwise keep their pages (25 MB for MNIST 10k) until it exits.
    del ds, parts, arrays, weights
    heap.release()
    return meta
