"""Federation setup: validate the config, split the data, and write federation.json, data and the initial model."""

from __future__ import annotations

import time

from fedkeeper import data as datamod
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


def initial_weights(model: str, input_shape: tuple, num_classes: int, seed: int) -> dict:
    """Build the initial model in a short-lived process, so the caller (the CLI, the runtime) never holds TensorFlow."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from fedkeeper import models
    from fedkeeper.interrupts import interrupts_held, quiet_interrupts

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), initializer=quiet_interrupts) as pool:
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
    sizes = {}
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
    return meta
